"""`broker keys rotate | list`: the broker's signing keys."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated

import typer

from broker.audit import DecisionLog, KeyringCheckpointSigner, build_sinks
from broker.clock import SystemClock
from broker.settings import BrokerSettings, SigningKeysConfig, load_settings
from broker.tokens import Keyring, KeyringError, has_key_files

DEV_STATE_DIR = Path("var/dev")
DEV_KEYS_DIR = DEV_STATE_DIR / "keys"


def dev_key_directory(settings: BrokerSettings, state_dir: Path) -> Path:
    """Where `broker dev` keeps its signing keys: signing_keys.directory when configured (file
    or BROKER_SIGNING_KEYS__DIRECTORY), else <state dir>/keys."""
    if settings.signing_keys.directory != SigningKeysConfig().directory:
        return settings.signing_keys.directory
    return state_dir / "keys"


keys_app = typer.Typer(help="Manage the broker's token signing keys.", no_args_is_help=True)
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration.")]


KeysDirOption = Annotated[
    Path | None, typer.Option(help="Overrides signing_keys.directory.", show_default=False)
]
DevOption = Annotated[
    bool,
    typer.Option(
        "--dev",
        help=f"The keys `broker dev` uses ({DEV_KEYS_DIR}, for its default --state-dir) "
        "unless signing_keys.directory is configured.",
    ),
]


def key_directory(settings: BrokerSettings, keys_dir: Path | None, dev: bool) -> Path:
    """--keys-dir, else `broker dev`'s directory with --dev, else signing_keys.directory."""
    if keys_dir is not None:
        return keys_dir
    return dev_key_directory(settings, DEV_STATE_DIR) if dev else settings.signing_keys.directory


def _keyring(settings: BrokerSettings, directory: Path, *, create: bool) -> Keyring:
    try:
        return Keyring(
            directory,
            algorithm=settings.signing_keys.algorithm,
            clock=SystemClock(),
            publish_grace_seconds=settings.tokens.max_lifetime_seconds
            + settings.tokens.leeway_seconds,
            generate_if_missing=create,
        )
    except KeyringError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


@keys_app.command("rotate")
def rotate(
    config: ConfigOption = None, keys_dir: KeysDirOption = None, dev: DevOption = False
) -> None:
    """Add a new signing key. The previous key stays published until its tokens expire;
    running brokers pick the change up within a second."""
    settings = load_settings(config)
    directory = key_directory(settings, keys_dir, dev)
    typer.echo(f"signing keys in {directory}", err=True)
    keyring = _keyring(settings, directory, create=True)
    previous = keyring.active.kid
    new = keyring.rotate()
    _audit_rotation(settings, keyring, previous, new.kid, keyring.published_kids())
    typer.echo(f"new signing key: {new.kid} ({new.algorithm})")
    typer.echo("published: " + " ".join(keyring.published_kids()))


def _audit_rotation(
    settings: BrokerSettings, keyring: Keyring, previous: str, kid: str, published: list[str]
) -> None:
    """An admin-action record in the configured audit trail (file and S3 sinks: the terminal
    is not the trail). Running brokers also record ``signing_key.rotated`` when they see it."""
    sinks = build_sinks(settings.audit.model_copy(update={"stdout": False}))
    if not sinks:
        return
    trail = DecisionLog(sinks, SystemClock(), signer=KeyringCheckpointSigner(keyring))
    try:
        trail.record(
            "admin.signing_key_rotated",
            outcome="rotated",
            by=_operator(),
            via="cli",
            previous_kid=previous,
            kid=kid,
            published_kids=published,
        )
    finally:
        trail.close()


def _operator() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (containers)
        return f"uid:{os.getuid()}"


@keys_app.command("list")
def list_keys(
    config: ConfigOption = None, keys_dir: KeysDirOption = None, dev: DevOption = False
) -> None:
    """List published signing keys; the active one is marked. Read-only: creates nothing."""
    settings = load_settings(config)
    directory = key_directory(settings, keys_dir, dev)
    typer.echo(f"signing keys in {directory}", err=True)
    if not has_key_files(directory):
        hint = "" if dev or keys_dir else " (`broker dev` keeps its own: add --dev)"
        typer.echo(f"no signing keys in {directory}{hint}", err=True)
        raise typer.Exit(1)
    keyring = _keyring(settings, directory, create=False)
    active = keyring.active.kid
    for kid in keyring.published_kids():
        typer.echo(f"{'*' if kid == active else ' '} {kid}")

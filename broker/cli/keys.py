"""`broker keys rotate | list`: the broker's signing keys."""

from __future__ import annotations

import getpass
import os
from pathlib import Path
from typing import Annotated

import typer

from broker.audit import DecisionLog, KeyringCheckpointSigner, build_sinks
from broker.clock import SystemClock
from broker.settings import BrokerSettings, load_settings
from broker.tokens import Keyring

keys_app = typer.Typer(help="Manage the broker's token signing keys.", no_args_is_help=True)
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration.")]


def _keyring(settings: BrokerSettings, keys_dir: Path | None) -> Keyring:
    return Keyring(
        keys_dir or settings.signing_keys.directory,
        algorithm=settings.signing_keys.algorithm,
        clock=SystemClock(),
        publish_grace_seconds=settings.tokens.max_lifetime_seconds + settings.tokens.leeway_seconds,
        generate_if_missing=True,
    )


@keys_app.command("rotate")
def rotate(
    config: ConfigOption = None,
    keys_dir: Annotated[Path | None, typer.Option(help="Overrides signing_keys.directory.")] = None,
) -> None:
    """Add a new signing key. The previous key stays published until its tokens expire;
    running brokers pick the change up within a second."""
    settings = load_settings(config)
    keyring = _keyring(settings, keys_dir)
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
    config: ConfigOption = None,
    keys_dir: Annotated[Path | None, typer.Option(help="Overrides signing_keys.directory.")] = None,
) -> None:
    """List published signing keys; the active one is marked."""
    keyring = _keyring(load_settings(config), keys_dir)
    active = keyring.active.kid
    for kid in keyring.published_kids():
        typer.echo(f"{'*' if kid == active else ' '} {kid}")

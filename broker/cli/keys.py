"""`broker keys rotate | list`: the broker's signing keys."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from broker.clock import SystemClock
from broker.settings import load_settings
from broker.tokens import Keyring

keys_app = typer.Typer(help="Manage the broker's token signing keys.", no_args_is_help=True)
ConfigOption = Annotated[Path | None, typer.Option("--config", "-c", help="YAML configuration.")]


def _keyring(config: Path | None, keys_dir: Path | None) -> Keyring:
    settings = load_settings(config)
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
    keyring = _keyring(config, keys_dir)
    new = keyring.rotate()
    typer.echo(f"new signing key: {new.kid} ({new.algorithm})")
    typer.echo("published: " + " ".join(keyring.published_kids()))


@keys_app.command("list")
def list_keys(
    config: ConfigOption = None,
    keys_dir: Annotated[Path | None, typer.Option(help="Overrides signing_keys.directory.")] = None,
) -> None:
    """List published signing keys; the active one is marked."""
    keyring = _keyring(config, keys_dir)
    active = keyring.active.kid
    for kid in keyring.published_kids():
        typer.echo(f"{'*' if kid == active else ' '} {kid}")

"""`broker token decode`: show a token's header and claims (for people, not for verification)."""

from __future__ import annotations

import json

import jwt
import typer


def decode(token: str) -> None:
    """Print a JWT's header and claims WITHOUT verifying it (use the JWKS to verify)."""
    try:
        header = jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        typer.echo("error: not a well-formed JWT", err=True)
        raise typer.Exit(1) from None
    typer.echo("# not verified; verify against the broker's /.well-known/jwks.json")
    typer.echo(json.dumps({"header": header, "claims": claims}, indent=2))

"""The `broker` command's tree: `serve`, `dev`, `healthcheck`, `policy ...`, `keys ...`,
`token decode`, `audit ...`, `usage report`. Imports the server's dependencies (the `server`
extra); `broker.cli.main` is the console script that says so when they are missing."""

from __future__ import annotations

import typer

from broker.cli.audit import audit_app, usage_app
from broker.cli.healthcheck import healthcheck
from broker.cli.keys import keys_app
from broker.cli.policy import policy_app
from broker.cli.serve import dev, serve
from broker.cli.token import decode

app = typer.Typer(
    name="broker",
    help="Identity-delegation and secrets broker for AI agents.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command()(serve)
app.command()(dev)
app.command()(healthcheck)
app.add_typer(policy_app, name="policy")
app.add_typer(keys_app, name="keys")
app.add_typer(audit_app, name="audit")
app.add_typer(usage_app, name="usage")
token_app = typer.Typer(help="Inspect tokens.", no_args_is_help=True)
token_app.command("decode")(decode)
app.add_typer(token_app, name="token")

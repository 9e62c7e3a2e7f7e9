"""The `broker` console script. The commands live in `broker.cli.commands` and need the `server`
extra; this module imports none of it, so that a light install (the client or the resource-server
kit only) gets one line saying what to install instead of a traceback."""

from __future__ import annotations

import sys
from typing import Any

SERVER_EXTRA_HINT = "the broker server needs: pip install 'agent-identity-broker[server]'"

# A missing module of the project itself is a bug, not a missing extra: that one still raises.
_OWN_PACKAGES = frozenset({"broker", "idp_adapters", "secret_backends"})


def main() -> None:
    try:
        from broker.cli.commands import app

        app()
    except ModuleNotFoundError as error:
        missing = (error.name or "").partition(".")[0]
        if not missing or missing in _OWN_PACKAGES or missing in sys.stdlib_module_names:
            raise
        print(f"{SERVER_EXTRA_HINT} (missing module: {missing})", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str) -> Any:
    # `from broker.cli import app` (the Typer application), imported only when asked for.
    if name == "app":
        from broker.cli.commands import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

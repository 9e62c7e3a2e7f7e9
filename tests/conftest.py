"""Shared pytest fixtures."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import pytest

from broker.clock import FrozenClock, SystemClock
from broker.settings import IdentityProviderConfig
from idp_adapters._loopback import RunningServer, reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider, DevPerson

# ======================================================================================
# identity fixtures
# ======================================================================================
#   anyio_backend       -- run @pytest.mark.anyio tests on asyncio only (the broker's loop)
#   serve_recorded      -- factory: serve an ASGI app on loopback behind a RecordingApp
#   dev_idp             -- a fresh DevIdentityProvider served on loopback (FrozenClock)
#   shared_dev_idp      -- one served DevIdentityProvider per module (SystemClock; do not mutate)

DEV_TEST_PEOPLE = MappingProxyType(
    {
        "alice": DevPerson("alice", ("support",), "alice@example.com", "Alice Example"),
        "bob": DevPerson("bob", ("engineering", "/oncall"), "bob@example.com", "Bob Example"),
    }
)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


class RecordingApp:
    """ASGI middleware counting requests per path; paths in `failing` answer 503."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.hits: Counter[str] = Counter()
        self.failing: set[str] = set()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            self.hits[path] += 1
            if path in self.failing:
                await send(
                    {
                        "type": "http.response.start",
                        "status": 503,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send({"type": "http.response.body", "body": b"down"})
                return
        await self.app(scope, receive, send)


@dataclass
class ServedDevIdp:
    """A DevIdentityProvider served over HTTP on loopback, with its request recorder."""

    provider: DevIdentityProvider
    server: RunningServer
    recorder: RecordingApp
    clock: Any

    @property
    def issuer(self) -> str:
        return self.provider.issuer

    @property
    def jwks_hits(self) -> int:
        return self.recorder.hits["/jwks.json"]

    @property
    def discovery_hits(self) -> int:
        return self.recorder.hits["/.well-known/openid-configuration"]

    def config(self, **overrides: Any) -> IdentityProviderConfig:
        """An IdentityProviderConfig trusting this IdP (kind dev, both token types)."""
        values: dict[str, Any] = {
            "name": "dev",
            "kind": "dev",
            "issuer": self.provider.issuer,
            "client_ids": [self.provider.client_id],
            "audiences": [self.provider.audience],
        }
        values.update(overrides)
        return IdentityProviderConfig(**values)


def _serve_dev_idp(clock: Any) -> ServedDevIdp:
    sock = reserve_loopback_socket()
    provider = DevIdentityProvider(
        f"http://127.0.0.1:{sock.getsockname()[1]}", DEV_TEST_PEOPLE, clock=clock
    )
    recorder = RecordingApp(provider.asgi_app())
    try:
        server = serve_in_thread(recorder, sock=sock)
    except BaseException:
        sock.close()
        raise
    return ServedDevIdp(provider=provider, server=server, recorder=recorder, clock=clock)


@pytest.fixture
def serve_recorded() -> Iterator[Callable[[Any], tuple[RunningServer, RecordingApp]]]:
    with contextlib.ExitStack() as started:  # every server stops, even if one stop fails

        def serve(app: Any) -> tuple[RunningServer, RecordingApp]:
            recorder = RecordingApp(app)
            server = started.enter_context(serve_in_thread(recorder))
            return server, recorder

        yield serve


@pytest.fixture
def dev_idp() -> Iterator[ServedDevIdp]:
    served = _serve_dev_idp(FrozenClock(start=float(int(time.time()))))
    with served.server:
        yield served


@pytest.fixture(scope="module")
def shared_dev_idp() -> Iterator[ServedDevIdp]:
    served = _serve_dev_idp(SystemClock())
    with served.server:
        yield served


# ======================================================================================
# end of identity fixtures
# ======================================================================================

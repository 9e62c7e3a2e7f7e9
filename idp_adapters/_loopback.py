"""Serving an ASGI app on loopback from a background thread (development IdP, tests).

`serve_in_thread` binds the socket itself before starting uvicorn, so the port is known (and
held) before the server runs; `reserve_loopback_socket` lets a caller learn the port even earlier,
for example to build an issuer URL before the app exists. Only loopback hosts are allowed.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType
from typing import Literal

import uvicorn

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


def reserve_loopback_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A TCP socket bound (not yet listening) to `host`:`port` (0 = any free port)."""
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"{host!r} is not a loopback host")
    family = socket.AF_INET6 if host == "::1" else socket.AF_INET
    bind_host = "127.0.0.1" if host == "localhost" else host
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((bind_host, port))
    except OSError:
        sock.close()
        raise
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


class RunningServer:
    """A uvicorn server running in a daemon thread. Stop it with `stop()` (or use `with`)."""

    def __init__(
        self, server: uvicorn.Server, thread: threading.Thread, host: str, port: int
    ) -> None:
        self._server = server
        self._thread = thread
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """``http://<host>:<port>`` (no trailing slash)."""
        return f"http://{_url_host(self.host)}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the server to exit and wait for its thread (idempotent)."""
        self._server.should_exit = True
        self._thread.join(timeout)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def serve_in_thread(
    app: object,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    sock: socket.socket | None = None,
    startup_timeout: float = 10.0,
    lifespan: Literal["on", "off", "auto"] = "off",
) -> RunningServer:
    """Serve the ASGI `app` on loopback in a daemon thread; return once it accepts connections.

    Pass `sock` (from `reserve_loopback_socket`) to serve on an already-bound socket; otherwise
    `host`:`port` is bound here (port 0 picks a free port, see `RunningServer.port`).
    """
    if sock is None:
        sock = reserve_loopback_socket(host, port)
    else:
        bound_host = sock.getsockname()[0]
        if bound_host not in LOOPBACK_HOSTS:
            raise ValueError(f"socket is bound to {bound_host!r}, which is not loopback")
        host = host if host == "localhost" else bound_host
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=host,
        port=port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan=lifespan,
        timeout_graceful_shutdown=1,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"loopback-{port}", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + startup_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            thread.join(1.0)
            with contextlib.suppress(OSError):
                sock.close()
            raise RuntimeError(f"loopback server on port {port} failed to start")
        time.sleep(0.005)
    return RunningServer(server, thread, host, port)

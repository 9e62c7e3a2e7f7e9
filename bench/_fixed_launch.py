"""``broker serve`` with one launch-time change, nothing in the broker itself: TCP_NODELAY with
several workers.

With ``workers > 1`` uvicorn binds the listening socket itself (``Config.bind_socket``) without a
protocol number; accepted sockets inherit ``proto == 0`` and asyncio only sets ``TCP_NODELAY``
when ``proto == IPPROTO_TCP`` (uvicorn issue #3149). Nagle's algorithm then holds each response
body until the client's delayed ACK: about 40 ms per keep-alive request on Linux. Here the
socket is rebuilt with ``IPPROTO_TCP`` (what a fix in ``broker serve`` would do: bind the socket
itself and hand it to uvicorn's supervisor, or wait for the uvicorn fix).

Usage: ``python -m bench._fixed_launch serve --config FILE``.
"""

from __future__ import annotations

import socket
from typing import Any

import uvicorn.config

_original_bind_socket = uvicorn.config.Config.bind_socket


def _bind_socket_with_tcp_proto(self: uvicorn.config.Config) -> socket.socket:
    sock = _original_bind_socket(self)
    if sock.family in {socket.AF_INET, socket.AF_INET6} and sock.proto != socket.IPPROTO_TCP:
        fixed = socket.socket(sock.family, sock.type, socket.IPPROTO_TCP, fileno=sock.detach())
        fixed.set_inheritable(True)
        return fixed
    return sock


def main() -> Any:
    uvicorn.config.Config.bind_socket = _bind_socket_with_tcp_proto  # type: ignore[method-assign]
    from broker.cli import main as broker_main

    return broker_main()


if __name__ == "__main__":
    main()

"""Starlette and FastAPI adapters for `ResourceServer`.

    app.add_middleware(BrokerAuth, rs=rs, required_scopes=["notes:read"])   # every route
    @app.get("/notes")
    async def notes(caller: Caller = Depends(require("notes:read"))): ...   # per route

`BrokerAuth` is plain ASGI middleware: it serves the RFC 9728 metadata document at the resource's
well-known path(s), lets `exempt_paths` through, and authenticates everything else (Bearer, or
DPoP with a proof for the request's method and URL, the URL taken on the resource identifier's
origin so a proxy in front does not matter), putting the `Caller` in ``request.state.caller``. A
refusal is answered right there: status, ``WWW-Authenticate`` challenge(s), a small JSON body.

`require(...)` is a dependency (FastAPI's ``Depends``, or call it yourself): it checks the route's
scopes for the caller the middleware found, or authenticates the request itself when given `rs`
and no middleware ran. It raises Starlette's ``HTTPException`` with the challenge headers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from broker.kit._errors import InvalidRequest, KitError
from broker.kit._verify import Caller, ResourceServer

STATE_CALLER = "caller"
STATE_RESOURCE_SERVER = "broker_resource_server"
_METADATA_HEADERS = {
    "Cache-Control": "public, max-age=300",
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, OPTIONS",
}


def request_path(scope: Scope) -> str:
    """The request's full path (``root_path`` included once, whichever way the server sets it)."""
    root, path = scope.get("root_path", ""), scope["path"]
    return path if not root or path.startswith(root) else root + path


async def authenticate_scope(
    rs: ResourceServer, scope: Scope, required_scopes: Iterable[str] = ()
) -> Caller:
    """Authenticate one ASGI HTTP or WebSocket request (raises `KitError`)."""
    headers = Headers(scope=scope)
    authorization = headers.getlist("authorization")
    if len(authorization) > 1:
        raise InvalidRequest(
            "more than one Authorization header", resource_metadata=rs.resource_metadata_url
        )
    return await rs.authenticate(
        authorization[0] if authorization else None,
        headers.getlist("dpop"),
        method=scope.get("method", "GET"),
        url=rs.request_url(request_path(scope)),
        required_scopes=required_scopes,
    )


def error_response(error: KitError) -> Response:
    """The HTTP answer for a refusal (every ``WWW-Authenticate`` challenge its own header)."""
    response = Response(error.body(), status_code=error.status, media_type="application/json")
    for name, value in error.headers:
        response.headers.append(name, value)
    return response


def metadata_response(rs: ResourceServer, method: str = "GET") -> Response:
    """The RFC 9728 document (CORS-readable: browser-based MCP clients fetch it)."""
    if method == "OPTIONS":
        return Response(status_code=204, headers=_METADATA_HEADERS)
    if method not in ("GET", "HEAD"):
        return Response(status_code=405, headers={"Allow": "GET, HEAD, OPTIONS"})
    return JSONResponse(rs.metadata(), headers=_METADATA_HEADERS)


def metadata_routes(rs: ResourceServer) -> list[Route]:
    """Routes serving the metadata document at `rs.metadata_paths` (for apps without
    `BrokerAuth`, e.g. next to the MCP SDK's own auth)."""

    async def endpoint(request: Request) -> Response:
        return metadata_response(rs, request.method)

    return [Route(p, endpoint, methods=["GET", "HEAD", "OPTIONS"]) for p in rs.metadata_paths]


class BrokerAuth:
    """ASGI middleware: every request but the metadata and `exempt_paths` needs a broker token
    for `rs` holding `required_scopes` (see the module docstring)."""

    def __init__(
        self,
        app: ASGIApp,
        rs: ResourceServer,
        *,
        required_scopes: Collection[str] = (),
        exempt_paths: Collection[str] = (),
        serve_metadata: bool = True,
    ) -> None:
        self.app = app
        self.rs = rs
        self.required_scopes = tuple(required_scopes)
        self.exempt_paths = frozenset(exempt_paths)
        self.serve_metadata = serve_metadata

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = request_path(scope)
        if self.serve_metadata and scope["type"] == "http" and path in self.rs.metadata_paths:
            await metadata_response(self.rs, scope["method"])(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state[STATE_RESOURCE_SERVER] = self.rs
        if path in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        try:
            caller = await authenticate_scope(self.rs, scope, self.required_scopes)
        except KitError as error:
            if scope["type"] == "websocket":
                await _refuse_websocket(error, receive, send)
            else:
                await error_response(error)(scope, receive, send)
            return
        state[STATE_CALLER] = caller
        await self.app(scope, receive, send)


async def _refuse_websocket(error: KitError, receive: Receive, send: Send) -> None:
    message: Message = await receive()  # websocket.connect
    if message["type"] == "websocket.connect":
        await send({"type": "websocket.close", "code": 1008, "reason": error.description[:120]})


def require(
    *scopes: str, rs: ResourceServer | None = None
) -> Callable[[HTTPConnection], Awaitable[Caller]]:
    """A dependency returning the `Caller`, refusing with 401/403 (and the challenge) unless the
    token holds every scope in `scopes`."""

    async def dependency(request: HTTPConnection) -> Caller:
        state: dict[str, Any] = request.scope.setdefault("state", {})
        server = rs or state.get(STATE_RESOURCE_SERVER)
        if server is None:
            raise RuntimeError("require() needs rs= when the BrokerAuth middleware is not used")
        try:
            caller = state.get(STATE_CALLER)
            if caller is None:
                caller = await authenticate_scope(server, request.scope)
                state[STATE_CALLER] = caller
            server.check_scopes(caller, scopes)
        except KitError as error:
            raise HTTPException(
                error.status, detail=error.description, headers=error.header_map()
            ) from None
        return caller

    return dependency


def caller_of(request: HTTPConnection) -> Caller | None:
    """The caller `BrokerAuth` (or a `require` dependency) found for this request, if any."""
    caller = request.scope.get("state", {}).get(STATE_CALLER)
    return caller if isinstance(caller, Caller) else None


__all__ = [
    "BrokerAuth",
    "authenticate_scope",
    "caller_of",
    "error_response",
    "metadata_response",
    "metadata_routes",
    "request_path",
    "require",
]

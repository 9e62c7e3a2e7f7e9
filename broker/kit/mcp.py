"""The official MCP SDK's server-side token verifier, backed by `ResourceServer`.

    rs = ResourceServer(issuer=BROKER, resource="https://tools.example/mcp")
    server = MCPServer("tools", token_verifier=BrokerTokenVerifier(rs),
                       auth=auth_settings(rs, required_scopes=["notes:read"]))

    @server.tool()
    async def whoami() -> dict:
        caller = current_caller()
        return {"person": caller.person, "agents": list(caller.agent_chain)}

The SDK hands a verifier the token alone (``TokenVerifier.verify_token(token)``): no method, URL
or ``DPoP`` header, and its bearer middleware only reads the ``Bearer`` scheme. A DPoP-bound
token therefore cannot be checked through this interface and is refused (the verifier answers
None, the SDK a 401). For DPoP, put `broker.kit.starlette.BrokerAuth` in front of the SDK's
streamable HTTP app instead of the SDK's auth: it checks proofs, and tools read the caller with
``current_caller(ctx)``.

Scopes the whole server needs go in `auth_settings(required_scopes=...)`: the SDK answers a token
without them 403 ``insufficient_scope`` (its challenge names no ``scope``; `BrokerAuth`'s does).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

from broker.kit._errors import KitError
from broker.kit._verify import Caller, ResourceServer
from broker.kit.starlette import caller_of

_log = logging.getLogger("broker.kit")


class BrokerTokenVerifier:
    """`mcp.server.auth.provider.TokenVerifier` for broker tokens (bearer tokens only)."""

    def __init__(self, rs: ResourceServer) -> None:
        self.rs = rs

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            caller = await self.rs.verify_bearer(token)
        except KitError as error:
            _log.info("MCP request refused (%d): %s", error.status, error.description)
            return None
        return AccessToken(
            token=token,
            client_id=caller.client_id,
            scopes=sorted(caller.scopes),
            expires_at=caller.expires_at,
            resource=self.rs.resource,
            subject=caller.person,
            claims=dict(caller.claims),
        )


def auth_settings(
    rs: ResourceServer, *, required_scopes: Iterable[str] = (), **extra: Any
) -> AuthSettings:
    """The SDK's `AuthSettings` for `rs`: the broker as authorization server, `rs.resource` as
    the resource (its RFC 9728 metadata is then served by the SDK), tokens checked to be for it."""
    scopes = list(required_scopes)
    return AuthSettings(
        issuer_url=rs.issuer,  # type: ignore[arg-type]  (pydantic parses the URL)
        resource_server_url=rs.resource,  # type: ignore[arg-type]
        required_scopes=scopes or None,
        validate_token_resource=True,
        **extra,
    )


def current_caller(ctx: Any = None) -> Caller | None:
    """The caller of the MCP request being handled: from the SDK's verified access token (any
    verifier that keeps the claims), or, with `ctx` (the tool's ``Context``), from the HTTP
    request `BrokerAuth` authenticated. None when neither knows one."""
    token = get_access_token()
    if token is not None and token.claims:
        try:
            return Caller.from_claims(token.claims)
        except ValueError:
            return None
    if ctx is not None:
        try:
            request = ctx.request_context.request
        except (AttributeError, ValueError):
            return None
        return caller_of(request) if request is not None else None
    return None


__all__ = ["BrokerTokenVerifier", "auth_settings", "current_caller"]

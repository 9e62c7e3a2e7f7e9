"""The resource-server kit: what a tool (an MCP server, an API) needs to accept broker tokens.

    from broker.kit import ResourceServer

    rs = ResourceServer(issuer="https://broker.example", resource="https://tools.example/mcp")
    caller = await rs.authenticate(authorization, dpop_headers, method="POST", url=url,
                                   required_scopes=["notes:read"])
    caller.person, caller.agent_chain, caller.approval, caller.token_id

Adapters: `broker.kit.starlette` (ASGI middleware, a FastAPI dependency, the RFC 9728 metadata
route) and `broker.kit.mcp` (the official MCP SDK's `TokenVerifier`). Light to install: httpx,
PyJWT, cryptography, cachetools (and starlette or mcp for the adapter you use); never the
broker's server dependencies.
"""

from broker.kit._errors import (
    InsufficientScope,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    KitError,
    MissingToken,
    Unavailable,
    UseDPoPNonce,
)
from broker.kit._verify import (
    ACCESS_TOKEN_TYP,
    WELL_KNOWN_PRM,
    Caller,
    Introspection,
    ResourceServer,
    protected_resource_metadata_url,
)

__all__ = [
    "ACCESS_TOKEN_TYP",
    "WELL_KNOWN_PRM",
    "Caller",
    "InsufficientScope",
    "Introspection",
    "InvalidDPoPProof",
    "InvalidRequest",
    "InvalidToken",
    "KitError",
    "MissingToken",
    "ResourceServer",
    "Unavailable",
    "UseDPoPNonce",
    "protected_resource_metadata_url",
]

"""The OAuth endpoints: token (dispatched to grant handlers), introspection, revocation, and the
authorization server's metadata and keys."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from broker.approvals.ciba import BC_AUTHORIZE_PATH
from broker.client_auth import AuthenticatedClient
from broker.endpoints.edge import Edge, GetRoute, PostRoute, Routes
from broker.errors import InvalidClient, UnsupportedResponseType
from broker.exchange import ISSUABLE_TOKEN_TYPES
from broker.grants import TokenEndpoint
from broker.id_jag import JWT_BEARER_GRANT_TYPE, id_jag_metadata
from broker.logs import new_request_id
from broker.oauth_request import OAuthForm
from broker.openapi import OPENAPI_PATH
from broker.revocation import RevocationEndpoints
from broker.settings import BrokerSettings

TOKEN_PATH = "/oauth2/token"  # noqa: S105 (a path, not a secret)
AUTHORIZE_PATH = "/oauth2/authorize"
AUTH_METHODS = ["client_secret_basic", "private_key_jwt"]
ASSERTION_ALGORITHMS = ["ES256", "RS256", "PS256", "EdDSA"]


def authorization_server_metadata(
    settings: BrokerSettings, grant_types: tuple[str, ...], dpop_algorithms: list[str]
) -> dict[str, Any]:
    """RFC 8414 metadata."""
    issuer = settings.issuer
    return {
        "issuer": issuer,
        "token_endpoint": settings.token_endpoint,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        # No authorization-code flow: the endpoint answers unsupported_response_type. Listed
        # because clients parsing RFC 8414 strictly (the MCP SDK's) require the member.
        "authorization_endpoint": f"{issuer}{AUTHORIZE_PATH}",
        "introspection_endpoint": f"{issuer}/oauth2/introspect",
        "revocation_endpoint": f"{issuer}/oauth2/revoke",
        "revocation_endpoint_auth_methods_supported": AUTH_METHODS,
        "grant_types_supported": list(grant_types),
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": AUTH_METHODS,
        "token_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
        "introspection_endpoint_auth_methods_supported": AUTH_METHODS,
        "introspection_endpoint_auth_signing_alg_values_supported": ASSERTION_ALGORITHMS,
        "service_documentation": "https://github.com/example/agent-identity-broker#readme",
        "openapi_uri": f"{issuer}{OPENAPI_PATH}",  # extension: the OpenAPI 3.1 description
        # OpenID CIBA: approval requests for what the policy grants only with approval.
        "backchannel_authentication_endpoint": f"{issuer}{BC_AUTHORIZE_PATH}",
        "backchannel_token_delivery_modes_supported": ["poll", "ping"],
        "backchannel_user_code_parameter_supported": False,
        # RFC 9449 §5.1: DPoP proofs accepted on every grant (asymmetric algorithms only).
        "dpop_signing_alg_values_supported": dpop_algorithms,
        # RFC 8693 token types it issues, including ID-JAGs for registered authorization
        # servers (draft-ietf-oauth-identity-assertion-authz-grant), which its jwt-bearer grant
        # redeems (the ID-JAG grant profile, as MCP's SEP-990 discovers it).
        "token_types_supported": [str(t) for t in sorted(ISSUABLE_TOKEN_TYPES)],
        **(id_jag_metadata() if JWT_BEARER_GRANT_TYPE in grant_types else {}),
    }


def oauth_routes(edge: Edge) -> Routes:
    services = edge.services
    token_endpoint = TokenEndpoint(services.grants)
    binding = services.binding
    revocation = RevocationEndpoints(
        services.revocations, services.broker_tokens, services.policies.current
    )

    # Endpoints are plain Starlette routes (Request -> Response): FastAPI's dependency solving
    # is not needed here and costs measurable time per request on the hot path.
    async def token(
        request: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        dpop = await binding.token_request(request.headers.getlist("dpop"))
        return await token_endpoint.handle(form, client, request_id=request_id, dpop=dpop)

    async def introspect(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        if client is None:
            raise InvalidClient("client authentication is required")
        return await services.introspection.handle(form, client, request_id=request_id)

    async def revoke(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await revocation.revoke_presented(form, client, request_id=request_id)

    metadata = authorization_server_metadata(
        edge.settings, token_endpoint.grant_types, binding.algorithms
    )

    async def server_metadata(_: Request) -> JSONResponse:
        return JSONResponse(metadata)

    async def authorize(_: Request) -> JSONResponse:
        return edge.error_response(
            UnsupportedResponseType(
                "this broker has no authorization-code flow: agents obtain tokens at "
                f"{TOKEN_PATH} (token exchange, ID-JAG, CIBA)"
            ),
            new_request_id(),
        )

    async def jwks(_: Request) -> JSONResponse:
        return JSONResponse(services.keyring.jwks(), headers={"Cache-Control": "max-age=300"})

    return [
        PostRoute(TOKEN_PATH, token, repeatable=token_endpoint.repeatable),
        PostRoute("/oauth2/introspect", introspect),
        PostRoute("/oauth2/revoke", revoke),
        GetRoute("/.well-known/oauth-authorization-server", server_metadata),
        GetRoute("/.well-known/jwks.json", jwks),
        GetRoute(AUTHORIZE_PATH, authorize),
    ]

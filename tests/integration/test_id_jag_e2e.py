"""Enterprise-managed MCP authorization (ID-JAG), both roles, against software nobody here wrote.

The broker is the enterprise's token service (it issues Identity Assertion JWT Authorization
Grants) and the MCP server's authorization server (its jwt-bearer grant redeems them). The MCP
server is built with the official ``mcp`` SDK and protected by FastMCP's ``JWTVerifier``
configured with the broker's issuer, JWKS and the server's URL only; the client is the SDK's
own ``IdentityAssertionOAuthProvider`` (SEP-990), whose assertion callback asks the broker for the
ID-JAG. Hostile ID-JAGs are refused in RFC 6749 terms, and nothing an agent obtains this way is
wider than the person's rights, the agent's ceiling and the ID-JAG.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from collections.abc import Iterator
from typing import Any

import httpx
import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from fastmcp.server.auth.providers.jwt import JWTVerifier
from mcp import Client
from mcp.client.auth.extensions.identity_assertion import IdentityAssertionOAuthProvider
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import MCPServer
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.dpop import DPoPKey
from idp_adapters._loopback import RunningServer, reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)

ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
SECRETS = {
    name: generate_client_secret()
    for name in ("mcp-agent", "other-agent", "narrow-agent", "revoker")
}
MCP_SOCKET = reserve_loopback_socket()
MCP_URL = f"http://127.0.0.1:{MCP_SOCKET.getsockname()[1]}/mcp"
OTHER_AS = "https://as.other.example"
OTHER_RESOURCE = "https://mcp.other.example/mcp"
EXTERNAL_KEY = ec.generate_private_key(ec.SECP256R1())
EXTERNAL_KID = "corp-1"


def _basic(name: str) -> dict[str, str]:
    return {
        "method": "client_secret_basic",
        "secret_hash": hash_client_secret(SECRETS[name], method="sha256"),
    }


def _policy(external_issuer: str) -> dict[str, Any]:
    return {
        "agents": {
            "mcp-agent": {
                "authentication": _basic("mcp-agent"),
                "ceiling": ["tickets:read", "tickets:comment", "kb:read"],
                "default_scopes": ["tickets:read"],
                "audiences": [MCP_URL, OTHER_RESOURCE],
                "act_for": [
                    "group:dev/support",
                    "group:dev/support-leads",
                    "person:corp/ext-alice",
                ],
                "may_delegate_to": ["narrow-agent"],
            },
            "narrow-agent": {
                "authentication": _basic("narrow-agent"),
                "ceiling": ["tickets:read"],
                "audiences": [MCP_URL],
                "act_for": ["group:dev/support"],
                "accepts_person_tokens": False,
            },
            "other-agent": {
                "authentication": _basic("other-agent"),
                "ceiling": ["tickets:read"],
                "audiences": [MCP_URL],
                "act_for": ["group:dev/support"],
            },
        },
        "person_bindings": [{"idp": "corp", "subject": "ext-alice", "roles": ["support"]}],
        "admins": {
            "revoker": {
                "authentication": _basic("revoker"),
                "permissions": ["revocations:write"],
            }
        },
        "authorization_servers": {
            "test-mcp": {
                "description": "This broker, as the tickets MCP server's authorization server",
                "issuer": "self",
                "resources": [MCP_URL],
                "agents": ["mcp-agent", "narrow-agent", "other-agent"],
            },
            "other-as": {
                "issuer": OTHER_AS,
                "resources": [OTHER_RESOURCE],
                "agents": ["mcp-agent"],
                "client_ids": {"mcp-agent": "s6BhdRkqt3"},
            },
        },
    }



@pytest.fixture(scope="module", autouse=True)
def _release_reserved_socket() -> Iterator[None]:
    """The socket reserved at import is closed when the module ends, served or not."""
    yield
    MCP_SOCKET.close()

@pytest.fixture(scope="module")
def secrets_env() -> Iterator[dict[str, str]]:
    mp = pytest.MonkeyPatch()
    values = example_client_secrets()
    for key, value in values.items():
        mp.setenv(key, value)
    yield values
    mp.undo()


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def external_jwks() -> Iterator[RunningServer]:
    """Another enterprise IdP's key set (its ID-JAGs are trusted by configuration)."""
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(EXTERNAL_KEY.public_key(), as_dict=True)
    body = json.dumps({"keys": [{**jwk, "kid": EXTERNAL_KID, "alg": "ES256", "use": "sig"}]})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})

    with serve_in_thread(app) as server:
        yield server


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    idp: DevIdentityProvider,
    secrets_env: dict[str, str],
    external_jwks: RunningServer,
) -> Iterator[RunningBroker]:
    with run_broker(
        tmp_path_factory.mktemp("id-jag"),
        [oidc_provider_config(idp)],
        policy_extra=_policy(external_jwks.url),
        id_jag={
            "trusted_issuers": [
                {
                    "name": "corp",
                    "issuer": external_jwks.url,
                    "jwks_uri": f"{external_jwks.url}/jwks.json",
                    "algorithms": ["ES256"],
                }
            ]
        },
    ) as running:
        yield running


def _mcp_app(broker: RunningBroker) -> Any:
    verifier = JWTVerifier(
        jwks_uri=f"{broker.url}/.well-known/jwks.json",
        issuer=broker.url,
        audience=MCP_URL,
        algorithm="ES256",
    )
    server = MCPServer(
        "tickets",
        token_verifier=verifier,
        auth=AuthSettings(
            issuer_url=broker.url,
            resource_server_url=MCP_URL,
            required_scopes=["tickets:read"],
            validate_token_resource=False,  # the verifier checks the audience itself
        ),
    )

    @server.tool()
    def whoami() -> dict[str, Any]:
        """Who the call is for: the person and the agent chain of the token."""
        token = get_access_token()
        assert token is not None
        claims = token.claims or {}
        return {
            "person": claims.get("sub"),
            "act": claims.get("act"),
            "scopes": sorted(token.scopes),
            "client_id": token.client_id,
        }

    return server.streamable_http_app(streamable_http_path="/mcp")


@pytest.fixture(scope="module")
def mcp_server(broker: RunningBroker) -> Iterator[RunningServer]:
    with serve_in_thread(_mcp_app(broker), sock=MCP_SOCKET, lifespan="on") as server:
        yield server


def _token(
    broker: RunningBroker, form: dict[str, Any], agent: str, **kwargs: Any
) -> httpx.Response:
    return httpx.post(broker.token_endpoint, data=form, auth=(agent, SECRETS[agent]), **kwargs)


def _id_jag(
    broker: RunningBroker,
    idp: DevIdentityProvider,
    *,
    agent: str = "mcp-agent",
    audience: str | None = None,
    resource: str = MCP_URL,
    person: str = "alice",
    **form: str,
) -> httpx.Response:
    data = exchange_form(
        idp.mint(person),
        requested_token_type=ID_JAG,
        audience=audience or broker.url,
        resource=resource,
        **form,
    )
    return _token(broker, data, agent)


def _redeem(
    broker: RunningBroker, assertion: str, agent: str = "mcp-agent", **form: str
) -> httpx.Response:
    return _token(broker, {"grant_type": JWT_BEARER, "assertion": assertion, **form}, agent)


class _MemoryStorage:
    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def test_the_mcp_sdk_obtains_an_mcp_token_with_an_id_jag_the_broker_issued_and_calls_a_tool(
    broker: RunningBroker, idp: DevIdentityProvider, mcp_server: RunningServer
) -> None:
    asked: list[tuple[str, str]] = []

    async def fetch_id_jag(audience: str, resource: str) -> str:
        # Leg 1 (deployment-specific, outside the SDK): the agent exchanges the person's SSO
        # token at the broker, its token service, for an ID-JAG for (audience, resource).
        asked.append((audience, resource))
        async with httpx.AsyncClient() as http:
            response = await http.post(
                broker.token_endpoint,
                data=exchange_form(
                    idp.mint("alice"),
                    requested_token_type=ID_JAG,
                    audience=audience,
                    resource=resource,
                    scope="tickets:read tickets:comment",
                ),
                auth=("mcp-agent", SECRETS["mcp-agent"]),
            )
        assert response.status_code == 200, response.text
        assert response.json()["token_type"] == "N_A"
        return response.json()["access_token"]

    storage = _MemoryStorage()
    provider = IdentityAssertionOAuthProvider(
        server_url=MCP_URL,
        storage=storage,
        client_id="mcp-agent",
        client_secret=SECRETS["mcp-agent"],
        issuer=broker.url,
        assertion_provider=fetch_id_jag,
        scope="tickets:read",
        token_endpoint_auth_method="client_secret_basic",
    )

    async def call() -> dict[str, Any]:
        async with (
            httpx2.AsyncClient(auth=provider, timeout=20) as http,
            Client(streamable_http_client(MCP_URL, http_client=http)) as client,
        ):
            result = await client.call_tool("whoami", {})
        assert not result.is_error, result
        return result.structured_content or json.loads(result.content[0].text)

    seen = asyncio.run(call())
    assert asked == [(broker.url, MCP_URL)]
    assert seen["person"] == "dev/alice"
    assert seen["act"] == {"sub": "mcp-agent"}
    assert seen["scopes"] == ["tickets:read"]  # what the client asked for, within the ID-JAG
    assert storage.tokens is not None and storage.tokens.token_type.lower() == "bearer"
    events = [r["event"] for r in broker.decisions.records if r.get("outcome") == "granted"]
    assert "token.jwt_bearer" in events


def test_an_id_jag_carries_what_the_draft_requires_and_no_more_than_the_policy_grants(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    response = _id_jag(broker, idp, scope="tickets:read kb:read")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["issued_token_type"] == ID_JAG and body["token_type"] == "N_A"
    assert body["expires_in"] <= 300
    jwks = jwt.PyJWKClient(f"{broker.url}/.well-known/jwks.json")
    token = body["access_token"]
    header = jwt.get_unverified_header(token)
    assert header["typ"] == "oauth-id-jag+jwt"
    claims = jwt.decode(
        token,
        jwks.get_signing_key_from_jwt(token).key,
        algorithms=["ES256"],
        audience=broker.url,
        issuer=broker.url,
    )
    assert claims["sub"] == "dev/alice"
    assert claims["client_id"] == "mcp-agent"
    assert claims["resource"] == MCP_URL
    assert claims["scope"] == "tickets:read kb:read"
    assert claims["act"] == {"sub": "mcp-agent"}
    assert claims["exp"] - claims["iat"] == body["expires_in"] and claims["jti"]

    # Another authorization server: its own audience and the client id it knows the agent by.
    other = _id_jag(broker, idp, audience=OTHER_AS, resource=OTHER_RESOURCE)
    assert other.status_code == 200, other.text
    other_claims = jwt.decode(other.json()["access_token"], options={"verify_signature": False})
    assert other_claims["aud"] == OTHER_AS and other_claims["client_id"] == "s6BhdRkqt3"


@pytest.mark.parametrize(
    ("case", "kwargs", "error"),
    [
        (
            "unregistered authorization server",
            {"audience": "https://as.unknown.example"},
            "invalid_target",
        ),
        ("resource of another server", {"resource": OTHER_RESOURCE}, "invalid_target"),
        (
            "agent not allowed there",
            {"agent": "other-agent", "audience": OTHER_AS, "resource": OTHER_RESOURCE},
            "unauthorized_client",
        ),
        ("beyond the person's rights", {"scope": "tickets:read tickets:write"}, "invalid_scope"),
        (
            "beyond the agent's ceiling",
            {"agent": "other-agent", "scope": "kb:read"},
            "invalid_scope",
        ),
    ],
)
def test_id_jag_requests_outside_the_policy_are_refused(
    broker: RunningBroker, idp: DevIdentityProvider, case: str, kwargs: dict[str, str], error: str
) -> None:
    response = _id_jag(broker, idp, **kwargs)
    assert response.status_code in (400, 401), (case, response.text)
    assert response.json()["error"] == error, (case, response.json())
    assert "access_token" not in response.json()


def _resign(broker: RunningBroker, claims: dict[str, Any], typ: str = "oauth-id-jag+jwt") -> str:
    """A JWT signed with the broker's own signing key (what a bug or a stolen key would make):
    only the checks after the signature stand between it and a token."""
    key = broker.services.keyring.active
    return jwt.encode(
        claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid, "typ": typ}
    )


def _fresh_claims(broker: RunningBroker, idp: DevIdentityProvider) -> dict[str, Any]:
    issued = _id_jag(broker, idp)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    claims["jti"] = secrets.token_urlsafe(12)
    return claims


def test_hostile_id_jags_are_refused(broker: RunningBroker, idp: DevIdentityProvider) -> None:
    def refused(assertion: str, agent: str = "mcp-agent", **form: str) -> str:
        response = _redeem(broker, assertion, agent, **form)
        assert response.status_code in (400, 401), response.text
        assert "access_token" not in response.json()
        return response.json()["error"]

    base = _fresh_claims(broker, idp)
    now = int(time.time())
    assert refused(_resign(broker, base, typ="JWT")) == "invalid_grant"  # wrong typ
    assert refused(_resign(broker, base, typ="at+jwt")) == "invalid_grant"
    assert refused(_resign(broker, {**base, "aud": "https://as.other.example"})) == "invalid_grant"
    assert refused(_resign(broker, {**base, "aud": [broker.url, OTHER_AS]})) == "invalid_grant"
    assert refused(_resign(broker, {**base, "iat": now - 900, "exp": now - 600})) == "invalid_grant"
    assert refused(_resign(broker, {**base, "exp": now + 7200})) == "invalid_grant"  # too long
    assert (
        refused(_resign(broker, {**base, "resource": "https://elsewhere.example/mcp"}))
        == "invalid_target"
    )
    no_resource = {k: v for k, v in base.items() if k != "resource"}
    assert refused(_resign(broker, no_resource)) == "invalid_grant"
    # Another client's ID-JAG (issued to mcp-agent, presented by other-agent).
    stolen = _id_jag(broker, idp).json()["access_token"]
    assert refused(stolen, agent="other-agent") == "invalid_grant"
    # Replayed: the first redemption works, the second is refused.
    once = _id_jag(broker, idp).json()["access_token"]
    assert _redeem(broker, once).status_code == 200
    assert refused(once) == "invalid_grant"
    # A scope the ID-JAG does not carry, and a resource other than the ID-JAG's.
    assert (
        refused(_id_jag(broker, idp).json()["access_token"], scope="tickets:comment")
        == "invalid_scope"
    )
    assert (
        refused(_id_jag(broker, idp).json()["access_token"], resource=OTHER_RESOURCE)
        == "invalid_target"
    )
    # An untrusted issuer: a key nobody configured, whatever it claims.
    rogue = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode(
        {**base, "iss": "https://idp.rogue.example"},
        rogue,
        algorithm="ES256",
        headers={"typ": "oauth-id-jag+jwt", "kid": "rogue"},
    )
    assert refused(forged) == "invalid_grant"
    # This broker's issuer, signed by another key.
    impostor = jwt.encode(base, rogue, algorithm="ES256", headers={"typ": "oauth-id-jag+jwt"})
    assert refused(impostor) == "invalid_grant"
    # A broker access token presented as an ID-JAG.
    access = _token(broker, exchange_form(idp.mint("alice"), audience=MCP_URL), "mcp-agent").json()[
        "access_token"
    ]
    assert refused(access) == "invalid_grant"
    assert refused("not-a-jwt") == "invalid_grant"


def test_an_id_jag_is_never_an_access_token(
    broker: RunningBroker,
    idp: DevIdentityProvider,
    secrets_env: dict[str, str],
    mcp_server: RunningServer,
) -> None:
    id_jag = _id_jag(broker, idp).json()["access_token"]
    # As a subject token to re-exchange,
    reexchange = _token(broker, exchange_form(id_jag, ACCESS_TOKEN), "mcp-agent")
    assert reexchange.status_code == 400 and reexchange.json()["error"] == "invalid_grant"
    # to introspection (a resource server sees it inactive),
    seen = httpx.post(
        f"{broker.url}/oauth2/introspect",
        data={"token": id_jag},
        auth=("tickets-api", secrets_env["TICKETS_API_SECRET"]),
    )
    assert seen.json() == {"active": False}
    # to a credential fetch,
    fetch = httpx.post(
        f"{broker.url}/v1/credentials/openai-api-key",
        data={"token": id_jag},
        auth=("llm-gateway", secrets_env["LLM_GATEWAY_SECRET"]),
    )
    assert fetch.status_code == 401
    # and to the MCP server itself (its audience is the authorization server, not the tool).
    mcp = httpx.post(
        MCP_URL,
        json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        headers={
            "Authorization": f"Bearer {id_jag}",
            "Accept": "application/json, text/event-stream",
        },
    )
    assert mcp.status_code == 401
    assert "resource_metadata" in mcp.headers.get("www-authenticate", "")


def test_an_enterprise_idps_id_jag_is_redeemed_for_the_person_it_names(
    broker: RunningBroker, external_jwks: RunningServer
) -> None:
    now = int(time.time())
    claims = {
        "iss": external_jwks.url,
        "sub": "ext-alice",
        "aud": broker.url,
        "client_id": "mcp-agent",
        "jti": secrets.token_urlsafe(12),
        "iat": now,
        "exp": now + 300,
        "resource": MCP_URL,
        "scope": "tickets:read tickets:comment",
    }
    headers = {"typ": "oauth-id-jag+jwt", "kid": EXTERNAL_KID}
    assertion = jwt.encode(claims, EXTERNAL_KEY, algorithm="ES256", headers=headers)
    redeemed = _redeem(broker, assertion)
    assert redeemed.status_code == 200, redeemed.text
    token = jwt.decode(redeemed.json()["access_token"], options={"verify_signature": False})
    assert token["sub"] == "corp/ext-alice" and token["aud"] == MCP_URL
    assert token["act"] == {"sub": "mcp-agent"}
    assert set(token["scope"].split()) == {"tickets:read", "tickets:comment"}
    # A person the IdP names but the policy does not let this agent act for: refused.
    stranger = jwt.encode(
        {**claims, "sub": "ext-mallory", "jti": secrets.token_urlsafe(12)},
        EXTERNAL_KEY,
        algorithm="ES256",
        headers=headers,
    )
    assert _redeem(broker, stranger).status_code in (400, 401)


def test_a_bound_id_jag_is_redeemed_only_with_its_keys_proof(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    key = DPoPKey()
    data = exchange_form(
        idp.mint("alice"), requested_token_type=ID_JAG, audience=broker.url, resource=MCP_URL
    )
    issued = _token(
        broker, data, "mcp-agent", headers={"DPoP": key.proof("POST", broker.token_endpoint)}
    )
    assert issued.status_code == 200, issued.text
    assertion = issued.json()["access_token"]
    assert jwt.decode(assertion, options={"verify_signature": False})["cnf"] == {"jkt": key.jkt}
    without = _redeem(broker, assertion)
    assert without.status_code == 400 and without.json()["error"] == "invalid_dpop_proof"
    other = _token(
        broker,
        {"grant_type": JWT_BEARER, "assertion": assertion},
        "mcp-agent",
        headers={"DPoP": DPoPKey().proof("POST", broker.token_endpoint)},
    )
    assert other.json()["error"] == "invalid_dpop_proof"
    bound = _token(
        broker,
        {"grant_type": JWT_BEARER, "assertion": assertion},
        "mcp-agent",
        headers={"DPoP": key.proof("POST", broker.token_endpoint)},
    )
    assert bound.status_code == 200, bound.text
    assert bound.json()["token_type"] == "DPoP"


UNIVERSE = ("tickets:read", "tickets:comment", "kb:read", "tickets:write", "repo:read")
"""Permissions to ask for: the person (support) holds the first three and llm:openai:chat, the
agent's ceiling is the first three, the narrow sub-agent's tickets:read only."""


def test_the_subset_property_holds_for_id_jags_and_the_tokens_obtained_with_them(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    person = {"tickets:read", "tickets:comment", "kb:read", "llm:openai:chat"}
    ceiling = {"tickets:read", "tickets:comment", "kb:read"}
    checked = 0
    redeemed_for: set[frozenset[str]] = set()
    for size in range(1, len(UNIVERSE) + 1):
        for asked in itertools.combinations(UNIVERSE, size):
            issued = _id_jag(broker, idp, scope=" ".join(asked))
            if issued.status_code != 200:
                assert issued.json()["error"] == "invalid_scope"
                assert not set(asked) <= person & ceiling, (asked, issued.text)
                continue
            jag = set(issued.json()["scope"].split())
            assert jag <= person & ceiling and jag <= set(asked)
            if frozenset(jag) in redeemed_for:
                continue
            redeemed_for.add(frozenset(jag))
            for subset_size in range(0, len(jag) + 2):
                for redeem_scope in itertools.combinations(
                    sorted(jag | {"repo:read"}), subset_size
                ):
                    form = {"scope": " ".join(redeem_scope)} if redeem_scope else {}
                    fresh = _id_jag(broker, idp, scope=" ".join(sorted(jag))).json()["access_token"]
                    redeemed = _redeem(broker, fresh, **form)
                    if "repo:read" in redeem_scope:  # not in the ID-JAG: never granted
                        assert redeemed.status_code == 400, redeemed.text
                        assert redeemed.json()["error"] == "invalid_scope"
                        continue
                    assert redeemed.status_code == 200, (redeem_scope, redeemed.text)
                    got = set(redeemed.json()["scope"].split())
                    assert got == (set(redeem_scope) or jag) and got <= jag <= person & ceiling
                    checked += 1
    assert checked > 10
    # A sub-agent's ID-JAG (re-exchange first) narrows to its own ceiling and the chain.
    parent = _token(
        broker,
        exchange_form(idp.mint("alice"), audience=MCP_URL, scope="tickets:read kb:read"),
        "mcp-agent",
    ).json()["access_token"]
    child_jag = _token(
        broker,
        exchange_form(
            parent, ACCESS_TOKEN, requested_token_type=ID_JAG, audience=broker.url, resource=MCP_URL
        ),
        "narrow-agent",
    )
    assert child_jag.status_code == 200, child_jag.text
    assert child_jag.json()["scope"] == "tickets:read"
    token = _redeem(broker, child_jag.json()["access_token"], "narrow-agent")
    assert token.status_code == 200, token.text
    claims = jwt.decode(token.json()["access_token"], options={"verify_signature": False})
    assert claims["act"] == {"sub": "narrow-agent", "act": {"sub": "mcp-agent"}}
    assert claims["scope"] == "tickets:read"


def test_metadata_advertises_the_id_jag_profile(broker: RunningBroker) -> None:
    metadata = httpx.get(f"{broker.url}/.well-known/oauth-authorization-server").json()
    assert JWT_BEARER in metadata["grant_types_supported"]
    assert metadata["authorization_grant_profiles_supported"] == [
        "urn:ietf:params:oauth:grant-profile:id-jag"
    ]
    assert ID_JAG in metadata["token_types_supported"]


def test_revocations_after_an_id_jag_was_issued_hold_at_its_redemption(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    def revoke(**what: str) -> None:
        response = httpx.post(
            f"{broker.url}/v1/admin/revocations",
            data=what,
            auth=("revoker", SECRETS["revoker"]),
        )
        assert response.status_code == 200, response.text

    by_id = _id_jag(broker, idp).json()["access_token"]
    revoke(jti=jwt.decode(by_id, options={"verify_signature": False})["jti"])
    refused = _redeem(broker, by_id)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"

    # The person (dave, a support lead) is revoked after the ID-JAG was issued.
    daves = _id_jag(broker, idp, person="dave").json()
    assert "access_token" in daves, daves
    time.sleep(1.1)  # a not-before after the ID-JAG's iat (whole seconds)
    revoke(person="dev/dave")
    refused = _redeem(broker, daves["access_token"])
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"

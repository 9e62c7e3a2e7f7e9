"""MCP servers built with the official `mcp` SDK accept broker tokens, end to end over loopback.

A real broker (a loopback OIDC IdP signs people in; agents exchange their ID tokens, then delegate)
issues tokens for three MCP servers, each the SDK's streamable HTTP app served by uvicorn:

* ``kit``: the SDK's own auth (`AuthSettings`, bearer middleware) with the kit's `TokenVerifier`;
* ``fastmcp``: the SDK's auth with FastMCP's `JWTVerifier`, configured only with the broker's
  issuer, JWKS URI and audience (and the broker's signing algorithm, which it needs named);
* ``middleware``: no SDK auth, the kit's `BrokerAuth` middleware in front (its challenges name
  the missing scope), with revocation checked through the broker's introspection.

An SDK client (streamable HTTP, the token in an httpx header) calls a tool that answers the person
and the agent chain; a wrong audience, a missing scope and an expired token get the right status
and ``WWW-Authenticate`` (checked with raw HTTP too). A revoked token stops working once the
kit's introspection cache expires; a DPoP-bound token works only with its key's proofs (through
the middleware); an ID-JAG the broker issued, redeemed at the broker's jwt-bearer grant, gives a
token the tool accepts.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from fastmcp.server.auth.providers.jwt import JWTVerifier
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.auth.settings import AuthSettings
from mcp.server.mcpserver import Context, MCPServer
from mcp.shared.exceptions import MCPError

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.dpop import DPoPKey
from broker.kit import ResourceServer
from broker.kit.mcp import BrokerTokenVerifier, auth_settings, current_caller
from broker.kit.starlette import BrokerAuth
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

SERVERS = ("kit", "fastmcp", "middleware")
ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
AGENT_SECRET = generate_client_secret()
HELPER_SECRET = generate_client_secret()
RS_SECRET = generate_client_secret()
AGENT = ("notes-agent", AGENT_SECRET)
HELPER = ("notes-helper", HELPER_SECRET)
WELL_KNOWN = "/.well-known/oauth-protected-resource"


class ShiftClock:
    """Wall time plus an offset the test sets (to have the broker issue already expired tokens)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


@dataclass
class Stack:
    idp: DevIdentityProvider
    broker: RunningBroker
    clock: ShiftClock
    urls: dict[str, str]  # server name -> MCP endpoint URL (its resource identifier)


def _policy(urls: dict[str, str]) -> dict[str, Any]:
    def client(secret: str) -> dict[str, Any]:
        digest = hash_client_secret(secret, method="sha256")
        return {"method": "client_secret_basic", "secret_hash": digest}

    return {
        "roles": {
            "note-taker": {
                "description": "People whose notes the notes MCP server keeps",
                "permissions": ["notes:read", "notes:write", "notes:list"],
            }
        },
        "group_bindings": [{"idp": ["dev"], "group": "support", "roles": ["note-taker"]}],
        "agents": {
            "notes-agent": {
                "description": "Takes notes for support staff through MCP tools.",
                "authentication": client(AGENT_SECRET),
                "ceiling": ["notes:read", "notes:write", "notes:list"],
                "default_scopes": ["notes:read"],
                "audiences": list(urls.values()),
                "max_token_lifetime_seconds": 300,
                "act_for": ["group:dev/support"],
                "may_delegate_to": ["notes-helper"],
            },
            "notes-helper": {
                "description": "A sub-agent the notes agent delegates to.",
                "authentication": client(HELPER_SECRET),
                "ceiling": ["notes:read", "notes:list"],
                "audiences": list(urls.values()),
                "act_for": ["group:dev/support"],
            },
        },
        "authorization_servers": {
            "broker-for-mcp": {
                "description": "This broker, as the notes MCP server's authorization server",
                "issuer": "self",
                "resources": [urls["kit"]],
                "agents": ["notes-agent"],
            }
        },
        "resource_servers": {
            "notes-mcp": {
                "description": "The notes MCP server (introspects for revocation)",
                "authentication": client(RS_SECRET),
                "audiences": [urls["middleware"]],
            }
        },
    }


@pytest.fixture(scope="module")
def sockets() -> Iterator[dict[str, Any]]:
    reserved = {name: reserve_loopback_socket() for name in SERVERS}
    try:
        yield reserved
    finally:
        for sock in reserved.values():
            sock.close()  # closing a socket uvicorn already closed is harmless


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, sockets: dict[str, Any]
) -> Iterator[Stack]:
    urls = {n: f"http://127.0.0.1:{s.getsockname()[1]}/mcp" for n, s in sockets.items()}
    clock = ShiftClock()
    env = pytest.MonkeyPatch()
    for name, value in example_client_secrets().items():
        env.setenv(name, value)
    try:
        with (
            serve_idp(clock=clock) as (idp, _),
            run_broker(
                tmp_path_factory.mktemp("broker"),
                [oidc_provider_config(idp)],
                policy_extra=_policy(urls),
                clock=clock,
            ) as broker,
        ):
            yield Stack(idp, broker, clock, urls)
    finally:
        env.undo()


def whoami_server(**kwargs: Any) -> MCPServer:
    server = MCPServer("notes", **kwargs)

    @server.tool()
    async def whoami(ctx: Context) -> str:
        """The person and the agents behind this call."""
        caller = current_caller(ctx)
        if caller is None:
            return json.dumps({"caller": None})
        return json.dumps(
            {
                "person": caller.person,
                "agents": list(caller.agent_chain),
                "client_id": caller.client_id,
                "scopes": sorted(caller.scopes),
                "jkt": caller.jkt,
            }
        )

    return server


def build_apps(stack: Stack) -> dict[str, Any]:
    issuer = stack.broker.url
    jwks_uri = f"{issuer}/.well-known/jwks.json"
    apps: dict[str, Any] = {}

    rs_kit = ResourceServer(issuer=issuer, resource=stack.urls["kit"])
    sdk_kit = whoami_server(
        token_verifier=BrokerTokenVerifier(rs_kit),
        auth=auth_settings(rs_kit, required_scopes=["notes:read"]),
    ).streamable_http_app()
    sdk_kit.router.lifespan_context = _wrap_lifespan(sdk_kit.router.lifespan_context, rs_kit)
    apps["kit"] = sdk_kit

    fastmcp_verifier = JWTVerifier(
        issuer=issuer, jwks_uri=jwks_uri, audience=stack.urls["fastmcp"], algorithm="ES256"
    )
    apps["fastmcp"] = whoami_server(
        token_verifier=fastmcp_verifier,
        auth=AuthSettings(
            issuer_url=issuer,
            resource_server_url=stack.urls["fastmcp"],
            required_scopes=["notes:read"],
            validate_token_resource=False,  # JWTVerifier checks the audience itself
        ),
    ).streamable_http_app()

    rs_mw = ResourceServer(
        issuer=issuer,
        resource=stack.urls["middleware"],
        introspection=(f"{issuer}/oauth2/introspect", "notes-mcp", RS_SECRET),
        revocation_cache_seconds=1.0,
        scopes_supported=["notes:read", "notes:write"],
    )
    plain = whoami_server().streamable_http_app()
    plain.router.lifespan_context = _wrap_lifespan(plain.router.lifespan_context, rs_mw)
    apps["middleware"] = BrokerAuth(plain, rs_mw, required_scopes=["notes:read"])
    return apps


def _wrap_lifespan(inner: Any, rs: ResourceServer) -> Any:
    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with inner(app) as state:
            yield state
        await rs.aclose()

    return lifespan


@pytest.fixture(scope="module")
def servers(stack: Stack, sockets: dict[str, Any]) -> Iterator[dict[str, RunningServer]]:
    apps = build_apps(stack)
    with contextlib.ExitStack() as running:
        started = {
            name: running.enter_context(
                serve_in_thread(apps[name], sock=sockets[name], lifespan="on")
            )
            for name in SERVERS
        }
        yield started


# -- helpers -----------------------------------------------------------------------------------


def agent_token(stack: Stack, audience: str, scope: str = "notes:read") -> str:
    response = httpx.post(
        stack.broker.token_endpoint,
        data=exchange_form(stack.idp.mint("alice"), audience=audience, scope=scope),
        auth=AGENT,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def delegated_token(stack: Stack, audience: str) -> str:
    """notes-agent acts for alice, then hands the work to notes-helper (a two-agent chain)."""
    parent = agent_token(stack, audience, scope="notes:read notes:list")
    response = httpx.post(
        stack.broker.token_endpoint,
        data=exchange_form(parent, ACCESS_TOKEN, audience=audience, scope="notes:read"),
        auth=HELPER,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def bound_token(stack: Stack, audience: str, key: DPoPKey) -> str:
    """A token the broker binds to `key` (the agent's proof at the token endpoint)."""
    response = httpx.post(
        stack.broker.token_endpoint,
        data=exchange_form(stack.idp.mint("alice"), audience=audience, scope="notes:read"),
        auth=AGENT,
        headers={"DPoP": key.proof("POST", stack.broker.token_endpoint)},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["token_type"] == "DPoP"
    return response.json()["access_token"]


def expired_token(stack: Stack, audience: str) -> str:
    stack.clock.offset = -600  # the broker (and the IdP) live ten minutes ago
    try:
        return agent_token(stack, audience)
    finally:
        stack.clock.offset = 0


class DPoPAuth(httpx2.Auth):
    """Presents a bound token with a fresh proof for every request the MCP client makes."""

    def __init__(self, token: str, key: DPoPKey, *, htu: str | None = None) -> None:
        self.token, self.key, self.htu = token, key, htu

    def auth_flow(self, request: httpx2.Request) -> Iterator[httpx2.Request]:
        request.headers["Authorization"] = f"DPoP {self.token}"
        request.headers["DPoP"] = self.key.proof(
            request.method, self.htu or str(request.url), access_token=self.token
        )
        yield request


async def call_whoami(url: str, token: str, auth: httpx2.Auth | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"} if auth is None else {}
    async with (
        httpx2.AsyncClient(headers=headers, auth=auth, timeout=20) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("whoami", {})
    assert not result.is_error, result
    return json.loads(result.content[0].text)  # type: ignore[union-attr]


def sdk_client_refused(url: str, token: str, auth: httpx2.Auth | None = None) -> bool:
    """Whether the SDK client's session fails with the MCP error a refused HTTP request becomes."""
    try:
        anyio.run(call_whoami, url, token, auth)
    except BaseExceptionGroup as group:
        leaves: list[BaseException] = []
        pending: list[BaseException] = [group]
        while pending:
            current = pending.pop()
            if isinstance(current, BaseExceptionGroup):
                pending.extend(current.exceptions)
            else:
                leaves.append(current)
        return any(isinstance(leaf, MCPError) for leaf in leaves)
    return False


def raw_initialize(url: str, token: str | None) -> httpx.Response:
    headers = {"Accept": "application/json, text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    body = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"},
        },
    }
    return httpx.post(url, json=body, headers=headers, timeout=10)


def params(challenge: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


def metadata_url(url: str) -> str:
    base, path = url.rsplit("/mcp", 1)
    return f"{base}{WELL_KNOWN}/mcp{path}"


# -- the tests ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVERS)
def test_an_sdk_client_calls_a_tool_and_learns_the_person_and_agents(
    stack: Stack, servers: dict[str, RunningServer], name: str
) -> None:
    url = stack.urls[name]
    answer = anyio.run(call_whoami, url, delegated_token(stack, url))
    assert answer == {
        "person": "dev/alice",
        "agents": ["notes-helper", "notes-agent"],
        "client_id": "notes-helper",
        "scopes": ["notes:read"],
        "jkt": None,
    }


@pytest.mark.parametrize("name", SERVERS)
def test_protected_resource_metadata_names_the_broker(
    stack: Stack, servers: dict[str, RunningServer], name: str
) -> None:
    url = stack.urls[name]
    document = httpx.get(metadata_url(url), timeout=10).json()
    assert document["resource"] == url
    assert [a.rstrip("/") for a in document["authorization_servers"]] == [stack.broker.url]
    anonymous = raw_initialize(url, None)
    assert anonymous.status_code == 401
    assert params(anonymous.headers["www-authenticate"])["resource_metadata"] == metadata_url(url)


@pytest.mark.parametrize("name", SERVERS)
def test_a_token_for_another_resource_is_refused(
    stack: Stack, servers: dict[str, RunningServer], name: str
) -> None:
    url = stack.urls[name]
    other = next(u for n, u in stack.urls.items() if n != name)
    token = agent_token(stack, other)
    response = raw_initialize(url, token)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert params(challenge)["error"] == "invalid_token"
    assert params(challenge)["resource_metadata"] == metadata_url(url)
    if name == "middleware":
        assert params(challenge)["error_description"] == "token was not issued for this resource"
    assert sdk_client_refused(url, token)
    # The same token works where it was meant to go.
    assert anyio.run(call_whoami, other, token)["person"] == "dev/alice"


@pytest.mark.parametrize("name", SERVERS)
def test_a_token_without_the_servers_scope_is_insufficient_scope(
    stack: Stack, servers: dict[str, RunningServer], name: str
) -> None:
    url = stack.urls[name]
    response = raw_initialize(url, agent_token(stack, url, scope="notes:list"))
    assert response.status_code == 403
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer ")
    assert params(challenge)["error"] == "insufficient_scope"
    assert params(challenge)["resource_metadata"] == metadata_url(url)
    if name == "middleware":
        assert params(challenge)["scope"] == "notes:read"  # what to step up to


@pytest.mark.parametrize("name", SERVERS)
def test_an_expired_token_is_refused(
    stack: Stack, servers: dict[str, RunningServer], name: str
) -> None:
    url = stack.urls[name]
    token = expired_token(stack, url)
    response = raw_initialize(url, token)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert params(challenge)["error"] == "invalid_token"
    assert params(challenge)["resource_metadata"] == metadata_url(url)
    if name == "middleware":
        assert params(challenge)["error_description"] == "token has expired"


def test_a_revoked_token_stops_working_once_the_cache_expires(
    stack: Stack, servers: dict[str, RunningServer]
) -> None:
    url = stack.urls["middleware"]
    token = agent_token(stack, url)
    assert anyio.run(call_whoami, url, token)["person"] == "dev/alice"
    revoked = httpx.post(
        f"{stack.broker.url}/oauth2/revoke", data={"token": token}, auth=AGENT, timeout=10
    )
    assert revoked.status_code == 200, revoked.text
    time.sleep(1.2)  # the kit remembers an introspection answer for one second here
    response = raw_initialize(url, token)
    assert response.status_code == 401
    assert params(response.headers["www-authenticate"])["error_description"] == (
        "token is no longer active"
    )
    # A token revoked before it was ever seen is refused at once.
    fresh = agent_token(stack, url)
    httpx.post(f"{stack.broker.url}/oauth2/revoke", data={"token": fresh}, auth=AGENT, timeout=10)
    assert raw_initialize(url, fresh).status_code == 401


def test_a_dpop_bound_token_reaches_the_tool_only_with_its_keys_proofs(
    stack: Stack, servers: dict[str, RunningServer]
) -> None:
    url = stack.urls["middleware"]
    key = DPoPKey()
    token = bound_token(stack, url, key)
    answer = anyio.run(call_whoami, url, token, DPoPAuth(token, key))
    assert answer["person"] == "dev/alice" and answer["jkt"] == key.jkt
    # Stolen without the key: as Bearer, or with proofs by another key, it is refused.
    as_bearer = raw_initialize(url, token)
    assert as_bearer.status_code == 401
    assert as_bearer.headers["www-authenticate"].startswith('DPoP algs="')
    assert params(as_bearer.headers["www-authenticate"])["error"] == "invalid_token"
    assert sdk_client_refused(url, token, DPoPAuth(token, DPoPKey()))
    assert sdk_client_refused(url, token, DPoPAuth(token, key, htu=stack.urls["kit"]))
    # The SDK's own auth sees only Bearer tokens: the kit's verifier refuses a bound one there.
    kit_url = stack.urls["kit"]
    kit_token = bound_token(stack, kit_url, key)
    assert raw_initialize(kit_url, kit_token).status_code == 401
    assert sdk_client_refused(kit_url, kit_token, DPoPAuth(kit_token, key))


def test_an_id_jag_from_the_broker_redeemed_by_jwt_bearer_reaches_the_tool(
    stack: Stack, servers: dict[str, RunningServer]
) -> None:
    """SEP-990's two legs against the broker: the agent's ID-JAG from the token exchange, then the
    jwt-bearer request the MCP SDK's identity-assertion client sends (assertion, client_id,
    resource, scope; the client's secret), and the token it gets calls the kit-protected tool."""
    url = stack.urls["kit"]
    leg1 = httpx.post(
        stack.broker.token_endpoint,
        data=exchange_form(
            stack.idp.mint("alice"),
            requested_token_type=ID_JAG,
            audience=stack.broker.url,
            resource=url,
            scope="notes:read",
        ),
        auth=AGENT,
        timeout=10,
    )
    assert leg1.status_code == 200, leg1.text
    assert leg1.json()["issued_token_type"] == ID_JAG
    id_jag = leg1.json()["access_token"]
    # An ID-JAG is a grant, never an access token: the tool refuses it as one.
    refused = raw_initialize(url, id_jag)
    assert refused.status_code == 401
    assert params(refused.headers["www-authenticate"])["error"] == "invalid_token"
    leg2 = httpx.post(
        stack.broker.token_endpoint,
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
            "assertion": id_jag,
            "client_id": "notes-agent",
            "resource": url,
            "scope": "notes:read",
        },
        auth=AGENT,
        timeout=10,
    )
    assert leg2.status_code == 200, leg2.text
    answer = anyio.run(call_whoami, url, leg2.json()["access_token"])
    assert answer == {
        "person": "dev/alice",
        "agents": ["notes-agent"],
        "client_id": "notes-agent",
        "scopes": ["notes:read"],
        "jkt": None,
    }

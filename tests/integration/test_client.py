"""`broker.client` against a real broker: agent exchange with caching, re-exchange for a
sub-agent, error mapping, gateway fetch, and the `httpx.Auth` carrying the current provider key
to a stand-in provider across a rotation."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from broker import AgentClient, BrokerClientError, GatewayClient
from broker.client import ACCESS_TOKEN, AgentToken
from idp_adapters._loopback import serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    TICKETS,
    RunningBroker,
    example_client_secrets,
    run_example_stack_with_key,
    write_provider_keys,
)

SECRETS = example_client_secrets()
FIRST_KEY = "sk-first-" + uuid.uuid4().hex
SECOND_KEY = "sk-second-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningBroker, DevIdentityProvider, Path]]:
    tmp = tmp_path_factory.mktemp("client")
    with run_example_stack_with_key(tmp, SECRETS, FIRST_KEY) as stack:
        yield stack


class _Counter:
    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []

    def client(self) -> httpx.Client:
        return httpx.Client(timeout=10, event_hooks={"request": [self.requests.append]})


def _claims(token: AgentToken) -> dict[str, Any]:
    return jwt.decode(token.access_token, options={"verify_signature": False})


def test_agent_exchange_is_cached_until_shortly_before_expiry(env: Any) -> None:
    running, idp, _ = env
    counter = _Counter()
    now = [1_000.0]
    with counter.client() as http:
        agent = AgentClient(
            running.url,
            "triage-agent",
            SECRETS["TRIAGE_AGENT_SECRET"],
            http=http,
            refresh_margin_seconds=30,
        )
        id_token = idp.mint("alice")
        token = agent.exchange(id_token, scope="tickets:read kb:read", audience=TICKETS)
        assert len(counter.requests) == 1
        assert token.scopes == ("tickets:read", "kb:read")
        assert token.issued_token_type == ACCESS_TOKEN
        assert token.access_token not in repr(token)
        assert _claims(token)["act"] == {"sub": "triage-agent"}

        again = agent.exchange(id_token, scope=["tickets:read", "kb:read"], audience=TICKETS)
        assert again is token
        assert len(counter.requests) == 1  # served from the cache, no request

        other = agent.exchange(id_token, scope="tickets:read", audience=TICKETS)
        assert other.access_token != token.access_token
        assert len(counter.requests) == 2  # a different scope is a different cache entry

    # With a clock near expiry, the client exchanges again.
    with counter.client() as http:
        agent = AgentClient(
            running.url,
            "triage-agent",
            SECRETS["TRIAGE_AGENT_SECRET"],
            http=http,
            refresh_margin_seconds=30,
            clock=lambda: now[0],
        )
        first = agent.exchange(id_token, scope="tickets:read")
        expires_in = first.expires_at - 1_000.0
        assert 0 < expires_in <= 900
        now[0] = first.expires_at - 31
        assert agent.exchange(id_token, scope="tickets:read") is first
        sent = len(counter.requests)
        now[0] = first.expires_at - 29
        renewed = agent.exchange(id_token, scope="tickets:read")
        assert renewed is not first
        assert len(counter.requests) == sent + 1


def test_delegate_re_exchanges_for_the_summariser(env: Any) -> None:
    running, idp, _ = env
    with (
        AgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as triage,
        AgentClient(
            running.url, "summariser-agent", SECRETS["SUMMARISER_AGENT_SECRET"]
        ) as summariser,
    ):
        parent = triage.exchange(idp.mint("alice"), scope="tickets:read kb:read")
        child = summariser.delegate(parent, scope="tickets:read")
    claims = _claims(child)
    assert claims["act"] == {"sub": "summariser-agent", "act": {"sub": "triage-agent"}}
    assert claims["scope"] == "tickets:read"
    assert child.expires_at <= parent.expires_at


def test_errors_carry_the_oauth_error_code_and_no_token(env: Any) -> None:
    running, idp, _ = env
    id_token = idp.mint("alice")
    with (
        AgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as agent,
        pytest.raises(BrokerClientError) as excinfo,
    ):
        agent.exchange(id_token, scope="repo:write")
    assert excinfo.value.error == "invalid_scope"
    assert excinfo.value.status == 400
    assert "repo:write" in (excinfo.value.description or "")
    assert id_token not in str(excinfo.value) and id_token not in repr(excinfo.value)

    with (
        AgentClient(running.url, "triage-agent", "wrong-secret") as agent,
        pytest.raises(BrokerClientError) as excinfo,
    ):
        agent.exchange(id_token)
    assert (excinfo.value.error, excinfo.value.status) == ("invalid_client", 401)
    assert "wrong-secret" not in repr(agent)


def test_gateway_fetch_and_auth_follow_a_rotation(env: Any) -> None:
    running, idp, secrets_file = env
    current = {"key": FIRST_KEY}
    calls: list[int] = []

    async def provider(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        headers = dict(scope["headers"])
        ok = headers.get(b"authorization") == f"Bearer {current['key']}".encode()
        status = 200 if ok else 401
        calls.append(status)
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok" if ok else b"wrong key"})

    with (
        AgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as agent,
        GatewayClient(running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]) as gateway,
        serve_in_thread(provider) as provider_server,
    ):
        token = agent.exchange(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway")

        fetched = gateway.fetch("openai-api-key", token)
        assert fetched.value == FIRST_KEY
        assert FIRST_KEY not in repr(fetched)
        assert fetched.version.startswith("sha256:")
        assert fetched.served_for["sub"] == "dev/alice"
        assert fetched.refresh_in is not None

        with httpx.Client(
            base_url=provider_server.url,
            auth=gateway.auth("openai-api-key", token),
            timeout=10,
        ) as provider_http:
            assert provider_http.post("/v1/chat/completions").status_code == 200

            # Rotate: the store gets a new value, the provider accepts only the new key, and a
            # rotation hook pushes a refresh to the broker.
            write_provider_keys(secrets_file, SECOND_KEY)
            refreshed = httpx.post(
                f"{running.url}/v1/admin/credentials/openai-api-key/refresh",
                auth=("rotation-hook", SECRETS["ROTATION_HOOK_SECRET"]),
                timeout=10,
            )
            assert refreshed.status_code == 200, refreshed.text
            current["key"] = SECOND_KEY

            for _ in range(3):
                assert provider_http.post("/v1/chat/completions").status_code == 200
        rotated = gateway.fetch("openai-api-key", token)

    assert calls == [200, 200, 200, 200]  # no failed provider call across the rotation
    assert rotated.value == SECOND_KEY
    assert rotated.version != fetched.version

    with (
        GatewayClient(running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]) as gateway,
        pytest.raises(BrokerClientError) as excinfo,
    ):
        gateway.fetch("openai-api-key", "not-a-token")
    assert (excinfo.value.error, excinfo.value.status) == ("invalid_token", 401)

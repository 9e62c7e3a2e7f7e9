"""`AsyncAgentClient`, `AsyncGatewayClient` and `AsyncCredentialAuth` against a real broker:
cached and shared exchanges, delegation, error mapping, and provider calls from an
`httpx.AsyncClient` across a rotation where the provider accepts only the current key (no push:
the refused key is reported and the call retried once)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from broker import AsyncAgentClient, AsyncGatewayClient, BrokerClientError
from broker.client import AsyncCredentialAuth
from broker.examples.provider import StandInProvider
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
FIRST_KEY = "sk-async-first-" + uuid.uuid4().hex
SECOND_KEY = "sk-async-second-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningBroker, DevIdentityProvider, Path]]:
    tmp = tmp_path_factory.mktemp("async-client")
    with run_example_stack_with_key(tmp, SECRETS, FIRST_KEY) as stack:
        yield stack


def _counting_client(sent: list[httpx.Request]) -> httpx.AsyncClient:
    async def record(request: httpx.Request) -> None:
        sent.append(request)

    return httpx.AsyncClient(timeout=10, event_hooks={"request": [record]})


def test_exchanges_are_cached_and_concurrent_ones_share_one_request(env: Any) -> None:
    running, idp, _ = env
    id_token = idp.mint("alice")

    async def scenario() -> list[Any]:
        sent: list[httpx.Request] = []
        async with _counting_client(sent) as http:
            agent = AsyncAgentClient(
                running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"], http=http
            )
            tokens = await asyncio.gather(
                *(agent.exchange(id_token, scope="tickets:read kb:read") for _ in range(20))
            )
            assert len(sent) == 1  # twenty callers, one exchange
            again = await agent.exchange(id_token, scope=["tickets:read", "kb:read"])
            assert len(sent) == 1 and again is tokens[0]
            other = await agent.exchange(id_token, scope="tickets:read", audience=TICKETS)
            assert len(sent) == 2 and other.access_token != again.access_token
            agent.forget()
            await agent.exchange(id_token, scope="tickets:read kb:read")
            assert len(sent) == 3
            return tokens

    tokens = asyncio.run(scenario())
    assert all(t is tokens[0] for t in tokens)
    claims = jwt.decode(tokens[0].access_token, options={"verify_signature": False})
    assert claims["act"] == {"sub": "triage-agent"} and claims["sub"] == "dev/alice"
    assert tokens[0].access_token not in repr(tokens[0])


def test_delegation_and_errors(env: Any) -> None:
    running, idp, _ = env
    id_token = idp.mint("alice")

    async def scenario() -> tuple[Any, BrokerClientError, BrokerClientError]:
        async with (
            AsyncAgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as triage,
            AsyncAgentClient(
                running.url, "summariser-agent", SECRETS["SUMMARISER_AGENT_SECRET"]
            ) as summariser,
        ):
            parent = await triage.exchange(id_token, scope="tickets:read kb:read")
            child = await summariser.delegate(parent, scope="tickets:read")
            with pytest.raises(BrokerClientError) as scope_error:
                await triage.exchange(id_token, scope="repo:write")
            # A failed shared exchange fails every caller waiting on it, and is not cached.
            results = await asyncio.gather(
                *(triage.exchange(id_token, scope="repo:write") for _ in range(5)),
                return_exceptions=True,
            )
            assert all(isinstance(r, BrokerClientError) for r in results)
        async with AsyncAgentClient(running.url, "triage-agent", "wrong") as wrong:
            with pytest.raises(BrokerClientError) as client_error:
                await wrong.exchange(id_token)
        return child, scope_error.value, client_error.value

    child, scope_error, client_error = asyncio.run(scenario())
    claims = jwt.decode(child.access_token, options={"verify_signature": False})
    assert claims["act"] == {"sub": "summariser-agent", "act": {"sub": "triage-agent"}}
    assert (scope_error.error, scope_error.status) == ("invalid_scope", 400)
    assert id_token not in str(scope_error) and id_token not in repr(scope_error)
    assert (client_error.error, client_error.status) == ("invalid_client", 401)


def test_async_auth_carries_the_current_key_across_a_rotation_without_a_push(env: Any) -> None:
    running, idp, secrets_file = env
    provider = StandInProvider(FIRST_KEY)
    write_provider_keys(secrets_file, FIRST_KEY)

    async def scenario(provider_url: str) -> tuple[list[int], AsyncCredentialAuth, Any]:
        async with (
            AsyncAgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as agent,
            AsyncGatewayClient(
                running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]
            ) as gateway,
        ):
            token = await agent.exchange(
                idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
            )
            first = await gateway.fetch("openai-api-key", token)
            assert first.value == FIRST_KEY and FIRST_KEY not in repr(first)
            auth = gateway.auth("openai-api-key", token)
            statuses: list[int] = []
            async with httpx.AsyncClient(base_url=provider_url, auth=auth, timeout=10) as http:
                for _ in range(3):
                    statuses.append((await http.post("/v1/chat/completions", json={})).status_code)
                # Rotate: the store has the new key and the provider accepts only it, at once.
                write_provider_keys(secrets_file, SECOND_KEY)
                provider.rotate(SECOND_KEY)
                replies = await asyncio.gather(
                    *(http.post("/v1/chat/completions", json={"messages": []}) for _ in range(8))
                )
                statuses += [r.status_code for r in replies]
            newest = await gateway.fetch("openai-api-key", token)
            with pytest.raises(BrokerClientError) as invalid:
                await gateway.fetch("openai-api-key", "not-a-token")
            assert (invalid.value.error, invalid.value.status) == ("invalid_token", 401)
            return statuses, auth, newest

    with serve_in_thread(provider.asgi_app()) as server:
        statuses, auth, newest = asyncio.run(scenario(server.url))
    assert statuses == [200] * 11  # no failed provider call across the rotation
    assert newest.value == SECOND_KEY
    assert 1 <= auth.retries <= 8 and auth.last_version == newest.version
    stats = provider.stats()
    assert stats.accepted == 11 and stats.accepted_by_generation.get(2) == 8
    assert SECOND_KEY not in repr(auth)
    hints = [
        r
        for r in running.decisions.records
        if r["event"] == "credential.fetch" and r.get("refresh_hint")
    ]
    assert hints and {r["hint_outcome"] for r in hints} <= {"refreshed", "joined", "not_current"}


def test_the_async_auth_refuses_a_sync_client(env: Any) -> None:
    running, _, _ = env
    gateway = AsyncGatewayClient(running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
    auth = gateway.auth("openai-api-key", "unused")
    with httpx.Client(auth=auth) as http, pytest.raises(RuntimeError, match="AsyncClient"):
        http.get(f"{running.url}/healthz")
    asyncio.run(gateway.aclose())

"""The authenticated POST endpoints are answered straight from the ASGI call (`BrokerApp`),
ahead of FastAPI's middleware stack and router: fixed paths and templates alike, under a
``root_path`` too; other methods on the same paths still get FastAPI's 405, and an exception
that escapes an endpoint is still a recorded, plain RFC 6749 ``server_error``."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.app import BrokerApp, create_app
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack_with_key,
)

SECRETS = example_client_secrets()
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
GATEWAY = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
OPENAI_KEY = "sk-direct-posts-test"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, Any]]:
    with run_example_stack_with_key(
        tmp_path_factory.mktemp("direct"), SECRETS, OPENAI_KEY
    ) as (running, idp, _):
        yield running, idp


class _NoRouter:
    """Stands in for FastAPI's middleware stack: any request reaching it fails the test."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.calls.append(f"{scope.get('method')} {scope['path']}")
        raise AssertionError("the request went through the FastAPI stack")


def _client(app: BrokerApp, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://broker.test")


def _app(running: RunningBroker) -> BrokerApp:
    return create_app(running.settings, services=running.services)


def test_exchange_and_fetch_bypass_the_fastapi_stack(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    app = _app(running)
    stub = _NoRouter()
    app.middleware_stack = stub  # what FastAPI.__call__ would run

    async def scenario() -> tuple[httpx.Response, httpx.Response]:
        async with _client(app) as client:
            form = exchange_form(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway")
            exchanged = await client.post("/oauth2/token", data=form, auth=TRIAGE)
            token = exchanged.json().get("access_token", "")
            fetched = await client.post(
                "/v1/credentials/openai-api-key", data={"token": token}, auth=GATEWAY
            )
            return exchanged, fetched

    exchanged, fetched = asyncio.run(scenario())
    assert exchanged.status_code == 200, exchanged.text
    assert exchanged.headers["cache-control"] == "no-store"
    assert len(exchanged.headers["x-request-id"]) == 32
    assert fetched.status_code == 200, fetched.text
    assert json.dumps(fetched.json()).count(OPENAI_KEY) == 1  # the template's {name} was read
    assert stub.calls == []


def test_direct_posts_match_under_a_root_path_and_leave_other_paths_to_fastapi(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    app = _app(running)

    async def scenario() -> list[httpx.Response]:
        async with _client(app, root_path="/broker") as client:
            form = exchange_form(idp.mint("alice"), scope="tickets:read")
            return [
                await client.post("/broker/oauth2/token", data=form, auth=TRIAGE),
                await client.get("/broker/oauth2/token"),  # a POST-only path: 405
                await client.post("/broker/healthz"),  # a GET-only path: 405
                await client.post("/broker/v1/credentials/a/b"),  # no template matches: 404
            ]

    token, get_token, post_health, nested = asyncio.run(scenario())
    assert token.status_code == 200, token.text
    assert get_token.status_code == 405
    assert post_health.status_code == 405
    assert nested.status_code == 404 and nested.json()["error"] == "not_found"


def test_an_exception_escaping_a_direct_endpoint_is_a_recorded_plain_500(
    stack: tuple[RunningBroker, DevIdentityProvider],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running, idp = stack
    app = _app(running)
    secret_message = "the-secret-detail-never-shown"

    def broken_observe(*_: Any) -> None:  # runs in the endpoint, outside its own error handling
        raise RuntimeError(secret_message)

    monkeypatch.setattr(running.services.metrics, "observe_request", broken_observe)
    before = len(running.decisions.records)

    async def scenario() -> httpx.Response:
        async with _client(app) as client:
            form = exchange_form(idp.mint("alice"), scope="tickets:read")
            return await client.post("/oauth2/token", data=form, auth=TRIAGE)

    response = asyncio.run(scenario())
    assert response.status_code == 500
    assert response.json()["error"] == "server_error"
    assert secret_message not in response.text and "Traceback" not in response.text
    assert secret_message not in caplog.text
    failed = [r for r in running.decisions.records[before:] if r["event"] == "request.failed"]
    assert len(failed) == 1
    assert failed[0]["route"] == "/oauth2/token" and failed[0]["exception"] == "RuntimeError"

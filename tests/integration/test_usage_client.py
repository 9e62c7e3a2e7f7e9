"""Usage reporting from gateways: the example gateway reports every answered call through a
`UsageReporter`, the broker prices and attributes them; the reporters never hold up the caller
(a slow or failing broker included), retry until answered (reports are idempotent by call id),
count what a full queue drops, and flush on close."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.client import (
    AgentClient,
    AsyncGatewayClient,
    AsyncUsageReporter,
    GatewayClient,
    UsageRecord,
    UsageReporter,
)
from broker.examples.gateway import GatewayConfig, create_gateway_app
from broker.examples.provider import StandInProvider
from idp_adapters._loopback import serve_in_thread
from tests.support.harness import example_client_secrets, run_example_stack, write_provider_keys

SECRETS = example_client_secrets()
KEY = "sk-usage-client"


def _record(n: int, token: str = "a.b.c") -> UsageRecord:
    return UsageRecord(
        call_id=f"call-{n}",
        agent_token=token,
        credential="openai-api-key",
        provider="openai",
        model="gpt-4o-mini",
        units={"input_tokens": 100, "output_tokens": 10},
    )


class _Receiver:
    """A loopback stand-in for the broker's /v1/usage: records batches, can fail or stall."""

    def __init__(self, failures: int = 0, delay: float = 0.0) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.failures = failures
        self.delay = delay
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def usage(request: Request) -> JSONResponse:
            body = json.loads(await request.body())
            if self.delay:
                await asyncio.sleep(self.delay)
            with self.lock:
                if self.failures > 0:
                    self.failures -= 1
                    return JSONResponse(
                        {"error": "temporarily_unavailable", "error_description": "busy"},
                        status_code=503,
                    )
                self.batches.append(body["records"])
            return JSONResponse(
                {
                    "results": [
                        {"call_id": r["call_id"], "outcome": "recorded", "priced_by": "unpriced"}
                        for r in body["records"]
                    ]
                }
            )

        return Starlette(routes=[Route("/v1/usage", usage, methods=["POST"])])

    @property
    def call_ids(self) -> list[str]:
        return [r["call_id"] for batch in self.batches for r in batch]


@pytest.fixture
def receiver() -> Iterator[tuple[str, _Receiver]]:
    target = _Receiver()
    with serve_in_thread(target.app()) as server:
        yield server.url, target


def test_the_reporter_batches_and_flushes_on_close(receiver: tuple[str, _Receiver]) -> None:
    url, target = receiver
    with GatewayClient(url, "llm-gateway", "secret") as gateway:
        reporter = UsageReporter(gateway, batch_size=10, flush_interval=0.2)
        for n in range(25):
            assert reporter.submit(_record(n))
        assert reporter.close(timeout=10)
    assert sorted(target.call_ids) == sorted(f"call-{n}" for n in range(25))
    assert max(len(b) for b in target.batches) <= 10 and len(target.batches) >= 3
    assert reporter.sent == 25 and reporter.dropped == 0
    assert "a.b.c" not in repr(reporter) and "a.b.c" not in repr(_record(1))


def test_a_failing_broker_is_retried_and_never_slows_submit() -> None:
    target = _Receiver(failures=2, delay=0.3)
    with serve_in_thread(target.app()) as server, GatewayClient(server.url, "gw", "s") as gateway:
        reporter = UsageReporter(gateway, batch_size=50, flush_interval=0.05)
        started = time.perf_counter()
        for n in range(200):
            reporter.submit(_record(n))
        submit_seconds = time.perf_counter() - started
        assert reporter.close(timeout=20)
    assert submit_seconds < 0.2, submit_seconds  # never waits for the (slow, failing) broker
    assert sorted(target.call_ids) == sorted(f"call-{n}" for n in range(200))  # each once


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    with GatewayClient("http://127.0.0.1:9", "gw", "s") as gateway:  # nothing listens there
        reporter = UsageReporter(gateway, max_queue=5, flush_interval=5.0, max_backoff=0.1)
        started = time.perf_counter()
        accepted = [reporter.submit(_record(n)) for n in range(50)]
        assert time.perf_counter() - started < 0.2
        assert accepted.count(False) >= 40 and reporter.dropped == accepted.count(False)
        assert not reporter.close(timeout=0.5)  # what was queued could not be delivered


def test_the_async_reporter_delivers_and_flushes(receiver: tuple[str, _Receiver]) -> None:
    url, target = receiver

    async def run() -> int:
        async with AsyncGatewayClient(url, "llm-gateway", "secret") as gateway:
            reporter = AsyncUsageReporter(gateway, batch_size=7, flush_interval=0.05)
            for n in range(20):
                assert reporter.submit(_record(n))
            assert await reporter.aclose(timeout=10)
            return reporter.sent

    assert asyncio.run(run()) == 20
    assert sorted(target.call_ids) == sorted(f"call-{n}" for n in range(20))


def test_the_example_gateway_reports_each_call_and_the_broker_prices_it(tmp_path: Path) -> None:
    write_provider_keys(tmp_path / "keys.yaml", KEY)
    provider = StandInProvider(KEY)
    with (
        run_example_stack(tmp_path, SECRETS, tmp_path / "keys.yaml") as (running, idp),
        serve_in_thread(provider.asgi_app()) as provider_server,
        GatewayClient(running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]) as broker,
        httpx.Client(base_url=provider_server.url, timeout=10) as upstream,
    ):
        reporter = UsageReporter(broker, flush_interval=0.1)
        app = create_gateway_app(GatewayConfig(), broker, upstream, usage=reporter)
        with (
            serve_in_thread(app) as gateway,
            AgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as agent,
        ):
            token = agent.exchange(
                idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
            )
            for _ in range(3):
                answer = httpx.post(
                    f"{gateway.url}/v1/chat/completions",
                    json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
                    headers=agent.headers_for("POST", gateway.url, token),
                )
                assert answer.status_code == 200, answer.text
            assert reporter.close(timeout=10)
        records = [r for r in running.decisions.records if r.get("event") == "usage.recorded"]
    assert len(records) == 3 and reporter.sent == 3 and reporter.rejected == 0
    for record in records:
        assert record["person"] == "dev/alice" and record["agent_chain"] == ["triage-agent"]
        assert record["provider"] == "openai" and record["model"] == "gpt-4o-mini"
        # 20 prompt tokens at 0.15/M and 9 completion tokens at 0.60/M (policies/usage.yaml)
        assert record["units"] == {"input_tokens": 20, "output_tokens": 9, "cached_tokens": 0}
        assert record["cost"] == "0.000008" and record["currency"] == "USD"


def test_calls_reported_while_the_state_store_is_down_are_recorded_once_it_is_back(
    tmp_path: Path,
) -> None:
    """The broker answers such records `temporarily_unavailable`; the reporter keeps them and
    sends them again, dated when they were submitted, until the broker can store them."""
    from tests.support.servers import run_redis

    write_provider_keys(tmp_path / "keys.yaml", KEY)
    with run_redis(tmp_path) as redis:
        state = {
            "kind": "redis",
            "url": redis.url,
            "socket_timeout_seconds": 0.3,
            "connect_timeout_seconds": 0.3,
        }
        with (
            run_example_stack(tmp_path, SECRETS, tmp_path / "keys.yaml", state=state) as (
                running,
                idp,
            ),
            GatewayClient(running.url, "llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]) as broker,
            AgentClient(running.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]) as agent,
        ):
            token = agent.exchange(
                idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
            )
            broker.fetch("openai-api-key", token)  # the gateway fetched it: reports are its own
            reporter = UsageReporter(broker, flush_interval=0.05, max_backoff=0.5)
            redis.freeze()  # unreachable (hung), its data kept: the gateway's fetch ticket too
            submitted = time.time()
            for n in range(3):
                reporter.submit(_record(n, token.access_token))
            time.sleep(1.0)  # attempts meet the outage and are kept
            assert reporter.pending == 3
            redis.thaw()
            assert reporter.close(timeout=20)
            records = [r for r in running.decisions.records if r.get("event") == "usage.recorded"]
    assert sorted(r["call_id"] for r in records) == ["call-0", "call-1", "call-2"]
    for record in records:  # dated at submit, not at delivery
        occurred = datetime.fromisoformat(record["occurred_at"]).timestamp()
        assert abs(occurred - submitted) < 1.0

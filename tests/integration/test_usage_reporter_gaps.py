"""Two ways the usage reporters lose or misdate usage today (H-gwusage's review of main's
broker/client_usage.py). Both tests FAIL on main as of 5287b3f; they state what should happen.

1. A state-store outage is answered per record, not per request: `UsageService._one` turns the
   `TemporarilyUnavailable` of `fetched`/`claim_call`/the ledger settle into a result
   ``{"call_id": ..., "error": "temporarily_unavailable", "error_description": "... report
   again"}`` inside a 200 (broker/usage/service.py). The reporters count such a record as
   ``rejected`` and never send it again, so the call is never recorded and a deny budget's
   reservation is never settled (it only expires). A per-record ``temporarily_unavailable``
   must be sent again, like a 503 for the whole batch.
2. `occurred_at` is left to the broker ("now" on arrival). A record held back by retries (the
   broker down for minutes) is then dated at delivery: the wrong day or month for the report, the
   budget period and the price in force. The reporter should date a record when it is submitted
   (the example gateway builds its records without `occurred_at`).

The receiver below answers exactly as broker/usage/service.py does in those cases.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.client import (
    AsyncGatewayClient,
    AsyncUsageReporter,
    GatewayClient,
    UsageRecord,
    UsageReporter,
)
from idp_adapters._loopback import serve_in_thread


def _record(n: int) -> UsageRecord:
    return UsageRecord(
        call_id=f"call-{n}",
        agent_token="a.b.c",
        credential="openai-api-key",
        provider="openai",
        model="gpt-4o-mini",
        units={"input_tokens": 100, "output_tokens": 10},
    )


class _Broker:
    """``POST /v1/usage`` answering as the broker does: `state_down_answers` requests get 200
    with a per-record ``temporarily_unavailable`` (the state store is unreachable), and
    `refuse_whole` further ones a 503 for the whole batch; then every record is recorded."""

    def __init__(self, state_down_answers: int = 0, refuse_whole: int = 0) -> None:
        self.state_down_answers = state_down_answers
        self.refuse_whole = refuse_whole
        self.seen: list[tuple[float, dict[str, Any]]] = []
        """(arrival time, record) for every record received."""
        self.recorded: list[str] = []
        self.lock = threading.Lock()

    def app(self) -> Starlette:
        async def usage(request: Request) -> JSONResponse:
            records = json.loads(await request.body())["records"]
            with self.lock:
                now = time.time()
                self.seen.extend((now, r) for r in records)
                if self.refuse_whole > 0:
                    self.refuse_whole -= 1
                    return JSONResponse(
                        {"error": "temporarily_unavailable", "error_description": "busy"},
                        status_code=503,
                        headers={"Retry-After": "1"},
                    )
                if self.state_down_answers > 0:
                    self.state_down_answers -= 1
                    return JSONResponse(
                        {
                            "results": [
                                {
                                    "call_id": r["call_id"],
                                    "error": "temporarily_unavailable",
                                    "error_description": "usage state cannot be read right now;"
                                    " report again",
                                }
                                for r in records
                            ]
                        }
                    )
                self.recorded.extend(r["call_id"] for r in records)
            return JSONResponse(
                {
                    "results": [
                        {"call_id": r["call_id"], "outcome": "recorded", "priced_by": "unpriced"}
                        for r in records
                    ]
                }
            )

        return Starlette(routes=[Route("/v1/usage", usage, methods=["POST"])])


def test_a_record_the_broker_could_not_store_yet_is_sent_again() -> None:
    target = _Broker(state_down_answers=1)
    with serve_in_thread(target.app()) as server, GatewayClient(server.url, "gw", "s") as gateway:
        reporter = UsageReporter(gateway, batch_size=10, flush_interval=0.05)
        for n in range(5):
            reporter.submit(_record(n))
        reporter.close(timeout=15)
    assert sorted(target.recorded) == [f"call-{n}" for n in range(5)], (
        "records answered temporarily_unavailable were never sent again "
        f"(rejected={reporter.rejected})"
    )
    assert reporter.rejected == 0


def test_the_async_reporter_sends_again_what_the_broker_could_not_store_yet() -> None:
    target = _Broker(state_down_answers=1)

    async def run() -> AsyncUsageReporter:
        async with AsyncGatewayClient(server.url, "gw", "s") as gateway:
            reporter = AsyncUsageReporter(gateway, batch_size=10, flush_interval=0.05)
            for n in range(5):
                reporter.submit(_record(n))
            await reporter.flush(timeout=15)
            await reporter.aclose(timeout=1)
            return reporter

    with serve_in_thread(target.app()) as server:
        reporter = asyncio.run(run())
    assert sorted(target.recorded) == [f"call-{n}" for n in range(5)]
    assert reporter.rejected == 0


def test_a_record_is_dated_when_submitted_not_when_the_broker_finally_takes_it() -> None:
    target = _Broker(refuse_whole=2)  # ~1.5 s of retries (0.5 s, then 1 s) before it is taken
    with serve_in_thread(target.app()) as server, GatewayClient(server.url, "gw", "s") as gateway:
        reporter = UsageReporter(gateway, batch_size=10, flush_interval=0.05)
        submitted = time.time()
        reporter.submit(_record(1))
        assert reporter.close(timeout=15)
    delivered_at, delivered = target.seen[-1]
    assert target.recorded == ["call-1"]
    assert delivered_at - submitted >= 1.0  # the premise: it really was held back
    assert "occurred_at" in delivered, "the broker would date the call at delivery"
    assert abs(delivered["occurred_at"] - submitted) < 0.5

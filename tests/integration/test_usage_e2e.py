"""What agents cost, end to end over HTTP: gateways report calls (POST /v1/usage), the broker
attributes them from the agent token, prices them with the policy's table (a price change
mid-month included), keeps reports idempotent by call id, refuses reports for credentials the
gateway never fetched, records unknown models as unpriced (alerting once), counts spend against
budgets (deny budgets reserve at the fetch and refuse when used up, naming the budget, the amount
and the reset; reports settle reservations; unreported ones are released), and alerts once per
threshold per period to a real loopback webhook receiver."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.clock import FrozenClock
from idp_adapters._loopback import serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)

SECRETS = example_client_secrets()
OTHER_GATEWAY_SECRET = generate_client_secret()
USAGE_AGENT_SECRET = generate_client_secret()
HOOK_SECRET = "whsec-usage-test"
START = datetime.fromtimestamp(int(time.time()), UTC)
"""When the module was collected: the price table's dates are days before it. The broker's
clock starts when its fixture does (the IdP signs in real time, minutes later in a full run)."""
EARLY_PRICE = (START - timedelta(days=20)).date()
PRICE_CHANGE = (START - timedelta(days=5)).date()
"""The price of testai/m1 changes five days ago (tenfold)."""


def _policy_extra() -> dict[str, Any]:
    return {
        "agents": {
            "usage-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(USAGE_AGENT_SECRET, method="sha256"),
                },
                "ceiling": ["llm:openai:chat"],
                "audiences": ["llm-gateway"],
                "act_for": ["group:dev/support"],
                "cost_centre": "research",
            },
            "alert-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(USAGE_AGENT_SECRET, method="sha256"),
                },
                "ceiling": ["llm:openai:chat"],
                "audiences": ["llm-gateway"],
                "act_for": ["group:dev/support"],
                "cost_centre": "alerts-ops",
            },
            "budget-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(USAGE_AGENT_SECRET, method="sha256"),
                },
                "ceiling": ["llm:openai:chat"],
                "audiences": ["llm-gateway"],
                "act_for": ["group:dev/support"],
                "cost_centre": "claims-ops",
            },
        },
        "gateways": {
            "other-gateway": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(OTHER_GATEWAY_SECRET, method="sha256"),
                },
                "audiences": ["llm-gateway"],
                "credentials": ["openai-api-key"],
            }
        },
        "prices": [
            {
                "provider": "testai",
                "model": "m1",
                "currency": "EUR",
                "valid_from": EARLY_PRICE.isoformat(),
                "per_million": {"input_tokens": 1, "output_tokens": 2},
            },
            {  # a price change mid-month
                "provider": "testai",
                "model": "m1",
                "currency": "EUR",
                "valid_from": PRICE_CHANGE.isoformat(),
                "per_million": {"input_tokens": 10, "output_tokens": 20},
            },
        ],
        "budgets": {
            "alerts-daily": {
                "scope": {"cost_centre": "alerts-ops"},
                "period": "day",
                "amount": "0.01",
                "currency": "EUR",
                "action": "alert",
                "thresholds": [100],
                "channels": ["finance-hook"],
            },
            "claims-daily": {
                "scope": {"cost_centre": "claims-ops"},
                "period": "day",
                "amount": "0.05",
                "currency": "EUR",
                "action": "deny",
                "reserve_per_call": "0.02",
                "thresholds": [50, 100],
                "channels": ["finance-hook"],
            },
        },
    }


@pytest.fixture(scope="module")
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    received: list[dict[str, Any]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append(json.loads(await request.body()))
        return JSONResponse({"ok": True})

    server = serve_in_thread(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))
    try:
        yield server.url + "/hook", received
    finally:
        server.stop()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, receiver: tuple[str, list[dict[str, Any]]]
) -> Iterator[tuple[RunningBroker, DevIdentityProvider, FrozenClock]]:
    tmp = tmp_path_factory.mktemp("usage")
    write_provider_keys(tmp / "keys.yaml", "sk-usage-test")
    clock = FrozenClock(time.time())
    mp = pytest.MonkeyPatch()
    mp.setenv("USAGE_HOOK_SECRET", HOOK_SECRET)
    channels = {
        "finance-hook": {
            "kind": "webhook",
            "url": receiver[0],
            "secret_ref": "env:USAGE_HOOK_SECRET",
        }
    }
    try:
        with run_example_stack(
            tmp,
            SECRETS,
            tmp / "keys.yaml",
            clock=clock,
            policy_extra=_policy_extra(),
            notifications={"channels": channels},
            usage={"alert_channels": ["finance-hook"], "time_zone": "Europe/Berlin"},
        ) as (running, idp):
            yield running, idp, clock
    finally:
        mp.undo()


def _token(stack: Any, agent: str = "usage-agent", person: str = "alice") -> str:
    running, idp, _clock = stack
    secret = (
        USAGE_AGENT_SECRET
        if agent in ("usage-agent", "budget-agent", "alert-agent")
        else SECRETS["TRIAGE_AGENT_SECRET"]
    )
    response = httpx.post(
        running.token_endpoint,
        data=exchange_form(
            idp.mint(person),
            scope="llm:openai:chat",
            audience="llm-gateway",
        ),
        auth=(agent, secret),
    )
    assert response.status_code == 200, response.text
    return response.json()["access_token"]


def _fetch(running: RunningBroker, token: str, gateway: str = "llm-gateway") -> httpx.Response:
    secret = OTHER_GATEWAY_SECRET if gateway == "other-gateway" else SECRETS["LLM_GATEWAY_SECRET"]
    return httpx.post(
        f"{running.url}/v1/credentials/openai-api-key",
        data={"token": token},
        auth=(gateway, secret),
    )


def _report(
    running: RunningBroker, *records: dict[str, Any], gateway: str = "llm-gateway"
) -> httpx.Response:
    secret = OTHER_GATEWAY_SECRET if gateway == "other-gateway" else SECRETS["LLM_GATEWAY_SECRET"]
    return httpx.post(
        f"{running.url}/v1/usage", json={"records": list(records)}, auth=(gateway, secret)
    )


def _call(token: str, call_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "call_id": call_id,
        "token": token,
        "credential": "openai-api-key",
        "provider": "testai",
        "model": "m1",
        "units": {"input_tokens": 1000, "output_tokens": 500},
        **extra,
    }


def _recorded(running: RunningBroker, call_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in running.decisions.records
        if r.get("event") == "usage.recorded" and r.get("call_id") == call_id
    ]


def test_a_call_is_attributed_from_its_token_and_priced_at_its_days_price(stack: Any) -> None:
    running, _, _clock = stack
    token = _token(stack)
    fetched = _fetch(running, token)
    assert fetched.status_code == 200, fetched.text
    before_change = (START - timedelta(days=10)).timestamp()
    answer = _report(
        running,
        _call(token, "c-early", occurred_at=before_change),
        _call(token, "c-now", usage_ref=fetched.json().get("usage_ref")),
    )
    assert answer.status_code == 200, answer.text
    early, now = answer.json()["results"]
    # 1000 input at 1/M + 500 output at 2/M before the 15th; ten times that after.
    assert early == {
        "call_id": "c-early",
        "outcome": "recorded",
        "cost": "0.002000",
        "currency": "EUR",
        "priced_by": "price_table",
    }
    assert now["cost"] == "0.020000"
    [record] = _recorded(running, "c-now")
    assert record["person"] == "dev/alice" and record["agent_chain"] == ["usage-agent"]
    assert record["cost_centre"] == "research" and record["gateway"] == "llm-gateway"
    assert record["units"] == {"input_tokens": 1000, "output_tokens": 500}
    assert record["price"] == {"valid_from": PRICE_CHANGE.isoformat(), "currency": "EUR"}
    assert token not in json.dumps(running.decisions.records)


def test_the_same_call_reported_twice_at_once_counts_once(stack: Any) -> None:
    running, _, _ = stack
    token = _token(stack, agent="triage-agent")
    assert _fetch(running, token).status_code == 200
    outcomes: list[str] = []

    def report() -> None:
        answer = _report(running, _call(token, "c-twice"))
        outcomes.append(answer.json()["results"][0]["outcome"])

    threads = [threading.Thread(target=report) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert sorted(outcomes) == ["duplicate", "duplicate", "duplicate", "recorded"]
    assert len(_recorded(running, "c-twice")) == 1


def test_a_report_for_a_credential_the_gateway_never_fetched_is_refused(stack: Any) -> None:
    running, _, _ = stack
    token = _token(stack, agent="triage-agent")
    never = _report(running, _call(token, "c-never"))
    assert never.json()["results"][0]["error"] == "access_denied"
    assert _fetch(running, token).status_code == 200
    by_another = _report(running, _call(token, "c-other"), gateway="other-gateway")
    assert by_another.json()["results"][0]["error"] == "access_denied"
    assert _recorded(running, "c-never") == [] and _recorded(running, "c-other") == []
    # The batch goes on past a refused record.
    mixed = _report(running, {"call_id": "c-bad"}, _call(token, "c-good"))
    bad, good = mixed.json()["results"]
    assert bad["error"] == "invalid_request" and good["outcome"] == "recorded"


def test_an_unknown_model_is_unpriced_never_zero_and_alerts_once(
    stack: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    running, _, _ = stack
    token = _token(stack, agent="triage-agent")
    assert _fetch(running, token).status_code == 200
    answers = [
        _report(running, _call(token, f"c-mystery-{n}", model="mystery-9")).json()["results"][0]
        for n in range(2)
    ]
    assert all(a["cost"] is None and a["priced_by"] == "unpriced" for a in answers)
    [record] = _recorded(running, "c-mystery-0")
    assert record.get("cost") is None and record["unpriced_reason"] == "unknown_model"
    _wait_for(lambda: any(m["event"] == "usage.unpriced" for m in receiver[1]))
    assert sum(1 for m in receiver[1] if m["event"] == "usage.unpriced") == 1
    metrics = httpx.get(f"{running.url}/metrics").text
    assert (
        'broker_usage_unpriced_calls_total{model="other",provider="other",'
        'reason="unknown_model"}' in metrics
    )


def test_reports_for_expired_or_revoked_tokens_are_still_attributed(stack: Any) -> None:
    running, _, clock = stack
    token = _token(stack, agent="triage-agent")
    assert _fetch(running, token).status_code == 200
    revoked = httpx.post(
        f"{running.url}/oauth2/revoke",
        data={"token": token},
        auth=("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]),
    )
    assert revoked.status_code == 200
    assert _fetch(running, token).status_code == 401  # it unlocks nothing any more...
    answer = _report(running, _call(token, "c-revoked"))
    assert answer.json()["results"][0]["outcome"] == "recorded"  # ...but its calls count
    later = _token(stack, agent="triage-agent")
    assert _fetch(running, later).status_code == 200
    clock.advance(3600 + 60)  # past its expiry
    answer = _report(running, _call(later, "c-expired", occurred_at=clock.now() - 3000))
    clock.advance(-(3600 + 60))  # back: the IdP signs people in at the real time
    assert answer.json()["results"][0]["outcome"] == "recorded"
    assert _recorded(running, "c-expired")[0]["person"] == "dev/alice"


def _wait_for(condition: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_deny_budget_reserves_refuses_settles_and_releases(
    stack: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    running, _, clock = stack
    token = _token(stack, agent="budget-agent")
    first, second = _fetch(running, token), _fetch(running, token)
    assert first.status_code == 200 and second.status_code == 200
    refused = _fetch(running, token)  # 0.02 + 0.02 reserved; 0.02 more exceeds 0.05
    assert refused.status_code == 403, refused.text
    body = refused.json()
    assert body["error"] == "access_denied"
    text = body["error_description"]
    assert "claims-daily" in text and "cost centre claims-ops" in text
    assert "0.0500 EUR" in text and "resets at" in text and "+01:00" in text  # Europe/Berlin
    [denial] = [
        r
        for r in running.decisions.records
        if r.get("event") == "credential.fetch" and r.get("reason") == "budget_exceeded"
    ]
    assert denial["budget"] == "claims-daily"
    # The first call reports a small actual cost: its reservation is settled, room returns.
    settled = _report(
        running,
        _call(token, "c-settle", units={"input_tokens": 100}, usage_ref=first.json()["usage_ref"]),
    )
    assert settled.json()["results"][0]["cost"] == "0.001000"
    assert _fetch(running, token).status_code == 200
    assert _fetch(running, token).status_code == 403
    # Unreported reservations are released after the hold (300 s).
    clock.advance(301)
    assert _fetch(running, token).status_code == 200
    # 50 % of 0.05 reached: one alert; 100 % later: one more; never twice.
    big = {"input_tokens": 2500}  # 0.025 EUR at 10/M
    for n in range(3):
        _report(running, _call(token, f"c-big-{n}", units=big))
    _wait_for(lambda: sum(1 for m in receiver[1] if m["event"] == "budget.threshold") >= 2)
    time.sleep(0.3)
    alerts = [m for m in receiver[1] if m["event"] == "budget.threshold"]
    assert [a["title"] for a in alerts] == [
        "Budget claims-daily: 50 % reached",
        "Budget claims-daily: 100 % reached",
    ]
    recorded = [r for r in running.decisions.records if r.get("event") == "budget.alert"]
    assert [r["threshold"] for r in recorded] == [50, 100]
    metrics = httpx.get(f"{running.url}/metrics").text
    assert 'broker_budget_utilisation_ratio{budget="claims-daily"}' in metrics
    assert (
        'broker_usage_cost_total{cost_centre="claims-ops",currency="EUR",model="m1",'
        'provider="testai"}' in metrics
    )


def test_an_unreachable_state_store_refuses_fetches_under_a_deny_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail closed: with Redis down, a fetch a deny budget governs is a 503 naming the budget
    state (never served unaccounted), and readiness says the state store is down."""
    from tests.support.servers import run_redis

    write_provider_keys(tmp_path / "keys.yaml", "sk-usage-test")
    with run_redis(tmp_path) as redis:
        state = {
            "kind": "redis",
            "url": f"redis://127.0.0.1:{redis.port}/0",
            "socket_timeout_seconds": 0.3,
            "connect_timeout_seconds": 0.3,
        }
        monkeypatch.setenv("USAGE_HOOK_SECRET", HOOK_SECRET)
        channels = {
            "finance-hook": {
                "kind": "webhook",
                "url": "http://127.0.0.1:9/hook",
                "secret_ref": "env:USAGE_HOOK_SECRET",
            }
        }
        with run_example_stack(
            tmp_path,
            SECRETS,
            tmp_path / "keys.yaml",
            policy_extra=_policy_extra(),
            state=state,
            notifications={"channels": channels},
        ) as (running, idp):
            token = httpx.post(
                running.token_endpoint,
                data=exchange_form(
                    idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
                ),
                auth=("budget-agent", USAGE_AGENT_SECRET),
            ).json()["access_token"]
            assert _fetch(running, token).status_code == 200
            redis.stop()
            refused = _fetch(running, token)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "temporarily_unavailable"
            assert "sk-usage-test" not in refused.text
            ready = httpx.get(f"{running.url}/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["state"]["ok"] is False


def test_an_alert_goes_out_once_per_threshold_in_each_period(
    stack: Any, receiver: tuple[str, list[dict[str, Any]]]
) -> None:
    running, _, clock = stack
    token = _token(stack, agent="alert-agent")
    now = datetime.fromtimestamp(clock.now(), UTC)
    assert _fetch(running, token).status_code == 200  # an alert budget never refuses
    yesterday = (now - timedelta(days=1)).timestamp()
    big = {"input_tokens": 2000}  # 0.02 EUR at 10/M: over the 0.01 of the day at once
    for n, occurred in enumerate((yesterday, yesterday, now.timestamp(), now.timestamp())):
        answer = _report(running, _call(token, f"c-alert-{n}", units=big, occurred_at=occurred))
        assert answer.json()["results"][0]["outcome"] == "recorded"

    def alerts() -> list[dict[str, Any]]:
        return [m for m in receiver[1] if m["title"] == "Budget alerts-daily: 100 % reached"]

    _wait_for(lambda: len(alerts()) >= 2)
    time.sleep(0.3)
    periods = sorted(
        dict(f.items())["value"] for a in alerts() for f in a["fields"] if f["name"] == "period"
    )
    berlin = ZoneInfo("Europe/Berlin")
    assert periods == sorted(
        {
            (now - timedelta(days=1)).astimezone(berlin).strftime("%Y-%m-%d"),
            now.astimezone(berlin).strftime("%Y-%m-%d"),
        }
    )

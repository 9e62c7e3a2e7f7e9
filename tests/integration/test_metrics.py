"""`GET /metrics`: decision counters, latency histograms, cache counters per credential name,
policy info; and no token, secret or person identifier anywhere in the text."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import BrokerMetrics, label_value
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack,
)

SECRETS = example_client_secrets()
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
GATEWAY = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
CANARY = "sk-canary-" + uuid.uuid4().hex


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


def _value(text: str, name: str, **labels: str) -> float:
    return sum(
        v
        for n, lab, v in _samples(text)
        if n == name and all(lab.get(k) == w for k, w in labels.items())
    )


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, object]]:
    tmp = tmp_path_factory.mktemp("metrics")
    secrets_file = tmp / "dev-secrets.yaml"
    secrets_file.write_text(
        yaml.safe_dump({"llm/openai": {"api_key": CANARY}, "llm/anthropic": {"api_key": CANARY}})
    )
    with run_example_stack(tmp, SECRETS, secrets_file) as (running, idp):
        yield running, idp


def _scrape(running: RunningBroker) -> str:
    response = httpx.get(f"{running.url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_metrics_count_decisions_latency_and_cache_without_leaking(
    broker: tuple[RunningBroker, object],
) -> None:
    running, idp = broker
    id_token = idp.mint("alice")  # type: ignore[attr-defined]
    granted = httpx.post(
        running.token_endpoint,
        data=exchange_form(id_token, scope="llm:openai:chat", audience="llm-gateway"),
        auth=TRIAGE,
        timeout=10,
    )
    assert granted.status_code == 200, granted.text
    access_token = granted.json()["access_token"]
    denied = httpx.post(
        running.token_endpoint,
        data=exchange_form(id_token, scope="llm:openai:chat", audience="llm-gateway"),
        auth=(TRIAGE[0], "wrong-" + TRIAGE[1]),
        timeout=10,
    )
    assert denied.status_code == 401
    refused = httpx.post(
        running.token_endpoint,
        data=exchange_form("not-a-token", scope="llm:openai:chat", audience="llm-gateway"),
        auth=TRIAGE,
        timeout=10,
    )
    assert refused.status_code == 400
    for _ in range(3):
        fetched = httpx.post(
            f"{running.url}/v1/credentials/openai-api-key",
            data={"token": access_token},
            auth=GATEWAY,
            timeout=10,
        )
        assert fetched.status_code == 200, fetched.text
        assert CANARY in fetched.text

    text = _scrape(running)
    refused_reason = next(
        r
        for r in reversed(running.decisions.records)
        if r["event"] == "token.exchange" and r["outcome"] == "denied"
    )
    assert _value(text, "broker_decisions_total", event="token.exchange", outcome="granted") == 1
    assert (
        _value(
            text,
            "broker_decisions_total",
            event="token.exchange",
            outcome="denied",
            reason=label_value(refused_reason.get("reason") or refused_reason.get("error")),
        )
        >= 1
    )
    assert _value(text, "broker_decisions_total", event="credential.fetch", outcome="granted") == 3
    for _, labels, _ in _samples(text):
        for key in ("event", "outcome", "reason"):
            if key in labels:
                assert label_value(labels[key]) == labels[key]

    assert (
        _value(text, "broker_request_duration_seconds_count", route="/oauth2/token", status="2xx")
        == 1
    )
    assert (
        _value(text, "broker_request_duration_seconds_count", route="/oauth2/token", status="4xx")
        == 2
    )
    assert (
        _value(text, "broker_request_duration_seconds_count", route="/v1/credentials/{name}") == 3
    )
    assert all(
        labels.get("route") != "/v1/credentials/openai-api-key" for _, labels, _ in _samples(text)
    )

    assert _value(text, "broker_credential_cache_hits_total", credential="openai-api-key") >= 2
    assert _value(text, "broker_credential_cache_misses_total", credential="openai-api-key") >= 1
    assert _value(text, "broker_credential_cache_refreshes_total", credential="openai-api-key") >= 1
    age = _value(text, "broker_credential_age_seconds", credential="openai-api-key")
    assert 0 <= age < 60  # just loaded; refresh_interval is 60 s in the example policy
    assert _value(text, "broker_credential_stale", credential="openai-api-key") == 0
    assert not any(  # a credential never fetched has no age
        n == "broker_credential_age_seconds" and lab.get("credential") == "anthropic-api-key"
        for n, lab, _ in _samples(text)
    )
    version = running.services.policies.current().version
    assert _value(text, "broker_policy_version_info", version=version[:80]) == 1
    assert _value(text, "broker_policy_reload_failures_total") == 0

    canaries = [
        CANARY,
        id_token,
        access_token,
        "alice",
        *SECRETS.values(),
        *[part for part in access_token.split(".") if len(part) > 16],
    ]
    for canary in canaries:
        assert canary not in text


def test_each_app_has_its_own_registry(tmp_path: Path) -> None:
    first, second = BrokerMetrics(), BrokerMetrics()
    first.write({"event": "token.exchange", "outcome": "granted", "reason": "granted"})
    assert first.registry is not second.registry
    assert (
        first.registry.get_sample_value(
            "broker_decisions_total",
            {"event": "token.exchange", "outcome": "granted", "reason": "granted"},
        )
        == 1
    )
    assert (
        second.registry.get_sample_value(
            "broker_decisions_total",
            {"event": "token.exchange", "outcome": "granted", "reason": "granted"},
        )
        is None
    )


def test_unbounded_label_values_become_other() -> None:
    metrics = BrokerMetrics()
    metrics.write({"event": "token.exchange", "outcome": "denied", "reason": "alice@example.com"})
    metrics.write({"event": "x" * 65, "outcome": "Denied", "error": "invalid_grant"})
    assert (
        metrics.registry.get_sample_value(
            "broker_decisions_total",
            {"event": "token.exchange", "outcome": "denied", "reason": "other"},
        )
        == 1
    )
    assert (
        metrics.registry.get_sample_value(
            "broker_decisions_total",
            {"event": "other", "outcome": "other", "reason": "invalid_grant"},
        )
        == 1
    )

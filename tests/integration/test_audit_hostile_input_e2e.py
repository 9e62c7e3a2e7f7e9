"""Hostile input cannot bloat the audit trail, crash an endpoint unrecorded, or break the chain:
records are bounded (huge names and scopes from unauthenticated callers make small records),
deeply nested JSON is a recorded 400 on every endpoint, an unexpected exception is a recorded
500, and a record that would hold NaN is written without it while the request fails closed."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from broker.app import create_app
from broker.audit import FileSink, verify_trail
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
ADMIN = ("rotation-hook", SECRETS["ROTATION_HOOK_SECRET"])
SMALL_RECORD = 2048  # bytes of canonical JSON: a bounded record is far below this


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningBroker, DevIdentityProvider]]:
    tmp_path = tmp_path_factory.mktemp("audit-hostile")
    with run_example_stack_with_key(tmp_path, SECRETS, "sk-" + uuid.uuid4().hex) as (
        running,
        idp,
        _,
    ):
        yield running, idp


def _records_for(running: RunningBroker, request_id: str) -> list[dict[str, Any]]:
    # The caller's X-Request-Id is recorded apart from the broker's own id.
    return [r for r in running.decisions.records if r.get("client_request_id") == request_id]


def _size(record: dict[str, Any]) -> int:
    return len(json.dumps(record, separators=(",", ":")))


def _post(running: RunningBroker, path: str, request_id: str, **kwargs: Any) -> httpx.Response:
    headers = {"X-Request-Id": request_id, **kwargs.pop("headers", {})}
    return httpx.post(f"{running.url}{path}", headers=headers, timeout=30, **kwargs)


def test_a_60000_character_credential_name_makes_a_small_record(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, _ = stack
    name = "n" * 60_000
    unauthenticated = _post(
        running, f"/v1/credentials/{name}", "req-long-name", data={"token": "x"}
    )
    assert unauthenticated.status_code == 401
    [record] = _records_for(running, "req-long-name")
    assert record["event"] == "request.denied" and record["route"] == "/v1/credentials/{name}"
    assert "credential" not in record  # nothing the unauthenticated caller asked for
    assert _size(record) < SMALL_RECORD
    authenticated = _post(
        running, f"/v1/credentials/{name}", "req-long-name-gw", data={"token": "x"}, auth=GATEWAY
    )
    assert authenticated.status_code in {400, 401, 404}
    [record] = _records_for(running, "req-long-name-gw")
    assert _size(record) < SMALL_RECORD
    assert record["credential"].endswith("\u2026") and len(record["credential"]) <= 257
    assert record["truncated"] == {"credential": 60_000}


def test_a_60_kb_scope_makes_small_records(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    scope = " ".join(f"s{i:05d}" + "s" * 42 for i in range(1240))  # 60 KB, under the body cap
    assert len(scope) > 60_000
    form = exchange_form(idp.mint("alice"), scope=scope, audience="llm-gateway")
    unauthenticated = _post(running, "/oauth2/token", "req-scope-anon", data=form)
    assert unauthenticated.status_code in {400, 401}
    authenticated = _post(running, "/oauth2/token", "req-scope-auth", data=form, auth=TRIAGE)
    assert authenticated.status_code in {400, 403}
    one_long = exchange_form(idp.mint("alice"), scope="x" * 60_000, audience="llm-gateway")
    assert _post(running, "/oauth2/token", "req-scope-one", data=one_long, auth=TRIAGE).is_error
    for request_id in ("req-scope-anon", "req-scope-auth", "req-scope-one"):
        records = _records_for(running, request_id)
        assert records, request_id
        for record in records:
            assert _size(record) < SMALL_RECORD * 2, (request_id, _size(record))
    [anonymous] = _records_for(running, "req-scope-anon")  # neither client nor actor known
    assert "requested_scopes" not in anonymous and "requested_audiences" not in anonymous
    [auth_record] = _records_for(running, "req-scope-auth")
    assert auth_record["truncated"]["requested_scopes"] == 1240
    wrong_secret = _post(
        running,
        "/oauth2/token",
        "req-bad-client",
        data=exchange_form(idp.mint("alice"), scope="x" * 30_000, client_id="c" * 5000),
        auth=("c" * 5000, "wrong"),
    )
    assert wrong_secret.status_code == 401
    [refused] = _records_for(running, "req-bad-client")
    assert refused["event"] == "request.denied"
    assert refused["claimed_client_id"] == "c" * 64 and refused["source"] == "127.0.0.1"
    assert "requested_scopes" not in refused and _size(refused) < SMALL_RECORD


def _post_routes(running: RunningBroker) -> list[str]:
    """Every POST route of the app (built from the same services): new endpoints are covered."""
    routes = create_app(running.settings, services=running.services).routes
    return [r.path for r in routes if isinstance(r, Route) and "POST" in (r.methods or ())]


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_deeply_nested_json_is_a_recorded_400_on_every_endpoint(
    stack: tuple[RunningBroker, DevIdentityProvider], opening: str
) -> None:
    running, _ = stack
    body = opening * 5000
    routes = _post_routes(running)
    assert "/v1/admin/revocations" in routes and "/v1/credentials/{name}" in routes
    json_endpoints = 0
    for n, route in enumerate(routes):
        path = route.replace("{name}", "openai-api-key")
        for auth in (None, ADMIN, GATEWAY):
            request_id = f"req-deep-{opening[0]}-{n}-{auth[0] if auth else 'anon'}"
            response = _post(
                running,
                path,
                request_id,
                content=body,
                headers={"Content-Type": "application/json"},
                auth=auth,
            )
            if route.startswith("/v1/approvals/"):
                # An approver's own SSO token authenticates these, before the body is read
                # (their JSON is bounded the same way: tests/security/test_approvals_*).
                assert response.status_code == 401, (route, response.status_code)
            else:
                assert response.status_code in {400, 415}, (route, response.status_code)
            if response.status_code == 400:
                json_endpoints += 1
                assert response.json()["error"] == "invalid_request"
                assert "deeper than 32" in response.json()["error_description"]
            records = _records_for(running, request_id)
            assert records, f"no record for {route}"
            assert all(r["outcome"] == "denied" for r in records)
    assert json_endpoints >= 4 * 3


def test_an_unexpected_exception_leaves_a_record(
    stack: tuple[RunningBroker, DevIdentityProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    running, _ = stack

    async def broken_handle(*_: Any, **__: Any) -> dict[str, Any]:
        raise RuntimeError("boom: sk-must-not-leak")

    monkeypatch.setattr(running.services.introspection, "handle", broken_handle)
    response = _post(
        running, "/oauth2/introspect", "req-boom", data={"token": "t"}, auth=("tickets-api", "x")
    )
    assert response.status_code in {401, 500}  # wrong secret: refused before the handler
    response = _post(running, "/oauth2/introspect", "req-boom-2", data={"token": "t"}, auth=GATEWAY)
    assert response.status_code == 500
    assert response.json() == {"error": "server_error", "error_description": "internal error"}
    [record] = _records_for(running, "req-boom-2")
    assert record["event"] == "request.failed" and record["outcome"] == "failed"
    assert record["route"] == "/oauth2/introspect" and record["exception"] == "RuntimeError"
    assert record["client_id"] == "llm-gateway"
    assert "sk-must-not-leak" not in json.dumps(running.decisions.records)

    def broken_jwks() -> dict[str, Any]:
        raise RuntimeError("keyring gone")

    before = len(running.decisions.records)
    monkeypatch.setattr(running.services.keyring, "jwks", broken_jwks)
    response = httpx.get(f"{running.url}/.well-known/jwks.json", timeout=10)
    assert response.status_code == 500
    failed = [r for r in running.decisions.records[before:] if r["event"] == "request.failed"]
    assert [(r["route"], r["exception"]) for r in failed] == [
        ("/.well-known/jwks.json", "RuntimeError")
    ]


def test_a_record_with_nan_is_written_without_it_and_the_request_fails_closed(
    stack: tuple[RunningBroker, DevIdentityProvider],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    running, _ = stack
    decisions = running.services.decisions
    file_sink = FileSink(tmp_path / "trail.jsonl")
    monkeypatch.setattr(decisions, "_writers", [*decisions._writers, file_sink.write_line])

    async def nan_handle(form: Any, client: Any, *, request_id: str) -> dict[str, Any]:
        decisions.record(
            "token.introspect", outcome="inactive", score=float("nan"), request_id=request_id
        )
        return {"active": False}

    monkeypatch.setattr(running.services.introspection, "handle", nan_handle)
    response = _post(running, "/oauth2/introspect", "req-nan", data={"token": "t"}, auth=GATEWAY)
    assert response.status_code == 500
    assert "non-finite" in response.json()["error_description"]
    introspect, failed = _records_for(running, "req-nan")
    assert "score" not in introspect and introspect["invalid_values"] == ["score"]
    assert failed["event"] == "request.failed" and failed["reason"] == "non_finite_value"
    file_sink.close()
    text = (tmp_path / "trail.jsonl").read_text()
    assert "NaN" not in text
    for line in text.splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in the trail"))
    result = verify_trail([tmp_path / "trail.jsonl"])
    assert all(b.kind == "seq_gap" for b in result.breaks)  # the sink joined mid-chain only

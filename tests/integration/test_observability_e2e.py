"""Observability against real components: `/readyz` checking a real OpenBao (up, then down, then
back), JSON logs that carry request ids and no canary, OpenTelemetry spans exported over OTLP/HTTP
to a loopback collector (continuing the caller's trace), and the audit records of refusals no
domain handler records (failed client authentication, an admin call by a non-admin) and of a
signing-key rotation."""

from __future__ import annotations

import io
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.logs import configure_logging
from idp_adapters._loopback import RunningServer, serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import OpenBaoServer, run_openbao

SECRETS = example_client_secrets()
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
GATEWAY = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
CANARY_KEY = "sk-canary-" + uuid.uuid4().hex


class OtlpCollector:
    """A loopback OTLP/HTTP trace receiver: decodes each export request (protobuf)."""

    def __init__(self) -> None:
        self.requests: list[ExportTraceServiceRequest] = []
        self.raw: list[bytes] = []
        self._lock = threading.Lock()

    async def _traces(self, request: Request) -> Response:
        body = await request.body()
        message = ExportTraceServiceRequest()
        message.ParseFromString(body)
        with self._lock:
            self.raw.append(body)
            self.requests.append(message)
        return Response(b"", media_type="application/x-protobuf")

    def app(self) -> Starlette:
        return Starlette(routes=[Route("/v1/traces", self._traces, methods=["POST"])])

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        out = []
        with self._lock:
            for message in self.requests:
                for resource_spans in message.resource_spans:
                    resource = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope in resource_spans.scope_spans:
                        out.extend((resource, span) for span in scope.spans)
        return out


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[OtlpCollector, RunningServer]]:
    receiver = OtlpCollector()
    server = serve_in_thread(receiver.app(), "127.0.0.1", 0)
    try:
        yield receiver, server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def bao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBaoServer]:
    with run_openbao() as server:
        def seed(s: OpenBaoServer) -> None:
            for path in ("llm/openai", "llm/anthropic"):
                s.client().secrets.kv.v2.create_or_update_secret(
                    path=path, secret={"api_key": CANARY_KEY}, mount_point="secret"
                )

        server.add_seeder(seed)
        yield server


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    bao: OpenBaoServer,
    collector: tuple[OtlpCollector, RunningServer],
) -> Iterator[tuple[RunningBroker, DevIdentityProvider]]:
    tmp = tmp_path_factory.mktemp("observability")
    patch = pytest.MonkeyPatch()
    for key, value in SECRETS.items():
        patch.setenv(key, value)
    patch.setenv("OBS_VAULT_TOKEN", bao.root_token)
    try:
        with (
            serve_idp() as (idp, _),
            run_broker(
                tmp,
                [oidc_provider_config(idp)],
                secret_backends=[
                    {
                        "name": "vault",
                        "kind": "vault",
                        "address": bao.address,
                        "auth": {"method": "token", "token_ref": "env:OBS_VAULT_TOKEN"},
                    }
                ],
                readyz_backend_check_interval_seconds=0.0,
                tracing={
                    "enabled": True,
                    "endpoint": f"{collector[1].url}/v1/traces",
                    "export_interval_seconds": 0.2,
                    "service_name": "broker-under-test",
                },
            ) as running,
        ):
            yield running, idp
    finally:
        patch.undo()


def _exchange(running: RunningBroker, idp: DevIdentityProvider, **headers: str) -> httpx.Response:
    return httpx.post(
        running.token_endpoint,
        data=exchange_form(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"),
        auth=TRIAGE,
        headers=headers,
        timeout=10,
    )


def test_readyz_reports_a_real_backend_going_away_and_coming_back(
    stack: tuple[RunningBroker, DevIdentityProvider], bao: OpenBaoServer
) -> None:
    running, _ = stack
    ready = httpx.get(f"{running.url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    checks = ready.json()["checks"]
    vault = checks["secret_backends"]["backends"]["vault"]
    # Every credential using the backend is probed (with the broker's own permissions).
    assert vault == {
        "ok": True,
        "checked": True,
        "credentials": ["anthropic-api-key", "openai-api-key"],
    }
    assert checks["signing_keys"]["ok"] and checks["state"]["ok"]
    reads_before = bao.request_paths().count("secret/metadata/llm/anthropic")
    assert reads_before >= 1  # the check is a real metadata read at the store

    bao.stop()
    try:
        down = httpx.get(f"{running.url}/readyz", timeout=10)
        assert down.status_code == 503
        body = down.json()
        assert body["ready"] is False
        assert body["checks"]["secret_backends"]["backends"]["vault"]["ok"] is False
        assert body["checks"]["secret_backends"]["backends"]["vault"]["error"] == "unavailable"
        assert body["checks"]["policy"]["ok"] is True
        assert CANARY_KEY not in down.text and bao.root_token not in down.text
    finally:
        bao.start()
    deadline = time.monotonic() + 10
    while httpx.get(f"{running.url}/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "readyz did not recover after OpenBao came back"
        time.sleep(0.2)


def test_logs_are_json_lines_with_request_ids_and_no_canary(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    handler = configure_logging("DEBUG", "json", stream)
    try:
        granted = _exchange(running, idp)
        assert granted.status_code == 200, granted.text
        token = granted.json()["access_token"]
        fetched = httpx.post(
            f"{running.url}/v1/credentials/openai-api-key",
            json={"token": token},
            auth=GATEWAY,
            timeout=10,
        )
        assert fetched.status_code == 200, fetched.text
        assert fetched.json()["value"] == CANARY_KEY
        wrong_secret = httpx.post(
            running.token_endpoint,
            data=exchange_form(token, scope="llm:openai:chat", audience="llm-gateway"),
            auth=(TRIAGE[0], "wrong-" + TRIAGE[1]),
            headers={"X-Request-Id": "req-wrong-secret"},
            timeout=10,
        )
        assert wrong_secret.status_code == 401
        # A refusal with private detail: logged by the edge, with its request id.
        garbage = httpx.post(
            running.token_endpoint,
            data=exchange_form(token[:-8] + "AAAAAAAA", scope="llm:openai:chat"),
            auth=TRIAGE,
            headers={"X-Request-Id": "req-bad-signature"},
            timeout=10,
        )
        assert garbage.status_code == 400
        logging.getLogger("broker.test").info("presenting Bearer %s", token)  # defence in depth
    finally:
        root.removeHandler(handler)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = [line for line in stream.getvalue().splitlines() if line.strip()]
    assert lines, "nothing was logged"
    parsed = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in parsed:
        assert {"time", "level", "logger", "message"} <= set(entry)
    # The edge logs a refusal's private detail, naming the request it belongs to.
    refused = [e for e in parsed if e.get("client_request_id") == "req-wrong-secret"]
    assert [e["logger"] for e in refused] == ["broker.http"]
    assert "invalid_client" in refused[0]["message"]
    text = stream.getvalue()
    for canary in (token, token.split(".")[2], CANARY_KEY, TRIAGE[1], GATEWAY[1]):
        assert canary not in text
    assert "[redacted-jwt]" in text


def test_spans_reach_a_real_otlp_collector_continuing_the_callers_trace(
    stack: tuple[RunningBroker, DevIdentityProvider],
    collector: tuple[OtlpCollector, RunningServer],
) -> None:
    running, idp = stack
    receiver, _ = collector
    trace_id = uuid.uuid4().hex
    parent_span = uuid.uuid4().hex[:16]
    response = _exchange(running, idp, traceparent=f"00-{trace_id}-{parent_span}-01")
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    token = response.json()["access_token"]

    deadline = time.monotonic() + 10
    mine: list[tuple[dict[str, Any], Any]] = []
    while time.monotonic() < deadline:
        mine = [(r, s) for r, s in receiver.spans() if s.trace_id.hex() == trace_id]
        if any(s.name == "POST /oauth2/token" for _, s in mine):
            break
        time.sleep(0.1)
    names = {s.name for _, s in mine}
    steps = {"client authentication", "verify subject token", "policy decision", "issue token"}
    assert "POST /oauth2/token" in names and steps <= names
    server_span = next(s for _, s in mine if s.name == "POST /oauth2/token")
    assert server_span.parent_span_id.hex() == parent_span
    for step in (s for _, s in mine if s.name in steps):  # children of the request's span
        assert step.parent_span_id == server_span.span_id
    attributes = {a.key: a.value for a in server_span.attributes}
    assert attributes["http.route"].string_value == "/oauth2/token"
    assert attributes["broker.request_id"].string_value == request_id
    assert attributes["http.response.status_code"].int_value == 200
    resource = mine[0][0]
    assert resource["service.name"] == "broker-under-test"
    exported = b"".join(receiver.raw)
    assert token.encode() not in exported and token.split(".")[2].encode() not in exported
    assert TRIAGE[1].encode() not in exported


def test_refusals_no_handler_records_and_key_rotations_are_audited(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    bad_client = httpx.post(
        running.token_endpoint,
        data=exchange_form(idp.mint("alice"), scope="llm:openai:chat"),
        auth=(TRIAGE[0], "not-the-secret"),
        headers={"X-Request-Id": "req-bad-client"},
        timeout=10,
    )
    assert bad_client.status_code == 401
    not_admin = httpx.post(
        f"{running.url}/v1/admin/policy/reload",
        json={},
        auth=GATEWAY,
        headers={"X-Request-Id": "req-not-admin"},
        timeout=10,
    )
    assert not_admin.status_code == 401
    records = running.decisions.records
    by_request = {
        r.get("client_request_id"): r for r in records if r["event"] == "request.denied"
    }
    assert by_request["req-bad-client"]["route"] == "/oauth2/token"
    assert by_request["req-bad-client"]["error"] == "invalid_client"
    assert by_request["req-not-admin"]["client_id"] == "llm-gateway"
    assert by_request["req-not-admin"]["client_kind"] == "gateway"
    assert by_request["req-not-admin"]["route"] == "/v1/admin/policy/reload"
    # A refusal a handler already recorded is not recorded twice.
    refused_exchange = httpx.post(
        running.token_endpoint,
        data=exchange_form("not-a-token", scope="llm:openai:chat"),
        auth=TRIAGE,
        headers={"X-Request-Id": "req-handler-recorded"},
        timeout=10,
    )
    assert refused_exchange.status_code == 400
    for_it = [r for r in records if r.get("client_request_id") == "req-handler-recorded"]
    assert [r["event"] for r in for_it] == ["token.exchange"]

    before = running.services.keyring.active.kid
    running.services.keyring.rotate()
    after = running.services.keyring.active.kid
    rotated = [r for r in running.decisions.records if r["event"] == "signing_key.rotated"]
    assert rotated and rotated[-1]["previous_kid"] == before and rotated[-1]["kid"] == after
    assert before in rotated[-1]["published_kids"] and after in rotated[-1]["published_kids"]
    assert "private_key_pem" not in json.dumps(rotated[-1])

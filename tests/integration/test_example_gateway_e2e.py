"""Person -> agent -> example gateway -> stand-in provider, all real and over loopback HTTP.

A real OpenBao dev server holds the provider key (KV v2 ``secret/llm/openai``); the broker
serves it through its cache (the example policy's ``openai-api-key``, refresh interval 60 s);
the development IdP signs alice in; the triage agent exchanges her ID token with `AgentClient`;
the example gateway (`broker.examples.gateway`) fetches the key per call with `GatewayClient`
and calls the stand-in provider (`broker.examples.provider`), which accepts only the current key.

While 8 agent threads call the gateway, the key is rotated several times: each rotation writes a
new KV version and at that moment switches the provider to the new key only. Nothing tells the
broker (no push): the gateway's 401 from the provider, reported as ``rejected_version``, is what
makes the broker re-read OpenBao. The agents must see no failed call, and OpenBao must see one
data read per rotation.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from broker.client import AgentClient, BrokerClientError, GatewayClient
from broker.examples.gateway import GatewayConfig, create_gateway_app, refusal_for
from broker.examples.provider import StandInProvider
from idp_adapters._loopback import RunningServer, serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import OpenBaoServer, run_openbao

SECRETS = example_client_secrets()
KV_PATH = "llm/openai"
DATA_PATH = f"secret/data/{KV_PATH}"
METADATA_PATH = f"secret/metadata/{KV_PATH}"
FIRST_KEY = "sk-canary-first-" + secrets.token_hex(12)
ROTATIONS = 4
ROTATION_GAP = 1.4
"""Seconds between rotations: more than the broker's one hint round per credential per second."""
AGENT_THREADS = 8

issued_keys: list[str] = [FIRST_KEY]
"""Every provider key the tests create (the canary scan looks for each)."""
issued_tokens: list[str] = []


def new_key(label: str) -> str:
    key = f"sk-canary-{label}-{secrets.token_hex(12)}"
    issued_keys.append(key)
    return key


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Stack:
    bao: OpenBaoServer
    idp: DevIdentityProvider
    broker: RunningBroker
    provider: StandInProvider
    provider_server: RunningServer
    gateway_server: RunningServer
    logs: _Collect

    @property
    def gateway_url(self) -> str:
        return self.gateway_server.url

    def kv_version(self) -> int:
        metadata = self.bao.client().secrets.kv.v2.read_secret_metadata(KV_PATH)
        return int(metadata["data"]["current_version"])

    def rotate(self, label: str) -> str:
        """The rotation: store the new key, then revoke the old one at the provider at once."""
        key = new_key(label)
        self.bao.client().secrets.kv.v2.create_or_update_secret(KV_PATH, {"api_key": key})
        self.provider.rotate(key)
        return key

    def push(self) -> None:
        pushed = httpx.post(
            f"{self.broker.url}/v1/admin/credentials/openai-api-key/refresh",
            auth=("rotation-hook", SECRETS["ROTATION_HOOK_SECRET"]),
            timeout=10,
        )
        assert pushed.status_code == 200, pushed.text

    def openbao_reads(self) -> tuple[int, int]:
        """(data reads, metadata reads) of the provider key OpenBao has served so far."""
        reads = [
            e["request"]["path"]
            for e in self.bao.audit_entries("request")
            if e["request"].get("operation") == "read"  # not the test's own writes
        ]
        return reads.count(DATA_PATH), reads.count(METADATA_PATH)

    def agent(self) -> AgentClient:
        return AgentClient(self.broker.url, "triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])

    def agent_token(self, scope: str = "llm:openai:chat", person: str = "alice") -> str:
        with self.agent() as agent:
            token = agent.exchange(
                self.idp.mint(person), scope=scope, audience="llm-gateway"
            ).access_token
        issued_tokens.append(token)
        return token


def _seed(bao: OpenBaoServer) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret(KV_PATH, {"api_key": FIRST_KEY})


def _serve_gateway(broker_url: str, gateway_secret: str, provider_url: str) -> RunningServer:
    broker = GatewayClient(broker_url, "llm-gateway", gateway_secret)
    provider = httpx.Client(base_url=provider_url, timeout=10)
    return serve_in_thread(create_gateway_app(GatewayConfig(), broker, provider))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    handler = _Collect()
    root = logging.getLogger()
    previous = root.level
    mp = pytest.MonkeyPatch()
    for name, value in SECRETS.items():
        mp.setenv(name, value)
    try:
        with run_openbao() as bao, serve_idp() as (idp, _):
            bao.add_seeder(_seed)
            mp.setenv("TEST_VAULT_TOKEN", bao.root_token)
            # From here on every log line at INFO and above (DEBUG for the broker's and the
            # example's loggers) is kept for the canary scan.
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            logging.getLogger("broker").setLevel(logging.DEBUG)
            backends = [
                {
                    "name": "vault",
                    "kind": "vault",
                    "address": bao.address,
                    "auth": {"method": "token", "token_ref": "env:TEST_VAULT_TOKEN"},
                }
            ]
            with run_broker(
                tmp_path_factory.mktemp("example-gateway"),
                [oidc_provider_config(idp)],
                secret_backends=backends,
            ) as broker:
                provider = StandInProvider(FIRST_KEY)
                with serve_in_thread(provider.asgi_app()) as provider_server:
                    gateway_server = _serve_gateway(
                        broker.url, SECRETS["LLM_GATEWAY_SECRET"], provider_server.url
                    )
                    with gateway_server:
                        yield Stack(
                            bao, idp, broker, provider, provider_server, gateway_server, handler
                        )
    finally:
        root.removeHandler(handler)
        root.setLevel(previous)
        logging.getLogger("broker").setLevel(logging.NOTSET)
        mp.undo()


def _call(url: str, token: str | None, **kwargs: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]},
        headers=headers,
        timeout=10,
        **kwargs,
    )


@dataclass(frozen=True)
class LoadResult:
    statuses: dict[int, int]
    calls: int
    generations_seen: set[int]
    provider_rejected: int
    data_reads: int
    metadata_reads: int
    first_version: int


def _rotate_under_load(stack: Stack, token: str, *, push: bool, label: str) -> LoadResult:
    first_version = stack.kv_version()
    rejected_before = stack.provider.stats().rejected
    reads_before = stack.openbao_reads()
    statuses: dict[int, int] = {}
    generations: set[int] = set()
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []

    def agent_thread() -> None:
        try:
            with httpx.Client(
                base_url=stack.gateway_url,
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            ) as http:
                while not stop.is_set():
                    response = http.post(
                        "/v1/chat/completions",
                        json={"messages": [{"role": "user", "content": "summarise #4711"}]},
                    )
                    generation = (
                        response.json().get("key_generation")
                        if response.status_code == 200
                        else None
                    )
                    with lock:
                        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
                        if generation is not None:
                            generations.add(int(generation))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=agent_thread) for _ in range(AGENT_THREADS)]
    for thread in threads:
        thread.start()
    try:
        for n in range(ROTATIONS):
            time.sleep(ROTATION_GAP)
            stack.rotate(f"{label}-{n + 1}")
            if push:
                stack.push()
        time.sleep(ROTATION_GAP)
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert not errors, errors
    data_reads, metadata_reads = (
        after - before for after, before in zip(stack.openbao_reads(), reads_before, strict=True)
    )
    return LoadResult(
        statuses=statuses,
        calls=sum(statuses.values()),
        generations_seen=generations,
        provider_rejected=stack.provider.stats().rejected - rejected_before,
        data_reads=data_reads,
        metadata_reads=metadata_reads,
        first_version=first_version,
    )


def _report(label: str, result: LoadResult) -> None:
    print(  # shown with -s / in the -rA summary: the numbers the design promises
        f"\n[{label}] calls={result.calls} statuses={result.statuses} "
        f"provider_401s_absorbed={result.provider_rejected} "
        f"openbao_data_reads={result.data_reads} openbao_metadata_reads={result.metadata_reads}"
    )


# -- rotation ----------------------------------------------------------------------------------


def test_rotation_with_a_provider_that_revokes_at_once_loses_no_call(stack: Stack) -> None:
    token = stack.agent_token()
    warm = _call(stack.gateway_url, token)
    assert warm.status_code == 200, warm.text
    generation_before = stack.provider.stats().generation
    records_before = len(stack.broker.decisions.records)

    result = _rotate_under_load(stack, token, push=False, label="hint")
    _report("hint only", result)

    # Zero failed calls as the agents saw them, and plenty of them.
    assert result.statuses == {200: result.calls}
    assert result.calls >= 100
    # Every rotation's new key reached the provider (and was accepted there).
    provider = stack.provider.stats()
    assert provider.generation == generation_before + ROTATIONS
    expected_generations = set(range(generation_before, generation_before + ROTATIONS + 1))
    assert result.generations_seen == expected_generations
    assert all(provider.accepted_by_generation[g] > 0 for g in expected_generations)
    # The provider did refuse old keys: each refusal was absorbed by the client's one retry.
    assert result.provider_rejected >= ROTATIONS
    # OpenBao: one data read per rotation; version checks bounded by the hint rounds.
    assert result.data_reads == ROTATIONS
    assert ROTATIONS <= result.metadata_reads <= 2 * ROTATIONS

    records = stack.broker.decisions.records[records_before:]
    hinted = [r for r in records if r["event"] == "credential.fetch" and r.get("refresh_hint")]
    new_versions = [str(result.first_version + n) for n in range(1, ROTATIONS + 1)]
    refreshed = [r for r in hinted if r["hint_outcome"] == "refreshed"]
    assert [r["version"] for r in refreshed] == new_versions  # one backend round per rotation
    assert [r["rejected_version"] for r in refreshed] == [
        str(result.first_version + n) for n in range(ROTATIONS)
    ]
    assert {r["hint_outcome"] for r in hinted} <= {"refreshed", "joined", "not_current"}
    assert all(r["outcome"] == "granted" and r["gateway"] == "llm-gateway" for r in hinted)
    rotated = [
        (r["old_version"], r["new_version"])
        for r in records
        if r["event"] == "credential.rotated" and r.get("path") == KV_PATH
    ]
    assert rotated == list(
        zip([str(result.first_version), *new_versions[:-1]], new_versions, strict=True)
    )
    served = {r["version"] for r in records if r["event"] == "credential.fetch" and "version" in r}
    assert served == {str(result.first_version), *new_versions}
    stats = stack.broker.services.cache.stats()
    hint_refreshes = sum(s.hint_refreshes for ref, s in stats.items() if ref.path == KV_PATH)
    assert hint_refreshes >= ROTATIONS


def test_rotation_with_a_push_as_well_loses_no_call(stack: Stack) -> None:
    """With the rotation hook pushing right after the switch, the hint path and the push share
    the work: still no failed call, still one data read per rotation."""
    token = stack.agent_token()
    assert _call(stack.gateway_url, token).status_code == 200
    result = _rotate_under_load(stack, token, push=True, label="push")
    _report("hint and push", result)
    assert result.statuses == {200: result.calls} and result.calls >= 100
    assert len(result.generations_seen) == ROTATIONS + 1
    assert result.data_reads == ROTATIONS
    assert result.metadata_reads <= 3 * ROTATIONS


# -- refusals ----------------------------------------------------------------------------------

error_bodies: list[str] = []


def _refused(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    error_bodies.append(response.text + json.dumps(dict(response.headers)))
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and body["error_description"]
    assert response.headers["cache-control"] == "no-store"
    return body


def test_agent_token_refusals_map_to_rfc_6750_answers(stack: Stack) -> None:
    missing = _call(stack.gateway_url, None)
    _refused(missing, 401, "invalid_request")
    assert missing.headers["www-authenticate"] == 'Bearer realm="llm-gateway"'  # no error code

    garbage = _call(stack.gateway_url, "not-a-token")
    _refused(garbage, 401, "invalid_token")
    assert 'error="invalid_token"' in garbage.headers["www-authenticate"]

    basic = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions", auth=("agent", "pw"), json={}, timeout=10
    )
    _refused(basic, 401, "invalid_request")

    no_permission = stack.agent_token(scope="tickets:read")
    denied = _call(stack.gateway_url, no_permission)
    body = _refused(denied, 403, "insufficient_scope")
    assert "llm:openai:chat" in body["error_description"]
    assert 'error="insufficient_scope"' in denied.headers["www-authenticate"]

    # A revoked token (RFC 7009, by the agent itself): RFC 6750 calls it invalid_token.
    revoked = stack.agent_token(person="dave")
    assert _call(stack.gateway_url, revoked).status_code == 200
    answer = httpx.post(
        f"{stack.broker.url}/oauth2/revoke",
        data={"token": revoked},
        auth=("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]),
        timeout=10,
    )
    assert answer.status_code == 200, answer.text
    _refused(_call(stack.gateway_url, revoked), 401, "invalid_token")


def test_broker_outage_and_gateway_misconfiguration_are_5xx(stack: Stack) -> None:
    token = stack.agent_token()
    seen_before = stack.provider.stats()
    with serve_in_thread(lambda *_: None) as closed:  # a port that will be closed
        dead_broker = closed.url
    with _serve_gateway(dead_broker, SECRETS["LLM_GATEWAY_SECRET"], stack.provider_server.url) as g:
        down = _call(g.url, token)
        _refused(down, 503, "temporarily_unavailable")
        assert down.headers["retry-after"] == "1"
    with _serve_gateway(stack.broker.url, "wrong-gateway-secret", stack.provider_server.url) as g:
        _refused(_call(g.url, token), 500, "server_error")
    seen = stack.provider.stats()  # the provider never saw a call without a key
    assert (seen.accepted, seen.rejected) == (seen_before.accepted, seen_before.rejected)
    with _serve_gateway(stack.broker.url, SECRETS["LLM_GATEWAY_SECRET"], dead_broker) as g:
        _refused(_call(g.url, token), 502, "bad_gateway")


def test_a_provider_refusing_the_current_key_is_502_and_cannot_hammer_openbao(
    stack: Stack,
) -> None:
    """The provider refuses a key the store still serves (revoked out of band): each call gets
    one retry-less hint, the broker re-reads OpenBao at most once a second, the agent gets 502.
    """
    token = stack.agent_token()
    assert _call(stack.gateway_url, token).status_code == 200
    stack.provider.rotate(new_key("never-stored"))
    reads_before = stack.openbao_reads()
    started = time.monotonic()
    for _ in range(60):
        _refused(_call(stack.gateway_url, token), 502, "bad_gateway")
    elapsed = time.monotonic() - started
    data_reads, metadata_reads = (
        after - before for after, before in zip(stack.openbao_reads(), reads_before, strict=True)
    )
    assert data_reads == 0  # the version never changed
    assert 1 <= metadata_reads <= 2 * (int(elapsed) + 1)
    print(f"\n[refused key] 60 calls in {elapsed:.2f}s: openbao_metadata_reads={metadata_reads}")
    # Recovery: a real rotation after the interval is picked up by the next call's hint.
    time.sleep(1.1)
    stack.rotate("recovered")
    assert _call(stack.gateway_url, token).status_code == 200


def test_refusal_mapping_covers_every_broker_answer() -> None:
    cases = {
        ("invalid_token", 401): (401, "invalid_token"),
        ("insufficient_scope", 403): (403, "insufficient_scope"),
        ("access_denied", 403): (403, "access_denied"),
        ("too_many_requests", 429): (429, "too_many_requests"),
        ("temporarily_unavailable", 503): (503, "temporarily_unavailable"),
        ("not_found", 404): (503, "temporarily_unavailable"),
        ("server_error", 500): (503, "temporarily_unavailable"),
        ("invalid_client", 401): (500, "server_error"),
        ("invalid_request", 400): (500, "server_error"),
    }
    for (error, status), expected in cases.items():
        refusal = refusal_for(BrokerClientError(error, "d", status))
        assert (refusal.status, refusal.error) == expected, error
        if refusal.status in (429, 503):
            assert refusal.retry_after == 1.0


def test_the_broker_checks_the_hint_itself(stack: Stack) -> None:
    """The hint is a form member of the ordinary fetch: considered only once the gateway and the
    agent token passed every check, refused when malformed, recorded when used."""
    token = stack.agent_token()
    url = f"{stack.broker.url}/v1/credentials/openai-api-key"
    gateway = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])

    def fetch(form: dict[str, str], **kwargs: Any) -> httpx.Response:
        return httpx.post(url, data=form, auth=gateway, timeout=10, **kwargs)

    current = fetch({"token": token}).json()["version"]
    reads_before = stack.openbao_reads()
    stale = fetch({"token": token, "rejected_version": "1"})  # long replaced: from memory
    assert stale.status_code == 200 and stale.json()["version"] == current
    assert stack.openbao_reads() == reads_before
    record = stack.broker.decisions.records[-1]
    assert (record["refresh_hint"], record["rejected_version"], record["hint_outcome"]) == (
        True,
        "1",
        "not_current",
    )
    too_long = fetch({"token": token, "rejected_version": "9" * 200})
    assert too_long.status_code == 400 and too_long.json()["error"] == "invalid_request"
    previous = fetch({"token": token, "rejected_version": current}, params={"version": "previous"})
    assert previous.status_code == 400
    unauthenticated = httpx.post(
        url, data={"token": "not-a-token", "rejected_version": current}, auth=gateway, timeout=10
    )
    assert unauthenticated.status_code == 401
    assert stack.openbao_reads() == reads_before


# -- canaries (runs last) ----------------------------------------------------------------------


def test_no_key_or_token_in_gateway_logs_error_bodies_or_decision_records(stack: Stack) -> None:
    gateway_lines = [line for line in stack.logs.lines if "request_id=" in line]
    assert len(gateway_lines) > 100  # the gateway did log every call
    assert any("retried=1" in line for line in gateway_lines)
    assert len(error_bodies) >= 8
    dump = "\n".join([*stack.logs.lines, *error_bodies, json.dumps(stack.broker.decisions.records)])
    canaries = [*issued_keys, *issued_tokens, *SECRETS.values(), stack.bao.root_token]
    assert len(issued_keys) >= 2 * ROTATIONS + 2 and issued_tokens
    for canary in canaries:
        assert canary not in dump

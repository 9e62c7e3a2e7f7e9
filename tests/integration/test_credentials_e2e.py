"""Credentials per call, end to end: a real OpenBao and moto_server behind the broker's cache,
gateways fetching over HTTP while keys rotate and backends fail."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.clock import FrozenClock
from broker.tokens import Keyring, TokenIssuer
from broker.types import Provenance, TokenType
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    RunningBroker,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import MotoServer, OpenBaoServer, run_moto, run_openbao

CANARIES = {
    name: f"canary-{name}-{secrets.token_hex(12)}"
    for name in (
        "openai-v1",
        "openai-v2",
        "fast-v1",
        "fast-v2",
        "fast-v3",
        "cold",
        "aws-v1",
        "aws-load-v1",
        "aws-load-v2",
        "aws-v2",
    )
}
SECRETS = {
    name: generate_client_secret()
    for name in ("triage", "summariser", "gateway", "other-gateway", "hook", "coding")
}
AWS_SECRET_NAME = "prod/llm/anthropic"


def _seed(bao: OpenBaoServer) -> None:
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret("llm/openai", {"api_key": CANARIES["openai-v1"]})
    client.secrets.kv.v2.create_or_update_secret("llm/fast", {"api_key": CANARIES["fast-v1"]})
    client.secrets.kv.v2.create_or_update_secret("llm/cold", {"api_key": CANARIES["cold"]})


def _policy_extra() -> dict[str, Any]:
    def credential(path: str, **extra: Any) -> dict[str, Any]:
        return {
            "backend": "vault",
            "path": path,
            "field": "api_key",
            "requires": "llm:openai:chat",
            **extra,
        }

    return {
        "credentials": {
            "fast-key": credential(
                "llm/fast",
                refresh_interval_seconds=1,
                max_stale_seconds=3,
                previous_version_grace_seconds=30,
            ),
            "cold-key": credential("llm/cold"),
            "missing-key": credential("llm/does-not-exist"),
            "aws-load-key": {
                "backend": "aws",
                "path": "prod/llm/load",
                "field": "api_key",
                "requires": "llm:openai:chat",
                "refresh_interval_seconds": 60,
            },
            "aws-anthropic-key": {
                "backend": "aws",
                "path": AWS_SECRET_NAME,
                "field": "api_key",
                "requires": "llm:openai:chat",
                "refresh_interval_seconds": 1,
                "previous_version_grace_seconds": 60,
            },
        },
        "gateways": {
            "test-gateway": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRETS["gateway"], method="sha256"),
                },
                "audiences": ["llm-gateway"],
                "credentials": [
                    "aws-load-key",
                    "openai-api-key",
                    "fast-key",
                    "cold-key",
                    "missing-key",
                    "aws-anthropic-key",
                ],
            },
            "other-gateway": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRETS["other-gateway"], method="sha256"),
                },
                "audiences": ["other-gateway"],
                "credentials": ["openai-api-key"],
            },
        },
    }


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def all_logs(bao: OpenBaoServer, moto: MotoServer) -> Iterator[_Collect]:
    """Every log line of every logger at DEBUG from the broker's start to the module's end (the
    canary scan). It starts after the test's own seeding, whose SDK clients log at DEBUG."""
    handler = _Collect()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with run_openbao() as server:
        server.add_seeder(_seed)
        yield server


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with run_moto() as server:
        client = server.client()
        client.create_secret(
            Name=AWS_SECRET_NAME, SecretString=json.dumps({"api_key": CANARIES["aws-v1"]})
        )
        client.create_secret(
            Name="prod/llm/load", SecretString=json.dumps({"api_key": CANARIES["aws-load-v1"]})
        )
        yield server


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    bao: OpenBaoServer,
    moto: MotoServer,
    idp: DevIdentityProvider,
    all_logs: _Collect,
) -> Iterator[RunningBroker]:
    mp = pytest.MonkeyPatch()
    for key, value in moto.credentials_env.items():
        mp.setenv(key, value)
    mp.setenv("TEST_VAULT_TOKEN", bao.root_token)
    mp.setenv("TRIAGE_AGENT_SECRET", SECRETS["triage"])
    mp.setenv("CODING_AGENT_SECRET", SECRETS["coding"])
    mp.setenv("SUMMARISER_AGENT_SECRET", SECRETS["summariser"])
    mp.setenv("LLM_GATEWAY_SECRET", SECRETS["gateway"])
    mp.setenv("ROTATION_HOOK_SECRET", SECRETS["hook"])
    backends = [
        {
            "name": "vault",
            "kind": "vault",
            "address": bao.address,
            "auth": {"method": "token", "token_ref": "env:TEST_VAULT_TOKEN"},
        },
        {
            "name": "aws",
            "kind": "aws_secrets_manager",
            "endpoint_url": moto.endpoint_url,
            "region": moto.region,
        },
    ]
    try:
        with run_broker(
            tmp_path_factory.mktemp("credentials"),
            [oidc_provider_config(idp)],
            policy_extra=_policy_extra(),
            secret_backends=backends,
        ) as running:
            yield running
    finally:
        mp.undo()


def _agent_token(
    broker: RunningBroker,
    idp: DevIdentityProvider,
    *,
    scope: str,
    audience: str = "llm-gateway",
    person: str = "alice",
) -> str:
    response = httpx.post(
        broker.token_endpoint,
        data=exchange_form(idp.mint(person), scope=scope, audience=audience),
        auth=("triage-agent", SECRETS["triage"]),
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _fetch(
    broker: RunningBroker,
    name: str,
    token: str,
    *,
    gateway: tuple[str, str] | None = None,
    version: str | None = None,
    as_json: bool = False,
) -> httpx.Response:
    auth = gateway or ("test-gateway", SECRETS["gateway"])
    url = f"{broker.url}/v1/credentials/{name}"
    params = {"version": version} if version else None
    if as_json:
        return httpx.post(url, json={"token": token}, auth=auth, params=params, timeout=10)
    return httpx.post(url, data={"token": token}, auth=auth, params=params, timeout=10)


def _push(broker: RunningBroker, name: str) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/admin/credentials/{name}/refresh",
        auth=("rotation-hook", SECRETS["hook"]),
        timeout=10,
    )


@pytest.fixture(scope="module")
def llm_token(broker: RunningBroker, idp: DevIdentityProvider) -> str:
    return _agent_token(broker, idp, scope="llm:openai:chat")


# -- serving ---------------------------------------------------------------------------------


def test_gateway_fetches_the_credential_for_an_agent_call(
    broker: RunningBroker, llm_token: str
) -> None:
    response = _fetch(
        broker, "openai-api-key", llm_token, gateway=("llm-gateway", SECRETS["gateway"])
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["value"] == CANARIES["openai-v1"]
    assert body["version"] == "1"
    assert body["stale"] is False
    assert 0 < body["refresh_in"] <= 66
    assert body["served_for"] == {
        "sub": "dev/alice",
        "act": {"sub": "triage-agent"},
        "client_id": "triage-agent",
    }
    assert response.headers["cache-control"] == "no-store"
    as_json = _fetch(broker, "openai-api-key", llm_token, as_json=True)
    assert as_json.status_code == 200 and as_json.json()["value"] == CANARIES["openai-v1"]
    record = [r for r in broker.decisions.records if r["event"] == "credential.fetch"][-1]
    assert record["outcome"] == "granted" and record["version"] == "1"
    assert record["person"] == "dev/alice" and record["agent_chain"] == ["triage-agent"]
    assert record["gateway"] == "test-gateway" and record["credential"] == "openai-api-key"


def test_sub_agent_tokens_unlock_credentials_with_the_full_chain(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _agent_token(broker, idp, scope="llm:openai:chat")
    child = httpx.post(
        broker.token_endpoint,
        auth=("summariser-agent", SECRETS["summariser"]),
        data=exchange_form(
            parent,
            "urn:ietf:params:oauth:token-type:access_token",
            scope="llm:openai:chat",
            audience="llm-gateway",
        ),
    )
    assert child.status_code == 200, child.text
    body = _fetch(broker, "openai-api-key", child.json()["access_token"]).json()
    assert body["served_for"]["act"] == {"sub": "summariser-agent", "act": {"sub": "triage-agent"}}
    assert body["served_for"]["sub"] == "dev/alice"


def test_aws_secrets_manager_rotation_with_staging_labels(
    broker: RunningBroker, moto: MotoServer, llm_token: str
) -> None:
    first = _fetch(broker, "aws-anthropic-key", llm_token).json()
    assert first["value"] == CANARIES["aws-v1"] and first["stage"] == "AWSCURRENT"
    client = moto.client()
    # The four-step rotation: createSecret (AWSPENDING), setSecret, testSecret, finishSecret.
    pending = client.put_secret_value(
        SecretId=AWS_SECRET_NAME,
        SecretString=json.dumps({"api_key": CANARIES["aws-v2"]}),
        VersionStages=["AWSPENDING"],
        ClientRequestToken="a" * 32 + "-rotation",
    )["VersionId"]
    still_old = _fetch(broker, "aws-anthropic-key", llm_token).json()
    assert still_old["value"] == CANARIES["aws-v1"]  # AWSPENDING is not served
    client.update_secret_version_stage(
        SecretId=AWS_SECRET_NAME,
        VersionStage="AWSCURRENT",
        MoveToVersionId=pending,
        RemoveFromVersionId=first["version"],
    )
    assert _push(broker, "aws-anthropic-key").json()["version"] == pending
    after = _fetch(broker, "aws-anthropic-key", llm_token).json()
    assert after["value"] == CANARIES["aws-v2"] and after["version"] == pending
    previous = _fetch(broker, "aws-anthropic-key", llm_token, version="previous").json()
    assert previous["value"] == CANARIES["aws-v1"]


# -- refusals --------------------------------------------------------------------------------


def test_escalations_are_refused(
    broker: RunningBroker, idp: DevIdentityProvider, llm_token: str, tmp_path: Path
) -> None:
    no_permission = _agent_token(broker, idp, scope="tickets:read")
    response = _fetch(broker, "openai-api-key", no_permission)
    assert response.status_code == 403
    assert response.json()["error"] == "insufficient_scope"
    assert "'llm:openai:chat'" in response.json()["error_description"]

    wrong_audience = _agent_token(
        broker, idp, scope="tickets:read", audience="https://tickets.internal.example"
    )
    response = _fetch(broker, "openai-api-key", wrong_audience)
    assert response.status_code == 401 and response.json()["error"] == "invalid_token"

    other = _fetch(
        broker, "openai-api-key", llm_token, gateway=("other-gateway", SECRETS["other-gateway"])
    )
    assert other.status_code == 401  # the token is addressed to llm-gateway, not this one

    not_allowed = _fetch(broker, "fast-key", llm_token, gateway=("llm-gateway", SECRETS["gateway"]))
    unknown = _fetch(broker, "no-such-key", llm_token, gateway=("llm-gateway", SECRETS["gateway"]))
    assert not_allowed.status_code == unknown.status_code == 403
    assert not_allowed.json()["error"] == unknown.json()["error"] == "access_denied"

    missing = _fetch(broker, "missing-key", llm_token)
    assert missing.status_code == 404 and missing.json()["error"] == "not_found"

    foreign = TokenIssuer(
        Keyring(
            tmp_path / "foreign",
            algorithm="ES256",
            clock=FrozenClock(time.time()),
            publish_grace_seconds=60,
        ),
        broker.url,
        FrozenClock(time.time()),
    )
    provenance = Provenance(
        "dev", "alice", frozenset({"support"}), None, TokenType.ID_TOKEN, int(time.time()) + 600
    )
    kwargs: dict[str, Any] = {
        "provenance": provenance,
        "client_id": "triage-agent",
        "actor_chain": ("triage-agent",),
        "scopes": ("llm:openai:chat",),
        "audiences": ("llm-gateway",),
        "lifetime_seconds": 300,
        "policy_version": "x",
        "parent_jti": None,
    }
    forged = foreign.issue(**kwargs).token
    expired = (
        TokenIssuer(broker.services.keyring, broker.url, FrozenClock(time.time() - 7200))
        .issue(**kwargs)
        .token
    )
    for bad in (forged, expired, "not-a-token"):
        response = _fetch(broker, "openai-api-key", bad)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_token"

    bad_gateway = _fetch(broker, "openai-api-key", llm_token, gateway=("test-gateway", "wrong"))
    assert bad_gateway.status_code == 401 and bad_gateway.json()["error"] == "invalid_client"
    as_agent = _fetch(
        broker, "openai-api-key", llm_token, gateway=("triage-agent", SECRETS["triage"])
    )
    assert as_agent.status_code == 401
    no_token = httpx.post(
        f"{broker.url}/v1/credentials/openai-api-key", auth=("test-gateway", SECRETS["gateway"])
    )
    assert no_token.status_code == 400 and no_token.json()["error"] == "invalid_request"
    not_admin = httpx.post(
        f"{broker.url}/v1/admin/credentials/openai-api-key/refresh",
        auth=("test-gateway", SECRETS["gateway"]),
    )
    assert not_admin.status_code == 401


# -- rotation --------------------------------------------------------------------------------


def test_push_refresh_serves_the_new_version_at_once_and_previous_within_grace(
    broker: RunningBroker, bao: OpenBaoServer, llm_token: str
) -> None:
    assert _fetch(broker, "openai-api-key", llm_token).json()["version"] == "1"
    bao.client().secrets.kv.v2.create_or_update_secret(
        "llm/openai", {"api_key": CANARIES["openai-v2"]}
    )
    pushed = _push(broker, "openai-api-key")
    assert pushed.status_code == 200 and pushed.json()["version"] == "2"
    current = _fetch(broker, "openai-api-key", llm_token).json()
    assert current["value"] == CANARIES["openai-v2"] and current["version"] == "2"
    previous = _fetch(broker, "openai-api-key", llm_token, version="previous").json()
    assert previous["value"] == CANARIES["openai-v1"] and previous["version"] == "1"
    rotated = [
        r
        for r in broker.decisions.records
        if r["event"] == "credential.rotated" and r.get("path") == "llm/openai"
    ]
    assert rotated and rotated[-1]["old_version"] == "1" and rotated[-1]["new_version"] == "2"
    assert "openai-api-key" in rotated[-1]["credentials"]  # named as the policy serves it


def test_rotation_under_load_loses_no_fetch(
    broker: RunningBroker, bao: OpenBaoServer, llm_token: str
) -> None:
    assert _fetch(broker, "fast-key", llm_token).status_code == 200
    results: list[tuple[float, int, str]] = []
    rotated_at: list[float] = []

    async def fetcher(client: httpx.AsyncClient, stop: float) -> None:
        while time.monotonic() < stop:
            response = await client.post(
                f"{broker.url}/v1/credentials/fast-key",
                data={"token": llm_token},
                auth=("test-gateway", SECRETS["gateway"]),
            )
            value = response.json().get("value", "") if response.status_code == 200 else ""
            results.append((time.monotonic(), response.status_code, value))

    async def rotate() -> None:
        await asyncio.sleep(0.7)
        await asyncio.to_thread(
            bao.client().secrets.kv.v2.create_or_update_secret,
            "llm/fast",
            {"api_key": CANARIES["fast-v2"]},
        )
        rotated_at.append(time.monotonic())

    async def main() -> None:
        stop = time.monotonic() + 3.5
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(rotate(), *(fetcher(client, stop) for _ in range(16)))

    asyncio.run(main())
    assert results and all(status == 200 for _, status, _ in results)
    assert {value for _, _, value in results} == {CANARIES["fast-v1"], CANARIES["fast-v2"]}
    # without a push, the new version is served within one refresh interval (1 s, +10% jitter)
    late = [value for at, _, value in results if at > rotated_at[0] + 1.2]
    assert late and set(late) == {CANARIES["fast-v2"]}
    # and never the old one again once the new one was seen
    first_new = min(at for at, _, value in results if value == CANARIES["fast-v2"])
    assert all(value == CANARIES["fast-v2"] for at, _, value in results if at > first_new + 0.05)


def test_aws_four_step_rotation_under_load_with_a_push(
    broker: RunningBroker, moto: MotoServer, llm_token: str
) -> None:
    """The AWS rotation flow while 16 fetchers run: zero failures; after the push every fetch
    returns the new version (the refresh interval is 60 s, so only the push can explain it)."""
    first = _fetch(broker, "aws-load-key", llm_token).json()
    results: list[tuple[float, int, str]] = []
    pushed_at: list[float] = []

    def rotate_in_aws() -> None:
        client = moto.client()
        pending = client.put_secret_value(
            SecretId="prod/llm/load",
            SecretString=json.dumps({"api_key": CANARIES["aws-load-v2"]}),
            VersionStages=["AWSPENDING"],
            ClientRequestToken="b" * 32 + "-rotation",
        )["VersionId"]  # createSecret
        client.get_secret_value(SecretId="prod/llm/load", VersionStage="AWSPENDING")  # test
        client.update_secret_version_stage(  # finishSecret
            SecretId="prod/llm/load",
            VersionStage="AWSCURRENT",
            MoveToVersionId=pending,
            RemoveFromVersionId=first["version"],
        )

    async def fetcher(client: httpx.AsyncClient, stop: float) -> None:
        # At least `stop`, and on until half a second after the push (however slow the
        # machine makes the rotation), within a hard cap.
        cap = time.monotonic() + 30
        while time.monotonic() < cap and (
            time.monotonic() < stop or not pushed_at or time.monotonic() < pushed_at[0] + 0.5
        ):
            started = time.monotonic()
            response = await client.post(
                f"{broker.url}/v1/credentials/aws-load-key",
                data={"token": llm_token},
                auth=("test-gateway", SECRETS["gateway"]),
            )
            value = response.json().get("value", "") if response.status_code == 200 else ""
            results.append((started, response.status_code, value))

    async def rotate_and_push(client: httpx.AsyncClient) -> None:
        await asyncio.sleep(0.5)
        await asyncio.to_thread(rotate_in_aws)
        pushed = await client.post(
            f"{broker.url}/v1/admin/credentials/aws-load-key/refresh",
            auth=("rotation-hook", SECRETS["hook"]),
        )
        assert pushed.status_code == 200, pushed.text
        pushed_at.append(time.monotonic())

    async def main() -> None:
        stop = time.monotonic() + 2.5
        async with httpx.AsyncClient(timeout=10) as client:
            await asyncio.gather(
                rotate_and_push(client), *(fetcher(client, stop) for _ in range(16))
            )

    asyncio.run(main())
    assert results and all(status == 200 for _, status, _ in results)
    # every fetch sent after the push answered returns the new version
    after_push = [value for at, _, value in results if at > pushed_at[0]]
    assert after_push and set(after_push) == {CANARIES["aws-load-v2"]}
    assert any(value == CANARIES["aws-load-v1"] for _, _, value in results)


def test_single_flight_one_backend_read_for_100_cold_fetches(
    broker: RunningBroker, bao: OpenBaoServer, llm_token: str
) -> None:
    before = bao.request_paths().count("secret/data/llm/cold")

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=10) as client:
            return await asyncio.gather(
                *(
                    client.post(
                        f"{broker.url}/v1/credentials/cold-key",
                        data={"token": llm_token},
                        auth=("test-gateway", SECRETS["gateway"]),
                    )
                    for _ in range(100)
                )
            )

    responses = asyncio.run(main())
    assert all(r.status_code == 200 and r.json()["value"] == CANARIES["cold"] for r in responses)
    assert bao.request_paths().count("secret/data/llm/cold") - before == 1


def test_outage_serves_stale_until_max_stale_then_503_and_recovers(
    broker: RunningBroker, bao: OpenBaoServer, llm_token: str
) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret("llm/fast", {"api_key": CANARIES["fast-v3"]})
    assert _push(broker, "fast-key").status_code == 200
    bao.stop()
    try:
        deadline = time.monotonic() + 8
        statuses: list[int] = []
        stale_seen = False
        while time.monotonic() < deadline:
            response = _fetch(broker, "fast-key", llm_token)
            statuses.append(response.status_code)
            if response.status_code == 200:
                assert response.json()["value"] == CANARIES["fast-v3"]
                stale_seen = stale_seen or response.json()["stale"]
            else:
                assert response.status_code == 503
                body = response.json()
                assert body["error"] == "temporarily_unavailable"
                assert "fast-key" in body["error_description"]
                assert "unavailable" in body["error_description"]
                assert "retry-after" in response.headers
                break
            time.sleep(0.2)
        assert statuses[0] == 200 and stale_seen and statuses[-1] == 503
        push = _push(broker, "fast-key")
        assert push.status_code == 503
    finally:
        bao.start()  # same port, reseeded: fast-key is back at version 1 with fast-v1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        response = _fetch(broker, "fast-key", llm_token)
        if response.status_code == 200:
            break
        time.sleep(0.3)
    assert response.status_code == 200, response.text
    assert response.json()["value"] == CANARIES["fast-v1"]


def test_no_secret_value_in_any_record_log_or_error(
    broker: RunningBroker, all_logs: _Collect, llm_token: str
) -> None:
    """Runs last: scans every decision record and every log line of the whole module."""
    bad = _fetch(broker, "fast-key", "not-a-token")
    assert all(canary not in bad.text for canary in CANARIES.values())
    dump = json.dumps(broker.decisions.records) + "\n".join(all_logs.lines)
    assert len(all_logs.lines) > 0 and len(broker.decisions.records) > 50
    for canary in CANARIES.values():
        assert canary not in dump
    for secret in SECRETS.values():
        assert secret not in dump
    assert llm_token not in dump

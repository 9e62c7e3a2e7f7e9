"""Least privilege for the broker's own operators, against a real OpenBao and a test IdP.

- Admin clients hold only the permissions their policy entry lists: the example rotation hook
  (``credentials:refresh``) can push a refresh but neither revoke nor reload the policy; a
  security admin (``revocations:write``) can revoke but not refresh; an admin whose refreshes
  are limited to named credentials cannot refresh others; an admin listing nothing can do
  nothing. Every refusal is recorded.
- Push refreshes are coalesced: 100 concurrent pushes cause one or two OpenBao rounds.
- Error bodies never name a backend path.
- The broker files every request under its own request id; the caller's `X-Request-Id` is
  recorded apart (``client_request_id``), and only when well formed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
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
HOOK = ("rotation-hook", SECRETS["ROTATION_HOOK_SECRET"])
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
GATEWAY = ("test-gateway", generate_client_secret())
SECURITY = ("security-admin", generate_client_secret())
NARROW = ("narrow-hook", generate_client_secret())
NOTHING = ("idle-admin", generate_client_secret())
KV_PATH = "llm/openai"
DATA_PATH = f"secret/data/{KV_PATH}"
METADATA_PATH = f"secret/metadata/{KV_PATH}"
MISSING_PATH = "llm/nothing-stored-here"
STEADY_PATH = "llm/steady-never-rotated"


def _auth(secret: str) -> dict[str, str]:
    return {
        "method": "client_secret_basic",
        "secret_hash": hash_client_secret(secret, method="sha256"),
    }


def _policy_extra() -> dict[str, Any]:
    return {
        "admins": {
            SECURITY[0]: {
                "authentication": _auth(SECURITY[1]),
                "permissions": ["revocations:write"],
            },
            NARROW[0]: {
                "authentication": _auth(NARROW[1]),
                "permissions": ["credentials:refresh"],
                "credentials": ["anthropic-api-key"],
            },
            NOTHING[0]: {"authentication": _auth(NOTHING[1])},
        },
        "credentials": {
            "steady-key": {
                "backend": "vault",
                "path": STEADY_PATH,
                "field": "api_key",
                "requires": "llm:openai:chat",
                "previous_version_grace_seconds": 300,
            },
            "missing-key": {
                "backend": "vault",
                "path": MISSING_PATH,
                "field": "api_key",
                "requires": "llm:openai:chat",
            },
        },
        "gateways": {
            GATEWAY[0]: {
                "authentication": _auth(GATEWAY[1]),
                "audiences": ["llm-gateway"],
                "credentials": ["openai-api-key", "missing-key", "steady-key"],
            }
        },
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningBroker, DevIdentityProvider, OpenBaoServer]]:
    mp = pytest.MonkeyPatch()
    for name, value in SECRETS.items():
        mp.setenv(name, value)
    try:
        with run_openbao() as bao, serve_idp() as (idp, _):
            bao.client().secrets.kv.v2.create_or_update_secret(KV_PATH, {"api_key": "k1"})
            bao.client().secrets.kv.v2.create_or_update_secret(STEADY_PATH, {"api_key": "s1"})
            mp.setenv("TEST_VAULT_TOKEN", bao.root_token)
            backend = {
                "name": "vault",
                "kind": "vault",
                "address": bao.address,
                "auth": {"method": "token", "token_ref": "env:TEST_VAULT_TOKEN"},
            }
            with run_broker(
                tmp_path_factory.mktemp("operators"),
                [oidc_provider_config(idp)],
                policy_extra=_policy_extra(),
                secret_backends=[backend],
            ) as running:
                yield running, idp, bao
    finally:
        mp.undo()


def _post(
    running: RunningBroker, path: str, auth: tuple[str, str], **kwargs: Any
) -> httpx.Response:
    return httpx.post(f"{running.url}{path}", auth=auth, timeout=10, **kwargs)


def _agent_token(running: RunningBroker, idp: DevIdentityProvider) -> str:
    response = httpx.post(
        running.token_endpoint,
        data=exchange_form(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"),
        auth=TRIAGE,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _denials(running: RunningBroker, client_id: str) -> list[dict[str, Any]]:
    return [
        r
        for r in running.decisions.records
        if r["event"] == "request.denied" and r.get("client_id") == client_id
    ]


REFRESH = "/v1/admin/credentials/openai-api-key/refresh"
REVOKE = "/v1/admin/revocations"
RELOAD = "/v1/admin/policy/reload"


def test_a_rotation_hook_can_refresh_but_neither_revoke_nor_reload(
    stack: tuple[RunningBroker, DevIdentityProvider, OpenBaoServer],
) -> None:
    running, _, _ = stack
    assert _post(running, REFRESH, HOOK).status_code == 200
    revoke = _post(running, REVOKE, HOOK, json={"person": "dev/alice"})
    reload = _post(running, RELOAD, HOOK, json={})
    for response, permission in ((revoke, "revocations:write"), (reload, "policy:reload")):
        assert response.status_code == 403, response.text
        assert response.json()["error"] == "access_denied"
        assert permission in response.json()["error_description"]
    denied = _denials(running, HOOK[0])
    assert {r["route"] for r in denied} >= {REVOKE, RELOAD}
    assert {r["reason"] for r in denied} == {"admin_permission_missing"}
    # Nothing was revoked: alice's tokens still work.
    assert not [
        r for r in running.decisions.records if r["event"] == "token.revoked" and r["by"] == HOOK[0]
    ]


def test_each_admin_holds_only_what_it_lists(
    stack: tuple[RunningBroker, DevIdentityProvider, OpenBaoServer],
) -> None:
    running, _, _ = stack
    assert _post(running, REFRESH, SECURITY).status_code == 403
    assert _post(running, RELOAD, SECURITY, json={}).status_code == 403
    revoked = _post(running, REVOKE, SECURITY, json={"agent": "no-such-agent"})
    assert revoked.status_code == 200, revoked.text

    narrow = _post(running, REFRESH, NARROW)
    assert narrow.status_code == 403
    assert narrow.json()["error"] == "access_denied"
    assert _denials(running, NARROW[0])[-1]["reason"] == "admin_credential_not_allowed"
    assert _post(
        running, "/v1/admin/credentials/anthropic-api-key/refresh", NARROW
    ).status_code in {
        200,
        503,  # anthropic's key is not stored in this OpenBao: allowed, and then unavailable
    }

    for path, body in ((REFRESH, None), (REVOKE, {"person": "dev/alice"}), (RELOAD, {})):
        response = _post(running, path, NOTHING, json=body)
        assert response.status_code == 403, (path, response.text)
    assert len(_denials(running, NOTHING[0])) >= 3


def test_a_hundred_concurrent_pushes_cause_one_or_two_openbao_rounds(
    stack: tuple[RunningBroker, DevIdentityProvider, OpenBaoServer],
) -> None:
    running, _, bao = stack
    assert _post(running, REFRESH, HOOK).status_code == 200  # loaded
    bao.client().secrets.kv.v2.create_or_update_secret(KV_PATH, {"api_key": "k-rotated"})

    def reads() -> tuple[int, int]:
        paths = [
            e["request"]["path"]
            for e in bao.audit_entries("request")
            if e["request"].get("operation") == "read"
        ]
        return paths.count(DATA_PATH), paths.count(METADATA_PATH)

    data_before, metadata_before = reads()

    async def push_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(auth=HOOK, timeout=30) as client:
            return list(
                await asyncio.gather(*(client.post(f"{running.url}{REFRESH}") for _ in range(100)))
            )

    responses = asyncio.run(push_all())
    assert [r.status_code for r in responses] == [200] * 100
    versions = {r.json()["version"] for r in responses}
    assert len(versions) == 1  # every push saw the rotation
    data, metadata = reads()
    assert 1 <= data - data_before <= 2, (data - data_before, metadata - metadata_before)
    assert metadata - metadata_before <= 2


def test_error_bodies_never_name_a_backend_path(
    stack: tuple[RunningBroker, DevIdentityProvider, OpenBaoServer],
) -> None:
    running, idp, _ = stack
    token = _agent_token(running, idp)
    previous = _post(
        running,
        "/v1/credentials/steady-key",
        GATEWAY,
        data={"token": token},
        params={"version": "previous"},
    )
    missing = _post(running, "/v1/credentials/missing-key", GATEWAY, data={"token": token})
    for response in (previous, missing):
        assert response.status_code == 404, response.text
        for path in (KV_PATH, MISSING_PATH, STEADY_PATH, "llm/"):
            assert path not in response.text
        assert "vault:" not in response.text
    assert previous.json()["error_description"].startswith("credential 'steady-key'")
    assert missing.json()["error_description"].startswith("credential 'missing-key'")


def test_the_broker_files_requests_under_its_own_id(
    stack: tuple[RunningBroker, DevIdentityProvider, OpenBaoServer],
) -> None:
    running, _, _ = stack
    chosen = "trace-4bf92f3577b34da6"
    response = _post(running, REFRESH, HOOK, headers={"X-Request-Id": chosen})
    assert response.status_code == 200
    own = response.headers["x-request-id"]
    assert own != chosen and len(own) == 32
    records = [r for r in running.decisions.records if r.get("request_id") == own]
    assert records and all(r["client_request_id"] == chosen for r in records)
    assert not [r for r in running.decisions.records if r.get("request_id") == chosen]

    # A caller cannot pose as another request, nor smuggle text into the trail.
    for hostile in (own, "x" * 65, "tab\there", "a b", ""):
        response = _post(running, REFRESH, HOOK, headers={"X-Request-Id": hostile})
        got = response.headers["x-request-id"]
        assert got != hostile
        recorded = [r for r in running.decisions.records if r.get("request_id") == got]
        assert recorded
        expected = hostile if hostile == own else None  # a well-formed id is kept, apart
        assert all(r.get("client_request_id") == expected for r in recorded)

"""Policy hot reload on a real broker over HTTP: an edit on disk takes effect without a restart,
an invalid edit under load changes no decision and fails no request while /readyz reports it, a
fix resumes reloads, and admins can ask for a reload."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import yaml

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    TICKETS,
    RunningBroker,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)

AGENT = ("reload-agent", generate_client_secret())
ADMIN = ("reload-admin", generate_client_secret())
SCOPE = "tickets:read docs:read"
EXTRA_FILE = "zz-test-extra.yaml"


def _extra(*, docs_for_support: bool, description: str = "Reads the docs") -> dict[str, Any]:
    extra: dict[str, Any] = {
        "roles": {"docs-reader": {"description": description, "permissions": ["docs:read"]}},
        "agents": {
            AGENT[0]: {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(AGENT[1], method="sha256"),
                },
                "ceiling": ["tickets:read", "kb:read", "docs:read"],
                "default_scopes": ["tickets:read"],
                "audiences": [TICKETS],
                "act_for": ["group:dev/support"],
            }
        },
        "admins": {
            ADMIN[0]: {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(ADMIN[1], method="sha256"),
                },
                "permissions": ["policy:reload"],
            }
        },
    }
    if docs_for_support:
        extra["group_bindings"] = [{"idp": "dev", "group": "support", "roles": ["docs-reader"]}]
    return extra


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


def _broker(
    tmp_path: Path, idp: DevIdentityProvider, *, interval: float, docs_for_support: bool
) -> Any:
    return run_broker(
        tmp_path,
        [oidc_provider_config(idp)],
        policy_extra=_extra(docs_for_support=docs_for_support),
        lifespan=True,
        policy_reload_interval_seconds=interval,
    )


def _write_extra(broker: RunningBroker, content: dict[str, Any] | str) -> None:
    text = content if isinstance(content, str) else yaml.safe_dump(content)
    path = broker.policy_dir / EXTRA_FILE
    tmp = path.with_suffix(".tmp")  # not *.yaml: the watcher ignores it
    tmp.write_text(text)
    tmp.replace(path)  # atomic, as a deploy tool would write it


def _exchange(broker: RunningBroker, idp: DevIdentityProvider) -> httpx.Response:
    return httpx.post(
        broker.token_endpoint,
        data=exchange_form(idp.mint("alice"), scope=SCOPE),
        auth=AGENT,
        timeout=10,
    )


def _claims(response: httpx.Response) -> dict[str, Any]:
    return jwt.decode(response.json()["access_token"], options={"verify_signature": False})


def _readyz(broker: RunningBroker) -> dict[str, Any]:
    response = httpx.get(f"{broker.url}/readyz", timeout=5)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True
    return body["checks"]["policy"]


def _wait_for(condition: Any, timeout: float = 8.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_edit_on_disk_takes_effect_without_restart(
    tmp_path: Path, idp: DevIdentityProvider
) -> None:
    with _broker(tmp_path, idp, interval=0.2, docs_for_support=False) as broker:
        before = _exchange(broker, idp)
        assert before.status_code == 400 and before.json()["error"] == "invalid_scope"
        old_version = broker.services.policies.current().version

        _write_extra(broker, _extra(docs_for_support=True))
        started = time.monotonic()
        _wait_for(lambda: _exchange(broker, idp).status_code == 200, timeout=5)
        assert time.monotonic() - started < 5

        granted = _exchange(broker, idp)
        claims = _claims(granted)
        assert sorted(granted.json()["scope"].split()) == ["docs:read", "tickets:read"]
        new_version = broker.services.policies.current().version
        assert claims["policy_version"] == new_version != old_version
        assert _readyz(broker) == {"ok": True, "version": new_version, "last_error": None}
        loaded = [r for r in broker.decisions.records if r["event"] == "policy.loaded"]
        assert loaded[-1]["trigger"] == "watch"
        assert loaded[-1]["previous_version"] == old_version
        assert loaded[-1]["policy_version"] == new_version


async def _load(
    broker: RunningBroker, idp: DevIdentityProvider, stop_at: float, out: list[tuple]
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < stop_at:
            started = time.monotonic()
            response = await client.post(
                broker.token_endpoint,
                data=exchange_form(idp.mint("alice"), scope=SCOPE),
                auth=AGENT,
            )
            if response.status_code == 200:
                body = response.json()
                version = _claims(response)["policy_version"]
                out.append((started, 200, body["scope"], version))
            else:
                out.append((started, response.status_code, response.text, None))


async def _break_policy_during_load(broker: RunningBroker) -> float:
    """Write an invalid edit after a second of load; return when the broker has rejected it."""
    await asyncio.sleep(1.0)
    _write_extra(broker, "roles:\n  docs-reader: [unclosed\n")
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            policy = (await client.get(f"{broker.url}/readyz")).json()["checks"]["policy"]
            if policy["last_error"] is not None:
                return time.monotonic()
            await asyncio.sleep(0.05)


def test_invalid_edit_under_load_changes_nothing_and_a_fix_resumes(
    tmp_path: Path, idp: DevIdentityProvider
) -> None:
    with _broker(tmp_path, idp, interval=0.2, docs_for_support=True) as broker:
        serving = broker.services.policies.current().version
        results: list[tuple] = []

        async def main() -> float:
            stop_at = time.monotonic() + 4.0
            clients = [_load(broker, idp, stop_at, results) for _ in range(8)]
            rejected_at, *_ = await asyncio.gather(_break_policy_during_load(broker), *clients)
            return rejected_at

        rejected_at = asyncio.run(main())

        failures = [r for r in results if r[1] != 200]
        assert not failures, failures[:3]
        assert {(r[2], r[3]) for r in results} == {(SCOPE, serving)}
        after_rejection = [r for r in results if r[0] > rejected_at]
        assert len(results) > 100 and len(after_rejection) > 20

        policy = _readyz(broker)
        assert policy["ok"] is True and policy["version"] == serving
        error = policy["last_error"]
        assert error["serving_version"] == serving and error["trigger"] == "watch"
        assert error["attempted_version"] and error["attempted_version"] != serving
        assert any(p.startswith(f"{EXTRA_FILE}: cannot parse") for p in error["problems"])
        [rejected] = [r for r in broker.decisions.records if r["event"] == "policy.rejected"]
        assert rejected["policy_version"] == serving
        assert rejected["attempted_version"] == error["attempted_version"]

        # The fix (with a harmless change, so there is a new version) is picked up by itself.
        _write_extra(broker, _extra(docs_for_support=True, description="Reads the manuals"))
        _wait_for(lambda: broker.services.policies.current().version != serving)
        policy = _readyz(broker)
        assert policy["last_error"] is None and policy["version"] != serving
        response = _exchange(broker, idp)
        assert response.status_code == 200
        assert _claims(response)["policy_version"] == policy["version"]


def test_admin_reload_endpoint(tmp_path: Path, idp: DevIdentityProvider) -> None:
    # Polling off: only the admin call reloads.
    with _broker(tmp_path, idp, interval=0, docs_for_support=False) as broker:
        endpoint = f"{broker.url}/v1/admin/policy/reload"
        old_version = broker.services.policies.current().version
        _write_extra(broker, _extra(docs_for_support=True))
        time.sleep(0.3)
        assert broker.services.policies.current().version == old_version

        for auth in (None, AGENT, (ADMIN[0], "wrong-secret")):
            refused = httpx.post(endpoint, auth=auth)
            assert refused.status_code == 401, refused.text
            assert refused.json()["error"] == "invalid_client"
        assert broker.services.policies.current().version == old_version

        response = httpx.post(endpoint, auth=ADMIN)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["changed"] is True and body["previous_version"] == old_version
        assert body["version"] == broker.services.policies.current().version != old_version
        assert response.headers["cache-control"] == "no-store"
        assert _exchange(broker, idp).status_code == 200
        loaded = [r for r in broker.decisions.records if r["event"] == "policy.loaded"][-1]
        assert loaded["trigger"] == "admin" and loaded["by"] == ADMIN[0]

        again = httpx.post(endpoint, auth=ADMIN).json()
        assert again["changed"] is False and again["version"] == body["version"]

        # Bound to a role nobody defines: refused, named, and the previous version keeps serving.
        broken = _extra(docs_for_support=True)
        broken["group_bindings"][0]["roles"] = ["docs-wizard"]
        _write_extra(broker, broken)
        refused = httpx.post(endpoint, auth=ADMIN)
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == "invalid_policy"
        assert "unknown role 'docs-wizard'" in refused.json()["error_description"]
        assert broker.services.policies.current().version == body["version"]
        error = _readyz(broker)["last_error"]
        assert error["trigger"] == "admin" and error["serving_version"] == body["version"]
        rejected = [r for r in broker.decisions.records if r["event"] == "policy.rejected"][-1]
        assert rejected["by"] == ADMIN[0]
        assert _exchange(broker, idp).status_code == 200

"""Revocation over HTTP: RFC 7009 by the holder, admin revocation by token, person and agent,
cascading down delegation chains to introspection, re-exchange and credential fetches."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    RunningBroker,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import OpenBaoServer, run_openbao

SECRETS = {
    n: generate_client_secret()
    for n in ("triage", "summariser", "gateway", "tickets", "admin", "coding")
}
TRIAGE = ("triage-agent", SECRETS["triage"])
SUMMARISER = ("summariser-agent", SECRETS["summariser"])
GATEWAY = ("llm-gateway", SECRETS["gateway"])
TICKETS_API = ("tickets-api", SECRETS["tickets"])
ADMIN = ("security-admin", SECRETS["admin"])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, Any]]:
    mp = pytest.MonkeyPatch()
    for env, key in (
        ("TRIAGE_AGENT_SECRET", "triage"),
        ("SUMMARISER_AGENT_SECRET", "summariser"),
        ("LLM_GATEWAY_SECRET", "gateway"),
        ("TICKETS_API_SECRET", "tickets"),
        ("CODING_AGENT_SECRET", "coding"),
    ):
        mp.setenv(env, SECRETS[key])
    extra = {
        "admins": {
            "security-admin": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRETS["admin"], method="sha256"),
                },
                "permissions": ["revocations:write"],
            }
        }
    }
    try:
        with run_openbao() as bao, serve_idp() as (idp, _):
            _seed(bao)
            mp.setenv("TEST_VAULT_TOKEN", bao.root_token)
            backend = {
                "name": "vault",
                "kind": "vault",
                "address": bao.address,
                "auth": {"method": "token", "token_ref": "env:TEST_VAULT_TOKEN"},
            }
            with run_broker(
                tmp_path_factory.mktemp("revocation"),
                [oidc_provider_config(idp)],
                policy_extra=extra,
                secret_backends=[backend],
            ) as broker:
                yield broker, idp
    finally:
        mp.undo()


def _seed(bao: OpenBaoServer) -> None:
    bao.client().secrets.kv.v2.create_or_update_secret("llm/openai", {"api_key": "k"})


def _exchange(
    broker: RunningBroker,
    subject: str,
    auth: tuple[str, str],
    subject_type: str = "urn:ietf:params:oauth:token-type:id_token",
    **extra: str,
) -> httpx.Response:
    return httpx.post(
        broker.token_endpoint, data=exchange_form(subject, subject_type, **extra), auth=auth
    )


def _chain(
    broker: RunningBroker, idp: DevIdentityProvider, person: str = "alice"
) -> tuple[str, str]:
    agent = _exchange(broker, idp.mint(person), TRIAGE, scope="llm:openai:chat tickets:read")
    assert agent.status_code == 200, agent.text
    child = _exchange(
        broker,
        agent.json()["access_token"],
        SUMMARISER,
        ACCESS_TOKEN,
        scope="llm:openai:chat tickets:read",
    )
    assert child.status_code == 200, child.text
    return agent.json()["access_token"], child.json()["access_token"]


def _active(broker: RunningBroker, token: str) -> bool:
    body = httpx.post(
        f"{broker.url}/oauth2/introspect", data={"token": token}, auth=TICKETS_API
    ).json()
    return bool(body["active"])


def _fetch(broker: RunningBroker, token: str) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/credentials/openai-api-key", data={"token": token}, auth=GATEWAY
    )


def test_revoking_the_agent_token_cascades_to_the_sub_agent(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    broker, idp = stack
    agent, child = _chain(broker, idp)
    _, unrelated_child = _chain(broker, idp)  # the same person's other session
    assert _active(broker, child) and _fetch(broker, child).status_code == 200

    revoked = httpx.post(f"{broker.url}/oauth2/revoke", data={"token": agent}, auth=TRIAGE)
    assert revoked.status_code == 200

    assert not _active(broker, agent)
    assert not _active(broker, child)
    fetch = _fetch(broker, child)
    assert fetch.status_code == 401 and "revoked" in fetch.json()["error_description"]
    again = _exchange(broker, agent, SUMMARISER, ACCESS_TOKEN, scope="tickets:read")
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    # an unrelated token of the same person keeps working
    assert _active(broker, unrelated_child)
    assert _fetch(broker, unrelated_child).status_code == 200
    records = [r for r in broker.decisions.records if r["event"] == "token.revoked"]
    assert records and records[-1]["by"] == "triage-agent"


def test_only_an_agent_in_the_chain_may_revoke_and_invalid_tokens_are_not_an_error(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    broker, idp = stack
    agent, _ = _chain(broker, idp)
    stranger = httpx.post(
        f"{broker.url}/oauth2/revoke",
        data={"token": agent},
        auth=("coding-agent", SECRETS["coding"]),
    )
    assert stranger.status_code == 200  # as for garbage (RFC 7009): no oracle, no revocation
    assert _active(broker, agent)
    garbage = httpx.post(f"{broker.url}/oauth2/revoke", data={"token": "garbage"}, auth=TRIAGE)
    assert garbage.status_code == 200
    anonymous = httpx.post(f"{broker.url}/oauth2/revoke", data={"token": agent})
    assert anonymous.status_code == 401


def test_admin_revokes_everything_of_a_person_issued_before_now(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    broker, idp = stack
    agent, child = _chain(broker, idp, person="dave")
    _, alice_child = _chain(broker, idp, person="alice")
    time.sleep(1.05)  # tokens carry whole-second iat
    response = httpx.post(
        f"{broker.url}/v1/admin/revocations", json={"person": "dev/dave"}, auth=ADMIN
    )
    assert response.status_code == 200, response.text
    assert not _active(broker, agent) and not _active(broker, child)
    assert _active(broker, alice_child)
    time.sleep(1.05)
    fresh, _ = _chain(broker, idp, person="dave")  # issued after the revocation time
    assert _active(broker, fresh)


def test_admin_revokes_an_agent_and_by_token_id(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    broker, idp = stack
    agent, child = _chain(broker, idp)
    child_jti = httpx.post(
        f"{broker.url}/oauth2/introspect", data={"token": child}, auth=TICKETS_API
    ).json()["jti"]
    by_id = httpx.post(f"{broker.url}/v1/admin/revocations", data={"jti": child_jti}, auth=ADMIN)
    assert by_id.status_code == 200
    assert not _active(broker, child) and _active(broker, agent)

    time.sleep(1.05)
    by_agent = httpx.post(
        f"{broker.url}/v1/admin/revocations", json={"agent": "triage-agent"}, auth=ADMIN
    )
    assert by_agent.status_code == 200
    assert not _active(broker, agent)
    not_admin = httpx.post(f"{broker.url}/v1/admin/revocations", json={"agent": "x"}, auth=TRIAGE)
    assert not_admin.status_code == 401
    two = httpx.post(
        f"{broker.url}/v1/admin/revocations", json={"agent": "x", "person": "y"}, auth=ADMIN
    )
    assert two.status_code == 400

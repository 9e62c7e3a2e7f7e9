"""Approvals across replicas: two `broker serve` processes sharing one real Redis. An agent asks
at one replica, the approver decides at the other (the JSON API, with her own SSO token), the
agent redeems at the second and cannot redeem again at the first; a denial made at one replica
is what the other answers."""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import yaml

from broker.client_secrets import generate_client_secret
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    EXAMPLE_POLICIES,
    broker_process,
    exchange_form,
    oidc_provider_config,
    placeholder_vault,
    serve_idp,
    wait_until_serving,
)
from tests.support.servers import free_loopback_port, run_redis

TRIAGE_SECRET = generate_client_secret()
TRIAGE = ("triage-agent", TRIAGE_SECRET)
API_AUDIENCE = "broker-approvals"
TICKETS = "https://tickets.internal.example"
CIBA = "urn:openid:params:grant-type:ciba"


@dataclass
class Replicas:
    urls: tuple[str, str]
    idp: DevIdentityProvider


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    workdir = tmp_path_factory.mktemp("approval-replicas")
    policy_dir = workdir / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    with contextlib.ExitStack() as started:
        redis_server = started.enter_context(run_redis(workdir))
        idp, _ = started.enter_context(serve_idp())
        ports = (free_loopback_port(), free_loopback_port())
        issuer = f"http://127.0.0.1:{ports[0]}"  # one issuer, as behind a load balancer
        env = os.environ | {
            "TRIAGE_AGENT_SECRET": TRIAGE_SECRET,
            "SUMMARISER_AGENT_SECRET": generate_client_secret(),
        }
        provider = oidc_provider_config(idp)
        provider["audiences"] = [*provider["audiences"], API_AUDIENCE]
        for port in ports:
            config = workdir / f"broker-{port}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "issuer": issuer,
                        "policy_dir": str(policy_dir),
                        **placeholder_vault(workdir),
                        "signing_keys": {"directory": str(workdir / "keys")},
                        "identity_providers": [provider],
                        "state": {"kind": "redis", "url": redis_server.url},
                        "approvals": {"api_audiences": [API_AUDIENCE]},
                        "http": {"port": port},
                    }
                )
            )
            log = workdir / f"broker-{port}.log"
            process = started.enter_context(
                broker_process(["serve", "--config", str(config)], log, env)
            )
            wait_until_serving(f"http://127.0.0.1:{port}", process, log)
        yield Replicas((f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"), idp)


def ask(url: str, person_token: str) -> str:
    form = exchange_form(person_token, scope="tickets:read tickets:refund", audience=TICKETS)
    form.pop("grant_type")
    response = httpx.post(f"{url}/oauth2/bc-authorize", data=form, auth=TRIAGE, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["auth_req_id"])


def poll(url: str, auth_req_id: str) -> httpx.Response:
    return httpx.post(
        f"{url}/oauth2/token",
        data={"grant_type": CIBA, "auth_req_id": auth_req_id},
        auth=TRIAGE,
        timeout=10,
    )


def decide(url: str, bearer: str, approval_id: str, decision: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/approvals/{approval_id}/decision",
        json={"decision": decision},
        headers={"Authorization": f"Bearer {bearer}"},
        timeout=10,
    )


def pending(url: str, bearer: str) -> list[dict]:
    response = httpx.get(
        f"{url}/v1/approvals", headers={"Authorization": f"Bearer {bearer}"}, timeout=10
    )
    assert response.status_code == 200, response.text
    return list(response.json()["approvals"])


def test_ask_at_one_replica_approve_at_the_other_redeem_once(replicas: Replicas) -> None:
    a, b = replicas.urls
    carol = replicas.idp.mint(
        "carol", token_type="access_token", extra_claims={"aud": API_AUDIENCE}
    )
    auth_req_id = ask(a, replicas.idp.mint("dave"))
    assert poll(b, auth_req_id).json()["error"] == "authorization_pending"  # b knows of it

    [listed] = pending(b, carol)
    assert listed["id"] != auth_req_id  # approvers see the public reference only
    assert decide(b, carol, listed["id"], "approve").status_code == 200
    assert pending(a, carol) == []  # decided elsewhere: gone from every replica's list

    time.sleep(5.1)  # the poll interval, shared between replicas
    issued = poll(b, auth_req_id)
    assert issued.status_code == 200, issued.text
    time.sleep(5.1)
    assert poll(a, auth_req_id).json()["error"] == "invalid_grant"  # redeemed once, anywhere


def test_a_denial_at_one_replica_is_the_answer_at_the_other(replicas: Replicas) -> None:
    a, b = replicas.urls
    carol = replicas.idp.mint(
        "carol", token_type="access_token", extra_claims={"aud": API_AUDIENCE}
    )
    auth_req_id = ask(b, replicas.idp.mint("dave"))
    [listed] = pending(a, carol)
    assert decide(a, carol, listed["id"], "deny").status_code == 200
    assert decide(b, carol, listed["id"], "approve").status_code == 404  # already decided
    assert poll(b, auth_req_id).json()["error"] == "access_denied"

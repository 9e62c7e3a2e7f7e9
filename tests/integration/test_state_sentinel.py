"""Highly available shared state on Redis Sentinel, with real servers on loopback: a primary, two
replicas and three sentinels. The primary is killed while exchanges run: they answer 503 (never
500, never a wrong answer) until the sentinels promote the replica, and then 200 again within a
bounded time, with no restart. A revocation and a single-use DPoP proof acknowledged before the
failover (the broker waits for a replica's acknowledgement: `state.min_replica_acks`) are still
in force after it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker.dpop import DPoPKey
from tests.support.harness import (
    TICKETS,
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)
from tests.support.servers import run_sentinel_set

SECRETS = example_client_secrets()
RESUMED_WITHIN = 20.0
"""Seconds from the primary's death to exchanges answering again (README states 15 s)."""


def test_the_broker_follows_a_failover_and_keeps_what_was_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    triage = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
    gateway = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
    write_provider_keys(tmp_path / "keys.yaml", "sk-sentinel-test")
    with run_sentinel_set(tmp_path) as sentinels:
        state = {
            "kind": "redis",
            "sentinel": {"service_name": sentinels.service, "addresses": sentinels.addresses},
            "min_replica_acks": 1,
            "socket_timeout_seconds": 0.3,
            "connect_timeout_seconds": 0.3,
        }
        with run_example_stack(tmp_path, SECRETS, tmp_path / "keys.yaml", state=state) as (
            running,
            idp,
        ):

            def exchange(audience: str = TICKETS, **extra: Any) -> httpx.Response:
                scope = "llm:openai:chat" if audience == "llm-gateway" else "tickets:read"
                return httpx.post(
                    running.token_endpoint,
                    data=exchange_form(idp.mint("alice"), audience=audience, scope=scope),
                    auth=triage,
                    timeout=10,
                    **extra,
                )

            llm_token = exchange(audience="llm-gateway").json()["access_token"]

            def fetch() -> int:
                return httpx.post(
                    f"{running.url}/v1/credentials/openai-api-key",
                    data={"token": llm_token},
                    auth=gateway,
                    timeout=10,
                ).status_code

            def revoke_one() -> int:
                answer = exchange()
                if answer.status_code != 200:
                    return answer.status_code
                return httpx.post(
                    f"{running.url}/oauth2/revoke",
                    data={"token": answer.json()["access_token"]},
                    auth=triage,
                    timeout=10,
                ).status_code

            token = exchange().json()["access_token"]
            revoked = httpx.post(
                f"{running.url}/oauth2/revoke", data={"token": token}, auth=triage, timeout=10
            )
            assert revoked.status_code == 200  # acknowledged by the replica before this answer
            key = DPoPKey()
            proof = key.proof("POST", running.token_endpoint)
            assert exchange(headers={"DPoP": proof}).status_code == 200  # its jti is now used

            old_port = sentinels.primary.port
            sentinels.kill_primary()
            killed = time.monotonic()
            statuses: list[int] = []
            others: list[int] = []
            while time.monotonic() - killed < RESUMED_WITHIN:
                # Each proof's jti is a write the state store must take (and a replica
                # acknowledge): no answer remembered from before the failover can stand in.
                status = exchange(headers={"DPoP": key.proof("POST", running.token_endpoint)})
                status = status.status_code
                statuses.append(status)
                others += [fetch(), revoke_one()]  # fetches and revocations meanwhile
                if status == 200:
                    break
                time.sleep(0.2)
            resumed = time.monotonic() - killed
            assert statuses[-1] == 200, statuses
            assert set(statuses) <= {200, 503}, statuses  # never a 500, never a wrong answer
            assert set(others) <= {200, 503}, others
            assert 503 in statuses  # the failover was seen, not slept through
            assert fetch() == 200 and revoke_one() == 200
            assert sentinels.current_primary_port() not in (None, old_port)

            # What was acknowledged before the failover holds after it.
            seen = httpx.post(
                f"{running.url}/oauth2/introspect",
                data={"token": token},
                auth=("tickets-api", SECRETS["TICKETS_API_SECRET"]),
                timeout=10,
            )
            assert seen.json() == {"active": False}
            replayed = exchange(headers={"DPoP": proof})
            assert replayed.status_code == 400
            assert "used before" in replayed.json()["error_description"]
            print(f"\n[sentinel failover] resumed {resumed:.1f} s after the primary died")

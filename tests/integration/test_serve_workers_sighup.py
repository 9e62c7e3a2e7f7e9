"""`broker serve` with two workers: SIGHUP to the supervisor reloads the policy in every worker in
place (uvicorn alone would restart the workers: new processes, new audit chains, cold caches),
and a bad edit signalled the same way is refused by every worker while the old version serves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.harness import (
    EXAMPLE_POLICIES,
    broker_process,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    placeholder_vault,
    serve_idp,
    wait_until_serving,
)
from tests.support.servers import free_loopback_port, run_redis

SECRETS = example_client_secrets()
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])


def _records(trail: Path) -> list[dict[str, Any]]:
    if not trail.exists():
        return []
    return [json.loads(line) for line in trail.read_text().splitlines() if line.strip()]


def _wait_for(what: str, condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _lifetime(url: str, idp: Any) -> int:
    """`expires_in` of a triage-agent token (capped by its max_token_lifetime_seconds)."""
    response = httpx.post(
        f"{url}/oauth2/token",
        data=exchange_form(idp.mint("alice"), scope="tickets:read"),
        auth=TRIAGE,
        timeout=10,
    )
    assert response.status_code == 200, response.text
    return int(response.json()["expires_in"])


def test_sighup_reloads_every_worker_in_place(tmp_path: Path) -> None:
    policy_dir = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    trail = tmp_path / "audit.jsonl"
    with run_redis(tmp_path) as redis_server, serve_idp() as (idp, _):
        config = tmp_path / "broker.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "issuer": url,
                    "policy_dir": str(policy_dir),
                    **placeholder_vault(tmp_path),
                    "policy_reload_interval_seconds": 0,  # only SIGHUP reloads here
                    "signing_keys": {"directory": str(tmp_path / "keys")},
                    "identity_providers": [oidc_provider_config(idp)],
                    "http": {"port": port, "workers": 2},
                    "state": {"kind": "redis", "url": redis_server.url},
                    "audit": {"file": str(trail), "stdout": False},
                }
            )
        )
        log = tmp_path / "broker.log"
        env = os.environ | SECRETS
        with broker_process(["serve", "--config", str(config)], log, env) as supervisor:
            wait_until_serving(url, supervisor, log)

            def chains() -> dict[str, int]:
                return {
                    r["chain"]: r["pid"]
                    for r in _records(trail)
                    if r["event"] == "audit.chain_started"
                }

            _wait_for("two workers", lambda: len(chains()) == 2)
            workers = chains()
            assert supervisor.pid not in workers.values()  # the workers, not the supervisor
            assert _lifetime(url, idp) == 900

            agents_file = policy_dir / "agents.yaml"
            agents = yaml.safe_load(agents_file.read_text())
            agents["agents"]["triage-agent"]["max_token_lifetime_seconds"] = 120
            agents_file.write_text(yaml.safe_dump(agents))
            os.kill(supervisor.pid, signal.SIGHUP)

            def reloaded(event: str) -> set[str]:
                return {
                    r["chain"]
                    for r in _records(trail)
                    if r["event"] == event and r.get("trigger") == "sighup"
                }

            _wait_for("both workers reloading", lambda: reloaded("policy.loaded") == set(workers))
            assert chains() == workers  # same processes, same chains: nothing restarted
            assert {_lifetime(url, idp) for _ in range(12)} == {120}

            # A bad edit, signalled the same way: refused by both, the last good one serves.
            (policy_dir / "roles.yaml").write_text("roles: [unclosed\n")
            os.kill(supervisor.pid, signal.SIGHUP)
            _wait_for("both workers refusing", lambda: reloaded("policy.rejected") == set(workers))
            assert {_lifetime(url, idp) for _ in range(12)} == {120}
            assert chains() == workers
            assert supervisor.poll() is None

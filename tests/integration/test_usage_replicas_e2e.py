"""A deny budget holds across replicas: two `broker serve` processes share a real Redis, and many
concurrent fetch-and-report loops, spread over both, run against one budget until it refuses.

Each call costs exactly what a fetch reserves (the gateway reports the cost itself), so the
ledger's promise is exact: the calls admitted times their cost never exceed the amount (no
overspend), and every loop keeps being admitted until the amount is reached (no false refusal
while under budget): exactly amount / cost calls are admitted, all recorded once.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import threading
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import yaml
from typer.testing import CliRunner

from broker.audit import read_trail
from broker.cli import app
from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.focus import MANDATORY_1_2
from tests.support.focus import FocusValidator
from tests.support.harness import (
    EXAMPLE_POLICIES,
    broker_process,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    serve_idp,
    wait_until_serving,
    write_provider_keys,
)
from tests.support.servers import free_loopback_port, run_redis

SECRETS = example_client_secrets()
AGENT_SECRET = generate_client_secret()
AMOUNT = Decimal("1.00")
COST = Decimal("0.05")
LOOPS = 12
ATTEMPTS_PER_LOOP = 6


def _policy_extra() -> dict[str, Any]:
    return {
        "agents": {
            "spend-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(AGENT_SECRET, method="sha256"),
                },
                "ceiling": ["llm:openai:chat"],
                "audiences": ["llm-gateway"],
                "act_for": ["group:dev/support"],
                "cost_centre": "race-ops",
            }
        },
        "budgets": {
            "race-monthly": {
                "scope": {"cost_centre": "race-ops"},
                "period": "month",
                "amount": str(AMOUNT),
                "currency": "EUR",
                "action": "deny",
                "reserve_per_call": str(COST),
            }
        },
    }


@contextlib.contextmanager
def _replicas(workdir: Path) -> Iterator[tuple[tuple[str, str], Any, list[Path]]]:
    policy_dir = workdir / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    (policy_dir / "zz-race.yaml").write_text(yaml.safe_dump(_policy_extra()))
    write_provider_keys(workdir / "keys.yaml", "sk-race")
    env = os.environ | SECRETS
    with contextlib.ExitStack() as started:
        redis = started.enter_context(run_redis(workdir))
        idp, _ = started.enter_context(serve_idp())
        ports = (free_loopback_port(), free_loopback_port())
        issuer = f"http://127.0.0.1:{ports[0]}"
        audits = []
        for port in ports:
            audit = workdir / f"audit-{port}.jsonl"
            audits.append(audit)
            config = workdir / f"broker-{port}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "issuer": issuer,
                        "policy_dir": str(policy_dir),
                        "allow_development_components": True,
                        "secret_backends": [
                            {"name": "vault", "kind": "file", "path": str(workdir / "keys.yaml")}
                        ],
                        "signing_keys": {"directory": str(workdir / "keys")},
                        "identity_providers": [oidc_provider_config(idp)],
                        "state": {
                            "kind": "redis",
                            "url": redis.url,
                            "socket_timeout_seconds": 2.0,
                            "connect_timeout_seconds": 2.0,
                        },
                        "audit": {"file": str(audit)},
                        "http": {"port": port},
                    }
                )
            )
            log = workdir / f"broker-{port}.log"
            process = started.enter_context(
                broker_process(["serve", "--config", str(config)], log, env)
            )
            wait_until_serving(f"http://127.0.0.1:{port}", process, log)
        yield (f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}"), idp, audits


def test_one_deny_budget_across_two_replicas_is_never_overspent_nor_refused_early(
    tmp_path: Path,
) -> None:
    with _replicas(tmp_path) as (urls, idp, audits):
        token = httpx.post(
            f"{urls[0]}/oauth2/token",
            data=exchange_form(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"),
            auth=("spend-agent", AGENT_SECRET),
            timeout=10,
        ).json()["access_token"]
        gateway = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
        admitted: list[str] = []
        refusals: list[str] = []
        errors: list[BaseException] = []
        lock = threading.Lock()

        def loop(n: int) -> None:
            try:
                with httpx.Client(timeout=20) as http:
                    for attempt in range(ATTEMPTS_PER_LOOP):
                        url = urls[(n + attempt) % 2]  # alternate replicas
                        fetched = http.post(
                            f"{url}/v1/credentials/openai-api-key",
                            data={"token": token},
                            auth=gateway,
                        )
                        if fetched.status_code == 403:
                            with lock:
                                refusals.append(fetched.json()["error_description"])
                            continue
                        assert fetched.status_code == 200, fetched.text
                        call_id = f"race-{n}-{attempt}"
                        report = http.post(
                            f"{urls[(n + attempt + 1) % 2]}/v1/usage",  # the other replica
                            json={
                                "records": [
                                    {
                                        "call_id": call_id,
                                        "token": token,
                                        "usage_ref": fetched.json()["usage_ref"],
                                        "credential": "openai-api-key",
                                        "provider": "openai",
                                        "model": "gpt-4o-mini",
                                        "units": {"input_tokens": 10},
                                        "cost": {"amount": str(COST), "currency": "EUR"},
                                    }
                                ]
                            },
                            auth=gateway,
                        )
                        assert report.json()["results"][0]["outcome"] == "recorded", report.text
                        with lock:
                            admitted.append(call_id)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=loop, args=(n,)) for n in range(LOOPS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert not errors, errors

    # Exactly what fits: never more (no overspend), never fewer (no false refusal).
    assert len(admitted) == int(AMOUNT / COST), (len(admitted), refusals[:3])
    assert len(refusals) == LOOPS * ATTEMPTS_PER_LOOP - len(admitted)
    assert all("race-monthly" in text and "resets at" in text for text in refusals)
    recorded = [
        record
        for _, _, record, _ in read_trail(audits)
        if record is not None and record.get("event") == "usage.recorded"
    ]
    assert sorted(r["call_id"] for r in recorded) == sorted(admitted)
    assert sum(Decimal(r["cost"]) for r in recorded) == AMOUNT

    # What finance sees: the spend per cost centre, with its model mix, and the FOCUS export,
    # checked by the FinOps Foundation's own validator.
    runner = CliRunner()
    spent = runner.invoke(
        app,
        [
            "usage",
            "report",
            *map(str, audits),
            "--by",
            "cost_centre",
            "--measure",
            "spend",
            "--period",
            "month",
        ],
    )
    assert spent.exit_code == 0, spent.output
    assert "race-ops" in spent.output and "1.000000" in spent.output and " 20" in spent.output
    assert "openai/gpt-4o-mini 100 %" in spent.output
    exported = runner.invoke(app, ["usage", "report", *map(str, audits), "--format", "focus"])
    assert exported.exit_code == 0, exported.output
    focus_csv = tmp_path / "focus.csv"
    focus_csv.write_text(exported.output)
    header = exported.output.splitlines()[0].split(",")
    assert set(header) >= MANDATORY_1_2
    rows = list(csv.DictReader(io.StringIO(exported.output)))
    assert sum(Decimal(r["BilledCost"]) for r in rows) == AMOUNT
    assert {r["x_CostCentre"] for r in rows} == {"race-ops"}
    assert json.loads(rows[0]["Tags"])["broker/agent_chain"] == "spend-agent"
    checked = FocusValidator(tmp_path / "focus-venv").validate(focus_csv)
    assert "Validation succeeded" in checked.stdout, checked.stdout + checked.stderr

"""The audit trail of real `broker serve` processes configured with ``audit: {file: ...}``:
`broker audit verify | query` and `broker usage report` on it, and a broker killed with SIGKILL
under load has a verified record for every response a client received."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from broker.audit import verify_trail
from broker.cli import app
from broker.client_secrets import generate_client_secret
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    EXAMPLE_POLICIES,
    broker_process,
    exchange_form,
    oidc_provider_config,
    serve_idp,
    wait_until_serving,
)
from tests.support.servers import free_loopback_port

SECRETS = {
    "TRIAGE_AGENT_SECRET": generate_client_secret(),
    "SUMMARISER_AGENT_SECRET": generate_client_secret(),
    "CODING_AGENT_SECRET": generate_client_secret(),
    "LLM_GATEWAY_SECRET": generate_client_secret(),
}
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
SUMMARISER = ("summariser-agent", SECRETS["SUMMARISER_AGENT_SECRET"])
CODING = ("coding-agent", SECRETS["CODING_AGENT_SECRET"])
GATEWAY = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
CANARY = "sk-canary-" + uuid.uuid4().hex
runner = CliRunner()


@dataclass
class Broker:
    url: str
    process: subprocess.Popen[bytes]
    audit_file: Path
    policy_dir: Path


@contextmanager
def _broker_serve(workdir: Path, idp: DevIdentityProvider) -> Iterator[Broker]:
    """`broker serve` in a subprocess, its decisions going to an audit file (and stdout)."""
    policy_dir = workdir / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    agents_file = policy_dir / "agents.yaml"
    agents = yaml.safe_load(agents_file.read_text())
    agents["agents"]["triage-agent"]["cost_centre"] = "support-ops"  # an agent's own centre
    agents_file.write_text(yaml.safe_dump(agents))
    bindings_file = policy_dir / "bindings.yaml"
    bindings = yaml.safe_load(bindings_file.read_text())
    for binding in bindings["group_bindings"]:  # the coding agent's fetches: the person's group
        if binding["group"] == "engineering":
            binding["cost_centre"] = "engineering"
    bindings_file.write_text(yaml.safe_dump(bindings))
    secrets_file = workdir / "dev-secrets.yaml"
    secrets_file.write_text(
        yaml.safe_dump(
            {"llm/openai": {"api_key": CANARY}, "llm/anthropic": {"api_key": CANARY + "-a"}}
        )
    )
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    audit_file = workdir / "audit" / "decisions.jsonl"
    config = workdir / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": url,
                "policy_dir": str(policy_dir),
                "signing_keys": {"directory": str(workdir / "keys")},
                "identity_providers": [oidc_provider_config(idp)],
                "secret_backends": [{"name": "vault", "kind": "file", "path": str(secrets_file)}],
                "allow_development_components": True,
                "http": {"port": port},
                "audit": {"file": str(audit_file), "stdout": True},
            }
        )
    )
    log = workdir / "broker.log"
    with broker_process(["serve", "--config", str(config)], log, os.environ | SECRETS) as process:
        wait_until_serving(url, process, log)
        yield Broker(url, process, audit_file, policy_dir)


def _exchange(broker: Broker, form: dict[str, str], auth: tuple[str, str]) -> httpx.Response:
    return httpx.post(f"{broker.url}/oauth2/token", data=form, auth=auth, timeout=10)


def _token(broker: Broker, idp: DevIdentityProvider, person: str, agent: tuple[str, str]) -> str:
    form = exchange_form(idp.mint(person), scope="llm:openai:chat", audience="llm-gateway")
    response = _exchange(broker, form, agent)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _fetch(broker: Broker, name: str, token: str, request_id: str | None = None) -> httpx.Response:
    headers = {"X-Request-Id": request_id} if request_id else None
    return httpx.post(
        f"{broker.url}/v1/credentials/{name}",
        data={"token": token},
        auth=GATEWAY,
        headers=headers,
        timeout=10,
    )


@dataclass
class Trail:
    file: Path
    policy_dir: Path


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    """A known history: alice fetches openai 3 times via triage-agent (once through the
    summariser), bob twice via coding-agent; one fetch and one exchange are denied."""
    workdir = tmp_path_factory.mktemp("audit-cli")
    with serve_idp() as (idp, _), _broker_serve(workdir, idp) as broker:
        alice = _token(broker, idp, "alice", TRIAGE)
        for _ in range(2):
            assert _fetch(broker, "openai-api-key", alice).status_code == 200
        child = _exchange(
            broker,
            exchange_form(alice, ACCESS_TOKEN, scope="llm:openai:chat", audience="llm-gateway"),
            SUMMARISER,
        )
        assert child.status_code == 200, child.text
        fetched = _fetch(broker, "openai-api-key", child.json()["access_token"])
        assert fetched.status_code == 200, fetched.text
        assert _fetch(broker, "anthropic-api-key", alice).status_code == 403
        bob = _token(broker, idp, "bob", CODING)
        for _ in range(2):
            assert _fetch(broker, "openai-api-key", bob).status_code == 200
        assert _exchange(broker, exchange_form(idp.mint("erin")), TRIAGE).status_code in {
            400,
            403,
        }
        broker.process.send_signal(signal.SIGTERM)  # a clean stop: the file sink is closed
        assert broker.process.wait(timeout=10) in {0, -signal.SIGTERM}  # uvicorn re-raises it
        yield Trail(broker.audit_file, broker.policy_dir)


def _records(output: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_verify_accepts_the_broker_trail(trail: Trail) -> None:
    keys = trail.file.parent.parent / "keys"  # the broker's signing key directory
    result = runner.invoke(app, ["audit", "verify", str(trail.file), "--keys", str(keys)])
    assert result.exit_code == 0, result.output
    assert "intact" in result.output and "closed by the broker (signed)" in result.output
    assert CANARY not in trail.file.read_text()


def test_verify_names_the_line_and_seq_of_an_edit(trail: Trail, tmp_path: Path) -> None:
    lines = trail.file.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if '"outcome":"denied"' in line)
    edited = json.loads(lines[index]) | {"outcome": "granted"}
    lines[index] = json.dumps(edited) + "\n"
    tampered = tmp_path / "tampered.jsonl"
    tampered.write_text("".join(lines))
    result = runner.invoke(app, ["audit", "verify", str(trail.file), str(tampered)])
    assert result.exit_code == 1
    assert f"{tampered}:{index + 1} (chain {edited['chain']}, seq {edited['seq']})" in (
        result.output
    )
    assert "hash_mismatch" in result.output


def test_query_filters_by_person_credential_and_decision(trail: Trail) -> None:
    result = runner.invoke(
        app,
        [
            "audit", "query", str(trail.file), "--person", "dev/alice",
            "--credential", "openai-api-key", "--decision", "granted", "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = _records(result.output)
    assert len(records) == 3
    assert all(r["event"] == "credential.fetch" and r["gateway"] == "llm-gateway" for r in records)
    denied = _records(
        runner.invoke(
            app, ["audit", "query", str(trail.file), "--decision", "denied", "--json"]
        ).output
    )
    assert {(r["event"], r.get("reason")) for r in denied} >= {
        ("credential.fetch", "missing_permission")
    }
    assert any(r["event"] == "token.exchange" for r in denied)


def test_query_matches_an_agent_anywhere_in_the_chain(trail: Trail) -> None:
    args = ["audit", "query", str(trail.file), "--event", "credential.fetch", "--json"]
    summariser = _records(runner.invoke(app, [*args, "--agent", "summariser-agent"]).output)
    assert [r["agent_chain"] for r in summariser] == [["summariser-agent", "triage-agent"]]
    triage = _records(runner.invoke(app, [*args, "--agent", "triage-agent"]).output)
    assert len(triage) == 4  # 3 granted (one through the summariser) and 1 denied
    exchanges = _records(
        runner.invoke(
            app, ["audit", "query", str(trail.file), "--agent", "coding-agent", "--json"]
        ).output
    )
    assert {r["event"] for r in exchanges} == {"token.exchange", "credential.fetch"}


def test_query_filters_by_time(trail: Trail) -> None:
    now = datetime.now(UTC)
    base = ["audit", "query", str(trail.file), "--json"]
    later = (now + timedelta(hours=1)).isoformat()
    earlier = (now - timedelta(hours=1)).isoformat()
    assert _records(runner.invoke(app, [*base, "--since", later]).output) == []
    assert _records(runner.invoke(app, [*base, "--until", earlier]).output) == []
    everything = _records(runner.invoke(app, [*base, "--since", earlier]).output)
    assert len(everything) == len(trail.file.read_text().splitlines())
    bad = runner.invoke(app, [*base, "--since", "yesterday"])
    assert bad.exit_code == 1 and "ISO 8601" in bad.output


def test_usage_report_by_cost_centre_as_csv(trail: Trail) -> None:
    result = runner.invoke(
        app,
        [
            "usage", "report", str(trail.file), "--by", "cost_centre", "--period", "month",
            "--format", "csv", "--policy-dir", str(trail.policy_dir),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    fetches = [
        json.loads(line)
        for line in trail.file.read_text().splitlines()
        if '"credential.fetch"' in line and '"granted"' in line
    ]
    assert {(r["agent_chain"][-1], r["cost_centre"]) for r in fetches} == {
        ("triage-agent", "support-ops"),
        ("coding-agent", "engineering"),
    }  # chosen at fetch time and recorded
    month = datetime.now(UTC).strftime("%Y-%m")
    rows = list(csv.reader(io.StringIO(result.output)))
    assert rows == [
        ["month", "cost_centre", "fetches"],
        [month, "engineering", "2"],
        [month, "support-ops", "3"],
    ]


@pytest.mark.parametrize(
    ("by", "expected"),
    [
        ("person", {"dev/alice": 3, "dev/bob": 2}),
        ("agent", {"triage-agent": 3, "coding-agent": 2}),
        ("credential", {"openai-api-key": 5}),
    ],
)
def test_usage_report_table(trail: Trail, by: str, expected: dict[str, int]) -> None:
    result = runner.invoke(app, ["usage", "report", str(trail.file), "--by", by])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["day", by, "fetches"]
    day = datetime.now(UTC).strftime("%Y-%m-%d")
    assert {line.split()[1]: int(line.split()[2]) for line in lines[1:-1]} == expected
    assert all(line.split()[0] == day for line in lines[1:-1])
    assert lines[-1].split() == ["total", str(sum(expected.values()))]


def test_sigkill_under_load_loses_no_record_of_an_answered_request(tmp_path: Path) -> None:
    answered: dict[str, int] = {}  # request id -> status, for every response received
    lock = threading.Lock()
    stop = threading.Event()
    with serve_idp() as (idp, _), _broker_serve(tmp_path, idp) as broker:
        token = _token(broker, idp, "alice", TRIAGE)
        no_permission = _token(broker, idp, "dave", TRIAGE)

        def load(worker: int) -> None:
            with httpx.Client(timeout=5) as client:
                for n in range(100_000):
                    if stop.is_set():
                        return
                    request_id = f"load-{worker}-{n}"
                    name = "anthropic-api-key" if n % 4 == 3 else "openai-api-key"
                    try:
                        response = client.post(
                            f"{broker.url}/v1/credentials/{name}",
                            data={"token": no_permission if n % 5 == 4 else token},
                            auth=GATEWAY,
                            headers={"X-Request-Id": request_id},
                        )
                    except httpx.TransportError:
                        return  # the broker is gone
                    with lock:
                        answered[request_id] = response.status_code

        threads = [threading.Thread(target=load, args=(w,)) for w in range(6)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 20
        while len(answered) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
        broker.process.send_signal(signal.SIGKILL)  # mid-load, no chance to flush or close
        broker.process.wait(timeout=10)
        stop.set()
        for thread in threads:
            thread.join(timeout=10)
        assert broker.process.returncode == -signal.SIGKILL

    assert len(answered) >= 300
    assert {200, 403} <= set(answered.values())
    result = verify_trail([broker.audit_file])
    assert result.ok, result.summary()
    recorded = {
        r["client_request_id"]: r["outcome"]
        for r in map(json.loads, broker.audit_file.read_text().splitlines())
        if r["event"] == "credential.fetch"
        and str(r.get("client_request_id", "")).startswith("load-")
    }
    missing = sorted(set(answered) - set(recorded))
    assert not missing, f"{len(missing)} answered requests have no record, e.g. {missing[:5]}"
    for request_id, status in answered.items():
        assert recorded[request_id] == ("granted" if status == 200 else "denied"), request_id
    assert CANARY not in broker.audit_file.read_text()

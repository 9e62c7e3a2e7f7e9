"""`broker dev` and `broker serve` as real processes: the walkthrough works, production refuses
development components."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import yaml

from idp_adapters._loopback import reserve_loopback_socket
from tests.support.harness import (
    ACCESS_TOKEN,
    BROKER_COMMAND,
    ID_TOKEN,
    REPO,
    TICKETS,
    TOKEN_EXCHANGE,
    placeholder_vault,
    wait_until_serving,
)

BROKER = BROKER_COMMAND


def _free_port() -> int:
    sock = reserve_loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def dev_process(tmp_path: Path) -> Iterator[tuple[str, str, Path, Path]]:
    port, idp_port, bao_port = _free_port(), _free_port(), _free_port()
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{port}",
                "policy_dir": str(REPO / "policies"),
                "http": {"port": port},
                "dev_idp": {"port": idp_port},
                "dev_openbao": {"port": bao_port},
            }
        )
    )
    log = tmp_path / "dev.log"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_SECRET")}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [BROKER, "dev", "--config", str(config), "--state-dir", str(tmp_path / "state")],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        yield url, f"http://127.0.0.1:{idp_port}", tmp_path / "state", log
    finally:
        process.terminate()
        process.wait(timeout=10)
    # stopping `broker dev` stops everything it started: OpenBao and the IdP are gone too
    for stopped in (bao_port, idp_port):
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://127.0.0.1:{stopped}/", timeout=1)


def test_dev_walkthrough_runs_as_printed(dev_process: tuple[str, str, Path, Path]) -> None:
    url, idp_url, state, log = dev_process
    walkthrough = log.read_text()
    assert "DEVELOPMENT" in walkthrough
    assert f"curl -s -X POST {idp_url}/token -d person=alice" in walkthrough
    secrets = json.loads((state / "client-secrets.json").read_text())
    assert oct((state / "client-secrets.json").stat().st_mode & 0o777) == "0o600"
    assert secrets["TRIAGE_AGENT_SECRET"] in walkthrough  # the curl is printed ready to paste

    person = httpx.post(f"{idp_url}/token", data={"person": "alice"}).json()["id_token"]
    triage = ("triage-agent", secrets["TRIAGE_AGENT_SECRET"])
    response = httpx.post(
        f"{url}/oauth2/token",
        auth=triage,
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": person,
            "subject_token_type": ID_TOKEN,
            "scope": "tickets:read kb:read",
            "audience": TICKETS,
        },
    )
    assert response.status_code == 200, response.text
    agent_token = response.json()["access_token"]
    claims = jwt.decode(agent_token, options={"verify_signature": False})
    assert claims["sub"] == "dev/alice" and claims["act"] == {"sub": "triage-agent"}

    child = httpx.post(
        f"{url}/oauth2/token",
        auth=("summariser-agent", secrets["SUMMARISER_AGENT_SECRET"]),
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": agent_token,
            "subject_token_type": ACCESS_TOKEN,
            "scope": "tickets:read",
        },
    )
    assert child.status_code == 200, child.text

    # step 6: the gateway fetches the provider key for the agent's call
    llm_token = httpx.post(
        f"{url}/oauth2/token",
        auth=triage,
        data={
            "grant_type": TOKEN_EXCHANGE,
            "subject_token": person,
            "subject_token_type": ID_TOKEN,
            "scope": "llm:openai:chat",
            "audience": "llm-gateway",
        },
    ).json()["access_token"]
    gateway = ("llm-gateway", secrets["LLM_GATEWAY_SECRET"])
    fetch_url = f"{url}/v1/credentials/openai-api-key"
    first = httpx.post(fetch_url, auth=gateway, data={"token": llm_token})
    assert first.status_code == 200, first.text
    assert first.json()["value"].startswith("sk-demo-openai-")
    assert first.json()["served_for"]["sub"] == "dev/alice"

    # step 7: rotate in OpenBao, push the refresh, see the new version
    bao_token = re.search(r"BAO_TOKEN=(\S+)", walkthrough).group(1)  # type: ignore[union-attr]
    bao_addr = re.search(r"BAO_ADDR=(\S+)", walkthrough).group(1)  # type: ignore[union-attr]
    httpx.post(
        f"{bao_addr}/v1/secret/data/llm/openai",
        headers={"X-Vault-Token": bao_token},
        json={"data": {"api_key": "sk-rotated-demo"}},
    ).raise_for_status()
    hook = ("rotation-hook", secrets["ROTATION_HOOK_SECRET"])
    pushed = httpx.post(f"{url}/v1/admin/credentials/openai-api-key/refresh", auth=hook)
    assert pushed.status_code == 200, pushed.text
    second = httpx.post(fetch_url, auth=gateway, data={"token": llm_token}).json()
    assert second["value"] == "sk-rotated-demo"
    assert int(second["version"]) == int(first.json()["version"]) + 1

    decoded = subprocess.run(
        [BROKER, "token", "decode", agent_token], capture_output=True, text=True, check=True
    )
    assert '"sub": "dev/alice"' in decoded.stdout

    # decision records are printed as JSON lines, without the tokens
    time.sleep(0.2)
    lines = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and '"event"' in line
    ]
    assert any(r["event"] == "token.exchange" and r["outcome"] == "granted" for r in lines)
    assert person not in log.read_text() and agent_token not in log.read_text()


def test_dev_starts_without_lint_warnings_and_policy_check_agrees(
    dev_process: tuple[str, str, Path, Path],
) -> None:
    _, _, state, log = dev_process
    assert "policy lint" not in log.read_text()  # the shipped policy, as `make dev` runs it
    config = state.parent / "broker.yaml"
    for args in (["--dev", "--config", str(config)], ["--dir", str(REPO / "policies")]):
        checked = subprocess.run(
            [BROKER, "policy", "check", "--strict", *args], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stderr
        assert "warning" not in checked.stderr


def test_policy_check_dev_reports_what_broker_dev_logs(tmp_path: Path) -> None:
    """The same policy, with a warning, checked as `broker dev` would run it: `check --dev`
    prints exactly the warnings the dev broker's policy store logs at start."""
    from broker.app import build_services
    from broker.cli.serve import dev_settings

    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    agents = policies / "agents.yaml"
    agents.write_text(
        agents.read_text().replace(
            "    # workload_identities:\n    #   - {issuer: workloads,",
            "    workload_identities:\n      - {issuer: workloads,",
        )
    )
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"policy_dir": str(policies)}))
    services = build_services(dev_settings(config, tmp_path / "state"), decision_sinks=[])
    expected = list(services.policies.warnings)
    assert any("unknown workload issuer 'workloads'" in w for w in expected)
    checked = subprocess.run(
        [BROKER, "policy", "check", "--dev", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert [line.removeprefix("warning: ") for line in checked.stderr.splitlines()] == expected
    strict = subprocess.run(
        [BROKER, "policy", "check", "--strict", "--dev", "--config", str(config)],
        capture_output=True,
        text=True,
    )
    assert strict.returncode == 1


def test_serve_refuses_the_development_idp(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_dir": str(REPO / "policies"),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                "identity_providers": [
                    {
                        "name": "dev",
                        "kind": "dev",
                        "issuer": "http://127.0.0.1:1",
                        "client_ids": ["broker-dev"],
                    }
                ],
            }
        )
    )
    result = subprocess.run(
        [BROKER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "refuses" in result.stderr and "allow_development_components" in result.stderr
    assert "kind dev" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_refuses_an_invalid_policy_without_a_traceback(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "bad.yaml").write_text("roles:\n  x:\n    permissions: ['*']\n")
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_dir": str(policies),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                **placeholder_vault(tmp_path),
            }
        )
    )
    result = subprocess.run(
        [BROKER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "bad.yaml" in result.stderr and "Traceback" not in result.stderr


def test_serve_runs_with_environment_overrides(tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_dir": str(REPO / "policies"),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                **placeholder_vault(tmp_path),
            }
        )
    )
    env = os.environ | {"BROKER_ISSUER": f"http://127.0.0.1:{port}", "BROKER_HTTP__PORT": str(port)}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [BROKER, "serve", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        metadata = httpx.get(f"{url}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == url
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_serve_refuses_a_policy_whose_own_tests_fail(tmp_path: Path) -> None:
    policies = tmp_path / "policies"
    shutil.copytree(REPO / "policies", policies)
    tests_file = policies / "tests" / "example.yaml"
    tests_file.write_text(
        tests_file.read_text().replace(
            "expect_granted: [tickets:write]", "expect_error: invalid_scope", 1
        )
    )
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_dir": str(policies),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                **placeholder_vault(tmp_path),
            }
        )
    )
    result = subprocess.run(
        [BROKER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "policy test failed" in result.stderr and "Traceback" not in result.stderr


def test_serve_refuses_several_workers_with_memory_state(tmp_path: Path) -> None:
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {"policy_dir": str(REPO / "policies"), "signing_keys": {"directory": str(tmp_path)}}
        )
    )
    for args, env in (
        (["--workers", "2"], os.environ),
        ([], os.environ | {"BROKER_HTTP__WORKERS": "3"}),
    ):
        result = subprocess.run(
            [BROKER, "serve", "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 1, result.stderr
        assert "workers with state.kind: memory" in result.stderr
        assert "state.kind: redis" in result.stderr and "Traceback" not in result.stderr

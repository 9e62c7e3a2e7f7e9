"""`broker dev` and `broker serve` as real processes: the walkthrough works, production refuses
development components."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    broker_process,
    placeholder_vault,
    stop_process,
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
    with _dev(tmp_path) as (url, idp_url, _, state, log):
        yield url, idp_url, state, log


@contextmanager
def _dev(tmp_path: Path) -> Iterator[tuple[str, str, str, Path, Path]]:
    """`broker dev` on free ports, run from `tmp_path`: (broker, IdP, OpenBao, state dir, log)."""
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
            start_new_session=True,  # with its OpenBao: one group for stop_process
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        yield (
            url,
            f"http://127.0.0.1:{idp_port}",
            f"http://127.0.0.1:{bao_port}",
            tmp_path / "state",
            log,
        )
    finally:
        stop_process(process)
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
    from broker.cli.serve import dev_settings
    from broker.services import build_services

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
    with broker_process(["serve", "--config", str(config)], log, env) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        metadata = httpx.get(f"{url}/.well-known/oauth-authorization-server").json()
        assert metadata["issuer"] == url


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
            {
                "policy_dir": str(REPO / "policies"),
                "signing_keys": {"directory": str(tmp_path)},
                **placeholder_vault(tmp_path),
            }
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


# -- the walkthroughs, pasted into a fresh shell ------------------------------------------------


def _logical_lines(lines: list[str]) -> list[str]:
    """Shell commands: continuation lines joined, comments and blank lines dropped."""
    commands: list[str] = []
    pending = ""
    for raw in lines:
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, "a command ends with a continuation"
    return commands


def _printed_commands(walkthrough: str) -> list[str]:
    """The commands `broker dev` prints: the paragraphs indented by four spaces (prose
    paragraphs start with the step number)."""
    banner = walkthrough.split("=" * 78)[2]  # between the second and third rule
    paragraphs = [p for p in banner.split("\n\n") if p.strip()]
    blocks = [p for p in paragraphs if all(line.startswith("    ") for line in p.splitlines())]
    return _logical_lines([line for block in blocks for line in block.splitlines()])


def _readme_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    start = readme.index("```sh\n", readme.index("## Walkthrough (`make dev`)")) + len("```sh\n")
    return _logical_lines(readme[start : readme.index("```", start)].splitlines())


def _run_in_fresh_shell(commands: list[str], cwd: Path) -> list[tuple[str, int, str]]:
    """Every command, in order, in one new bash (no variables inherited from this process's
    walkthrough): (command, exit status, output)."""
    marker = "__exit_status__"
    script = "".join(f"{command}\nprintf '\\n{marker} %s\\n' $?\n" for command in commands)
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(cwd),
        "LANG": "C.UTF-8",
    }
    done = subprocess.run(
        ["bash", "--noprofile", "--norc"],
        input=script,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=120,
    )
    chunks = re.split(rf"\n?{marker} (\d+)\n", done.stdout)
    results = [
        (command, int(chunks[2 * i + 1]), chunks[2 * i]) for i, command in enumerate(commands)
    ]
    assert len(chunks) == 2 * len(commands) + 1, done.stdout + done.stderr
    return results


def _repository_view(tmp_path: Path) -> None:
    """`broker dev` runs from `tmp_path`: give it the repository's .venv and policies, so the
    commands meant for the repository root work there as pasted."""
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parent.parent)
    (tmp_path / "policies").symlink_to(REPO / "policies")


def _check_walkthrough(results: list[tuple[str, int, str]]) -> str:
    for command, status, output in results:
        expected = {0}
        if " audit verify " in command:
            expected = {0, 3}  # 3: the chain is open while the broker runs
        elif " policy explain " in command:
            expected = {2}  # the walkthrough explains a refusal: exit 2 is "denied"
        assert status in expected, f"{command!r} exited {status}:\n{output}"
        assert "Traceback" not in output, f"{command!r}:\n{output}"
        if '"error"' in output:  # only the refusals the walkthrough shows on purpose
            assert "invalid_scope" in output or "authorization_pending" in output, (
                f"{command!r}:\n{output}"
            )
    return "\n".join(output for _, _, output in results)


def test_the_printed_walkthrough_works_pasted_into_a_fresh_shell(tmp_path: Path) -> None:
    _repository_view(tmp_path)
    with _dev(tmp_path) as (_, _, _, state, log):
        commands = _printed_commands(log.read_text())
        assert len(commands) >= 15, commands
        output = _check_walkthrough(_run_in_fresh_shell(commands, tmp_path))
    assert '"sub": "dev/alice"' in output  # token decode
    assert '"value": "sk-demo-openai-' in output.replace('":"', '": "')  # the fetch
    assert "invalid_scope" in output  # step 5's refusal
    assert "triage-agent" in output and "fetches" in output  # usage report
    assert "/oauth2/bc-authorize" in output  # step 9: the refusal names where to ask
    assert '"approved_by": [' in output and "dev/carol" in output  # step 11's token
    assert '"typ": "oauth-id-jag+jwt"' in output  # step 12: the ID-JAG decoded...
    assert '"token_type":"Bearer"' in output.replace('": "', '":"')  # ...and redeemed
    assert "token_type DPoP, bound to cnf.jkt" in output  # step 13
    assert "the token alone (a stolen copy): refused, invalid_dpop_proof" in output
    assert "the same proof again (a replay): refused, invalid_dpop_proof" in output
    assert '"outcome":"recorded"' in output.replace('": "', '":"')  # step 14: usage reported
    assert "triage-agent" in output and "USD" in output and "0.000360" in output  # its spend
    assert "| AI and Machine Learning | openai/gpt-4o-mini | dev/alice | triage-agent" in output
    assert output.count("served") >= 3 and "budget 'dave-daily'" in output  # step 15
    assert "this fetch would be refused: person dev/dave has spent 100 %" in output
    assert (state / "audit.jsonl").stat().st_size > 0


def test_the_readme_walkthrough_works_pasted_into_a_fresh_shell(tmp_path: Path) -> None:
    _repository_view(tmp_path)
    with _dev(tmp_path) as (url, idp_url, bao_url, state, _):
        (tmp_path / "var").mkdir()
        (tmp_path / "var" / "dev").symlink_to(state)  # --state-dir var/dev, as `make dev`
        commands = [
            command.replace("http://127.0.0.1:8080", url)
            .replace("http://127.0.0.1:8081", idp_url)
            .replace("http://127.0.0.1:8200", bao_url)
            for command in _readme_commands()
        ]
        output = _check_walkthrough(_run_in_fresh_shell(commands, tmp_path))
    assert '"sub": "dev/alice"' in output
    assert "sk-demo-openai-" in output
    assert "triage-agent" in output  # usage report by agent
    assert '"approved_by": [' in output and "dev/carol" in output  # step 9's token
    assert '"issued_token_type":"urn:ietf:params:oauth:token-type:access_token"' in (
        output.replace('": "', '":"')
    )  # step 10: the ID-JAG redeemed
    assert "the same proof again (a replay): refused, invalid_dpop_proof" in output  # step 11
    assert "triage-agent" in output and "0.000360" in output  # step 12: the month's spend
    assert (tmp_path / "var" / "dev" / "focus.csv").read_text().startswith("AvailabilityZone,")
    assert output.count("served") >= 3 and "budget 'dave-daily'" in output  # step 13


def test_dev_writes_the_audit_file_and_honours_overrides(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trail = tmp_path / "elsewhere" / "trail.jsonl"
    keys = tmp_path / "elsewhere-keys"
    monkeypatch.setenv("BROKER_AUDIT__FILE", str(trail))
    monkeypatch.setenv("BROKER_SIGNING_KEYS__DIRECTORY", str(keys))
    with _dev(tmp_path) as (url, _, _, state, log):
        assert httpx.get(f"{url}/.well-known/jwks.json").status_code == 200
        assert str(trail) in log.read_text() and str(keys) in log.read_text()
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    assert records[0]["event"] == "audit.chain_started"
    assert not (state / "audit.jsonl").exists() and not (state / "keys").exists()
    assert any(keys.glob("*.key.json"))


@pytest.mark.parametrize("busy", ["http.port", "dev_idp.port", "dev_openbao.port"])
def test_dev_names_a_busy_port_in_one_line(tmp_path: Path, busy: str) -> None:
    ports = {"http.port": _free_port(), "dev_idp.port": _free_port()}
    ports["dev_openbao.port"] = _free_port()
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{ports['http.port']}",
                "policy_dir": str(REPO / "policies"),
                "http": {"port": ports["http.port"]},
                "dev_idp": {"port": ports["dev_idp.port"]},
                "dev_openbao": {"port": ports["dev_openbao.port"]},
            }
        )
    )
    holder = reserve_loopback_socket(port=ports[busy])
    holder.listen()
    try:
        result = subprocess.run(
            [BROKER, "dev", "--config", str(config), "--state-dir", str(tmp_path / "state")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
    finally:
        holder.close()
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"127.0.0.1:{ports[busy]}" in lines[0] and busy in lines[0]
    assert "Traceback" not in result.stdout + result.stderr
    assert "DEVELOPMENT MODE" not in result.stdout  # nothing was started


def test_serve_names_a_busy_port_in_one_line(tmp_path: Path) -> None:
    holder = reserve_loopback_socket()
    holder.listen()
    port = holder.getsockname()[1]
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "policy_dir": str(REPO / "policies"),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                "http": {"port": port},
                **placeholder_vault(tmp_path),
            }
        )
    )
    try:
        result = subprocess.run(
            [BROKER, "serve", "--config", str(config)], capture_output=True, text=True, timeout=60
        )
    finally:
        holder.close()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use"
    ]


def test_serve_believes_x_forwarded_for_only_through_trusted_proxies(tmp_path: Path) -> None:
    """uvicorn's proxy-headers middleware is off under `broker serve`: a local caller's
    X-Forwarded-For is not its address unless `http.trusted_proxies` says to believe it."""
    port = _free_port()
    config = tmp_path / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": f"http://127.0.0.1:{port}",
                "http": {"port": port},
                "policy_dir": str(REPO / "policies"),
                "signing_keys": {"directory": str(tmp_path / "keys")},
                **placeholder_vault(tmp_path),
            }
        )
    )
    log = tmp_path / "serve.log"
    with broker_process(["serve", "--config", str(config)], log, dict(os.environ)) as process:
        url = f"http://127.0.0.1:{port}"
        wait_until_serving(url, process, log)
        refused = httpx.post(
            f"{url}/oauth2/token",
            data={"grant_type": "client_credentials"},
            auth=("triage-agent", "not-the-secret"),
            headers={"X-Forwarded-For": "203.0.113.7"},
        )
        assert refused.status_code == 401
        request_id = refused.headers["x-request-id"]
        deadline = time.monotonic() + 10
        while request_id not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
    records = [
        json.loads(line)
        for line in log.read_text().splitlines()
        if line.startswith("{") and request_id in line
    ]
    denied = [r for r in records if r.get("event") == "request.denied"]
    assert denied and denied[0]["source"] == "127.0.0.1", records
    assert "203.0.113.7" not in log.read_text()

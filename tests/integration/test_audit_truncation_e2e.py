"""Truncation of the audit trail is found: real `broker serve` processes write the trail to a file
and to S3 Object Lock copies (moto_server over HTTP), signing checkpoints and a closing record
with the broker's token signing key. `broker audit verify` says intact only for chains the broker
closed; cutting lines off the end or forging a new end is never intact; a crash is reported open
with the seq the signed checkpoints vouch for; the S3 copies reveal what the file alone cannot."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import ec
from typer.testing import CliRunner, Result

from broker.audit import CHECKPOINT_TYP, chained_line
from broker.cli import app
from tests.support.harness import (
    EXAMPLE_POLICIES,
    broker_process,
    example_client_secrets,
    wait_until_serving,
)
from tests.support.servers import MotoServer, free_loopback_port, run_moto

SECRETS = example_client_secrets()
GATEWAY = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
runner = CliRunner()


@dataclass
class Setup:
    workdir: Path
    config: Path
    audit_file: Path
    keys: Path
    bucket: str
    moto: MotoServer
    url: str

    def s3_options(self) -> list[str]:
        return ["--s3-bucket", self.bucket, "--s3-endpoint-url", self.moto.endpoint_url]


def _setup(workdir: Path, moto: MotoServer) -> Setup:
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    boto3.session.Session(
        aws_access_key_id=moto.access_key_id,
        aws_secret_access_key=moto.secret_access_key,
        region_name=moto.region,
    ).client("s3", endpoint_url=moto.endpoint_url).create_bucket(
        Bucket=bucket, ObjectLockEnabledForBucket=True
    )
    policy_dir = workdir / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    secrets_file = workdir / "dev-secrets.yaml"
    secrets_file.write_text(yaml.safe_dump({"llm/openai": {"api_key": "sk-x"}}))
    port = free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    audit_file = workdir / "audit" / "decisions.jsonl"
    config = workdir / "broker.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "issuer": url,
                "policy_dir": str(policy_dir),
                "signing_keys": {"directory": str(workdir / "keys"), "algorithm": "ES256"},
                "secret_backends": [{"name": "vault", "kind": "file", "path": str(secrets_file)}],
                "allow_development_components": True,
                "http": {"port": port},
                "audit": {
                    "file": str(audit_file),
                    "stdout": False,
                    "checkpoint_every_records": 5,
                    "checkpoint_interval_seconds": 0.3,
                    "s3": {
                        "bucket": bucket,
                        "endpoint_url": moto.endpoint_url,
                        "region": moto.region,
                        "batch_size": 1000,
                        "batch_age_seconds": 0.2,
                    },
                },
            }
        )
    )
    return Setup(workdir, config, audit_file, workdir / "keys", bucket, moto, url)


@contextmanager
def _serve(setup: Setup) -> Iterator[subprocess.Popen[bytes]]:
    log = setup.workdir / f"broker-{uuid.uuid4().hex[:6]}.log"
    env = os.environ | SECRETS | setup.moto.credentials_env
    with broker_process(["serve", "--config", str(setup.config)], log, env) as process:
        wait_until_serving(setup.url, process, log)
        yield process


def _requests(setup: Setup, count: int) -> None:
    """Decisions for the trail: denied fetches (a gateway with a bogus agent token) and refused
    unauthenticated calls."""
    with httpx.Client(timeout=10) as client:
        for n in range(count):
            auth = GATEWAY if n % 2 else None
            response = client.post(
                f"{setup.url}/v1/credentials/openai-api-key", data={"token": "bogus"}, auth=auth
            )
            assert response.status_code in {400, 401}, response.text


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)  # a clean stop: the lifespan closes the chain
    assert process.wait(timeout=15) in {0, -signal.SIGTERM}


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in _lines(path)]


def _verify(*args: str) -> Result:
    return runner.invoke(app, ["audit", "verify", *args])


def _verdict(result: Result) -> str:
    return result.output.splitlines()[0]


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with run_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """`broker audit verify` reads the S3 copies with the standard AWS chain."""
    for name, value in moto.credentials_env.items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Iterator[Setup]:
    """Two clean runs of the broker on one file: chain A, then chain B, both closed."""
    setup = _setup(tmp_path_factory.mktemp("audit-trunc"), moto)
    with _serve(setup) as process:
        _requests(setup, 7)
        _stop(process)
    with _serve(setup) as process:
        _requests(setup, 12)
        jwks = httpx.get(f"{setup.url}/.well-known/jwks.json", timeout=10)
        (setup.workdir / "published.jwks.json").write_bytes(jwks.content)
        _stop(process)
    yield setup


def _copy_without_last(setup: Setup, tmp_path: Path, count: int) -> Path:
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(_lines(setup.audit_file)[:-count]))
    return cut


def test_a_clean_shutdown_verifies_intact(two_runs: Setup) -> None:
    records = _records(two_runs.audit_file)
    chains = list(dict.fromkeys(r["chain"] for r in records))
    assert len(chains) == 2
    closing = [r for r in records if r["event"] == "audit.chain_closed"]
    assert [r["chain"] for r in closing] == chains  # each run closed its own chain
    checkpoints = [r for r in records if r["event"] == "audit.checkpoint"]
    assert checkpoints and all(r["signature"].count(".") == 2 for r in checkpoints)
    for keys in (str(two_runs.keys), str(two_runs.workdir / "published.jwks.json")):
        result = _verify(str(two_runs.audit_file), "--keys", keys)
        assert result.exit_code == 0, result.output
        assert _verdict(result).endswith(": intact")
    with_copies = _verify(str(two_runs.audit_file), "--config", str(two_runs.config))
    assert with_copies.exit_code == 0, with_copies.output
    assert "compared with" in _verdict(with_copies)
    unsigned = _verify(str(two_runs.audit_file))  # without keys nothing can be vouched for
    assert unsigned.exit_code == 3 and "intact" not in _verdict(unsigned)


@pytest.mark.parametrize("count", [1, 3, 10])
def test_cutting_lines_off_the_end_is_never_intact(
    two_runs: Setup, tmp_path: Path, count: int
) -> None:
    cut = _copy_without_last(two_runs, tmp_path, count)
    last = _records(cut)[-1]
    result = _verify(str(cut), "--keys", str(two_runs.keys))
    assert result.exit_code == 3, result.output  # open: the chain has no closing record
    assert "intact" not in _verdict(result) and "OPEN" in _verdict(result)
    vouched = [
        r
        for r in _records(cut)
        if r["chain"] == last["chain"] and r["event"] == "audit.checkpoint"
    ][-1]
    covered = vouched["seq"] if vouched["vouches_seq"] == vouched["seq"] - 1 else (
        vouched["vouches_seq"]
    )
    assert f"vouched for up to seq {covered} " in result.output
    if covered < last["seq"]:
        assert f"seq {covered + 1}..{last['seq']} not vouched for" in result.output
    compared = _verify(str(cut), "--keys", str(two_runs.keys), *two_runs.s3_options())
    assert compared.exit_code == 1, compared.output
    assert "copy_only" in compared.output and "TAMPERED" in _verdict(compared)


def test_cutting_the_whole_last_chain_is_found_in_the_s3_copies(
    two_runs: Setup, tmp_path: Path
) -> None:
    records = _records(two_runs.audit_file)
    last_chain = records[-1]["chain"]
    cut = tmp_path / "cut.jsonl"
    cut.write_text(
        "".join(line for line, r in zip(_lines(two_runs.audit_file), records, strict=True)
                if r["chain"] != last_chain)
    )
    result = _verify(str(cut), "--config", str(two_runs.config))
    assert result.exit_code == 1, result.output
    assert "intact" not in _verdict(result)
    assert f"chain {last_chain} (seq 0.." in result.output and "copy_only" in result.output


def _forge(lines: list[str], events: int) -> list[str]:
    """Append `events` well-formed records to the chain of the last line, hashes recomputed."""
    last = json.loads(lines[-1])
    forged = []
    for n in range(events):
        body = {
            "time": last["time"],
            "event": "credential.fetch",
            "outcome": "granted",
            "credential": "openai-api-key",
            "chain": last["chain"],
            "seq": last["seq"] + 1,
            "prev": last["hash"],
            "request_id": f"forged-{n}",
        }
        digest, line = chained_line(body)
        forged.append(line.decode())
        last = body | {"hash": digest}
    return forged


def _closing(lines: list[str], signature: str, kid: str, **claims: Any) -> str:
    last = json.loads(lines[-1])
    body = {
        "time": last["time"],
        "event": "audit.chain_closed",
        "outcome": "closed",
        "vouches_seq": claims.get("seq", last["seq"]),
        "vouches_hash": claims.get("hash", last["hash"]),
        "kid": kid,
        "signature": signature,
        "chain": last["chain"],
        "seq": last["seq"] + 1,
        "prev": last["hash"],
    }
    return chained_line(body)[1].decode()


def test_a_forged_tail_is_found(two_runs: Setup, tmp_path: Path) -> None:
    lines = _lines(two_runs.audit_file)
    genuine_close = json.loads(lines[-1])
    kept = lines[:-3]
    tail = _forge(kept, 4)
    forged_lines = kept + tail
    last = json.loads(forged_lines[-1])
    attacker = ec.generate_private_key(ec.SECP256R1())
    claims = {"chain": last["chain"], "seq": last["seq"], "hash": last["hash"], "final": True,
              "iat": int(time.time())}  # fmt: skip
    forged_signature = jwt.encode(
        claims,
        attacker,
        algorithm="ES256",
        headers={"kid": genuine_close["kid"], "typ": CHECKPOINT_TYP},
    )
    cases = {
        "attacker-signed": _closing(forged_lines, forged_signature, genuine_close["kid"]),
        "replayed": _closing(forged_lines, genuine_close["signature"], genuine_close["kid"]),
        "replayed-claims": _closing(
            forged_lines,
            genuine_close["signature"],
            genuine_close["kid"],
            seq=genuine_close["vouches_seq"],
            hash=genuine_close["vouches_hash"],
        ),
    }
    for name, closing in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join([*forged_lines, closing]))
        result = _verify(str(path), "--keys", str(two_runs.keys))
        assert result.exit_code == 1, (name, result.output)
        assert "checkpoint_invalid" in result.output, (name, result.output)
    without_close = tmp_path / "unclosed.jsonl"
    without_close.write_text("".join(forged_lines))
    result = _verify(str(without_close), "--keys", str(two_runs.keys))
    assert result.exit_code == 3, result.output  # open, and the forged records not vouched for
    first_forged = json.loads(tail[0])["seq"]
    [described] = [line for line in result.output.splitlines() if f"chain {last['chain']}:" in line]
    vouched = int(described.split("vouched for up to seq ")[1].split()[0])
    assert vouched < first_forged
    assert f"seq {vouched + 1}..{last['seq']} not vouched for" in described


def test_a_crash_is_reported_open_with_the_vouched_seq(
    tmp_path: Path, moto: MotoServer
) -> None:
    setup = _setup(tmp_path, moto)
    with _serve(setup) as process:
        _requests(setup, 8)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the interval's checkpoint covers every request
            records = _records(setup.audit_file)
            if records[-1]["event"] == "audit.checkpoint":
                break
            time.sleep(0.05)
        _requests(setup, 2)  # two more, not yet vouched for when the broker dies
        live = _verify(str(setup.audit_file), "--keys", f"{setup.url}/.well-known/jwks.json")
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
    assert live.exit_code == 3, live.output  # a running broker's chain is open too
    records = _records(setup.audit_file)
    checkpoints = [r for r in records if r["event"] == "audit.checkpoint"]
    assert records[-1]["event"] != "audit.chain_closed"
    last_checkpoint = checkpoints[-1]
    vouched = (
        last_checkpoint["seq"]
        if last_checkpoint["vouches_seq"] == last_checkpoint["seq"] - 1
        else last_checkpoint["vouches_seq"]
    )
    result = _verify(str(setup.audit_file), "--keys", str(setup.keys))
    assert result.exit_code == 3, result.output
    assert "OPEN" in _verdict(result)
    assert f"vouched for up to seq {vouched} " in result.output
    if vouched < records[-1]["seq"]:
        assert f"seq {vouched + 1}..{records[-1]['seq']} not vouched for" in result.output

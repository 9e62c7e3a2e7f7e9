"""`broker keys rotate | list` on a key directory, as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from broker.cli import app


def test_rotate_adds_a_key_and_keeps_the_old_one_published(tmp_path: Path) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys"
    assert runner.invoke(app, ["keys", "rotate", "--keys-dir", str(keys)]).exit_code == 0
    first = runner.invoke(app, ["keys", "list", "--keys-dir", str(keys)])
    assert first.exit_code == 0, first.output
    assert first.stderr == f"signing keys in {keys}\n"  # says where it looks
    (original,) = [line.split()[-1] for line in first.stdout.splitlines() if line[0] == "*"]
    before = {line.split()[-1] for line in first.stdout.splitlines()}

    rotated = runner.invoke(app, ["keys", "rotate", "--keys-dir", str(keys)])
    assert rotated.exit_code == 0, rotated.output
    new_kid = rotated.stdout.split()[3]
    assert new_kid != original

    listed = runner.invoke(app, ["keys", "list", "--keys-dir", str(keys)])
    marks = dict(
        reversed(line.split()) if line.startswith("*") else (line.split()[0], " ")
        for line in listed.stdout.splitlines()
    )
    assert marks == {**dict.fromkeys(before, " "), new_kid: "*"}
    files = {json.loads(p.read_text())["kid"]: json.loads(p.read_text()) for p in keys.iterdir()}
    assert files[original]["retired_at"] is not None
    assert files[new_kid]["retired_at"] is None
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in keys.iterdir())


def test_rotate_writes_an_admin_record_to_the_configured_trail(tmp_path: Path) -> None:
    from broker.audit import load_verification_keys, verify_trail

    keys = tmp_path / "keys"
    trail = tmp_path / "audit" / "trail.jsonl"
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"signing_keys: {{directory: {keys}}}\naudit: {{file: {trail}, stdout: true}}\n"
    )
    runner = CliRunner()
    rotated = runner.invoke(app, ["keys", "rotate", "--config", str(config)])
    assert rotated.exit_code == 0, rotated.output
    new_kid = rotated.stdout.split()[3]
    assert "admin.signing_key_rotated" not in rotated.output  # the terminal is not the trail
    records = [json.loads(line) for line in trail.read_text().splitlines()]
    assert [r["event"] for r in records] == [
        "audit.chain_started",
        "admin.signing_key_rotated",
        "audit.chain_closed",
    ]
    rotation = records[1]
    assert rotation["kid"] == new_kid and rotation["via"] == "cli" and rotation["by"]
    assert rotation["previous_kid"] != new_kid
    assert set(rotation["published_kids"]) == {rotation["previous_kid"], new_kid}
    assert "PRIVATE KEY" not in trail.read_text()
    assert verify_trail([trail], keys=load_verification_keys([str(keys)])).status == "intact"
    assert records[-1]["kid"] == new_kid  # closed under the new key


def test_list_is_read_only_and_names_the_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("BROKER_SIGNING_KEYS__DIRECTORY", raising=False)
    runner = CliRunner()
    listed = runner.invoke(app, ["keys", "list"])
    assert listed.exit_code == 1
    assert "no signing keys in var/keys" in listed.stderr and "--dev" in listed.stderr
    assert list(tmp_path.iterdir()) == []  # nothing created: no directory, no key

    # --dev: the directory `broker dev` uses (var/dev/keys for its default --state-dir)
    empty_dev = runner.invoke(app, ["keys", "list", "--dev"])
    assert empty_dev.exit_code == 1 and "no signing keys in var/dev/keys" in empty_dev.stderr
    assert list(tmp_path.iterdir()) == []
    assert runner.invoke(app, ["keys", "rotate", "--dev"]).exit_code == 0
    assert [p.parent for p in (tmp_path / "var" / "dev" / "keys").glob("*.key.json")]
    dev_list = runner.invoke(app, ["keys", "list", "--dev"])
    assert dev_list.exit_code == 0 and "\n* " in "\n" + dev_list.stdout

    # a configured directory is the one `broker dev` uses too
    configured = tmp_path / "configured"
    monkeypatch.setenv("BROKER_SIGNING_KEYS__DIRECTORY", str(configured))
    from broker.cli.keys import DEV_STATE_DIR, dev_key_directory
    from broker.settings import load_settings

    assert dev_key_directory(load_settings(None), DEV_STATE_DIR) == configured
    configured_list = runner.invoke(app, ["keys", "list", "--dev"])
    assert f"no signing keys in {configured}" in configured_list.stderr
    assert not configured.exists()

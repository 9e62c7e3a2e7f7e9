"""`broker keys rotate | list` on a key directory, as an operator runs them."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from broker.cli import app


def test_rotate_adds_a_key_and_keeps_the_old_one_published(tmp_path: Path) -> None:
    runner = CliRunner()
    keys = tmp_path / "keys"
    first = runner.invoke(app, ["keys", "list", "--keys-dir", str(keys)])
    assert first.exit_code == 0, first.output
    (original,) = [line.split()[-1] for line in first.output.splitlines()]
    assert first.output.startswith("*")

    rotated = runner.invoke(app, ["keys", "rotate", "--keys-dir", str(keys)])
    assert rotated.exit_code == 0, rotated.output
    new_kid = rotated.output.split()[3]
    assert new_kid != original

    listed = runner.invoke(app, ["keys", "list", "--keys-dir", str(keys)])
    marks = dict(
        reversed(line.split()) if line.startswith("*") else (line.split()[0], " ")
        for line in listed.output.splitlines()
    )
    assert marks == {original: " ", new_kid: "*"}
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
    new_kid = rotated.output.split()[3]
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

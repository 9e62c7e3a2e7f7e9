"""The hash-chained audit trail: any edit, deletion, insertion or reordering of a real trail file
is detected and located by file, line and seq; secrets never reach a record."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from broker.audit import (
    CHAIN_CLOSED,
    CHAIN_STARTED,
    CHECKPOINT,
    GENESIS,
    DecisionLog,
    FileSink,
    KeyringCheckpointSigner,
    MemorySink,
    TrailBreak,
    chained_line,
    load_verification_keys,
    record_hash,
    verify_trail,
)
from broker.clock import FrozenClock, SystemClock
from broker.tokens import Keyring


def _write_trail(path: Path, count: int = 8) -> DecisionLog:
    """A trail as the broker writes it: chain start, then `count` decisions."""
    sink = FileSink(path)
    log = DecisionLog([sink], FrozenClock(1_800_000_000))
    for i in range(count):
        log.record(
            "credential.fetch",
            outcome="granted" if i % 3 else "denied",
            reason="granted" if i % 3 else "missing_permission",
            person="dev/alice",
            agent_chain=["summariser-agent", "triage-agent"],
            credential="openai",
            request_id=f"req-{i}",
        )
    sink.close()
    return log


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _only_break(path: Path) -> TrailBreak:
    result = verify_trail([path])
    assert not result.ok
    assert len(result.breaks) == 1, result.summary()
    return result.breaks[0]


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write_trail(path)
    return path


def test_an_untouched_trail_verifies(trail: Path) -> None:
    result = verify_trail([trail])
    assert result.ok, result.summary()
    assert result.records == 9
    [chain] = result.chains
    assert (chain.first_seq, chain.last_seq, chain.records) == (0, 8, 9)
    first, second = (json.loads(line) for line in _lines(trail)[:2])
    assert first["event"] == CHAIN_STARTED and first["prev"] == GENESIS
    assert second["prev"] == first["hash"] == record_hash(first)


def test_an_edited_field_is_a_hash_mismatch_at_that_line(trail: Path) -> None:
    lines = _lines(trail)
    record = json.loads(lines[4])
    assert record["outcome"] == "denied"
    record["outcome"] = "granted"
    lines[4] = json.dumps(record) + "\n"
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.file, found.line, found.seq, found.kind) == (str(trail), 5, 4, "hash_mismatch")


def test_an_edit_with_a_recomputed_hash_breaks_the_next_link(trail: Path) -> None:
    lines = _lines(trail)
    record = json.loads(lines[3])
    record["person"] = "dev/mallory"
    record["hash"] = record_hash(record)
    lines[3] = json.dumps(record) + "\n"
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (5, 4, "prev_mismatch")
    assert f"{trail}:4" in found.detail


def test_a_deleted_line_is_a_seq_gap_where_it_was(trail: Path) -> None:
    lines = _lines(trail)
    del lines[4]  # seq 4
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (5, 5, "seq_gap")
    assert "seq 4 missing" in found.detail


def test_a_deleted_first_record_is_detected(trail: Path) -> None:
    trail.write_text("".join(_lines(trail)[1:]))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (1, 1, "seq_gap")


def test_an_inserted_forged_line_is_detected_at_that_line(trail: Path) -> None:
    lines = _lines(trail)
    forged = json.loads(lines[2]) | {"person": "dev/mallory", "request_id": "forged"}
    lines.insert(3, json.dumps(forged) + "\n")
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (4, 2, "hash_mismatch")


def test_an_inserted_line_with_a_valid_hash_is_a_duplicate_seq(trail: Path) -> None:
    lines = _lines(trail)
    before = json.loads(lines[2])
    forged = json.loads(lines[3]) | {"person": "dev/mallory", "prev": before["hash"]}
    forged["hash"] = record_hash(forged)
    lines.insert(3, json.dumps(forged) + "\n")
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (5, 3, "duplicate_seq")
    assert f"{trail}:4" in found.detail


def test_two_swapped_lines_are_both_located(trail: Path) -> None:
    lines = _lines(trail)
    lines[4], lines[5] = lines[5], lines[4]
    trail.write_text("".join(lines))
    result = verify_trail([trail])
    assert [(b.line, b.seq, b.kind) for b in result.breaks] == [
        (5, 5, "reorder"),
        (6, 4, "reorder"),
    ]


def test_a_cut_off_tail_of_an_earlier_chain_is_detected(trail: Path) -> None:
    _write_trail(trail, count=2)  # a restart: the new chain names the old chain's last record
    lines = _lines(trail)
    del lines[7:9]  # the old chain's seq 7 and 8: its end, where no later seq would show a gap
    trail.write_text("".join(lines))
    found = _only_break(trail)
    assert (found.line, found.seq, found.kind) == (8, 0, "link_missing")
    assert "seq 8" in found.detail


def test_a_restart_links_the_new_chain_to_the_old_one(trail: Path) -> None:
    _write_trail(trail, count=2)
    result = verify_trail([trail])
    assert result.ok, result.summary()
    assert len(result.chains) == 2
    started = json.loads(_lines(trail)[9])
    old_last = json.loads(_lines(trail)[8])
    assert started["event"] == CHAIN_STARTED
    assert (started["previous_chain"], started["previous_seq"], started["previous_hash"]) == (
        old_last["chain"],
        8,
        old_last["hash"],
    )


def test_interleaved_writers_on_one_file_each_verify(tmp_path: Path) -> None:
    path = tmp_path / "shared.jsonl"
    clock = FrozenClock(1_800_000_000)
    sinks = [FileSink(path), FileSink(path)]
    logs = [DecisionLog([sink], clock) for sink in sinks]
    for i in range(10):
        logs[i % 2].record("token.exchange", outcome="granted", request_id=str(i))
    assert verify_trail([path]).ok
    lines = _lines(path)
    del lines[5]
    path.write_text("".join(lines))
    found = _only_break(path)
    assert found.kind == "seq_gap" and found.chain in {log.chain for log in logs}


def test_a_partial_last_line_stays_one_malformed_line(trail: Path) -> None:
    with trail.open("a") as handle:
        handle.write('{"event": "credential.fetch", "outc')  # a write cut short
    _write_trail(trail, count=1)
    found = _only_break(trail)
    assert (found.line, found.kind) == (10, "malformed")


@pytest.mark.parametrize(
    "field", ["token", "access_token", "subject_token", "client_secret", "secret", "value"]
)
def test_secret_keys_are_refused_and_nothing_is_written(tmp_path: Path, field: str) -> None:
    path = tmp_path / "audit.jsonl"
    log = DecisionLog([FileSink(path)], FrozenClock())
    before = path.read_bytes()
    with pytest.raises(ValueError, match="may not carry"):
        log.record("token.exchange", **{field: "s3cr3t-canary"})
    assert path.read_bytes() == before
    assert b"s3cr3t-canary" not in path.read_bytes()


@pytest.mark.parametrize("field", ["chain", "seq", "prev", "hash"])
def test_chain_fields_cannot_be_supplied(field: str) -> None:
    log = DecisionLog([MemorySink()], FrozenClock())
    with pytest.raises(ValueError, match="audit chain"):
        log.record("token.exchange", **{field: 1})


def test_the_line_every_sink_gets_is_the_record_and_verifies() -> None:
    from broker.audit import chained_line

    record = {"event": "credential.fetch", "person": "okta/Zoë", "seq": 3, "prev": "0" * 64}
    digest, line = chained_line(record)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line)
    assert parsed == {**record, "hash": digest}
    assert record_hash(parsed) == digest  # what verify_trail recomputes
    assert line.isascii()  # non-ASCII is escaped: one byte encoding for every sink
    assert chained_line({})[1] == b'{"hash":"' + chained_line({})[0].encode() + b'"}\n'


def _signed_log(tmp_path: Path, path: Path, **options: Any) -> tuple[DecisionLog, Path]:
    keys = tmp_path / "keys"
    keyring = Keyring(keys, algorithm="ES256", clock=SystemClock(), publish_grace_seconds=60)
    log = DecisionLog(
        [FileSink(path)], SystemClock(), signer=KeyringCheckpointSigner(keyring), **options
    )
    return log, keys


def _wait_for_event(path: Path, event: str, count: int = 1) -> None:
    deadline = time.monotonic() + 10
    while path.read_text().count(f'"event":"{event}"') < count:
        assert time.monotonic() < deadline, f"no {event} written"
        time.sleep(0.01)


def test_checkpoints_vouch_for_the_chain_and_closing_makes_it_intact(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log, keys = _signed_log(tmp_path, path, checkpoint_every=4)  # the start and 3 decisions
    for i in range(3):
        log.record("credential.fetch", outcome="granted", request_id=f"r{i}")
    _wait_for_event(path, CHECKPOINT)
    log.record("credential.fetch", outcome="granted", request_id="after")
    verification_keys = load_verification_keys([str(keys)])
    result = verify_trail([path], keys=verification_keys)
    assert result.ok and result.status == "open"
    [chain] = result.chains
    assert not chain.closed and chain.vouched_seq == 4 and chain.last_seq == 5
    log.close()
    closed = verify_trail([path], keys=verification_keys)
    assert closed.status == "intact" and closed.chains[0].closed, closed.summary()
    with pytest.raises(RuntimeError):
        log.record("credential.fetch", outcome="granted")


def test_an_idle_chain_is_checkpointed_once_after_the_interval(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log, _ = _signed_log(tmp_path, path, checkpoint_interval=0.05)
    _wait_for_event(path, CHECKPOINT)  # the chain start itself gets vouched for
    time.sleep(0.3)
    assert path.read_text().count(CHECKPOINT) == 1  # checkpoints do not vouch for themselves
    log.close()


@pytest.mark.parametrize("event", [CHECKPOINT, CHAIN_CLOSED])
def test_callers_cannot_write_checkpoint_records(event: str) -> None:
    log = DecisionLog([MemorySink()], FrozenClock())
    with pytest.raises(ValueError):
        log.record(event, outcome="vouched")


def test_a_rewritten_and_rehashed_trail_differs_from_its_copies(trail: Path) -> None:
    copies = [("s3://bucket/audit/chain/0-8.jsonl", trail.read_bytes())]
    records = [json.loads(line) for line in _lines(trail)]
    records[3]["outcome"] = "granted" if records[3]["outcome"] == "denied" else "denied"
    prev = records[2]["hash"]
    rewritten = []
    for record in records[3:]:  # recompute every later hash: the file alone still verifies
        body = {k: v for k, v in record.items() if k != "hash"} | {"prev": prev}
        prev, line = chained_line(body)
        rewritten.append(line.decode())
    trail.write_text("".join(_lines(trail)[:3] + rewritten))
    assert verify_trail([trail]).ok
    result = verify_trail([trail], copies=copies)
    assert result.status == "tampered"
    kinds = {(b.kind, b.seq) for b in result.breaks}
    assert ("copy_mismatch", 3) in kinds and all(k == "copy_mismatch" for k, _ in kinds)

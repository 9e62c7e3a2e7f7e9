"""Decision records are structured and refuse to carry secrets by construction."""

from __future__ import annotations

import io
import json

import pytest

from broker.audit import (
    MAX_ITEMS,
    MAX_RECORD_BYTES,
    MAX_STRING_CHARS,
    DecisionLog,
    MemorySink,
    NonFiniteValue,
    StreamSink,
    canonical_json,
)
from broker.clock import FrozenClock


def test_records_are_json_lines_with_time_and_event() -> None:
    stream = io.StringIO()
    memory = MemorySink()
    log = DecisionLog([StreamSink(stream), memory], FrozenClock(1_800_000_000))
    log.record("token.exchange", outcome="granted", person="okta/1", jti="j", parent_jti=None)
    started, line = (json.loads(text) for text in stream.getvalue().splitlines())
    assert started["event"] == "audit.chain_started" and started["seq"] == 0
    assert line["event"] == "token.exchange"
    assert line["time"] == "2027-01-15T08:00:00.000+00:00"
    assert line["seq"] == 1 and line["prev"] == started["hash"]
    assert "parent_jti" not in line  # None fields are dropped
    assert memory.records == [started, line]


@pytest.mark.parametrize("field", ["token", "subject_token", "client_secret", "client_assertion"])
def test_secret_fields_are_refused(field: str) -> None:
    log = DecisionLog([MemorySink()], FrozenClock())
    with pytest.raises(ValueError):
        log.record("token.exchange", **{field: "x"})


def test_caller_supplied_values_are_bounded_with_their_original_size() -> None:
    memory = MemorySink()
    log = DecisionLog([memory], FrozenClock())
    record = log.record(
        "credential.fetch",
        outcome="denied",
        credential="n" * 60_000,
        requested_scopes=[f"s{i}" for i in range(30_000)],
        nested={"a": {"b": {"c": {"d": ["deep"]}}}},
    )
    assert record["credential"] == "n" * MAX_STRING_CHARS + "\u2026"
    assert len(record["requested_scopes"]) == MAX_ITEMS
    assert record["truncated"] == {
        "credential": 60_000,
        "requested_scopes": 30_000,
        "nested.a.b.c": 1,
    }
    assert len(canonical_json(record)) < 2048


def test_a_record_still_too_large_is_bounded_tighter() -> None:
    log = DecisionLog([MemorySink()], FrozenClock())
    fields = {f"field_{i}": ["x" * 200] * 32 for i in range(10)}
    record = log.record("token.exchange", outcome="denied", **fields)
    assert len(canonical_json(record)) < MAX_RECORD_BYTES


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_never_reach_the_trail(bad: float) -> None:
    with pytest.raises(ValueError):
        canonical_json({"not_before": bad})
    stream = io.StringIO()
    log = DecisionLog([StreamSink(stream)], FrozenClock())
    with pytest.raises(NonFiniteValue) as raised:
        log.record("token.revoked", outcome="revoked", not_before=bad, nested={"x": [1.0, bad]})
    assert raised.value.paths == ("not_before", "nested.x[1]")
    written = json.loads(
        stream.getvalue().splitlines()[-1],
        parse_constant=lambda name: pytest.fail(f"{name} written"),
    )
    assert "not_before" not in written and written["nested"] == {"x": [1.0]}
    assert written["invalid_values"] == ["not_before", "nested.x[1]"]
    log.record("token.revoked", outcome="revoked")  # the chain goes on, unbroken

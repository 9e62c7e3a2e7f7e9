"""Decision records are structured and refuse to carry secrets by construction."""

from __future__ import annotations

import io
import json

import pytest

from broker.audit import DecisionLog, MemorySink, StreamSink
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

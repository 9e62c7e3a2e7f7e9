"""Decision records: one structured JSON line per security-relevant decision.

Records name the person, the agent chain, scopes, the policy version and the reason, and identify
tokens only by ``jti``: a token or secret value never reaches a record. (Hash chaining and durable
sinks come with the audit-trail work; the record shape is already the one they will carry.)
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from broker.clock import Clock

_FORBIDDEN_KEYS = frozenset(
    {
        "token",
        "access_token",
        "subject_token",
        "actor_token",
        "client_assertion",
        "client_secret",
        "secret",
        "password",
        "value",
    }
)


class DecisionSink(Protocol):
    def write(self, record: Mapping[str, Any]) -> None: ...


class StreamSink:
    """JSON lines to a text stream (stdout by default)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    def write(self, record: Mapping[str, Any]) -> None:
        self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
        self._stream.flush()


class LoggingSink:
    """JSON lines through the `broker.audit` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("broker.audit")

    def write(self, record: Mapping[str, Any]) -> None:
        self._logger.info(json.dumps(record, separators=(",", ":"), default=str))


class MemorySink:
    """Keeps records in memory; for tests and `broker policy explain`-style tooling."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


class DecisionLog:
    def __init__(self, sinks: list[DecisionSink], clock: Clock) -> None:
        self._sinks = sinks
        self._clock = clock

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        leaked = _FORBIDDEN_KEYS.intersection(fields)
        if leaked:  # a programming error; refuse to write rather than leak
            raise ValueError(f"decision records may not carry {sorted(leaked)}")
        record = {
            "time": datetime.fromtimestamp(self._clock.now(), UTC).isoformat(
                timespec="milliseconds"
            ),
            "event": event,
            **{k: v for k, v in fields.items() if v is not None},
        }
        for sink in self._sinks:
            sink.write(record)
        return record

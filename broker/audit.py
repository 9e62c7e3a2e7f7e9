"""The audit trail: one hash-chained structured record per security-relevant decision.

Records name the person, the agent chain, scopes, the policy version and the reason, and identify
tokens only by ``jti``: a token or secret value never reaches a record (keys such as ``token`` or
``secret`` are refused outright).

Hash chain
    Every record carries ``chain`` (the id of the writing process: host, pid and a random part,
    new at each start), ``seq`` (0, 1, 2, ... within the chain), ``prev`` (the ``hash`` of the
    chain's previous record; `GENESIS` for seq 0) and ``hash``: the SHA-256, in hex, of the
    canonical JSON (sorted keys, no spaces, ASCII) of the record without ``hash``. Editing,
    deleting, inserting or reordering records therefore breaks the chain, and `verify_trail`
    names the file, line and seq where it breaks. Several workers or replicas may append to one
    file or to separate files: each chain verifies on its own.

    The first record of every chain is ``audit.chain_started``. When the file sink appends to an
    existing file it names that file's last record (``previous_chain``, ``previous_seq``,
    ``previous_hash``), so cutting records off the end of the earlier chain is detected too
    (``link_missing``). A hash chain alone cannot detect a cut or a rewrite of a chain's tail by
    someone who recomputes the hashes: for that, `DecisionLog` writes ``audit.checkpoint``
    records signed with the broker's key every N records or T seconds, and ends a cleanly
    stopped chain with a signed ``audit.chain_closed``; `verify_trail` reports a chain without a
    verified closing record as open (vouched for up to the last verified checkpoint) and compares
    the files with the S3 sink's Object Lock copies (`read_s3_copies`).

Bounded records
    `DecisionLog.record` bounds every field (`bound_fields`): long strings are cut, lists and
    objects capped, nesting limited, and the original sizes named in ``truncated``; NaN and the
    infinities are left out (``invalid_values``) and `NonFiniteValue` raised, so the request
    fails while the trail stays valid JSON.

Sinks (several at once)
    `FileSink` appends JSON lines and ``fdatasync``s before `DecisionLog.record` returns; callers
    record a decision before the HTTP response is built, so a killed process never answered a
    request it did not record. A failing sink makes `record` raise: the request fails closed.
    `StreamSink` writes to stdout; `S3ObjectLockSink` uploads batches as objects under Object
    Lock retention from a background thread (`lag()` counts records not yet uploaded).
"""

from __future__ import annotations

import base64
import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import statistics
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, TextIO

import jwt

from broker.clock import Clock
from broker.logs import client_request_id_var

if TYPE_CHECKING:
    from broker.settings import AuditConfig, AuditS3Config

logger = logging.getLogger("broker.audit")

GENESIS = "0" * 64
"""The ``prev`` of the first record of every chain."""

CHAIN_STARTED = "audit.chain_started"
CHECKPOINT = "audit.checkpoint"
CHAIN_CLOSED = "audit.chain_closed"
_CHECKPOINT_EVENTS = frozenset({CHECKPOINT, CHAIN_CLOSED})
CHECKPOINT_TYP = "broker-audit-checkpoint+jwt"
"""The JOSE ``typ`` of checkpoint signatures (never ``at+jwt``)."""

recorded_request_var: ContextVar[str | None] = ContextVar("broker_recorded_request", default=None)
"""The request id of the last record written in this context: the HTTP edge uses it to write a
``request.denied`` record for a refusal that no domain handler recorded (so every refused request
leaves exactly one decision record, or more, never none)."""
_CHAIN_FIELDS = ("chain", "seq", "prev", "hash")

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


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The bytes a record's hash is computed over (stable across a JSON round trip). NaN and
    the infinities are not JSON: they raise ``ValueError`` (`bound_fields` removes them first)."""
    return _CANONICAL_ENCODER.encode(record).encode("ascii")


_CANONICAL_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=str
)
"""What ``json.dumps`` with these arguments would build for every call (it caches only the
default encoder); `encode` keeps no state between calls."""


# ------------------------------------------------------------------------------------ bounding

MAX_STRING_CHARS = 256
"""Longer strings in a record are cut to this many characters and end with ``…``."""
MAX_ITEMS = 32
"""Lists (and objects) in a record keep at most this many items."""
MAX_DEPTH = 4
"""Values nested deeper than this are replaced by ``"…"``."""
MAX_RECORD_BYTES = 8192
"""A record still larger than this after bounding is bounded again, tighter (64 chars, 8 items)."""
TRUNCATION_MARK = "\u2026"
_BIG_INT = 10**18


class NonFiniteValue(ValueError):
    """A record would have carried NaN or an infinity. The record was written without those
    values (named in its ``invalid_values``); the request it belongs to must fail."""

    def __init__(self, paths: Sequence[str]) -> None:
        super().__init__(f"non-finite number(s) at {', '.join(paths)} left out of the record")
        self.paths = tuple(paths)


class _Omit:
    pass


_OMIT = _Omit()


_Path = tuple[Any, ...]  # (parent path, key or index), rendered only when something is cut


def _render(path: _Path) -> str:
    parts: list[Any] = []
    node: Any = path
    while node:
        node, key = node
        parts.append(key)
    text = ""
    for key in reversed(parts):
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    return text


def _short_strings(value: list[Any], max_items: int, max_string: int) -> bool:
    """Whether `value` is a list a record keeps as it is: few items, each a short string."""
    return len(value) <= max_items and all(
        type(item) is str and len(item) <= max_string for item in value
    )


class _Bounder:
    def __init__(self, max_string: int, max_items: int, max_depth: int) -> None:
        self.max_string, self.max_items, self.max_depth = max_string, max_items, max_depth
        self.truncated: dict[str, int] = {}
        self.non_finite: list[str] = []
        self.size = 0  # characters kept, roughly: decides whether to measure the record

    def _string(self, value: str, path: _Path) -> str:
        if len(value) <= self.max_string:
            self.size += len(value)
            return value
        self.truncated[_render(path)] = len(value)
        self.size += self.max_string
        return value[: self.max_string] + TRUNCATION_MARK

    def value(self, value: Any, path: _Path, depth: int) -> Any:
        kind = type(value)
        if kind is str:  # the common case first, by exact type (ABC checks are slow)
            if len(value) <= self.max_string:
                self.size += len(value)
                return value
            return self._string(value, path)
        if kind is bool or (kind is int and -_BIG_INT < value < _BIG_INT):
            return value
        if kind is list and _short_strings(value, self.max_items, self.max_string):
            # a list of short strings (agent chains, scopes, groups): kept as it is
            self.size += sum(map(len, value)) + 2
            return list(value)
        if isinstance(value, str):
            return self._string(value, path)
        if value is None or isinstance(value, bool):
            return value
        if isinstance(value, int):
            return value if -_BIG_INT < value < _BIG_INT else self._string(str(value), path)
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            self.non_finite.append(_render(path))
            return _OMIT
        if isinstance(value, dict | list | tuple | set | frozenset | Mapping):
            self.size += 2
            if depth >= self.max_depth:
                self.truncated[_render(path)] = len(value)
                return TRUNCATION_MARK
            if isinstance(value, dict | Mapping):
                items = list(value.items())
                kept: Any = {}
                for key, item in items[: self.max_items]:
                    if type(key) is str and len(key) <= self.max_string:
                        name = key
                        self.size += len(key)
                        if type(item) is str and len(item) <= self.max_string:
                            kept[name] = item  # a short string member: no call
                            self.size += len(item)
                            continue
                    else:
                        name = self._string(str(key), (path, "<key>"))
                    bounded = self.value(item, (path, name), depth + 1)
                    if bounded is not _OMIT:
                        kept[name] = bounded
            else:
                items = sorted(value, key=str) if isinstance(value, set | frozenset) else value
                items = list(items)
                kept = [
                    bounded
                    for i, item in enumerate(items[: self.max_items])
                    if (bounded := self.value(item, (path, i), depth + 1)) is not _OMIT
                ]
            if len(items) > self.max_items:
                self.truncated[_render(path)] = len(items)
            return kept
        return self._string(str(value), path)


def bound_fields(
    fields: Mapping[str, Any],
    *,
    max_string: int = MAX_STRING_CHARS,
    max_items: int = MAX_ITEMS,
    max_depth: int = MAX_DEPTH,
) -> tuple[dict[str, Any], dict[str, int], list[str]]:
    """Caller-supplied values bounded before they reach a record: ``(fields, truncated,
    non_finite)``. Strings longer than `max_string` are cut (ending in ``…``), lists and objects
    keep `max_items` items, nesting stops at `max_depth`; `truncated` maps each shortened value's
    path to its original length (characters or items). NaN and infinities are left out and their
    paths returned: a record must never hold what JSON cannot."""
    bounded, truncated, non_finite, _ = _bound(fields, max_string, max_items, max_depth)
    return bounded, truncated, non_finite


def _bound(
    fields: Mapping[str, Any], max_string: int, max_items: int, max_depth: int
) -> tuple[dict[str, Any], dict[str, int], list[str], int]:
    bounder = _Bounder(max_string, max_items, max_depth)
    bounded: dict[str, Any] = {}
    size = 0
    for key, value in fields.items():
        if value is None:
            continue
        size += len(key) + 4
        kind = type(value)
        if kind is str:
            if len(value) <= max_string:  # most fields: no call
                bounded[key] = value
                size += len(value)
                continue
        elif kind is bool or (kind is int and -_BIG_INT < value < _BIG_INT):
            bounded[key] = value
            continue
        elif kind is list and _short_strings(value, max_items, max_string):
            bounded[key] = list(value)  # scopes, audiences, agent chains: as `value` keeps them
            size += sum(map(len, value)) + 2
            continue
        kept = bounder.value(value, ((), key), 1)
        if kept is not _OMIT:
            bounded[key] = kept
    return bounded, bounder.truncated, bounder.non_finite, size + bounder.size


def record_hash(record: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of `record` without its ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def chained_line(record: Mapping[str, Any]) -> tuple[str, bytes]:
    """(hash, line) for a record without ``hash``: the line is the record's canonical JSON with
    ``"hash"`` appended as its last member, serialized once for every sink. (Verification parses
    each line and recomputes the hash over the other members, so member order does not matter.)
    """
    body = canonical_json(record)
    digest = hashlib.sha256(body).hexdigest()
    separator = b"," if len(body) > 2 else b""
    return digest, body[:-1] + separator + b'"hash":"' + digest.encode("ascii") + b'"}\n'


def new_chain_id() -> str:
    """``<host>-<pid>-<random>``: unique per process start, safe in file and object names."""
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(6)}"


# ---------------------------------------------------------------------------------------- sinks


class DecisionSink(Protocol):
    """Takes each chained record. A sink that stores the serialized form may also define
    ``write_line(record, line)``: `DecisionLog` then hands it the one line it serialized. A sink
    whose records someone will verify later sets ``keeps_trail = True`` (`keeps_trail`)."""

    def write(self, record: Mapping[str, Any]) -> None: ...


class StreamSink:
    """JSON lines to a text stream (stdout by default)."""

    keeps_trail = True

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stdout

    def write(self, record: Mapping[str, Any]) -> None:
        self._stream.write(
            json.dumps(record, separators=(",", ":"), allow_nan=False, default=str) + "\n"
        )
        self._stream.flush()

    def write_line(self, record: Mapping[str, Any], line: bytes) -> None:
        self._stream.write(line.decode("ascii"))
        self._stream.flush()


class LoggingSink:
    """JSON lines through the `broker.audit` logger."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("broker.audit")

    def write(self, record: Mapping[str, Any]) -> None:
        self._logger.info(json.dumps(record, separators=(",", ":"), allow_nan=False, default=str))


class MemorySink:
    """Keeps records in memory; for tests and `broker policy explain`-style tooling."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def write(self, record: Mapping[str, Any]) -> None:
        self.records.append(dict(record))


def keeps_trail(sinks: Iterable[DecisionSink]) -> bool:
    """Whether any sink keeps a trail to verify later (file, stream, S3): only then are signed
    checkpoints worth writing (not for in-memory sinks, tests and dry runs)."""
    return any(getattr(sink, "keeps_trail", False) for sink in sinks)


def _last_line(path: Path, limit: int = 1 << 20) -> tuple[bytes, bool]:
    """The last complete line of `path` and whether the file ends mid-line."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - limit))
        tail = handle.read()
    if not tail:
        return b"", False
    partial = not tail.endswith(b"\n")
    lines = tail.rstrip(b"\n").split(b"\n")
    if partial:
        return (lines[-2] if len(lines) > 1 else b""), True
    return lines[-1], False


class FileSink:
    """Append-only JSON lines, each written with one ``write(2)`` on an ``O_APPEND`` descriptor
    and made durable with ``fdatasync``.

    Without `group_commit` the sync runs inside `write`, once per record. With it, `write` only
    appends and `DecisionLog` syncs in rounds, one ``fdatasync`` covering every record appended
    meanwhile (see `_GroupCommitter`: on the event loop while the disk syncs fast, on a thread
    when it does not); the HTTP edge awaits `DecisionLog.wait_durable` before it sends a
    response, so the guarantee is the same (nothing answered is lost on a crash) at a fraction of
    the syncs.

    One ``O_APPEND`` write per line keeps lines whole when several workers append to the same
    file. A file left ending mid-line (a crash during a write, a disk filling up) gets a newline
    first, so that damage stays one malformed line that `verify_trail` reports.
    """

    keeps_trail = True

    def __init__(self, path: Path, *, fsync: bool = True, group_commit: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fsync = fsync
        self.deferred_sync = fsync and group_commit
        """True when `DecisionLog` must call `sync` (group commit)."""
        self._previous: dict[str, Any] | None = None
        partial = False
        if self.path.exists():
            line, partial = _last_line(self.path)
            with contextlib.suppress(ValueError):
                candidate = json.loads(line) if line else None
                if isinstance(candidate, dict) and all(k in candidate for k in _CHAIN_FIELDS):
                    self._previous = candidate
        self._fd: int | None = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o640
        )
        if partial:
            self._write_all(b"\n")

    def previous_record(self) -> dict[str, Any] | None:
        """The last record already in the file when it was opened (for the chain link)."""
        return self._previous

    def _write_all(self, data: bytes) -> None:
        if self._fd is None:
            raise RuntimeError(f"audit file {self.path} is closed")
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self._fsync and not self.deferred_sync:
            _datasync(self._fd)

    def write(self, record: Mapping[str, Any]) -> None:
        self._write_all(canonical_json(record) + b"\n")

    def write_line(self, record: Mapping[str, Any], line: bytes) -> None:
        self._write_all(line)

    def sync(self) -> None:
        """Make every line written so far durable (group commit)."""
        fd = self._fd
        if fd is None:
            raise RuntimeError(f"audit file {self.path} is closed")
        _datasync(fd)

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            if self._fsync:
                _datasync(fd)
            os.close(fd)


def _datasync(fd: int) -> None:
    (getattr(os, "fdatasync", None) or os.fsync)(fd)


@dataclass
class _Batch:
    records: list[bytes] = field(default_factory=list)
    first_seq: int = 0
    last_seq: int = 0
    chain: str = ""
    started: float = 0.0


class S3ObjectLockSink:
    """Batches of records uploaded as S3 objects under Object Lock retention.

    A batch is uploaded when it holds `batch_size` records or its oldest record is
    `batch_age_seconds` old, and on `close`. Each object is
    ``<prefix><chain>/<first seq>-<last seq>.jsonl`` (the same lines the file sink writes), put
    with ``ObjectLockMode`` and ``ObjectLockRetainUntilDate`` = now + `retention_days`. Uploads run
    on a background thread and are retried until they succeed; `lag()` is the number of records
    not yet uploaded. The bucket must have Object Lock enabled (checked at start).
    """

    keeps_trail = True

    def __init__(
        self,
        client: Any,
        bucket: str,
        *,
        prefix: str = "",
        mode: Literal["COMPLIANCE", "GOVERNANCE"] = "COMPLIANCE",
        retention_days: int = 365,
        batch_size: int = 100,
        batch_age_seconds: float = 5.0,
        retry_seconds: float = 1.0,
        check_bucket: bool = True,
    ) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix
        self.mode = mode
        self.retention_days = retention_days
        self.batch_size = batch_size
        self.batch_age_seconds = batch_age_seconds
        self._retry_seconds = retry_seconds
        self._lock = threading.Condition()
        self._pending = _Batch()
        self._ready: list[_Batch] = []
        self._in_flight = 0
        self._closing = False
        self.uploaded_keys: list[str] = []
        self.last_error: str | None = None
        if check_bucket:
            self._check_bucket()
        self._thread = threading.Thread(target=self._run, name="audit-s3-sink", daemon=True)
        self._thread.start()

    def _check_bucket(self) -> None:
        config = self._client.get_object_lock_configuration(Bucket=self.bucket)
        enabled = config.get("ObjectLockConfiguration", {}).get("ObjectLockEnabled")
        if enabled != "Enabled":
            raise RuntimeError(f"audit bucket {self.bucket!r} does not have Object Lock enabled")

    def write(self, record: Mapping[str, Any]) -> None:
        self.write_line(record, canonical_json(record) + b"\n")

    def write_line(self, record: Mapping[str, Any], line: bytes) -> None:
        with self._lock:
            if self._closing:
                raise RuntimeError("the S3 audit sink is closed")
            batch = self._pending
            chain, seq = str(record.get("chain", "")), int(record.get("seq", 0))
            if batch.records and batch.chain != chain:  # one chain per object
                self._seal()
                batch = self._pending
            if not batch.records:
                batch.first_seq, batch.chain, batch.started = seq, chain, time.monotonic()
            batch.records.append(line)
            batch.last_seq = seq
            if len(batch.records) >= self.batch_size:
                self._seal()
            self._lock.notify_all()

    def _seal(self) -> None:
        if self._pending.records:
            self._ready.append(self._pending)
            self._pending = _Batch()

    def lag(self) -> int:
        """Records accepted but not yet stored in S3."""
        with self._lock:
            return (
                len(self._pending.records)
                + sum(len(b.records) for b in self._ready)
                + self._in_flight
            )

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    if self._pending.records and (
                        self._closing
                        or time.monotonic() - self._pending.started >= self.batch_age_seconds
                    ):
                        self._seal()
                    if self._ready:
                        batch = self._ready.pop(0)
                        self._in_flight = len(batch.records)
                        break
                    if self._closing:
                        return
                    timeout = None
                    if self._pending.records:
                        age = time.monotonic() - self._pending.started
                        timeout = max(0.0, self.batch_age_seconds - age)
                    self._lock.wait(timeout)
            self._upload_until_stored(batch)

    def _upload_until_stored(self, batch: _Batch) -> None:
        key = f"{self.prefix}{batch.chain}/{batch.first_seq:012d}-{batch.last_seq:012d}.jsonl"
        body = b"".join(batch.records)
        while True:
            try:
                retain_until = datetime.now(UTC) + timedelta(days=self.retention_days)
                self._client.put_object(
                    Bucket=self.bucket,
                    Key=key,
                    Body=body,
                    ContentType="application/x-ndjson",
                    ContentMD5=base64.b64encode(
                        hashlib.md5(body, usedforsecurity=False).digest()
                    ).decode(),
                    ObjectLockMode=self.mode,
                    ObjectLockRetainUntilDate=retain_until,
                )
            except Exception as exc:  # any failure: keep the batch and retry
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.warning("audit upload of %s failed, retrying: %s", key, self.last_error)
                with self._lock:
                    self._lock.wait(self._retry_seconds)
                continue
            with self._lock:
                self._in_flight = 0
                self.uploaded_keys.append(key)
                self.last_error = None
                self._lock.notify_all()
            return

    def close(self, timeout: float = 30.0) -> None:
        """Upload everything pending (waits up to `timeout` seconds) and stop the thread."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("audit S3 sink: %d records not uploaded at close", self.lag())


def s3_client(config: AuditS3Config) -> Any:
    """A boto3 S3 client for the ``audit.s3`` settings (credentials: the standard AWS chain)."""
    import boto3
    import botocore.config

    return boto3.session.Session(region_name=config.region).client(
        "s3",
        endpoint_url=config.endpoint_url,
        config=botocore.config.Config(
            s3={"addressing_style": "path" if config.endpoint_url else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=config.timeout_seconds,
            read_timeout=config.timeout_seconds,
        ),
    )


def read_s3_copies(client: Any, bucket: str, prefix: str = "") -> list[tuple[str, bytes]]:
    """Every object the S3 sink uploaded under `prefix`, in key order (per chain, by seq), as
    ``("s3://bucket/key", content)`` for `verify_trail`. SDK errors become `AuditSourceError`."""
    import botocore.exceptions

    copies: list[tuple[str, bytes]] = []
    try:
        paginator = client.get_paginator("list_objects_v2")
        keys = [
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
            if item["Key"].endswith(".jsonl")
        ]
        for key in sorted(keys):
            body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
            copies.append((f"s3://{bucket}/{key}", body))
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise AuditSourceError(f"cannot read the S3 copies in {bucket}: {exc}") from None
    return copies


def build_sinks(config: AuditConfig) -> list[DecisionSink]:
    """The sinks named by the ``audit:`` settings section."""
    sinks: list[DecisionSink] = []
    if config.file is not None:
        sinks.append(FileSink(config.file, fsync=config.fsync, group_commit=config.group_commit))
    if config.stdout:
        sinks.append(StreamSink(sys.stdout))
    if config.s3 is not None:
        s3 = config.s3
        sinks.append(
            S3ObjectLockSink(
                s3_client(s3),
                s3.bucket,
                prefix=s3.prefix,
                mode=s3.object_lock_mode,
                retention_days=s3.retention_days,
                batch_size=s3.batch_size,
                batch_age_seconds=s3.batch_age_seconds,
            )
        )
    return sinks


# ------------------------------------------------------------------------------- decision log


_DISK_PROBE_SECONDS = 1.0
"""While group commit runs on its thread (a slow disk), how often a round runs on the event loop
to measure the disk again."""


class _GroupCommitter:
    """Makes appended records durable for every waiter at once: one ``sync`` of each deferred
    sink (one ``fdatasync``) per round, however many records and waiters it covers.

    A waiter asks for "everything up to seq N". A round notes the last seq written, syncs, then
    wakes every waiter whose N is covered. A failed sync fails the waiters it would have covered
    (their requests answer 500: nothing is answered unrecorded) and the next round tries again.

    Where a round runs depends on how long the disk takes: the median of the last rounds run on
    the loop, each without the time the thread then waited for a core (Linux's per-thread
    schedstat; on a busy machine that wait says nothing about the disk):

    - **Fast disk** (a round under `inline_max` seconds, a local SSD's ~0.1-0.2 ms): on the
      waiting event loop itself, at most once per `window` seconds per loop. The loop is held
      for the syscall only, and nothing crosses threads. A background thread would cost more
      than the sync: after its ``fdatasync`` it must take the GIL back from a busy event loop,
      which waits out the interpreter's switch interval (5 ms) twice per round. Measured in the
      production-shape benchmark, that hand-off cost 30 % of the exchange rate and tripled p99.
    - **Slow disk** (network block storage, a disk under load): on one background thread, so
      the event loop never stalls on a sync; it wakes each event loop once per round. Once a
      second one round runs on the loop again to measure the disk afresh (a thread's round
      cannot: its time includes waiting for the GIL).

    The promise is the same either way: no answer before its record is on disk.
    """

    def __init__(
        self,
        sinks: list[Any],
        last_written: Any,
        *,
        window: float = 0.0005,
        inline_max: float = 0.001,
    ) -> None:
        self._sinks = sinks
        self._last_written = last_written  # () -> the seq of the last record written
        self._window = window
        self._inline_max = inline_max
        self._round_seconds: collections.deque[float] = collections.deque(maxlen=15)
        self._typical_round = 0.0  # the median of _round_seconds
        self._probe_at = 0.0  # monotonic time of the next inline round while on the thread
        self._cond = threading.Condition()
        self._requested = -1  # the highest seq a thread-mode waiter asked for
        self._synced = -1
        self._waiters: list[tuple[int, Any, Any]] = []  # (seq, loop, future)
        self._scheduled: set[Any] = set()  # event loops with an inline round pending
        self._closing = False
        self._idle = False  # the thread sleeps on the condition and needs a notify
        self.syncs = 0
        self.inline_syncs = 0
        self._thread = threading.Thread(target=self._run, name="audit-group-commit", daemon=True)
        self._thread.start()

    @property
    def inline(self) -> bool:
        """True while rounds run on the event loop (the disk syncs fast)."""
        return self._inline_max > 0 and self._typical_round <= self._inline_max

    async def wait(self, seq: int) -> None:
        import asyncio

        loop = asyncio.get_running_loop()
        with self._cond:
            if self._synced >= seq:
                return
            if self._closing:
                raise RuntimeError("the audit trail is closed")
            future = loop.create_future()
            self._waiters.append((seq, loop, future))
            inline = self.inline
            if not inline and self._inline_max > 0 and time.monotonic() >= self._probe_at:
                inline, self._probe_at = True, time.monotonic() + _DISK_PROBE_SECONDS
            if inline:
                if loop not in self._scheduled:
                    self._scheduled.add(loop)
                    loop.call_later(self._window, self._run_inline, loop)
            elif seq > self._requested:
                self._requested = seq
                if self._idle:  # a busy thread looks at _requested again before it sleeps
                    self._cond.notify()
        await future

    def sync_now(self) -> None:
        """Sync in the calling thread (used at close and by synchronous callers)."""
        target = self._last_written()
        for sink in self._sinks:
            sink.sync()
        self._settle(target, None)

    def _round(self, *, measure: bool) -> None:
        target = self._last_written()
        if not measure and target <= self._synced:
            return  # a round on a loop covered it meanwhile: nothing new to make durable
        error: BaseException | None = None
        started, queued = time.perf_counter(), _run_queue_wait() if measure else 0.0
        try:
            for sink in self._sinks:
                sink.sync()
        except Exception as exc:  # an I/O error: fail these waiters, try again next round
            error = exc
            logger.error("audit trail sync failed: %s", type(exc).__name__)
        if measure:
            took = time.perf_counter() - started - (_run_queue_wait() - queued)
            self._round_seconds.append(max(took, 0.0))
            self._typical_round = statistics.median(self._round_seconds)
        self._settle(target, error)

    def _run_inline(self, loop: Any) -> None:
        with self._cond:
            self._scheduled.discard(loop)
            if self._closing:
                return  # close() syncs and settles everyone
        self.inline_syncs += 1
        self._round(measure=True)

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._requested <= self._synced and not self._closing:
                    self._idle = True
                    self._cond.wait()
                    self._idle = False
                if self._closing and self._requested <= self._synced:
                    return
            self._round(measure=False)

    def _settle(self, target: int, error: BaseException | None) -> None:
        with self._cond:
            if error is None:
                self.syncs += 1
                self._synced = max(self._synced, target)
            covered = [w for w in self._waiters if w[0] <= target]
            self._waiters = [w for w in self._waiters if w[0] > target]
            if error is not None:
                self._requested = max((w[0] for w in self._waiters), default=self._synced)
        by_loop: dict[Any, list[Any]] = {}
        for _, loop, future in covered:
            by_loop.setdefault(loop, []).append(future)
        for loop, futures in by_loop.items():
            if _running_loop() is loop:
                _settle_futures(futures, error)
            else:  # one wake-up per event loop, not per waiter
                loop.call_soon_threadsafe(_settle_futures, futures, error)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(10)


class _SchedStat:
    """This thread's ``/proc/thread-self/schedstat``, kept open while the thread lives."""

    def __init__(self) -> None:
        try:
            self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:  # not Linux, or no procfs: rounds are measured by wall time alone
            self.fd = -1

    def __del__(self) -> None:  # the thread ended and its locals are dropped
        if self.fd >= 0:
            os.close(self.fd)


_schedstat = threading.local()


def _run_queue_wait() -> float:
    """Seconds this thread has waited for a CPU since it started (0 where unknown)."""
    stat: _SchedStat | None = getattr(_schedstat, "stat", None)
    if stat is None:
        stat = _schedstat.stat = _SchedStat()
    if stat.fd < 0:
        return 0.0
    try:
        return int(os.pread(stat.fd, 64, 0).split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return 0.0


def _running_loop() -> Any:
    import asyncio

    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _settle_futures(futures: list[Any], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the waiting request was cancelled (client went away)
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(AuditUnavailable("the audit trail could not be made durable"))


class AuditUnavailable(Exception):
    """A record could not be made durable: the request it belongs to must not be answered."""


def _line_writer(sink: DecisionSink) -> Any:
    write_line = getattr(sink, "write_line", None)
    if callable(write_line):
        return write_line
    return lambda record, _line: sink.write(record)


class CheckpointSigner(Protocol):
    """Signs a checkpoint's claims as a compact JWS (the broker: its token signing keyring)."""

    def sign(self, claims: Mapping[str, Any]) -> tuple[str, str]:
        """``(compact JWS, kid)``."""
        ...


class _ActiveKey(Protocol):
    kid: str
    algorithm: str
    private_key: Any


class _KeySource(Protocol):
    @property
    def active(self) -> _ActiveKey: ...


class KeyringCheckpointSigner:
    """Checkpoints signed with the broker's active token signing key (`broker.tokens.Keyring`),
    so they verify against the keys the broker publishes (its JWKS). The JOSE ``typ`` keeps a
    checkpoint from ever passing for an access token, and an access token for a checkpoint."""

    def __init__(self, keys: _KeySource) -> None:
        self._keys = keys

    def sign(self, claims: Mapping[str, Any]) -> tuple[str, str]:
        key = self._keys.active
        token = jwt.encode(
            dict(claims),
            key.private_key,
            algorithm=key.algorithm,
            headers={"kid": key.kid, "typ": CHECKPOINT_TYP},
        )
        return token, key.kid


class DecisionLog:
    """Writes hash-chained records to every sink. `record` returns once every sink accepted the
    record (for a file sink without group commit: once it is on disk); with group commit, the
    caller awaits `wait_durable` before it answers anyone.

    With a `signer`, a background thread writes an ``audit.checkpoint`` record once
    `checkpoint_every` records or `checkpoint_interval` seconds (whichever first; 0 turns a
    trigger off) have gone unvouched: a JWS over (chain, seq, hash) of the last record, so nobody
    without the broker's key can make a shortened or rewritten chain look vouched for. `close`
    ends the chain with ``audit.chain_closed``, signed likewise and marked final."""

    def __init__(
        self,
        sinks: list[DecisionSink],
        clock: Clock,
        *,
        chain: str | None = None,
        signer: CheckpointSigner | None = None,
        checkpoint_every: int = 0,
        checkpoint_interval: float = 0.0,
        commit_window: float = 0.0005,
        inline_sync_max: float = 0.001,
    ) -> None:
        self._sinks = sinks
        self._writers = [_line_writer(sink) for sink in sinks]
        self._clock = clock
        self._lock = threading.Lock()
        self.chain = chain or new_chain_id()
        self._seq = 0
        self._prev = GENESIS
        self._closed = False
        self._signer = signer
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval = checkpoint_interval
        self._unvouched = 0  # records written since the last checkpoint's capture
        self._unvouched_since: float | None = None  # monotonic time of the first of them
        self._wake = threading.Condition(self._lock)
        deferred = [s for s in sinks if getattr(s, "deferred_sync", False)]
        self._committer = (
            _GroupCommitter(
                deferred, self._last_written, window=commit_window, inline_max=inline_sync_max
            )
            if deferred
            else None
        )
        self.record(
            CHAIN_STARTED,
            outcome="started",
            host=socket.gethostname(),
            pid=os.getpid(),
            **self._link(),
        )
        self._checkpointer: threading.Thread | None = None
        if signer is not None and (checkpoint_every > 0 or checkpoint_interval > 0):
            self._checkpointer = threading.Thread(
                target=self._run_checkpoints, name="audit-checkpoints", daemon=True
            )
            self._checkpointer.start()

    def _link(self) -> dict[str, Any]:
        for sink in self._sinks:
            previous = getattr(sink, "previous_record", None)
            record = previous() if callable(previous) else None
            if record is not None:
                return {
                    "previous_chain": record.get("chain"),
                    "previous_seq": record.get("seq"),
                    "previous_hash": record.get("hash"),
                }
        return {}

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        leaked = _FORBIDDEN_KEYS.intersection(fields)
        if leaked:  # a programming error; refuse to write rather than leak
            raise ValueError(f"decision records may not carry {sorted(leaked)}")
        reserved = set(_CHAIN_FIELDS).intersection(fields)
        if reserved:
            raise ValueError(f"{sorted(reserved)} are set by the audit chain")
        if event in _CHECKPOINT_EVENTS:
            raise ValueError(f"{event} records are written by the audit chain itself")
        client_request_id = client_request_id_var.get()
        if client_request_id is not None and "request_id" in fields:
            # The caller's own X-Request-Id, kept apart from the broker's (see broker.logs).
            fields.setdefault("client_request_id", client_request_id)
        bounded, truncated, non_finite, size = _bound(
            fields, MAX_STRING_CHARS, MAX_ITEMS, MAX_DEPTH
        )
        if size > MAX_RECORD_BYTES // 2 and len(canonical_json(bounded)) > MAX_RECORD_BYTES:
            bounded, truncated, non_finite = bound_fields(fields, max_string=64, max_items=8)
        if truncated:
            bounded["truncated"] = truncated
        if non_finite:
            bounded["invalid_values"] = non_finite
        record = self._append(event, bounded, vouching=False)
        request_id = fields.get("request_id")
        if request_id is not None:
            recorded_request_var.set(request_id)
        if non_finite:  # recorded without them; the decision itself must not stand
            raise NonFiniteValue(non_finite)
        return record

    def _append(self, event: str, fields: Mapping[str, Any], *, vouching: bool) -> dict[str, Any]:
        record = {
            "time": datetime.fromtimestamp(self._clock.now(), UTC).isoformat(
                timespec="milliseconds"
            ),
            "event": event,
            **fields,
        }
        with self._lock:  # one chain position per record, written in chain order
            if self._closed and event != CHAIN_CLOSED:
                raise RuntimeError("the audit chain is closed")
            record.update(chain=self.chain, seq=self._seq, prev=self._prev)
            record["hash"], line = chained_line(record)
            for write in self._writers:
                write(record, line)
            self._seq += 1
            self._prev = record["hash"]
            if not vouching:
                self._unvouched += 1
                if self._unvouched_since is None:
                    self._unvouched_since = self._clock.monotonic()
                    self._wake.notify()
                elif self._unvouched == self._checkpoint_every:
                    self._wake.notify()
        return record

    # -- checkpoints -----------------------------------------------------------------------
    def _due(self) -> float | None:
        """Seconds until the next checkpoint is due (0: now), None when nothing is unvouched.
        Called with the lock held."""
        if self._unvouched_since is None:
            return None
        if self._checkpoint_every > 0 and self._unvouched >= self._checkpoint_every:
            return 0.0
        if self._checkpoint_interval <= 0:
            return None
        age = self._clock.monotonic() - self._unvouched_since
        return max(0.0, self._checkpoint_interval - age)

    def _run_checkpoints(self) -> None:
        while True:
            with self._lock:
                while not self._closed:
                    due = self._due()
                    if due == 0.0:
                        break
                    self._wake.wait(due)
                if self._closed:
                    return
            try:
                self.checkpoint()
            except Exception as exc:  # a keyring or sink failure: try again in a second
                logger.error("audit checkpoint failed: %s", type(exc).__name__)
                with self._lock:
                    if self._unvouched_since is None:
                        self._unvouched, self._unvouched_since = 1, self._clock.monotonic()
                time.sleep(1.0)

    def _sign(self, *, final: bool) -> dict[str, Any]:
        """Capture the chain's end and sign it (outside the lock: signing can take milliseconds).
        The caller holds no lock; records written meanwhile stay unvouched."""
        assert self._signer is not None
        with self._lock:
            seq, digest = self._seq - 1, self._prev
            if not final:
                self._unvouched, self._unvouched_since = 0, None
        claims = {
            "chain": self.chain,
            "seq": seq,
            "hash": digest,
            "final": final,
            "iat": int(self._clock.now()),
        }
        signature, kid = self._signer.sign(claims)
        return {"vouches_seq": seq, "vouches_hash": digest, "kid": kid, "signature": signature}

    def checkpoint(self) -> dict[str, Any] | None:
        """Write a signed ``audit.checkpoint`` for every record so far (None without a signer)."""
        if self._signer is None:
            return None
        record = self._append(
            CHECKPOINT, {"outcome": "vouched", **self._sign(final=False)}, vouching=True
        )
        if self._committer is not None:
            with contextlib.suppress(OSError, RuntimeError):
                self._committer.sync_now()
        return record

    def _close_chain(self) -> None:
        """The last record of the chain: ``audit.chain_closed``, signed and final."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
        if self._checkpointer is not None:
            self._checkpointer.join(10)
        fields: dict[str, Any] = {"outcome": "closed", "records": self._seq + 1}
        if self._signer is not None:
            try:
                fields.update(self._sign(final=True))
            except Exception as exc:
                logger.error("audit chain closing signature failed: %s", type(exc).__name__)
        self._append(CHAIN_CLOSED, fields, vouching=True)

    def _last_written(self) -> int:
        with self._lock:  # records are written inside this lock: seq N written means 0..N are
            return self._seq - 1

    async def wait_durable(self) -> None:
        """Return once every record written so far is durable (group commit); raises
        `AuditUnavailable` when it cannot be made so. Immediate without group commit."""
        if self._committer is not None:
            await self._committer.wait(self._last_written())

    @property
    def group_commits(self) -> int:
        """Syncs run by group commit so far (each covers one or more records)."""
        return self._committer.syncs if self._committer is not None else 0

    def sink_lag(self) -> dict[str, int]:
        """Records accepted but not yet stored, per sink that stores asynchronously."""
        return {
            type(sink).__name__: sink.lag()  # type: ignore[attr-defined]
            for sink in self._sinks
            if callable(getattr(sink, "lag", None))
        }

    def close(self) -> None:
        """End the chain with its signed ``audit.chain_closed`` record, then flush and close
        every sink that holds resources (S3 batches are uploaded)."""
        try:
            self._close_chain()
        except Exception as exc:  # a failing sink: the chain stays open, and says so at verify
            logger.error("audit chain could not be closed: %s", type(exc).__name__)
        if self._committer is not None:
            self._committer.close()
            try:
                self._committer.sync_now()
            except (OSError, RuntimeError) as exc:
                logger.error("audit trail final sync failed: %s", type(exc).__name__)
        for sink in self._sinks:
            closer = getattr(sink, "close", None)
            if callable(closer):
                closer()


# ------------------------------------------------------------------------------- verification

BreakKind = Literal[
    "malformed",
    "hash_mismatch",
    "prev_mismatch",
    "seq_gap",
    "reorder",
    "duplicate_seq",
    "link_missing",
    "link_mismatch",
    "checkpoint_invalid",
    "checkpoint_mismatch",
    "after_close",
    "copy_only",
    "copy_mismatch",
]
TrailStatus = Literal["intact", "open", "tampered"]


@dataclass(frozen=True)
class TrailBreak:
    """One place where a trail does not verify."""

    file: str
    line: int
    kind: BreakKind
    detail: str
    chain: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}"
        if self.seq is not None:
            where += f" (chain {self.chain}, seq {self.seq})"
        return f"{where}: {self.kind}: {self.detail}"


@dataclass(frozen=True)
class ChainSummary:
    chain: str
    records: int
    first_seq: int
    last_seq: int
    last_hash: str
    files: tuple[str, ...]
    closed: bool = False
    """The chain ends with an ``audit.chain_closed`` record whose signature verifies."""
    vouched_seq: int | None = None
    """Every record up to this seq is covered by a verified signature (None: nothing is)."""
    vouched_at: str | None = None
    """When the broker signed the last verified checkpoint (ISO time)."""
    notes: tuple[str, ...] = ()
    """What could not be checked (unknown keys, unsigned closing record, S3 lag)."""

    def describe(self) -> str:
        span = f"chain {self.chain}: seq {self.first_seq}..{self.last_seq}"
        if self.closed:
            return f"{span}, closed by the broker (signed): every record vouched for"
        if self.vouched_seq is None:
            vouched = "nothing vouched for (no verifiable checkpoint)"
        elif self.vouched_seq >= self.last_seq:
            vouched = f"vouched for up to seq {self.vouched_seq} (signed {self.vouched_at})"
        else:
            vouched = (
                f"vouched for up to seq {self.vouched_seq} (signed {self.vouched_at}); "
                f"seq {self.vouched_seq + 1}..{self.last_seq} not vouched for"
            )
        return f"{span}, OPEN (no closing record: a crash, a running broker or a cut): {vouched}"


@dataclass(frozen=True)
class VerificationResult:
    files: tuple[str, ...]
    records: int
    chains: tuple[ChainSummary, ...]
    breaks: tuple[TrailBreak, ...]
    keys_given: bool = False
    copies: tuple[str, ...] = ()
    """The S3 objects compared with the files (empty: no comparison)."""
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """No break: nothing was found edited, removed from the middle, inserted or forged."""
        return not self.breaks

    @property
    def status(self) -> TrailStatus:
        """``tampered`` (a break), ``open`` (a chain without a verified closing record: its
        tail after the last verified checkpoint cannot be vouched for) or ``intact``."""
        if self.breaks:
            return "tampered"
        if not self.chains or not all(c.closed for c in self.chains):
            return "open"
        return "intact"

    def summary(self) -> str:
        compared = f", compared with {len(self.copies)} S3 object(s)" if self.copies else ""
        status = self.status
        if status == "tampered":
            verdict = f"TAMPERED: {len(self.breaks)} break(s)"
        elif status == "open":
            verdict = "OPEN: not every chain was closed by the broker (see below)"
        else:
            verdict = "intact"
        head = (
            f"{self.records} records in {len(self.files)} file(s), {len(self.chains)} "
            f"chain(s){compared}: {verdict}"
        )
        lines = [head, *(f"  {b}" for b in self.breaks)]
        lines += [f"  {c.describe()}" for c in self.chains]
        lines += [f"    note: {n}" for c in self.chains for n in c.notes]
        lines += [f"  note: {n}" for n in self.notes]
        if not self.keys_given:
            lines.append(
                "  note: no verification keys given: checkpoint signatures were not checked, "
                "so nothing is vouched for"
            )
        return "\n".join(lines)


@dataclass
class _Entry:
    file: str
    line: int
    record: dict[str, Any]
    chain: str
    seq: int
    hash_ok: bool


Line = tuple[str, int, "dict[str, Any] | None", str]


def _parse_lines(name: str, raw_lines: Iterable[bytes]) -> Iterable[Line]:
    for number, raw in enumerate(raw_lines, start=1):
        text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        try:
            record = json.loads(text)
        except ValueError:
            record = None
        yield name, number, record if isinstance(record, dict) else None, text


def read_trail(paths: Iterable[Path]) -> Iterable[Line]:
    """Every line of the files as ``(file, line number, record or None, raw text)``."""
    for path in paths:
        with Path(path).open("rb") as handle:
            yield from _parse_lines(str(path), handle)


def read_copies(copies: Iterable[tuple[str, bytes]]) -> Iterable[Line]:
    """Every line of in-memory copies (``(name, content)``, e.g. S3 objects), like `read_trail`."""
    for name, content in copies:
        yield from _parse_lines(name, content.splitlines(keepends=True))


# -- verification keys --------------------------------------------------------------------


class AuditSourceError(Exception):
    """Verification keys or S3 copies could not be read (the message names the source)."""


def _jwk_entries(document: Any) -> list[dict[str, Any]]:
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        return [k for k in document["keys"] if isinstance(k, dict)]
    if isinstance(document, dict) and "kty" in document:
        return [document]
    raise ValueError("not a JWKS or a JWK")


def _public_jwk_from_key_file(path: Path) -> dict[str, Any]:
    from cryptography.hazmat.primitives import serialization

    record = json.loads(path.read_text())
    private_key = serialization.load_pem_private_key(
        record["private_key_pem"].encode(), password=None
    )
    public = jwt.get_algorithm_by_name(record["alg"]).to_jwk(
        private_key.public_key(),  # type: ignore[union-attr]
        as_dict=True,
    )
    return {**public, "kid": record["kid"], "alg": record["alg"], "use": "sig"}


def load_verification_keys(sources: Sequence[str], *, http: Any = None) -> dict[str, jwt.PyJWK]:
    """Public keys by ``kid`` from each source: a JWKS (or JWK) file, the broker's signing key
    directory (every key file in it, retired ones included), or the URL of a published JWKS
    (fetched with `http`, an ``httpx.Client``, or a new one). Keep copies of the JWKS: retired
    keys leave the published set once their tokens have expired."""
    keys: dict[str, jwt.PyJWK] = {}
    for source in sources:
        try:
            if source.startswith(("https://", "http://")):
                import httpx

                client = http or httpx.Client(timeout=10.0, follow_redirects=False)
                response = client.get(source)
                response.raise_for_status()
                entries = _jwk_entries(response.json())
            elif Path(source).is_dir():
                entries = [
                    _public_jwk_from_key_file(p) for p in sorted(Path(source).glob("*.key.json"))
                ]
                for extra in sorted(Path(source).glob("*.jwks.json")):
                    entries += _jwk_entries(json.loads(extra.read_text()))
            else:
                entries = _jwk_entries(json.loads(Path(source).read_text()))
            for entry in entries:
                kid, alg = entry.get("kid"), entry.get("alg")
                if isinstance(kid, str) and isinstance(alg, str):
                    keys[kid] = jwt.PyJWK(entry, algorithm=alg)
        except Exception as exc:  # OSError, ValueError, KeyError, httpx and JWK errors
            raise AuditSourceError(
                f"cannot read verification keys from {source}: {type(exc).__name__}: {exc}"
            ) from None
    return keys


def _verify_signature(
    record: Mapping[str, Any], keys: Mapping[str, jwt.PyJWK] | None
) -> tuple[Literal["valid", "unverified", "invalid"], dict[str, Any], str]:
    signature = record.get("signature")
    if not isinstance(signature, str):
        return "unverified", {}, "the record carries no signature"
    try:
        header = jwt.get_unverified_header(signature)
    except jwt.PyJWTError:
        return "invalid", {}, "the signature is not a JWS"
    kid = header.get("kid")
    if header.get("typ") != CHECKPOINT_TYP:
        return "invalid", {}, "the signature is not a checkpoint (JOSE typ)"
    if keys is None:
        return "unverified", {}, "no verification keys given"
    key = keys.get(kid) if isinstance(kid, str) else None
    if key is None:
        return "unverified", {}, f"signed with key {str(kid)[:64]!r}, not among the keys given"
    try:
        claims = jwt.decode(
            signature,
            key.key,
            algorithms=[key.algorithm_name],
            options={
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": False,
                "require": ["chain", "seq", "hash", "final", "iat"],
            },
        )
    except jwt.PyJWTError as exc:
        return "invalid", {}, f"the signature does not verify with key {kid} ({type(exc).__name__})"
    return "valid", claims, ""


# -- the checks -----------------------------------------------------------------------------


@dataclass
class _Analysis:
    entries: dict[str, list[_Entry]]
    breaks: list[TrailBreak]
    summaries: list[ChainSummary]
    total: int


def _span(seqs: Sequence[int]) -> str:
    return f"{seqs[0]}" if len(seqs) == 1 else f"{seqs[0]}..{seqs[-1]}"


def _analyse(lines: Iterable[Line], keys: Mapping[str, jwt.PyJWK] | None) -> _Analysis:
    breaks: list[TrailBreak] = []
    chains: dict[str, list[_Entry]] = {}
    total = 0
    for file, line, record, text in lines:
        total += 1
        if record is None or not all(k in record for k in _CHAIN_FIELDS):
            what = "empty line" if not text.strip() else "not a chained JSON record"
            breaks.append(TrailBreak(file, line, "malformed", what))
            continue
        chain, seq = str(record["chain"]), record["seq"]
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
            breaks.append(TrailBreak(file, line, "malformed", f"bad seq {seq!r}", chain))
            continue
        ok = record_hash(record) == record["hash"]
        chains.setdefault(chain, []).append(_Entry(file, line, record, chain, seq, ok))

    summaries: list[ChainSummary] = []
    for chain, entries in chains.items():
        breaks.extend(_chain_breaks(chain, entries, chains))
        valid = [e for e in entries if e.hash_ok]
        if not valid:
            continue
        vouching, notes = _checkpoints(chain, entries, valid, keys)
        breaks.extend(vouching.breaks)
        last = max(valid, key=lambda e: e.seq)
        summaries.append(
            ChainSummary(
                chain,
                len(entries),
                min(e.seq for e in valid),
                last.seq,
                str(last.record["hash"]),
                tuple(dict.fromkeys(e.file for e in entries)),
                closed=vouching.closed,
                vouched_seq=vouching.vouched_seq,
                vouched_at=vouching.vouched_at,
                notes=tuple(notes),
            )
        )
    return _Analysis(chains, breaks, summaries, total)


def _chain_breaks(
    chain: str, entries: list[_Entry], chains: Mapping[str, list[_Entry]]
) -> list[TrailBreak]:
    """Hashes, order and links of one chain."""
    breaks: list[TrailBreak] = []
    valid = [e for e in entries if e.hash_ok]
    by_seq: dict[int, list[_Entry]] = {}
    for entry in valid:
        by_seq.setdefault(entry.seq, []).append(entry)
    present = {e.seq for e in entries}  # an edited record still holds its place
    highest = -1
    for entry in entries:
        where = (entry.file, entry.line)
        if not entry.hash_ok:
            highest = max(highest, entry.seq)
            breaks.append(
                TrailBreak(
                    *where,
                    "hash_mismatch",
                    "the record's content does not match its hash (edited)",
                    chain,
                    entry.seq,
                )
            )
            continue
        twins = by_seq[entry.seq]
        if len(twins) > 1 and twins[0] is not entry:
            breaks.append(
                TrailBreak(
                    *where,
                    "duplicate_seq",
                    f"seq {entry.seq} already at {twins[0].file}:{twins[0].line} "
                    "(a record was inserted or replayed)",
                    chain,
                    entry.seq,
                )
            )
            continue
        expected = highest + 1
        if entry.seq > expected:
            missing = [s for s in range(expected, entry.seq) if s not in present]
            if missing:
                breaks.append(
                    TrailBreak(
                        *where,
                        "seq_gap",
                        f"seq {_span(missing)} missing before this record (deleted)",
                        chain,
                        entry.seq,
                    )
                )
            else:
                breaks.append(
                    TrailBreak(
                        *where,
                        "reorder",
                        f"seq {entry.seq} comes before seq {expected}",
                        chain,
                        entry.seq,
                    )
                )
        elif entry.seq < expected:
            breaks.append(
                TrailBreak(
                    *where,
                    "reorder",
                    f"seq {entry.seq} comes after seq {highest}",
                    chain,
                    entry.seq,
                )
            )
        highest = max(highest, entry.seq)
        prev = entry.record["prev"]
        if entry.seq == 0:
            if prev != GENESIS:
                breaks.append(
                    TrailBreak(
                        *where,
                        "prev_mismatch",
                        "the first record of a chain must have the genesis prev",
                        chain,
                        0,
                    )
                )
        elif entry.seq - 1 in by_seq:
            before = by_seq[entry.seq - 1]
            if all(prev != b.record["hash"] for b in before):
                breaks.append(
                    TrailBreak(
                        *where,
                        "prev_mismatch",
                        f"prev is not the hash of seq {entry.seq - 1} at "
                        f"{before[0].file}:{before[0].line} (that record was edited and "
                        "re-hashed, or this one forged)",
                        chain,
                        entry.seq,
                    )
                )
        if entry.record.get("event") == CHAIN_STARTED and "previous_chain" in entry.record:
            link = _check_link(entry, chains)
            if link is not None:
                breaks.append(link)
    return breaks


@dataclass
class _Vouching:
    breaks: list[TrailBreak] = field(default_factory=list)
    closed: bool = False
    vouched_seq: int | None = None
    vouched_at: str | None = None


def _checkpoints(
    chain: str,
    entries: list[_Entry],
    valid: list[_Entry],
    keys: Mapping[str, jwt.PyJWK] | None,
) -> tuple[_Vouching, list[str]]:
    """What the chain's signed checkpoints vouch for, and forged or misplaced ones."""
    result = _Vouching()
    notes: list[str] = []
    hashes: dict[int, set[str]] = {}
    for entry in valid:
        hashes.setdefault(entry.seq, set()).add(str(entry.record["hash"]))
    last_seq = max(e.seq for e in entries)
    for entry in valid:
        event = entry.record.get("event")
        if event not in _CHECKPOINT_EVENTS:
            continue
        final = event == CHAIN_CLOSED
        where = (entry.file, entry.line)
        state, claims, detail = _verify_signature(entry.record, keys)
        if state == "invalid":
            result.breaks.append(TrailBreak(*where, "checkpoint_invalid", detail, chain, entry.seq))
            continue
        if state == "unverified":
            what = "closing record" if final else "checkpoint"
            notes.append(f"{what} at seq {entry.seq} not verified: {detail}")
            continue
        seq = claims.get("seq")
        if (
            claims.get("chain") != chain
            or claims.get("final") is not final
            or not isinstance(seq, int)
            or seq != entry.record.get("vouches_seq")
            or claims.get("hash") != entry.record.get("vouches_hash")
            or seq >= entry.seq
            or (final and seq != entry.seq - 1)
        ):
            result.breaks.append(
                TrailBreak(
                    *where,
                    "checkpoint_invalid",
                    "the signed checkpoint does not belong at this place of this chain (moved "
                    "or forged)",
                    chain,
                    entry.seq,
                )
            )
            continue
        if seq in hashes and claims["hash"] not in hashes[seq]:
            result.breaks.append(
                TrailBreak(
                    *where,
                    "checkpoint_mismatch",
                    f"seq {seq} does not have the hash this checkpoint signed (the records up "
                    "to it were rewritten)",
                    chain,
                    entry.seq,
                )
            )
            continue
        covered = entry.seq if seq == entry.seq - 1 else seq
        if result.vouched_seq is None or covered > result.vouched_seq:
            result.vouched_seq = covered
            iat = claims.get("iat")
            result.vouched_at = (
                datetime.fromtimestamp(iat, UTC).isoformat() if isinstance(iat, int) else None
            )
        if final:
            if entry.seq < last_seq:
                result.breaks.append(
                    TrailBreak(
                        *where,
                        "after_close",
                        f"seq {entry.seq + 1}..{last_seq} follow the record that closed the "
                        "chain (appended later: forged)",
                        chain,
                        entry.seq,
                    )
                )
            else:
                result.closed = True
    return result, notes


def _compare_with_copies(files: _Analysis, copies: _Analysis) -> tuple[list[TrailBreak], list[str]]:
    """The files against the S3 Object Lock copies of the same chains."""
    breaks: list[TrailBreak] = []
    notes: list[str] = []
    for chain, copied in copies.entries.items():
        copy_by_seq: dict[int, _Entry] = {}
        for entry in copied:
            if entry.hash_ok:
                copy_by_seq.setdefault(entry.seq, entry)
        if not copy_by_seq:
            continue
        in_files = files.entries.get(chain, [])
        seqs = sorted(copy_by_seq)
        if not in_files:
            first = copy_by_seq[seqs[0]]
            breaks.append(
                TrailBreak(
                    first.file,
                    first.line,
                    "copy_only",
                    f"chain {chain} (seq {_span(seqs)}, {len(seqs)} records) is in the S3 "
                    "copies but in none of the files (removed)",
                    chain,
                    seqs[0],
                )
            )
            continue
        file_seqs = {e.seq for e in in_files}
        missing = [s for s in seqs if s not in file_seqs]
        if missing:
            first = copy_by_seq[missing[0]]
            breaks.append(
                TrailBreak(
                    first.file,
                    first.line,
                    "copy_only",
                    f"seq {_span(missing)} of chain {chain} are in the S3 copies but not in the "
                    "files (removed)",
                    chain,
                    missing[0],
                )
            )
        for entry in in_files:
            copy = copy_by_seq.get(entry.seq)
            if entry.hash_ok and copy is not None and copy.record["hash"] != entry.record["hash"]:
                breaks.append(
                    TrailBreak(
                        entry.file,
                        entry.line,
                        "copy_mismatch",
                        f"differs from its S3 copy {copy.file}:{copy.line} (rewritten)",
                        chain,
                        entry.seq,
                    )
                )
    for chain, entries in files.entries.items():
        copied_seqs = {e.seq for e in copies.entries.get(chain, [])}
        lagging = sorted(e.seq for e in entries if e.seq not in copied_seqs)
        if lagging:
            notes.append(
                f"chain {chain}: seq {_span(lagging)} not (yet) in the S3 copies "
                "(the sink uploads in batches; an upload may have failed)"
            )
    return breaks, notes


def verify_trail(
    paths: Sequence[Path],
    *,
    keys: Mapping[str, jwt.PyJWK] | None = None,
    copies: Sequence[tuple[str, bytes]] | None = None,
) -> VerificationResult:
    """Check every chain in the given files (in the order given): hashes, links and order, the
    signed checkpoints (against `keys`, the broker's public keys by ``kid``) and, with `copies`
    (the S3 Object Lock objects, see `read_s3_copies`), that the files hold exactly what was
    copied.

    Each record is checked on its own (``hash_mismatch``: edited), then against its chain:
    ``seq_gap`` (records missing: deleted), ``reorder`` (out of order), ``duplicate_seq`` (a
    seq seen twice: inserted or replayed), ``prev_mismatch`` (does not link to the record before
    it: that record was edited and re-hashed, or this one inserted), and for
    ``audit.chain_started`` records the link to the earlier chain of the same file. Checkpoints:
    ``checkpoint_invalid`` (a signature that does not verify, or one moved from elsewhere),
    ``checkpoint_mismatch`` (the records it signed were rewritten), ``after_close`` (records
    after the closing record). Copies: ``copy_only`` (in S3, not in the files: removed) and
    ``copy_mismatch`` (rewritten). A chain without a verified closing record is open: see
    `VerificationResult.status` and `ChainSummary.vouched_seq`.
    """
    files = _analyse(read_trail(paths), keys)
    breaks = list(files.breaks)
    notes: list[str] = []
    summaries = files.summaries
    names = list(map(str, paths))
    if copies is not None:
        copied = _analyse(read_copies(copies), keys)
        breaks += copied.breaks
        compared, notes = _compare_with_copies(files, copied)
        breaks += compared
        names += [name for name, _ in copies]
    order = {name: i for i, name in enumerate(names)}
    breaks.sort(key=lambda b: (order.get(b.file, len(order)), b.line))
    return VerificationResult(
        tuple(map(str, paths)),
        files.total,
        tuple(summaries),
        tuple(breaks),
        keys_given=keys is not None,
        copies=tuple(name for name, _ in copies or ()),
        notes=tuple(notes),
    )


def _check_link(entry: _Entry, chains: Mapping[str, list[_Entry]]) -> TrailBreak | None:
    record = entry.record
    chain, seq, digest = (
        record.get("previous_chain"),
        record.get("previous_seq"),
        record.get("previous_hash"),
    )
    candidates = [e for e in chains.get(str(chain), []) if e.seq == seq and e.hash_ok]
    if not candidates:
        return TrailBreak(
            entry.file,
            entry.line,
            "link_missing",
            f"the earlier chain's last record (chain {chain}, seq {seq}) is not in the trail "
            "(cut off the end?)",
            entry.chain,
            entry.seq,
        )
    if all(c.record["hash"] != digest for c in candidates):
        return TrailBreak(
            entry.file,
            entry.line,
            "link_mismatch",
            f"chain {chain} seq {seq} does not have the hash this chain started after",
            entry.chain,
            entry.seq,
        )
    return None

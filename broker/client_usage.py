"""Usage reporting for gateways (the broker's ``POST /v1/usage``): the records, the request and
its answer (shared by the sync and async gateway clients), and reporters that batch in the
background so a provider call never waits for the broker.

```python
reporter = UsageReporter(gateway_client)          # a daemon thread; AsyncUsageReporter: a task
reporter.submit(UsageRecord(call_id=..., agent_token=token, credential="openai-api-key",
                            provider="openai", model="gpt-4o-mini",
                            units={"input_tokens": 1200, "output_tokens": 300},
                            usage_ref=auth.last_usage_ref))  # returns at once
reporter.close()                                  # flushes what is queued, within a timeout
```

Reports are idempotent by ``call_id`` at the broker, so a batch that failed (broker unreachable,
5xx, 429) is sent again, with growing pauses, until it is answered. A full queue drops the new
record (counted in `dropped`, logged at most once a minute) rather than block the caller. No
token ever appears in a ``repr`` or a log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from broker.client import AgentToken, AsyncGatewayClient, GatewayClient

log = logging.getLogger("broker.client.usage")

MAX_BATCH = 100
"""The broker takes at most this many records per report."""
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
RETRY_ERROR = "temporarily_unavailable"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One provider call, as a gateway reports it."""

    call_id: str
    agent_token: AgentToken | str = field(repr=False)
    credential: str
    provider: str
    model: str
    units: Mapping[str, float]
    status: str = "ok"
    occurred_at: float | None = None
    usage_ref: str | None = None
    """The fetch answer's ``usage_ref`` (a deny budget's reservation this call settles)."""
    cost: tuple[str, str] | None = None
    """The gateway's own price of the call: (decimal amount, ISO 4217 currency)."""


@dataclass(frozen=True, slots=True)
class UsageResult:
    """The broker's answer for one record: ``recorded`` or ``duplicate``, or an ``error``."""

    call_id: str | None
    outcome: str | None
    cost: str | None = None
    currency: str | None = None
    priced_by: str | None = None
    error: str | None = None
    error_description: str | None = None


def usage_body(records: Sequence[UsageRecord]) -> dict[str, Any]:
    """The JSON body of ``POST /v1/usage`` for `records`."""
    if not 1 <= len(records) <= MAX_BATCH:
        raise ValueError(f"a usage report carries 1..{MAX_BATCH} records")
    out = []
    for record in records:
        token = record.agent_token
        item: dict[str, Any] = {
            "call_id": record.call_id,
            "token": token if isinstance(token, str) else token.access_token,
            "credential": record.credential,
            "provider": record.provider,
            "model": record.model,
            "units": dict(record.units),
            "status": record.status,
        }
        if record.occurred_at is not None:
            item["occurred_at"] = record.occurred_at
        if record.usage_ref is not None:
            item["usage_ref"] = record.usage_ref
        if record.cost is not None:
            item["cost"] = {"amount": record.cost[0], "currency": record.cost[1]}
        out.append(item)
    return {"records": out}


def usage_results(body: Mapping[str, Any]) -> list[UsageResult]:
    results = body.get("results")
    if not isinstance(results, list):
        return []
    return [
        UsageResult(
            call_id=r.get("call_id"),
            outcome=r.get("outcome"),
            cost=r.get("cost"),
            currency=r.get("currency"),
            priced_by=r.get("priced_by"),
            error=r.get("error"),
            error_description=r.get("error_description"),
        )
        for r in results
        if isinstance(r, Mapping)
    ]


def _dated(record: UsageRecord) -> UsageRecord:
    """The record dated now when the gateway left `occurred_at` out (a retried report must not
    be dated at delivery)."""
    if record.occurred_at is not None:
        return record
    return dataclasses.replace(record, occurred_at=time.time())


def _retryable(exc: BaseException) -> bool:
    from broker.client import BrokerClientError

    if isinstance(exc, httpx.TransportError):
        return True
    return isinstance(exc, BrokerClientError) and exc.status in RETRY_STATUSES


class _Counters:
    """What a reporter counts (never a token)."""

    def __init__(self) -> None:
        self.sent = 0
        """Records the broker answered (recorded, duplicate, or refused by record)."""
        self.rejected = 0
        """Records the broker refused (a bad record: logged, not sent again)."""
        self.dropped = 0
        """Records not queued because the queue was full."""
        self.failed_batches = 0
        """Batches refused as a whole (the gateway's own credentials, say): not sent again."""
        self._drop_logged = 0.0
        self._count_lock = threading.Lock()

    def note_drop(self) -> None:
        with self._count_lock:  # submit may be called from many threads
            self.dropped += 1
            now = time.monotonic()
            if now - self._drop_logged < 60:
                return
            self._drop_logged = now
        log.warning("usage queue full: %d record(s) dropped so far", self.dropped)

    def again(
        self, batch: Sequence[UsageRecord], results: Sequence[UsageResult]
    ) -> list[UsageRecord]:
        """Count the final answers; return the records the broker could not store yet
        (``temporarily_unavailable`` per record: its state store is unreachable)."""
        if len(results) != len(batch):
            self.note_answer(results)
            return []
        retry = [rec for rec, res in zip(batch, results, strict=True) if res.error == RETRY_ERROR]
        self.note_answer([res for res in results if res.error != RETRY_ERROR])
        return retry

    def note_answer(self, results: Sequence[UsageResult]) -> None:
        self.sent += len(results)
        refused = [r for r in results if r.error]
        self.rejected += len(refused)
        for result in refused[:3]:
            log.warning(
                "usage record refused call_id=%s error=%s: %s",
                result.call_id,
                result.error,
                result.error_description,
            )


class UsageReporter(_Counters):
    """Reports usage through a `GatewayClient` from a daemon thread (see the module docstring)."""

    def __init__(
        self,
        gateway: GatewayClient,
        *,
        batch_size: int = 50,
        flush_interval: float = 1.0,
        max_queue: int = 10_000,
        max_backoff: float = 30.0,
    ) -> None:
        super().__init__()
        self._gateway = gateway
        self._batch = max(1, min(batch_size, MAX_BATCH))
        self._interval = flush_interval
        self._max_backoff = max_backoff
        self._queue: queue.Queue[UsageRecord] = queue.Queue(maxsize=max_queue)
        self._closing = threading.Event()
        self._idle = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="usage-reporter", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"UsageReporter(pending={self.pending}, sent={self.sent}, dropped={self.dropped})"

    @property
    def pending(self) -> int:
        """Records queued or being sent: taken from the queue but not yet answered included
        (`queue.Queue`'s unfinished tasks, so there is no moment a record is in neither)."""
        return self._queue.unfinished_tasks

    def submit(self, record: UsageRecord) -> bool:
        """Queue `record`; False (and counted) when the queue is full. Never blocks."""
        try:
            self._queue.put_nowait(_dated(record))
        except queue.Full:
            self.note_drop()
            return False
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until everything queued so far was answered; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._idle:
            while self.pending:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.05 if remaining is None else min(remaining, 0.05))
        return True

    def close(self, timeout: float = 5.0) -> bool:
        """Flush (within `timeout`), then stop the thread. True when nothing was left."""
        flushed = self.flush(timeout)
        self._closing.set()
        self._thread.join(timeout)
        return flushed

    def _take(self) -> list[UsageRecord]:
        try:
            batch = [self._queue.get(timeout=0.1)]
        except queue.Empty:
            return []
        deadline = time.monotonic() + self._interval
        while len(batch) < self._batch:
            try:
                if self._closing.is_set():  # draining: take what is there, no waiting
                    batch.append(self._queue.get_nowait())
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                batch.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return batch

    def _run(self) -> None:
        while not (self._closing.is_set() and self._queue.empty()):
            batch = self._take()
            if not batch:
                continue
            self._send(batch)
            for _ in batch:
                self._queue.task_done()
            with self._idle:
                self._idle.notify_all()

    def _send(self, batch: list[UsageRecord]) -> None:
        pause = 0.5
        while True:
            try:
                batch = self.again(batch, self._gateway.report_usage(batch))
                if not batch:
                    return
                if self._closing.is_set():
                    self.failed_batches += 1
                    log.error("usage report of %d record(s) failed: %s", len(batch), RETRY_ERROR)
                    return
                reason = RETRY_ERROR
            except Exception as exc:
                if not _retryable(exc) or self._closing.is_set():
                    self.failed_batches += 1
                    log.error(
                        "usage report of %d record(s) failed: %s", len(batch), type(exc).__name__
                    )
                    return
                reason = type(exc).__name__
            log.info("usage report failed (%s); retrying in %.1f s", reason, pause)
            if self._closing.wait(pause):
                pause = 0.0  # closing: one last immediate try
            pause = min(max(pause * 2, 0.5), self._max_backoff)


class AsyncUsageReporter(_Counters):
    """Reports usage through an `AsyncGatewayClient` from an asyncio task (create it inside the
    running event loop; `aclose` it before the loop ends)."""

    def __init__(
        self,
        gateway: AsyncGatewayClient,
        *,
        batch_size: int = 50,
        flush_interval: float = 1.0,
        max_queue: int = 10_000,
        max_backoff: float = 30.0,
    ) -> None:
        super().__init__()
        self._gateway = gateway
        self._batch = max(1, min(batch_size, MAX_BATCH))
        self._interval = flush_interval
        self._max_backoff = max_backoff
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue(maxsize=max_queue)
        self._in_flight = 0
        self._closing = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def __repr__(self) -> str:
        return (
            f"AsyncUsageReporter(pending={self.pending}, sent={self.sent}, "
            f"dropped={self.dropped})"
        )

    @property
    def pending(self) -> int:
        return self._queue.qsize() + self._in_flight

    def submit(self, record: UsageRecord) -> bool:
        """Queue `record`; False (and counted) when the queue is full. Never waits."""
        try:
            self._queue.put_nowait(_dated(record))
        except asyncio.QueueFull:
            self.note_drop()
            return False
        return True

    async def flush(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.pending:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def aclose(self, timeout: float = 5.0) -> bool:
        flushed = await self.flush(timeout)
        self._closing.set()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return flushed

    async def _take(self) -> list[UsageRecord]:
        batch = [await self._queue.get()]
        self._in_flight += 1  # taken out of the queue: pending until answered
        deadline = time.monotonic() + self._interval
        while len(batch) < self._batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
            self._in_flight += 1
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._take()
            try:
                await self._send(batch)
            finally:
                self._in_flight = 0

    async def _send(self, batch: list[UsageRecord]) -> None:
        pause = 0.5
        while True:
            try:
                batch = self.again(batch, await self._gateway.report_usage(batch))
                if not batch:
                    return
                reason = RETRY_ERROR
            except Exception as exc:
                if not _retryable(exc) or self._closing.is_set():
                    self.failed_batches += 1
                    log.error(
                        "usage report of %d record(s) failed: %s", len(batch), type(exc).__name__
                    )
                    return
                reason = type(exc).__name__
            log.info("usage report failed (%s); retrying in %.1f s", reason, pause)
            await asyncio.sleep(pause)
            pause = min(pause * 2, self._max_backoff)

"""A lean HTTP/1.1 load generator, the same for every target: closed loop, or open loop at a
fixed rate.

How it works: `processes` worker processes (spawned, not forked) each run one asyncio event loop
holding ``concurrency / processes`` keep-alive TCP connections. Each connection is a bare
`asyncio.Protocol` that writes pre-built requests (the exact bytes, built once) and parses each
response just enough to find its end (status line, ``Content-Length`` or chunked framing). A
target may carry several requests (`LoadSpec.requests`, e.g. one per person token): each
connection sends them in round robin, connection ``i`` of ``n`` starting at request
``i * len(requests) // n``, so different connections have different requests in flight.

Closed loop (the default): a connection sends its next request as soon as the previous response
ends, one request in flight per connection. Latency is ``time.perf_counter_ns()`` from the write
to the last byte of the response.

Open loop (`run_load(..., rate=R)`): requests are due at fixed instants, ``1 / R`` apart over all
processes (process ``p`` of ``P`` sends the requests ``p, p + P, p + 2P, ...``). A due request
goes to an idle connection of the process's pool; when none is idle it waits in the generator's
queue (first in, first out) for the next connection to finish. Its latency runs from its *due*
time to the last byte of the response, so time spent queued in the generator counts: a slow
server cannot slow the generator down and hide its own stalls (no coordinated omission).

All workers start at the same monotonic instant and open their connections one by one over the
first part of the warm-up (clients arriving, not one burst). Closed loop: every response
completing in the measured window is counted, responses of the warm-up are discarded, and
requests still in flight when the window closes are not counted. Open loop: every request *due*
in the window is counted; after the window the generator waits (up to `OPEN_LOOP_DRAIN_SECONDS`)
for their answers, and one still unanswered then is an error. A non-2xx status or a dropped
connection is an error.

The generator shares the machine's cores with the server under test; the CPU it uses is measured
and reported next to the results.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

_HEADER_END = b"\r\n\r\n"
OPEN_LOOP_DRAIN_SECONDS = 5.0
"""Open loop: how long after the window the requests due in it may still be answered."""


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """One target: where to connect and the exact request bytes to send, over and over.

    `requests` holds one or more pre-built requests, sent in round robin by every connection
    (each from its own starting point); `LoadSpec.one` builds a target with a single request.
    """

    label: str
    host: str
    port: int
    requests: tuple[bytes, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.requests, tuple) or not self.requests:
            raise TypeError(
                "LoadSpec.requests is a non-empty tuple of requests (LoadSpec.one for one request)"
            )
        if not all(isinstance(request, bytes) for request in self.requests):
            raise TypeError("LoadSpec.requests holds request bytes")

    @classmethod
    def one(cls, label: str, host: str, port: int, request: bytes) -> LoadSpec:
        """A target sending the same request every time."""
        return cls(label, host, port, (request,))


@dataclass(slots=True)
class LoadResult:
    """What the workers measured in the window (latencies in nanoseconds).

    Open loop (`offered_rps` set): `seconds` runs from the window's start to the last answer to
    a request due in the window (at least the window), so `rps` is the rate achieved.
    """

    label: str
    seconds: float
    latencies_ns: array = field(default_factory=lambda: array("q"))
    ok: int = 0
    errors: int = 0
    error_statuses: dict[int, int] = field(default_factory=dict)
    dropped_connections: int = 0
    generator_cpu_seconds: float = 0.0
    offered_rps: float | None = None
    """Open loop: the rate requests were due at (None: closed loop)."""
    unanswered: int = 0
    """Open loop: requests due in the window still unanswered after the drain (in `errors`)."""

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        """Nearest-rank percentile of the successful requests' latency, in milliseconds."""
        if not self.latencies_ns:
            return float("nan")
        ordered = sorted(self.latencies_ns)
        rank = max(1, min(len(ordered), round(p / 100.0 * len(ordered) + 0.5)))
        return ordered[rank - 1] / 1e6

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ns) / 1e6 if self.latencies_ns else float("nan")


def build_request(
    method: str,
    host: str,
    port: int,
    path: str,
    *,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """The exact HTTP/1.1 request bytes (keep-alive; Content-Length when there is a body)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body or method in {"POST", "PUT", "PATCH"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def first_request(connection: int, connections: int, requests: int) -> int:
    """Where connection `connection` (of `connections`, over every process) starts its round
    robin over `requests` requests: evenly apart, so the connections send different ones."""
    return connection * requests // max(1, connections) % requests


class _Cycle:
    """A connection's round robin over a target's requests (kept across reconnections)."""

    __slots__ = ("_next", "_requests")

    def __init__(self, requests: tuple[bytes, ...], start: int) -> None:
        self._requests = requests
        self._next = start % len(requests)

    def next(self) -> bytes:
        request = self._requests[self._next]
        self._next = (self._next + 1) % len(self._requests)
        return request


class _ParseError(Exception):
    pass


def _response_end(buf: bytearray, header_end: int, headers: bytes) -> int | None:
    """Index just past the response that starts `buf`, or None if it is still incomplete."""
    lowered = headers.lower()
    cl_at = lowered.find(b"\r\ncontent-length:")
    if cl_at >= 0:
        line_end = lowered.find(b"\r\n", cl_at + 2)
        length = int(lowered[cl_at + 17 : line_end if line_end >= 0 else None].strip())
        end = header_end + length
        return end if len(buf) >= end else None
    if b"\r\ntransfer-encoding: chunked" in lowered:
        pos = header_end
        while True:
            size_end = buf.find(b"\r\n", pos)
            if size_end < 0:
                return None
            size = int(bytes(buf[pos:size_end]).split(b";")[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n", size_end + 2)  # no trailers expected
                return trailer_end + 2 if trailer_end >= 0 else None
            pos = size_end + 2 + size + 2
            if len(buf) < pos:
                return None
    status = headers[9:12]
    if status[:1] == b"1" or status in {b"204", b"304"}:
        return header_end  # no body
    raise _ParseError("response without Content-Length or chunked framing")


class _Run:
    """State shared by one worker's connections.

    Closed loop: a request belongs to the window its response completes in. Open loop
    (`open_loop`): to the window it was due in; `pending` holds the due times of requests
    waiting for a connection, `idle` the connections waiting for a request, and `outstanding`
    counts the window's requests not answered yet.
    """

    def __init__(
        self, spec: LoadSpec, measure_start_ns: int, measure_end_ns: int, *, open_loop: bool
    ) -> None:
        self.spec = spec
        self.measure_start_ns = measure_start_ns
        self.measure_end_ns = measure_end_ns
        self.open_loop = open_loop
        self.latencies = array("q")
        self.ok = 0
        self.errors = 0
        self.error_statuses: dict[int, int] = {}
        self.dropped = 0
        self.stopping = False
        self.open_clients: set[_Client] = set()
        self.pending: deque[int] = deque()
        self.idle: deque[_Client] = deque()
        self.outstanding = 0
        self.last_answer_ns = measure_end_ns

    def in_window(self, stamp_ns: int) -> bool:
        return self.measure_start_ns <= stamp_ns < self.measure_end_ns

    def record(self, status: int, started_ns: int, finished_ns: int) -> None:
        if not self.in_window(started_ns if self.open_loop else finished_ns):
            return
        if self.open_loop:
            self.outstanding -= 1
            self.last_answer_ns = max(self.last_answer_ns, finished_ns)
        if 200 <= status < 300:
            self.ok += 1
            self.latencies.append(finished_ns - started_ns)
        else:
            self.errors += 1
            self.error_statuses[status] = self.error_statuses.get(status, 0) + 1

    def dropped_connection(self, started_ns: int | None = None) -> None:
        """A connection failed; `started_ns` is the start (open loop: due time) of the request
        it lost, None when it had none in flight (a refused connect)."""
        lost_request = self.open_loop and started_ns is not None
        stamp = started_ns if lost_request and started_ns is not None else time.perf_counter_ns()
        if self.in_window(stamp):
            self.dropped += 1
            self.errors += 1
            if lost_request:
                self.outstanding -= 1

    # -- open loop ------------------------------------------------------------------------

    def due(self, due_ns: int) -> None:
        """A request is due: an idle connection sends it, or it queues in the generator."""
        if self.in_window(due_ns):
            self.outstanding += 1
        while self.idle:
            client = self.idle.popleft()
            if client.usable:
                client.send(due_ns)
                return
        self.pending.append(due_ns)

    def ready(self, client: _Client) -> None:
        """`client` can send: the oldest queued request, or it waits idle for the next one (or it
        closes, the run being over)."""
        if self.stopping:
            client.close()
        elif self.pending:
            client.send(self.pending.popleft())
        else:
            self.idle.append(client)


class _Client(asyncio.Protocol):
    """One keep-alive connection with at most one request in flight."""

    def __init__(self, run: _Run, cycle: _Cycle) -> None:
        self._run = run
        self._cycle = cycle
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._header_end = -1
        self._headers = b""
        self._started_ns = 0
        self._in_flight = False
        self.closed = asyncio.get_running_loop().create_future()

    @property
    def usable(self) -> bool:
        return self._transport is not None and not self._transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._run.open_clients.add(self)
        self._next()

    def _next(self) -> None:
        if self._run.open_loop:
            self._run.ready(self)
        else:
            self.send(time.perf_counter_ns())

    def send(self, started_ns: int) -> None:
        """Write the next request of the round robin; its latency runs from `started_ns`."""
        if self._run.stopping or self._transport is None:
            self.close()
            return
        self._buf.clear()
        self._header_end = -1
        self._in_flight = True
        self._started_ns = started_ns
        self._transport.write(self._cycle.next())

    def close(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if self._header_end < 0:
            at = self._buf.find(_HEADER_END)
            if at < 0:
                return
            self._header_end = at + 4
            self._headers = bytes(self._buf[: self._header_end])
        try:
            end = _response_end(self._buf, self._header_end, self._headers)
        except (_ParseError, ValueError):
            self._in_flight = False
            self._run.dropped_connection(self._started_ns)
            self.close()
            return
        if end is None:
            return
        finished = time.perf_counter_ns()
        self._in_flight = False
        status = int(self._headers[9:12])
        self._run.record(status, self._started_ns, finished)
        if b"\r\nconnection: close" in self._headers.lower():
            self.close()
            return
        self._next()

    def connection_lost(self, exc: Exception | None) -> None:
        self._run.open_clients.discard(self)
        with contextlib.suppress(ValueError):
            self._run.idle.remove(self)
        if self._in_flight and not self._run.stopping:
            self._run.dropped_connection(self._started_ns)
        if not self.closed.done():
            self.closed.set_result(None)


async def _connection_loop(run: _Run, delay: float, cycle: _Cycle) -> None:
    """Keep one connection open until the run stops (reconnecting if the server drops it)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(delay)
    while not run.stopping:
        try:
            _, client = await loop.create_connection(
                lambda: _Client(run, cycle), run.spec.host, run.spec.port
            )
        except OSError:
            run.dropped_connection()
            await asyncio.sleep(0.05)
            continue
        await client.closed


async def _schedule(run: _Run, first_ns: int, interval_ns: float, until_ns: int) -> None:
    """Open loop: make request ``k`` due at ``first_ns + k * interval_ns`` until `until_ns`.
    When the loop wakes late, every request already due is issued at once, each with its own
    due time (so the lateness counts in their latency)."""
    k = 0
    while not run.stopping:
        due_ns = first_ns + round(k * interval_ns)
        if due_ns >= until_ns:
            return
        wait_ns = due_ns - time.perf_counter_ns()
        if wait_ns > 0:
            await asyncio.sleep(wait_ns / 1e9)
            continue
        run.due(due_ns)
        k += 1


async def _drain(run: _Run, timeout: float) -> None:
    """Open loop: wait until every request due in the window has its answer (or `timeout`)."""
    deadline = time.monotonic() + timeout
    while run.outstanding > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One worker process's share of a run."""

    spec: LoadSpec
    connections: int
    first_connection: int
    """The global index of its first connection (over every process): its round robin start."""
    total_connections: int
    start_at: float
    """On the monotonic clock shared by every process (CLOCK_MONOTONIC on Linux)."""
    warmup: float
    seconds: float
    offset: float
    """Its share of the connection spread: ``index / processes``."""
    first_due: float | None = None
    """Open loop: seconds after the start its first request is due (None: closed loop)."""
    interval: float = 0.0
    """Open loop: seconds between its requests."""


async def _run_worker(plan: _Plan) -> dict[str, Any]:
    now_mono = time.monotonic()
    now_ns = time.perf_counter_ns()
    start_ns = now_ns + int((plan.start_at - now_mono) * 1e9)
    measure_start_ns = start_ns + int(plan.warmup * 1e9)
    measure_end_ns = measure_start_ns + int(plan.seconds * 1e9)
    open_loop = plan.first_due is not None
    run = _Run(plan.spec, measure_start_ns, measure_end_ns, open_loop=open_loop)
    await asyncio.sleep(max(0.0, (start_ns - time.perf_counter_ns()) / 1e9))
    # Clients arrive over the first part of the warm-up rather than in one burst: a burst lets
    # whichever server process wakes first accept every connection.
    spread = min(0.5, plan.warmup / 2)
    requests = plan.spec.requests
    tasks = [
        asyncio.create_task(
            _connection_loop(
                run,
                spread * (i + plan.offset) / plan.connections,
                _Cycle(
                    requests,
                    first_request(plan.first_connection + i, plan.total_connections, len(requests)),
                ),
            )
        )
        for i in range(plan.connections)
    ]
    if plan.first_due is not None:
        first_ns = start_ns + round(plan.first_due * 1e9)
        tasks.append(
            asyncio.create_task(_schedule(run, first_ns, plan.interval * 1e9, measure_end_ns))
        )
    await asyncio.sleep(max(0.0, (measure_start_ns - time.perf_counter_ns()) / 1e9))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, (measure_end_ns - time.perf_counter_ns()) / 1e9))
    cpu_used = time.process_time() - cpu_start
    if open_loop:
        await _drain(run, OPEN_LOOP_DRAIN_SECONDS)
    unanswered = max(0, run.outstanding) if open_loop else 0
    run.stopping = True
    for client in list(run.idle):
        client.close()
    # Let in-flight requests finish (they are not counted), then close everything.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5.0)
    for client in list(run.open_clients):
        client.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "latencies": run.latencies.tobytes(),
        "ok": run.ok,
        "errors": run.errors + unanswered,
        "error_statuses": run.error_statuses,
        "dropped": run.dropped,
        "unanswered": unanswered,
        "cpu": cpu_used,
        "seconds": (run.last_answer_ns - measure_start_ns) / 1e9 if open_loop else plan.seconds,
    }


def _worker_main(plan: _Plan, out: Connection) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = asyncio.run(_run_worker(plan))
        out.send(result)
    except KeyboardInterrupt:
        pass
    finally:
        out.close()


def _plans(
    spec: LoadSpec,
    *,
    concurrency: int,
    processes: int,
    start_at: float,
    warmup: float,
    seconds: float,
    rate: float | None,
) -> list[_Plan]:
    """Split the connections (and, open loop, the due instants) over the processes."""
    plans = []
    first_connection = 0
    for index in range(processes):
        share = concurrency // processes + (1 if index < concurrency % processes else 0)
        plans.append(
            _Plan(
                spec,
                share,
                first_connection,
                concurrency,
                start_at,
                warmup,
                seconds,
                index / processes,
                first_due=None if rate is None else index / rate,
                interval=0.0 if rate is None else processes / rate,
            )
        )
        first_connection += share
    return plans


def run_load(
    spec: LoadSpec,
    *,
    concurrency: int,
    processes: int,
    warmup: float,
    seconds: float,
    on_window: Any = None,
    rate: float | None = None,
) -> LoadResult:
    """Drive `spec` with `concurrency` connections spread over `processes` worker processes:
    closed loop, or with `rate` open loop at `rate` requests per second in all (the connections
    are then the pool the due requests wait for; see the module docstring).

    `on_window`, if given, is called as ``on_window("start")`` / ``on_window("end")`` in this
    process at the measured window's edges (used to sample the server's CPU time).
    """
    if rate is not None and not rate > 0:
        raise ValueError("an open-loop rate is a positive number of requests per second")
    processes = max(1, min(processes, concurrency))
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 1.0 + 0.1 * processes  # time for the workers to start
    plans = _plans(
        spec,
        concurrency=concurrency,
        processes=processes,
        start_at=start_at,
        warmup=warmup,
        seconds=seconds,
        rate=rate,
    )
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    result = LoadResult(label=spec.label, seconds=seconds, offered_rps=rate)
    try:
        for plan in plans:
            receiver, sender = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker_main,
                args=(plan, sender),
                name=f"bench-loadgen-{spec.label}",
                daemon=True,
            )
            proc.start()
            sender.close()
            workers.append((proc, receiver))
        if on_window is not None:
            time.sleep(max(0.0, start_at + warmup - time.monotonic()))
            on_window("start")
            time.sleep(max(0.0, start_at + warmup + seconds - time.monotonic()))
            on_window("end")
        deadline = start_at + warmup + seconds + 30.0
        for proc, receiver in workers:
            if not receiver.poll(max(0.1, deadline - time.monotonic())):
                raise RuntimeError(f"load generator process {proc.pid} did not report")
            try:
                part = receiver.recv()
            except EOFError:
                raise RuntimeError(
                    f"load generator process {proc.pid} died (exit code {proc.exitcode})"
                ) from None
            _merge(result, part)
    finally:
        for proc, receiver in workers:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            receiver.close()
    return result


def _merge(result: LoadResult, part: dict[str, Any]) -> None:
    """Add one worker's report to `result` (open loop: the longest answer span wins)."""
    latencies = array("q")
    latencies.frombytes(part["latencies"])
    result.latencies_ns.extend(latencies)
    result.ok += part["ok"]
    result.errors += part["errors"]
    result.dropped_connections += part["dropped"]
    result.unanswered += part["unanswered"]
    result.generator_cpu_seconds += part["cpu"]
    result.seconds = max(result.seconds, part["seconds"])
    for status, count in part["error_statuses"].items():
        result.error_statuses[status] = result.error_statuses.get(status, 0) + count


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

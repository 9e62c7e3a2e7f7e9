"""A lean closed-loop HTTP/1.1 load generator, the same for every target.

How it works: `processes` worker processes (spawned, not forked) each run one asyncio event loop
holding ``concurrency / processes`` keep-alive TCP connections. Each connection is a bare
`asyncio.Protocol` that writes pre-built requests (the exact bytes, built once), parses each
response just enough to find its end (status line, ``Content-Length`` or chunked framing) and
sends the next request at once: a closed loop, one request in flight per connection. Latency is
``time.perf_counter_ns()`` from the write to the last byte of the response. A target may carry
several requests (`LoadSpec.requests`, e.g. one per person token): each connection sends them in
round robin, connection ``i`` of ``n`` starting at request ``i * len(requests) // n``, so
different connections have different requests in flight.

All workers start at the same monotonic instant and open their connections one by one over the
first part of the warm-up (clients arriving, not one burst); responses that complete during the
warm-up are discarded, then every response completing in the measured window is counted
(requests still in flight when the window closes are not). A non-2xx status or a dropped
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
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

_HEADER_END = b"\r\n\r\n"


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
    """What the workers measured in the window (latencies in nanoseconds)."""

    label: str
    seconds: float
    latencies_ns: array = field(default_factory=lambda: array("q"))
    ok: int = 0
    errors: int = 0
    error_statuses: dict[int, int] = field(default_factory=dict)
    dropped_connections: int = 0
    generator_cpu_seconds: float = 0.0

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
    """State shared by one worker's connections."""

    def __init__(self, spec: LoadSpec, measure_start_ns: int, measure_end_ns: int) -> None:
        self.spec = spec
        self.measure_start_ns = measure_start_ns
        self.measure_end_ns = measure_end_ns
        self.latencies = array("q")
        self.ok = 0
        self.errors = 0
        self.error_statuses: dict[int, int] = {}
        self.dropped = 0
        self.stopping = False
        self.open_clients: set[_Client] = set()
        self.idle = asyncio.Event()

    def record(self, status: int, started_ns: int, finished_ns: int) -> None:
        if not self.measure_start_ns <= finished_ns < self.measure_end_ns:
            return
        if 200 <= status < 300:
            self.ok += 1
            self.latencies.append(finished_ns - started_ns)
        else:
            self.errors += 1
            self.error_statuses[status] = self.error_statuses.get(status, 0) + 1

    def dropped_connection(self) -> None:
        now = time.perf_counter_ns()
        if self.measure_start_ns <= now < self.measure_end_ns:
            self.dropped += 1
            self.errors += 1


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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._run.open_clients.add(self)
        self._send()

    def _send(self) -> None:
        if self._run.stopping or self._transport is None:
            self._close()
            return
        self._buf.clear()
        self._header_end = -1
        self._in_flight = True
        self._started_ns = time.perf_counter_ns()
        self._transport.write(self._cycle.next())

    def _close(self) -> None:
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
            self._run.dropped_connection()
            self._close()
            return
        if end is None:
            return
        finished = time.perf_counter_ns()
        self._in_flight = False
        status = int(self._headers[9:12])
        self._run.record(status, self._started_ns, finished)
        if b"\r\nconnection: close" in self._headers.lower():
            self._close()
            return
        self._send()

    def connection_lost(self, exc: Exception | None) -> None:
        self._run.open_clients.discard(self)
        if self._in_flight and not self._run.stopping:
            self._run.dropped_connection()
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


async def _run_worker(
    spec: LoadSpec,
    connections: int,
    start_at: float,
    warmup: float,
    seconds: float,
    offset: float = 0.0,
    first_connection: int = 0,
    total_connections: int = 0,
) -> dict[str, Any]:
    """One worker process's share: `connections` of `total_connections` in all, the first of
    them the `first_connection`-th over every process (where its round robin starts)."""
    # start_at is on the monotonic clock shared by every process (CLOCK_MONOTONIC on Linux).
    now_mono = time.monotonic()
    now_ns = time.perf_counter_ns()
    start_ns = now_ns + int((start_at - now_mono) * 1e9)
    measure_start_ns = start_ns + int(warmup * 1e9)
    measure_end_ns = measure_start_ns + int(seconds * 1e9)
    run = _Run(spec, measure_start_ns, measure_end_ns)
    await asyncio.sleep(max(0.0, (start_ns - time.perf_counter_ns()) / 1e9))
    # Clients arrive over the first part of the warm-up rather than in one burst: a burst lets
    # whichever server process wakes first accept every connection.
    spread = min(0.5, warmup / 2)
    requests = spec.requests
    total = total_connections or connections
    tasks = [
        asyncio.create_task(
            _connection_loop(
                run,
                spread * (i + offset) / connections,
                _Cycle(requests, first_request(first_connection + i, total, len(requests))),
            )
        )
        for i in range(connections)
    ]
    await asyncio.sleep(max(0.0, (measure_start_ns - time.perf_counter_ns()) / 1e9))
    cpu_start = time.process_time()
    await asyncio.sleep(max(0.0, (measure_end_ns - time.perf_counter_ns()) / 1e9))
    cpu_used = time.process_time() - cpu_start
    run.stopping = True
    # Let in-flight requests finish (they are not counted), then close everything.
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout=5.0)
    for client in list(run.open_clients):
        client._close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return {
        "latencies": run.latencies.tobytes(),
        "ok": run.ok,
        "errors": run.errors,
        "error_statuses": run.error_statuses,
        "dropped": run.dropped,
        "cpu": cpu_used,
    }


def _worker_main(
    spec: LoadSpec,
    connections: int,
    start_at: float,
    warmup: float,
    seconds: float,
    offset: float,
    first_connection: int,
    total_connections: int,
    out: Connection,
) -> None:
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = asyncio.run(
            _run_worker(
                spec,
                connections,
                start_at,
                warmup,
                seconds,
                offset,
                first_connection,
                total_connections,
            )
        )
        out.send(result)
    except KeyboardInterrupt:
        pass
    finally:
        out.close()


def run_load(
    spec: LoadSpec,
    *,
    concurrency: int,
    processes: int,
    warmup: float,
    seconds: float,
    on_window: Any = None,
) -> LoadResult:
    """Drive `spec` with `concurrency` connections spread over `processes` worker processes.

    `on_window`, if given, is called as ``on_window("start")`` / ``on_window("end")`` in this
    process at the measured window's edges (used to sample the server's CPU time).
    """
    processes = max(1, min(processes, concurrency))
    shares = [
        concurrency // processes + (1 if i < concurrency % processes else 0)
        for i in range(processes)
    ]
    ctx = multiprocessing.get_context("spawn")
    start_at = time.monotonic() + 1.0 + 0.1 * processes  # time for the workers to start
    workers: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    result = LoadResult(label=spec.label, seconds=seconds)
    try:
        for index, share in enumerate(shares):
            receiver, sender = ctx.Pipe(duplex=False)
            first_connection = sum(shares[:index])
            proc = ctx.Process(
                target=_worker_main,
                args=(
                    spec,
                    share,
                    start_at,
                    warmup,
                    seconds,
                    index / processes,
                    first_connection,
                    concurrency,
                    sender,
                ),
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
            latencies = array("q")
            latencies.frombytes(part["latencies"])
            result.latencies_ns.extend(latencies)
            result.ok += part["ok"]
            result.errors += part["errors"]
            result.dropped_connections += part["dropped"]
            result.generator_cpu_seconds += part["cpu"]
            for status, count in part["error_statuses"].items():
                result.error_statuses[status] = result.error_statuses.get(status, 0) + count
    finally:
        for proc, receiver in workers:
            proc.join(timeout=5.0)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=2.0)
            receiver.close()
    return result


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

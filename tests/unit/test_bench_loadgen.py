"""The benchmark load generator (bench/_loadgen.py) against a tiny local HTTP server: each
connection cycles a target's requests in round robin from its own offset, and the open loop sends
at a fixed rate and counts time queued in the generator in the latency."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from bench._loadgen import LoadSpec, build_request, first_request, run_load

HOST = "127.0.0.1"


@dataclass
class _Server:
    """A keep-alive HTTP/1.1 server in a thread: answers each request ``200 ok`` after `delay`
    seconds (one at a time per connection) and records (connection, path, arrival time)."""

    delay: float
    port: int = 0
    seen: list[tuple[int, str, float]] = field(default_factory=list)

    async def _handle(
        self, number: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                arrived = time.monotonic()
                path = line.split(b" ")[1].decode()
                length = 0
                while (header := await reader.readline()) not in {b"\r\n", b""}:
                    name, _, value = header.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.seen.append((number, path, arrived))
                if self.delay:
                    await asyncio.sleep(self.delay)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        writer.close()

    def paths_by_connection(self) -> list[list[int]]:
        by: dict[int, list[int]] = {}
        for number, path, _ in self.seen:
            by.setdefault(number, []).append(int(path.lstrip("/")))
        return list(by.values())


@contextlib.contextmanager
def _serve(delay: float = 0.0) -> Iterator[_Server]:
    server = _Server(delay)
    loop = asyncio.new_event_loop()
    counter = itertools.count()
    ready = threading.Event()
    stop = asyncio.Event()

    async def main() -> None:
        listener = await asyncio.start_server(
            lambda r, w: server._handle(next(counter), r, w), HOST, 0
        )
        server.port = listener.sockets[0].getsockname()[1]
        ready.set()
        await stop.wait()
        listener.close()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(10)


def _spec(port: int, variants: int) -> LoadSpec:
    requests = tuple(build_request("GET", HOST, port, f"/{i}") for i in range(variants))
    return LoadSpec("test", HOST, port, requests)


def test_a_spec_needs_a_tuple_of_requests() -> None:
    with pytest.raises(TypeError):
        LoadSpec("x", HOST, 1, b"GET / HTTP/1.1\r\n\r\n")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LoadSpec("x", HOST, 1, ())
    assert LoadSpec.one("x", HOST, 1, b"r").requests == (b"r",)


def test_connections_start_evenly_apart() -> None:
    assert [first_request(i, 64, 256) for i in range(4)] == [0, 4, 8, 12]
    assert first_request(63, 64, 256) == 252
    assert [first_request(i, 3, 5) for i in range(3)] == [0, 1, 3]
    assert {first_request(i, 64, 2) for i in range(64)} == {0, 1}


def test_each_connection_cycles_the_requests_from_its_own_offset() -> None:
    variants = 5
    with _serve() as server:
        result = run_load(
            _spec(server.port, variants), concurrency=3, processes=2, warmup=0.2, seconds=0.5
        )
    assert result.ok > 0 and result.errors == 0
    sequences = server.paths_by_connection()
    assert len(sequences) == 3
    # Connections 0 and 1 (first process) and 2 (second process) of 3 start at 0, 1 and 3.
    assert sorted(sequence[0] for sequence in sequences) == [0, 1, 3]
    for sequence in sequences:
        assert len(sequence) > variants
        assert all(b == (a + 1) % variants for a, b in itertools.pairwise(sequence))


def test_open_loop_sends_at_the_rate_over_the_pool() -> None:
    rate, seconds = 50.0, 2.0
    with _serve(delay=0.01) as server:
        result = run_load(
            _spec(server.port, 1),
            concurrency=4,
            processes=2,
            warmup=0.5,
            seconds=seconds,
            rate=rate,
        )
    assert result.offered_rps == rate
    assert result.errors == 0
    assert rate * seconds - 2 <= result.ok <= rate * seconds + 1
    assert result.rps == pytest.approx(rate, rel=0.1)
    assert 10.0 <= result.percentile_ms(50) < 40.0
    arrivals = sorted(at for _, _, at in server.seen)
    gaps = [b - a for a, b in itertools.pairwise(arrivals[len(arrivals) // 4 :])]
    assert statistics.median(gaps) == pytest.approx(1 / rate, abs=0.004)


def test_open_loop_latency_counts_the_wait_for_a_connection() -> None:
    """One connection, 50 ms per answer (20/s at most), 40 requests/s due: the queue in the
    generator grows, and the latency from each due time grows with it. A generator timing from
    the write (or slowing down to the server's pace) would report about 50 ms."""
    with _serve(delay=0.05) as server:
        result = run_load(
            _spec(server.port, 1),
            concurrency=1,
            processes=1,
            warmup=0.2,
            seconds=1.5,
            rate=40.0,
        )
    assert result.errors == 0 and result.unanswered == 0
    assert result.ok == 60  # every request due in the window, answered during the drain
    assert result.percentile_ms(50) > 500.0
    assert result.max_ms > 1000.0
    assert result.rps < 25.0  # what the server managed, not what was offered

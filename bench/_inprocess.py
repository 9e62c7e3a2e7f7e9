"""In-process measurement helpers: a bare ASGI driver, the app's surroundings as under
``broker serve`` (environment, decision records to a file), timing beside ``GET /healthz`` and
cProfile tables. Shared by ``bench.profile_exchange``, ``bench.profile_fetch`` and ``bench.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pstats
import time
import timeit
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from bench._report import table

Asgi = Callable[..., Awaitable[None]]


async def asgi_call(
    app: Asgi, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> tuple[int, bytes]:
    """One request straight into an ASGI app; returns (status, body)."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    sent = False
    status = 0
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.sleep(3600)
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return status, b"".join(chunks)


def as_asgi(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """HTTP headers as an ASGI scope lists them."""
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """`values` set in ``os.environ`` for the block, the previous values restored after it."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def decision_records_to(path: Path) -> Iterator[Any]:
    """The app's decision records to a file (flushed per record, as under `broker serve`)."""
    logger = logging.getLogger("broker.audit")
    saved = (logger.level, logger.propagate)
    with path.open("w") as out:
        handler = logging.StreamHandler(out)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
        try:
            yield out
        finally:
            logger.removeHandler(handler)
            logger.setLevel(saved[0])
            logger.propagate = saved[1]


async def time_beside_healthz(
    app: Asgi, requests: Callable[[int], Awaitable[None]], n: int
) -> tuple[float, float]:
    """Seconds per request of `requests` and of ``GET /healthz``, N sequential each, after 50
    of each to warm up."""

    async def healthz(count: int) -> None:
        for _ in range(count):
            await asgi_call(app, "GET", "/healthz", [])

    await requests(50)
    await healthz(50)
    start = time.perf_counter()
    await requests(n)
    measured = (time.perf_counter() - start) / n
    start = time.perf_counter()
    await healthz(n)
    return measured, (time.perf_counter() - start) / n


def _cumulative(stats: pstats.Stats, suffix: str, name: str) -> float:
    """Cumulative seconds of functions matching (file suffix, name), outermost calls only."""
    total = 0.0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, _nc, _tt, ct, _callers) in raw.items():
        if func == name and filename.replace(os.sep, "/").endswith(suffix):
            total += ct
    return total


def profile_tables(
    stats: pstats.Stats, steps: list[tuple[str, str, str]], n: int, top: int, noun: str
) -> str:
    """The cumulative time of `steps` (label, file suffix, function name; the first is the
    whole app) and the `top` functions by own time, per one of the N requests (a `noun`)."""
    whole = _cumulative(stats, *steps[0][1:])
    rows: list[list[object]] = []
    for label, suffix, name in steps:
        cum = _cumulative(stats, suffix, name)
        rows.append([label, cum / n * 1e6, f"{100 * cum / whole:.0f}%" if whole else "-"])
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    own = sorted(raw.items(), key=lambda item: item[1][2], reverse=True)[:top]
    total_tt = sum(v[2] for v in raw.values())
    own_rows = [
        [
            f"{Path(fn).parent.name}/{Path(fn).name}:{line} {func}",
            tt / n * 1e6,
            f"{100 * tt / total_tt:.1f}%",
            nc // n if nc >= n else f"{nc / n:.2f}",
        ]
        for (fn, line, func), (_cc, nc, tt, _ct, _callers) in own
    ]
    return (
        f"\nUnder cProfile: cumulative time per {noun} (inflated by the profiler):\n"
        + table(["step", f"us/{noun}", "of app"], rows)
        + f"\n\nTop {top} functions by own time (per {noun}, under cProfile):\n"
        + table(["function", f"us/{noun}", "share", f"calls/{noun}"], own_rows)
    )


def micro(label: str, fn: Callable[[], object], number: int) -> list[object]:
    try:
        fn()
        best = min(timeit.repeat(fn, number=number, repeat=5)) / number
        return [label, best * 1e6]
    except Exception as exc:  # a primitive moved while others edit the broker: say so, go on
        return [label, f"n/a ({type(exc).__name__})"]

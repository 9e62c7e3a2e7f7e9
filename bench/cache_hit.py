"""In-process cost of a credential cache hit, beside a plain dict lookup (ns per operation).

``python -m bench.cache_hit`` prints the table; `run` returns its rows. Every figure is the best
of several timeit repeats, measured in this process on the system clock (the production clock):

* ``dict.get(ref)`` -- the floor: one dict lookup keyed by the same `SecretRef`
* ``CredentialCache.peek(ref)`` -- the hit itself: LRU lookup + one monotonic-clock compare
* ``await trivial coroutine`` -- the floor of any ``await`` (create + run a coroutine)
* ``await CredentialCache.get(ref)`` -- the hot path as request handlers call it

The two ``await`` rows include the loop of the coroutine that drives them (amortized over
`BATCH` awaits per event-loop run).
"""

from __future__ import annotations

import asyncio
import timeit
from collections.abc import Callable

from broker.cache import CachedSecret, CachePolicy, CredentialCache
from broker.clock import SystemClock
from broker.types import Sensitive
from secret_backends.base import Secret, SecretRef

BATCH = 10_000
"""Operations per timed run."""
REPEATS = 15
"""Timed runs per row; the best one counts."""
POLICY = CachePolicy(refresh_interval=3600.0, jitter=0.1, max_stale=7200.0, previous_grace=300.0)


class _StaticBackend:
    """One fixed secret per path; enough to fill the cache once."""

    name = "bench"

    def read(self, ref: SecretRef) -> Secret:
        return Secret(ref=ref, version_id="1", fields={"value": Sensitive("bench-secret")})

    def current_version(self, ref: SecretRef) -> str | None:
        return "1"

    def close(self) -> None:
        return None


def _best_ns(fn: Callable[[], object], number: int, per_call: int = 1) -> float:
    """Best of `REPEATS` timeit runs of `fn`, in ns per operation."""
    best = min(timeit.repeat(fn, number=number, repeat=REPEATS))
    return best / (number * per_call) * 1e9


def run() -> list[tuple[str, float]]:
    """Measure and return ``(row, ns per operation)`` pairs."""
    loop = asyncio.new_event_loop()
    try:
        cache = CredentialCache({"bench": _StaticBackend()}, SystemClock(), max_entries=1024)
        refs = [SecretRef("bench", f"kv/app/{i}", "password") for i in range(512)]
        ref = refs[0]

        async def fill() -> CachedSecret:
            for other in refs:
                await cache.get(other, POLICY)
            return await cache.get(ref, POLICY)

        cached = loop.run_until_complete(fill())
        table = {other: cached for other in refs}
        assert cache.peek(ref) is cached

        get = cache.get

        async def get_batch() -> None:
            for _ in range(BATCH):
                await get(ref, POLICY)

        async def trivial() -> CachedSecret:
            return cached

        async def trivial_batch() -> None:
            for _ in range(BATCH):
                await trivial()

        rows = [
            ("dict.get(ref)", _best_ns(lambda: table.get(ref), BATCH)),
            ("CredentialCache.peek(ref)", _best_ns(lambda: cache.peek(ref), BATCH)),
            (
                "await trivial coroutine",
                _best_ns(lambda: loop.run_until_complete(trivial_batch()), 1, BATCH),
            ),
            (
                "await CredentialCache.get(ref) hit",
                _best_ns(lambda: loop.run_until_complete(get_batch()), 1, BATCH),
            ),
        ]
        hits = cache.stats()[ref].hits
        assert hits >= REPEATS * BATCH, "the get rows did not hit the cache"
        loop.run_until_complete(cache.close())
        return rows
    finally:
        loop.close()


def main() -> None:
    rows = run()
    width = max(len(name) for name, _ in rows)
    print(f"{'credential cache hit':<{width}}  {'ns/op':>8}")
    for name, ns in rows:
        print(f"{name:<{width}}  {ns:8.1f}")


if __name__ == "__main__":
    main()

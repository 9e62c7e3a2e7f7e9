"""State the broker must share between requests (and, later, replicas).

`StateStore` is the plug-in point: single-use ids (client-assertion ``jti``) today; revocation
and rate-limit counters join it when several replicas share Redis.
"""

from __future__ import annotations

import asyncio
import heapq
from typing import Protocol

from broker.clock import Clock


class StateUnavailable(Exception):
    """The shared state cannot be reached; callers must fail closed."""


class StateStore(Protocol):
    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        """Record `key` as used for `ttl_seconds`. True the first time, False on every reuse
        while the record lives. Raises `StateUnavailable` when it cannot tell."""
        ...


class InMemoryStateStore:
    """For a single process. Expired ids are dropped as time passes, so memory stays bounded by
    the number of ids used within their lifetimes."""

    def __init__(self, clock: Clock, *, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = asyncio.Lock()

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, key = heapq.heappop(self._heap)
            if self._expiry.get(key) == expires:
                del self._expiry[key]

    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        now = self._clock.monotonic()
        async with self._lock:
            self._purge(now)
            if key in self._expiry:
                return False
            if len(self._expiry) >= self._max_entries:
                # Refusing is the safe choice: we can no longer prove single use.
                raise StateUnavailable("single-use id store is full")
            expires = now + max(ttl_seconds, 1.0)
            self._expiry[key] = expires
            heapq.heappush(self._heap, (expires, key))
            return True

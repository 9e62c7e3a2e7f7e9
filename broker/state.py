"""State the broker must share between requests and between replicas.

`StateStore` is the one plug-in point: single-use ids (client-assertion ``jti``, SAML assertion
ids), revocation (revoked token ids, and per-person / per-agent "not before" times), and
rate-limit counters. `InMemoryStateStore` serves a single process; a Redis implementation serves
several replicas. Every method raises `StateUnavailable` when the store cannot answer, and callers
fail closed.

Keys are plain strings chosen by the callers, e.g. ``assertion:<client>:<jti>``,
``token:<jti>``, ``person:<idp>/<subject>``, ``agent:<name>``, ``exchange:<agent>``.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from broker.clock import Clock


class StateUnavailable(Exception):
    """The shared state cannot be reached; callers must fail closed."""


@dataclass(frozen=True, slots=True)
class RevocationStatus:
    revoked_ids: frozenset[str] = frozenset()
    """Those of the asked token ids that are revoked."""
    not_before: Mapping[str, float] = field(default_factory=dict)
    """For the asked subjects that have one: tokens issued before this time are revoked."""

    def revokes(self, token_ids: Iterable[str], subjects: Iterable[str], issued_at: float) -> bool:
        if not self.revoked_ids.isdisjoint(token_ids):
            return True
        return any(issued_at < self.not_before.get(s, -math.inf) for s in subjects)


@dataclass(frozen=True, slots=True)
class RateLimitResult:
    allowed: bool
    remaining: int
    retry_after: float
    """Seconds until a request would be allowed again (0 when allowed)."""


def require_finite(values: Iterable[float], what: str) -> None:
    """Refuse NaN and infinities before they reach a store: ``max(nan, x)`` is ``nan``, and a
    NaN compares false with everything, so one would silently lift a revocation."""
    if not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
        raise ValueError(f"{what} must be finite numbers")


class StateStore(Protocol):
    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        """Record `key` as used for `ttl_seconds`. True the first time, False on every reuse
        while the record lives."""
        ...

    async def revoke_tokens(self, expiries: Mapping[str, float]) -> None:
        """Revoke token ids; each entry lives until its wall-clock expiry (then the token is
        invalid anyway, so the store never grows without bound). Raises ValueError for a
        non-finite expiry."""
        ...

    async def revoke_before(self, subject: str, not_before: float, ttl_seconds: float) -> None:
        """Revoke every token of `subject` issued before `not_before` (a later call with an
        earlier time never lowers it). Raises ValueError for a non-finite time or TTL."""
        ...

    async def revocation_status(
        self, token_ids: Iterable[str], subjects: Iterable[str]
    ) -> RevocationStatus:
        """One round trip: which of `token_ids` are revoked, and the not-before of `subjects`."""
        ...

    async def revocation_epoch(self) -> str:
        """An opaque value that changes with every revocation, written atomically with it (one
        round trip). A "not revoked" answer read after the epoch was E holds while the epoch
        is still E, whoever asks: replicas remember such answers per epoch and ask only for
        the epoch, a few times a second."""
        ...

    async def rate_limit(self, key: str, limit: int, window_seconds: float) -> RateLimitResult:
        """Count one event against `limit` per `window_seconds` (sliding window)."""
        ...

    async def rate_limit_status(
        self, key: str, limit: int, window_seconds: float
    ) -> RateLimitResult:
        """How `rate_limit` would answer now, without counting an event (e.g. refuse a caller
        whose failures are over the limit, while only failures are counted)."""
        ...

    async def ping(self) -> None:
        """Raise `StateUnavailable` when the store cannot be reached."""
        ...


async def enforce_rate_limit(state: StateStore, key: str, limit: int | None, what: str) -> None:
    """Count one event; raise the protocol's 429 when over `limit` per minute, 503 when the
    shared counter cannot be reached (fail closed)."""
    if limit is None:
        return
    from broker.errors import TemporarilyUnavailable, TooManyRequests

    try:
        result = await state.rate_limit(key, limit, 60.0)
    except StateUnavailable:
        raise TemporarilyUnavailable(
            "rate-limit state cannot be checked right now; refusing (fail closed)",
            reason="state_unavailable",
            headers={"Retry-After": "1"},
        ) from None
    if not result.allowed:
        retry_after = max(1, math.ceil(result.retry_after))
        raise TooManyRequests(
            f"{what} limit of {limit} per minute reached; retry after {retry_after} s",
            reason="rate_limited",
            headers={"Retry-After": str(retry_after)},
        )


class InMemoryStateStore:
    """For a single process. Entries expire as time passes, so memory stays bounded by what is
    live."""

    def __init__(self, clock: Clock, *, max_entries: int = 1_000_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._used: dict[str, float] = {}
        self._used_heap: list[tuple[float, str]] = []
        self._revoked: dict[str, float] = {}  # token id -> wall expiry
        self._not_before: dict[str, tuple[float, float]] = {}  # subject -> (time, wall expiry)
        self._hits: dict[str, list[float]] = {}
        self._hits_expiry: dict[str, float] = {}  # key -> when its newest hit leaves the window
        self._hits_sweep_at = 1024
        self._lock = asyncio.Lock()
        self._epoch = 0

    def _purge(self, now: float) -> None:
        while self._used_heap and self._used_heap[0][0] <= now:
            expires, key = heapq.heappop(self._used_heap)
            if self._used.get(key) == expires:
                del self._used[key]

    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        now = self._clock.monotonic()
        async with self._lock:
            self._purge(now)
            if key in self._used:
                return False
            if len(self._used) >= self._max_entries:
                # Refusing is the safe choice: we can no longer prove single use.
                raise StateUnavailable("single-use id store is full")
            expires = now + max(ttl_seconds, 1.0)
            self._used[key] = expires
            heapq.heappush(self._used_heap, (expires, key))
            return True

    async def revoke_tokens(self, expiries: Mapping[str, float]) -> None:
        require_finite(expiries.values(), "token expiries")
        now = self._clock.now()
        self._revoked = {k: v for k, v in self._revoked.items() if v > now}
        for token_id, expires_at in expiries.items():
            if expires_at > now:
                self._revoked[token_id] = max(expires_at, self._revoked.get(token_id, 0.0))
        self._epoch += 1

    async def revoke_before(self, subject: str, not_before: float, ttl_seconds: float) -> None:
        require_finite((not_before, ttl_seconds), "not_before and its lifetime")
        expires = self._clock.now() + ttl_seconds
        current = self._not_before.get(subject)
        if current is None or current[0] < not_before or current[1] < expires:
            self._not_before[subject] = (
                max(not_before, current[0] if current else not_before),
                max(expires, current[1] if current else expires),
            )
        self._epoch += 1

    async def revocation_status(
        self, token_ids: Iterable[str], subjects: Iterable[str]
    ) -> RevocationStatus:
        now = self._clock.now()
        revoked = frozenset(t for t in token_ids if self._revoked.get(t, 0.0) > now)
        not_before = {
            s: entry[0]
            for s in subjects
            if (entry := self._not_before.get(s)) is not None and entry[1] > now
        }
        return RevocationStatus(revoked, not_before)

    async def revocation_epoch(self) -> str:
        return str(self._epoch)

    async def rate_limit(self, key: str, limit: int, window_seconds: float) -> RateLimitResult:
        now = self._clock.monotonic()
        hits = [t for t in self._hits.get(key, ()) if t > now - window_seconds]
        if len(hits) >= limit:
            self._hits[key] = hits
            return RateLimitResult(False, 0, max(hits[0] + window_seconds - now, 0.001))
        hits.append(now)
        self._hits[key] = hits
        self._hits_expiry[key] = now + window_seconds
        if len(self._hits) >= self._hits_sweep_at:
            # Keys can be caller-chosen (failed authentications per claimed client id): forget
            # those whose every hit has left its window, so memory stays bounded by what is live.
            for stale in [k for k, until in self._hits_expiry.items() if until <= now]:
                del self._hits_expiry[stale]
                self._hits.pop(stale, None)
            self._hits_sweep_at = max(1024, 2 * len(self._hits))
        return RateLimitResult(True, limit - len(hits), 0.0)

    async def rate_limit_status(
        self, key: str, limit: int, window_seconds: float
    ) -> RateLimitResult:
        now = self._clock.monotonic()
        hits = [t for t in self._hits.get(key, ()) if t > now - window_seconds]
        if len(hits) >= limit:
            return RateLimitResult(False, 0, max(hits[0] + window_seconds - now, 0.001))
        return RateLimitResult(True, limit - len(hits), 0.0)

    async def ping(self) -> None:
        return None

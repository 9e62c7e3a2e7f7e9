"""The usage bookkeeping the broker keeps in its state store (memory, or Redis shared by
replicas): which call ids a gateway already reported (idempotency), and which credentials a
gateway fetched for which agent token (a report for anything else is refused), with the budget
reservations those fetches hold, to be settled by the reports.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from broker.clock import Clock
from broker.state import StateStore

MAX_OPEN_RESERVATIONS = 1000
"""Reservations remembered per (gateway, token, credential); older ones expire in the ledger."""


@dataclass(frozen=True, slots=True)
class FetchTicket:
    """A gateway fetched a credential for a token: the cost centre decided then (the policy in
    force at fetch time), and the reservation a report settles (None: nothing open)."""

    cost_centre: str | None
    reservation: str | None


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:40]


class UsageState(Protocol):
    async def claim_call(self, gateway: str, call_id: str, ttl_seconds: float) -> bool:
        """True the first time `call_id` is claimed for `gateway` (while the claim lives)."""
        ...

    async def release_call(self, gateway: str, call_id: str) -> None:
        """Undo a claim whose report could not be recorded (so a retry is not a duplicate)."""
        ...

    async def note_fetch(
        self,
        gateway: str,
        jti: str,
        credential: str,
        *,
        cost_centre: str | None,
        reservation: str | None,
        ttl_seconds: float,
    ) -> None:
        """A granted fetch, and the budget reservation it holds (if any)."""
        ...

    async def fetched(
        self, gateway: str, jti: str, credential: str, usage_ref: str | None
    ) -> FetchTicket | None:
        """None unless `gateway` fetched `credential` for the token `jti`; else the ticket with
        the reservation a report settles: the one `usage_ref` names if it is open, else the
        oldest open one."""
        ...


class MemoryUsageState:
    """`UsageState` of one process (``state.kind: memory``)."""

    def __init__(self, clock: Clock, max_entries: int = 200_000) -> None:
        self._clock = clock
        self._max = max_entries
        self._calls: dict[str, float] = {}
        self._fetches: dict[str, tuple[float, str | None, deque[str]]] = {}
        self._lock = asyncio.Lock()

    def _purge(self, now: float) -> None:
        if len(self._calls) > self._max:
            self._calls = {k: v for k, v in self._calls.items() if v > now}
        if len(self._fetches) > self._max:
            self._fetches = {k: v for k, v in self._fetches.items() if v[0] > now}

    async def claim_call(self, gateway: str, call_id: str, ttl_seconds: float) -> bool:
        now = self._clock.monotonic()
        key = _digest(gateway, call_id)
        async with self._lock:
            self._purge(now)
            if self._calls.get(key, 0.0) > now:
                return False
            self._calls[key] = now + ttl_seconds
            return True

    async def release_call(self, gateway: str, call_id: str) -> None:
        async with self._lock:
            self._calls.pop(_digest(gateway, call_id), None)

    async def note_fetch(
        self,
        gateway: str,
        jti: str,
        credential: str,
        *,
        cost_centre: str | None,
        reservation: str | None,
        ttl_seconds: float,
    ) -> None:
        now = self._clock.monotonic()
        key = _digest(gateway, jti, credential)
        async with self._lock:
            self._purge(now)
            entry = self._fetches.get(key)
            open_ = entry[2] if entry is not None else deque(maxlen=MAX_OPEN_RESERVATIONS)
            if reservation is not None:
                open_.append(reservation)
            self._fetches[key] = (now + ttl_seconds, cost_centre, open_)

    async def fetched(
        self, gateway: str, jti: str, credential: str, usage_ref: str | None
    ) -> FetchTicket | None:
        now = self._clock.monotonic()
        async with self._lock:
            entry = self._fetches.get(_digest(gateway, jti, credential))
            if entry is None or entry[0] <= now:
                return None
            _, centre, open_ = entry
            if usage_ref is not None and usage_ref in open_:
                open_.remove(usage_ref)
                return FetchTicket(centre, usage_ref)
            return FetchTicket(centre, open_.popleft() if open_ else None)


class RedisUsageState:
    """`UsageState` in Redis, sharing the state store's client (replicas agree)."""

    def __init__(self, store: StateStore) -> None:
        from broker.state_redis import RedisStateStore

        assert isinstance(store, RedisStateStore)
        self._store = store
        self._redis = store.client
        self._prefix = store.key_prefix + "usage:"

    async def claim_call(self, gateway: str, call_id: str, ttl_seconds: float) -> bool:
        async with self._store.guard("usage call claim"):
            claimed = await self._redis.set(
                f"{self._prefix}call:{_digest(gateway, call_id)}",
                b"1",
                nx=True,
                px=max(1, int(ttl_seconds * 1000)),
            )
        return bool(claimed)

    async def release_call(self, gateway: str, call_id: str) -> None:
        async with self._store.guard("usage call release"):
            await self._redis.delete(f"{self._prefix}call:{_digest(gateway, call_id)}")

    async def note_fetch(
        self,
        gateway: str,
        jti: str,
        credential: str,
        *,
        cost_centre: str | None,
        reservation: str | None,
        ttl_seconds: float,
    ) -> None:
        key = f"{self._prefix}fetch:{_digest(gateway, jti, credential)}"
        ttl = max(1, int(ttl_seconds * 1000))
        async with self._store.guard("usage fetch note"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.set(key, json.dumps({"cost_centre": cost_centre}), px=ttl)
            if reservation is not None:
                pipe.rpush(key + ":open", reservation)
                pipe.ltrim(key + ":open", -MAX_OPEN_RESERVATIONS, -1)
                pipe.pexpire(key + ":open", ttl)
            await pipe.execute()

    async def fetched(
        self, gateway: str, jti: str, credential: str, usage_ref: str | None
    ) -> FetchTicket | None:
        key = f"{self._prefix}fetch:{_digest(gateway, jti, credential)}"
        async with self._store.guard("usage fetch lookup"):
            noted = await self._redis.get(key)
            if noted is None:
                return None
            centre = json.loads(noted).get("cost_centre")
            if usage_ref is not None and await self._redis.lrem(key + ":open", 1, usage_ref):
                return FetchTicket(centre, usage_ref)
            oldest = await self._redis.lpop(key + ":open")
        if oldest is None:
            return FetchTicket(centre, None)
        return FetchTicket(centre, oldest.decode() if isinstance(oldest, bytes) else str(oldest))


def build_usage_state(store: StateStore, clock: Clock) -> UsageState:
    from broker.state_redis import RedisStateStore

    if isinstance(store, RedisStateStore):
        return RedisUsageState(store)
    return MemoryUsageState(clock)

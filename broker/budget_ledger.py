"""Budget counters in the state store: spend and reservations per budget and period, updated
atomically (one Lua script per operation in Redis, so replicas never race).

Amounts are integers in micro-units of the budget's currency. Per (budget, period) the ledger
keeps ``spent`` (settled) and the open reservations, each with an expiry: ``reserved`` is the sum
of those not yet expired. `reserve` admits a call only if, for every budget it falls under,
spent + reserved + its amount stays within the limit, and then holds the amount in each (all or
nothing). `settle` replaces a reservation by the actual cost (or just adds the cost when the
reservation expired or never existed); `record` adds spend without a reservation. Every
operation is idempotent by its id: a repeat changes nothing.

Overspend bound: spent exceeds a limit only by what calls admitted within it cost beyond their
reservations (see `broker.usage.service`).

Redis layout: per (budget, period), under the hash tag ``{<prefix>budget:<name>:<period>}``:
``:spent`` and ``:reserved`` (integers), ``:open`` (reservation id -> amount), ``:exp``
(reservation ids by expiry), ``:done`` (applied ids), so every key of one budget period is in
one Cluster slot. An operation
spanning several budgets touches several of them in one script: on a Cluster they would need
one slot (budgets of one call sharing a tag); a single primary or Sentinel needs nothing.
"""

from __future__ import annotations

import asyncio
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from broker.clock import Clock
from broker.state import StateStore


@dataclass(frozen=True, slots=True)
class LedgerKey:
    budget: str
    period: str
    limit: int
    ttl_seconds: float = field(compare=False, hash=False)
    """How long the period's counters live (to the period's end and a margin)."""


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    refused_by: LedgerKey | None = None
    spent: int = 0
    reserved: int = 0
    """Of `refused_by`, when refused."""


Entries = Sequence[tuple[LedgerKey, int]]
Counters = dict[LedgerKey, tuple[int, int]]


class BudgetLedger(Protocol):
    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation: ...

    async def settle(self, reservation_id: str, entries: Entries) -> Counters: ...

    async def record(self, entries: Entries, record_id: str) -> Counters: ...

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None: ...

    async def status(self, keys: Sequence[LedgerKey]) -> Counters: ...


def _checked(entries: Entries) -> Entries:
    """Refuse, before anything is stored, what would corrupt the counters: amounts or limits
    that are not non-negative integers (a negative amount would lower spent), lifetimes that
    are not positive finite seconds, one budget period twice in one call."""
    seen: set[tuple[str, str]] = set()
    for key, amount in entries:
        for value in (amount, key.limit):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError("budget amounts and limits are non-negative integers")
        _check_seconds(key.ttl_seconds, "ttl_seconds")
        if (key.budget, key.period) in seen:
            raise ValueError(f"budget {key.budget!r} period {key.period!r} given twice")
        seen.add((key.budget, key.period))
    return entries


def _check_seconds(value: float, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{what} must be a number of seconds")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be positive and finite")


@dataclass
class _Period:
    spent: int = 0
    reserved_total: int = 0
    reservations: dict[str, tuple[int, float]] = field(default_factory=dict)
    expiries: list[tuple[float, str]] = field(default_factory=list)
    """A min-heap of (expiry, id): expired reservations are dropped in O(log n) each."""
    applied: set[str] = field(default_factory=set)
    expires_at: float = 0.0

    def reserved(self, now: float) -> int:
        while self.expiries and self.expiries[0][0] <= now:
            until, rid = heapq.heappop(self.expiries)
            held = self.reservations.get(rid)
            if held is not None and held[1] == until:
                del self.reservations[rid]
                self.reserved_total -= held[0]
        return self.reserved_total

    def hold(self, rid: str, amount: int, until: float) -> None:
        if rid in self.reservations:
            return
        self.reservations[rid] = (amount, until)
        self.reserved_total += amount
        heapq.heappush(self.expiries, (until, rid))

    def drop(self, rid: str) -> None:
        held = self.reservations.pop(rid, None)
        if held is not None:
            self.reserved_total -= held[0]


class MemoryBudgetLedger:
    """`BudgetLedger` of one process (``state.kind: memory``)."""

    def __init__(self, clock: Clock, max_periods: int = 100_000) -> None:
        self._clock = clock
        self._max = max_periods
        self._periods: dict[tuple[str, str], _Period] = {}
        self._lock = asyncio.Lock()

    def _period(self, key: LedgerKey, now: float) -> _Period:
        if len(self._periods) > self._max:
            self._periods = {k: p for k, p in self._periods.items() if p.expires_at > now}
        period = self._periods.get((key.budget, key.period))
        if period is None or period.expires_at <= now:  # past its lifetime: starts afresh
            period = self._periods[(key.budget, key.period)] = _Period()
        period.expires_at = max(period.expires_at, now + key.ttl_seconds)
        return period

    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation:
        _checked(entries)
        _check_seconds(hold_seconds, "hold_seconds")
        now = self._clock.monotonic()
        async with self._lock:
            periods = [(key, amount, self._period(key, now)) for key, amount in entries]
            for _, _, period in periods:
                period.reserved(now)  # drop expired holds first: an expired hold is not held
            if all(reservation_id in p.reservations for _, _, p in periods):
                return Reservation(True)
            for key, amount, period in periods:
                reserved = period.reserved(now)
                if reservation_id in period.reservations:
                    continue  # held by this id already (a retry): not counted twice
                if period.spent + reserved + amount > key.limit:
                    return Reservation(False, key, period.spent, reserved)
            for _, amount, period in periods:
                period.hold(reservation_id, amount, now + hold_seconds)
            return Reservation(True)

    async def _apply(self, op_id: str, entries: Entries, release: bool) -> Counters:
        _checked(entries)
        now = self._clock.monotonic()
        counters: Counters = {}
        async with self._lock:
            for key, amount in entries:
                period = self._period(key, now)
                if op_id not in period.applied:
                    period.applied.add(op_id)
                    if release:
                        period.drop(op_id)
                    period.spent += amount
                counters[key] = (period.spent, period.reserved(now))
        return counters

    async def settle(self, reservation_id: str, entries: Entries) -> Counters:
        return await self._apply(reservation_id, entries, release=True)

    async def record(self, entries: Entries, record_id: str) -> Counters:
        return await self._apply(record_id, entries, release=False)

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None:
        async with self._lock:
            for key in keys:
                period = self._periods.get((key.budget, key.period))
                if period is not None:
                    period.drop(reservation_id)

    async def status(self, keys: Sequence[LedgerKey]) -> Counters:
        now = self._clock.monotonic()
        async with self._lock:
            return {
                k: (self._period(k, now).spent, self._period(k, now).reserved(now)) for k in keys
            }


# Per budget period, five keys under one hash tag: <tag>:spent and <tag>:reserved (integers),
# <tag>:open (hash: reservation id -> amount), <tag>:exp (sorted set: id by expiry in ms),
# <tag>:done (set of applied operation ids). A running `reserved` total and the expiry index
# keep every operation O(log n) in the open reservations, however many there are.
_PURGE = """
local function purge(base, now)
  local spent, reserved, open, exp = KEYS[base], KEYS[base + 1], KEYS[base + 2], KEYS[base + 3]
  local expired = redis.call('ZRANGEBYSCORE', exp, '-inf', now, 'LIMIT', 0, 10000)
  for _, id in ipairs(expired) do
    local amount = redis.call('HGET', open, id)
    if amount then
      redis.call('DECRBY', reserved, amount)
      redis.call('HDEL', open, id)
    end
    redis.call('ZREM', exp, id)
  end
  return tonumber(redis.call('GET', spent) or '0'), tonumber(redis.call('GET', reserved) or '0')
end
local function drop(base, id)
  local amount = redis.call('HGET', KEYS[base + 2], id)
  if amount then
    redis.call('DECRBY', KEYS[base + 1], amount)
    redis.call('HDEL', KEYS[base + 2], id)
  end
  redis.call('ZREM', KEYS[base + 3], id)
end
local function keep(base, ttl)
  for k = base, base + 4 do
    if redis.call('EXISTS', KEYS[k]) == 1 and redis.call('PTTL', KEYS[k]) < ttl then
      redis.call('PEXPIRE', KEYS[k], ttl)
    end
  end
end
"""

# KEYS: five per budget. ARGV: now_ms, id, hold_ms, then per budget: amount, limit, ttl_ms.
# Returns {1} when granted, or {0, index, spent, reserved} (1-based index).
_RESERVE = (
    _PURGE
    + """
local now = tonumber(ARGV[1])
local id = ARGV[2]
local hold = tonumber(ARGV[3])
local n = #KEYS / 5
local held = true
for i = 1, n do
  purge(5 * i - 4, now)  -- an expired hold is not held
  if redis.call('HEXISTS', KEYS[5 * i - 2], id) == 0 then held = false end
end
if held then return {1} end
for i = 1, n do
  local spent, reserved = purge(5 * i - 4, now)
  local amount = tonumber(ARGV[3 + 3 * i - 2])
  local mine = redis.call('HEXISTS', KEYS[5 * i - 2], id) == 1  -- held already: a retry
  if not mine and spent + reserved + amount > tonumber(ARGV[3 + 3 * i - 1]) then
    return {0, i, spent, reserved}
  end
end
for i = 1, n do
  local base = 5 * i - 4
  local amount = tonumber(ARGV[3 + 3 * i - 2])
  if redis.call('HSETNX', KEYS[base + 2], id, amount) == 1 then
    redis.call('INCRBY', KEYS[base + 1], amount)
    redis.call('ZADD', KEYS[base + 3], now + hold, id)
  end
  redis.call('SETNX', KEYS[base], 0)
  keep(base, tonumber(ARGV[3 + 3 * i]))
end
return {1}
"""
)

# KEYS: five per budget. ARGV: now_ms, id ('' for none), release (1/0), then per budget:
# amount, ttl_ms. Returns spent, reserved per budget (flat).
_APPLY = (
    _PURGE
    + """
local now = tonumber(ARGV[1])
local id = ARGV[2]
local release = ARGV[3] == '1'
local n = #KEYS / 5
local out = {}
for i = 1, n do
  local base = 5 * i - 4
  if id ~= '' and redis.call('SADD', KEYS[base + 4], id) == 1 then
    if release then drop(base, id) end
    redis.call('INCRBY', KEYS[base], tonumber(ARGV[3 + 2 * i - 1]))
    keep(base, tonumber(ARGV[3 + 2 * i]))
  end
  local spent, reserved = purge(base, now)
  table.insert(out, spent)
  table.insert(out, reserved)
end
return out
"""
)

# KEYS: five per budget. ARGV: id.
_RELEASE = (
    _PURGE
    + """
for i = 1, #KEYS / 5 do drop(5 * i - 4, ARGV[1]) end
return 1
"""
)


class RedisBudgetLedger:
    """`BudgetLedger` in Redis, sharing the state store's client (replicas agree)."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        from broker.state_redis import RedisStateStore

        assert isinstance(store, RedisStateStore)
        self._store = store
        self._clock = clock
        self._prefix = store.key_prefix
        self._reserve = store.client.register_script(_RESERVE)
        self._apply_script = store.client.register_script(_APPLY)
        self._release = store.client.register_script(_RELEASE)

    def _keys(self, key: LedgerKey) -> list[str]:
        tag = "{" + f"{self._prefix}budget:{key.budget}:{key.period}" + "}"
        return [f"{tag}:{part}" for part in ("spent", "reserved", "open", "exp", "done")]

    def _now_ms(self) -> int:
        return int(self._clock.now() * 1000)  # wall time: replicas share it

    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation:
        _checked(entries)
        _check_seconds(hold_seconds, "hold_seconds")
        args: list[Any] = [self._now_ms(), reservation_id, int(hold_seconds * 1000)]
        for key, amount in entries:
            args += [amount, key.limit, int(key.ttl_seconds * 1000)]
        async with self._store.guard("budget reserve"):
            keys = [name for k, _ in entries for name in self._keys(k)]
            answer = await self._reserve(keys=keys, args=args)
        if int(answer[0]) == 1:
            return Reservation(True)
        key = entries[int(answer[1]) - 1][0]
        return Reservation(False, key, int(answer[2]), int(answer[3]))

    async def _apply(self, op_id: str, entries: Entries, release: bool) -> Counters:
        if not _checked(entries):
            return {}
        args: list[Any] = [self._now_ms(), op_id, "1" if release else "0"]
        for key, amount in entries:
            args += [amount, int(key.ttl_seconds * 1000)]
        async with self._store.guard("budget settle"):
            keys = [name for k, _ in entries for name in self._keys(k)]
            flat = await self._apply_script(keys=keys, args=args)
        return {key: (int(flat[2 * i]), int(flat[2 * i + 1])) for i, (key, _) in enumerate(entries)}

    async def settle(self, reservation_id: str, entries: Entries) -> Counters:
        return await self._apply(reservation_id, entries, release=True)

    async def record(self, entries: Entries, record_id: str) -> Counters:
        return await self._apply(record_id, entries, release=False)

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None:
        if not keys:
            return
        async with self._store.guard("budget release"):
            names = [name for k in keys for name in self._keys(k)]
            await self._release(keys=names, args=[reservation_id])

    async def status(self, keys: Sequence[LedgerKey]) -> Counters:
        return await self._apply("", [(k, 0) for k in keys], release=False)


def build_ledger(store: StateStore, clock: Clock) -> BudgetLedger:
    """The ledger that goes with the state store: Redis when it is Redis, else in memory."""
    from broker.state_redis import RedisStateStore

    if isinstance(store, RedisStateStore):
        return RedisBudgetLedger(store, clock)
    return MemoryBudgetLedger(clock)

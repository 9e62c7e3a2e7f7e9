"""`BudgetLedger` on the state store's Redis: every replica reserves against the same counters.

It uses the `RedisStateStore`'s client, key prefix and deadline (no connection pool of its
own); every Redis failure or an operation past the deadline is `StateUnavailable`.

Keys. One budget period (budget name, period id) has four keys, all under one hash tag
``{<prefix>budget:<name>:<period>}`` (name and period percent-encoded, so ``:``, ``{`` and
``}`` in them cannot collide or break the tag):

* ``{T}:c`` -- a hash: ``spent`` and ``reserved`` (integers, micro-units);
* ``{T}:r`` -- a hash: reservation id -> amount held;
* ``{T}:x`` -- a sorted set: reservation id -> when its hold expires (Redis ``TIME``, in
  microseconds: one clock for every replica);
* ``{T}:d`` -- a set of the ids settled (``settle:<id>``) and recorded (``record:<id>``).

Every write raises the four keys' expiry to the key's ``ttl_seconds`` (never lowers it), so a
period's counters, holds and idempotency ids live and die together.

Atomicity. Each operation is one Lua script over the keys of all its budget periods: purge the
expired holds, check every key, then apply, with nothing in between, so ``spent + reserved <=
limit`` holds after every grant across replicas (the overspend bound is in
`broker.budget_ledger`). One script over several budget periods needs them on one server, as the
state store already does (one Redis primary, not Cluster). The hash tag keeps each budget period
in one slot; a Cluster port would run the script per slot in a fixed key order and release the
holds already taken when a later slot refuses. That keeps ``spent + reserved <= limit`` per key
(no overspend), at the price of a possible false refusal while another request's partial hold is
in place; it is not implemented here.

Numbers are exact below 2**53 (Lua numbers are doubles); `broker.budget_ledger` refuses larger
amounts and limits before they reach Redis.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from urllib.parse import quote

from broker.budget_ledger import (
    Counters,
    Entries,
    LedgerKey,
    Reservation,
    validate_entries,
    validate_id,
    validate_keys,
    validate_seconds,
)
from broker.state import StateUnavailable
from broker.state_redis import RedisStateStore

# Shared by every script. KEYS come in fours per budget period: counters, holds, hold expiries,
# done ids.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])

local function purge(c, r, x)
  local expired = redis.call('ZRANGEBYSCORE', x, '-inf', now)
  if #expired == 0 then return end
  local freed = 0
  for _, rid in ipairs(expired) do
    local amount = redis.call('HGET', r, rid)
    if amount then
      freed = freed + tonumber(amount)
      redis.call('HDEL', r, rid)
    end
    redis.call('ZREM', x, rid)
  end
  if freed > 0 then redis.call('HINCRBY', c, 'reserved', -freed) end
end

local function counters(c)
  local v = redis.call('HMGET', c, 'spent', 'reserved')
  return tonumber(v[1]) or 0, tonumber(v[2]) or 0
end

local function drop_hold(c, r, x, rid)
  local amount = redis.call('HGET', r, rid)
  if amount then
    redis.call('HDEL', r, rid)
    redis.call('ZREM', x, rid)
    redis.call('HINCRBY', c, 'reserved', -tonumber(amount))
  end
end

local function touch(i, ttl)
  for k = 4 * i - 3, 4 * i do
    local current = redis.call('PTTL', KEYS[k])
    if current == -1 or (current >= 0 and current < ttl) then
      redis.call('PEXPIRE', KEYS[k], ttl)
    end
  end
end
"""

# ARGV: reservation id, hold (microseconds), then per period: amount, limit, ttl (ms).
# Returns {1, 0, 0, 0} when granted, {0, index of the refusing period, spent, reserved} else.
_RESERVE = (
    _PRELUDE
    + """
local id = ARGV[1]
local hold = tonumber(ARGV[2])
local needed = {}
for i = 1, #KEYS / 4 do
  local c, r, x, d = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  purge(c, r, x)
  if redis.call('HEXISTS', r, id) == 0 and redis.call('SISMEMBER', d, 'settle:' .. id) == 0 then
    local spent, reserved = counters(c)
    if spent + reserved + tonumber(ARGV[3*i]) > tonumber(ARGV[3*i+1]) then
      return {0, i, spent, reserved}
    end
    needed[#needed + 1] = i
  end
end
for _, i in ipairs(needed) do
  local amount = ARGV[3*i]
  redis.call('HSET', KEYS[4*i-2], id, amount)
  redis.call('ZADD', KEYS[4*i-1], now + hold, id)
  redis.call('HINCRBY', KEYS[4*i-3], 'reserved', amount)
  redis.call('HINCRBY', KEYS[4*i-3], 'spent', 0)
  touch(i, tonumber(ARGV[3*i+2]))
end
return {1, 0, 0, 0}
"""
)

# ARGV: mode ('settle' or 'record'), id, then per period: amount, ttl (ms).
# Returns spent, reserved per period.
_SPEND = (
    _PRELUDE
    + """
local settle = ARGV[1] == 'settle'
local id = ARGV[2]
local marker = ARGV[1] .. ':' .. id
local out = {}
for i = 1, #KEYS / 4 do
  local c, r, x, d = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1], KEYS[4*i]
  purge(c, r, x)
  if redis.call('SADD', d, marker) == 1 then
    if settle then drop_hold(c, r, x, id) end
    redis.call('HINCRBY', c, 'spent', ARGV[2*i+1])
    redis.call('HINCRBY', c, 'reserved', 0)
    touch(i, tonumber(ARGV[2*i+2]))
  end
  local spent, reserved = counters(c)
  out[#out + 1] = spent
  out[#out + 1] = reserved
end
return out
"""
)

# ARGV: reservation id, or '' to only purge. Returns spent, reserved per period.
_RELEASE_OR_STATUS = (
    _PRELUDE
    + """
local id = ARGV[1]
local out = {}
for i = 1, #KEYS / 4 do
  local c, r, x = KEYS[4*i-3], KEYS[4*i-2], KEYS[4*i-1]
  purge(c, r, x)
  if id ~= '' then drop_hold(c, r, x, id) end
  local spent, reserved = counters(c)
  out[#out + 1] = spent
  out[#out + 1] = reserved
end
return out
"""
)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class RedisBudgetLedger:
    """`BudgetLedger` on the Redis of a `RedisStateStore` (see the module doc)."""

    def __init__(self, state: RedisStateStore) -> None:
        self._state = state
        self._redis = state.client
        self._prefix = state.key_prefix
        self._reserve = self._redis.register_script(_RESERVE)
        self._spend = self._redis.register_script(_SPEND)
        self._release_or_status = self._redis.register_script(_RELEASE_OR_STATUS)

    def keys_of(self, key: LedgerKey) -> list[str]:
        """The four Redis keys of `key`'s budget period (one hash tag)."""
        tag = f"{self._prefix}budget:{quote(key.budget, safe='')}:{quote(key.period, safe='')}"
        return [f"{{{tag}}}:{part}" for part in ("c", "r", "x", "d")]

    def _keys(self, keys: Sequence[LedgerKey]) -> list[str]:
        return [k for key in keys for k in self.keys_of(key)]

    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation:
        validate_entries(entries)
        validate_id(reservation_id, "reservation_id")
        validate_seconds(hold_seconds, "hold_seconds")
        if not entries:
            return Reservation(True)
        args: list[str | int] = [reservation_id, math.ceil(hold_seconds * 1_000_000)]
        for key, amount in entries:
            args += [amount, key.limit, _ms(key.ttl_seconds)]
        async with self._state.guard("budget reserve"):
            granted, index, spent, reserved = await self._reserve(
                keys=self._keys([k for k, _ in entries]), args=args
            )
        if granted:
            return Reservation(True)
        return Reservation(False, entries[int(index) - 1][0], int(spent), int(reserved))

    async def settle(self, reservation_id: str, entries: Entries) -> Counters:
        validate_entries(entries, "actual")
        validate_id(reservation_id, "reservation_id")
        return await self._run_spend("settle", reservation_id, entries)

    async def record(self, entries: Entries, record_id: str) -> Counters:
        validate_entries(entries)
        validate_id(record_id, "record_id")
        return await self._run_spend("record", record_id, entries)

    async def _run_spend(self, mode: str, identifier: str, entries: Entries) -> Counters:
        if not entries:
            return {}
        args: list[str | int] = [mode, identifier]
        for key, amount in entries:
            args += [amount, _ms(key.ttl_seconds)]
        async with self._state.guard(f"budget {mode}"):
            values = await self._spend(keys=self._keys([k for k, _ in entries]), args=args)
        return _counters([k for k, _ in entries], values)

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None:
        validate_id(reservation_id, "reservation_id")
        await self._run_release_or_status(keys, reservation_id, "budget release")

    async def status(self, keys: Sequence[LedgerKey]) -> Counters:
        return await self._run_release_or_status(keys, "", "budget status")

    async def _run_release_or_status(
        self, keys: Sequence[LedgerKey], reservation_id: str, operation: str
    ) -> Counters:
        validate_keys(keys)
        if not keys:
            return {}
        async with self._state.guard(operation):
            values = await self._release_or_status(keys=self._keys(keys), args=[reservation_id])
        return _counters(keys, values)


def _counters(keys: Sequence[LedgerKey], values: Sequence[object]) -> Counters:
    if len(values) != 2 * len(keys):
        raise StateUnavailable("shared state (redis) answered the budget ledger malformed")
    numbers = [int(v) for v in values]  # type: ignore[call-overload]
    return {key: (numbers[2 * i], numbers[2 * i + 1]) for i, key in enumerate(keys)}

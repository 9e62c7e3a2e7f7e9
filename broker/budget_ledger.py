"""The budget ledger: spend and reservations per budget period, shared between replicas.

A budget period (a `LedgerKey`: budget name, period id such as ``2026-11`` or ``2026-11-30``,
its limit, how long its counters live) has two counters, in integer micro-units of the budget's
currency (1 = 0.000001): ``spent`` (settled usage) and ``reserved`` (the estimates of calls in
flight). A credential fetch `reserve`s an estimate on every budget that applies to it, all or
nothing; the gateway's usage report `settle`s the reservation with the actual cost; a
reservation never settled is released when its hold expires. `record` books spend that had no
reservation (usage reported for a fetch made with no budget in force, an ``alert`` budget).

Invariant and the overspend bound. `reserve` grants only when, for every key, ``spent +
reserved + amount <= limit``, checked and applied in one atomic step across all keys, so
``spent + reserved <= limit`` holds after every grant, however many replicas reserve at once.
Spend can pass the limit only through what was not reserved:

* a settle whose actual exceeds what it still held: ``actual - held``, where ``held`` is the
  reservation's amount, or 0 when the hold expired (or there never was one) before the settle;
* `record` (spend without a reservation).

So ``spent <= limit + sum(max(0, actual_i - held_i)) + sum(recorded)``; with estimates that
bound the actual cost and holds longer than a call takes, the overspend is at most the actuals
of the reservations in flight when their holds expired, and zero otherwise. A refusal is never
false: it reports the refusing key's ``(spent, reserved)`` read in the same atomic step, and
``spent + reserved + amount > limit`` holds for them.

Idempotency. `reserve` by reservation id (a retry neither adds a second hold nor refuses
because of its own first hold; a reservation already settled is not held again); `settle` by
reservation id and `record` by record id, per key (a repeat adds nothing and returns the current
counters). The ids settled and recorded are kept as long as the period's counters.

Implementations: `InMemoryBudgetLedger` (one process; holds and lifetimes on the injected
clock's monotonic time) and `broker.budget_ledger_redis.RedisBudgetLedger` (on the state
store's Redis; every replica shares it). `build_ledger` picks the one matching the state store.
Every operation of the Redis ledger raises `broker.state.StateUnavailable` when Redis cannot
answer: callers fail closed for ``deny`` budgets.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from broker.clock import Clock
from broker.state import StateStore

MAX_AMOUNT = 2**53 - 1
"""Amounts, limits and counters stay exact integers below this (Lua numbers are doubles):
9,007,199,254 currency units at micro-unit resolution."""


@dataclass(frozen=True, slots=True)
class LedgerKey:
    """One budget period and its limit. Counters are identified by ``(budget, period)`` only:
    a limit changed by a policy reload applies to the same counters."""

    budget: str
    period: str
    limit: int
    ttl_seconds: float
    """How long the period's counters live after their last change (past the period's end,
    e.g. to the end of the period plus a grace for late usage reports)."""

    @property
    def counter_id(self) -> tuple[str, str]:
        return (self.budget, self.period)


@dataclass(frozen=True, slots=True)
class Reservation:
    granted: bool
    refused_by: LedgerKey | None = None
    """The first key (in the order given) that had no room; None when granted."""
    spent: int = 0
    """The refusing key's spent when refused (else 0)."""
    reserved: int = 0
    """The refusing key's reserved when refused (else 0)."""


Entries = Sequence[tuple[LedgerKey, int]]
Counters = dict[LedgerKey, tuple[int, int]]


class BudgetLedger(Protocol):
    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation:
        """Hold each entry's amount on its key for `hold_seconds`, all or nothing: granted only
        when every key has room (``spent + reserved + amount <= limit``, expired holds purged
        first). Idempotent by `reservation_id`."""
        ...

    async def settle(self, reservation_id: str, entries: Entries) -> Counters:
        """Replace the reservation by each entry's actual amount (added to spent; the hold, if
        still there, is removed). For a reservation that expired or never existed, just adds
        the actuals. Idempotent per key by `reservation_id`. Returns ``(spent, reserved)``
        after, per key."""
        ...

    async def record(self, entries: Entries, record_id: str) -> Counters:
        """Add each entry's amount to spent without a reservation; idempotent per key by
        `record_id`. Returns ``(spent, reserved)`` after, per key."""
        ...

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None:
        """Drop the reservation's holds (nothing is spent)."""
        ...

    async def status(self, keys: Sequence[LedgerKey]) -> Counters:
        """``(spent, reserved)`` per key; expired holds are not counted."""
        ...


def validate_entries(entries: Entries, what: str = "amount") -> None:
    """Refuse what would corrupt the counters: non-integer or negative amounts, a key twice,
    bad limits or lifetimes. ValueError, before anything is stored."""
    seen: set[tuple[str, str]] = set()
    for key, amount in entries:
        validate_key(key)
        if key.counter_id in seen:
            raise ValueError(f"budget {key.budget!r} period {key.period!r} given twice")
        seen.add(key.counter_id)
        if not _is_int(amount) or not 0 <= amount <= MAX_AMOUNT:
            raise ValueError(f"{what} must be an integer between 0 and {MAX_AMOUNT}")


def validate_keys(keys: Sequence[LedgerKey]) -> None:
    for key in keys:
        validate_key(key)
    if len({k.counter_id for k in keys}) != len(keys):
        raise ValueError("a budget period given twice")


def validate_key(key: LedgerKey) -> None:
    if not key.budget or not key.period:
        raise ValueError("a ledger key needs a budget name and a period")
    if not _is_int(key.limit) or not 0 <= key.limit <= MAX_AMOUNT:
        raise ValueError(f"a budget limit must be an integer between 0 and {MAX_AMOUNT}")
    validate_seconds(key.ttl_seconds, "ttl_seconds")


def validate_seconds(seconds: float, what: str) -> None:
    if not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{what} must be a positive finite number of seconds")


def validate_id(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{what} must be a non-empty string")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class _Period:
    spent: int = 0
    reserved: int = 0
    holds: dict[str, tuple[int, float]] = field(default_factory=dict)  # id -> (amount, until)
    done: set[str] = field(default_factory=set)  # "settle:<id>", "record:<id>"
    expires_at: float = 0.0

    def purge(self, now: float) -> None:
        for rid in [r for r, (_, until) in self.holds.items() if until <= now]:
            amount, _ = self.holds.pop(rid)
            self.reserved -= amount

    def touch(self, now: float, ttl: float) -> None:
        self.expires_at = max(self.expires_at, now + ttl)


class InMemoryBudgetLedger:
    """`BudgetLedger` for one process. Every operation runs without awaiting, so each is atomic
    on the event loop. Periods are forgotten `ttl_seconds` after their last change."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._periods: dict[tuple[str, str], _Period] = {}
        self._sweep_at = 1024

    def _period(self, key: LedgerKey, now: float, *, create: bool) -> _Period | None:
        period = self._periods.get(key.counter_id)
        if period is not None and period.expires_at <= now:
            del self._periods[key.counter_id]
            period = None
        if period is None and create:
            period = self._periods[key.counter_id] = _Period(expires_at=now + key.ttl_seconds)
            if len(self._periods) >= self._sweep_at:
                self._sweep(now)
        if period is not None:
            period.purge(now)
        return period

    def _sweep(self, now: float) -> None:
        for stale in [k for k, p in self._periods.items() if p.expires_at <= now]:
            del self._periods[stale]
        self._sweep_at = max(1024, 2 * len(self._periods))

    async def reserve(
        self, entries: Entries, reservation_id: str, hold_seconds: float
    ) -> Reservation:
        validate_entries(entries)
        validate_id(reservation_id, "reservation_id")
        validate_seconds(hold_seconds, "hold_seconds")
        now = self._clock.monotonic()
        needed: list[tuple[LedgerKey, int]] = []
        for key, amount in entries:
            period = self._period(key, now, create=False)
            if period is not None and (
                reservation_id in period.holds or f"settle:{reservation_id}" in period.done
            ):
                continue  # already held (a retry) or already settled
            spent, reserved = (period.spent, period.reserved) if period else (0, 0)
            if spent + reserved + amount > key.limit:
                return Reservation(False, key, spent, reserved)
            needed.append((key, amount))
        for key, amount in needed:
            period = self._period(key, now, create=True)
            assert period is not None
            period.holds[reservation_id] = (amount, now + hold_seconds)
            period.reserved += amount
            period.touch(now, key.ttl_seconds)
        return Reservation(True)

    async def settle(self, reservation_id: str, entries: Entries) -> Counters:
        validate_entries(entries, "actual")
        validate_id(reservation_id, "reservation_id")
        return self._spend(entries, f"settle:{reservation_id}", reservation_id)

    async def record(self, entries: Entries, record_id: str) -> Counters:
        validate_entries(entries)
        validate_id(record_id, "record_id")
        return self._spend(entries, f"record:{record_id}", None)

    def _spend(self, entries: Entries, marker: str, reservation_id: str | None) -> Counters:
        now = self._clock.monotonic()
        after: Counters = {}
        for key, amount in entries:
            period = self._period(key, now, create=True)
            assert period is not None
            if marker not in period.done:
                if reservation_id is not None and reservation_id in period.holds:
                    held, _ = period.holds.pop(reservation_id)
                    period.reserved -= held
                period.spent += amount
                period.done.add(marker)
                period.touch(now, key.ttl_seconds)
            after[key] = (period.spent, period.reserved)
        return after

    async def release(self, reservation_id: str, keys: Sequence[LedgerKey]) -> None:
        validate_id(reservation_id, "reservation_id")
        validate_keys(keys)
        now = self._clock.monotonic()
        for key in keys:
            period = self._period(key, now, create=False)
            if period is not None and reservation_id in period.holds:
                held, _ = period.holds.pop(reservation_id)
                period.reserved -= held

    async def status(self, keys: Sequence[LedgerKey]) -> Counters:
        validate_keys(keys)
        now = self._clock.monotonic()
        result: Counters = {}
        for key in keys:
            period = self._period(key, now, create=False)
            result[key] = (period.spent, period.reserved) if period else (0, 0)
        return result


def build_ledger(store: StateStore, clock: Clock) -> BudgetLedger:
    """The ledger lives where the rest of the shared state lives: on the state store's Redis
    when it has one (every replica enforces the same budgets), in this process otherwise."""
    from broker.state_redis import RedisStateStore

    if isinstance(store, RedisStateStore):
        from broker.budget_ledger_redis import RedisBudgetLedger

        return RedisBudgetLedger(store)
    return InMemoryBudgetLedger(clock)

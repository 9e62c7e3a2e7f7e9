"""The `BudgetLedger` contract, one suite for every implementation.

`BudgetLedgerContract` holds the tests; a subclass supplies the `kit` fixture (a ledger and a way
to let time pass). Here: `MemoryBudgetLedger` on a `FrozenClock`. The Redis ledger runs the
same suite in tests/integration/test_budget_ledger_redis.py, where time passes for real, so holds
and lifetimes below are short (and the margins generous).
"""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from broker.budget_ledger import (
    BudgetLedger,
    LedgerKey,
    MemoryBudgetLedger,
    Reservation,
    build_ledger,
)
from broker.clock import FrozenClock
from broker.state import InMemoryStateStore

pytestmark = pytest.mark.anyio

HOLD = 0.6  # seconds a reservation is held in the expiry tests
TTL = 3600.0


@dataclass
class LedgerKit:
    ledger: BudgetLedger
    advance: Callable[[float], Awaitable[None]]


def key(budget: str = "cc-claims-ops", limit: int = 1000, **kw: Any) -> LedgerKey:
    return LedgerKey(budget, kw.get("period", "2026-11"), limit, kw.get("ttl", TTL))


def rid() -> str:
    return uuid.uuid4().hex


class BudgetLedgerContract:
    """Behaviour every `BudgetLedger` must have. Subclasses define the `kit` fixture. Budget
    names are unique per test (the Redis suite shares one server per module)."""

    @pytest.fixture
    def kit(self) -> Any:  # pragma: no cover - always overridden
        raise NotImplementedError

    @pytest.fixture
    def name(self) -> str:
        return f"cc-{uuid.uuid4().hex[:8]}"

    # -- limits ----------------------------------------------------------------------------

    async def test_reserve_up_to_the_limit_then_refuse_naming_the_key(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=1000)
        assert await kit.ledger.reserve([(k, 400)], "a", 60) == Reservation(True)
        assert await kit.ledger.reserve([(k, 600)], "b", 60) == Reservation(True)  # == limit
        refused = await kit.ledger.reserve([(k, 1)], "c", 60)
        assert refused == Reservation(False, k, 0, 1000)
        assert await kit.ledger.status([k]) == {k: (0, 1000)}  # the refusal held nothing

    async def test_refusal_reports_spent_and_reserved(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=1000)
        await kit.ledger.record([(k, 700)], "call-1")
        await kit.ledger.reserve([(k, 200)], "a", 60)
        refused = await kit.ledger.reserve([(k, 101)], "b", 60)
        assert (refused.granted, refused.refused_by, refused.spent, refused.reserved) == (
            False,
            k,
            700,
            200,
        )
        assert await kit.ledger.reserve([(k, 100)], "c", 60) == Reservation(True)

    async def test_zero_limit_and_zero_amounts(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=0)
        assert (await kit.ledger.reserve([(k, 1)], "a", 60)).granted is False
        assert (await kit.ledger.reserve([(k, 0)], "b", 60)).granted is True
        await kit.ledger.record([(k, 5)], "over")  # spend without reservation is booked
        refused = await kit.ledger.reserve([(k, 0)], "c", 60)  # over budget: even 0 is refused
        assert (refused.granted, refused.spent) == (False, 5)

    async def test_a_changed_limit_applies_to_the_same_counters(
        self, kit: LedgerKit, name: str
    ) -> None:
        await kit.ledger.reserve([(key(name, limit=100), 80)], "a", 60)
        lowered = key(name, limit=50)
        refused = await kit.ledger.reserve([(lowered, 1)], "b", 60)
        assert refused == Reservation(False, lowered, 0, 80)
        raised = key(name, limit=200)
        assert (await kit.ledger.reserve([(raised, 120)], "c", 60)).granted
        assert await kit.ledger.status([raised]) == {raised: (0, 200)}

    async def test_periods_are_separate_counters(self, kit: LedgerKit, name: str) -> None:
        nov, dec = key(name, limit=100, period="2026-11"), key(name, limit=100, period="2026-12")
        await kit.ledger.record([(nov, 100)], "r1")
        assert (await kit.ledger.reserve([(nov, 1)], "a", 60)).granted is False
        assert (await kit.ledger.reserve([(dec, 100)], "b", 60)).granted is True
        assert await kit.ledger.status([nov, dec]) == {nov: (100, 0), dec: (0, 100)}

    # -- several budgets at once -----------------------------------------------------------

    async def test_multi_key_reserve_is_all_or_nothing(self, kit: LedgerKit, name: str) -> None:
        centre = key(f"{name}-centre", limit=1000)
        person = key(f"{name}-person", limit=300)
        agent = key(f"{name}-agent", limit=5000)
        first = await kit.ledger.reserve([(centre, 200), (person, 250), (agent, 9)], "a", 60)
        assert first.granted
        refused = await kit.ledger.reserve([(centre, 100), (person, 100), (agent, 9)], "b", 60)
        assert refused == Reservation(False, person, 0, 250)
        assert await kit.ledger.status([centre, person, agent]) == {
            centre: (0, 200),
            person: (0, 250),
            agent: (0, 9),
        }
        granted = await kit.ledger.reserve([(centre, 800), (agent, 1)], "c", 60)
        assert granted.granted

    async def test_refusal_names_the_first_key_over(self, kit: LedgerKit, name: str) -> None:
        a, b = key(f"{name}-a", limit=10), key(f"{name}-b", limit=10)
        await kit.ledger.record([(a, 10), (b, 10)], "fill")
        assert (await kit.ledger.reserve([(b, 1), (a, 1)], "x", 60)).refused_by == b
        assert (await kit.ledger.reserve([(a, 1), (b, 1)], "y", 60)).refused_by == a

    # -- idempotency -----------------------------------------------------------------------

    async def test_reserve_is_idempotent(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=100)
        assert (await kit.ledger.reserve([(k, 100)], "a", 60)).granted
        # A retry is granted (its own hold is not counted against it) and holds nothing more.
        assert (await kit.ledger.reserve([(k, 100)], "a", 60)).granted
        assert await kit.ledger.status([k]) == {k: (0, 100)}

    async def test_concurrent_duplicate_reserves_hold_once(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=100)
        results = await asyncio.gather(*(kit.ledger.reserve([(k, 60)], "a", 60) for _ in range(20)))
        assert all(r.granted for r in results)
        assert await kit.ledger.status([k]) == {k: (0, 60)}

    async def test_settle_replaces_the_reservation_by_the_actual(
        self, kit: LedgerKit, name: str
    ) -> None:
        centre, person = key(f"{name}-c", limit=1000), key(f"{name}-p", limit=1000)
        await kit.ledger.reserve([(centre, 300), (person, 300)], "a", 60)
        await kit.ledger.reserve([(centre, 100)], "b", 60)
        after = await kit.ledger.settle("a", [(centre, 120), (person, 120)])
        assert after == {centre: (120, 100), person: (120, 0)}
        # A repeat adds nothing and answers the current counters.
        await kit.ledger.record([(centre, 5)], "other")
        assert await kit.ledger.settle("a", [(centre, 120), (person, 120)]) == {
            centre: (125, 100),
            person: (120, 0),
        }

    async def test_concurrent_duplicate_settles_count_once(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=1000)
        await kit.ledger.reserve([(k, 100)], "a", 60)
        await asyncio.gather(*(kit.ledger.settle("a", [(k, 80)]) for _ in range(20)))
        assert await kit.ledger.status([k]) == {k: (80, 0)}

    async def test_settle_without_a_reservation_adds_the_actual(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=100)
        assert await kit.ledger.settle("never-reserved", [(k, 40)]) == {k: (40, 0)}
        assert await kit.ledger.settle("never-reserved", [(k, 40)]) == {k: (40, 0)}

    async def test_record_is_idempotent_per_id(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=100)
        assert await kit.ledger.record([(k, 30)], "call-1") == {k: (30, 0)}
        assert await kit.ledger.record([(k, 30)], "call-1") == {k: (30, 0)}
        assert await kit.ledger.record([(k, 30)], "call-2") == {k: (60, 0)}

    async def test_concurrent_duplicate_records_count_once(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=100)
        await asyncio.gather(*(kit.ledger.record([(k, 7)], "dup") for _ in range(20)))
        assert await kit.ledger.status([k]) == {k: (7, 0)}

    # -- release and expiry ----------------------------------------------------------------

    async def test_release_frees_the_hold(self, kit: LedgerKit, name: str) -> None:
        a, b = key(f"{name}-a", limit=100), key(f"{name}-b", limit=100)
        await kit.ledger.reserve([(a, 100), (b, 60)], "r", 60)
        assert not (await kit.ledger.reserve([(a, 1)], "s", 60)).granted
        await kit.ledger.release("r", [a, b])
        await kit.ledger.release("r", [a, b])  # again: nothing to do
        assert await kit.ledger.status([a, b]) == {a: (0, 0), b: (0, 0)}
        assert (await kit.ledger.reserve([(a, 100)], "s", 60)).granted

    async def test_an_expired_hold_is_released(self, kit: LedgerKit, name: str) -> None:
        k = key(name, limit=100)
        await kit.ledger.reserve([(k, 100)], "short", HOLD)
        await kit.ledger.reserve([(k, 0)], "zero", 60)
        assert not (await kit.ledger.reserve([(k, 1)], "b", 60)).granted
        await kit.advance(HOLD + 0.4)
        assert await kit.ledger.status([k]) == {k: (0, 0)}
        assert (await kit.ledger.reserve([(k, 100)], "b", 60)).granted

    async def test_a_late_settle_after_expiry_is_the_documented_overspend(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=100)
        await kit.ledger.reserve([(k, 100)], "slow", HOLD)
        await kit.advance(HOLD + 0.4)
        await kit.ledger.reserve([(k, 100)], "next", 60)
        await kit.ledger.settle("next", [(k, 100)])
        # The slow call's hold expired before its report: its actual is spent beyond the limit,
        # the bound `limit + actual - held` with held 0.
        assert await kit.ledger.settle("slow", [(k, 90)]) == {k: (190, 0)}

    async def test_actual_above_the_estimate_is_bounded_by_the_difference(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=100)
        for i in range(4):
            assert (await kit.ledger.reserve([(k, 25)], f"r{i}", 60)).granted
        assert not (await kit.ledger.reserve([(k, 1)], "more", 60)).granted
        actuals = [20, 30, 25, 40]
        for i, actual in enumerate(actuals):
            await kit.ledger.settle(f"r{i}", [(k, actual)])
        spent, reserved = (await kit.ledger.status([k]))[k]
        assert (spent, reserved) == (115, 0)
        assert spent <= 100 + sum(max(0, a - 25) for a in actuals)

    async def test_a_retry_after_its_hold_expired_holds_again(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=100)
        await kit.ledger.reserve([(k, 50)], "a", HOLD)
        await kit.advance(HOLD + 0.4)
        assert (await kit.ledger.reserve([(k, 50)], "a", 60)).granted
        assert await kit.ledger.status([k]) == {k: (0, 50)}  # granted means held

    async def test_a_retry_with_another_budget_holds_each_once(
        self, kit: LedgerKit, name: str
    ) -> None:
        a, b = key(f"{name}-a", limit=15), key(f"{name}-b", limit=100)
        await kit.ledger.reserve([(a, 10)], "r", 60)
        # Its own hold on `a` is not counted against it again (10 + 10 > 15).
        assert (await kit.ledger.reserve([(a, 10), (b, 10)], "r", 60)).granted
        assert await kit.ledger.status([a, b]) == {a: (0, 10), b: (0, 10)}
        await kit.ledger.release("r", [a, b])
        assert await kit.ledger.status([a, b]) == {a: (0, 0), b: (0, 0)}

    async def test_counters_live_for_their_ttl(self, kit: LedgerKit, name: str) -> None:
        short = key(name, limit=100, ttl=1.0)
        await kit.ledger.reserve([(short, 40)], "a", 60)
        await kit.ledger.record([(short, 60)], "r")
        assert not (await kit.ledger.reserve([(short, 1)], "b", 60)).granted
        await kit.advance(1.5)
        assert await kit.ledger.status([short]) == {short: (0, 0)}
        assert (await kit.ledger.reserve([(short, 100)], "b", 60)).granted

    # -- concurrency -----------------------------------------------------------------------

    async def test_concurrent_reserves_never_exceed_and_never_falsely_refuse(
        self, kit: LedgerKit, name: str
    ) -> None:
        k = key(name, limit=1000)
        results = await asyncio.gather(
            *(kit.ledger.reserve([(k, 30)], f"r{i}", 60) for i in range(60))
        )
        granted = sum(r.granted for r in results)
        assert granted == 1000 // 30
        assert all(r.spent + r.reserved + 30 > 1000 for r in results if not r.granted)
        assert await kit.ledger.status([k]) == {k: (0, granted * 30)}

    # -- input -----------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "entries",
        [
            [(key("x"), -1)],  # would lower spent
            [(key("x"), 1.5)],
            [(key("x"), True)],
            [(key("x"), 1), (key("x", limit=5), 1)],  # one period twice
            [(LedgerKey("x", "2026-11", -1, TTL), 1)],
            [(LedgerKey("x", "2026-11", 10, math.nan), 1)],
            [(LedgerKey("x", "2026-11", 10, 0), 1)],
        ],
    )
    async def test_bad_input_is_refused_before_anything_is_stored(
        self, kit: LedgerKit, entries: list[tuple[LedgerKey, Any]]
    ) -> None:
        with pytest.raises(ValueError):
            await kit.ledger.reserve(entries, "a", 60)
        with pytest.raises(ValueError):
            await kit.ledger.settle("a", entries)
        with pytest.raises(ValueError):
            await kit.ledger.record(entries, "a")
        x = key("x")
        assert await kit.ledger.status([x]) == {x: (0, 0)}

    @pytest.mark.parametrize("hold", [0, -1, math.inf, math.nan])
    async def test_bad_hold_is_refused(self, kit: LedgerKit, name: str, hold: float) -> None:
        k = key(name)
        with pytest.raises(ValueError):
            await kit.ledger.reserve([(k, 1)], "a", hold)
        assert await kit.ledger.status([k]) == {k: (0, 0)}

    async def test_empty_entries(self, kit: LedgerKit) -> None:
        assert (await kit.ledger.reserve([], "a", 60)).granted
        assert await kit.ledger.settle("a", []) == {}
        assert await kit.ledger.record([], "a") == {}
        assert await kit.ledger.status([]) == {}


class TestMemoryBudgetLedger(BudgetLedgerContract):
    @pytest.fixture
    def kit(self) -> LedgerKit:
        clock = FrozenClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        return LedgerKit(MemoryBudgetLedger(clock), advance)


def test_build_ledger_is_in_memory_for_a_memory_state_store() -> None:
    clock = FrozenClock()
    assert isinstance(build_ledger(InMemoryStateStore(clock), clock), MemoryBudgetLedger)


async def test_memory_forgets_expired_periods_past_its_bound() -> None:
    clock = FrozenClock()
    ledger = MemoryBudgetLedger(clock, max_periods=500)
    old = LedgerKey("old", "2026-10", 10, 5.0)
    await ledger.record([(old, 10)], "r")
    clock.advance(10)  # the old period's counters are past their lifetime
    for i in range(2000):
        await ledger.record([(LedgerKey(f"b{i}", "2026-11", 10, 1.0), 1)], "r")
        clock.advance(0.01)
    # Periods past their lifetime are dropped once the ledger holds more than its bound.
    assert await ledger.status([old]) == {old: (0, 0)}
    live = [LedgerKey(f"b{i}", "2026-11", 10, 1.0) for i in range(1990, 2000)]
    assert set((await ledger.status(live)).values()) == {(1, 0)}

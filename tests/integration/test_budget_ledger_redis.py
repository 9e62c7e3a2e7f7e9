"""`RedisBudgetLedger` against a real ``redis-server`` started per module on a free loopback port.

Runs the shared `BudgetLedgerContract`, then what only the shared ledger has: two replicas (two
state stores) on the same counters; the keys of a budget period under one hash tag (one Cluster
slot) with their lifetimes; one script call per reserve; a concurrency proof from two processes,
each a replica with its own connection pool: bursts of reserves against one budget and against a
shared and a per-process budget (exactly as many granted as fit, all or nothing, none falsely
refused), fetch-and-report loops (spend never above the limit when actuals stay within their
estimates, above it only by the excesses otherwise), calls never reported or reported after
their hold expired (holds end, spend above the limit only by the late actuals); Redis stopped or
hung -> `StateUnavailable` promptly, then healing without rebuilding the ledger.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import random
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from redis.crc import key_slot

from broker.budget_ledger import LedgerKey, RedisBudgetLedger, build_ledger
from broker.clock import SystemClock
from broker.state import StateUnavailable
from broker.state_redis import RedisStateStore
from tests.support.servers import RedisServer, run_redis
from tests.unit.test_budget_ledger import BudgetLedgerContract, LedgerKit

pytestmark = pytest.mark.anyio

OUTAGE_BOUND_SECONDS = 2.0
TTL = 3600.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:"


@pytest.fixture
async def make_store(
    redis_server: RedisServer, prefix: str
) -> AsyncIterator[Callable[..., RedisStateStore]]:
    """State stores on the module's server; all share one fresh key prefix per test."""
    stores: list[RedisStateStore] = []

    def make(**options: Any) -> RedisStateStore:
        options.setdefault("key_prefix", prefix)
        store = RedisStateStore(redis_server.url, clock=SystemClock(), **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestRedisBudgetLedgerContract(BudgetLedgerContract):
    @pytest.fixture
    def kit(self, make_store: Callable[..., RedisStateStore]) -> LedgerKit:
        # The contract is about answers, not latency: generous timeouts on a busy machine.
        store = make_store(socket_timeout=3.0, connect_timeout=3.0)
        return LedgerKit(RedisBudgetLedger(store, SystemClock()), asyncio.sleep)


async def test_build_ledger_uses_the_state_stores_redis(
    make_store: Callable[..., RedisStateStore],
) -> None:
    store = make_store()
    ledger = build_ledger(store, SystemClock())
    assert isinstance(ledger, RedisBudgetLedger)
    assert ledger._store is store  # its client: no pool of its own


# -- replicas and keys ---------------------------------------------------------------------


async def test_two_replicas_share_the_counters(
    make_store: Callable[..., RedisStateStore],
) -> None:
    a, b = (
        RedisBudgetLedger(make_store(), SystemClock()),
        RedisBudgetLedger(make_store(), SystemClock()),
    )
    k = LedgerKey("cc-claims-ops", "2026-11", 100, TTL)
    assert (await a.reserve([(k, 60)], "fetch-1", 60)).granted
    refused = await b.reserve([(k, 50)], "fetch-2", 60)
    assert (refused.granted, refused.spent, refused.reserved) == (False, 0, 60)
    assert await b.settle("fetch-1", [(k, 45)]) == {k: (45, 0)}
    assert await a.settle("fetch-1", [(k, 45)]) == {k: (45, 0)}  # reported twice, once counted
    assert (await a.reserve([(k, 50)], "fetch-2", 60)).granted


def _layout(prefix: str, budget: str, period: str) -> list[str]:
    """The documented keys of a budget period (broker.budget_ledger's module doc)."""
    tag = f"{{{prefix}budget:{budget}:{period}}}"
    return [f"{tag}:{part}" for part in ("spent", "reserved", "open", "exp", "done")]


async def test_a_budget_period_is_one_hash_tag_with_its_lifetime(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer, prefix: str
) -> None:
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    k = LedgerKey("alice-daily", "2026-11-30", 1000, 30.0)
    other = LedgerKey("bob-daily", "2026-11-30", 1000, 30.0)
    await ledger.reserve([(k, 10), (other, 10)], "r1", 60)
    await ledger.settle("r1", [(k, 8), (other, 8)])
    await ledger.reserve([(k, 10)], "r2", 60)
    keys = _layout(prefix, k.budget, k.period)
    assert len({key_slot(x.encode()) for x in keys}) == 1  # one Cluster slot per period
    admin = redis_server.client()
    try:
        stored = sorted(x.decode() for x in admin.scan_iter(match=f"{{{prefix}*"))
        spent, reserved, _, _, done = _layout(prefix, other.budget, other.period)
        # Bob holds nothing any more: Redis dropped his emptied hash and sorted set.
        assert stored == sorted([*keys, spent, reserved, done])
        assert all(0 < admin.pttl(x) <= 30_000 for x in stored)
        assert (int(admin.get(keys[0])), int(admin.get(keys[1]))) == (8, 10)
        # A later write never lowers a lifetime, a longer one raises it.
        await ledger.record([(LedgerKey(k.budget, k.period, 1000, 5.0), 1)], "rec")
        assert all(admin.pttl(x) > 20_000 for x in keys)
        await ledger.record([(LedgerKey(k.budget, k.period, 1000, 90.0), 1)], "rec2")
        assert all(admin.pttl(x) > 60_000 for x in keys)
        # Status and release of an unknown period create nothing.
        unknown = LedgerKey("nobody-monthly", "2026-11", 10, TTL)
        assert await ledger.status([unknown]) == {unknown: (0, 0)}
        await ledger.release("r9", [unknown])
        assert not list(admin.scan_iter(match=f"{{{prefix}budget:nobody*"))
    finally:
        admin.close()


async def test_reserve_is_one_script_call(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    keys = [LedgerKey(f"b{i}", "2026-11", 100, TTL) for i in range(3)]
    await ledger.status(keys)  # loads the script
    admin = redis_server.client()
    try:
        admin.config_resetstat()
        assert (await ledger.reserve([(k, 1) for k in keys], "r", 60)).granted
        stats = admin.info("commandstats")
    finally:
        admin.close()
    data = {k: v["calls"] for k, v in stats.items() if not k.startswith("cmdstat_config")}
    # One round trip: one EVALSHA (the stats also count the commands the script ran).
    assert data["cmdstat_evalsha"] == 1
    assert not {"cmdstat_exec", "cmdstat_multi", "cmdstat_eval"} & data.keys()


# -- concurrency from two processes --------------------------------------------------------


def _process_main(
    url: str, prefix: str, job: str, args: dict[str, Any], barrier: Any, out: Any
) -> None:
    """One broker replica: its own state store (own connection pool) and ledger."""
    out.put({"me": args["me"], **asyncio.run(_replica(url, prefix, job, args, barrier))})


async def _replica(
    url: str, prefix: str, job: str, args: dict[str, Any], barrier: Any
) -> dict[str, Any]:
    store = RedisStateStore(
        url,
        clock=SystemClock(),
        key_prefix=prefix,
        socket_timeout=5.0,
        connect_timeout=5.0,
        max_connections=120,
    )
    ledger = RedisBudgetLedger(store, SystemClock())
    k = LedgerKey(args["budget"], "2026-11", args["limit"], TTL)
    try:
        await store.ping()
        await ledger.status([k])  # scripts loaded, a connection open: the race is the reserves
        await asyncio.to_thread(barrier.wait, 60)
        if job == "burst":
            entries = [(k, args["amount"])]
            if "person_limit" in args:  # and a budget of this process's own "person"
                own = LedgerKey(
                    f"{args['budget']}-{args['me']}", "2026-11", args["person_limit"], TTL
                )
                entries.append((own, args["amount"]))
            results = await asyncio.gather(
                *(ledger.reserve(entries, f"{args['me']}-{i}", 120) for i in range(args["count"]))
            )
            return {
                "granted": [f"{args['me']}-{i}" for i, r in enumerate(results) if r.granted],
                "refusals": [
                    (r.refused_by.budget if r.refused_by else None, r.spent, r.reserved)
                    for r in results
                    if not r.granted
                ],
            }
        # job == "loops": fetch-and-report loops, each reserving an estimate, "calling the
        # provider", settling the actual; optionally some calls are never reported (their
        # hold expires) and some are reported after their hold expired.
        rng = random.Random(args["seed"])
        hold = args.get("hold", 120)
        actuals: list[int] = []
        late: list[int] = []
        silent: list[str] = []
        refusals: list[tuple[int, int]] = []

        async def loop(n: int) -> None:
            for i in range(args["rounds"]):
                rid = f"{args['me']}-{n}-{i}"
                result = await ledger.reserve([(k, args["estimate"])], rid, hold)
                if not result.granted:
                    refusals.append((result.spent, result.reserved))
                    continue
                roll = rng.random()
                if roll < args.get("silent", 0.0):
                    silent.append(rid)  # the gateway never reports this call
                    continue
                is_late = roll < args.get("silent", 0.0) + args.get("late", 0.0)
                await asyncio.sleep(hold * 1.5 if is_late else rng.uniform(0, 0.005))
                actual = rng.randint(args["estimate"] // 2, args["estimate"] + args["excess"])
                await ledger.settle(rid, [(k, actual)])
                (late if is_late else actuals).append(actual)

        await asyncio.gather(*(loop(n) for n in range(args["loops"])))
        return {"actuals": actuals, "late": late, "silent": silent, "refusals": refusals}
    finally:
        await store.close()


def _run_two_replicas(
    redis_server: RedisServer, prefix: str, job: str, args: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    out = ctx.Queue()
    processes = [
        ctx.Process(target=_process_main, args=(redis_server.url, prefix, job, a, barrier, out))
        for a in args
    ]
    for p in processes:
        p.start()
    try:
        # In the order of `args` (the queue answers in the order the processes finish).
        results = sorted((out.get(timeout=120) for _ in processes), key=lambda r: r["me"])
        for p in processes:
            p.join(timeout=30)
            assert p.exitcode == 0
        return results
    finally:
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join()


async def test_concurrent_reserves_from_two_processes_fill_the_limit_exactly(
    redis_server: RedisServer, make_store: Callable[..., RedisStateStore], prefix: str
) -> None:
    limit, amount = 10_000, 70  # 142 fit, 200 try
    common = {"budget": "cc-burst", "limit": limit, "amount": amount, "count": 100}
    results = await asyncio.to_thread(
        _run_two_replicas,
        redis_server,
        prefix,
        "burst",
        [{**common, "me": "a"}, {**common, "me": "b"}],
    )
    granted = [rid for r in results for rid in r["granted"]]
    refusals = [tuple(x) for r in results for x in r["refusals"]]
    assert len(granted) == limit // amount  # never more, and no refusal while room remained
    assert all(results_by_proc["granted"] for results_by_proc in results)  # both raced
    assert len(refusals) == 200 - limit // amount
    assert all(spent + reserved + amount > limit for _, spent, reserved in refusals)

    ledger = RedisBudgetLedger(make_store(), SystemClock())
    k = LedgerKey("cc-burst", "2026-11", limit, TTL)
    assert await ledger.status([k]) == {k: (0, len(granted) * amount)}
    # Settle every reservation, some above their estimate: spend exceeds the limit only by the
    # sum of the excesses (the documented bound).
    rng = random.Random(7)
    actuals = {rid: rng.randint(0, amount + 10) for rid in granted}
    await asyncio.gather(*(ledger.settle(rid, [(k, a)]) for rid, a in actuals.items()))
    spent, reserved = (await ledger.status([k]))[k]
    assert (spent, reserved) == (sum(actuals.values()), 0)
    assert spent <= limit + sum(max(0, a - amount) for a in actuals.values())


async def test_concurrent_reserves_over_several_budgets_are_all_or_nothing(
    redis_server: RedisServer, make_store: Callable[..., RedisStateStore], prefix: str
) -> None:
    # Each reserve holds on the shared cost-centre budget (room for 142) and on its process's
    # own person budget (room for 85 each): 142 granted in all, at most 85 per process, and a
    # hold refused by one budget leaves nothing on the other.
    limit, person_limit, amount = 10_000, 6_000, 70
    common = {
        "budget": "cc-multi",
        "limit": limit,
        "person_limit": person_limit,
        "amount": amount,
        "count": 100,
    }
    results = await asyncio.to_thread(
        _run_two_replicas,
        redis_server,
        prefix,
        "burst",
        [{**common, "me": "a"}, {**common, "me": "b"}],
    )
    counts = [len(r["granted"]) for r in results]
    assert sum(counts) == limit // amount
    assert all(c <= person_limit // amount for c in counts)
    for me, r in zip("ab", results, strict=True):
        for budget, spent, reserved in r["refusals"]:
            assert budget in ("cc-multi", f"cc-multi-{me}")
            room = limit if budget == "cc-multi" else person_limit
            assert spent + reserved + amount > room  # no false refusal
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    centre = LedgerKey("cc-multi", "2026-11", limit, TTL)
    people = [LedgerKey(f"cc-multi-{me}", "2026-11", person_limit, TTL) for me in "ab"]
    assert await ledger.status([centre, *people]) == {
        centre: (0, sum(counts) * amount),
        people[0]: (0, counts[0] * amount),
        people[1]: (0, counts[1] * amount),
    }


@pytest.mark.parametrize("excess", [0, 15])
async def test_fetch_and_report_loops_from_two_processes_respect_the_bound(
    redis_server: RedisServer,
    make_store: Callable[..., RedisStateStore],
    prefix: str,
    excess: int,
) -> None:
    limit, estimate = 20_000, 100
    common = {
        "budget": f"cc-loops-{excess}",
        "limit": limit,
        "estimate": estimate,
        "excess": excess,
        "loops": 20,
        "rounds": 15,  # 600 attempts of up to 100 against room for ~200-270
    }
    results = await asyncio.to_thread(
        _run_two_replicas,
        redis_server,
        prefix,
        "loops",
        [{**common, "me": "a", "seed": 1}, {**common, "me": "b", "seed": 2}],
    )
    actuals = [a for r in results for a in r["actuals"]]
    refusals = [tuple(x) for r in results for x in r["refusals"]]
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    k = LedgerKey(common["budget"], "2026-11", limit, TTL)
    spent, reserved = (await ledger.status([k]))[k]
    assert (spent, reserved) == (sum(actuals), 0)  # every settle counted once, no hold left
    assert refusals  # the budget was reached
    assert all(s + r + estimate > limit for s, r in refusals)  # no false refusal
    if excess == 0:
        assert spent <= limit
        assert spent > limit - estimate - 20 * 2 * estimate  # filled, bar the last in flight
    else:
        assert spent <= limit + sum(max(0, a - estimate) for a in actuals)


async def test_unreported_and_late_calls_from_two_processes(
    redis_server: RedisServer, make_store: Callable[..., RedisStateStore], prefix: str
) -> None:
    # Some calls are never reported (their holds expire and give the room back), some are
    # reported after their hold expired (their actual is spent beyond what was held): spend
    # passes the limit by at most those late actuals, and every hold ends.
    limit, estimate, hold = 5_000, 100, 0.3
    common = {
        "budget": "cc-unreported",
        "limit": limit,
        "estimate": estimate,
        "excess": 0,
        "loops": 10,
        "rounds": 12,
        "hold": hold,
        "silent": 0.2,
        "late": 0.1,
    }
    results = await asyncio.to_thread(
        _run_two_replicas,
        redis_server,
        prefix,
        "loops",
        [{**common, "me": "a", "seed": 3}, {**common, "me": "b", "seed": 4}],
    )
    actuals = [a for r in results for a in r["actuals"]]
    late = [a for r in results for a in r["late"]]
    silent = [rid for r in results for rid in r["silent"]]
    refusals = [tuple(x) for r in results for x in r["refusals"]]
    assert silent and late and refusals  # the scenario happened
    assert all(s + r + estimate > limit for s, r in refusals)  # no false refusal
    granted = len(actuals) + len(late) + len(silent)
    assert granted * estimate > limit  # room came back as holds were settled or expired
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    k = LedgerKey("cc-unreported", "2026-11", limit, TTL)
    await asyncio.sleep(hold + 0.2)
    spent, reserved = (await ledger.status([k]))[k]
    assert reserved == 0  # every unreported hold released by its expiry
    assert spent == sum(actuals) + sum(late)
    assert spent <= limit + sum(late)


# -- outages -------------------------------------------------------------------------------


def _operations(ledger: RedisBudgetLedger, tag: str) -> list[tuple[str, Callable[[], Any]]]:
    k = LedgerKey(f"budget-{tag}", "2026-11", 100, TTL)
    return [
        ("reserve", lambda: ledger.reserve([(k, 10)], f"r-{tag}", 60)),
        ("settle", lambda: ledger.settle(f"r-{tag}", [(k, 5)])),
        ("record", lambda: ledger.record([(k, 1)], f"c-{tag}")),
        ("release", lambda: ledger.release(f"r-{tag}", [k])),
        ("status", lambda: ledger.status([k])),
    ]


async def _assert_all_unavailable(ledger: RedisBudgetLedger, tag: str) -> None:
    for name, operation in _operations(ledger, tag):
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await operation()
        elapsed = time.monotonic() - started
        assert elapsed < OUTAGE_BOUND_SECONDS, f"{name} took {elapsed:.2f}s"
        assert tag not in str(caught.value)  # no key material in messages


async def _assert_all_work(ledger: RedisBudgetLedger, tag: str) -> None:
    for _name, operation in _operations(ledger, tag):
        await operation()
    k = LedgerKey(f"budget-{tag}", "2026-11", 100, TTL)
    assert await ledger.status([k]) == {k: (6, 0)}


async def test_redis_stopped_then_restarted(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    ledger = RedisBudgetLedger(make_store(), SystemClock())
    await _assert_all_work(ledger, "before")
    redis_server.stop()
    try:
        await _assert_all_unavailable(ledger, "down1")
        await _assert_all_unavailable(ledger, "down2")
    finally:
        redis_server.start()
    # Same instance; the restarted server lost its scripts (no persistence): reloaded.
    await _assert_all_work(ledger, "after")


async def test_hung_redis_times_out_then_recovers(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    ledger = RedisBudgetLedger(make_store(socket_timeout=0.3, connect_timeout=0.3), SystemClock())
    await _assert_all_work(ledger, "pre")
    redis_server.freeze()
    try:
        await _assert_all_unavailable(ledger, "hung")
    finally:
        redis_server.thaw()
    await _assert_all_work(ledger, "post")

"""`RedisStateStore` against a real ``redis-server`` started per module on a free loopback port.

Runs the shared `StateStoreContract`, then what only a shared store has: two replicas seeing each
other's state, a single round trip for revocation checks, outages (server stopped, server hung)
that surface as `StateUnavailable` within the timeouts and heal without rebuilding the store,
and a password read from a reference.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.clock import SystemClock
from broker.settings import StateConfig
from broker.state import StateStore, StateUnavailable
from broker.state_factory import build_state_store
from broker.state_redis import RedisStateStore
from tests.support.servers import RedisServer, run_redis
from tests.unit.test_state_contract import StateKit, StateStoreContract

pytestmark = pytest.mark.anyio

OUTAGE_BOUND_SECONDS = 2.0


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisStateStore]]:
    """Factory of stores on the module's server; all share one fresh key prefix per test."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    stores: list[RedisStateStore] = []

    def make(**options: Any) -> RedisStateStore:
        options.setdefault("key_prefix", prefix)
        store = RedisStateStore(redis_server.url, clock=SystemClock(), **options)
        stores.append(store)
        return store

    yield make
    for store in stores:
        await store.close()


class TestRedisStateStoreContract(StateStoreContract):
    @pytest.fixture
    def kit(self, make_store: Callable[..., RedisStateStore]) -> StateKit:
        # The contract is about answers, not latency: generous timeouts, so a burst of new
        # connections on a busy machine is not a failure (test_hung_server_times_out_then_recovers
        # holds the deadline).
        store = make_store(socket_timeout=3.0, connect_timeout=3.0)
        return StateKit(store, SystemClock(), asyncio.sleep)


# -- replicas ------------------------------------------------------------------------------


async def test_two_replicas_share_used_ids_revocations_and_rate_counts(
    make_store: Callable[..., RedisStateStore],
) -> None:
    a, b = make_store(), make_store()
    now = time.time()

    assert await a.use_once("assertion:c:jti-1", 60)
    assert not await b.use_once("assertion:c:jti-1", 60)

    await a.revoke_tokens({"tok-a": now + 60})
    await b.revoke_before("person:dev/alice", now, 60)
    for replica in (a, b):
        status = await replica.revocation_status(["tok-a", "tok-b"], ["person:dev/alice"])
        assert status.revoked_ids == {"tok-a"}
        assert dict(status.not_before) == {"person:dev/alice": now}

    assert (await a.rate_limit("exchange:agent", 3, 60)).allowed
    assert (await b.rate_limit("exchange:agent", 3, 60)).allowed
    last = await a.rate_limit("exchange:agent", 3, 60)
    assert (last.allowed, last.remaining) == (True, 0)
    refused = await b.rate_limit("exchange:agent", 3, 60)
    assert not refused.allowed
    assert 59.0 < refused.retry_after <= 60.0


async def test_concurrent_use_once_across_replicas(
    make_store: Callable[..., RedisStateStore],
) -> None:
    # A burst of 60 new connections: generous timeouts, so a busy machine tests the race, not
    # the connect latency (test_hung_server_times_out_then_recovers holds the deadline).
    replicas = [make_store(socket_timeout=3.0, connect_timeout=3.0) for _ in range(3)]
    results = await asyncio.gather(
        *(replicas[i % 3].use_once("assertion:c:race", 60) for i in range(60))
    )
    assert results.count(True) == 1


async def test_concurrent_rate_limit_across_replicas_never_exceeds_limit(
    make_store: Callable[..., RedisStateStore],
) -> None:
    a, b = (make_store(socket_timeout=3.0, connect_timeout=3.0) for _ in range(2))
    results = await asyncio.gather(
        *((a if i % 2 else b).rate_limit("exchange:burst", 10, 60) for i in range(40))
    )
    assert sum(r.allowed for r in results) == 10


async def test_revocation_status_is_one_command(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    store = make_store()
    await store.revoke_tokens({"t1": time.time() + 60})
    await store.revoke_before("agent:x", 5.0, 60)
    admin = redis_server.client()
    admin.config_resetstat()
    status = await store.revocation_status(["t1", "t2", "t3"], ["agent:x", "agent:y"])
    assert status.revoked_ids == {"t1"}
    stats = admin.info("commandstats")
    admin.close()
    data_commands = {k: v["calls"] for k, v in stats.items() if not k.startswith("cmdstat_config")}
    assert data_commands == {"cmdstat_mget": 1}


async def test_keys_are_prefixed_and_expire(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    prefix = f"iso-{uuid.uuid4().hex[:8]}:"
    store = make_store(key_prefix=prefix)
    now = time.time()
    await store.use_once("assertion:c:j", 30)
    await store.revoke_tokens({"tok": now + 30})
    await store.revoke_before("agent:x", now, 30)
    await store.rate_limit("exchange:x", 5, 30)
    admin = redis_server.client()
    keys = sorted(k.decode() for k in admin.scan_iter(match=f"{prefix}*"))
    assert keys == [
        f"{prefix}nbf:agent:x",
        f"{prefix}once:assertion:c:j",
        f"{prefix}rate:exchange:x",
        f"{prefix}revocation-epoch",
        f"{prefix}revoked:tok",
    ]
    assert all(0 < admin.pttl(k) <= 30_000 for k in keys)
    admin.close()


# -- outages -------------------------------------------------------------------------------


def _every_operation(store: StateStore, tag: str) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    now = time.time()
    return [
        ("use_once", lambda: store.use_once(f"assertion:c:{tag}", 60)),
        ("revoke_tokens", lambda: store.revoke_tokens({f"tok-{tag}": now + 60})),
        ("revoke_before", lambda: store.revoke_before(f"agent:{tag}", now, 60)),
        ("revocation_status", lambda: store.revocation_status([f"tok-{tag}"], [f"agent:{tag}"])),
        ("rate_limit", lambda: store.rate_limit(f"exchange:{tag}", 5, 60)),
        ("ping", lambda: store.ping()),
    ]


async def _assert_all_unavailable(store: StateStore, tag: str) -> None:
    for name, operation in _every_operation(store, tag):
        started = time.monotonic()
        with pytest.raises(StateUnavailable) as caught:
            await operation()
        elapsed = time.monotonic() - started
        assert elapsed < OUTAGE_BOUND_SECONDS, f"{name} took {elapsed:.2f}s"
        assert tag not in str(caught.value)  # no key material in messages


async def _assert_all_work(store: RedisStateStore, tag: str) -> None:
    for _name, operation in _every_operation(store, tag):
        await operation()
    status = await store.revocation_status([f"tok-{tag}"], [f"agent:{tag}"])
    assert status.revoked_ids == {f"tok-{tag}"}
    assert not await store.use_once(f"assertion:c:{tag}", 60)


async def test_server_stopped_then_restarted(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    store = make_store()
    await _assert_all_work(store, "before")  # the pool holds live connections now
    redis_server.stop()
    try:
        await _assert_all_unavailable(store, "down1")
        await _assert_all_unavailable(store, "down2")  # still failing fast, no broken state
    finally:
        redis_server.start()
    await _assert_all_work(store, "after")  # same instance, not rebuilt


async def test_hung_server_times_out_then_recovers(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    store = make_store(socket_timeout=0.3, connect_timeout=0.3)
    await _assert_all_work(store, "pre-hang")
    redis_server.freeze()
    try:
        await _assert_all_unavailable(store, "hung")
    finally:
        redis_server.thaw()
    await _assert_all_work(store, "post-hang")


async def test_unreachable_from_the_start_then_available(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    store = RedisStateStore(server.url, clock=SystemClock(), key_prefix="late:")
    try:
        await _assert_all_unavailable(store, "never-up")
        server.start()
        await _assert_all_work(store, "up")
    finally:
        await store.close()
        server.stop()


# -- configuration -------------------------------------------------------------------------


async def test_factory_reads_the_password_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with run_redis(tmp_path, "--requirepass", "s3cret-pw") as server:
        password_file = tmp_path / "redis-password"
        password_file.write_text("wrong\n")
        config = StateConfig(
            kind="redis", url=server.url, password_ref=f"file:{password_file}", key_prefix="auth:"
        )
        store = build_state_store(config, SystemClock())
        assert isinstance(store, RedisStateStore)
        try:
            with pytest.raises(StateUnavailable) as caught:
                await store.ping()
            assert "s3cret" not in str(caught.value) and "wrong" not in str(caught.value)
            password_file.write_text("s3cret-pw\n")  # rotated: read again on the next connection
            await store.ping()
            assert await store.use_once("assertion:c:j", 30)

            monkeypatch.setenv("REDIS_TEST_PW", "s3cret-pw")
            env_store = build_state_store(
                config.model_copy(update={"password_ref": "env:REDIS_TEST_PW"}), SystemClock()
            )
            assert isinstance(env_store, RedisStateStore)
            assert not await env_store.use_once("assertion:c:j", 30)
            await env_store.close()
        finally:
            await store.close()


async def test_a_malformed_or_non_finite_not_before_fails_closed(
    make_store: Callable[..., RedisStateStore], redis_server: RedisServer
) -> None:
    prefix = f"nan-{uuid.uuid4().hex[:8]}:"
    store = make_store(key_prefix=prefix)
    admin = redis_server.client()
    try:
        for stored in ("nan", "inf", "-inf", "soon"):
            admin.set(f"{prefix}nbf:person:dev/alice", stored, ex=60)
            with pytest.raises(StateUnavailable, match="malformed"):
                await store.revocation_status([], ["person:dev/alice"])
    finally:
        admin.close()

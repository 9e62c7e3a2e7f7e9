"""The `StateStore` contract, one suite for every implementation.

`StateStoreContract` holds the tests; a subclass supplies the `kit` fixture (a store, its clock
and a way to let time pass). Here: `InMemoryStateStore` on a `FrozenClock`. The Redis store runs
the same suite in tests/integration/test_state_redis.py, where time passes for real, so the
durations below are kept short (and the margins generous).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from pydantic import ValidationError

from broker.clock import Clock, FrozenClock
from broker.settings import BrokerSettings, StateConfig
from broker.state import InMemoryStateStore, RevocationStatus, StateStore
from broker.state_factory import build_state_store

pytestmark = pytest.mark.anyio


@dataclass
class StateKit:
    """A store under test, the clock it reads, and `advance(seconds)` to let time pass."""

    store: StateStore
    clock: Clock
    advance: Callable[[float], Awaitable[None]]


class StateStoreContract:
    """Behaviour every `StateStore` must have. Subclasses define the `kit` fixture."""

    @pytest.fixture
    def kit(self) -> Any:  # pragma: no cover - always overridden
        raise NotImplementedError

    # -- single use ------------------------------------------------------------------------

    async def test_use_once_is_true_once(self, kit: StateKit) -> None:
        assert await kit.store.use_once("assertion:c:j1", 30)
        assert not await kit.store.use_once("assertion:c:j1", 30)
        assert not await kit.store.use_once("assertion:c:j1", 30)
        assert await kit.store.use_once("assertion:c:j2", 30)

    async def test_use_once_record_expires(self, kit: StateKit) -> None:
        assert await kit.store.use_once("assertion:c:short", 1.0)
        await kit.advance(0.4)
        assert not await kit.store.use_once("assertion:c:short", 1.0)
        await kit.advance(0.8)
        assert await kit.store.use_once("assertion:c:short", 1.0)

    async def test_concurrent_use_once_exactly_one_wins(self, kit: StateKit) -> None:
        results = await asyncio.gather(*(kit.store.use_once("race", 30) for _ in range(50)))
        assert results.count(True) == 1

    # -- revocation ------------------------------------------------------------------------

    async def test_unknown_ids_and_subjects_are_not_revoked(self, kit: StateKit) -> None:
        status = await kit.store.revocation_status(["token:nope"], ["person:dev/nobody"])
        assert status.revoked_ids == frozenset()
        assert dict(status.not_before) == {}
        assert await kit.store.revocation_status([], []) == RevocationStatus()

    async def test_revoked_tokens_are_reported_until_their_expiry(self, kit: StateKit) -> None:
        now = kit.clock.now()
        await kit.store.revoke_tokens({"t1": now + 0.5, "t2": now + 60, "old": now - 1})
        status = await kit.store.revocation_status(["t1", "t2", "t3", "old"], [])
        assert status.revoked_ids == {"t1", "t2"}
        assert status.revokes(["t1"], [], issued_at=now)
        assert not status.revokes(["t3"], [], issued_at=now)
        await kit.advance(0.8)
        assert (await kit.store.revocation_status(["t1", "t2"], [])).revoked_ids == {"t2"}

    async def test_revoking_again_never_shortens_a_revocation(self, kit: StateKit) -> None:
        now = kit.clock.now()
        await kit.store.revoke_tokens({"t": now + 0.9})
        await kit.store.revoke_tokens({"t": now + 0.2})
        await kit.advance(0.5)
        assert (await kit.store.revocation_status(["t"], [])).revoked_ids == {"t"}
        await kit.advance(0.7)
        assert (await kit.store.revocation_status(["t"], [])).revoked_ids == frozenset()

    async def test_the_revocation_epoch_moves_with_every_revocation_and_only_then(
        self, kit: StateKit
    ) -> None:
        seen = [await kit.store.revocation_epoch()]
        assert await kit.store.revocation_epoch() == seen[0]
        now = kit.clock.now()
        await kit.store.revoke_tokens({"t": now + 60})
        seen.append(await kit.store.revocation_epoch())
        await kit.store.revoke_before("person:dev/alice", now, 60)
        seen.append(await kit.store.revocation_epoch())
        await kit.store.revoke_tokens({"t": now + 60})  # again: still a revocation written
        seen.append(await kit.store.revocation_epoch())
        assert len(set(seen)) == 4
        await kit.store.use_once("x", 30)
        await kit.store.rate_limit("r", 5, 30)
        await kit.store.revocation_status(["t"], ["person:dev/alice"])
        assert await kit.store.revocation_epoch() == seen[-1]

    async def test_revoke_before_keeps_the_latest_time(self, kit: StateKit) -> None:
        subject = "person:dev/alice"
        await kit.store.revoke_before(subject, 1_700_000_100.25, 60)
        await kit.store.revoke_before(subject, 1_700_000_050.0, 60)  # earlier: ignored
        status = await kit.store.revocation_status([], [subject, "agent:other"])
        assert dict(status.not_before) == {subject: 1_700_000_100.25}
        assert status.revokes([], [subject], issued_at=1_700_000_100.0)
        assert not status.revokes([], [subject], issued_at=1_700_000_100.5)
        await kit.store.revoke_before(subject, 1_700_000_200.5, 60)  # later: raises it
        status = await kit.store.revocation_status([], [subject])
        assert status.not_before[subject] == 1_700_000_200.5

    async def test_revoke_before_lives_at_least_its_ttl(self, kit: StateKit) -> None:
        await kit.store.revoke_before("agent:a", 100.0, 0.9)
        await kit.store.revoke_before("agent:a", 50.0, 0.2)  # neither lowers time nor expiry
        await kit.advance(0.5)
        assert (await kit.store.revocation_status([], ["agent:a"])).not_before == {"agent:a": 100.0}
        await kit.advance(0.7)
        assert dict((await kit.store.revocation_status([], ["agent:a"])).not_before) == {}

    async def test_status_combines_tokens_and_subjects(self, kit: StateKit) -> None:
        now = kit.clock.now()
        await kit.store.revoke_tokens({"tok": now + 60})
        await kit.store.revoke_before("agent:b", now, 60)
        status = await kit.store.revocation_status(["tok", "tok", "other"], ["agent:b", "x"])
        assert status.revoked_ids == {"tok"}
        assert dict(status.not_before) == {"agent:b": now}

    async def test_non_finite_times_are_refused_and_change_nothing(self, kit: StateKit) -> None:
        subject = "person:dev/nan"
        await kit.store.revoke_before(subject, 1_700_000_100.0, 60)
        for bad in (math.nan, math.inf, -math.inf):
            with pytest.raises(ValueError):
                await kit.store.revoke_before(subject, bad, 60)
            with pytest.raises(ValueError):
                await kit.store.revoke_before(subject, 1_700_000_200.0, bad)
            with pytest.raises(ValueError):
                await kit.store.revoke_tokens({"nan-token": bad})
        status = await kit.store.revocation_status(["nan-token"], [subject])
        assert dict(status.not_before) == {subject: 1_700_000_100.0}
        assert status.revoked_ids == frozenset()

    # -- rate limits -----------------------------------------------------------------------

    async def test_rate_limit_allows_limit_then_refuses(self, kit: StateKit) -> None:
        results = [await kit.store.rate_limit("exchange:a", 3, 0.5) for _ in range(4)]
        assert [r.allowed for r in results] == [True, True, True, False]
        assert [r.remaining for r in results] == [2, 1, 0, 0]
        assert all(r.retry_after == 0.0 for r in results[:3])
        assert 0.0 < results[3].retry_after <= 0.5
        await kit.advance(results[3].retry_after + 0.05)
        assert (await kit.store.rate_limit("exchange:a", 3, 0.5)).allowed

    async def test_rate_limit_window_slides(self, kit: StateKit) -> None:
        assert (await kit.store.rate_limit("exchange:s", 3, 0.6)).allowed
        await kit.advance(0.35)
        assert (await kit.store.rate_limit("exchange:s", 3, 0.6)).allowed
        assert (await kit.store.rate_limit("exchange:s", 3, 0.6)).allowed
        refused = await kit.store.rate_limit("exchange:s", 3, 0.6)
        assert not refused.allowed
        # Only the first event has to leave the window, not all three.
        assert 0.0 < refused.retry_after <= 0.25 + 1e-6
        await kit.advance(refused.retry_after + 0.05)
        assert (await kit.store.rate_limit("exchange:s", 3, 0.6)).allowed
        assert not (await kit.store.rate_limit("exchange:s", 3, 0.6)).allowed

    async def test_rate_limit_keys_are_independent(self, kit: StateKit) -> None:
        assert (await kit.store.rate_limit("k1", 1, 60)).allowed
        assert not (await kit.store.rate_limit("k1", 1, 60)).allowed
        assert (await kit.store.rate_limit("k2", 1, 60)).allowed

    async def test_rate_limit_status_reports_without_counting(self, kit: StateKit) -> None:
        for _ in range(5):
            status = await kit.store.rate_limit_status("authfail:peek", 2, 0.5)
            assert status.allowed and status.remaining == 2
        assert (await kit.store.rate_limit("authfail:peek", 2, 0.5)).allowed
        assert (await kit.store.rate_limit_status("authfail:peek", 2, 0.5)).remaining == 1
        assert (await kit.store.rate_limit("authfail:peek", 2, 0.5)).allowed
        refused = await kit.store.rate_limit_status("authfail:peek", 2, 0.5)
        assert not refused.allowed and 0.0 < refused.retry_after <= 0.5
        await kit.advance(refused.retry_after + 0.05)
        assert (await kit.store.rate_limit_status("authfail:peek", 2, 0.5)).allowed

    async def test_ping(self, kit: StateKit) -> None:
        await kit.store.ping()


class TestInMemoryStateStore(StateStoreContract):
    @pytest.fixture
    def kit(self) -> Iterator[StateKit]:
        clock = FrozenClock()

        async def advance(seconds: float) -> None:
            clock.advance(seconds)

        yield StateKit(InMemoryStateStore(clock), clock, advance)


async def test_memory_rate_limit_forgets_keys_whose_window_has_passed() -> None:
    """Rate-limit keys can be caller-chosen (failed authentications per claimed client id): the
    in-memory store must not keep one entry per key ever seen."""
    clock = FrozenClock()
    store = InMemoryStateStore(clock)
    for i in range(5000):
        await store.rate_limit(f"authfail:client:{i}", 10, 60)
        if i % 1000 == 999:
            clock.advance(61)
    assert len(store._hits) < 2100  # only the keys still inside their window (plus slack)


# -- configuration -------------------------------------------------------------------------


def test_state_defaults_to_memory() -> None:
    settings = BrokerSettings()
    assert settings.state.kind == "memory"
    assert isinstance(build_state_store(settings.state, FrozenClock()), InMemoryStateStore)


def test_redis_state_config_accepts_loopback_and_tls_urls() -> None:
    assert StateConfig(kind="redis", url="redis://127.0.0.1:6379/0").url
    config = StateConfig(
        kind="redis", url="rediss://broker@redis.internal:6380/2", password_ref="env:REDIS_PW"
    )
    assert config.password_ref == "env:REDIS_PW"


@pytest.mark.parametrize(
    "values",
    [
        {"kind": "redis"},  # no url
        {"kind": "redis", "url": "http://127.0.0.1:6379"},  # not redis
        {"kind": "redis", "url": "redis://redis.internal:6379"},  # plain text off loopback
        {"kind": "redis", "url": "rediss://:pw@redis.internal:6380"},  # inline password
        {"kind": "redis", "url": "rediss://redis.internal?password=pw"},  # options
        {"kind": "redis", "url": "rediss://redis.internal:99999"},  # bad port
        {"kind": "redis", "url": "rediss://redis.internal", "password_ref": "pw"},  # not a ref
        {"kind": "memory", "url": "redis://127.0.0.1"},  # url without redis
        {"kind": "redis", "url": "redis://127.0.0.1", "key_prefix": "has space"},
    ],
)
def test_invalid_state_config_is_refused(values: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        StateConfig(**values)


def test_state_config_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BROKER_STATE__KIND", "redis")
    monkeypatch.setenv("BROKER_STATE__URL", "redis://127.0.0.1:6379/3")
    monkeypatch.setenv("BROKER_STATE__SOCKET_TIMEOUT_SECONDS", "0.25")
    state = BrokerSettings().state
    assert (state.kind, state.url, state.socket_timeout_seconds) == (
        "redis",
        "redis://127.0.0.1:6379/3",
        0.25,
    )

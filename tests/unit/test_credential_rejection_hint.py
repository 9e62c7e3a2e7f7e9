"""Rejected-version hints (`CredentialCache.refresh_rejected`): a gateway reports that the
provider refused the version it was served. Only a hint naming the version the cache holds may
reach the backend, concurrent hints share one round, and at most one hint round per credential
starts per `rejection_refresh_interval` (1 s by default). Backend calls are counted on the
in-memory `FakeBackend` of the cache tests."""

from __future__ import annotations

import asyncio
import threading

import pytest

from broker.cache import CredentialCache
from broker.clock import FrozenClock
from secret_backends.base import BackendUnavailable
from tests.unit.test_credential_cache import (
    OTHER,
    POLICY,
    REF,
    STEP,
    Harness,
    past_refresh,
    wait_for,
)

pytestmark = pytest.mark.anyio


def calls(h: Harness) -> tuple[int, int]:
    """(version checks, reads) the backend has answered so far."""
    return h.backend.version_checks, h.backend.reads


async def test_hint_naming_the_held_version_refreshes_from_the_backend() -> None:
    h = Harness()
    first = await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)  # the store has "2"; the cache still serves "1" for 60 s
    assert (await h.cache.get(REF, POLICY)).version_id == "1"
    result = await h.cache.refresh_rejected(REF, POLICY, "1")
    assert result.outcome == "refreshed"
    assert result.cached.version_id == "2"
    assert result.cached.previous is first.secret
    assert calls(h) == (1, 2)  # one version check, one read of the new version
    assert await h.cache.get(REF, POLICY) is result.cached  # served to everyone from now on
    assert h.kinds() == ["credential.rotated"]
    stats = h.cache.stats()[REF]
    assert (stats.rejection_hints, stats.hint_refreshes) == (1, 1)
    await h.cache.close()


async def test_hint_for_an_unchanged_store_checks_the_version_only() -> None:
    h = Harness()
    first = await h.cache.get(REF, POLICY)
    result = await h.cache.refresh_rejected(REF, POLICY, "1")
    assert result.outcome == "refreshed"
    assert result.cached.secret is first.secret
    assert calls(h) == (1, 1)  # a metadata check, no data read
    await h.cache.close()


@pytest.mark.parametrize("rejected", ["0", "2", "99", "not-a-version", ""])
async def test_hint_naming_another_version_never_reaches_the_backend(rejected: str) -> None:
    h = Harness()
    await h.cache.get(REF, POLICY)
    before = calls(h)
    result = await h.cache.refresh_rejected(REF, POLICY, rejected)
    assert result.outcome == "not_current"
    assert result.cached.version_id == "1"
    assert calls(h) == before
    assert h.cache.stats()[REF].rejection_hints == 0
    await h.cache.close()


async def test_hint_after_the_cache_moved_on_is_answered_from_memory() -> None:
    h = Harness()
    await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).cached.version_id == "2"
    before = calls(h)
    # Late hints from calls that were served "1" before the switch: no backend call.
    for _ in range(50):
        late = await h.cache.refresh_rejected(REF, POLICY, "1")
        assert (late.outcome, late.cached.version_id) == ("not_current", "2")
    assert calls(h) == before
    await h.cache.close()


async def test_hint_on_a_cold_credential_is_a_plain_load() -> None:
    h = Harness()
    result = await h.cache.refresh_rejected(OTHER, POLICY, "1")
    assert (result.outcome, result.cached.version_id) == ("not_current", "1")
    assert calls(h) == (0, 1)
    await h.cache.close()


async def test_concurrent_hints_share_one_backend_round() -> None:
    h = Harness(threads=True)
    await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    gate = h.backend.gates[REF.path] = threading.Event()
    hints = [asyncio.create_task(h.cache.refresh_rejected(REF, POLICY, "1")) for _ in range(200)]
    await wait_for(lambda: h.backend.calls_started == 2)  # the first load, then the hint's check
    await asyncio.sleep(0.01)  # every other hint is parked on that round by now
    assert not any(task.done() for task in hints)
    gate.set()
    results = await asyncio.gather(*hints)
    assert {r.cached.version_id for r in results} == {"2"}
    outcomes = [r.outcome for r in results]
    assert outcomes.count("refreshed") == 1 and outcomes.count("joined") == 199
    assert calls(h) == (1, 2)
    stats = h.cache.stats()[REF]
    assert (stats.rejection_hints, stats.hint_refreshes) == (200, 1)
    await h.cache.close()


async def test_rate_limit_holds_one_hint_round_per_credential_per_interval() -> None:
    """A gateway that keeps hinting the version held (its provider keeps refusing the key, or
    it lies) makes the cache ask the backend at most once per second."""
    h = Harness()
    await h.cache.get(REF, POLICY)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).outcome == "refreshed"
    assert calls(h) == (1, 1)
    for _ in range(10):  # ten seconds of hints, a thousand a second
        for _ in range(1000):
            result = await h.cache.refresh_rejected(REF, POLICY, "1")
            assert result.outcome == "rate_limited"
            assert result.cached.version_id == "1"
        h.clock.advance(0.25)
        for _ in range(3):
            await h.cache.get(REF, POLICY)  # the brought-forward check fires at most once
            await h.cache.wait_idle()
            h.clock.advance(0.25)
        h.clock.advance(STEP)
        assert (await h.cache.refresh_rejected(REF, POLICY, "1")).outcome == "refreshed"
    checks, reads = calls(h)
    assert reads == 1  # the version never changed: metadata checks only
    assert checks <= 1 + 10 * 2  # per second: one hint round and at most one scheduled follow-up
    stats = h.cache.stats()[REF]
    assert stats.hint_refreshes == 11 and stats.rejection_hints == 11 + 10 * 1000
    await h.cache.close()


async def test_rate_limited_hint_brings_the_next_check_forward() -> None:
    """A rotation that lands just after a hint round is picked up when the interval ends, not
    after the 60 s refresh interval."""
    h = Harness()
    await h.cache.get(REF, POLICY)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).cached.version_id == "1"
    h.backend.rotate(REF.path)
    limited = await h.cache.refresh_rejected(REF, POLICY, "1")
    assert (limited.outcome, limited.cached.version_id) == ("rate_limited", "1")
    h.clock.advance(1.0 + STEP)
    assert (await h.cache.get(REF, POLICY)).version_id == "1"  # starts the background check
    await h.cache.wait_idle()
    assert (await h.cache.get(REF, POLICY)).version_id == "2"
    await h.cache.close()


async def test_hint_joins_a_round_that_began_before_the_rotation_then_refreshes_once() -> None:
    h = Harness(threads=True)
    first = await h.cache.get(REF, POLICY)
    gate = h.backend.gates[REF.path] = threading.Event()
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first  # scheduled refresh starts, then blocks
    await wait_for(lambda: h.backend.version_checks == 1)  # it has answered "1" already
    h.backend.rotate(REF.path)
    hints = [asyncio.create_task(h.cache.refresh_rejected(REF, POLICY, "1")) for _ in range(20)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*hints)
    assert {r.cached.version_id for r in results} == {"2"}
    assert [r.outcome for r in results].count("refreshed") == 1
    assert calls(h) == (2, 2)  # the scheduled round plus ONE hint round
    await h.cache.close()


async def test_hints_respect_a_failing_backends_backoff() -> None:
    h = Harness()
    first = await h.cache.get(REF, POLICY)
    h.backend.failure = BackendUnavailable("sealed")
    h.clock.advance(past_refresh(first))
    await h.cache.get(REF, POLICY)
    await h.cache.wait_idle()  # failed once; retry in about 1 s (backoff_base)
    before = calls(h)
    h.clock.advance(0.5)
    for _ in range(100):
        result = await h.cache.refresh_rejected(REF, POLICY, "1")
        assert result.outcome == "backing_off"
        assert result.cached.stale and result.cached.version_id == "1"
    assert calls(h) == before
    await h.cache.close()


async def test_hint_interval_is_configurable_and_validated() -> None:
    clock = FrozenClock()
    with pytest.raises(ValueError, match="rejection_refresh_interval"):
        CredentialCache({}, clock, rejection_refresh_interval=0)
    h = Harness()
    h.cache = CredentialCache(
        {"fake": h.backend}, h.clock, rejection_refresh_interval=5.0, executor=None
    )
    await h.cache.get(REF, POLICY)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).outcome == "refreshed"
    h.clock.advance(4.0)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).outcome == "rate_limited"
    h.clock.advance(1.0 + STEP)
    assert (await h.cache.refresh_rejected(REF, POLICY, "1")).outcome == "refreshed"
    await h.cache.close()

"""The credential cache (broker/cache.py): pure logic against an in-memory backend.

Most tests run backend calls inline (`InlineExecutor`) on a `FrozenClock`, so every schedule is
deterministic; `cache.wait_idle()` lets background refreshes finish. The single-flight and
in-flight-push tests use real worker threads with gates.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.cache import (
    CachedSecret,
    CacheEvent,
    CachePolicy,
    CredentialCache,
    CredentialUnavailable,
    VersionUnavailable,
    describe_ref,
)
from broker.clock import FrozenClock
from broker.errors import BrokerError
from broker.types import Sensitive
from secret_backends.base import (
    BackendThrottled,
    BackendUnavailable,
    Secret,
    SecretAccessDenied,
    SecretBackend,
    SecretBackendError,
    SecretNotFound,
    SecretRef,
)

pytestmark = pytest.mark.anyio

CANARY = "CANARY-do-not-leak-7f3a9c"
REF = SecretRef("fake", "kv/app/db", "password")
OTHER = SecretRef("fake", "kv/app/other")
POLICY = CachePolicy(refresh_interval=60.0, jitter=0.1, max_stale=600.0, previous_grace=120.0)
STEP = 1e-3
"""A little time to step past a deadline."""


# ======================================================================================
# test doubles
# ======================================================================================


class InlineExecutor(Executor):
    """Runs each backend call at once, on the caller's thread (deterministic tests)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class FakeBackend:
    """An in-memory `SecretBackend`: versioned values per path, settable failures, gates.

    Versions are ``"1"``, ``"2"``, ... per path (`rotate` adds one, `set_current` flips back).
    With `lease` set it behaves like a dynamic-secret store: every read mints a new version
    (``"lease-N"``) expiring `lease` seconds later, and `current_version` says None.
    """

    name = "fake"

    def __init__(self, clock: FrozenClock, *, lease: float | None = None) -> None:
        self.clock = clock
        self.lease = lease
        self.failure: BaseException | None = None
        self.report_versions = True
        self.gates: dict[str, threading.Event] = {}
        """Calls for these paths block until the event is set."""
        self._lock = threading.Lock()
        self._history: dict[str, list[str]] = {}
        self._current: dict[str, int] = {}
        self._leases = 0
        self.reads = 0
        self.version_checks = 0
        self.calls_started = 0
        self.last_ok_version: dict[str, int] = {}
        """Per path: the version number of the latest successful read (ground truth)."""
        self.last_ok_mono: dict[str, float] = {}
        """Per path: when the latest successful call began (monotonic)."""

    # -- test controls ------------------------------------------------------------------

    def rotate(self, path: str, value: str | None = None) -> str:
        """Add a new current version; returns its id."""
        with self._lock:
            history = self._history.setdefault(path, [])
            history.append(value or f"{CANARY}-{path}-v{len(history) + 1}")
            self._current[path] = len(history)
            return str(len(history))

    def set_current(self, path: str, version_id: str) -> None:
        with self._lock:
            self._current[path] = int(version_id)

    def value_of(self, path: str, version_id: str) -> str:
        return self._history[path][int(version_id) - 1]

    # -- SecretBackend ------------------------------------------------------------------
    # The answer is fixed when a call starts; a gate only delays its delivery, and `failure`
    # (checked at delivery) replaces it.

    def read(self, ref: SecretRef) -> Secret:
        with self._lock:
            self.reads += 1
            self.calls_started += 1
            started = self.clock.monotonic()
            if self.lease is not None:
                self._leases += 1
                number = self._leases
                secret = Secret(
                    ref=ref,
                    version_id=f"lease-{number}",
                    fields={"value": Sensitive(f"{CANARY}-lease-{number}")},
                    expires_at=self.clock.now() + self.lease,
                    lease_id=f"lease/{number}",
                )
            else:
                number = self._number(ref)
                value = self._history[ref.path][number - 1]
                secret = Secret(
                    ref=ref,
                    version_id=str(number),
                    fields={"value": Sensitive(value), "password": Sensitive(value)},
                )
        self._deliver(ref)
        with self._lock:
            self.last_ok_version[ref.path] = number
            self.last_ok_mono[ref.path] = started
        return secret

    def current_version(self, ref: SecretRef) -> str | None:
        with self._lock:
            self.version_checks += 1
            self.calls_started += 1
            started = self.clock.monotonic()
            blind = self.lease is not None or not self.report_versions
            number = None if blind else self._number(ref)
        self._deliver(ref)
        with self._lock:
            self.last_ok_mono[ref.path] = started
        return None if number is None else str(number)

    def _number(self, ref: SecretRef) -> int:
        number = self._current.get(ref.path)
        if number is None:
            raise SecretNotFound(f"no secret at {ref.path}")
        return number

    def _deliver(self, ref: SecretRef) -> None:
        gate = self.gates.get(ref.path)
        if gate is not None:
            assert gate.wait(10), "test gate never opened"
        if self.failure is not None:
            raise self.failure

    def close(self) -> None:
        return None


class Harness:
    """A cache over one FakeBackend, recording events."""

    def __init__(
        self,
        *,
        lease: float | None = None,
        max_entries: int = 16,
        threads: bool = False,
        seed: int = 1234,
    ) -> None:
        self.clock = FrozenClock()
        self.backend = FakeBackend(self.clock, lease=lease)
        self.backend.rotate(REF.path)
        self.backend.rotate(OTHER.path)
        self.events: list[CacheEvent] = []
        self.cache = CredentialCache(
            {"fake": self.backend},
            self.clock,
            max_entries=max_entries,
            on_event=self.events.append,
            rng=random.Random(seed),
            executor=None if threads else InlineExecutor(),
            sleep=self.sleep,
        )

    async def sleep(self, seconds: float) -> None:
        """How the cache waits (a push held by the per-credential limit): time moves on."""
        self.clock.advance(seconds)
        await asyncio.sleep(0)

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]


@pytest.fixture
async def h() -> Any:
    harness = Harness()
    yield harness
    await harness.cache.close()


async def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Let the loop (and worker threads) run until `predicate` holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.001)


def past_refresh(cached: CachedSecret) -> float:
    """Seconds from its load to just past the scheduled refresh of `cached`."""
    return cached.next_refresh_in + STEP


# ======================================================================================
# hits, misses, single flight
# ======================================================================================


async def test_hit_returns_the_identical_object_without_backend_calls(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    assert first.secret.value.reveal() == h.backend.value_of(REF.path, "1")
    assert (h.backend.reads, h.backend.version_checks) == (1, 0)
    for _ in range(5):
        assert await h.cache.get(REF, POLICY) is first
    assert h.cache.peek(REF) is first
    assert first.refresh_in(h.clock.now()) == pytest.approx(first.next_refresh_in)
    h.clock.advance(first.next_refresh_in - STEP)
    assert await h.cache.get(REF, POLICY) is first
    assert first.refresh_in(h.clock.now()) == pytest.approx(STEP, abs=1e-6)
    assert first.refresh_due_at == first.loaded_at + first.next_refresh_in
    await h.cache.wait_idle()
    assert (h.backend.reads, h.backend.version_checks) == (1, 0)
    stats = h.cache.stats()[REF]
    assert (stats.hits, stats.misses, stats.backend_reads, stats.refreshes) == (6, 1, 1, 1)
    assert h.cache.peek(OTHER) is None


async def test_one_hundred_concurrent_cold_gets_share_one_read() -> None:
    h = Harness(threads=True)
    gate = h.backend.gates[REF.path] = threading.Event()
    tasks = [asyncio.create_task(h.cache.get(REF, POLICY)) for _ in range(100)]
    await wait_for(lambda: h.backend.calls_started == 1)
    await asyncio.sleep(0.01)  # every caller is parked on the shared load by now
    assert not any(task.done() for task in tasks)
    gate.set()
    results = await asyncio.gather(*tasks)
    assert all(result is results[0] for result in results)
    assert h.backend.reads == 1
    assert h.cache.stats()[REF].misses == 100
    await h.cache.close()


async def test_next_refresh_is_jittered_around_the_interval() -> None:
    intervals = []
    for seed in range(8):
        h = Harness(seed=seed)
        intervals.append((await h.cache.get(REF, POLICY)).next_refresh_in)
        await h.cache.close()
    assert all(54.0 <= interval <= 66.0 for interval in intervals)
    assert len(set(intervals)) == len(intervals)


# ======================================================================================
# refresh and rotation
# ======================================================================================


async def test_refresh_with_unchanged_version_only_checks_the_version(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first  # served at once, refresh in background
    await h.cache.wait_idle()
    assert (h.backend.reads, h.backend.version_checks) == (1, 1)
    second = await h.cache.get(REF, POLICY)
    assert second is not first
    assert second.secret is first.secret
    assert second.loaded_at == h.clock.now()
    assert not second.stale and second.previous is None
    assert h.events == []
    assert await h.cache.get(REF, POLICY) is second  # back on the hot path


async def test_rotation_is_served_whole_with_a_rotated_event(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    v2 = h.backend.rotate(REF.path)
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first  # never waits for the backend
    await h.cache.wait_idle()
    rotated = await h.cache.get(REF, POLICY)
    assert rotated.version_id == v2
    assert rotated.secret.value.reveal() == h.backend.value_of(REF.path, v2)
    assert rotated.previous is first.secret
    assert rotated.switched_at == h.clock.now()
    assert (h.backend.reads, h.backend.version_checks) == (2, 1)
    assert h.events == [
        CacheEvent("credential.rotated", REF, "1", v2, h.clock.now()),
    ]


async def test_flip_back_to_a_known_version_needs_no_read(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    second = await h.cache.refresh_now(REF, POLICY)
    assert second.version_id == "2" and h.backend.reads == 2
    h.backend.set_current(REF.path, "1")
    back = await h.cache.refresh_now(REF, POLICY)
    assert back.secret is first.secret
    assert back.previous is second.secret
    assert h.backend.reads == 2
    assert [(e.old_version, e.new_version) for e in h.events] == [("1", "2"), ("2", "1")]


async def test_store_that_cannot_tell_versions_is_read_each_refresh(h: Harness) -> None:
    h.backend.report_versions = False
    first = await h.cache.get(REF, POLICY)
    h.clock.advance(past_refresh(first))
    await h.cache.get(REF, POLICY)
    await h.cache.wait_idle()
    assert (h.backend.reads, h.backend.version_checks) == (2, 1)
    again = await h.cache.get(REF, POLICY)
    assert again.version_id == "1" and again.previous is None and h.events == []


async def test_refresh_now_returns_and_serves_the_new_version_at_once(h: Harness) -> None:
    await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    pushed = await h.cache.refresh_now(REF, POLICY)
    assert pushed.version_id == "2"
    assert await h.cache.get(REF, POLICY) is pushed
    assert h.kinds() == ["credential.rotated"]
    # On a cold ref it is a load.
    assert (await h.cache.refresh_now(OTHER, POLICY)).version_id == "1"


async def test_refresh_now_follows_a_refresh_that_began_before_the_change() -> None:
    h = Harness(threads=True)
    first = await h.cache.get(REF, POLICY)
    gate = h.backend.gates[REF.path] = threading.Event()
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first  # background refresh starts, then blocks
    await wait_for(lambda: h.backend.version_checks == 1)
    h.backend.rotate(REF.path)  # the in-flight check may already have answered "1"
    pushes = [asyncio.create_task(h.cache.refresh_now(REF, POLICY)) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    results = await asyncio.gather(*pushes)
    assert {result.version_id for result in results} == {"2"}
    assert (await h.cache.get(REF, POLICY)).version_id == "2"
    assert h.backend.version_checks == 2  # the in-flight round plus ONE shared follow-up
    await h.cache.close()


async def test_a_hundred_concurrent_pushes_share_one_backend_round(h: Harness) -> None:
    await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    checks, reads = h.backend.version_checks, h.backend.reads
    results = await asyncio.gather(*(h.cache.refresh_now(REF, POLICY) for _ in range(100)))
    assert {result.version_id for result in results} == {"2"}
    assert h.backend.version_checks - checks == 1
    assert h.backend.reads - reads == 1
    assert h.cache.stats()[REF].push_refreshes == 1


async def test_pushes_start_at_most_one_round_a_second_and_still_see_the_change(
    h: Harness,
) -> None:
    await h.cache.get(REF, POLICY)
    started = h.clock.monotonic()
    for expected in range(2, 12):  # ten pushes in a row, each after its own rotation
        h.backend.rotate(REF.path)
        pushed = await h.cache.refresh_now(REF, POLICY)
        assert pushed.version_id == str(expected)  # a push's answer reflects its change
    rounds = h.cache.stats()[REF].push_refreshes
    assert rounds == 10
    # ...but the limit spaced them at least one second apart (the harness's sleep moves time).
    assert h.clock.monotonic() - started >= 9.0


async def test_pushes_arriving_during_a_push_round_share_the_next_one() -> None:
    h = Harness(threads=True)
    await h.cache.get(REF, POLICY)
    gate = h.backend.gates[REF.path] = threading.Event()
    first = asyncio.create_task(h.cache.refresh_now(REF, POLICY))
    await wait_for(lambda: h.backend.version_checks == 1)  # the first push round is in flight
    h.backend.rotate(REF.path)  # it may already have answered "1"
    later = [asyncio.create_task(h.cache.refresh_now(REF, POLICY)) for _ in range(50)]
    await asyncio.sleep(0.01)
    gate.set()
    await first
    results = await asyncio.gather(*later)
    assert {result.version_id for result in results} == {"2"}
    assert h.cache.stats()[REF].push_refreshes == 2  # the one in flight plus ONE shared
    await h.cache.close()


# ======================================================================================
# previous version
# ======================================================================================


async def test_previous_version_within_and_after_grace(h: Harness) -> None:
    with pytest.raises(VersionUnavailable) as no_previous:
        await h.cache.get_version(REF, POLICY, "previous")
    assert no_previous.value.reason == "no_previous"
    first = await h.cache.get(REF, POLICY)
    h.backend.rotate(REF.path)
    await h.cache.refresh_now(REF, POLICY)
    current = await h.cache.get_version(REF, POLICY, "current")
    assert current.version_id == "2" and current is await h.cache.get(REF, POLICY)
    previous = await h.cache.get_version(REF, POLICY, "previous")
    assert previous.secret is first.secret and previous.previous is None
    assert previous.switched_at == current.switched_at == h.clock.now()
    h.clock.advance(POLICY.previous_grace)
    assert (await h.cache.get_version(REF, POLICY, "previous")).secret is first.secret
    h.clock.advance(STEP)
    with pytest.raises(VersionUnavailable) as late:
        await h.cache.get_version(REF, POLICY, "previous")
    assert late.value.reason == late.value.condition == "grace_expired"
    assert describe_ref(REF) in str(late.value)
    assert isinstance(late.value, CredentialUnavailable) and late.value.ref == REF


async def test_previous_lease_is_not_handed_out_after_it_ends() -> None:
    h = Harness(lease=90.0)
    policy = CachePolicy(refresh_interval=60.0, jitter=0.0, max_stale=600.0, previous_grace=600.0)
    first = await h.cache.get(REF, policy)
    h.clock.advance(61.0)
    await h.cache.refresh_now(REF, policy)
    assert (await h.cache.get_version(REF, policy, "previous")).secret is first.secret
    h.clock.advance(30.0)  # first lease (90 s) has ended
    with pytest.raises(VersionUnavailable) as ended:
        await h.cache.get_version(REF, policy, "previous")
    assert ended.value.reason == "expired"
    await h.cache.close()


# ======================================================================================
# failures: stale-if-error, backoff, recovery
# ======================================================================================


async def test_stale_if_error_until_max_stale_then_unavailable(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    h.backend.failure = BackendUnavailable("vault sealed")
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first
    await h.cache.wait_idle()
    stale = await h.cache.get(REF, POLICY)
    assert stale.stale and stale.secret is first.secret
    failed = h.events[-1]
    assert failed.kind == "credential.refresh_failed"
    assert (failed.condition, failed.old_version, failed.failures) == ("unavailable", "1", 1)
    # Keep serving (retrying with backoff) until last_success + max_stale.
    h.clock.advance(POLICY.max_stale - first.next_refresh_in - 2 * STEP)
    assert await h.cache.get(REF, POLICY) is stale
    await h.cache.wait_idle()
    assert h.cache.peek(REF) is stale
    h.clock.advance(2 * STEP)
    assert h.cache.peek(REF) is None
    with pytest.raises(CredentialUnavailable) as exc_info:
        await h.cache.get(REF, POLICY)
    err = exc_info.value
    assert err.ref == REF and err.condition == "unavailable"
    assert describe_ref(REF) in str(err) and "unavailable" in str(err)
    assert isinstance(err, BrokerError)
    stats = h.cache.stats()[REF]
    assert stats.stale_served >= 2 and stats.refresh_errors >= 2


async def test_recovery_after_the_backend_returns(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    h.backend.failure = BackendThrottled("slow down")
    h.clock.advance(past_refresh(first))
    await h.cache.get(REF, POLICY)
    await h.cache.wait_idle()
    assert (await h.cache.get(REF, POLICY)).stale
    h.backend.failure = None
    h.backend.rotate(REF.path)
    h.clock.advance(h.events[-1].retry_in + STEP)  # type: ignore[operator]
    assert (await h.cache.get(REF, POLICY)).stale  # still served while the retry runs
    await h.cache.wait_idle()
    fresh = await h.cache.get(REF, POLICY)
    assert not fresh.stale and fresh.version_id == "2" and fresh.previous is first.secret
    assert h.kinds() == [
        "credential.refresh_failed",
        "credential.rotated",
        "credential.recovered",
    ]
    assert await h.cache.get(REF, POLICY) is fresh  # hot path again


async def test_recovery_after_max_stale_waits_for_the_retry(h: Harness) -> None:
    first = await h.cache.get(REF, POLICY)
    h.backend.failure = BackendUnavailable("down")
    h.clock.advance(POLICY.max_stale + STEP)
    with pytest.raises(CredentialUnavailable):
        await h.cache.get(REF, POLICY)
    h.backend.failure = None
    h.clock.advance(h.events[-1].retry_in + STEP)  # type: ignore[operator]
    back = await h.cache.get(REF, POLICY)
    assert back.secret is first.secret and not back.stale


async def test_stale_window_counts_from_the_start_of_a_slow_backend_round() -> None:
    h = Harness(threads=True)
    first = await h.cache.get(REF, POLICY)
    gate = h.backend.gates[REF.path] = threading.Event()
    h.clock.advance(past_refresh(first))
    started_wall = h.clock.now()
    await h.cache.get(REF, POLICY)
    await wait_for(lambda: h.backend.version_checks == 1)
    h.clock.advance(100.0)  # the backend takes its time answering
    gate.set()
    await h.cache.wait_idle()
    confirmed = await h.cache.get(REF, POLICY)
    assert confirmed.loaded_at == started_wall
    h.backend.failure = BackendUnavailable("down")
    h.clock.advance(started_wall + POLICY.max_stale - h.clock.now() - STEP)
    assert (await h.cache.get(REF, POLICY)).secret is first.secret
    h.clock.advance(2 * STEP)
    assert h.cache.peek(REF) is None
    with pytest.raises(CredentialUnavailable):
        await h.cache.get(REF, POLICY)
    await h.cache.close()


async def test_backoff_grows_exponentially_with_jitter_and_is_capped(h: Harness) -> None:
    policy = CachePolicy(refresh_interval=20.0, jitter=0.2, max_stale=1e6, previous_grace=0.0)
    first = await h.cache.get(REF, policy)
    h.backend.failure = BackendUnavailable("down")
    h.clock.advance(past_refresh(first))
    await h.cache.get(REF, policy)
    await h.cache.wait_idle()
    delays = [h.events[-1].retry_in]
    for _ in range(6):
        calls = h.backend.calls_started
        h.clock.advance(delays[-1] - 2 * STEP)  # type: ignore[operator]
        assert (await h.cache.get(REF, policy)).stale
        await h.cache.wait_idle()
        assert h.backend.calls_started == calls  # nothing during the backoff
        h.clock.advance(2 * STEP)
        await h.cache.get(REF, policy)
        await h.cache.wait_idle()
        assert h.backend.calls_started == calls + 1
        delays.append(h.events[-1].retry_in)
    nominal = [1.0, 2.0, 4.0, 8.0, 16.0, 20.0, 20.0]
    for delay, base in zip(delays, nominal, strict=True):
        assert base * 0.8 <= delay <= base * 1.2  # type: ignore[operator]
    assert delays[:5] == sorted(delays[:5])  # type: ignore[type-var]
    assert any(abs(d - b) > 1e-6 for d, b in zip(delays, nominal, strict=True))  # type: ignore[operator]
    assert [e.failures for e in h.events] == list(range(1, 8))


async def test_never_loaded_and_backend_down_is_unavailable(h: Harness) -> None:
    h.backend.failure = BackendUnavailable("connection refused")
    with pytest.raises(CredentialUnavailable) as first:
        await h.cache.get(REF, POLICY)
    assert first.value.condition == "unavailable" and first.value.ref == REF
    with pytest.raises(CredentialUnavailable):  # backing off: no second call
        await h.cache.get(REF, POLICY)
    assert h.backend.reads == 1
    h.backend.failure = None
    h.clock.advance(h.events[-1].retry_in + STEP)  # type: ignore[operator]
    assert (await h.cache.get(REF, POLICY)).version_id == "1"
    assert h.kinds() == ["credential.refresh_failed", "credential.recovered"]


async def test_not_found_on_first_load(h: Harness) -> None:
    missing = SecretRef("fake", "kv/nothing/here")
    with pytest.raises(CredentialUnavailable) as exc_info:
        await h.cache.get(missing, POLICY)
    assert exc_info.value.condition == "not_found"
    assert "kv/nothing/here" in str(exc_info.value)


async def test_unknown_backend(h: Harness) -> None:
    with pytest.raises(CredentialUnavailable) as exc_info:
        await h.cache.get(SecretRef("nope", "x"), POLICY)
    assert exc_info.value.condition == "unknown_backend"


async def test_unexpected_backend_exception_is_a_failure_with_no_message_leak(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    first = await h.cache.get(REF, POLICY)
    h.backend.failure = RuntimeError(f"boom {CANARY}")
    h.clock.advance(past_refresh(first))
    with caplog.at_level(logging.DEBUG):
        await h.cache.get(REF, POLICY)
        await h.cache.wait_idle()
        assert (await h.cache.get(REF, POLICY)).stale
    assert h.events[-1].condition == "error"
    assert CANARY not in caplog.text
    assert "RuntimeError" in caplog.text


# ======================================================================================
# leases
# ======================================================================================


async def test_lease_is_refreshed_ahead_of_expiry_and_never_served_after() -> None:
    h = Harness(lease=30.0)
    policy = CachePolicy(refresh_interval=600.0, jitter=0.1, max_stale=1e6, previous_grace=0.0)
    first = await h.cache.get(REF, policy)
    assert first.secret.expires_at == h.clock.now() + 30.0
    assert 18.0 <= first.next_refresh_in <= 22.0  # 2/3 of the lease, jittered
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, policy) is first
    await h.cache.wait_idle()
    renewed = await h.cache.get(REF, policy)
    assert renewed.version_id == "lease-2" and renewed.previous is first.secret
    assert h.backend.version_checks == 0  # a lease is renewed by reading
    # Refresh fails; the last lease is served only until it ends, despite max_stale.
    h.backend.failure = BackendUnavailable("down")
    h.clock.advance(past_refresh(renewed))
    assert await h.cache.get(REF, policy) is renewed
    await h.cache.wait_idle()
    assert (await h.cache.get(REF, policy)).stale
    assert renewed.secret.expires_at is not None
    h.clock.advance(renewed.secret.expires_at - h.clock.now() - STEP)
    assert (await h.cache.get(REF, policy)).secret is renewed.secret
    h.clock.advance(STEP)
    assert h.cache.peek(REF) is None
    with pytest.raises(CredentialUnavailable) as exc_info:
        await h.cache.get(REF, policy)
    assert exc_info.value.condition == "unavailable"
    await h.cache.close()


async def test_idle_lease_past_expiry_is_reloaded_not_served() -> None:
    h = Harness(lease=30.0)
    first = await h.cache.get(REF, POLICY)
    h.clock.advance(45.0)
    again = await h.cache.get(REF, POLICY)
    assert again.version_id == "lease-2"
    assert again.secret.expires_at is not None and again.secret.expires_at > h.clock.now()
    assert first.secret.expires_at is not None and first.secret.expires_at < h.clock.now()
    assert h.cache.stats()[REF].misses == 2
    await h.cache.close()


async def test_backend_returning_an_expired_lease_is_a_failure() -> None:
    h = Harness(lease=-1.0)
    with pytest.raises(CredentialUnavailable) as exc_info:
        await h.cache.get(REF, POLICY)
    assert exc_info.value.condition == "expired"
    await h.cache.close()


# ======================================================================================
# eviction and lifecycle
# ======================================================================================


async def test_least_recently_used_credential_is_evicted() -> None:
    h = Harness(max_entries=2)
    third = SecretRef("fake", "kv/app/third")
    h.backend.rotate(third.path)
    await h.cache.get(REF, POLICY)
    await h.cache.get(OTHER, POLICY)
    await h.cache.get(REF, POLICY)  # REF is now the most recent
    await h.cache.get(third, POLICY)
    assert REF in h.cache and third in h.cache and OTHER not in h.cache
    assert len(h.cache) == 2
    assert h.cache.stats()[OTHER].misses == 1  # counters outlive the entry
    await h.cache.get(OTHER, POLICY)
    assert h.cache.stats()[OTHER].misses == 2 and h.backend.reads == 4
    await h.cache.close()


async def test_eviction_cancels_the_background_refresh() -> None:
    h = Harness(max_entries=2)
    third = SecretRef("fake", "kv/app/third")
    h.backend.rotate(third.path)
    first = await h.cache.get(REF, POLICY)
    await h.cache.get(OTHER, POLICY)
    h.clock.advance(past_refresh(first))
    assert await h.cache.get(REF, POLICY) is first  # refresh task created, not yet run
    await h.cache.get(OTHER, POLICY)  # OTHER refreshes too and becomes most recent
    await h.cache.get(third, POLICY)  # evicts REF
    await h.cache.wait_idle()
    assert REF not in h.cache
    assert h.backend.version_checks == 1  # only OTHER's refresh ran
    await h.cache.close()


async def test_eviction_during_a_load_fails_its_waiters_cleanly() -> None:
    h = Harness(max_entries=1, threads=True)
    gate = h.backend.gates[REF.path] = threading.Event()
    waiter = asyncio.create_task(h.cache.get(REF, POLICY))
    await wait_for(lambda: h.backend.calls_started == 1)
    await h.cache.get(OTHER, POLICY)  # evicts REF while its load is in flight
    with pytest.raises(CredentialUnavailable) as exc_info:
        await waiter
    assert exc_info.value.condition == "evicted"
    gate.set()
    await h.cache.close()


async def test_a_cancelled_caller_does_not_cancel_the_shared_load() -> None:
    h = Harness(threads=True)
    gate = h.backend.gates[REF.path] = threading.Event()
    impatient = asyncio.create_task(h.cache.get(REF, POLICY))
    patient = asyncio.create_task(h.cache.get(REF, POLICY))
    await wait_for(lambda: h.backend.calls_started == 1)
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    gate.set()
    assert (await patient).version_id == "1"
    assert h.backend.reads == 1
    await h.cache.close()


async def test_close_cancels_refreshes_in_flight() -> None:
    h = Harness(threads=True)
    first = await h.cache.get(REF, POLICY)
    gate = h.backend.gates[REF.path] = threading.Event()
    h.clock.advance(past_refresh(first))
    await h.cache.get(REF, POLICY)
    await wait_for(lambda: h.backend.version_checks == 1)
    await h.cache.close()
    assert len(h.cache) == 0
    gate.set()
    with pytest.raises(RuntimeError, match="closed"):
        await h.cache.get(REF, POLICY)


async def test_failing_event_handler_does_not_break_the_cache(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FrozenClock()
    backend = FakeBackend(clock)
    backend.rotate(REF.path)

    def explode(event: CacheEvent) -> None:
        raise ValueError("handler bug")

    cache = CredentialCache({"fake": backend}, clock, on_event=explode, executor=InlineExecutor())
    await cache.get(REF, POLICY)
    backend.rotate(REF.path)
    with caplog.at_level(logging.ERROR):
        assert (await cache.refresh_now(REF, POLICY)).version_id == "2"
    assert "credential.rotated" in caplog.text
    await cache.close()


def test_policy_and_cache_arguments_are_validated() -> None:
    for bad in (
        {"refresh_interval": 0.0},
        {"refresh_interval": 1.0, "jitter": 1.0},
        {"refresh_interval": 1.0, "jitter": -0.1},
        {"refresh_interval": 1.0, "max_stale": -1.0},
        {"refresh_interval": 1.0, "previous_grace": -1.0},
    ):
        with pytest.raises(ValueError):
            CachePolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        CredentialCache({}, FrozenClock(), max_entries=0)


def test_fake_backend_satisfies_the_protocol() -> None:
    assert isinstance(FakeBackend(FrozenClock()), SecretBackend)


# ======================================================================================
# no secret values in anything printable
# ======================================================================================


async def test_no_secret_value_in_reprs_messages_events_or_stats(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    printable: list[object] = []
    with caplog.at_level(logging.DEBUG):
        first = await h.cache.get(REF, POLICY)
        assert CANARY in first.secret.value.reveal()  # the canary is really in there
        h.backend.rotate(REF.path)
        second = await h.cache.refresh_now(REF, POLICY)
        printable += [first, second, second.previous, first.secret.fields]
        printable.append(await h.cache.get_version(REF, POLICY, "previous"))
        h.backend.failure = BackendUnavailable("down", debug="upstream said 503")
        h.clock.advance(POLICY.max_stale + STEP)
        with pytest.raises(CredentialUnavailable) as unavailable:
            await h.cache.get(REF, POLICY)
        h.clock.advance(POLICY.previous_grace)
        h.backend.failure = None
        await h.cache.refresh_now(REF, POLICY)
        with pytest.raises(VersionUnavailable) as version_error:
            await h.cache.get_version(REF, POLICY, "previous")
    printable += [unavailable.value, version_error.value, h.events, h.cache.stats()]
    for item in printable:
        assert CANARY not in repr(item)
        assert CANARY not in str(item)
    for err in (unavailable.value, version_error.value):
        assert CANARY not in (getattr(err, "debug", None) or "")
        assert CANARY not in repr(err.args)
    assert CANARY not in caplog.text


# ======================================================================================
# property: interleavings of rotations, failures and time never break the promises
# ======================================================================================

_GET = st.tuples(st.just("get"), st.none())
_ADVANCE = st.tuples(st.just("advance"), st.floats(min_value=0.0, max_value=90.0))
_OPS = st.lists(
    st.one_of(
        _GET,
        _GET,
        _GET,
        _ADVANCE,
        _ADVANCE,
        st.tuples(st.just("rotate"), st.none()),
        st.tuples(st.just("fail"), st.sampled_from(["unavailable", "throttled", "denied"])),
        st.tuples(st.just("heal"), st.none()),
        st.tuples(st.just("push"), st.none()),
        st.tuples(st.just("tick"), st.none()),
        st.tuples(st.just("drain"), st.none()),
    ),
    min_size=1,
    max_size=60,
)
_FAILURES: dict[str, type[SecretBackendError]] = {
    "unavailable": BackendUnavailable,
    "throttled": BackendThrottled,
    "denied": SecretAccessDenied,
}


async def _run_scenario(ops: list[tuple[str, Any]], lease: float | None, seed: int) -> None:
    h = Harness(lease=lease, seed=seed)
    policy = CachePolicy(refresh_interval=40.0, jitter=0.2, max_stale=150.0, previous_grace=30.0)
    newest_served = 0
    drained_floor = 0
    try:
        for op, arg in ops:
            if op == "advance":
                h.clock.advance(arg)
            elif op == "rotate":
                h.backend.rotate(REF.path)
            elif op == "fail":
                h.backend.failure = _FAILURES[arg](arg)
            elif op == "heal":
                h.backend.failure = None
            elif op == "tick":
                await asyncio.sleep(0)
            elif op == "drain":
                await h.cache.wait_idle()
                drained_floor = h.backend.last_ok_version.get(REF.path, 0)
            else:
                try:
                    if op == "get":
                        got = await h.cache.get(REF, policy)
                    else:
                        got = await h.cache.refresh_now(REF, policy)
                except CredentialUnavailable as err:
                    assert err.ref == REF and err.condition
                    continue
                secret = got.secret
                # Never past the lease's end.
                assert secret.expires_at is None or secret.expires_at > h.clock.now()
                if lease is not None:
                    continue
                number = int(secret.version_id)
                # Never older than what was served before, or confirmed before a drain.
                assert number >= newest_served and number >= drained_floor
                newest_served = number
                # Never beyond max_stale after the backend last confirmed it.
                confirmed = h.backend.last_ok_mono[REF.path]
                assert h.clock.monotonic() < confirmed + policy.max_stale
    finally:
        await h.cache.close()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops=_OPS, lease=st.sampled_from([None, 45.0]), seed=st.integers(0, 2**16))
def test_any_interleaving_keeps_the_cache_promises(
    ops: list[tuple[str, Any]], lease: float | None, seed: int
) -> None:
    asyncio.run(_run_scenario(ops, lease, seed))

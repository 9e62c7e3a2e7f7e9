"""The credential cache: secrets from the configured backends, served from memory.

One `CredentialCache` lives on one asyncio event loop (each uvicorn worker has its own). Backends
are synchronous, so every backend call runs in a worker thread (``asyncio.to_thread`` or an
injected executor), never on the loop.

Hot path
    `get` on a loaded credential is one LRU lookup (cachetools ``LRUCache`` keyed by `SecretRef`)
    and one monotonic-clock compare against the entry's ``due`` time; it returns the immutable
    `CachedSecret` held by the entry (no lock, no I/O, no copy). ``due`` is the earliest of the
    next refresh time, the lease's end and the end of the stale window, so everything that needs
    a decision falls through to the slow path.

Slow path
    * Nothing cached (miss): one load task per ref; every concurrent caller awaits the same task
      (single flight), so 100 cold callers cause one backend read.
    * Due for refresh: start ONE background refresh task (unless one is running, or a failed one
      is backing off) and return the current value at once. Callers never wait on the backend
      while a usable value exists.
    * Refresh: ``current_version(ref)`` first; the same version id only reschedules; a version
      already seen (kept per ref by version id, versions are immutable) is switched to without a
      read; otherwise ``read(ref)``. A new version replaces the old one with one assignment of a
      new immutable `CachedSecret` whose ``previous`` is the replaced secret, and a
      ``credential.rotated`` `CacheEvent` is emitted. Leased secrets (``expires_at``) skip the
      version check (a lease has to be renewed by reading) and are refreshed at 2/3 of the
      remaining lease or the refresh interval, whichever comes first.
    * Refresh failed (stale-if-error): the last good value is served, flagged ``stale``, until
      ``last_success + max_stale`` (counted from the start of the last successful backend
      round; never past a lease's end); retries back off exponentially
      (``backoff_base`` x 2**n, capped at the refresh interval, jittered); each failure emits a
      ``credential.refresh_failed`` event (condition only). With no usable value left, `get`
      waits for a retry if one may start (or is running), else raises `CredentialUnavailable`.

Next refresh times are ``interval x (1 +/- jitter)`` drawn from the injected `random.Random`, on
the monotonic clock. All bookkeeping happens on the event loop; worker threads only run the
backend calls.

Rejected-version hints
    A gateway whose provider refused the key it was served (the provider revoked it at once on
    rotation) says so: `refresh_rejected(ref, policy, version)`. Only a hint naming the version
    the cache holds right now can cause a backend round (a hint naming any other version is
    answered from memory: the cache has already moved on, or the hint is wrong); concurrent
    hints share that round (single flight, joining any round already in flight), and at most one
    round per credential starts from hints every `rejection_refresh_interval` seconds. A hint
    refused by that limit brings the next scheduled check forward to the end of the interval,
    so a rotation that lands just after a hint round is still picked up within it. Hints never
    override a failing backend's backoff. So a caller can make the cache talk to the backend at
    most once a second per credential, however many hints it sends.

Pushes
    `refresh_now` (a rotation hook's push refresh) is limited the same way: each push waits for
    a backend round that starts after it arrived, concurrent pushes share that round, and push
    rounds of one credential start at most once per `rejection_refresh_interval` (a push
    arriving sooner waits for the next round rather than being answered from memory). So 100
    concurrent pushes cause one or two backend rounds; pushes do ignore a failing backend's
    backoff, as an operator's explicit request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import random
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, NamedTuple, TypeVar

from cachetools import LRUCache

from broker.clock import Clock
from broker.errors import BrokerError
from secret_backends.base import Secret, SecretBackend, SecretBackendError, SecretRef

log = logging.getLogger("broker.cache")

_T = TypeVar("_T")

EventKind = Literal["credential.rotated", "credential.refresh_failed", "credential.recovered"]
HintOutcome = Literal["refreshed", "joined", "rate_limited", "backing_off", "not_current"]
"""What a rejected-version hint did: started a backend round (``refreshed``), waited for one
already in flight (``joined``), was refused by the per-credential limit (``rate_limited``) or by
a failing backend's backoff (``backing_off``), or named a version other than the one held
(``not_current``: answered from memory)."""

MAX_KNOWN_VERSIONS = 4
"""Versions remembered per credential (by version id) so a flip back to one needs no read."""
LEASE_REFRESH_FRACTION = 2.0 / 3.0
"""A leased secret is refreshed once this fraction of its remaining lease has passed."""


# ======================================================================================
# values
# ======================================================================================


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """Per-credential cache settings, passed with each request (seconds unless noted)."""

    refresh_interval: float
    """How long a loaded version is served before it is checked again."""
    jitter: float = 0.1
    """Fraction by which refresh and retry times are randomly spread (0 <= jitter < 1)."""
    max_stale: float = 3600.0
    """How long after the last successful backend round a value may still be served."""
    previous_grace: float = 300.0
    """How long after a rotation the replaced version is still handed out on request."""

    def __post_init__(self) -> None:
        if not self.refresh_interval > 0:
            raise ValueError("refresh_interval must be > 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("jitter must be in [0, 1)")
        if not self.max_stale >= 0:
            raise ValueError("max_stale must be >= 0")
        if not self.previous_grace >= 0:
            raise ValueError("previous_grace must be >= 0")


@dataclass(frozen=True, slots=True)
class CachedSecret:
    """What `CredentialCache.get` returns: one immutable snapshot, shared by every caller.

    Its repr shows versions and times, never a value (`Secret` hides its fields).
    """

    secret: Secret
    loaded_at: float
    """Wall-clock time the backend last confirmed this version (read or version check)."""
    next_refresh_in: float
    """Seconds after `loaded_at` at which the cache checks the backend again."""
    stale: bool = False
    """True when the last refresh failed and this is the last good value (stale-if-error)."""
    previous: Secret | None = None
    """The version this one replaced, if the cache saw the change."""
    switched_at: float | None = None
    """Wall-clock time this version replaced `previous`."""

    @property
    def version_id(self) -> str:
        return self.secret.version_id

    @property
    def refresh_due_at(self) -> float:
        """Wall-clock time of the next scheduled check (``loaded_at + next_refresh_in``)."""
        return self.loaded_at + self.next_refresh_in

    def refresh_in(self, now: float) -> float:
        """Seconds from wall-clock `now` to the next scheduled check (0 when already due).

        `next_refresh_in` counts from `loaded_at`; a hit returns the object made at load time,
        so a response's "refresh in" should come from here.
        """
        return max(0.0, self.loaded_at + self.next_refresh_in - now)


@dataclass(frozen=True, slots=True)
class CacheEvent:
    """Something worth an audit line or a metric. Never carries a secret value."""

    kind: EventKind
    ref: SecretRef
    old_version: str | None
    """Rotated: the replaced version; failed/recovered: the version served until then, if any."""
    new_version: str | None
    """Rotated/recovered: the version served from now on."""
    observed_at: float
    """Wall-clock seconds."""
    condition: str | None = None
    """Failed: the backend error's condition (``unavailable``, ``throttled``, ...)."""
    failures: int = 0
    """Failed: consecutive failures so far."""
    retry_in: float | None = None
    """Failed: seconds until a retry may start."""


@dataclass(frozen=True, slots=True)
class CredentialStats:
    """Counters of one credential (plain ints; no values).

    ``hits`` are gets answered from memory (stale ones included, also counted in
    ``stale_served``); ``misses`` are gets that found no usable value and had to wait for (or
    were refused by) the backend. ``refreshes`` and ``refresh_errors`` count backend rounds
    (first loads included) that succeeded or failed; ``backend_reads`` and ``version_checks``
    count the backend calls (``read`` and ``current_version``).
    """

    hits: int = 0
    misses: int = 0
    refreshes: int = 0
    refresh_errors: int = 0
    stale_served: int = 0
    backend_reads: int = 0
    version_checks: int = 0
    rejection_hints: int = 0
    """Rejected-version hints that named the version held (the only ones that may refresh)."""
    hint_refreshes: int = 0
    """Backend rounds started by those hints (at most one per `rejection_refresh_interval`)."""
    push_refreshes: int = 0
    """Backend rounds started by pushes (at most one per `rejection_refresh_interval`)."""


@dataclass(frozen=True, slots=True)
class HintResult:
    """The answer to a rejected-version hint: what to serve now, and what the hint did."""

    cached: CachedSecret
    outcome: HintOutcome


class CredentialUnavailable(BrokerError):
    """No usable value for a credential (never loaded, lease ended, or stale for too long).

    `condition` is a short safe word (a backend error's condition such as ``unavailable``,
    ``throttled``, ``not_found``, ``denied``; or ``expired``, ``evicted``, ``unknown_backend``,
    ``error``). The message names the credential and the condition; `debug` may hold the backend
    error's message (which backends keep free of secret values) for logs.
    """

    def __init__(
        self, ref: SecretRef, condition: str, message: str, *, debug: str | None = None
    ) -> None:
        super().__init__(message)
        self.ref = ref
        self.condition = condition
        self.message = message
        self.debug = debug

    def __repr__(self) -> str:
        return (
            f"CredentialUnavailable(ref={describe_ref(self.ref)!r}, "
            f"condition={self.condition!r}, message={self.message!r})"
        )


class VersionUnavailable(CredentialUnavailable):
    """The requested version (``previous``) cannot be handed out (the current one may be fine).

    `condition` (also `reason`): ``no_previous`` (no rotation seen), ``grace_expired`` (replaced
    longer ago than the policy's ``previous_grace``) or ``expired`` (its lease has ended). A
    subclass of `CredentialUnavailable` so one ``except`` covers both; callers that care map it
    to "not found" rather than "try later".
    """

    def __init__(self, ref: SecretRef, reason: str, message: str) -> None:
        super().__init__(ref, reason, message)

    @property
    def reason(self) -> str:
        return self.condition

    def __repr__(self) -> str:
        return (
            f"VersionUnavailable(ref={describe_ref(self.ref)!r}, "
            f"reason={self.condition!r}, message={self.message!r})"
        )


def describe_ref(ref: SecretRef) -> str:
    """``backend:path[#field][@version][~stage]``: a credential's name for messages and logs."""
    text = f"{ref.backend}:{ref.path}"
    if ref.field:
        text += f"#{ref.field}"
    if ref.version:
        text += f"@{ref.version}"
    if ref.stage:
        text += f"~{ref.stage}"
    return text


# ======================================================================================
# internals
# ======================================================================================


class _Counters:
    """Mutable per-ref counters; outlive their entry so eviction does not reset them."""

    __slots__ = (
        "backend_reads",
        "hint_refreshes",
        "hits",
        "misses",
        "push_refreshes",
        "refresh_errors",
        "refreshes",
        "rejection_hints",
        "stale_served",
        "version_checks",
    )

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.refreshes = 0
        self.refresh_errors = 0
        self.stale_served = 0
        self.backend_reads = 0
        self.version_checks = 0
        self.rejection_hints = 0
        self.hint_refreshes = 0
        self.push_refreshes = 0

    def snapshot(self) -> CredentialStats:
        return CredentialStats(
            hits=self.hits,
            misses=self.misses,
            refreshes=self.refreshes,
            refresh_errors=self.refresh_errors,
            stale_served=self.stale_served,
            backend_reads=self.backend_reads,
            version_checks=self.version_checks,
            rejection_hints=self.rejection_hints,
            hint_refreshes=self.hint_refreshes,
            push_refreshes=self.push_refreshes,
        )


class _Failure(NamedTuple):
    """Outcome of a failed backend round (tasks return it rather than raise it)."""

    condition: str
    debug: str | None


_Outcome = CachedSecret | _Failure


class _Entry:
    """The cache's state for one ref. Only the event loop touches it."""

    __slots__ = (
        "counters",
        "current",
        "due",
        "failure",
        "failures",
        "hard_deadline",
        "hint_not_before",
        "policy",
        "push_not_before",
        "push_round",
        "ref",
        "refresh_at",
        "task",
        "versions",
    )

    def __init__(self, ref: SecretRef, policy: CachePolicy, counters: _Counters) -> None:
        self.ref = ref
        self.policy = policy
        self.counters = counters
        self.current: CachedSecret | None = None
        self.due = -math.inf
        """Monotonic: before it, `current` is served with no further check (the hot path)."""
        self.refresh_at = -math.inf
        """Monotonic: from then on a refresh (or a retry after failures) may start."""
        self.hard_deadline = -math.inf
        """Monotonic: `current` is never served from then on (lease end, end of stale window)."""
        self.hint_not_before = -math.inf
        """Monotonic: before it, a rejected-version hint starts no backend round."""
        self.push_not_before = -math.inf
        """Monotonic: before it, a push starts no backend round (it waits for this time)."""
        self.push_round: asyncio.Task[_Outcome] | None = None
        """The push round not yet started, shared by every push waiting for it."""
        self.failures = 0
        self.failure: _Failure | None = None
        self.task: asyncio.Task[_Outcome] | None = None
        self.versions: dict[str, Secret] = {}

    def cancel(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
        push, self.push_round = self.push_round, None
        if push is not None:
            push.cancel()


class _Entries(LRUCache):  # type: ignore[type-arg]
    """An LRUCache of entries that cancels an evicted entry's refresh task."""

    def popitem(self) -> tuple[SecretRef, _Entry]:
        ref, entry = super().popitem()
        entry.cancel()
        return ref, entry


# ======================================================================================
# the cache
# ======================================================================================


class CredentialCache:
    """Secrets from `backends` (by name, ``SecretRef.backend``), cached per `SecretRef`.

    Bounded to `max_entries` credentials (least recently used evicted; an evicted credential's
    refresh task is cancelled). `on_event` receives `CacheEvent`s on the loop (its exceptions are
    logged and swallowed). `rng` spreads refresh and retry times (seed it in tests). `executor`
    runs backend calls (default: ``asyncio.to_thread``); `sleep` is how a push waits for
    the per-credential limit (default ``asyncio.sleep``; tests pass one that moves their clock).
    `rejection_refresh_interval` is the least time between two backend rounds started by
    rejected-version hints (or by pushes) for one credential.
    The backends are not closed by `close`.
    """

    def __init__(
        self,
        backends: Mapping[str, SecretBackend],
        clock: Clock,
        *,
        max_entries: int = 1024,
        on_event: Callable[[CacheEvent], None] | None = None,
        rng: random.Random | None = None,
        executor: Executor | None = None,
        backoff_base: float = 1.0,
        rejection_refresh_interval: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] | None = None,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        if not backoff_base > 0:
            raise ValueError("backoff_base must be > 0")
        if not rejection_refresh_interval > 0:
            raise ValueError("rejection_refresh_interval must be > 0")
        self._rejection_interval = rejection_refresh_interval
        self._sleep = sleep or asyncio.sleep
        self._backends = dict(backends)
        self._clock = clock
        self._mono = clock.monotonic
        self._entries = _Entries(max_entries)
        self._lookup: Callable[[SecretRef], _Entry] = self._entries.__getitem__
        self._counters: LRUCache[SecretRef, _Counters] = LRUCache(4 * max_entries)
        self._on_event = on_event
        # Not for cryptography: only spreads refresh times.
        self._rng = rng or random.Random()  # noqa: S311
        self._executor = executor
        self._backoff_base = backoff_base
        self._tasks: set[asyncio.Task[_Outcome]] = set()
        self._closed = False

    # -- reading ------------------------------------------------------------------------

    async def get(self, ref: SecretRef, policy: CachePolicy) -> CachedSecret:
        """The credential's current value; waits on the backend only when none is usable.

        Raises `CredentialUnavailable` when nothing usable is cached and the backend cannot
        provide it (or is backing off after failures). `policy` is recorded when a load or
        refresh starts; a changed policy takes effect from the credential's next refresh.
        """
        try:
            entry = self._lookup(ref)
        except KeyError:
            return await self._get_slow(ref, policy, None)
        if self._mono() < entry.due:
            entry.counters.hits += 1
            return entry.current  # type: ignore[return-value]
        return await self._get_slow(ref, policy, entry)

    def peek(self, ref: SecretRef) -> CachedSecret | None:
        """The value `get` would serve right now without a backend call, or None.

        Never returns a value past its lease or stale window; starts no refresh, counts nothing.
        """
        try:
            entry = self._lookup(ref)
        except KeyError:
            return None
        now = self._mono()
        if now < entry.due or (entry.current is not None and now < entry.hard_deadline):
            return entry.current
        return None

    async def get_version(
        self,
        ref: SecretRef,
        policy: CachePolicy,
        which: Literal["current", "previous"] = "current",
    ) -> CachedSecret:
        """`get` (``current``), or the version the current one replaced (``?version=previous``).

        ``previous`` is handed out only if a rotation was seen, at most ``previous_grace``
        seconds ago (wall clock), and its lease (if any) has not ended; otherwise raises
        `VersionUnavailable`. It comes as a new `CachedSecret` whose `secret` is the previous
        version, `switched_at` the time it stopped being current, `previous` None, and whose
        other fields are the current entry's. Raises `CredentialUnavailable` like `get`.
        """
        cached = await self.get(ref, policy)
        if which == "current":
            return cached
        if which != "previous":
            raise ValueError(f"unknown version selector {which!r}")
        name = describe_ref(ref)
        previous = cached.previous
        if previous is None or cached.switched_at is None:
            raise VersionUnavailable(
                ref, "no_previous", f"credential {name} has no previous version"
            )
        now = self._clock.now()
        if now - cached.switched_at > policy.previous_grace:
            raise VersionUnavailable(
                ref,
                "grace_expired",
                f"the previous version of credential {name} was replaced more than "
                f"{policy.previous_grace:g} s ago",
            )
        if previous.expires_at is not None and now >= previous.expires_at:
            raise VersionUnavailable(
                ref, "expired", f"the previous version of credential {name} has expired"
            )
        return dataclasses.replace(cached, secret=previous, previous=None)

    async def refresh_now(self, ref: SecretRef, policy: CachePolicy) -> CachedSecret:
        """Refresh from the backend (push, e.g. from a rotation hook) and return the result.

        Ignores the schedule and any backoff, but not the per-credential limit: every push
        waits for a backend round that *starts after it arrived* (a round already in flight may
        have asked the backend before the caller's change), and pushes share such rounds. Push
        rounds of one credential start at most once per `rejection_refresh_interval`: pushes
        arriving meanwhile wait for the next one and share it, so any number of concurrent
        pushes cause one or two backend rounds, and each push's answer still reflects the
        store as it was when the push arrived. The next `get` sees the result.
        Raises `CredentialUnavailable` if the backend round fails and no usable value remains;
        while a usable value remains, a failed push returns it flagged ``stale``.
        """
        entry = self._entries.get(ref)
        if entry is None:
            return await self.get(ref, policy)
        entry.policy = policy
        pending = entry.push_round
        if pending is None:
            if self._closed:
                raise RuntimeError("the credential cache is closed")
            pending = asyncio.get_running_loop().create_task(
                self._push_round(entry), name=f"credential-push {describe_ref(ref)}"
            )
            entry.push_round = pending
            self._tasks.add(pending)
            pending.add_done_callback(self._tasks.discard)
        outcome = await self._join(pending)
        if self._entries.get(ref) is not entry:  # evicted meanwhile
            return await self.get(ref, policy)
        if isinstance(outcome, CachedSecret):
            return outcome
        current = entry.current
        if current is not None and self._mono() < entry.hard_deadline:
            return current
        raise self._unavailable(ref, outcome)

    async def _push_round(self, entry: _Entry) -> _Outcome:
        """The backend round shared by the pushes waiting on `entry.push_round`: it starts
        after any round in flight and no sooner than `push_not_before`; pushes arriving once
        it has started wait for the next one."""
        me = asyncio.current_task()
        try:
            if entry.task is not None:
                await self._join(entry.task)
            delay = entry.push_not_before - self._mono()
            if delay > 0:
                await self._sleep(delay)
            while entry.task is not None:
                await self._join(entry.task)
            if self._entries.get(entry.ref) is not entry:
                return _Failure("evicted", "the credential left the cache before the push")
            entry.push_round = None  # from now on, a push waits for the next round
            entry.push_not_before = self._mono() + self._rejection_interval
            entry.counters.push_refreshes += 1
            self._start(entry)
            assert entry.task is not None
            return await self._join(entry.task)
        finally:
            if entry.push_round is me:
                entry.push_round = None

    async def refresh_rejected(
        self, ref: SecretRef, policy: CachePolicy, rejected_version: str
    ) -> HintResult:
        """The current value, after a caller reported that version `rejected_version` was
        refused where it was used (a provider that revoked the key at once on rotation).

        Only when `rejected_version` is the version held now may this start a backend round
        (a version check, and a read if the version changed), shared by every concurrent hint
        and at most one per `rejection_refresh_interval`; see the module docstring. Any other
        version (older, unknown) is answered like `get`. Raises `CredentialUnavailable` like
        `get`.
        """
        outcome: HintOutcome | None = None
        entry = self._entries.get(ref)
        counted = False
        while True:
            if entry is None or self._entries.get(ref) is not entry:
                return HintResult(await self.get(ref, policy), outcome or "not_current")
            current = entry.current
            if current is None or current.secret.version_id != rejected_version:
                return HintResult(await self.get(ref, policy), outcome or "not_current")
            if not counted:
                entry.counters.rejection_hints += 1
                counted = True
            if entry.task is not None:
                # A round is in flight (another hint's, a push, or the schedule's): wait for it,
                # then look again; it may have begun before the rotation.
                outcome = outcome or "joined"
                await self._join(entry.task)
                continue
            if outcome == "refreshed":  # our round is done and still found this version
                break
            now = self._mono()
            if now < entry.hint_not_before:
                self._bring_forward(entry, entry.hint_not_before)
                outcome = "rate_limited"
                break
            if entry.failure is not None and now < entry.refresh_at:
                outcome = "backing_off"
                break
            entry.hint_not_before = now + self._rejection_interval
            entry.policy = policy
            entry.counters.hint_refreshes += 1
            self._start(entry)
            outcome = "refreshed"
        return HintResult(await self.get(ref, policy), outcome)

    def _bring_forward(self, entry: _Entry, at: float) -> None:
        """Check the backend no later than monotonic `at` (on the next `get` from then on)."""
        if at < entry.refresh_at:
            entry.refresh_at = at
            entry.due = min(entry.due, at)

    # -- introspection and lifecycle ------------------------------------------------------

    def stats(self) -> Mapping[SecretRef, CredentialStats]:
        """A snapshot of every credential's counters (kept across eviction, bounded)."""
        return MappingProxyType({ref: c.snapshot() for ref, c in self._counters.items()})

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, ref: object) -> bool:
        return ref in self._entries

    async def wait_idle(self) -> None:
        """Wait until no load or refresh is in flight (tests, graceful shutdown)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks))

    async def close(self) -> None:
        """Cancel every load and refresh in flight and drop the cached values."""
        self._closed = True
        tasks = list(self._tasks)
        for entry in list(self._entries.values()):
            entry.cancel()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._entries.clear()

    # -- slow path ------------------------------------------------------------------------

    async def _get_slow(
        self, ref: SecretRef, policy: CachePolicy, entry: _Entry | None
    ) -> CachedSecret:
        if self._closed:
            raise RuntimeError("the credential cache is closed")
        if entry is None:
            if ref.backend not in self._backends:
                raise CredentialUnavailable(
                    ref,
                    "unknown_backend",
                    f"credential {describe_ref(ref)} names no configured secret backend",
                )
            entry = self._new_entry(ref, policy)
        now = self._mono()
        current = entry.current
        if current is not None and now < entry.hard_deadline:
            if entry.task is None and now >= entry.refresh_at:
                entry.policy = policy
                self._start(entry)
            entry.counters.hits += 1
            if current.stale:
                entry.counters.stale_served += 1
            return current
        # Nothing usable: wait for the backend (joining a round in flight), unless backing off.
        entry.counters.misses += 1
        if entry.task is None:
            if entry.failure is not None and now < entry.refresh_at:
                raise self._unavailable(ref, entry.failure)
            entry.policy = policy
            self._start(entry)
        assert entry.task is not None
        outcome = await self._join(entry.task)
        if isinstance(outcome, _Failure):
            raise self._unavailable(ref, outcome)
        return outcome

    def _new_entry(self, ref: SecretRef, policy: CachePolicy) -> _Entry:
        counters = self._counters.get(ref)
        if counters is None:
            counters = self._counters[ref] = _Counters()
        entry = _Entry(ref, policy, counters)
        self._entries[ref] = entry  # may evict (and cancel) the least recently used entry
        return entry

    def _start(self, entry: _Entry) -> None:
        if self._closed:
            raise RuntimeError("the credential cache is closed")
        task = asyncio.get_running_loop().create_task(
            self._refresh(entry), name=f"credential-refresh {describe_ref(entry.ref)}"
        )
        entry.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _join(self, task: asyncio.Task[_Outcome]) -> _Outcome:
        """Await a shared backend round without letting one caller's cancellation stop it."""
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if task.cancelled() and (me is None or not me.cancelling()):
                # The round itself was cancelled (evicted or closed), not this caller.
                return _Failure("evicted", "the credential left the cache while loading")
            raise

    async def _call(self, fn: Callable[[SecretRef], _T], ref: SecretRef) -> _T:
        if self._executor is None:
            return await asyncio.to_thread(fn, ref)
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, ref)

    async def _refresh(self, entry: _Entry) -> _Outcome:
        """One backend round for `entry` (the body of its load/refresh task)."""
        ref = entry.ref
        backend = self._backends[ref.backend]
        counters = entry.counters
        # The round's start is when the value is known good: deadlines count from there.
        started_wall, started_mono = self._clock.now(), self._mono()
        try:
            current = entry.current
            secret: Secret | None = None
            if current is not None and current.secret.expires_at is None:
                counters.version_checks += 1
                version = await self._call(backend.current_version, ref)
                if version is not None:
                    if version == current.secret.version_id:
                        secret = current.secret
                    else:
                        known = entry.versions.get(version)
                        if known is not None:
                            secret = known
            if secret is None:
                counters.backend_reads += 1
                secret = await self._call(backend.read, ref)
        except SecretBackendError as exc:
            return self._failed(entry, exc.condition, exc.message)
        except Exception as exc:  # a backend bug: keep serving, never log its message
            log.warning(
                "secret backend %r raised %s for %s",
                ref.backend,
                type(exc).__name__,
                describe_ref(ref),
            )
            return self._failed(entry, "error", f"backend raised {type(exc).__name__}")
        finally:
            if entry.task is asyncio.current_task():
                entry.task = None
        return self._succeeded(entry, secret, started_wall, started_mono)

    def _succeeded(
        self, entry: _Entry, secret: Secret, started_wall: float, started_mono: float
    ) -> _Outcome:
        """Install the result of a backend round that began at `started_wall`/`started_mono`."""
        ref, policy = entry.ref, entry.policy
        wall = self._clock.now()
        if secret.expires_at is not None and secret.expires_at <= wall:
            return self._failed(entry, "expired", "the backend returned an expired lease")
        remaining = math.inf if secret.expires_at is None else secret.expires_at - started_wall
        old = entry.current
        previous, switched_at = (None, None) if old is None else (old.previous, old.switched_at)
        rotated = old is not None and old.secret.version_id != secret.version_id
        if rotated:
            assert old is not None
            previous, switched_at = old.secret, wall
        if secret.expires_at is None:
            self._remember(entry, secret)
        base = min(policy.refresh_interval, LEASE_REFRESH_FRACTION * remaining)
        interval = base * self._spread(policy.jitter)
        cached = CachedSecret(
            secret=secret,
            loaded_at=started_wall,
            next_refresh_in=interval,
            previous=previous,
            switched_at=switched_at,
        )
        recovered = entry.failures > 0
        entry.current = cached  # the switch: one assignment of a new immutable object
        entry.refresh_at = started_mono + interval
        entry.hard_deadline = started_mono + min(remaining, policy.max_stale)
        entry.due = min(entry.refresh_at, entry.hard_deadline)
        entry.failures = 0
        entry.failure = None
        entry.counters.refreshes += 1
        if rotated:
            assert old is not None
            self._emit(
                CacheEvent(
                    "credential.rotated", ref, old.secret.version_id, secret.version_id, wall
                )
            )
        if recovered:
            served = None if old is None else old.secret.version_id
            self._emit(CacheEvent("credential.recovered", ref, served, secret.version_id, wall))
        return cached

    def _failed(self, entry: _Entry, condition: str, debug: str | None) -> _Failure:
        policy = entry.policy
        failure = _Failure(condition, debug)
        entry.failures += 1
        entry.failure = failure
        entry.counters.refresh_errors += 1
        delay = min(
            self._backoff_base * 2.0 ** min(entry.failures - 1, 60), policy.refresh_interval
        )
        delay *= self._spread(policy.jitter)
        entry.refresh_at = self._mono() + delay
        entry.due = -math.inf  # every get takes the slow path: stale accounting, deadlines
        current = entry.current
        if current is not None and not current.stale:
            entry.current = dataclasses.replace(current, stale=True)
        self._emit(
            CacheEvent(
                "credential.refresh_failed",
                entry.ref,
                None if current is None else current.secret.version_id,
                None,
                self._clock.now(),
                condition=condition,
                failures=entry.failures,
                retry_in=delay,
            )
        )
        return failure

    def _remember(self, entry: _Entry, secret: Secret) -> None:
        versions = entry.versions
        versions.pop(secret.version_id, None)
        versions[secret.version_id] = secret
        while len(versions) > MAX_KNOWN_VERSIONS:
            del versions[next(iter(versions))]

    def _spread(self, jitter: float) -> float:
        return 1.0 + jitter * (2.0 * self._rng.random() - 1.0)

    def _unavailable(self, ref: SecretRef, failure: _Failure) -> CredentialUnavailable:
        return CredentialUnavailable(
            ref,
            failure.condition,
            f"credential {describe_ref(ref)} is unavailable ({failure.condition})",
            debug=failure.debug,
        )

    def _emit(self, event: CacheEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:
            log.exception("credential cache event handler failed on %s", event.kind)

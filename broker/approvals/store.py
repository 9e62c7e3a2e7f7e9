"""Where pending approvals live: the `ApprovalStore` protocol and its in-memory implementation
(one process). `broker.approvals.store_redis` shares them between replicas.

The store is deliberately dumb: it keeps records (as the JSON `ApprovalRecord.to_json` writes),
indexes the pending ones by expiry, and applies a change atomically (`update`). What a change
means (a vote, a redemption, an expiry) is decided by `broker.approvals.service`.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Protocol

from broker.approvals.errors import ApprovalNotFound
from broker.approvals.model import ApprovalRecord, ApprovalState
from broker.clock import Clock

RETAIN_SECONDS = 600.0
"""How long a record is kept after its expiry, so a late poll hears ``expired_token`` (and a
second redemption ``invalid_grant``) rather than nothing."""

MAX_PENDING_LISTED = 500
"""At most this many pending requests are read for an approver's list."""

Change = Callable[[ApprovalRecord], ApprovalRecord]


class ApprovalStore(Protocol):
    async def create(self, record: ApprovalRecord) -> None:
        """Store a new pending record (kept until its expiry plus `RETAIN_SECONDS`)."""
        ...

    async def load(self, approval_id: str) -> ApprovalRecord | None: ...

    async def update(
        self, approval_id: str, change: Change
    ) -> tuple[ApprovalRecord, ApprovalRecord]:
        """Apply `change` to the stored record atomically (no other change interleaves);
        returns (before, after). `change` may raise to leave the record as it was. Raises
        `ApprovalNotFound` when there is no record."""
        ...

    async def poll_allowed(self, approval_id: str, interval: float) -> bool:
        """True when the last poll of `approval_id` was at least `interval` seconds ago (and
        counts this one), False when it came too soon."""
        ...

    async def pending(self, limit: int = MAX_PENDING_LISTED) -> list[ApprovalRecord]:
        """Pending records not yet expired, soonest expiry first."""
        ...

    async def pending_count(self) -> int: ...


def keep_seconds(record: ApprovalRecord, now: float) -> float:
    """How long to keep `record` from `now` (at least a second)."""
    return max(1.0, record.expires_at + RETAIN_SECONDS - now)


class InMemoryApprovalStore:
    """For one process: a dict and a lock. Entries go once their retention has passed."""

    def __init__(self, clock: Clock, *, max_entries: int = 100_000) -> None:
        self._clock = clock
        self._max_entries = max_entries
        self._records: dict[str, tuple[str, float]] = {}  # id -> (json, keep until, wall)
        self._polled: dict[str, float] = {}  # id -> wall time of the last poll
        self._lock = asyncio.Lock()

    def _sweep(self, now: float) -> None:
        for approval_id in [k for k, (_, until) in self._records.items() if until <= now]:
            del self._records[approval_id]
            self._polled.pop(approval_id, None)

    async def create(self, record: ApprovalRecord) -> None:
        now = self._clock.now()
        async with self._lock:
            self._sweep(now)
            if len(self._records) >= self._max_entries:
                from broker.state import StateUnavailable

                raise StateUnavailable("approval store is full")
            self._records[record.id] = (record.to_json(), now + keep_seconds(record, now))

    async def load(self, approval_id: str) -> ApprovalRecord | None:
        entry = self._records.get(approval_id)
        if entry is None or entry[1] <= self._clock.now():
            return None
        return ApprovalRecord.from_json(entry[0])

    async def update(
        self, approval_id: str, change: Change
    ) -> tuple[ApprovalRecord, ApprovalRecord]:
        async with self._lock:
            before = await self.load(approval_id)
            if before is None:
                raise ApprovalNotFound("no such approval request")
            after = change(before)
            now = self._clock.now()
            self._records[approval_id] = (after.to_json(), now + keep_seconds(after, now))
            return before, after

    async def poll_allowed(self, approval_id: str, interval: float) -> bool:
        now = self._clock.now()  # wall time, as the Redis store (shared between replicas)
        last = self._polled.get(approval_id, -math.inf)
        if now - last < interval:
            return False
        self._polled[approval_id] = now
        return True

    async def pending(self, limit: int = MAX_PENDING_LISTED) -> list[ApprovalRecord]:
        now = self._clock.now()
        records = [ApprovalRecord.from_json(raw) for raw, until in self._records.values()]
        open_ = [r for r in records if r.state is ApprovalState.PENDING and r.expires_at > now]
        return sorted(open_, key=lambda r: r.expires_at)[:limit]

    async def pending_count(self) -> int:
        return len(await self.pending(self._max_entries))


def build_approval_store(state: object, clock: Clock) -> ApprovalStore:
    """Approvals live where the rest of the shared state lives: on the state store's Redis
    when it has one (every replica sees them), in this process's memory otherwise."""
    from broker.state_redis import RedisStateStore

    if isinstance(state, RedisStateStore):
        from broker.approvals.store_redis import RedisApprovalStore

        return RedisApprovalStore(state, clock)
    return InMemoryApprovalStore(clock)

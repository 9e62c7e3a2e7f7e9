"""`ApprovalStore` on Redis: a request made at one replica is decided at another and redeemed at
a third. It uses the state store's own client, key prefix and deadline (`RedisStateStore`).

Keys, under the state's ``key_prefix``:

* ``approval:<id>``      -- the record's JSON, expiring `RETAIN_SECONDS` after the request;
* ``approval-poll:<id>`` -- the (wall-clock) time of the last poll, judged by the broker's clock;
* ``approvals:pending``  -- a sorted set of pending ids scored by their (wall-clock) expiry.

`update` is optimistic: WATCH the record, compute the change in Python, MULTI/EXEC; a
concurrent change (another replica's vote) makes EXEC fail and the change is recomputed on the
new record, so two approvers can never both be "the last one" and a record is redeemed once.
"""

from __future__ import annotations

from redis.exceptions import WatchError

from broker.approvals.errors import ApprovalNotFound
from broker.approvals.model import ApprovalRecord, ApprovalState
from broker.approvals.store import MAX_PENDING_LISTED, Change, keep_seconds
from broker.clock import Clock
from broker.state import StateUnavailable
from broker.state_redis import RedisStateStore

_MAX_ATTEMPTS = 32

# KEYS[1]: the poll key; ARGV: now, interval (seconds, as text), TTL in ms. 1 and the time
# kept when the last poll is at least `interval` old (or there was none), else 0.
_POLL = """
local last = tonumber(redis.call('GET', KEYS[1]))
if last and tonumber(ARGV[1]) - last < tonumber(ARGV[2]) then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"""


class RedisApprovalStore:
    def __init__(self, state: RedisStateStore, clock: Clock) -> None:
        self._state = state
        self._redis = state.client
        self._prefix = state.key_prefix
        self._clock = clock
        self._index = f"{self._prefix}approvals:pending"
        self._poll = self._redis.register_script(_POLL)

    def _key(self, approval_id: str) -> str:
        return f"{self._prefix}approval:{approval_id}"

    async def create(self, record: ApprovalRecord) -> None:
        now = self._clock.now()
        async with (
            self._state.guard("approval create"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            pipe.set(self._key(record.id), record.to_json(), px=_ms(keep_seconds(record, now)))
            pipe.zadd(self._index, {record.id: record.expires_at})
            pipe.zremrangebyscore(self._index, "-inf", now)
            await pipe.execute()

    async def load(self, approval_id: str) -> ApprovalRecord | None:
        async with self._state.guard("approval load"):
            raw = await self._redis.get(self._key(approval_id))
        return _parse(raw)

    async def update(
        self, approval_id: str, change: Change
    ) -> tuple[ApprovalRecord, ApprovalRecord]:
        key = self._key(approval_id)
        async with (
            self._state.guard("approval update"),
            self._redis.pipeline(transaction=True) as pipe,
        ):
            for _ in range(_MAX_ATTEMPTS):
                try:
                    await pipe.watch(key)
                    before = _parse(await pipe.get(key))
                    if before is None:
                        raise ApprovalNotFound("no such approval request")
                    after = change(before)  # may raise: the record stays as it was
                    now = self._clock.now()
                    pipe.multi()
                    pipe.set(key, after.to_json(), px=_ms(keep_seconds(after, now)))
                    if after.state is not ApprovalState.PENDING:
                        pipe.zrem(self._index, approval_id)
                    await pipe.execute()
                    return before, after
                except WatchError:
                    continue
                finally:
                    await pipe.reset()
        raise StateUnavailable("approval update kept conflicting; try again")

    async def poll_allowed(self, approval_id: str, interval: float) -> bool:
        args = [repr(self._clock.now()), repr(float(interval)), _ms(interval + 60)]
        async with self._state.guard("approval poll"):
            allowed = await self._poll(
                keys=[f"{self._prefix}approval-poll:{approval_id}"], args=args
            )
        return bool(allowed)

    async def pending(self, limit: int = MAX_PENDING_LISTED) -> list[ApprovalRecord]:
        now = self._clock.now()
        async with self._state.guard("approvals pending"):
            ids = await self._redis.zrangebyscore(
                self._index, f"({now}", "+inf", start=0, num=limit
            )
            if not ids:
                return []
            raws = await self._redis.mget([self._key(i.decode()) for i in ids])
        records = [r for r in map(_parse, raws) if r is not None]
        return [r for r in records if r.state is ApprovalState.PENDING and r.expires_at > now]

    async def pending_count(self) -> int:
        async with self._state.guard("approvals pending"):
            return int(await self._redis.zcount(self._index, f"({self._clock.now()}", "+inf"))


def _parse(raw: bytes | str | None) -> ApprovalRecord | None:
    if raw is None:
        return None
    try:
        return ApprovalRecord.from_json(raw)
    except ValueError:  # fail closed: a record this code cannot read is not used
        raise StateUnavailable("shared state (redis) holds a malformed approval record") from None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))

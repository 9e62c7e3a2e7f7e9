"""`StateStore` on Redis, shared by every broker replica.

One Redis (a primary, optionally behind a managed failover endpoint; not Redis Cluster: some
operations touch several keys in one command or script). Keys, under ``key_prefix``:

* ``once:<key>``      -- single-use records, ``SET NX PX`` (Redis expires them);
* ``revoked:<id>``    -- revoked token ids, alive until the token's own expiry;
* ``nbf:<subject>``   -- "not before" times (a float, as text), only ever raised;
* ``rate:<key>``      -- sliding-window rate limits, a sorted set of event times.

Clocks: revocation lifetimes are wall-clock expiries judged by the broker's injected `Clock`
(the same clock that checks ``exp``), sent to Redis as relative TTLs, so skew between the
broker and the Redis host does not matter. The rate limiter reads the Redis server's ``TIME``
inside its script: one clock for every replica (their monotonic clocks are not comparable).

Failure: every Redis or socket error, and every operation that outlasts its deadline, becomes
`StateUnavailable` (callers fail closed) with a message naming the operation and the error
class, never a key. The connection pool reconnects by itself once Redis is back.

Run Redis with ``maxmemory-policy noeviction`` (or no ``maxmemory``): an evicting policy could
silently drop single-use records and revocations; with ``noeviction`` a full Redis refuses
writes, which surfaces here as `StateUnavailable`.
"""

from __future__ import annotations

import asyncio
import math
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.credentials import CredentialProvider
from redis.exceptions import AuthenticationError, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError

from broker.clock import Clock
from broker.state import RateLimitResult, RevocationStatus, StateUnavailable, require_finite


def _new_epoch() -> str:
    return secrets.token_hex(8)


# KEYS[i]: a revoked-token key; ARGV[i]: its TTL in ms. Creates missing keys, raises the expiry
# of existing ones, never lowers it (a key without expiry is left alone). The last KEYS/ARGV
# pair: the revocation epoch key and its new value, set in the same atomic step, living as long
# as the longest entry (an epoch that expires reads as "": a change, never a return to a value a
# replica may still hold, since entries live far longer than a replica's epoch read interval).
_REVOKE_TOKENS = """
local longest = 1000
for i = 1, #KEYS - 1 do
  local key = KEYS[i]
  local ttl = tonumber(ARGV[i])
  longest = math.max(longest, ttl)
  local current = redis.call('PTTL', key)
  if current == -2 then
    redis.call('SET', key, '1', 'PX', ttl)
  elseif current >= 0 and current < ttl then
    redis.call('PEXPIRE', key, ttl)
  end
end
redis.call('SET', KEYS[#KEYS], ARGV[#KEYS], 'PX', longest)
return #KEYS - 1
"""

# KEYS[1]: a not-before key; ARGV[1]: the not-before time (text); ARGV[2]: TTL in ms.
# KEYS[2], ARGV[3]: the revocation epoch key and its new value, set in the same atomic step.
# Keeps the larger time and the later expiry.
_REVOKE_BEFORE = """
local current_ttl = redis.call('PTTL', KEYS[1])
local ttl = math.max(tonumber(ARGV[2]), current_ttl)
local value = ARGV[1]
local current = redis.call('GET', KEYS[1])
if current and tonumber(current) and tonumber(current) >= tonumber(value) then
  value = current
end
if current_ttl == -1 then
  redis.call('SET', KEYS[1], value, 'KEEPTTL')
elseif ttl > 0 then
  redis.call('SET', KEYS[1], value, 'PX', ttl)
end
redis.call('SET', KEYS[2], ARGV[3], 'PX', math.max(ttl, 1000))
return 1
"""

# KEYS[1]: a rate-limit sorted set; ARGV: limit, window (microseconds), a unique member, and
# optionally '0' to only report (count nothing). Returns {allowed (0/1), remaining, retry_after
# (microseconds)}. Time is the server's TIME.
_RATE_LIMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local limit = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local count = redis.call('ZCARD', KEYS[1])
if count >= limit then
  local retry = window
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if oldest[2] then
    retry = tonumber(oldest[2]) + window - now
  end
  return {0, 0, math.max(retry, 1000)}
end
if ARGV[4] == '0' then
  return {1, limit - count, 0}
end
redis.call('ZADD', KEYS[1], now, ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.ceil(window / 1000))
return {1, limit - count - 1, 0}
"""


class _PasswordProvider(CredentialProvider):
    """Reads the password on every new connection, so a rotated secret file is picked up."""

    def __init__(self, username: str | None, password: Callable[[], str]) -> None:
        self._username = username
        self._password = password

    def _read(self) -> str:
        try:
            return self._password()
        except Exception:
            raise AuthenticationError("cannot read the Redis password") from None

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        password = self._read()
        return (self._username, password) if self._username else (password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


def _without_userinfo(url: str) -> tuple[str, str | None]:
    parts = urlsplit(url)
    username = unquote(parts.username) if parts.username else None
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=host)), username


_MAX_TTL_MS = 10 * 365 * 86400 * 1000  # "forever" (an infinite expiry) is capped at ten years


def _ms(seconds: float) -> int:
    if math.isnan(seconds):
        raise ValueError("durations must be numbers")
    return min(math.ceil(seconds * 1000), _MAX_TTL_MS) if seconds < math.inf else _MAX_TTL_MS


class RedisStateStore:
    """`StateStore` on one Redis server, safe to share between replicas (see the module doc).

    `password`, when given, is called for each new connection (e.g. reading a secret file);
    the URL should then carry no password. Every operation is bounded by
    ``2 * connect_timeout + socket_timeout`` and raises `StateUnavailable` past it.
    """

    def __init__(
        self,
        url: str,
        *,
        clock: Clock,
        key_prefix: str = "broker:",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 50,
        password: Callable[[], str] | None = None,
        ssl_ca_certs: str | None = None,
        health_check_interval: int = 10,
        min_replica_acks: int = 0,
        client: Redis | None = None,
    ) -> None:
        self._clock = clock
        self._prefix = key_prefix
        self._epoch_key = f"{key_prefix}revocation-epoch"
        self._deadline = 2 * connect_timeout + socket_timeout
        self._acks = min_replica_acks
        self._ack_timeout_ms = max(1, int(socket_timeout * 1000))
        if client is not None:  # built by `via_sentinel`
            self._redis = client
            self._scripts()
            return
        options: dict[str, object] = {}
        if password is not None:
            url, username = _without_userinfo(url)
            options["credential_provider"] = _PasswordProvider(username, password)
        if ssl_ca_certs is not None:
            options["ssl_ca_certs"] = ssl_ca_certs
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=self._deadline,  # waiting for a free pooled connection
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            health_check_interval=health_check_interval,
            # One immediate retry on a broken connection (a pooled socket the server closed,
            # e.g. after a restart); never on a timeout, which could run a command twice.
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name="agent-identity-broker",
            **options,
        )
        self._redis = Redis.from_pool(pool)
        self._scripts()

    def _scripts(self) -> None:
        self._revoke_tokens = self._redis.register_script(_REVOKE_TOKENS)
        self._revoke_before = self._redis.register_script(_REVOKE_BEFORE)
        self._rate_limit = self._redis.register_script(_RATE_LIMIT)

    @classmethod
    def via_sentinel(
        cls,
        service_name: str,
        sentinels: list[tuple[str, int]],
        *,
        db: int,
        clock: Clock,
        key_prefix: str = "broker:",
        socket_timeout: float = 0.5,
        connect_timeout: float = 0.5,
        max_connections: int = 50,
        password: Callable[[], str] | None = None,
        sentinel_password: Callable[[], str] | None = None,
        tls: bool = False,
        ssl_ca_certs: str | None = None,
        min_replica_acks: int = 0,
    ) -> RedisStateStore:
        """The primary of `service_name` as the sentinels name it (redis-py's Sentinel
        support): after a failover, the next connection goes to the new primary; requests in
        between fail with `StateUnavailable` (the broker answers 503)."""
        from redis.asyncio.sentinel import Sentinel

        common: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
        }
        if tls:
            common["ssl"] = True
            if ssl_ca_certs is not None:
                common["ssl_ca_certs"] = ssl_ca_certs
        sentinel_kwargs = dict(common)
        if sentinel_password is not None:
            sentinel_kwargs["credential_provider"] = _PasswordProvider(None, sentinel_password)
        primary_kwargs = dict(common)
        if password is not None:
            primary_kwargs["credential_provider"] = _PasswordProvider(None, password)
        sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_kwargs, **primary_kwargs)
        client = sentinel.master_for(
            service_name,
            db=db,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            client_name="agent-identity-broker",
        )
        return cls(
            "redis://sentinel",
            clock=clock,
            key_prefix=key_prefix,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            min_replica_acks=min_replica_acks,
            client=client,
        )

    async def _acknowledged(self, operation: str) -> None:
        """With `min_replica_acks`: the write just made is on that many replicas (Redis WAIT),
        or `StateUnavailable` (it might not survive a failover: the caller refuses)."""
        if not self._acks:
            return
        async with self._guard(operation):
            acked = await self._redis.execute_command("WAIT", self._acks, self._ack_timeout_ms)
        if int(acked) < self._acks:
            raise StateUnavailable(
                f"{operation}: acknowledged by {int(acked)} of {self._acks} replica(s) in time"
            )

    @property
    def client(self) -> Redis:
        """The pooled client, for stores that share this connection (approvals)."""
        return self._redis

    @property
    def key_prefix(self) -> str:
        return self._prefix

    def guard(self, operation: str) -> AbstractAsyncContextManager[None]:
        """`_guard` for stores sharing this client: the same deadline, `StateUnavailable`."""
        return self._guard(operation)

    @asynccontextmanager
    async def _guard(self, operation: str) -> AsyncIterator[None]:
        """Bound `operation` by the deadline and turn every store failure into
        `StateUnavailable` (no key names, no values)."""
        try:
            async with asyncio.timeout(self._deadline):
                yield
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError and socket errors
            raise StateUnavailable(
                f"shared state (redis) unavailable during {operation}: {type(exc).__name__}"
            ) from None

    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        ttl_ms = _ms(max(ttl_seconds, 1.0))
        async with self._guard("use_once"):
            created = await self._redis.set(f"{self._prefix}once:{key}", b"1", nx=True, px=ttl_ms)
        if created:
            await self._acknowledged("use_once")
        return bool(created)

    async def revoke_tokens(self, expiries: Mapping[str, float]) -> None:
        require_finite(expiries.values(), "token expiries")
        now = self._clock.now()
        live = {t: _ms(exp - now) for t, exp in expiries.items() if exp > now}
        if not live:
            return
        keys = [f"{self._prefix}revoked:{t}" for t in live]
        keys.append(self._epoch_key)
        args: list[int | str] = [*live.values(), _new_epoch()]
        async with self._guard("revoke_tokens"):
            await self._revoke_tokens(keys=keys, args=args)
        await self._acknowledged("revoke_tokens")

    async def revoke_before(self, subject: str, not_before: float, ttl_seconds: float) -> None:
        require_finite((not_before, ttl_seconds), "not_before and its lifetime")
        args = [repr(float(not_before)), _ms(ttl_seconds), _new_epoch()]
        keys = [f"{self._prefix}nbf:{subject}", self._epoch_key]
        async with self._guard("revoke_before"):
            await self._revoke_before(keys=keys, args=args)
        await self._acknowledged("revoke_before")

    async def revocation_status(
        self, token_ids: Iterable[str], subjects: Iterable[str]
    ) -> RevocationStatus:
        ids = list(dict.fromkeys(token_ids))
        subs = list(dict.fromkeys(subjects))
        if not ids and not subs:
            return RevocationStatus()
        keys = [f"{self._prefix}revoked:{t}" for t in ids]
        keys += [f"{self._prefix}nbf:{s}" for s in subs]
        async with self._guard("revocation_status"):
            values = await self._redis.mget(keys)  # one command, one round trip
        revoked = frozenset(
            t for t, v in zip(ids, values[: len(ids)], strict=True) if v is not None
        )
        not_before: dict[str, float] = {}
        for subject, value in zip(subs, values[len(ids) :], strict=True):
            if value is None:
                continue
            try:
                parsed = float(value)
            except ValueError:
                parsed = math.nan
            if not math.isfinite(parsed):  # fail closed: never read a NaN as "not revoked"
                raise StateUnavailable("shared state (redis) holds a malformed value")
            not_before[subject] = parsed
        return RevocationStatus(revoked, not_before)

    async def revocation_epoch(self) -> str:
        async with self._guard("revocation_epoch"):
            value = await self._redis.get(self._epoch_key)
        # None: no revocation since the store was empty. A random value per revocation (not a
        # counter) stays unambiguous when a failover loses the last increments.
        if value is None:
            return ""
        return value.decode("ascii", "replace") if isinstance(value, bytes) else str(value)

    async def rate_limit(self, key: str, limit: int, window_seconds: float) -> RateLimitResult:
        return await self._run_rate_limit(key, limit, window_seconds, count=True)

    async def rate_limit_status(
        self, key: str, limit: int, window_seconds: float
    ) -> RateLimitResult:
        return await self._run_rate_limit(key, limit, window_seconds, count=False)

    async def _run_rate_limit(
        self, key: str, limit: int, window_seconds: float, *, count: bool
    ) -> RateLimitResult:
        if not math.isfinite(window_seconds) or window_seconds <= 0:
            raise ValueError("window_seconds must be positive and finite")
        window_us = math.ceil(window_seconds * 1_000_000)
        member = secrets.token_hex(8)
        async with self._guard("rate_limit"):
            allowed, remaining, retry_us = await self._rate_limit(
                keys=[f"{self._prefix}rate:{key}"],
                args=[int(limit), window_us, member, "1" if count else "0"],
            )
        if allowed:
            return RateLimitResult(True, int(remaining), 0.0)
        return RateLimitResult(False, 0, int(retry_us) / 1_000_000)

    async def ping(self) -> None:
        async with self._guard("ping"):
            await self._redis.ping()

    async def close(self) -> None:
        """Close every pooled connection (the store is not used afterwards)."""
        with suppress(RedisError, OSError):
            await self._redis.aclose()

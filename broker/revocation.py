"""Revocation that cascades down delegation chains, shared by every replica through the
`StateStore`.

- Revoking a token revokes everything exchanged from it, however deep: every token carries the
  ``jti`` of all its ancestors (``lineage``), and a token is revoked when it or any ancestor is.
  Entries live until the revoked token's expiry; descendants never outlive their parent, and the
  broker accepts its own tokens only while ``now < exp`` (no leeway), so that is long enough.
- Per-person and per-agent "not before" (everything issued before T), like AWS's session
  revocation by issue time, revokes without listing tokens. Such an entry lives for
  `acceptance_window` after T (after ``max(T, now)``): the longest anything issued before T
  (a broker token, a client assertion, an SSO token, with the largest configured clock leeway)
  can still be accepted.

Checks happen on every use (introspection, credential fetch, exchange, re-exchange); when the
state cannot be reached the caller fails closed. A "not revoked" answer is remembered per
revocation epoch (`StateStore.revocation_epoch`, changed atomically with every revocation): a
replica asks the store for the epoch at most every `recheck_after` seconds, one request at a time,
and looks up a token, person or agent again only when the epoch moved. So a revocation anywhere
holds everywhere within `recheck_after`, while the store sees a few epoch reads a second per
replica instead of a query per token, person or agent.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cachetools import LRUCache

from broker.audit import DecisionLog
from broker.clock import Clock
from broker.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from broker.oauth_request import OAuthForm
from broker.policy.access import require_admin
from broker.state import StateStore, StateUnavailable
from broker.types import BrokerToken
from idp_adapters.base import TokenRejected

if TYPE_CHECKING:
    from broker.client_auth import AuthenticatedClient
    from broker.policy.engine import Policy
    from broker.tokens import BrokerTokenVerifier


class TokenRevoked(Exception):
    """`reason` is a sentence for the caller; `code` says what is revoked: ``token_revoked``
    (a token or its person/agents), ``subject_revoked`` (a person's SSO token from before their
    revocation) or ``agent_revoked`` (the agent asking for a token)."""

    def __init__(self, reason: str, code: str = "token_revoked") -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


ENTRY_MARGIN_SECONDS = 1.0
"""Entries outlive what they revoke by this much (rounding to milliseconds, a store's own
expiry clock)."""


def person_key(person_id: str) -> str:
    return f"person:{person_id}"


def agent_key(agent: str) -> str:
    return f"agent:{agent}"


@dataclass(frozen=True, slots=True)
class RevocationRequest:
    kind: Literal["token", "person", "agent"]
    value: str
    not_before: float | None = None
    expires_at: float | None = None


async def check_not_revoked(
    revocations: Revocations, token: BrokerToken, error: type[OAuthError]
) -> None:
    """`Revocations.check` in the protocol's terms: `error` when revoked, 503 when unknowable."""
    try:
        await revocations.check(token)
    except TokenRevoked as exc:
        raise error(f"token revoked: {exc.reason}", reason="token_revoked") from None
    except StateUnavailable:
        raise TemporarilyUnavailable(
            "revocation state cannot be checked right now; refusing (fail closed)",
            reason="state_unavailable",
            headers={"Retry-After": "1"},
        ) from None


async def check_exchange_allowed(
    revocations: Revocations,
    *,
    person: str,
    subject_time: float | None,
    parent: BrokerToken | None,
    actor: str,
    actor_credential_time: float | None,
) -> None:
    """`Revocations.check_exchange` in the protocol's terms: ``invalid_grant`` for a revoked
    subject, ``unauthorized_client`` for a revoked agent, 503 when unknowable (fail closed)."""
    try:
        await revocations.check_exchange(
            person=person,
            subject_time=subject_time,
            parent=parent,
            actor=actor,
            actor_credential_time=actor_credential_time,
        )
    except TokenRevoked as exc:
        if exc.code == "agent_revoked":
            raise UnauthorizedClient(exc.reason, reason=exc.code) from None
        if exc.code == "subject_revoked":
            raise InvalidGrant(exc.reason, reason=exc.code) from None
        raise InvalidGrant(f"token revoked: {exc.reason}", reason=exc.code) from None
    except StateUnavailable:
        raise TemporarilyUnavailable(
            "revocation state cannot be checked right now; refusing (fail closed)",
            reason="state_unavailable",
            headers={"Retry-After": "1"},
        ) from None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a shared read's failure as seen: its awaiters may all have gone (cancelled)."""
    if not task.cancelled():
        task.exception()


class Revocations:
    """Revocation checks and writes.

    A "not revoked" answer (for a token, or for what an exchange presents) is remembered with
    the revocation epoch read before it was asked; it stands while the epoch, read again at most
    every `recheck_after` seconds (under a second), has not moved. So a revocation made at
    another replica reaches this one within that time, whether this replica has seen the token
    or person before or not, while the shared store sees a few epoch reads a second instead of a
    query per token, person or agent. A revocation made here clears what this process
    remembered, so it holds here at once. "Revoked" and "cannot tell" are never remembered.
    """

    def __init__(
        self,
        state: StateStore,
        clock: Clock,
        decisions: DecisionLog,
        *,
        max_token_lifetime: int,
        acceptance_window: float | None = None,
        recheck_after: float = 0.5,
    ) -> None:
        """`acceptance_window`: the longest, after a time T, that anything issued before T can
        still be accepted (default: `max_token_lifetime`); person and agent entries live that
        long after their not-before."""
        if not 0 <= recheck_after < 1:
            raise ValueError("recheck_after must be under one second")
        self._state = state
        self._clock = clock
        self._decisions = decisions
        self._max_lifetime = max_token_lifetime
        self._window = max(
            acceptance_window if acceptance_window is not None else 0, max_token_lifetime
        )
        self._recheck_after = recheck_after
        # "not revoked" answers -> the epoch they were read under
        self._not_revoked: LRUCache[str, str] = LRUCache(maxsize=10_000)
        self._exchange_clear: LRUCache[tuple[tuple[str, ...], ...], str] = LRUCache(maxsize=10_000)
        self._epoch: str | None = None
        self._epoch_until = -math.inf  # monotonic time until which _epoch may be used
        self._epoch_read: asyncio.Task[str] | None = None

    async def _current_epoch(self) -> str:
        """The store's revocation epoch, as read at most `recheck_after` seconds ago. One
        request at a time reads it; the others await that answer."""
        if self._epoch is not None and self._clock.monotonic() < self._epoch_until:
            return self._epoch
        loop = asyncio.get_running_loop()
        read = self._epoch_read
        if read is None or read.done() or read.get_loop() is not loop:
            read = self._epoch_read = loop.create_task(self._read_epoch())
            read.add_done_callback(_retrieve)
        return await asyncio.shield(read)

    async def _read_epoch(self) -> str:
        asked = self._clock.monotonic()
        epoch = await self._state.revocation_epoch()
        if epoch != self._epoch:
            self._not_revoked.clear()
            self._exchange_clear.clear()
            self._epoch = epoch
        self._epoch_until = asked + self._recheck_after
        return epoch

    async def check(self, token: BrokerToken) -> None:
        """Raise `TokenRevoked` when the token, an ancestor, its person or one of its agents is
        revoked (raises `StateUnavailable` when that cannot be known)."""
        epoch = await self._current_epoch() if self._recheck_after else None
        if epoch is not None and self._not_revoked.get(token.jti) == epoch:
            return
        token_ids = (token.jti, *token.lineage)
        subjects = (person_key(token.subject), *(agent_key(a) for a in token.actor_chain))
        status = await self._state.revocation_status(token_ids, subjects)
        if not status.revoked_ids.isdisjoint(token_ids):
            which = "this token" if token.jti in status.revoked_ids else "a token it derives from"
            raise TokenRevoked(f"{which} has been revoked")
        if status.revokes((), subjects, token.issued_at):
            raise TokenRevoked("tokens of this person or agent issued before a revocation time")
        if epoch is not None:
            self._not_revoked[token.jti] = epoch

    async def check_exchange(
        self,
        *,
        person: str,
        subject_time: float | None,
        parent: BrokerToken | None,
        actor: str,
        actor_credential_time: float | None,
    ) -> None:
        """Everything an exchange presents, in one state round trip. Raise `TokenRevoked` when

        - the parent token (a re-exchange) is revoked, by id, lineage, person or agent;
        - the person's SSO token vouches for a time (sign-in, else issue) before the person's
          not-before, or for no time at all while the person has one (fail closed);
        - the asking agent has a not-before and: it is less than the maximum token lifetime ago
          (every token the agent held before has expired only then: until that moment it gets
          no token, whatever credential it presents), or the credential it presents (client
          assertion, workload token) was issued before it.

        Raises `StateUnavailable` when that cannot be known. A clear answer (no entry for any
        of them) is remembered like `check`'s, per revocation epoch.
        """
        token_ids = (parent.jti, *parent.lineage) if parent is not None else ()
        person_k = person_key(person)
        chain = tuple(agent_key(a) for a in parent.actor_chain) if parent is not None else ()
        actor_k = agent_key(actor)
        subjects = tuple(dict.fromkeys((person_k, *chain, actor_k)))
        remembered = (token_ids, subjects)
        epoch = await self._current_epoch() if self._recheck_after else None
        if epoch is not None and self._exchange_clear.get(remembered) == epoch:
            return
        status = await self._state.revocation_status(token_ids, subjects)
        if parent is not None:
            if not status.revoked_ids.isdisjoint(token_ids):
                which = (
                    "this token" if parent.jti in status.revoked_ids else "a token it derives from"
                )
                raise TokenRevoked(f"{which} has been revoked")
            if status.revokes((), (person_k, *chain), parent.issued_at):
                raise TokenRevoked("tokens of this person or agent issued before a revocation time")
        else:
            person_before = status.not_before.get(person_k)
            if person_before is not None and (subject_time is None or subject_time < person_before):
                raise TokenRevoked(
                    "the subject token predates the person's revocation (its sign-in or issue "
                    "time is before it); the person must sign in again",
                    "subject_revoked",
                )
        agent_before = status.not_before.get(actor_k)
        if agent_before is not None:
            lockout_end = agent_before + self._max_lifetime
            if self._clock.now() < lockout_end:
                raise TokenRevoked(
                    f"agent {actor!r} has been revoked; it gets no token before "
                    f"{int(lockout_end) + 1} (seconds since the epoch)",
                    "agent_revoked",
                )
            if actor_credential_time is not None and actor_credential_time < agent_before:
                raise TokenRevoked(
                    f"the credential agent {actor!r} presented was issued before its revocation",
                    "agent_revoked",
                )
        if epoch is not None and not status.revoked_ids and not status.not_before:
            self._exchange_clear[remembered] = epoch

    def valid_not_before(self, value: float | None) -> float:
        """An admin's not-before, or now. Refused (`InvalidRequest`, before anything changes)
        unless finite, not negative, and at most the maximum token lifetime ahead: a NaN would
        silently lift an earlier revocation, an infinity would outlive every entry."""
        now = self._clock.now()
        if value is None:
            return now
        if not math.isfinite(value) or value < 0:
            raise InvalidRequest(
                "not_before must be a finite, non-negative number of seconds since the epoch",
                reason="invalid_not_before",
            )
        if value > now + self._max_lifetime:
            raise InvalidRequest(
                f"not_before may be at most {self._max_lifetime} seconds (the maximum token "
                "lifetime) in the future",
                reason="invalid_not_before",
            )
        return value

    async def revoke(
        self, request: RevocationRequest, *, by: str, request_id: str
    ) -> dict[str, Any]:
        now = self._clock.now()
        if request.kind == "token":
            expires_at = request.expires_at or now + self._max_lifetime
            await self._state.revoke_tokens({request.value: expires_at + ENTRY_MARGIN_SECONDS})
            result = {"revoked": "token", "jti": request.value, "cascades": True}
        else:
            not_before = self.valid_not_before(request.not_before)
            key = (
                person_key(request.value) if request.kind == "person" else agent_key(request.value)
            )
            # Everything issued before not_before (even a not_before still ahead) can be
            # accepted for up to the window after it, so the entry lives that long.
            ttl = max(not_before - now, 0.0) + self._window + ENTRY_MARGIN_SECONDS
            await self._state.revoke_before(key, not_before, ttl)
            result = {
                "revoked": request.kind,
                request.kind: request.value,
                "issued_before": not_before,
            }
        # After the write: holds in this process at once.
        self._not_revoked.clear()
        self._exchange_clear.clear()
        self._epoch_until = -math.inf
        self._decisions.record(
            "token.revoked",
            outcome="revoked",
            by=by,
            request_id=request_id,
            **{k: v for k, v in result.items() if k != "revoked"},
            target=request.kind,
        )
        return result

    def record_not_revoked(self, reason: str, *, by: str, request_id: str, **fields: Any) -> None:
        """A revocation request that revoked nothing (RFC 7009 answers it 200 all the same)."""
        self._decisions.record(
            "token.revoke",
            outcome="not_revoked",
            reason=reason,
            by=by,
            request_id=request_id,
            **fields,
        )


class RevocationEndpoints:
    """The protocol side of revocation: RFC 7009 for token holders, and the admin API."""

    def __init__(
        self,
        revocations: Revocations,
        verifier: BrokerTokenVerifier,
        policy: Callable[[], Policy],
    ) -> None:
        self._revocations = revocations
        self._verifier = verifier
        self._policy = policy

    async def revoke_presented(
        self, form: OAuthForm, client: AuthenticatedClient | None, *, request_id: str
    ) -> dict[str, Any]:
        """RFC 7009: an agent in the token's chain revokes it (and everything derived from it)."""
        if client is None:
            raise InvalidClient("client authentication is required")
        token = form.non_empty("token")
        if token is None:
            raise InvalidRequest("token is required")
        # The same empty 200 whether the token is garbage, expired, or valid but another
        # client's (which it does not revoke): the answer tells nothing about the token
        # (RFC 7009 §2.2). Both are recorded, with the reason, never the token.
        try:
            presented = await self._verifier.verify(token)
        except TokenRejected as exc:
            self._revocations.record_not_revoked(
                "token_not_valid", by=client.client_id, request_id=request_id, detail=exc.reason
            )
            return {}
        if client.client_id not in presented.actor_chain:
            self._revocations.record_not_revoked(
                "not_token_holder",
                by=client.client_id,
                request_id=request_id,
                jti=presented.jti,
            )
            return {}
        await self._record(
            RevocationRequest("token", presented.jti, expires_at=presented.expires_at),
            client,
            request_id,
        )
        return {}

    async def revoke_by_admin(
        self, form: OAuthForm, client: AuthenticatedClient | None, *, request_id: str
    ) -> dict[str, Any]:
        """Revoke by ``jti`` (and its lineage), or everything of a ``person`` or ``agent``
        issued before ``not_before`` (default: now)."""
        require_admin(self._policy(), client, "revocations:write")
        assert client is not None
        given = [k for k in ("jti", "person", "agent") if form.non_empty(k)]
        if len(given) != 1:
            raise InvalidRequest("give exactly one of jti, person or agent")
        kind = given[0]
        raw_before = form.non_empty("not_before")
        try:
            not_before = float(raw_before) if raw_before is not None else None
        except ValueError:
            raise InvalidRequest(
                "not_before must be seconds since the epoch", reason="invalid_not_before"
            ) from None
        target: Literal["token", "person", "agent"] = "token" if kind == "jti" else kind  # type: ignore[assignment]
        if target == "token":
            if not_before is not None:
                raise InvalidRequest("not_before applies to a person or an agent, not a jti")
        else:
            not_before = self._revocations.valid_not_before(not_before)
        return await self._record(
            RevocationRequest(target, form[kind], not_before=not_before), client, request_id
        )

    async def _record(
        self, request: RevocationRequest, client: AuthenticatedClient, request_id: str
    ) -> dict[str, Any]:
        try:
            return await self._revocations.revoke(
                request, by=client.client_id, request_id=request_id
            )
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "the revocation cannot be recorded right now", reason="state_unavailable"
            ) from None

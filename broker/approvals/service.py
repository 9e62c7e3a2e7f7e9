"""The approvals service: open a request, let eligible people decide it, redeem it once.

Shared by the agent's side (`broker.approvals.ciba`: bc-authorize and the CIBA grant) and the
approver's side (the web page and the JSON API). Who may decide is the pure policy function
`broker.policy.approvals.may_approve`, asked with the requirement as it was when the request
was made (what the approver is shown); a quorum counts distinct people. Every step leaves an
audit record: ``approval.requested``, ``approval.approved``, ``approval.denied``,
``approval.expired``, ``approval.redeemed``, and for ping-mode agents ``approval.pinged``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

import httpx

from broker.approvals.errors import (
    AlreadyDecided,
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalPending,
    NotEligible,
    SlowDown,
)
from broker.approvals.model import ApprovalRecord, ApprovalState, Delivery, ParentRef, Vote
from broker.approvals.store import ApprovalStore
from broker.audit import DecisionLog
from broker.clock import Clock
from broker.policy import Person, Policy
from broker.policy.approvals import ApprovalRequirement, may_approve
from broker.types import Provenance, Sensitive

log = logging.getLogger("broker.approvals")

DEFAULT_INTERVAL_SECONDS = 5
SLOW_DOWN_STEP_SECONDS = 5
"""CIBA §11: on ``slow_down`` the interval grows by at least 5 seconds, for this request."""
MAX_COMMENT_CHARS = 500
PING_ATTEMPTS = 3

Notify = Callable[[ApprovalRecord], None]
"""Told of every new request (the notification channels); must not block."""


class ApprovalService:
    def __init__(
        self,
        store: ApprovalStore,
        *,
        policy: Callable[[], Policy],
        decisions: DecisionLog,
        clock: Clock,
        http: httpx.AsyncClient | None = None,
        notify: Notify | None = None,
        interval_seconds: int = DEFAULT_INTERVAL_SECONDS,
        on_decided: Callable[[ApprovalRecord], None] | None = None,
        on_pending_count: Callable[[int], None] | None = None,
    ) -> None:
        self._store = store
        self._policy = policy
        self._decisions = decisions
        self._clock = clock
        self._http = http
        self._notify = notify
        self._interval = interval_seconds
        self._on_decided = on_decided
        self._on_pending_count = on_pending_count
        self._background: set[asyncio.Task[None]] = set()

    @property
    def store(self) -> ApprovalStore:
        return self._store

    # --- the agent's side -------------------------------------------------------------------

    async def open(
        self,
        *,
        client_id: str,
        person: Person,
        provenance: Provenance,
        agent_chain: tuple[str, ...],
        scopes: tuple[str, ...],
        audiences: tuple[str, ...],
        requirements: tuple[ApprovalRequirement, ...],
        binding_message: str | None,
        authorization_details: list[dict[str, Any]] | None,
        requested_expiry: int | None,
        parent: ParentRef | None,
        policy_version: str,
        delivery: Delivery,
        notification_token: Sensitive | None,
        request_id: str,
        subject_time: float | None = None,
    ) -> tuple[str, ApprovalRecord]:
        """Store a new pending request, record it, tell the rules' channels; returns the
        ``auth_req_id`` for the agent (stored nowhere: the record is filed under its hash,
        `reference`) and the record. Its lifetime is the shortest `request_expiry_seconds` of
        the rules, shortened by `requested_expiry`."""
        if not requirements:
            raise ValueError("nothing needs approval")
        lifetime = min(r.request_expiry_seconds for r in requirements)
        if requested_expiry is not None:
            lifetime = max(1, min(lifetime, requested_expiry))
        now = self._clock.now()
        auth_req_id = secrets.token_urlsafe(32)
        record = ApprovalRecord(
            id=reference(auth_req_id),
            client_id=client_id,
            state=ApprovalState.PENDING,
            created_at=now,
            expires_at=now + lifetime,
            interval=self._interval,
            person=person,
            provenance=provenance,
            agent_chain=agent_chain,
            scopes=scopes,
            audiences=audiences,
            requirements=requirements,
            binding_message=binding_message,
            authorization_details=authorization_details,
            parent=parent,
            policy_version=policy_version,
            delivery=delivery,
            notification_token=notification_token,
            ping_auth_req_id=Sensitive(auth_req_id) if delivery.mode == "ping" else None,
            request_id=request_id,
            subject_time=subject_time,
        )
        await self._store.create(record)
        self._record(record, "approval.requested", "pending", expires_in=lifetime)
        await self._count_pending()
        if self._notify is not None:
            try:
                self._notify(record)
            except Exception as exc:  # a channel never fails the request
                log.error("approval notification failed: %s", type(exc).__name__)
        return auth_req_id, record

    async def poll(
        self,
        auth_req_id: str,
        client_id: str,
        *,
        before_redeeming: Callable[[ApprovalRecord], None] | None = None,
    ) -> ApprovalRecord:
        """The CIBA grant's question. Returns the approved record, atomically marked redeemed
        (a second redemption finds nothing); otherwise raises what the agent is told.
        `before_redeeming` may refuse the redemption (raising) and leave the approval for a
        corrected request (a missing DPoP proof, say)."""
        approval_id = reference(auth_req_id)
        record = await self._store.load(approval_id)
        if record is None or not secrets.compare_digest(record.client_id, client_id):
            raise ApprovalNotFound("unknown auth_req_id")
        if record.state is ApprovalState.REDEEMED:
            raise ApprovalNotFound("unknown auth_req_id")
        if not await self._store.poll_allowed(approval_id, record.interval):
            _, slowed = await self._store.update(
                approval_id,
                lambda r: replace(r, interval=r.interval + SLOW_DOWN_STEP_SECONDS),
            )
            raise SlowDown(slowed.interval)
        now = self._clock.now()
        if record.state is ApprovalState.PENDING and now >= record.expires_at:
            record = await self._expire(approval_id)
        if record.state is ApprovalState.EXPIRED:
            raise ApprovalExpired("the request expired before anyone decided it")
        if record.state is ApprovalState.DENIED:
            raise ApprovalDenied("the request was denied")
        if record.state is ApprovalState.PENDING:
            raise ApprovalPending("nobody has decided yet")
        if before_redeeming is not None:
            before_redeeming(record)

        def redeem(current: ApprovalRecord) -> ApprovalRecord:
            if current.state is not ApprovalState.APPROVED:
                raise ApprovalNotFound("unknown auth_req_id")
            return replace(current, state=ApprovalState.REDEEMED)

        _, redeemed = await self._store.update(approval_id, redeem)
        return redeemed

    def record_redeemed(self, record: ApprovalRecord, jti: str, request_id: str) -> None:
        """The token issued for an approval: links the approval id to the token's `jti`."""
        self._record(record, "approval.redeemed", "granted", jti=jti, redeemed_request=request_id)

    # --- the approver's side ----------------------------------------------------------------

    async def pending_for(self, approver: Person) -> list[ApprovalRecord]:
        """Open requests `approver` may decide and has not decided yet."""
        policy = self._policy()
        return [
            record
            for record in await self._store.pending()
            if not record.voted(approver.person_id)
            and self._eligible_rules(policy, record, approver)[0]
        ]

    async def get_for(self, request_id: str, approver: Person) -> ApprovalRecord:
        record = await self._store.load(request_id)
        if record is None or not record.is_open(self._clock.now()):
            raise ApprovalNotFound("no such open request")
        rules, refusal = self._eligible_rules(self._policy(), record, approver)
        if not rules:
            raise NotEligible(refusal or "not_eligible")
        return record

    async def decide(
        self,
        request_id: str,
        approver: Person,
        *,
        approve: bool,
        comment: str | None,
        via: str,
    ) -> ApprovalRecord:
        """Count `approver`'s decision: a denial decides, the approval a quorum lacked last
        approves. Raises `ApprovalNotFound` (unknown, expired, decided), `NotEligible`,
        `AlreadyDecided`."""
        policy = self._policy()
        now = self._clock.now()
        if comment is not None:
            comment = comment.strip()[:MAX_COMMENT_CHARS] or None

        def vote(current: ApprovalRecord) -> ApprovalRecord:
            if not current.is_open(now):
                raise ApprovalNotFound("no such open request")
            rules, refusal = self._eligible_rules(policy, current, approver)
            if not rules:
                raise NotEligible(refusal or "not_eligible")
            if current.voted(approver.person_id):
                raise AlreadyDecided("you have already decided this request")
            return current.with_vote(
                Vote(approver.person_id, approve, now, comment, via, rules), now
            )

        try:
            before, after = await self._store.update(request_id, vote)
        except NotEligible as refused:
            self._refusal(request_id, approver, refused.reason, via)
            raise
        self._record(
            after,
            "approval.approved" if approve else "approval.denied",
            "approved" if approve else "denied",
            approver=approver.person_id,
            via=via,
            comment=comment,
            decided=after.state is not before.state,
            outstanding=after.outstanding() if after.state is ApprovalState.PENDING else None,
        )
        if after.state in (ApprovalState.APPROVED, ApprovalState.DENIED):
            self._decided(after)
        return after

    # --- internals --------------------------------------------------------------------------

    def _eligible_rules(
        self, policy: Policy, record: ApprovalRecord, approver: Person
    ) -> tuple[tuple[str, ...], str | None]:
        """The rules `approver` may approve for `record`, and the first refusal otherwise."""
        rules: list[str] = []
        refusal: str | None = None
        for requirement in record.requirements:
            reason = may_approve(
                policy,
                requirement,
                approver,
                person=record.person,
                agent_chain=record.agent_chain,
            )
            if reason is None:
                rules.append(requirement.rule)
            elif refusal is None:
                refusal = reason
        return tuple(rules), refusal

    async def _expire(self, approval_id: str) -> ApprovalRecord:
        now = self._clock.now()

        def expire(current: ApprovalRecord) -> ApprovalRecord:
            if current.state is ApprovalState.PENDING and now >= current.expires_at:
                return replace(current, state=ApprovalState.EXPIRED, decided_at=now)
            return current

        before, after = await self._store.update(approval_id, expire)
        if before.state is ApprovalState.PENDING and after.state is ApprovalState.EXPIRED:
            self._record(after, "approval.expired", "expired")
            self._decided(after)
        return after

    async def _count_pending(self) -> None:
        """Tell the metrics how many requests wait (the shared count; never fails a request)."""
        if self._on_pending_count is None:
            return
        try:
            self._on_pending_count(await self._store.pending_count())
        except Exception as exc:
            log.warning("pending approvals could not be counted: %s", type(exc).__name__)

    def _decided(self, record: ApprovalRecord) -> None:
        if self._on_decided is not None:
            self._on_decided(record)
        self._spawn(self._count_pending())
        if record.delivery.mode == "ping" and record.delivery.endpoint and self._http:
            self._spawn(self._ping(record))

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _ping(self, record: ApprovalRecord) -> None:
        """CIBA ping: tell the agent's notification endpoint that its request is decided
        (retried a little; the outcome is recorded, the token never is)."""
        assert self._http is not None and record.delivery.endpoint is not None
        assert record.ping_auth_req_id is not None
        headers = {"Content-Type": "application/json"}
        if record.notification_token is not None:
            headers["Authorization"] = f"Bearer {record.notification_token.reveal()}"
        outcome, attempts = "failed", 0
        for attempts in range(1, PING_ATTEMPTS + 1):
            try:
                response = await self._http.post(
                    record.delivery.endpoint,
                    json={"auth_req_id": record.ping_auth_req_id.reveal()},
                    headers=headers,
                    timeout=5.0,
                )
            except httpx.HTTPError:
                response = None
            if response is not None and response.status_code < 300:
                outcome = "delivered"
                break
            if response is not None and 400 <= response.status_code < 500:
                break
            await asyncio.sleep(0.2 * 2**attempts)
        self._record(record, "approval.pinged", outcome, attempts=attempts)

    async def aclose(self, timeout: float = 5.0) -> None:
        """Let in-flight pings finish (bounded) at shutdown."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)

    def _record(self, record: ApprovalRecord, event: str, outcome: str, **fields: Any) -> None:
        self._decisions.record(
            event,
            outcome=outcome,
            approval_id=record.id,
            client_id=record.client_id,
            person=record.person.person_id,
            agent_chain=list(record.agent_chain),
            rules=list(record.rules),
            permissions=list(record.approval_permissions),
            approvers=list(record.approvers),
            request_id=record.request_id,
            policy_version=record.policy_version,
            **{k: v for k, v in fields.items() if v is not None},
        )

    def _refusal(self, request_id: str, approver: Person, reason: str, via: str) -> None:
        self._decisions.record(
            "approval.refused",
            outcome="denied",
            reason=reason,
            approval_id=request_id[:64],
            approver=approver.person_id,
            via=via,
        )


def reference(auth_req_id: str) -> str:
    """The approval's public id (`ApprovalRecord.id`): a hash of the ``auth_req_id``, which
    only the agent holds. Approvers' pages, notifications and audit records use this; knowing
    it does not let anyone redeem the approval."""
    return "apr_" + hashlib.sha256(auth_req_id.encode()).hexdigest()[:32]

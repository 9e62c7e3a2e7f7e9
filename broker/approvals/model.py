"""Approval requests (OpenID CIBA) as frozen values, and their JSON form in the state store.

A request is opened by an agent at ``/oauth2/bc-authorize`` for what `decide(for_approval=True)`
granted, decided by eligible people (the web page or the JSON API), and redeemed once at the
token endpoint. Every replica reads and writes the same JSON (`to_json` / `from_json`), so a
request made at one replica is decided at another and redeemed at a third.
"""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from broker.policy import Person
from broker.policy.approvals import ApprovalRequirement
from broker.types import Provenance, Sensitive

DeliveryMode = Literal["poll", "ping"]


class ApprovalState(enum.StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    REDEEMED = "redeemed"


FINAL_STATES = frozenset(
    {ApprovalState.APPROVED, ApprovalState.DENIED, ApprovalState.EXPIRED, ApprovalState.REDEEMED}
)


@dataclass(frozen=True, slots=True)
class Vote:
    """One person's decision. `counts_for` are the rules they were eligible for when they
    decided: what their approval counts toward (once per rule, however often they try)."""

    approver: str
    """The approver's person id, ``<idp>/<subject>``."""
    approve: bool
    at: float
    comment: str | None
    via: str
    """Where they decided: ``web`` or ``api``."""
    counts_for: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ParentRef:
    """On a sub-agent's request: the broker token it presented as the subject."""

    jti: str
    actor_chain: tuple[str, ...]
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    expires_at: int
    lineage: tuple[str, ...] = ()
    approved: tuple[str, ...] = ()
    issued_at: int = 0
    """What the parent token's own approval covered (a re-exchange keeps it, narrowed)."""
    jkt: str | None = None
    """The key the parent token is bound to (DPoP): the approved token must be bound too."""


@dataclass(frozen=True, slots=True)
class Delivery:
    """How the agent learns of the decision (CIBA token delivery mode)."""

    mode: DeliveryMode = "poll"
    endpoint: str | None = None
    """Ping mode: the agent's registered client notification endpoint."""


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    """One approval request and where it stands."""

    id: str
    """The public reference: a hash of the agent's ``auth_req_id`` (`service.reference`)."""
    client_id: str
    state: ApprovalState
    created_at: float
    expires_at: float
    interval: int
    """Seconds the agent waits between polls (raised by 5 on every ``slow_down``)."""
    person: Person
    """The person the agents act for, as the policy sees them (`Policy.identity_used`)."""
    provenance: Provenance
    agent_chain: tuple[str, ...]
    """Most recent actor first (the order of `Decision.actor_chain`)."""
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    requirements: tuple[ApprovalRequirement, ...]
    binding_message: str | None = None
    authorization_details: list[dict[str, Any]] | None = None
    """RFC 9396 details, verbatim as the agent sent them."""
    parent: ParentRef | None = None
    policy_version: str = ""
    delivery: Delivery = field(default_factory=Delivery)
    notification_token: Sensitive | None = None
    """Ping mode: the bearer token the agent gave for its notification endpoint."""
    ping_auth_req_id: Sensitive | None = None
    """Ping mode only: the agent's ``auth_req_id``, which the ping must name (CIBA §10.2).
    Poll-mode records keep no trace of it but its hash (`id`)."""
    votes: tuple[Vote, ...] = ()
    decided_at: float | None = None
    request_id: str | None = None
    """The broker request id of the bc-authorize call (for the audit trail)."""
    subject_time: float | None = None
    """When the person's SSO token vouches for (sign-in, else issue): checked again against
    the person's revocation when the approval is redeemed."""

    @property
    def approval_permissions(self) -> tuple[str, ...]:
        """Every permission that needs this approval (in the order of the scopes)."""
        governed = {p for r in self.requirements for p in r.permissions}
        return tuple(p for p in self.scopes if p in governed) or tuple(sorted(governed))

    @property
    def approvers(self) -> tuple[str, ...]:
        """Who approved, in order."""
        return tuple(v.approver for v in self.votes if v.approve)

    @property
    def rules(self) -> tuple[str, ...]:
        return tuple(r.rule for r in self.requirements)

    def voted(self, person_id: str) -> bool:
        return any(v.approver == person_id for v in self.votes)

    def time_left(self, now: float) -> int:
        return max(0, math.floor(self.expires_at - now))

    def is_open(self, now: float) -> bool:
        """Pending and not yet expired: it can still be decided."""
        return self.state is ApprovalState.PENDING and now < self.expires_at

    def outstanding(self) -> dict[str, int]:
        """Rule -> how many more distinct approvals it needs (empty: every quorum is met)."""
        missing: dict[str, int] = {}
        for requirement in self.requirements:
            count = len(
                {v.approver for v in self.votes if v.approve and requirement.rule in v.counts_for}
            )
            if count < requirement.quorum:
                missing[requirement.rule] = requirement.quorum - count
        return missing

    def with_vote(self, vote: Vote, now: float) -> ApprovalRecord:
        """This record with `vote` counted: a denial decides; the last approval a quorum
        needed approves."""
        record = replace(self, votes=(*self.votes, vote))
        if not vote.approve:
            return replace(record, state=ApprovalState.DENIED, decided_at=now)
        if not record.outstanding():
            return replace(record, state=ApprovalState.APPROVED, decided_at=now)
        return record

    # --- JSON in the state store -----------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps(
            {
                "v": 1,
                "id": self.id,
                "client_id": self.client_id,
                "state": str(self.state),
                "created_at": self.created_at,
                "expires_at": self.expires_at,
                "interval": self.interval,
                "person": {
                    "idp": self.person.idp,
                    "subject": self.person.subject,
                    "groups": sorted(self.person.groups),
                    "idp_roles": sorted(self.person.idp_roles),
                },
                "provenance": self.provenance.to_claim(),
                "agent_chain": list(self.agent_chain),
                "scopes": list(self.scopes),
                "audiences": list(self.audiences),
                "requirements": [_requirement_json(r) for r in self.requirements],
                "binding_message": self.binding_message,
                "authorization_details": self.authorization_details,
                "parent": None
                if self.parent is None
                else {
                    "jti": self.parent.jti,
                    "actor_chain": list(self.parent.actor_chain),
                    "scopes": list(self.parent.scopes),
                    "audiences": list(self.parent.audiences),
                    "expires_at": self.parent.expires_at,
                    "lineage": list(self.parent.lineage),
                    "approved": list(self.parent.approved),
                    "issued_at": self.parent.issued_at,
                    "jkt": self.parent.jkt,
                },
                "policy_version": self.policy_version,
                "delivery": {"mode": self.delivery.mode, "endpoint": self.delivery.endpoint},
                "notification_token": self.notification_token.reveal()
                if self.notification_token
                else None,
                "ping_auth_req_id": self.ping_auth_req_id.reveal()
                if self.ping_auth_req_id
                else None,
                "votes": [
                    {
                        "approver": v.approver,
                        "approve": v.approve,
                        "at": v.at,
                        "comment": v.comment,
                        "via": v.via,
                        "counts_for": list(v.counts_for),
                    }
                    for v in self.votes
                ],
                "decided_at": self.decided_at,
                "request_id": self.request_id,
                "subject_time": self.subject_time,
            },
            separators=(",", ":"),
            allow_nan=False,
        )

    @classmethod
    def from_json(cls, raw: str | bytes) -> ApprovalRecord:
        """Raises ValueError for anything that is not a record this code wrote."""
        try:
            data = json.loads(raw)
            person = data["person"]
            parent = data["parent"]
            delivery = data["delivery"]
            token = data["notification_token"]
            return cls(
                id=str(data["id"]),
                client_id=str(data["client_id"]),
                state=ApprovalState(data["state"]),
                created_at=float(data["created_at"]),
                expires_at=float(data["expires_at"]),
                interval=int(data["interval"]),
                person=Person(
                    str(person["idp"]),
                    str(person["subject"]),
                    frozenset(map(str, person["groups"])),
                    frozenset(map(str, person["idp_roles"])),
                ),
                provenance=Provenance.from_claim(data["provenance"]),
                agent_chain=tuple(map(str, data["agent_chain"])),
                scopes=tuple(map(str, data["scopes"])),
                audiences=tuple(map(str, data["audiences"])),
                requirements=tuple(_requirement_from(r) for r in data["requirements"]),
                binding_message=data["binding_message"],
                authorization_details=data["authorization_details"],
                parent=None
                if parent is None
                else ParentRef(
                    jti=str(parent["jti"]),
                    actor_chain=tuple(map(str, parent["actor_chain"])),
                    scopes=tuple(map(str, parent["scopes"])),
                    audiences=tuple(map(str, parent["audiences"])),
                    expires_at=int(parent["expires_at"]),
                    lineage=tuple(map(str, parent["lineage"])),
                    approved=tuple(map(str, parent["approved"])),
                    issued_at=int(parent.get("issued_at", 0)),
                    jkt=str(parent["jkt"]) if parent.get("jkt") is not None else None,
                ),
                policy_version=str(data["policy_version"]),
                delivery=Delivery(delivery["mode"], delivery["endpoint"]),
                notification_token=Sensitive(token) if isinstance(token, str) else None,
                ping_auth_req_id=Sensitive(data["ping_auth_req_id"])
                if isinstance(data.get("ping_auth_req_id"), str)
                else None,
                votes=tuple(
                    Vote(
                        approver=str(v["approver"]),
                        approve=bool(v["approve"]),
                        at=float(v["at"]),
                        comment=v["comment"],
                        via=str(v["via"]),
                        counts_for=tuple(map(str, v["counts_for"])),
                    )
                    for v in data["votes"]
                ),
                decided_at=None if data["decided_at"] is None else float(data["decided_at"]),
                request_id=data.get("request_id"),
                subject_time=None
                if data.get("subject_time") is None
                else float(data["subject_time"]),
            )
        except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"not an approval record: {type(exc).__name__}") from None


def _requirement_json(requirement: ApprovalRequirement) -> dict[str, Any]:
    return {
        "rule": requirement.rule,
        "permissions": list(requirement.permissions),
        "consent": requirement.consent,
        "approvers": list(requirement.approvers),
        "quorum": requirement.quorum,
        "request_expiry_seconds": requirement.request_expiry_seconds,
        "token_lifetime_seconds": requirement.token_lifetime_seconds,
        "channels": list(requirement.channels),
    }


def _requirement_from(data: dict[str, Any]) -> ApprovalRequirement:
    lifetime = data["token_lifetime_seconds"]
    return ApprovalRequirement(
        rule=str(data["rule"]),
        permissions=tuple(map(str, data["permissions"])),
        consent=bool(data["consent"]),
        approvers=tuple(map(str, data["approvers"])),
        quorum=int(data["quorum"]),
        request_expiry_seconds=int(data["request_expiry_seconds"]),
        token_lifetime_seconds=None if lifetime is None else int(lifetime),
        channels=tuple(map(str, data["channels"])),
    )

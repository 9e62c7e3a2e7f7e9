"""What approvers are told when a request waits for them: the person, the agents, what is asked
and why, and the link to the page where they decide. Never a token; the ``auth_req_id`` is not
in it either (the page is addressed by the request's public reference)."""

from __future__ import annotations

from broker.approvals.model import ApprovalRecord
from broker.notify.base import Notification


def approval_requested(
    record: ApprovalRecord, page_base: str, recipients: tuple[str, ...] = ()
) -> Notification:
    chain = " → ".join(reversed(record.agent_chain))
    permissions = ", ".join(record.approval_permissions)
    fields: list[tuple[str, str]] = [
        ("Person", record.person.person_id),
        ("Agents", chain),
        ("Needs approval", permissions),
        ("Scope", " ".join(record.scopes)),
    ]
    if record.audiences:
        fields.append(("Audience", ", ".join(record.audiences)))
    if record.binding_message:
        fields.append(("Message", record.binding_message))
    for detail in record.authorization_details or ():
        fields.append(("Details", ", ".join(f"{k}: {v}" for k, v in detail.items())[:300]))
    minutes = max(1, round((record.expires_at - record.created_at) / 60))
    return Notification(
        event="approval.requested",
        title=f"Approval needed: {permissions} for {record.person.person_id}",
        text=(
            f"{chain} asks to use {permissions} for {record.person.person_id}. "
            f"Decide within {minutes} min."
        ),
        url=f"{page_base.rstrip('/')}/approvals/{record.id}",
        fields=tuple(fields),
        idempotency_key=f"approval.requested:{record.id}",
        recipients=recipients,
    )


def channels_of(record: ApprovalRecord) -> tuple[str, ...]:
    return tuple(dict.fromkeys(c for r in record.requirements for c in r.channels))

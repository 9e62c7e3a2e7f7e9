"""Escalation to a human: approval requests (OpenID CIBA), who may decide them, and where they
live. The public API is re-exported here."""

from broker.approvals.errors import (
    AlreadyDecided,
    ApprovalDenied,
    ApprovalError,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalPending,
    NotEligible,
    SlowDown,
)
from broker.approvals.model import ApprovalRecord, ApprovalState, Delivery, ParentRef, Vote
from broker.approvals.service import ApprovalService, reference
from broker.approvals.store import ApprovalStore, InMemoryApprovalStore

__all__ = [
    "AlreadyDecided",
    "ApprovalDenied",
    "ApprovalError",
    "ApprovalExpired",
    "ApprovalNotFound",
    "ApprovalPending",
    "ApprovalRecord",
    "ApprovalService",
    "ApprovalState",
    "ApprovalStore",
    "Delivery",
    "InMemoryApprovalStore",
    "NotEligible",
    "ParentRef",
    "SlowDown",
    "Vote",
    "reference",
]

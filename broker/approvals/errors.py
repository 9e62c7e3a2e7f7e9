"""What the approvals service raises; the HTTP edges translate these into their protocol's terms
(CIBA error codes at the token endpoint, a neutral page or JSON error for approvers)."""

from __future__ import annotations


class ApprovalError(Exception):
    """Base of every approvals error. The message is safe to show (no tokens)."""


class ApprovalNotFound(ApprovalError):
    """Unknown, another client's, already decided or redeemed, or no longer open: one answer,
    so nobody learns which."""


class NotEligible(ApprovalError):
    """The approver may not decide this request; `reason` is a `Refusal` code
    (``not_eligible``, ``self_approval``, ``in_agent_chain``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"you may not decide this request ({reason})")
        self.reason = reason


class AlreadyDecided(ApprovalError):
    """This approver has already decided this request (an approver counts once)."""


class ApprovalPending(ApprovalError):
    """CIBA ``authorization_pending``: nobody has decided yet."""


class SlowDown(ApprovalError):
    """CIBA ``slow_down``: polled sooner than the interval; `interval` is the new one."""

    def __init__(self, interval: int) -> None:
        super().__init__(f"polling too fast; wait {interval} s between polls")
        self.interval = interval


class ApprovalDenied(ApprovalError):
    """CIBA ``access_denied``: an eligible approver denied the request."""


class ApprovalExpired(ApprovalError):
    """CIBA ``expired_token``: nobody decided before the request expired."""

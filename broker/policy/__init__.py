"""Policy as files: schema, loading, the pure decision, explanations and policy tests."""

from broker.policy.approvals import (
    ApprovalRequirement,
    approval_requirements,
    may_approve,
    quorum_met,
)
from broker.policy.engine import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    Reason,
    ScopeVerdict,
    Standing,
    decide,
    explain,
    standing,
)
from broker.policy.loader import LoadedPolicy, PolicyError, load_policy, load_policy_tests
from broker.policy.testing import PolicyTestResult, decide_chain, run_policy_tests

__all__ = [
    "ApprovalRequirement",
    "Decision",
    "ExchangeRequest",
    "LoadedPolicy",
    "ParentGrant",
    "Person",
    "Policy",
    "PolicyError",
    "PolicyTestResult",
    "Reason",
    "ScopeVerdict",
    "Standing",
    "approval_requirements",
    "decide",
    "decide_chain",
    "explain",
    "load_policy",
    "load_policy_tests",
    "may_approve",
    "quorum_met",
    "run_policy_tests",
    "standing",
]

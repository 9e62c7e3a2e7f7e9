"""Policy tests the security team writes beside the policy, run by `broker policy test`.

A test names a person (``<idp>/<subject>`` and groups), a delegation chain of agents (first agent
first) and the scopes requested; every hop of the chain requests the same scopes and audiences,
each hop re-exchanging the previous hop's grant exactly as the token endpoint would.
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.policy.engine import Decision, ExchangeRequest, ParentGrant, Person, Policy, decide
from broker.policy.model import PolicyTestCase
from broker.types import normalise_groups


@dataclass(frozen=True, slots=True)
class PolicyTestResult:
    file: str
    case: PolicyTestCase
    passed: bool
    detail: str


def decide_chain(
    policy: Policy,
    person: Person,
    agents: list[str],
    scopes: tuple[str, ...] | None,
    audiences: tuple[str, ...] = (),
) -> Decision:
    """Run `decide` along a delegation chain; returns the first denial or the last grant."""
    parent: ParentGrant | None = None
    decision: Decision | None = None
    for agent in agents:
        decision = decide(
            policy,
            ExchangeRequest(
                person=person, agent=agent, scopes=scopes, audiences=audiences, parent=parent
            ),
        )
        if not decision.allowed:
            return decision
        parent = ParentGrant(
            actor_chain=decision.actor_chain,
            scopes=frozenset(decision.scopes),
            audiences=decision.audiences,
        )
    assert decision is not None
    return decision


def run_case(policy: Policy, file: str, case: PolicyTestCase) -> PolicyTestResult:
    idp, _, subject = case.person.partition("/")
    decision = decide_chain(
        policy,
        Person(
            idp=idp,
            subject=subject,
            groups=normalise_groups(case.groups),
            idp_roles=frozenset(case.idp_roles),
        ),
        list(case.agents),
        tuple(case.scope) if case.scope is not None else None,
        tuple(case.audience),
    )
    if case.expect_granted is not None:
        if not decision.allowed:
            detail = (
                f"expected grant of {case.expect_granted}, "
                f"got {decision.error}: {decision.description}"
            )
            return PolicyTestResult(file, case, False, detail)
        if sorted(decision.scopes) != sorted(case.expect_granted):
            detail = f"expected {sorted(case.expect_granted)}, granted {sorted(decision.scopes)}"
            return PolicyTestResult(file, case, False, detail)
        return PolicyTestResult(file, case, True, "granted " + " ".join(decision.scopes))
    if decision.allowed:
        detail = f"expected {case.expect_error}, but granted {' '.join(decision.scopes)}"
        return PolicyTestResult(file, case, False, detail)
    if decision.error != case.expect_error:
        detail = f"expected {case.expect_error}, got {decision.error}: {decision.description}"
        return PolicyTestResult(file, case, False, detail)
    all_reasons = {str(r) for r in decision.reasons} | {
        str(r) for v in decision.scope_verdicts for r in v.reasons
    }
    if case.expect_reason is not None and case.expect_reason not in all_reasons:
        detail = f"expected reason {case.expect_reason}, got {sorted(all_reasons)}"
        return PolicyTestResult(file, case, False, detail)
    return PolicyTestResult(file, case, True, f"denied {decision.error}: {decision.reason}")


def run_policy_tests(
    policy: Policy, cases: list[tuple[str, PolicyTestCase]]
) -> list[PolicyTestResult]:
    return [run_case(policy, file, case) for file, case in cases]

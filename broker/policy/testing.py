"""Policy tests the security team writes beside the policy, run by `broker policy test`.

An exchange test names a person (``<idp>/<subject>`` and groups), a delegation chain of agents
(first agent first) and the scopes requested; every hop of the chain requests the same scopes and
audiences, each hop re-exchanging the previous hop's grant exactly as the token endpoint would.

A ``fetch`` test names a gateway, a credential and the shape of the agent token presented
(person, groups, chain, scopes, audiences); an ``introspection`` test a client and the token's
audiences; an ``admin`` test an admin client and a permission. They run the very functions the
broker runs (`broker.policy.access`) and expect ``allowed`` or ``denied`` (with a reason).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.policy.access import (
    AccessDecision,
    FetchRequest,
    decide_admin,
    decide_fetch,
    decide_introspection,
)
from broker.policy.engine import Decision, ExchangeRequest, ParentGrant, Person, Policy, decide
from broker.policy.model import (
    AdminTestCase,
    AnyPolicyTestCase,
    FetchTestCase,
    IntrospectionTestCase,
    PolicyTestCase,
)
from broker.types import normalise_groups


@dataclass(frozen=True, slots=True)
class PolicyTestResult:
    file: str
    case: AnyPolicyTestCase
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


def named_person(person: str, groups: list[str], idp_roles: list[str]) -> Person:
    """The `Person` a test (or `broker policy explain`) names as ``<idp>/<subject>``."""
    idp, _, subject = person.partition("/")
    return Person(
        idp=idp,
        subject=subject,
        groups=normalise_groups(groups),
        idp_roles=frozenset(idp_roles),
    )


def fetch_request(case: FetchTestCase) -> FetchRequest:
    return FetchRequest(
        gateway=case.gateway,
        credential=case.credential,
        person=named_person(case.person, case.groups, case.idp_roles),
        actor_chain=tuple(reversed(case.agents)),  # most recent agent first, as in `act`
        scopes=frozenset(case.scope),
        audiences=tuple(case.audience),
        previous=case.version == "previous",
    )


def access_decision(
    policy: Policy, case: FetchTestCase | IntrospectionTestCase | AdminTestCase
) -> AccessDecision:
    """The broker's decision for a fetch, introspection or admin test case."""
    if isinstance(case, FetchTestCase):
        return decide_fetch(policy, fetch_request(case))
    if isinstance(case, IntrospectionTestCase):
        return decide_introspection(policy, case.client, tuple(case.audience))
    return decide_admin(policy, case.admin, case.permission, case.credential)


def _judge_access(
    file: str,
    case: FetchTestCase | IntrospectionTestCase | AdminTestCase,
    decision: AccessDecision,
) -> PolicyTestResult:
    got = "allowed" if decision.allowed else f"denied {decision.error}: {decision.reason}"
    if case.expect == "allowed":
        if decision.allowed:
            return PolicyTestResult(file, case, True, "allowed")
        return PolicyTestResult(
            file, case, False, f"expected allowed, got {got} ({decision.description})"
        )
    if decision.allowed:
        return PolicyTestResult(file, case, False, "expected denied, but allowed")
    reasons = {str(decision.reason)} | ({decision.detail} if decision.detail else set())
    if case.expect_reason is not None and case.expect_reason not in reasons:
        detail = f"expected reason {case.expect_reason}, got {sorted(reasons)}"
        return PolicyTestResult(file, case, False, detail)
    return PolicyTestResult(file, case, True, got)


def run_case(policy: Policy, file: str, case: AnyPolicyTestCase) -> PolicyTestResult:
    if not isinstance(case, PolicyTestCase):
        return _judge_access(file, case, access_decision(policy, case))
    decision = decide_chain(
        policy,
        named_person(case.person, case.groups, case.idp_roles),
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
    policy: Policy, cases: list[tuple[str, AnyPolicyTestCase]]
) -> list[PolicyTestResult]:
    return [run_case(policy, file, case) for file, case in cases]

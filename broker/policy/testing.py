"""Policy tests the security team writes beside the policy, run by `broker policy test`.

An exchange test names a person (``<idp>/<subject>`` and groups), a delegation chain of agents
(first agent first) and the scopes requested; every hop of the chain requests the same scopes and
audiences, each hop re-exchanging the previous hop's grant exactly as the token endpoint would.

A ``fetch`` test names a gateway, a credential and the shape of the agent token presented
(person, groups, chain, scopes, audiences); an ``introspection`` test a client and the token's
audiences; an ``admin`` test an admin client and a permission. They run the very functions the
broker runs (`broker.policy.access`) and expect ``allowed`` or ``denied`` (with a reason).

An ``id_jag`` test names an ID-JAG request (person, chain, scopes, an authorization server of
the policy by name and one of its resources) and expects the ID-JAG's scopes or a denial, as
`broker.policy.id_jag.decide_id_jag` decides at the token exchange.

An ``approval`` test names a request for approval (person, chain, scopes, as for an exchange)
and an approver (with their own groups and IdP roles) and expects them ``eligible`` to approve
it or ``refused`` (with a reason), as the approvals service decides (`broker.policy.approvals`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.policy.access import (
    AccessDecision,
    AccessReason,
    FetchRequest,
    decide_admin,
    decide_fetch,
    decide_introspection,
)
from broker.policy.approvals import may_approve
from broker.policy.engine import Decision, ExchangeRequest, ParentGrant, Person, Policy, decide
from broker.policy.id_jag import IdJagDecision, decide_id_jag
from broker.policy.model import (
    AdminTestCase,
    AnyPolicyTestCase,
    ApprovalTestCase,
    FetchTestCase,
    IdJagTestCase,
    IntrospectionTestCase,
    PolicyTestCase,
)
from broker.types import normalise_groups

if TYPE_CHECKING:
    from broker.usage.budgets import BudgetVerdict


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
    *,
    approved: frozenset[str] = frozenset(),
    for_approval: bool = False,
) -> Decision:
    """Run `decide` along a delegation chain; returns the first denial or the last grant.
    `approved` is what an approval covers at every hop (a token's approval carries down the
    chain); with `for_approval` every hop decides a request for approval."""
    parent: ParentGrant | None = None
    decision: Decision | None = None
    for agent in agents:
        decision = decide(
            policy,
            ExchangeRequest(
                person=person,
                agent=agent,
                scopes=scopes,
                audiences=audiences,
                parent=parent,
                approved=approved,
                for_approval=for_approval,
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
        approved=frozenset(case.approved),
    )


def fetch_budgets(policy: Policy, case: FetchTestCase) -> BudgetVerdict:
    """The budgets' answer for a fetch test's token, given its `spent`."""
    from broker.usage.budgets import Attribution, applicable, check_budgets

    person = named_person(case.person, case.groups, case.idp_roles)
    invoked = case.agents[0]
    who = Attribution(
        person=person.person_id,
        agent=invoked,
        cost_centre=policy.cost_centre_of(invoked, person.idp, person.groups),
        credential=case.credential,
    )
    return check_budgets(applicable(policy, who), case.spent, "this period")


def access_decision(
    policy: Policy, case: FetchTestCase | IntrospectionTestCase | AdminTestCase
) -> AccessDecision:
    """The broker's decision for a fetch, introspection or admin test case."""
    if isinstance(case, FetchTestCase):
        decision = decide_fetch(policy, fetch_request(case))
        if decision.allowed:
            verdict = fetch_budgets(policy, case)
            if not verdict.allowed:
                return AccessDecision(
                    False,
                    AccessReason.BUDGET_EXCEEDED,
                    verdict.description,
                    decision.policy_version,
                )
        return decision
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


def approval_verdicts(policy: Policy, case: ApprovalTestCase) -> tuple[Decision, dict[str, str]]:
    """The request for approval's decision, and for each rule it needs: None-or-refusal of the
    approver, as ``{rule: "eligible" | refusal code}``."""
    person = named_person(case.person, case.groups, case.idp_roles)
    decision = decide_chain(
        policy,
        person,
        list(case.agents),
        tuple(case.scope) if case.scope is not None else None,
        tuple(case.audience),
        for_approval=True,
    )
    approver = named_person(case.approver, case.approver_groups, case.approver_idp_roles)
    verdicts = {
        requirement.rule: may_approve(
            policy, requirement, approver, person=person, agent_chain=decision.actor_chain
        )
        or "eligible"
        for requirement in decision.approvals
    }
    return decision, verdicts


def _judge_approval(policy: Policy, file: str, case: ApprovalTestCase) -> PolicyTestResult:
    decision, verdicts = approval_verdicts(policy, case)
    if not decision.allowed:
        detail = f"the request is refused: {decision.error}: {decision.description}"
        return PolicyTestResult(file, case, False, detail)
    if not verdicts:
        return PolicyTestResult(file, case, False, "nothing in this request needs approval")
    eligible = sorted(rule for rule, verdict in verdicts.items() if verdict == "eligible")
    got = ", ".join(f"{rule}: {verdict}" for rule, verdict in verdicts.items())
    if case.expect == "eligible":
        if not eligible:
            return PolicyTestResult(file, case, False, f"expected eligible, got {got}")
        if case.expect_rules is not None and sorted(case.expect_rules) != eligible:
            detail = f"expected eligible for {sorted(case.expect_rules)}, got {got}"
            return PolicyTestResult(file, case, False, detail)
        return PolicyTestResult(file, case, True, got)
    if eligible:
        return PolicyTestResult(file, case, False, f"expected refused, got {got}")
    if case.expect_reason is not None and case.expect_reason not in verdicts.values():
        detail = f"expected refusal {case.expect_reason}, got {got}"
        return PolicyTestResult(file, case, False, detail)
    return PolicyTestResult(file, case, True, got)


SELF_ISSUER = "self"
"""What a policy test uses as this broker's issuer (``issuer: self`` servers)."""


def id_jag_verdict(
    policy: Policy,
    person: Person,
    agents: list[str],
    scopes: tuple[str, ...] | None,
    authorization_server: str,
    resource: str,
) -> IdJagDecision:
    """The ID-JAG decision for a named authorization server: the chain's earlier hops exchange
    for the resource, the last agent asks for the ID-JAG."""
    server = policy.authorization_servers.get(authorization_server)
    audience = server.issuer if server is not None else authorization_server
    parent: ParentGrant | None = None
    if len(agents) > 1:
        hops = decide_chain(policy, person, list(agents[:-1]), scopes, (resource,))
        if not hops.allowed:
            return IdJagDecision(False, hops.error, str(hops.reason), hops.description)
        parent = ParentGrant(hops.actor_chain, frozenset(hops.scopes), hops.audiences)
    return decide_id_jag(
        policy,
        ExchangeRequest(
            person=person, agent=agents[-1], scopes=scopes, audiences=(), parent=parent
        ),
        audience=audience,
        resource=resource,
        own_issuer=SELF_ISSUER,
    )


def _judge_id_jag(policy: Policy, file: str, case: IdJagTestCase) -> PolicyTestResult:
    verdict = id_jag_verdict(
        policy,
        named_person(case.person, case.groups, case.idp_roles),
        list(case.agents),
        tuple(case.scope) if case.scope is not None else None,
        case.authorization_server,
        case.resource,
    )
    granted = verdict.decision.scopes if verdict.allowed and verdict.decision else ()
    if case.expect_granted is not None:
        if not verdict.allowed:
            detail = (
                f"expected an ID-JAG for {case.expect_granted}, "
                f"got {verdict.error}: {verdict.description}"
            )
            return PolicyTestResult(file, case, False, detail)
        if sorted(granted) != sorted(case.expect_granted):
            detail = f"expected {sorted(case.expect_granted)}, granted {sorted(granted)}"
            return PolicyTestResult(file, case, False, detail)
        return PolicyTestResult(file, case, True, "ID-JAG for " + " ".join(granted))
    if verdict.allowed:
        detail = f"expected {case.expect_error}, but granted {' '.join(granted)}"
        return PolicyTestResult(file, case, False, detail)
    if verdict.error != case.expect_error:
        detail = f"expected {case.expect_error}, got {verdict.error}: {verdict.description}"
        return PolicyTestResult(file, case, False, detail)
    reasons = {verdict.reason}
    if verdict.decision is not None:
        reasons |= {str(r) for r in verdict.decision.reasons} | {
            str(r) for v in verdict.decision.scope_verdicts for r in v.reasons
        }
    if case.expect_reason is not None and case.expect_reason not in reasons:
        detail = f"expected reason {case.expect_reason}, got {sorted(reasons)}"
        return PolicyTestResult(file, case, False, detail)
    return PolicyTestResult(file, case, True, f"denied {verdict.error}: {verdict.reason}")


def run_case(policy: Policy, file: str, case: AnyPolicyTestCase) -> PolicyTestResult:
    if isinstance(case, ApprovalTestCase):
        return _judge_approval(policy, file, case)
    if isinstance(case, IdJagTestCase):
        return _judge_id_jag(policy, file, case)
    if not isinstance(case, PolicyTestCase):
        return _judge_access(file, case, access_decision(policy, case))
    decision = decide_chain(
        policy,
        named_person(case.person, case.groups, case.idp_roles),
        list(case.agents),
        tuple(case.scope) if case.scope is not None else None,
        tuple(case.audience),
        approved=frozenset(case.approved),
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

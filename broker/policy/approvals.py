"""Approval rules: which granted permissions need a person's approval, and who may give it.

Pure: no I/O, no clock. `decide` asks `approval_requirements` which of the permissions it is
about to grant an applicable rule governs; the approvals service (OpenID CIBA) asks
`may_approve` whether a signed-in approver may decide a request and `quorum_met` whether enough
distinct eligible approvers have approved.

Separation of duties, by construction:

- nobody whose subject is an agent of the delegation chain approves (``in_agent_chain``);
- the person the agents act for approves only a consent rule (approvers include ``person``),
  even if a selector of the rule also names them (``self_approval``);
- anyone else approves only when one of the rule's selectors names them (``not_eligible``);
- an approver counts once toward a quorum, however often they approve.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.policy.permissions import PermissionSet
from broker.policy.selectors import Selectors, compile_selectors

if TYPE_CHECKING:
    from broker.policy.engine import Person, Policy

CONSENT = "person"
"""The approver entry that lets the person the agents act for approve (consent)."""


class Refusal(enum.StrEnum):
    """Why an approver may not decide a request (`may_approve`)."""

    NOT_ELIGIBLE = "not_eligible"
    SELF_APPROVAL = "self_approval"
    IN_AGENT_CHAIN = "in_agent_chain"


@dataclass(frozen=True, slots=True)
class CompiledApprovalRule:
    """An ``approvals:`` rule of the policy, compiled (see `broker.policy.model.ApprovalRule`)."""

    name: str
    permissions: PermissionSet
    agents: frozenset[str] | None
    """The rule applies when one of these is in the chain (None: any agent)."""
    people: Selectors | None
    """The rule applies to the people these select (None: everyone)."""
    consent: bool
    approvers: tuple[str, ...]
    """The approver selectors as written (without ``person``)."""
    approver_selectors: Selectors
    quorum: int
    request_expiry_seconds: int
    token_lifetime_seconds: int | None
    channels: tuple[str, ...]
    description: str = ""

    def applies(self, person: Person, roles: frozenset[str], agent_chain: Iterable[str]) -> bool:
        """Whether the rule governs requests for `person` (holding broker `roles`) through
        `agent_chain` (any order)."""
        if self.agents is not None and self.agents.isdisjoint(agent_chain):
            return False
        return self.people is None or self.people.matches(person, roles)

    def requirement(self, permissions: tuple[str, ...]) -> ApprovalRequirement:
        return ApprovalRequirement(
            rule=self.name,
            permissions=permissions,
            consent=self.consent,
            approvers=self.approvers,
            quorum=self.quorum,
            request_expiry_seconds=self.request_expiry_seconds,
            token_lifetime_seconds=self.token_lifetime_seconds,
            channels=self.channels,
        )


@dataclass(frozen=True, slots=True)
class ApprovalRequirement:
    """One rule a request must satisfy before `permissions` may be granted."""

    rule: str
    permissions: tuple[str, ...]
    """The granted permissions this rule governs."""
    consent: bool
    """The person the agents act for may approve."""
    approvers: tuple[str, ...]
    """Selectors of who else may approve."""
    quorum: int
    request_expiry_seconds: int
    token_lifetime_seconds: int | None
    channels: tuple[str, ...]


def applicable_rules(
    policy: Policy,
    person: Person,
    agent_chain: Iterable[str],
    roles: frozenset[str] | None = None,
) -> tuple[CompiledApprovalRule, ...]:
    """The approval rules that govern requests for `person` through `agent_chain`, in name
    order. `roles` is ``policy.roles_of(person)`` where the caller has it already."""
    if not policy.approval_rules:
        return ()
    chain = frozenset(agent_chain)
    if roles is None:
        roles = policy.roles_of(person)
    return tuple(rule for rule in policy.approval_rules if rule.applies(person, roles, chain))


def approval_requirements(
    policy: Policy,
    person: Person,
    agent_chain: Iterable[str],
    permissions: Iterable[str],
    *,
    roles: frozenset[str] | None = None,
) -> tuple[ApprovalRequirement, ...]:
    """For each applicable rule that governs any of `permissions`: the requirement (the rule
    and the permissions it governs, in the order given). A permission several rules govern
    needs every one of them. Empty when nothing needs approval."""
    if not policy.approval_rules:
        return ()
    wanted = tuple(dict.fromkeys(permissions))
    found: list[ApprovalRequirement] = []
    for rule in applicable_rules(policy, person, agent_chain, roles):
        governed = tuple(p for p in wanted if rule.permissions.covers(p))
        if governed:
            found.append(rule.requirement(governed))
    return tuple(found)


def _approver_selectors(policy: Policy, requirement: ApprovalRequirement) -> Selectors:
    rule = policy.approval_rule(requirement.rule)
    if rule is not None and rule.approvers == requirement.approvers:
        return rule.approver_selectors
    return compile_selectors(requirement.approvers)[0]


def _same_person(a: Person, b: Person) -> bool:
    return a.idp == b.idp and a.subject == b.subject


def may_approve(
    policy: Policy,
    requirement: ApprovalRequirement,
    approver: Person,
    *,
    person: Person,
    agent_chain: Iterable[str],
) -> str | None:
    """None when `approver` may approve `requirement` for a request made for `person` through
    `agent_chain`, else the refusal (a `Refusal` code). Who may approve is what the
    requirement says (as shown to the approver when the request was made); ``role:``
    selectors use the roles the approver holds under `policy`."""
    if approver.subject in frozenset(agent_chain):
        return str(Refusal.IN_AGENT_CHAIN)
    if _same_person(approver, person):
        return None if requirement.consent else str(Refusal.SELF_APPROVAL)
    selectors = _approver_selectors(policy, requirement)
    if selectors and selectors.matches(approver, policy.roles_of(approver)):
        return None
    return str(Refusal.NOT_ELIGIBLE)


def eligible_approvals(
    policy: Policy,
    requirement: ApprovalRequirement,
    approvers: Iterable[Person],
    *,
    person: Person,
    agent_chain: Iterable[str],
) -> frozenset[str]:
    """The distinct person ids (``<idp>/<subject>``) among `approvers` eligible for
    `requirement`: what counts toward its quorum (one approver counts once)."""
    chain = tuple(agent_chain)
    return frozenset(
        approver.person_id
        for approver in approvers
        if may_approve(policy, requirement, approver, person=person, agent_chain=chain) is None
    )


def outstanding(
    policy: Policy,
    requirements: Iterable[ApprovalRequirement],
    approvers: Iterable[Person],
    *,
    person: Person,
    agent_chain: Iterable[str],
) -> Mapping[str, int]:
    """Rule name -> how many more distinct eligible approvals it needs (rules already met are
    left out: an empty mapping means every quorum is met)."""
    chain = tuple(agent_chain)
    given = tuple(approvers)
    missing: dict[str, int] = {}
    for requirement in requirements:
        count = len(
            eligible_approvals(policy, requirement, given, person=person, agent_chain=chain)
        )
        if count < requirement.quorum:
            missing[requirement.rule] = requirement.quorum - count
    return missing


def quorum_met(
    policy: Policy,
    requirements: Iterable[ApprovalRequirement],
    approvers: Iterable[Person],
    *,
    person: Person,
    agent_chain: Iterable[str],
) -> bool:
    """Whether every requirement has `quorum` distinct eligible approvers among `approvers`."""
    return not outstanding(policy, requirements, approvers, person=person, agent_chain=agent_chain)


def approved_permissions(requirements: Iterable[ApprovalRequirement]) -> frozenset[str]:
    """Every permission the requirements govern: what a request's approval covers."""
    return frozenset(p for requirement in requirements for p in requirement.permissions)


APPROVAL_CLAIM = "approval"
APPROVED_PERMISSIONS_MEMBER = "permissions"


def approved_in(claims: Mapping[str, object]) -> frozenset[str]:
    """The permissions a broker token's approval covers: the strings of its ``approval``
    claim's ``permissions`` member. Anything else (no claim, another shape) covers nothing:
    a token whose approval cannot be read loses what an approval rule governs."""
    approval = claims.get(APPROVAL_CLAIM)
    if not isinstance(approval, Mapping):
        return frozenset()
    permissions = approval.get(APPROVED_PERMISSIONS_MEMBER)
    if not isinstance(permissions, list | tuple):
        return frozenset()
    return frozenset(p for p in permissions if isinstance(p, str))

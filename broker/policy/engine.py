"""The policy decision: a pure function of (compiled policy, person, agent chain, request).

No I/O, no clock. Everything the token endpoint grants passes through `decide`; `broker policy
explain` and policy tests call the same function, so what they say is what the broker does.

Granted scopes are always a subset of what was asked for (when nothing is asked for: the agent's
defaults, or on a re-exchange by an agent without defaults, the parent token's scopes), and every
granted scope is covered by the person's roles *and* the agent's ceiling *and*, on a re-exchange,
by the parent token's scopes.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from broker.policy.approvals import (
    ApprovalRequirement,
    CompiledApprovalRule,
    applicable_rules,
)
from broker.policy.model import (
    Admin,
    Agent,
    AuthorizationServer,
    Budget,
    Credential,
    Gateway,
    Price,
    ResourceServer,
)
from broker.policy.permissions import EMPTY, PermissionSet, is_permission
from broker.policy.selectors import Selectors
from broker.types import Provenance, normalise_group


class Reason(enum.StrEnum):
    GRANTED = "granted"
    UNKNOWN_AGENT = "unknown_agent"
    MALFORMED_SCOPE = "malformed_scope"
    PERSON_LACKS_SCOPE = "person_lacks_scope"
    CEILING_EXCLUDES_SCOPE = "ceiling_excludes_scope"
    PARENT_LACKS_SCOPE = "parent_token_lacks_scope"
    NOT_ACT_FOR = "agent_may_not_act_for_person"
    DELEGATION_NOT_ALLOWED = "delegation_not_allowed"
    REQUIRES_DELEGATION = "agent_accepts_only_delegated_tokens"
    DEPTH_EXCEEDED = "delegation_depth_exceeded"
    AUDIENCE_NOT_ALLOWED = "audience_not_allowed_for_agent"
    PARENT_LACKS_AUDIENCE = "parent_token_lacks_audience"
    NO_SCOPE = "no_scope_allowed"
    NO_AUDIENCE = "no_audience"
    AUDIENCE_REQUIRED = "audience_required"
    APPROVAL_REQUIRED = "approval_required"


_ERROR_FOR_REASON: Mapping[Reason, str] = {
    Reason.UNKNOWN_AGENT: "unauthorized_client",
    Reason.NOT_ACT_FOR: "unauthorized_client",
    Reason.DELEGATION_NOT_ALLOWED: "unauthorized_client",
    Reason.REQUIRES_DELEGATION: "unauthorized_client",
    Reason.DEPTH_EXCEEDED: "invalid_grant",
    Reason.AUDIENCE_NOT_ALLOWED: "invalid_target",
    Reason.PARENT_LACKS_AUDIENCE: "invalid_target",
    Reason.NO_AUDIENCE: "invalid_target",
    Reason.AUDIENCE_REQUIRED: "invalid_target",
    Reason.MALFORMED_SCOPE: "invalid_scope",
    Reason.PERSON_LACKS_SCOPE: "invalid_scope",
    Reason.CEILING_EXCLUDES_SCOPE: "invalid_scope",
    Reason.PARENT_LACKS_SCOPE: "invalid_scope",
    Reason.NO_SCOPE: "invalid_scope",
    Reason.APPROVAL_REQUIRED: "invalid_scope",
}

_SCOPE_REASON_TEXT: Mapping[Reason, str] = {
    Reason.MALFORMED_SCOPE: "is not a well-formed permission",
    Reason.PERSON_LACKS_SCOPE: "the person does not hold it",
    Reason.CEILING_EXCLUDES_SCOPE: "the agent's ceiling excludes it",
    Reason.PARENT_LACKS_SCOPE: "the parent token does not carry it",
    Reason.NOT_ACT_FOR: "the agent may not act for this person",
    Reason.APPROVAL_REQUIRED: "it needs approval",
}


@dataclass(frozen=True, slots=True)
class CompiledAgent:
    name: str
    spec: Agent
    ceiling: PermissionSet
    default_scopes: tuple[str, ...]
    audiences: frozenset[str]
    act_for: Selectors
    may_delegate_to: frozenset[str]
    default_audiences: tuple[str, ...] = ()
    """What a request without an audience gets (empty: see `require_audience`)."""
    require_audience: bool = False
    """A request without an audience is refused (never true with `default_audiences`)."""


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated, compiled policy. Immutable: a reload builds a new one and swaps it in."""

    version: str
    roles: Mapping[str, PermissionSet]
    group_roles: Mapping[tuple[str, str], frozenset[str]]
    person_roles: Mapping[tuple[str, str], frozenset[str]]
    agents: Mapping[str, CompiledAgent]
    resource_servers: Mapping[str, ResourceServer]
    gateways: Mapping[str, Gateway]
    credentials: Mapping[str, Credential]
    admins: Mapping[str, Admin]
    max_token_lifetime_seconds: int
    max_delegation_depth: int
    files: tuple[str, ...] = ()
    group_cost_centres: tuple[tuple[tuple[str, str], str], ...] = ()
    """((idp, group), cost centre) in policy order."""
    idp_role_roles: Mapping[tuple[str, str], frozenset[str]] = field(default_factory=dict)
    """(idp, IdP role) -> broker roles: ``idp_role:`` bindings, apart from groups."""
    approval_rules: tuple[CompiledApprovalRule, ...] = ()
    """``approvals:`` rules in name order (empty: nothing ever needs approval)."""
    authorization_servers: Mapping[str, AuthorizationServer] = field(default_factory=dict)
    """Where agents may take ID-JAGs (enterprise-managed authorization), by name."""
    prices: tuple[Price, ...] = ()
    """What provider models cost, by (provider, model, valid_from)."""
    budgets: Mapping[str, Budget] = field(default_factory=dict)
    """Spending limits and alerts, by name."""

    def authorization_server(
        self, issuer: str, own_issuer: str
    ) -> list[tuple[str, AuthorizationServer]]:
        """The registrations of the authorization server whose issuer is `issuer` (``self`` is
        this broker, `own_issuer`), by name: several entries may register one server (each
        with its resources and agents)."""
        return [
            (name, server)
            for name, server in sorted(self.authorization_servers.items())
            if server.issuer == issuer or (server.issuer == "self" and issuer == own_issuer)
        ]

    def approval_rule(self, name: str) -> CompiledApprovalRule | None:
        return next((rule for rule in self.approval_rules if rule.name == name), None)

    def cost_centre_of(self, agent: str, idp: str, groups: Iterable[str]) -> str | None:
        """Who pays for a fetch made by `agent` (the agent the person invoked) for a person of
        `idp` in `groups`: the agent's own cost centre, else that of the person's first group
        (in policy order) that has one, else None."""
        compiled = self.agents.get(agent)
        if compiled is not None and compiled.spec.cost_centre:
            return compiled.spec.cost_centre
        member_of = {normalise_group(group) for group in groups}
        for (group_idp, group), centre in self.group_cost_centres:
            if group_idp == idp and group in member_of:
                return centre
        return None

    def roles_of(self, person: Person) -> frozenset[str]:
        roles: set[str] = set(self.person_roles.get((person.idp, person.subject), ()))
        for group in person.groups:
            roles.update(self.group_roles.get((person.idp, group), ()))
        for idp_role in person.idp_roles:
            roles.update(self.idp_role_roles.get((person.idp, idp_role), ()))
        return frozenset(roles)

    def identity_used(self, person: Person, agent: str) -> Person:
        """`person` with only the groups and IdP roles this policy can use for `agent` and the
        agents it may delegate to, directly or further down: those bound to roles at the
        person's IdP and those named by their ``act_for``, and those the ``people`` of an
        approval rule that may apply to them names. What a token issued to `agent`
        carries (not every group the IdP asserted). `decide` for `agent`, or for any agent a
        token issued to it is re-exchanged with, answers the same for both people, and so does
        `standing`."""
        reachable: set[str] = set()
        pending = [agent]
        while pending:
            name = pending.pop()
            compiled = self.agents.get(name)
            if name in reachable or compiled is None:
                continue
            reachable.add(name)
            pending.extend(compiled.may_delegate_to)
        selectors = [self.agents[name].act_for for name in reachable]
        selectors.extend(
            rule.people
            for rule in self.approval_rules
            if rule.people is not None
            and (rule.agents is None or not rule.agents.isdisjoint(reachable))
        )

        def used_group(group: str) -> bool:
            key = (person.idp, group)
            return key in self.group_roles or any(key in s.groups for s in selectors)

        def used_role(idp_role: str) -> bool:
            key = (person.idp, idp_role)
            return key in self.idp_role_roles or any(key in s.idp_roles for s in selectors)

        return Person(
            person.idp,
            person.subject,
            frozenset(filter(used_group, person.groups)),
            frozenset(filter(used_role, person.idp_roles)),
        )

    def rights_of(self, person: Person) -> PermissionSet:
        rights = EMPTY
        for role in sorted(self.roles_of(person)):
            rights = rights.union(self.roles[role])
        return rights


@dataclass(frozen=True, slots=True)
class Person:
    """A person as the policy sees them: groups and IdP roles are separate namespaces."""

    idp: str
    subject: str
    groups: frozenset[str] = frozenset()
    idp_roles: frozenset[str] = frozenset()

    @classmethod
    def of(cls, provenance: Provenance) -> Person:
        return cls(provenance.idp, provenance.subject, provenance.groups, provenance.idp_roles)

    @property
    def person_id(self) -> str:
        return f"{self.idp}/{self.subject}"


@dataclass(frozen=True, slots=True)
class ParentGrant:
    """What a broker-issued token presented for re-exchange already carries."""

    actor_chain: tuple[str, ...]
    """Agents from the most recent actor to the first (the nesting order of ``act``)."""
    scopes: frozenset[str]
    audiences: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ExchangeRequest:
    person: Person
    agent: str
    scopes: tuple[str, ...] | None = None
    """None when the request named no scope: the agent's defaults apply."""
    audiences: tuple[str, ...] = ()
    parent: ParentGrant | None = None
    approved: frozenset[str] = frozenset()
    """Permissions an approval covers (on a re-exchange: those the parent token's approval
    covered). A permission an approval rule governs is granted only when listed here."""
    for_approval: bool = False
    """Decide what a request for approval (OpenID CIBA) would yield: permissions needing
    approval are granted and `Decision.approvals` lists the rules to satisfy."""


@dataclass(frozen=True, slots=True)
class ScopeVerdict:
    scope: str
    reasons: tuple[Reason, ...]

    @property
    def allowed(self) -> bool:
        return not self.reasons


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reasons: tuple[Reason, ...]
    description: str
    policy_version: str
    scopes: tuple[str, ...] = ()
    audiences: tuple[str, ...] = ()
    actor_chain: tuple[str, ...] = ()
    max_lifetime_seconds: int = 0
    scope_verdicts: tuple[ScopeVerdict, ...] = field(default=())
    approvals: tuple[ApprovalRequirement, ...] = ()
    """With `ExchangeRequest.for_approval`: the approval rules to satisfy before `scopes` may
    be issued (empty: nothing needs approval). Always empty otherwise."""

    @property
    def error(self) -> str | None:
        """The RFC 6749/8693 error code for a denial (None when allowed)."""
        if self.allowed:
            return None
        return _ERROR_FOR_REASON[self.reasons[0]]

    @property
    def reason(self) -> str:
        return str(self.reasons[0]) if self.reasons else str(Reason.GRANTED)


def _shown(value: str, limit: int = 80) -> str:
    """A caller-supplied value as it may appear in a description: quoted and length-capped, so an
    error body can never carry back a long string (a token pasted into the wrong field)."""
    return repr(value) if len(value) <= limit else repr(value[:limit] + "...")


def _may_act_for(agent: CompiledAgent, person: Person, roles: frozenset[str]) -> bool:
    return agent.act_for.matches(person, roles)


def _candidate_scopes(agent: CompiledAgent, request: ExchangeRequest) -> tuple[str, ...]:
    if request.scopes is not None:
        return tuple(dict.fromkeys(request.scopes))
    if agent.default_scopes:
        return tuple(dict.fromkeys(agent.default_scopes))
    if request.parent is not None:
        return tuple(sorted(request.parent.scopes))
    return ()


def _scope_verdicts(
    policy: Policy, agent: CompiledAgent, request: ExchangeRequest
) -> list[ScopeVerdict]:
    rights = policy.rights_of(request.person)
    parent = request.parent
    verdicts: list[ScopeVerdict] = []
    for scope in _candidate_scopes(agent, request):
        reasons: list[Reason] = []
        if not is_permission(scope):
            reasons.append(Reason.MALFORMED_SCOPE)
        else:
            if not rights.covers(scope):
                reasons.append(Reason.PERSON_LACKS_SCOPE)
            if not agent.ceiling.covers(scope):
                reasons.append(Reason.CEILING_EXCLUDES_SCOPE)
            if parent is not None and scope not in parent.scopes:
                reasons.append(Reason.PARENT_LACKS_SCOPE)
        verdicts.append(ScopeVerdict(scope, tuple(reasons)))
    return verdicts


def decide(policy: Policy, request: ExchangeRequest) -> Decision:
    """Decide one token exchange. Pure; never raises for any input."""
    version = policy.version
    agent = policy.agents.get(request.agent)
    parent = request.parent
    chain = (request.agent, *(parent.actor_chain if parent else ()))

    def deny(reason: Reason, description: str, **extra: object) -> Decision:
        return Decision(
            allowed=False,
            reasons=(reason,),
            description=description,
            policy_version=version,
            actor_chain=chain,
            **extra,  # type: ignore[arg-type]
        )

    if agent is None:
        return deny(Reason.UNKNOWN_AGENT, f"agent {request.agent!r} is not declared in the policy")

    if parent is None:
        if not agent.spec.accepts_person_tokens:
            return deny(
                Reason.REQUIRES_DELEGATION,
                f"agent {agent.name!r} accepts only tokens delegated by another agent",
            )
    else:
        delegator = policy.agents.get(parent.actor_chain[0]) if parent.actor_chain else None
        if delegator is None or agent.name not in delegator.may_delegate_to:
            by = parent.actor_chain[0] if parent.actor_chain else "?"
            return deny(
                Reason.DELEGATION_NOT_ALLOWED,
                f"agent {by!r} may not delegate to agent {agent.name!r}",
            )
        if len(chain) > policy.max_delegation_depth:
            return deny(
                Reason.DEPTH_EXCEEDED,
                f"delegation depth {len(chain)} exceeds the limit of {policy.max_delegation_depth}",
            )

    person = request.person
    roles = policy.roles_of(person)
    if not _may_act_for(agent, person, roles):
        return deny(
            Reason.NOT_ACT_FOR,
            f"agent {agent.name!r} may not act for person {person.person_id!r}",
            scope_verdicts=tuple(
                ScopeVerdict(v.scope, (*v.reasons, Reason.NOT_ACT_FOR))
                for v in _scope_verdicts(policy, agent, request)
            ),
        )

    # Audiences (RFC 8693 audience / RFC 8707 resource).
    if request.audiences:
        for audience in request.audiences:
            if audience not in agent.audiences:
                return deny(
                    Reason.AUDIENCE_NOT_ALLOWED,
                    f"audience {_shown(audience)} is not allowed for agent {agent.name!r}",
                )
            if parent is not None and audience not in parent.audiences:
                return deny(
                    Reason.PARENT_LACKS_AUDIENCE,
                    f"audience {_shown(audience)} is not in the parent token's audience",
                )
        audiences = tuple(dict.fromkeys(request.audiences))
    elif agent.require_audience:
        accepted = sorted(agent.audiences)
        if parent is not None:
            accepted = [a for a in accepted if a in parent.audiences]
        shown = ", ".join(_shown(a) for a in accepted[:10]) + (" ..." if len(accepted) > 10 else "")
        return deny(
            Reason.AUDIENCE_REQUIRED,
            f"agent {agent.name!r} requires an explicit audience (audience or resource); "
            f"accepted: {shown or 'none'}",
        )
    else:
        allowed_audiences = list(agent.default_audiences) or sorted(agent.audiences)
        if parent is not None:
            allowed_audiences = [a for a in allowed_audiences if a in parent.audiences]
        audiences = tuple(allowed_audiences)
        if not audiences:
            return deny(Reason.NO_AUDIENCE, f"no audience is available to agent {agent.name!r}")

    # Scopes.
    approved = request.approved
    explicit = request.scopes is not None
    verdicts = _scope_verdicts(policy, agent, request)
    denied = [v for v in verdicts if not v.allowed]
    granted = tuple(v.scope for v in verdicts if v.allowed)
    if explicit and denied:
        parts = [
            f"{_shown(v.scope)} ({'; '.join(_SCOPE_REASON_TEXT[r] for r in v.reasons)})"
            for v in denied[:10]
        ]
        return deny(
            denied[0].reasons[0],
            "scope not allowed: " + ", ".join(parts),
            scope_verdicts=tuple(verdicts),
            audiences=audiences,
        )
    lifetime = min(agent.spec.max_token_lifetime_seconds, policy.max_token_lifetime_seconds)
    approvals: tuple[ApprovalRequirement, ...] = ()
    if policy.approval_rules and granted:
        rules = applicable_rules(policy, person, chain, roles)
        waiting = [
            (rule, tuple(s for s in granted if rule.permissions.covers(s) and s not in approved))
            for rule in rules
        ]
        waiting = [(rule, scopes) for rule, scopes in waiting if scopes]
        if waiting and request.for_approval:
            approvals = tuple(rule.requirement(scopes) for rule, scopes in waiting)
        elif waiting:
            needing = {s: [r.name for r, scopes in waiting if s in scopes] for s in granted}
            needing = {s: names for s, names in needing.items() if names}
            verdicts = [
                ScopeVerdict(v.scope, (Reason.APPROVAL_REQUIRED,)) if v.scope in needing else v
                for v in verdicts
            ]
            if explicit:
                parts = [
                    f"{_shown(scope)} (approval rule {', '.join(map(repr, names))})"
                    for scope, names in list(needing.items())[:10]
                ]
                return deny(
                    Reason.APPROVAL_REQUIRED,
                    "scope needs approval: " + ", ".join(parts),
                    scope_verdicts=tuple(verdicts),
                    audiences=audiences,
                )
            granted = tuple(s for s in granted if s not in needing)
        for rule in rules:
            if rule.token_lifetime_seconds is not None and any(
                rule.permissions.covers(s) for s in granted
            ):
                lifetime = min(lifetime, rule.token_lifetime_seconds)

    if not granted:
        what = "requested" if explicit else "default"
        description = (
            f"none of the {what} scopes is allowed for agent {agent.name!r} acting for "
            f"{person.person_id!r}"
            if verdicts
            else f"no scope requested and agent {agent.name!r} has no default scopes"
        )
        return deny(
            Reason.NO_SCOPE,
            description,
            scope_verdicts=tuple(verdicts),
            audiences=audiences,
        )

    return Decision(
        allowed=True,
        reasons=(),
        description="granted",
        policy_version=version,
        scopes=granted,
        audiences=audiences,
        actor_chain=chain,
        max_lifetime_seconds=lifetime,
        scope_verdicts=tuple(verdicts),
        approvals=approvals,
    )


_WITHDRAWN_TEXT: Mapping[Reason, str] = {
    **_SCOPE_REASON_TEXT,
    Reason.UNKNOWN_AGENT: "an agent of the token's chain is no longer in the policy",
    Reason.DELEGATION_NOT_ALLOWED: "an agent of the chain may no longer delegate to the next",
    Reason.APPROVAL_REQUIRED: "it now needs an approval the token does not carry",
}


@dataclass(frozen=True, slots=True)
class Standing:
    """What the policy in force still lets a token already issued hold: the person's rights and
    the ceiling of every agent of its chain (see `standing`)."""

    policy_version: str
    reason: Reason | None
    """Why the chain holds nothing any more (an agent gone, no longer acting for the person or
    no longer delegating), else None."""
    rights: PermissionSet = EMPTY
    ceilings: tuple[PermissionSet, ...] = ()
    needs_approval: PermissionSet = EMPTY
    """What the approval rules that apply to the person and chain govern."""
    approved: frozenset[str] = frozenset()
    """What the token's approval covers."""

    def withdrawn(self, scope: str) -> Reason | None:
        """None while the policy still grants `scope` to this person and chain, else why not."""
        if self.reason is not None:
            return self.reason
        if not is_permission(scope):
            return Reason.MALFORMED_SCOPE
        if not self.rights.covers(scope):
            return Reason.PERSON_LACKS_SCOPE
        if not all(ceiling.covers(scope) for ceiling in self.ceilings):
            return Reason.CEILING_EXCLUDES_SCOPE
        if self.needs_approval and scope not in self.approved and self.needs_approval.covers(scope):
            return Reason.APPROVAL_REQUIRED
        return None

    @staticmethod
    def describe(reason: Reason) -> str:
        return _WITHDRAWN_TEXT.get(reason, str(reason))


def standing(
    policy: Policy,
    person: Person,
    actor_chain: tuple[str, ...],
    approved: frozenset[str] = frozenset(),
) -> Standing:
    """What a token already issued for `person` to `actor_chain` (most recent agent first, as in
    ``act``) may still hold under `policy`: never more than the person's rights and the ceiling
    of every agent of the chain, each of which must still be declared, still act for the person
    and still delegate to the agent after it; and of what an approval rule governs, only what
    the token's approval covers (`approved`). Pure; never raises. Checked again at every use,
    so an edit that removes a right or adds an approval rule takes effect on tokens already
    issued."""
    version = policy.version
    if not actor_chain:
        return Standing(version, Reason.UNKNOWN_AGENT)
    roles = policy.roles_of(person)
    ceilings: list[PermissionSet] = []
    for position, name in enumerate(actor_chain):
        agent = policy.agents.get(name)
        if agent is None:
            return Standing(version, Reason.UNKNOWN_AGENT)
        if not _may_act_for(agent, person, roles):
            return Standing(version, Reason.NOT_ACT_FOR)
        if position > 0 and actor_chain[position - 1] not in agent.may_delegate_to:
            return Standing(version, Reason.DELEGATION_NOT_ALLOWED)
        ceilings.append(agent.ceiling)
    needs_approval = EMPTY
    for rule in applicable_rules(policy, person, actor_chain, roles):
        needs_approval = needs_approval.union(rule.permissions)
    return Standing(
        version, None, policy.rights_of(person), tuple(ceilings), needs_approval, approved
    )


def explain(policy: Policy, request: ExchangeRequest) -> str:
    """A human-readable account of `decide` for `broker policy explain`."""
    decision = decide(policy, request)
    person = request.person
    used = policy.identity_used(person, request.agent)
    lines = [
        f"policy version: {policy.version}",
        f"person:         {person.person_id} (groups: {', '.join(sorted(person.groups)) or '-'})",
        f"IdP roles:      {', '.join(sorted(person.idp_roles)) or '-'}",
        f"token carries:  groups: {', '.join(sorted(used.groups)) or '-'}; "
        f"IdP roles: {', '.join(sorted(used.idp_roles)) or '-'}",
        f"roles:          {', '.join(sorted(policy.roles_of(person))) or '-'}",
        f"agent chain:    {' <- '.join(decision.actor_chain)}",
        f"decision:       {'GRANTED' if decision.allowed else f'DENIED ({decision.error})'}",
    ]
    if not decision.allowed:
        lines.append(f"reason:         {decision.reason}: {decision.description}")
    if decision.audiences:
        lines.append(f"audience:       {' '.join(decision.audiences)}")
    for verdict in decision.scope_verdicts:
        if verdict.allowed:
            lines.append(f"  + {verdict.scope}: allowed")
        else:
            why = "; ".join(f"{r} ({_SCOPE_REASON_TEXT[r]})" for r in verdict.reasons)
            lines.append(f"  - {verdict.scope}: denied: {why}")
    if decision.allowed:
        lines.append(f"granted:        {' '.join(decision.scopes)}")
        lines.append(f"max lifetime:   {decision.max_lifetime_seconds}s")
    if request.approved:
        lines.append(f"approved:       {' '.join(sorted(request.approved))}")
    lines.extend(_approval_lines(policy, request))
    return "\n".join(lines)


def _approval_lines(policy: Policy, request: ExchangeRequest) -> list[str]:
    """What a request for approval of `request` (OpenID CIBA) would need: each rule, the
    permissions it governs, who may approve, the quorum, the expiry and the token lifetime."""
    if not policy.approval_rules:
        return []
    asked = decide(policy, replace(request, for_approval=True))
    if not asked.allowed or not asked.approvals:
        return []
    lines = ["needs approval (request it with OpenID CIBA, POST /oauth2/bc-authorize):"]
    for requirement in asked.approvals:
        who = (["the person (consent)"] if requirement.consent else []) + list(
            requirement.approvers
        )
        lifetime = requirement.token_lifetime_seconds
        lines += [
            f"  rule {requirement.rule}: {' '.join(requirement.permissions)}",
            f"    approvers:  {', '.join(who)}; quorum {requirement.quorum}"
            + ("" if requirement.consent else "; not the person, nobody in the agent chain"),
            f"    request expires after {requirement.request_expiry_seconds}s; approved token "
            f"lives at most {f'{lifetime}s' if lifetime else 'as long as otherwise allowed'}; "
            f"channels: {', '.join(requirement.channels) or '-'}",
        ]
    return lines

"""Property tests of the decision over generated policies, people, requests and chains.

Policies are generated as data, written as a YAML file (in JSON syntax) and loaded with
`load_policy`; the expected
rights of a person are computed here from the generated data with an independent matcher, never
through `Policy.rights_of` or `PermissionSet`. Properties:

(a) every granted scope is a well-formed permission covered by the person's rights and by the
    ceiling of every agent in the chain (and every agent may act for the person);
(b) granted scopes are a subset of the requested ones (all of them, for an explicit request),
    or of the agent's defaults when none was requested (of the parent token's scopes for an
    agent without defaults on a re-exchange);
(c) a re-exchange grant is a subset of its parent grant, in scopes and audiences;
(d) `decide` never raises, for any request, chain or parent token;
(e) a token carries only the groups and IdP roles the policy uses (`Policy.identity_used`), and
    every decision along the chain is the same for that trimmed person as for the whole one;
(f) approval rules: without an approval covering it, a permission an applicable rule governs is
    never granted (an explicit request for it is refused, a default left out); a request for
    approval (`for_approval`) or an approval (`approved`, any set) never grants beyond
    (a) to (c), and `Decision.approvals` lists exactly the applicable rules and the granted
    permissions each governs that the approval does not cover.

The generated policies use every form of the language that names people: bindings of groups or
of IdP roles (a separate namespace: generated IdP roles reuse group names), for one IdP or a list,
selectors naming several IdPs, the audience settings (`default_audiences`,
`require_audience` per agent and in `limits`), and approval rules (for some agents or any, for
some people or everyone, with token lifetimes).

On a first hop (no parent token) the independent model also predicts the decision itself, so
the engine can neither grant too much nor refuse what the policy allows.
"""

from __future__ import annotations

import itertools
import json
import random
import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.policy import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    decide,
    decide_chain,
    load_policy,
)

SEGMENTS = ["a", "b", "c1"]
IDPS = ["i1", "i2"]
GROUPS = ["g0", "g1", "g2"]
IDP_ROLES = ["g0", "x1"]  # "g0" is also a group name: the namespaces must stay apart
SUBJECTS = ["s0", "s1", "s2"]
ROLE_NAMES = ["r0", "r1", "r2", "r3"]
AGENT_NAMES = ["ag0", "ag1", "ag2", "ag3"]
AUDIENCES = ["u1", "u2", "u3"]
MALFORMED = ["", "*", "A:b", "a::b", "a:", ":a", "a:*:b", " a", "a b", "a:*", "**", "a\n"]

# An independent definition of a well-formed permission (see broker.policy.permissions).
_PERMISSION = re.compile(r"[a-z0-9][a-z0-9_.\-]*(:[a-z0-9][a-z0-9_.\-]*)*")

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

permissions = st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=3).map(":".join)
patterns = st.one_of(
    permissions,
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=2).map(lambda s: ":".join(s) + ":*"),
)
requested_scope = st.one_of(permissions, permissions, patterns, st.sampled_from(MALFORMED))
AUDIENCE_LISTS = [AUDIENCES, ["u1", "u2"], ["u1"], ["u2", "u3"], []]


@dataclass(frozen=True)
class Spec:
    """The generated policy, as plain data (what the test reasons about independently)."""

    roles: dict[str, list[str]]
    group_bindings: list[dict[str, Any]]
    person_bindings: list[dict[str, Any]]
    agents: dict[str, dict[str, Any]]
    limits: dict[str, Any]
    approvals: dict[str, dict[str, Any]] = field(default_factory=dict)

    def document(self) -> dict[str, Any]:
        return {
            "roles": {name: {"permissions": perms} for name, perms in self.roles.items()},
            "group_bindings": self.group_bindings,
            "person_bindings": self.person_bindings,
            "agents": self.agents,
            "limits": self.limits,
            "approvals": self.approvals,
        }


def concrete(pattern: str) -> list[str]:
    """Permissions a pattern stands for (a few of them), to request what might be granted."""
    if pattern.endswith(":*"):
        return [pattern[:-1] + segment for segment in SEGMENTS]
    return [pattern]


class Dice:
    """Weighted choices that steer generation towards grants and long chains.

    Inside a large composite strategy Hypothesis draws small integers much more often than
    uniformly, which would skew any weights built on `st.integers`; the weights come from a
    random generator seeded by one draw instead.
    """

    def __init__(self, draw: st.DrawFn) -> None:
        self.rng = random.Random(draw(st.integers(0, 2**32 - 1)))

    def chance(self, percent: int) -> bool:
        return self.rng.random() * 100 < percent

    def pick(self, draw: st.DrawFn, *options: tuple[int, st.SearchStrategy[Any]]) -> Any:
        """Draw from one of `options`, chosen with the given weights (in percent)."""
        roll = self.rng.random() * 100
        for weight, strategy in options:
            if roll < weight:
                return draw(strategy)
            roll -= weight
        return draw(options[-1][1])


people = st.builds(
    Person,
    idp=st.sampled_from(IDPS),
    subject=st.sampled_from([*SUBJECTS, "s9"]),
    groups=st.frozensets(st.sampled_from([*GROUPS, "g9"]), max_size=3),
    idp_roles=st.frozensets(st.sampled_from([*IDP_ROLES, "x9"]), max_size=2),
)
idp_lists = st.one_of(
    st.sampled_from(IDPS), st.lists(st.sampled_from(IDPS), min_size=1, max_size=2, unique=True)
)


def idps_of(binding: dict[str, Any]) -> list[str]:
    idp = binding["idp"]
    return [idp] if isinstance(idp, str) else idp


@st.composite
def specs(draw: st.DrawFn, person: Person) -> Spec:
    """A random valid policy, biased so that `person` is often bound to roles and agents often
    act for them, so that grants (and multi-hop grants) are common, not just denials."""
    dice = Dice(draw)
    role_names = draw(st.lists(st.sampled_from(ROLE_NAMES), min_size=1, max_size=4, unique=True))
    roles = {r: draw(st.lists(patterns, min_size=1, max_size=4)) for r in role_names}
    some_roles = st.lists(st.sampled_from(role_names), min_size=1, max_size=2, unique=True)
    group_bindings = draw(
        st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"idp": idp_lists, "group": st.sampled_from(GROUPS), "roles": some_roles}
                ),
                st.fixed_dictionaries(
                    {"idp": idp_lists, "idp_role": st.sampled_from(IDP_ROLES), "roles": some_roles}
                ),
            ),
            max_size=4,
        )
    )
    person_bindings = draw(
        st.lists(
            st.fixed_dictionaries(
                {
                    "idp": st.sampled_from(IDPS),
                    "subject": st.sampled_from(SUBJECTS),
                    "roles": some_roles,
                }
            ),
            max_size=2,
        )
    )
    if person.groups and dice.chance(80):
        group = draw(st.sampled_from(sorted(person.groups)))
        group_bindings.append({"idp": person.idp, "group": group, "roles": draw(some_roles)})
    if person.idp_roles and dice.chance(40):
        idp_role = draw(st.sampled_from(sorted(person.idp_roles)))
        binding = {"idp": [person.idp], "idp_role": idp_role, "roles": draw(some_roles)}
        group_bindings.append(binding)
    if dice.chance(60):
        binding = {"idp": person.idp, "subject": person.subject, "roles": draw(some_roles)}
        person_bindings.append(binding)
    idp_selector_lists = st.lists(st.sampled_from(IDPS), min_size=1, max_size=2, unique=True).map(
        ",".join
    )
    selectors = st.one_of(
        st.builds(lambda i, g: f"group:{i}/{g}", idp_selector_lists, st.sampled_from(GROUPS)),
        st.builds(lambda i, r: f"idp-role:{i}/{r}", idp_selector_lists, st.sampled_from(IDP_ROLES)),
        st.builds(lambda i, s: f"person:{i}/{s}", st.sampled_from(IDPS), st.sampled_from(SUBJECTS)),
        st.sampled_from(role_names).map(lambda r: f"role:{r}"),
    )
    for_person = [
        f"person:{person.idp}/{person.subject}",
        *(f"group:{person.idp}/{g}" for g in sorted(person.groups)),
        *(f"idp-role:i1,i2/{r}" for r in sorted(person.idp_roles)),
    ]
    for binding in group_bindings + person_bindings:
        if person.idp in idps_of(binding) and (
            binding.get("group") in person.groups
            or binding.get("idp_role") in person.idp_roles
            or binding.get("subject") == person.subject
        ):
            for_person.extend(f"role:{r}" for r in binding["roles"])
    held_concrete = sorted({c for perms in roles.values() for p in perms for c in concrete(p)})
    held = sorted({p for perms in roles.values() for p in perms} | set(held_concrete))
    agent_names = draw(st.lists(st.sampled_from(AGENT_NAMES), min_size=1, max_size=4, unique=True))
    agents: dict[str, dict[str, Any]] = {}
    for name in agent_names:
        others = [a for a in agent_names if a != name]
        ceiling = draw(st.lists(patterns, max_size=2))
        if dice.chance(90):
            ceiling += draw(st.lists(st.sampled_from(held), min_size=1, max_size=4))
        within = [c for c in held_concrete if any(matches(p, c) for p in ceiling)]
        if within and dice.chance(85):
            default_scopes = draw(st.lists(st.sampled_from(within), min_size=1, max_size=3))
        else:
            default_scopes = draw(st.lists(permissions, max_size=3))
        act_for = draw(st.lists(selectors, max_size=3))
        if dice.chance(90):
            act_for.append(draw(st.sampled_from(for_person)))
        audiences = AUDIENCES if dice.chance(70) else draw(st.sampled_from(AUDIENCE_LISTS))
        audience_settings: dict[str, Any] = {}
        roll = dice.rng.random()
        if roll < 0.25 and audiences:
            audience_settings["default_audiences"] = draw(
                st.lists(st.sampled_from(audiences), min_size=1, max_size=2, unique=True)
            )
        elif roll < 0.4:
            audience_settings["require_audience"] = dice.chance(70)
        agents[name] = {
            **audience_settings,
            "authentication": {"method": "client_secret_basic", "secret_ref": "env:X"},
            "ceiling": ceiling,
            "default_scopes": default_scopes,
            "audiences": audiences,
            "max_token_lifetime_seconds": draw(st.sampled_from([60, 900, 5000])),
            "act_for": act_for,
            "accepts_person_tokens": dice.chance(75),
            "may_delegate_to": draw(
                st.lists(st.sampled_from(others), min_size=int(dice.chance(85)), unique=True)
            )
            if others
            else [],
        }
    limits = {
        "max_token_lifetime_seconds": draw(st.sampled_from([300, 3600])),
        "max_delegation_depth": 4 if dice.chance(60) else draw(st.sampled_from([3, 2, 1])),
        "require_audience": dice.chance(20),
    }
    approvals: dict[str, dict[str, Any]] = {}
    for index in range(draw(st.integers(1, 3)) if dice.chance(60) else 0):
        rule: dict[str, Any] = {
            "permissions": draw(
                st.lists(st.one_of(st.sampled_from(held), patterns), min_size=1, max_size=3)
            ),
            "approvers": ["person"]
            if dice.chance(50)
            else draw(st.lists(selectors, min_size=1, max_size=2, unique=True)),
        }
        if dice.chance(40):
            rule["agents"] = draw(
                st.lists(st.sampled_from(agent_names), min_size=1, max_size=2, unique=True)
            )
        if dice.chance(40):
            rule["people"] = draw(
                st.lists(st.one_of(selectors, st.sampled_from(for_person)), min_size=1, max_size=2)
            )
        if dice.chance(40):
            rule["token_lifetime_seconds"] = draw(st.sampled_from([30, 600, 10000]))
        approvals[f"rule{index}"] = rule
    return Spec(roles, group_bindings, person_bindings, agents, limits, approvals)


@dataclass(frozen=True)
class Scenario:
    spec: Spec
    person: Person
    chain: list[str]
    requests: list[tuple[tuple[str, ...] | None, tuple[str, ...]]]
    """(scopes, audiences) per hop; all equal when the scenario is for `decide_chain`."""
    approved: frozenset[str] = frozenset()
    """What an approval covers, at every hop."""
    for_approval: bool = False
    """Every hop decides a request for approval."""


@st.composite
def scenarios(draw: st.DrawFn, *, same_request_each_hop: bool = False) -> Scenario:
    """A policy, a person, a delegation chain that mostly follows may_delegate_to, and requests
    mostly for scopes the first agent could get (but also malformed, wildcard, unheld ones)."""
    person = draw(people)
    spec = draw(specs(person))
    dice = Dice(draw)
    names = list(spec.agents)
    starters = [n for n in names if spec.agents[n]["accepts_person_tokens"]] or names
    chain = [draw(st.sampled_from(starters if dice.chance(90) else [*names, "ghost"]))]
    for _ in range(0 if dice.chance(35) else draw(st.integers(1, 4))):
        targets = spec.agents.get(chain[-1], {}).get("may_delegate_to", [])
        if targets and dice.chance(90):
            chain.append(draw(st.sampled_from(targets)))
        elif not targets and dice.chance(70):
            break
        else:
            chain.append(draw(st.sampled_from([*names, "ghost"])))
    candidates = sorted(
        {
            c
            for patterns_ in (*spec.roles.values(), *(a["ceiling"] for a in spec.agents.values()))
            for p in patterns_
            for c in concrete(p)
        }
    )

    # The model below is only used to bias generation towards grants; checks stay independent.
    def good_for(agents: list[str]) -> list[str]:
        """Scopes the person holds and every one of `agents` admits."""
        return [
            c
            for c in candidates
            if all(a in spec.agents and ceiling_admits(spec, a, c) for a in agents)
            and person_holds(spec, person, c)
        ]

    def one_scope(good: list[str]) -> str:
        roll = dice.rng.random()
        if good and roll < 0.85:
            return draw(st.sampled_from(good))
        if candidates and roll < 0.92:
            return draw(st.sampled_from(candidates))
        return draw(requested_scope)

    def request(hop: int) -> tuple[tuple[str, ...] | None, tuple[str, ...]]:
        """A request for hop `hop`, mostly for scopes that every agent up to it could get."""
        roll = dice.rng.random()
        scopes: tuple[str, ...] | None = None
        if roll >= 0.3:
            good = good_for(chain[: hop + 1]) or good_for(chain[hop : hop + 1])
            count = 0 if roll >= 0.93 else dice.rng.randint(1, 3)
            scopes = tuple(one_scope(good) for _ in range(count))
        own = spec.agents.get(chain[hop], {}).get("audiences", [])
        audience = (
            st.sampled_from(own) if own and dice.chance(85) else st.sampled_from([*AUDIENCES, "u4"])
        )
        audiences = dice.pick(
            draw, (70, st.just(())), (30, st.lists(audience, min_size=1, max_size=2).map(tuple))
        )
        return scopes, audiences

    if same_request_each_hop:
        requests = [request(len(chain) - 1)] * len(chain)
    else:
        requests = [request(hop) for hop in range(len(chain))]
    defaults = spec.agents.get(chain[0], {}).get("default_scopes", [])
    asked = {
        scope
        for scopes, _ in requests
        for scope in (defaults if scopes is None else scopes)
        if _PERMISSION.fullmatch(scope)
    }
    if asked and dice.chance(60):
        # A rule for what is asked, so that approvals often matter (and are often met).
        focus: dict[str, Any] = {
            "permissions": [draw(st.sampled_from(sorted(asked)))],
            "approvers": ["person"],
        }
        if chain[0] in spec.agents and dice.chance(30):
            focus["agents"] = [chain[0]]
        spec = replace(spec, approvals={**spec.approvals, "focus": focus})
    approved: frozenset[str] = frozenset()
    if spec.approvals and dice.chance(50):
        approved = frozenset(c for c in candidates if dice.chance(50))
    for_approval = bool(spec.approvals) and dice.chance(30)
    return Scenario(spec, person, chain, requests, approved, for_approval)


def load(spec: Spec) -> Policy:
    with tempfile.TemporaryDirectory() as directory:
        # JSON is YAML; json.dumps is much faster than yaml.safe_dump.
        (Path(directory) / "policy.yaml").write_text(json.dumps(spec.document()))
        return load_policy(Path(directory)).policy


# -- the independent model -----------------------------------------------------------------------


def matches(pattern: str, permission: str) -> bool:
    want, have = pattern.split(":"), permission.split(":")
    if want[-1] == "*":
        return len(have) >= len(want) and have[: len(want) - 1] == want[:-1]
    return want == have


def roles_of(spec: Spec, person: Person) -> set[str]:
    roles: set[str] = set()
    for binding in spec.person_bindings:
        if (binding["idp"], binding["subject"]) == (person.idp, person.subject):
            roles.update(binding["roles"])
    for binding in spec.group_bindings:
        if person.idp not in idps_of(binding):
            continue
        if "group" in binding and binding["group"] in person.groups:
            roles.update(binding["roles"])
        if "idp_role" in binding and binding["idp_role"] in person.idp_roles:
            roles.update(binding["roles"])
    return roles


def person_holds(spec: Spec, person: Person, permission: str) -> bool:
    return any(matches(p, permission) for role in roles_of(spec, person) for p in spec.roles[role])


def ceiling_admits(spec: Spec, agent: str, permission: str) -> bool:
    return any(matches(p, permission) for p in spec.agents[agent]["ceiling"])


def may_act_for(spec: Spec, agent: str, person: Person) -> bool:
    return selected(spec, spec.agents[agent]["act_for"], person)


def selected(spec: Spec, selectors: list[str], person: Person) -> bool:
    held = roles_of(spec, person)
    for selector in selectors:
        kind, _, rest = selector.partition(":")
        if kind == "role" and rest in held:
            return True
        idps, _, value = rest.partition("/")
        named = person.idp in idps.split(",")
        if kind == "group" and named and value in person.groups:
            return True
        if kind == "idp-role" and named and value in person.idp_roles:
            return True
        if kind == "person" and (idps, value) == (person.idp, person.subject):
            return True
    return False


def applicable_rules(spec: Spec, person: Person, chain: tuple[str, ...]) -> list[str]:
    """The approval rules (by name, in name order) for `person` through `chain`."""
    return [
        name
        for name, rule in sorted(spec.approvals.items())
        if ("agents" not in rule or set(rule["agents"]) & set(chain))
        and ("people" not in rule or selected(spec, rule["people"], person))
    ]


def governing(spec: Spec, person: Person, chain: tuple[str, ...], permission: str) -> list[str]:
    """The applicable approval rules that govern `permission`."""
    return [
        name
        for name in applicable_rules(spec, person, chain)
        if any(matches(p, permission) for p in spec.approvals[name]["permissions"])
    ]


def held_back(spec: Spec, request: ExchangeRequest, chain: tuple[str, ...], scope: str) -> bool:
    """Whether an approval rule keeps `scope` from this request (none covers it, and the request
    is not one for approval)."""
    return (
        not request.for_approval
        and scope not in request.approved
        and bool(governing(spec, request.person, chain, scope))
    )


def requires_audience(spec: Spec, agent: str) -> bool:
    """A request naming no audience is refused (no default, and required here or globally)."""
    settings = spec.agents[agent]
    if settings.get("default_audiences"):
        return False
    required = settings.get("require_audience")
    return bool(spec.limits["require_audience"] if required is None else required)


def audiences_without_request(spec: Spec, agent: str) -> list[str]:
    """What a request naming no audience gets (before narrowing to a parent token's)."""
    settings = spec.agents[agent]
    return list(settings.get("default_audiences") or settings["audiences"])


def expected_first_hop(spec: Spec, request: ExchangeRequest) -> bool:
    """Whether a request without a parent token should be granted, by the model alone."""
    assert request.parent is None
    agent = spec.agents.get(request.agent)
    if agent is None or not agent["accepts_person_tokens"]:
        return False
    if not may_act_for(spec, request.agent, request.person):
        return False
    if request.audiences and not set(request.audiences) <= set(agent["audiences"]):
        return False
    if not agent["audiences"]:
        return False
    if not request.audiences and requires_audience(spec, request.agent):
        return False

    def allowed(scope: str) -> bool:
        return (
            _PERMISSION.fullmatch(scope) is not None
            and person_holds(spec, request.person, scope)
            and ceiling_admits(spec, request.agent, scope)
        )

    def approved(scope: str) -> bool:
        return not held_back(spec, request, (request.agent,), scope)

    if request.scopes is None:
        return any(allowed(s) and approved(s) for s in agent["default_scopes"])
    return (
        bool(request.scopes)
        and all(allowed(s) for s in request.scopes)
        and all(approved(s) for s in request.scopes)
    )


def check_grant(
    spec: Spec,
    person: Person,
    request: ExchangeRequest,
    decision: Decision,
    *,
    parent_from_broker: bool = True,
) -> None:
    """Properties (a), (b) and (c) of one decision.

    With `parent_from_broker`, the parent grant (if any) came from earlier decisions, so every
    agent of the chain must admit the scopes; an arbitrary parent is only trusted as given.
    """
    if request.parent is None:
        assert decision.allowed == expected_first_hop(spec, request), decision.description
    if not decision.allowed:
        assert decision.scopes == ()
        assert decision.error is not None
        return
    chain = decision.actor_chain
    agent = spec.agents[request.agent]
    assert chain[0] == request.agent
    assert decision.scopes, "a grant always carries some scope"
    assert decision.audiences, "a grant always has an audience"
    assert len(set(decision.scopes)) == len(decision.scopes)
    # (a) covered by the person's rights and every ceiling of the chain; act_for holds.
    checked = chain if parent_from_broker else chain[:1]
    for scope in decision.scopes:
        assert _PERMISSION.fullmatch(scope), scope
        assert person_holds(spec, person, scope), (scope, person)
        for name in checked:
            assert ceiling_admits(spec, name, scope), (scope, name)
    for name in checked:
        assert may_act_for(spec, name, person), (name, person)
    assert set(decision.audiences) <= set(agent["audiences"])
    assert len(chain) <= spec.limits["max_delegation_depth"]
    governed_rules = {name for s in decision.scopes for name in governing(spec, person, chain, s)}
    rule_lifetimes = [
        spec.approvals[name]["token_lifetime_seconds"]
        for name in governed_rules
        if "token_lifetime_seconds" in spec.approvals[name]
    ]
    assert decision.max_lifetime_seconds == min(
        agent["max_token_lifetime_seconds"],
        spec.limits["max_token_lifetime_seconds"],
        *rule_lifetimes,
    )
    # (f) nothing an approval rule holds back is granted; a request for approval lists exactly
    # the rules and what each governs that the approval does not cover.
    for scope in decision.scopes:
        assert not held_back(spec, request, chain, scope), (scope, request.approved)
    expected_approvals = []
    if request.for_approval:
        for name in applicable_rules(spec, person, chain):
            governed = tuple(
                s
                for s in decision.scopes
                if name in governing(spec, person, chain, s) and s not in request.approved
            )
            if governed:
                expected_approvals.append((name, governed))
    assert [(a.rule, a.permissions) for a in decision.approvals] == expected_approvals
    # (b) granted within what was asked for (all of it, for an explicit request) or defaults.
    if request.scopes is not None:
        assert set(decision.scopes) == set(request.scopes)
    elif agent["default_scopes"]:
        assert set(decision.scopes) <= set(agent["default_scopes"])
    else:
        assert request.parent is not None, "no request and no defaults: nothing to grant"
        assert set(decision.scopes) <= request.parent.scopes
    if request.audiences:
        assert set(decision.audiences) == set(request.audiences)
    else:
        assert not requires_audience(spec, request.agent)
        expected = set(audiences_without_request(spec, request.agent))
        if request.parent is not None:
            expected &= set(request.parent.audiences)
        assert set(decision.audiences) == expected
    # (c) a re-exchange never widens its parent grant.
    if request.parent is None:
        assert agent["accepts_person_tokens"]
        assert chain == (request.agent,)
    else:
        assert set(decision.scopes) <= request.parent.scopes
        assert set(decision.audiences) <= set(request.parent.audiences)
        assert chain[1:] == request.parent.actor_chain
        delegator = request.parent.actor_chain[0]
        assert request.agent in spec.agents[delegator]["may_delegate_to"]


@SETTINGS
@given(scenario=scenarios())
def test_chains_with_a_request_per_hop(scenario: Scenario) -> None:
    """Each hop re-exchanges the previous grant with a request of its own."""
    spec, person = scenario.spec, scenario.person
    policy = load(spec)
    parent: ParentGrant | None = None
    for agent, (scopes, audiences) in zip(scenario.chain, scenario.requests, strict=True):
        request = ExchangeRequest(
            person, agent, scopes, audiences, parent, scenario.approved, scenario.for_approval
        )
        decision = decide(policy, request)  # (d): never raises
        check_grant(spec, person, request, decision)
        hop = len(decision.actor_chain)
        if decision.approvals:
            event("a request for approval lists rules to satisfy")
        if request.approved & set(decision.scopes):
            event("granted what an approval covers")
        if not decision.allowed:
            event(f"denied at hop {hop}: {decision.reason}")
            break
        event(f"granted at hop {min(hop, 3)}{'+' if hop >= 3 else ''}")
        parent = ParentGrant(decision.actor_chain, frozenset(decision.scopes), decision.audiences)


@SETTINGS
@given(scenario=scenarios(same_request_each_hop=True))
def test_decide_chain_matches_hop_by_hop_decisions(scenario: Scenario) -> None:
    """`decide_chain` (what policy tests and `broker policy explain` use) is `decide` per hop."""
    spec, person, chain = scenario.spec, scenario.person, scenario.chain
    scopes, audiences = scenario.requests[0]
    policy = load(spec)
    final = decide_chain(
        policy,
        person,
        chain,
        scopes,
        audiences,
        approved=scenario.approved,
        for_approval=scenario.for_approval,
    )
    parent: ParentGrant | None = None
    grants: list[Decision] = []
    decision: Decision | None = None
    for agent in chain:
        request = ExchangeRequest(
            person, agent, scopes, audiences, parent, scenario.approved, scenario.for_approval
        )
        decision = decide(policy, request)
        check_grant(spec, person, request, decision)
        if not decision.allowed:
            break
        grants.append(decision)
        parent = ParentGrant(decision.actor_chain, frozenset(decision.scopes), decision.audiences)
    assert decision == final
    # (c) along the whole chain: each hop's grant within the previous one's.
    for earlier, later in itertools.pairwise(grants):
        assert set(later.scopes) <= set(earlier.scopes)
        assert set(later.audiences) <= set(earlier.audiences)
    event(f"{'granted' if final.allowed else 'denied'} after {min(len(grants), 3)} grant(s)")
    if final.allowed:
        assert len(grants) == len(chain)
        assert final.actor_chain == tuple(reversed(chain))


def reachable(spec: Spec, agent: str) -> set[str]:
    """`agent` and every agent it may delegate to, directly or further down."""
    found: set[str] = set()
    pending = [agent]
    while pending:
        name = pending.pop()
        if name in spec.agents and name not in found:
            found.add(name)
            pending.extend(spec.agents[name]["may_delegate_to"])
    return found


def used_by_policy(spec: Spec, person: Person, agent: str) -> tuple[set[str], set[str]]:
    """The person's groups and IdP roles that a binding at their IdP names, or an ``act_for``
    of `agent` or of an agent it may delegate to, or the ``people`` of an approval rule for any
    agent or for one of those."""
    groups: set[str] = set()
    idp_roles: set[str] = set()
    for binding in spec.group_bindings:
        if person.idp in idps_of(binding):
            groups.update({binding.get("group")} & person.groups)
            idp_roles.update({binding.get("idp_role")} & person.idp_roles)
    names = reachable(spec, agent)
    people_selectors = [
        selector
        for rule in spec.approvals.values()
        if "agents" not in rule or set(rule["agents"]) & names
        for selector in rule.get("people", [])
    ]
    act_for = [s for name in names for s in spec.agents[name]["act_for"]]
    for selector in act_for + people_selectors:
        kind, _, rest = selector.partition(":")
        idps, _, value = rest.partition("/")
        if person.idp in idps.split(","):
            if kind == "group" and value in person.groups:
                groups.add(value)
            if kind == "idp-role" and value in person.idp_roles:
                idp_roles.add(value)
    return groups, idp_roles


@SETTINGS
@given(scenario=scenarios())
def test_tokens_carry_only_what_the_policy_uses_and_decide_the_same(scenario: Scenario) -> None:
    """(e): what each hop's token carries is exactly what the policy uses for that agent and
    those after it; deciding with it or with everything the IdP asserted is the same."""
    spec, person = scenario.spec, scenario.person
    policy = load(spec)
    carried = person  # what the subject token carries at each hop (the IdP's, then a token's)
    parent: ParentGrant | None = None
    for agent, (scopes, audiences) in zip(scenario.chain, scenario.requests, strict=True):
        used = policy.identity_used(carried, agent)
        expected_groups, expected_roles = used_by_policy(spec, carried, agent)
        assert used.groups == expected_groups
        assert used.idp_roles == expected_roles
        assert (used.idp, used.subject) == (person.idp, person.subject)
        extra = (scenario.approved, scenario.for_approval)
        decision = decide(policy, ExchangeRequest(used, agent, scopes, audiences, parent, *extra))
        whole = ExchangeRequest(person, agent, scopes, audiences, parent, *extra)
        assert decision == decide(policy, whole)
        event(f"carried {len(used.groups)} of {len(person.groups)} groups")
        if not decision.allowed:
            break
        carried = used
        parent = ParentGrant(decision.actor_chain, frozenset(decision.scopes), decision.audiences)


arbitrary_text = st.text(max_size=12)
odd_people = st.builds(
    Person, idp=arbitrary_text, subject=arbitrary_text, groups=st.frozensets(arbitrary_text)
)
odd_strings = st.lists(arbitrary_text, max_size=3).map(tuple)


@SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_arbitrary_requests_and_parent_tokens(scenario: Scenario, data: st.DataObject) -> None:
    """Any person, agent name, scope and audience strings and any parent token (even ones the
    broker would never have issued): `decide` answers, and a grant still obeys (a) to (c)."""
    spec = scenario.spec
    draw = data.draw
    dice = Dice(draw)
    scopes, audiences = scenario.requests[0]
    agent = scenario.chain[0]
    parent: ParentGrant | None = None
    kind = dice.rng.random()
    delegated = sorted({t for a in spec.agents.values() for t in a["may_delegate_to"]})
    if kind < 0.5 and delegated:
        # A parent token as a delegator of `agent` might present it, with made-up contents.
        agent = draw(st.sampled_from(delegated))
        delegators = sorted(n for n, a in spec.agents.items() if agent in a["may_delegate_to"])
        tail = draw(st.lists(st.sampled_from([*AGENT_NAMES, "ghost"]), max_size=3))
        held = {*(scopes or ()), *spec.agents[agent]["default_scopes"]}
        parent = ParentGrant(
            actor_chain=(draw(st.sampled_from(delegators)), *tail),
            scopes=frozenset(draw(st.lists(st.one_of(permissions, requested_scope), max_size=3)))
            | {s for s in held if dice.chance(80)},
            audiences=tuple(a for a in [*AUDIENCES, "u4"] if dice.chance(70)),
        )
    elif kind < 0.7:
        parent = ParentGrant(
            actor_chain=draw(st.lists(arbitrary_text, max_size=5).map(tuple)),
            scopes=draw(st.frozensets(arbitrary_text, max_size=4)),
            audiences=draw(odd_strings),
        )
    person = draw(odd_people) if dice.chance(15) else scenario.person
    if dice.chance(10):
        agent = draw(arbitrary_text)
    if dice.chance(15):
        scopes = draw(odd_strings)
    if dice.chance(10):
        audiences = draw(odd_strings)
    approved = scenario.approved
    if dice.chance(20):
        approved |= draw(st.frozensets(st.one_of(arbitrary_text, permissions), max_size=3))
    request = ExchangeRequest(
        person, agent, scopes, audiences, parent, approved, scenario.for_approval
    )
    decision = decide(load(spec), request)  # (d): never raises, whatever it is given
    event("granted" if decision.allowed else f"denied: {decision.reason}")
    if decision.allowed:
        check_grant(spec, person, request, decision, parent_from_broker=False)
    else:
        assert decision.error in {
            "invalid_scope",
            "invalid_target",
            "unauthorized_client",
            "invalid_grant",
        }

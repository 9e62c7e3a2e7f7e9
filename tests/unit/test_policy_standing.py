"""`standing`: what the policy in force still lets an issued token hold (re-checked at credential
fetch, so narrowing the policy narrows tokens already issued).

Properties, over the generated policies, people and chains of test_policy_properties.py and
its independent model:

(e) never more than the person's rights and every ceiling of the chain, and only while every
    agent of the chain is declared and may act for the person;
(f) everything `decide` grants along a chain is in standing under the same policy (a fresh
    token is never refused at fetch);
(g) removing a permission from the person's roles, or from any ceiling of the chain, withdraws
    it; and `standing` never raises;
(h) what an approval rule applicable to the person and chain governs stays only where the
    token's approval covers it.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import event, given
from hypothesis import strategies as st

from broker.policy import ParentGrant, Person, Reason, decide, standing
from broker.policy.approvals import approved_permissions
from broker.policy.engine import ExchangeRequest
from tests.unit.test_policy_properties import (
    SETTINGS,
    Scenario,
    Spec,
    ceiling_admits,
    concrete,
    governing,
    load,
    may_act_for,
    person_holds,
    requested_scope,
    scenarios,
)


def _candidates(spec: Spec) -> list[str]:
    return sorted(
        {
            c
            for patterns in (*spec.roles.values(), *(a["ceiling"] for a in spec.agents.values()))
            for p in patterns
            for c in concrete(p)
        }
    )


@SETTINGS
@given(scenario=scenarios(), extra=st.lists(requested_scope, max_size=3))
def test_standing_never_exceeds_person_and_every_ceiling(
    scenario: Scenario, extra: list[str]
) -> None:
    spec, person = scenario.spec, scenario.person
    chain = tuple(reversed(scenario.chain))  # most recent agent first, as in `act`
    held = standing(load(spec), person, chain, scenario.approved)
    for scope in [*_candidates(spec), *extra]:
        if held.withdrawn(scope) is None:
            event("some scope in standing")
            assert scope in scenario.approved or not governing(spec, person, chain, scope)
            assert person_holds(spec, person, scope)
            for name in chain:
                assert name in spec.agents
                assert ceiling_admits(spec, name, scope)
                assert may_act_for(spec, name, person)


@SETTINGS
@given(scenario=scenarios())
def test_what_decide_grants_is_in_standing(scenario: Scenario) -> None:
    spec, person = scenario.spec, scenario.person
    policy = load(spec)
    parent: ParentGrant | None = None
    for agent, (scopes, audiences) in zip(scenario.chain, scenario.requests, strict=True):
        request = ExchangeRequest(
            person, agent, scopes, audiences, parent, scenario.approved, scenario.for_approval
        )
        decision = decide(policy, request)
        if not decision.allowed:
            break
        # What an approved request for approval yields carries what the approval covered.
        approved = scenario.approved | approved_permissions(decision.approvals)
        held = standing(policy, person, decision.actor_chain, approved)
        assert held.policy_version == policy.version
        for scope in decision.scopes:
            assert held.withdrawn(scope) is None, (scope, decision.actor_chain)
        event(f"granted hop {len(decision.actor_chain)} in standing")
        parent = ParentGrant(decision.actor_chain, frozenset(decision.scopes), decision.audiences)


@SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_removing_a_right_or_a_ceiling_withdraws_it(
    scenario: Scenario, data: st.DataObject
) -> None:
    spec, person = scenario.spec, scenario.person
    chain = tuple(reversed(scenario.chain))
    before = standing(load(spec), person, chain)
    in_standing = [s for s in _candidates(spec) if before.withdrawn(s) is None]
    if not in_standing:
        return
    scope = data.draw(st.sampled_from(in_standing))
    event("narrowed")
    if data.draw(st.booleans()):  # the person loses it: every role stops covering it
        roles = {
            name: [p for p in perms if not _covers(p, scope)] or ["zz:none"]
            for name, perms in spec.roles.items()
        }
        narrowed = replace(spec, roles=roles)
        expected = Reason.PERSON_LACKS_SCOPE
    else:  # one agent of the chain loses it from its ceiling
        name = data.draw(st.sampled_from(sorted(set(chain))))
        agents = dict(spec.agents)
        ceiling = [p for p in agents[name]["ceiling"] if not _covers(p, scope)]
        agents[name] = {**agents[name], "ceiling": ceiling}
        narrowed = replace(spec, agents=agents)
        expected = Reason.CEILING_EXCLUDES_SCOPE
    after = standing(load(narrowed), person, chain)
    # act_for through a role may go with the right: then the whole chain is withdrawn.
    assert after.withdrawn(scope) in {expected, Reason.NOT_ACT_FOR}


@SETTINGS
@given(scenario=scenarios(), data=st.data())
def test_a_new_approval_rule_withdraws_what_it_governs_unless_approved(
    scenario: Scenario, data: st.DataObject
) -> None:
    spec, person = scenario.spec, scenario.person
    chain = tuple(reversed(scenario.chain))
    before = standing(load(spec), person, chain, scenario.approved)
    in_standing = [s for s in _candidates(spec) if before.withdrawn(s) is None]
    if not in_standing:
        return
    scope = data.draw(st.sampled_from(in_standing))
    rule: dict[str, object] = {"permissions": [scope], "approvers": ["person"]}
    if data.draw(st.booleans()):
        rule["agents"] = [data.draw(st.sampled_from(sorted(set(chain))))]
    event("a new rule" + (" for an agent of the chain" if "agents" in rule else ""))
    policy = load(replace(spec, approvals={**spec.approvals, "new": rule}))
    without = standing(policy, person, chain, scenario.approved - {scope})
    assert without.withdrawn(scope) is Reason.APPROVAL_REQUIRED
    assert standing(policy, person, chain, scenario.approved | {scope}).withdrawn(scope) is None


def _covers(pattern: str, scope: str) -> bool:
    if pattern.endswith(":*"):
        return scope.startswith(pattern[:-1])
    return pattern == scope


def test_standing_of_an_empty_or_unknown_chain_holds_nothing() -> None:
    person = Person("i1", "s0", frozenset({"g0"}))
    spec = Spec({"r0": ["a"]}, [], [], {}, {"max_token_lifetime_seconds": 300})
    policy = load(spec)
    assert standing(policy, person, ()).withdrawn("a") is Reason.UNKNOWN_AGENT
    assert standing(policy, person, ("ghost",)).withdrawn("a") is Reason.UNKNOWN_AGENT

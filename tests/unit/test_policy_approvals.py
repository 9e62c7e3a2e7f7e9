"""Approval rules: loading and validation, `decide` with approvals, `standing`, who may approve.

Policies are YAML loaded with `load_policy`, so the loader's checks and compilation are
exercised together with the engine and `broker.policy.approvals`.
"""

from __future__ import annotations

import textwrap
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from broker.policy import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    PolicyError,
    Reason,
    decide,
    load_policy,
    standing,
)
from broker.policy.access import RememberedStandings
from broker.policy.approvals import (
    ApprovalRequirement,
    Refusal,
    applicable_rules,
    approval_requirements,
    approved_in,
    approved_permissions,
    eligible_approvals,
    may_approve,
    outstanding,
    quorum_met,
)
from broker.policy.loader import configured_names
from broker.types import BrokerToken, Provenance, TokenType

_AUTH = "authentication: {method: client_secret_basic, secret_ref: 'env:X'}"

BASE = f"""
roles:
  reader: {{permissions: [docs:read]}}
  writer: {{permissions: [docs:write, docs:delete, "deploy:*"]}}
  approver: {{permissions: [docs:read]}}
group_bindings:
  - {{idp: corp, group: readers, roles: [reader]}}
  - {{idp: corp, group: writers, roles: [reader, writer]}}
  - {{idp: corp, group: managers, roles: [approver]}}
agents:
  main:
    {_AUTH}
    ceiling: [docs:read, docs:write, docs:delete, "deploy:*"]
    default_scopes: [docs:read, docs:write]
    audiences: [api]
    max_token_lifetime_seconds: 900
    act_for: ["role:reader"]
    may_delegate_to: [sub]
  sub:
    {_AUTH}
    ceiling: [docs:read, docs:write, docs:delete]
    audiences: [api]
    act_for: ["role:reader"]
    accepts_person_tokens: false
  other:
    {_AUTH}
    ceiling: [docs:read, docs:write]
    default_scopes: [docs:write]
    audiences: [api]
    act_for: ["role:reader"]
"""

APPROVALS = """
approvals:
  delete-consent:
    description: the person confirms deletions made by main
    permissions: [docs:delete]
    agents: [main]
    approvers: [person]
    token_lifetime_seconds: 120
  writes-by-writers:
    permissions: [docs:write]
    people: ["group:corp/writers"]
    approvers: ["group:corp/managers", "role:approver"]
    quorum: 2
    request_expiry_seconds: 600
    channels: [ops-webhook]
  deploys:
    permissions: ["deploy:*"]
    approvers: [person, "person:corp/boss"]
    quorum: 2
"""

WRITER = Person("corp", "wanda", frozenset({"writers"}))
READER = Person("corp", "rita", frozenset({"readers"}))
MANAGER = Person("corp", "mona", frozenset({"managers"}))
MANAGER2 = Person("corp", "milo", frozenset({"managers"}))
BOSS = Person("corp", "boss")
STRANGER = Person("corp", "sam", frozenset({"visitors"}))


def _load(tmp_path: Path, *texts: str, **known: list[str]) -> Policy:
    directory = tmp_path / "policy"
    directory.mkdir(exist_ok=True)
    for index, text in enumerate(texts):
        (directory / f"p{index}.yaml").write_text(textwrap.dedent(text))
    return load_policy(directory, **known).policy  # type: ignore[arg-type]


def _problems(tmp_path: Path, *texts: str, **known: list[str]) -> str:
    with pytest.raises(PolicyError) as failed:
        _load(tmp_path, *texts, **known)
    return "\n".join(failed.value.problems)


@pytest.fixture
def policy(tmp_path: Path) -> Policy:
    return _load(tmp_path, BASE, APPROVALS)


# -- loading and validation --------------------------------------------------------------------


def test_rules_compile_in_name_order_with_defaults(policy: Policy) -> None:
    assert [r.name for r in policy.approval_rules] == [
        "delete-consent",
        "deploys",
        "writes-by-writers",
    ]
    consent = policy.approval_rule("delete-consent")
    assert consent is not None
    assert consent.consent and consent.approvers == () and consent.quorum == 1
    assert consent.request_expiry_seconds == 300
    assert consent.agents == frozenset({"main"}) and consent.people is None
    writes = policy.approval_rule("writes-by-writers")
    assert writes is not None and not writes.consent
    assert writes.approvers == ("group:corp/managers", "role:approver")
    assert writes.channels == ("ops-webhook",) and writes.token_lifetime_seconds is None
    assert policy.approval_rule("nope") is None


def test_a_policy_without_rules_has_none(tmp_path: Path) -> None:
    assert _load(tmp_path, BASE).approval_rules == ()


def test_unknown_agent_and_role_are_errors(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        BASE,
        """
        approvals:
          r:
            permissions: [docs:write]
            agents: [ghost]
            people: ["role:nobody"]
            approvers: ["role:missing"]
        """,
    )
    assert "approvals.r.agents: unknown agent 'ghost'" in problems
    assert "approvals.r.people: unknown role 'nobody'" in problems
    assert "approvals.r.approvers: unknown role 'missing'" in problems


@pytest.mark.parametrize(
    ("rule", "expected"),
    [
        ("{permissions: [docs:write], approvers: [somebody]}", "neither 'person'"),
        ("{permissions: [docs:write], approvers: ['group:corp']}", "neither 'person'"),
        ("{permissions: [docs:write], approvers: []}", "at least 1 item"),
        ("{permissions: [docs:write], approvers: [person, person]}", "more than once: person"),
        ("{permissions: [docs:write], people: ['grp:x/y'], approvers: [person]}", "not a selector"),
        ("{permissions: ['*'], approvers: [person]}", "not a permission pattern"),
        ("{permissions: [], approvers: [person]}", "at least 1 item"),
        ("{permissions: [docs:write], approvers: [person], quorum: 2}", "can never be met"),
        (
            "{permissions: [docs:write], approvers: [person, 'person:corp/x'], quorum: 3}",
            "can never be met",
        ),
        ("{permissions: [docs:write], approvers: [person], quorum: 0}", "greater than or equal"),
        (
            "{permissions: [docs:write], approvers: [person], request_expiry_seconds: 5}",
            "greater than or equal to 30",
        ),
        (
            "{permissions: [docs:write], approvers: [person], request_expiry_seconds: 90000}",
            "less than or equal to 86400",
        ),
        ("{permissions: [docs:write], approvers: [person], extra: 1}", "Extra inputs"),
        ("{permissions: [docs:write], approvers: [person], channels: [a, a]}", "more than once"),
    ],
)
def test_malformed_rules_are_refused(tmp_path: Path, rule: str, expected: str) -> None:
    assert expected in _problems(tmp_path, BASE, f"approvals:\n  r: {rule}\n")


def test_a_quorum_a_group_can_meet_is_accepted(tmp_path: Path) -> None:
    text = """
    approvals:
      r: {permissions: [docs:write], approvers: [person, "person:corp/x"], quorum: 2}
      s: {permissions: [docs:write], approvers: ["group:corp/managers"], quorum: 5}
    """
    assert [r.quorum for r in _load(tmp_path, BASE, text).approval_rules] == [2, 5]


def test_rule_names_are_unique_across_files(tmp_path: Path) -> None:
    rule = "approvals:\n  r: {permissions: [docs:write], approvers: [person]}\n"
    assert "approvals.r: already defined in p1.yaml" in _problems(tmp_path, BASE, rule, rule)


def test_channels_are_checked_where_the_configuration_is_known(tmp_path: Path) -> None:
    problems = _problems(tmp_path, BASE, APPROVALS, known_notification_channels=["slack"])
    assert "no notification channel 'ops-webhook' is configured (configured: slack)" in problems
    assert _load(tmp_path, BASE, APPROVALS, known_notification_channels=["ops-webhook"])


# -- decide --------------------------------------------------------------------------------------


def _decide(
    policy: Policy, person: Person, agent: str, scopes: tuple[str, ...] | None, **kw: object
) -> Decision:
    return decide(policy, ExchangeRequest(person, agent, scopes, **kw))  # type: ignore[arg-type]


def test_an_explicit_request_needing_approval_is_refused_naming_permission_and_rule(
    policy: Policy,
) -> None:
    decision = _decide(policy, WRITER, "main", ("docs:read", "docs:delete"))
    assert not decision.allowed
    assert decision.reasons == (Reason.APPROVAL_REQUIRED,)
    assert decision.reason == "approval_required" and decision.error == "invalid_scope"
    assert "'docs:delete'" in decision.description
    assert "'delete-consent'" in decision.description
    assert "needs approval" in decision.description
    assert decision.scopes == () and decision.approvals == ()
    verdicts = {v.scope: v.reasons for v in decision.scope_verdicts}
    assert verdicts == {"docs:read": (), "docs:delete": (Reason.APPROVAL_REQUIRED,)}


def test_other_refusals_come_before_approval(policy: Policy) -> None:
    # The reader does not hold docs:delete: approval could not help, so that is the answer.
    decision = _decide(policy, READER, "main", ("docs:delete",), for_approval=True)
    assert decision.reasons == (Reason.PERSON_LACKS_SCOPE,)


def test_defaults_needing_approval_are_left_out(policy: Policy) -> None:
    decision = _decide(policy, WRITER, "main", None)  # defaults docs:read, docs:write
    assert decision.allowed and decision.scopes == ("docs:read",)
    verdicts = {v.scope: v.reasons for v in decision.scope_verdicts}
    assert verdicts["docs:write"] == (Reason.APPROVAL_REQUIRED,)
    # ...and when nothing is left, nothing is granted.
    only = _decide(policy, WRITER, "other", None)
    assert not only.allowed and only.reasons == (Reason.NO_SCOPE,)


def test_rules_apply_only_to_their_agents_and_people(policy: Policy) -> None:
    # delete-consent names `main` only; writes-by-writers only people in corp/writers.
    assert _decide(policy, WRITER, "main", ("docs:write",)).reason == "approval_required"
    assert _decide(policy, WRITER, "other", ("docs:write",)).reason == "approval_required"
    reader_writer = Person("corp", "rex", frozenset({"readers"}))
    assert applicable_rules(policy, reader_writer, ["main"])[0].name == "delete-consent"
    assert [r.name for r in applicable_rules(policy, reader_writer, ["other"])] == ["deploys"]


def test_a_rule_for_an_agent_governs_the_chain_below_it(policy: Policy) -> None:
    first = _decide(
        policy, WRITER, "main", ("docs:read", "docs:delete"), approved=frozenset({"docs:delete"})
    )
    assert first.allowed
    parent = ParentGrant(first.actor_chain, frozenset(first.scopes), first.audiences)
    # `sub` is not named by the rule, but `main` is in its chain.
    refused = _decide(policy, WRITER, "sub", ("docs:delete",), parent=parent)
    assert refused.reason == "approval_required"
    carried = _decide(
        policy, WRITER, "sub", ("docs:delete",), parent=parent, approved=frozenset({"docs:delete"})
    )
    assert carried.allowed and carried.scopes == ("docs:delete",)


def test_approved_permissions_are_granted_with_the_rule_lifetime(policy: Policy) -> None:
    decision = _decide(
        policy, WRITER, "main", ("docs:read", "docs:delete"), approved=frozenset({"docs:delete"})
    )
    assert decision.allowed and decision.scopes == ("docs:read", "docs:delete")
    assert decision.max_lifetime_seconds == 120  # token_lifetime_seconds of delete-consent
    assert decision.approvals == ()
    without = _decide(policy, WRITER, "main", ("docs:read",))
    assert without.max_lifetime_seconds == 900


def test_an_approval_for_one_permission_does_not_cover_another(policy: Policy) -> None:
    decision = _decide(
        policy, WRITER, "main", ("docs:delete", "docs:write"), approved=frozenset({"docs:delete"})
    )
    assert decision.reason == "approval_required"
    assert "'docs:write'" in decision.description and "'docs:delete'" not in decision.description


def test_for_approval_grants_and_lists_the_rules_to_satisfy(policy: Policy) -> None:
    decision = _decide(
        policy, WRITER, "main", ("docs:read", "docs:delete", "docs:write"), for_approval=True
    )
    assert decision.allowed
    assert decision.scopes == ("docs:read", "docs:delete", "docs:write")
    assert decision.approvals == (
        ApprovalRequirement(
            rule="delete-consent",
            permissions=("docs:delete",),
            consent=True,
            approvers=(),
            quorum=1,
            request_expiry_seconds=300,
            token_lifetime_seconds=120,
            channels=(),
        ),
        ApprovalRequirement(
            rule="writes-by-writers",
            permissions=("docs:write",),
            consent=False,
            approvers=("group:corp/managers", "role:approver"),
            quorum=2,
            request_expiry_seconds=600,
            token_lifetime_seconds=None,
            channels=("ops-webhook",),
        ),
    )
    assert approved_permissions(decision.approvals) == {"docs:delete", "docs:write"}
    assert decision.max_lifetime_seconds == 120
    # Nothing governed: nothing to approve.
    plain = _decide(policy, WRITER, "main", ("docs:read",), for_approval=True)
    assert plain.allowed and plain.approvals == ()


def test_a_permission_two_rules_govern_needs_both(tmp_path: Path) -> None:
    text = """
    approvals:
      a: {permissions: ["deploy:*"], approvers: [person]}
      b: {permissions: [deploy:prod], approvers: ["group:corp/managers"]}
    """
    policy = _load(tmp_path, BASE, text)
    decision = _decide(policy, WRITER, "main", ("deploy:prod", "deploy:dev"), for_approval=True)
    assert [(r.rule, r.permissions) for r in decision.approvals] == [
        ("a", ("deploy:prod", "deploy:dev")),
        ("b", ("deploy:prod",)),
    ]
    assert approval_requirements(policy, WRITER, ["main"], ["deploy:dev"]) == (
        replace(decision.approvals[0], permissions=("deploy:dev",)),
    )


# -- identity and standing -----------------------------------------------------------------------


def test_people_selectors_groups_survive_trimming(tmp_path: Path) -> None:
    text = """
    approvals:
      r: {permissions: [docs:write], people: ["group:corp/vip", "idp-role:corp/exec"],
          approvers: ["group:corp/approvers"]}
      s: {permissions: [docs:write], agents: [other], people: ["group:corp/other-only"],
          approvers: [person]}
    """
    policy = _load(tmp_path, BASE, text)
    person = Person(
        "corp",
        "v",
        frozenset({"writers", "vip", "approvers", "other-only"}),
        frozenset({"exec", "x"}),
    )
    used = policy.identity_used(person, "main")
    assert used.groups == {"writers", "vip"}  # not the approver group, not `other`'s rule
    assert used.idp_roles == {"exec"}
    request = ExchangeRequest(used, "main", ("docs:write",))
    assert decide(policy, request) == decide(
        policy, ExchangeRequest(person, "main", ("docs:write",))
    )
    assert decide(policy, request).reason == "approval_required"


def test_standing_withdraws_what_a_rule_now_governs_unless_approved(policy: Policy) -> None:
    held = standing(policy, WRITER, ("main",))
    assert held.withdrawn("docs:read") is None
    assert held.withdrawn("docs:delete") is Reason.APPROVAL_REQUIRED
    assert held.withdrawn("docs:write") is Reason.APPROVAL_REQUIRED
    assert "approval" in held.describe(Reason.APPROVAL_REQUIRED)
    approved = standing(policy, WRITER, ("main",), approved=frozenset({"docs:delete"}))
    assert approved.withdrawn("docs:delete") is None
    assert approved.withdrawn("docs:write") is Reason.APPROVAL_REQUIRED
    # A chain no rule names: delete-consent does not apply.
    assert standing(policy, WRITER, ("other",)).withdrawn("docs:read") is None


# -- who may approve -----------------------------------------------------------------------------


def _requirement(policy: Policy, rule: str, person: Person = WRITER) -> ApprovalRequirement:
    found = {
        r.rule: r
        for r in approval_requirements(
            policy, person, ["main"], ["docs:delete", "docs:write", "deploy:prod"]
        )
    }
    return found[rule]


def test_the_person_approves_a_consent_rule(policy: Policy) -> None:
    requirement = _requirement(policy, "delete-consent")
    assert may_approve(policy, requirement, WRITER, person=WRITER, agent_chain=("main",)) is None
    assert may_approve(policy, requirement, MANAGER, person=WRITER, agent_chain=("main",)) == (
        Refusal.NOT_ELIGIBLE
    )


def test_the_person_never_approves_a_rule_without_consent_even_if_selected(
    policy: Policy,
) -> None:
    requirement = _requirement(policy, "writes-by-writers")
    manager_writer = Person("corp", "wanda", frozenset({"writers", "managers"}))
    assert (
        may_approve(
            policy, requirement, manager_writer, person=manager_writer, agent_chain=("main",)
        )
        == "self_approval"
    )
    # Same idp and subject is the same person, whatever groups the approver's sign-in carries.
    assert may_approve(
        policy, requirement, manager_writer, person=WRITER, agent_chain=("main",)
    ) == ("self_approval")


def test_selectors_decide_who_else_may_approve(policy: Policy) -> None:
    requirement = _requirement(policy, "writes-by-writers")
    chain = ("main",)
    assert may_approve(policy, requirement, MANAGER, person=WRITER, agent_chain=chain) is None
    assert may_approve(policy, requirement, STRANGER, person=WRITER, agent_chain=chain) == (
        "not_eligible"
    )
    # Another IdP's group of the same name is not the same group.
    foreign = Person("elsewhere", "mona", frozenset({"managers"}))
    assert may_approve(policy, requirement, foreign, person=WRITER, agent_chain=chain) == (
        "not_eligible"
    )
    deploys = _requirement(policy, "deploys")
    assert may_approve(policy, deploys, BOSS, person=WRITER, agent_chain=chain) is None
    assert may_approve(policy, deploys, WRITER, person=WRITER, agent_chain=chain) is None


def test_nobody_in_the_agent_chain_approves(policy: Policy) -> None:
    requirement = _requirement(policy, "writes-by-writers")
    agent_named = Person("corp", "main", frozenset({"managers"}))
    assert may_approve(
        policy, requirement, agent_named, person=WRITER, agent_chain=("sub", "main")
    ) == ("in_agent_chain")


def test_quorum_counts_distinct_eligible_approvers(policy: Policy) -> None:
    requirement = _requirement(policy, "writes-by-writers")
    chain = ("main",)

    def count(*approvers: Person) -> int:
        return len(
            eligible_approvals(policy, requirement, approvers, person=WRITER, agent_chain=chain)
        )

    assert count(MANAGER, MANAGER, STRANGER, WRITER) == 1
    assert count(MANAGER, MANAGER2) == 2
    both = [requirement, _requirement(policy, "delete-consent")]
    assert outstanding(policy, both, [MANAGER, MANAGER], person=WRITER, agent_chain=chain) == {
        "writes-by-writers": 1,
        "delete-consent": 1,
    }
    assert not quorum_met(policy, both, [MANAGER, MANAGER2], person=WRITER, agent_chain=chain)
    assert quorum_met(policy, both, [MANAGER, WRITER, MANAGER2], person=WRITER, agent_chain=chain)
    assert quorum_met(policy, [], [], person=WRITER, agent_chain=chain)


def test_eligibility_follows_the_requirement_when_the_rule_has_changed(
    tmp_path: Path, policy: Policy
) -> None:
    requirement = _requirement(policy, "writes-by-writers")
    edited = _load(tmp_path, BASE)  # the rule is gone: the requirement still says who
    assert may_approve(edited, requirement, MANAGER, person=WRITER, agent_chain=("main",)) is None
    assert may_approve(edited, requirement, STRANGER, person=WRITER, agent_chain=("main",)) == (
        "not_eligible"
    )


# -- a token's approval, at credential fetch -----------------------------------------------------


@pytest.mark.parametrize(
    ("claims", "expected"),
    [
        ({}, frozenset()),
        ({"approval": "yes"}, frozenset()),
        ({"approval": {"id": "a1"}}, frozenset()),
        ({"approval": {"permissions": "docs:delete"}}, frozenset()),
        ({"approval": {"permissions": ["docs:delete", 7, None]}}, frozenset({"docs:delete"})),
    ],
)
def test_a_token_approval_covers_only_the_permissions_it_lists(
    claims: dict[str, object], expected: frozenset[str]
) -> None:
    assert approved_in(claims) == expected


def _token(claims: dict[str, object]) -> BrokerToken:
    provenance = Provenance(
        "corp", "wanda", frozenset({"writers"}), None, TokenType.ID_TOKEN, 1_800_003_600
    )
    return BrokerToken(
        jti="j",
        subject="corp/wanda",
        client_id="main",
        scopes=frozenset({"docs:delete"}),
        audiences=("api",),
        actor_chain=("main",),
        provenance=provenance,
        policy_version="v",
        issued_at=1_800_000_000,
        expires_at=1_800_000_600,
        parent_jti=None,
        claims=claims,
    )


def test_remembered_standings_honour_the_token_approval(policy: Policy) -> None:
    remembered = RememberedStandings()
    plain = remembered.of(policy, _token({}))
    assert plain.withdrawn("docs:delete") is Reason.APPROVAL_REQUIRED
    approved = remembered.of(policy, _token({"approval": {"permissions": ["docs:delete"]}}))
    assert approved.withdrawn("docs:delete") is None
    # Remembered apart: the approved token's answer is not the plain one's, nor the reverse.
    assert remembered.of(policy, _token({})).withdrawn("docs:delete") is Reason.APPROVAL_REQUIRED


def test_configured_names_carry_notification_channels_where_settings_have_them() -> None:
    bare = SimpleNamespace(workload_issuers=[], secret_backends=[])
    assert "known_notification_channels" not in configured_names(bare)  # type: ignore[arg-type]
    channels = SimpleNamespace(channels={"ops-webhook": object(), "slack": object()})
    settings = SimpleNamespace(workload_issuers=[], secret_backends=[], notifications=channels)
    names = configured_names(settings)  # type: ignore[arg-type]
    assert names["known_notification_channels"] == ("ops-webhook", "slack")


# -- the agent's CIBA backchannel ------------------------------------------------------------------


def _agent_with(backchannel: str) -> str:
    return f"""
    agents:
      pinger:
        {_AUTH}
        ceiling: [docs:read]
        audiences: [api]
        act_for: ["role:reader"]
        backchannel: {backchannel}
    """


def test_an_agent_polls_unless_it_registers_a_ping_endpoint(tmp_path: Path) -> None:
    policy = _load(tmp_path, BASE)
    assert policy.agents["main"].spec.backchannel.token_delivery_mode == "poll"
    assert policy.agents["main"].spec.backchannel.client_notification_endpoint is None
    ping = "{token_delivery_mode: ping, client_notification_endpoint: 'https://a.example/cb'}"
    pinger = _load(tmp_path, BASE, _agent_with(ping)).agents["pinger"]
    assert pinger.spec.backchannel.client_notification_endpoint == "https://a.example/cb"
    loopback = "{token_delivery_mode: ping, client_notification_endpoint: 'http://127.0.0.1:9/cb'}"
    assert _load(tmp_path, BASE, _agent_with(loopback)).agents["pinger"]


@pytest.mark.parametrize(
    ("backchannel", "expected"),
    [
        ("{token_delivery_mode: ping}", "ping needs a client_notification_endpoint"),
        ("{client_notification_endpoint: 'https://a.example/cb'}", "only for token_delivery_mode"),
        ("{token_delivery_mode: push}", "'poll' or 'ping'"),
        (
            "{token_delivery_mode: ping, client_notification_endpoint: 'http://a.example/cb'}",
            "must use https",
        ),
        (
            "{token_delivery_mode: ping, client_notification_endpoint: 'https://a.example/#x'}",
            "must not have a fragment",
        ),
    ],
)
def test_a_malformed_backchannel_is_refused(
    tmp_path: Path, backchannel: str, expected: str
) -> None:
    assert expected in _problems(tmp_path, BASE, _agent_with(backchannel))

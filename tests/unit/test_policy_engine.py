"""The pure decision (`decide`): every reason code, delegation narrowing, defaults, lifetimes.

Policies are written as YAML to a temporary directory and loaded with `load_policy`, so the
loader's compilation is exercised together with the engine.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from broker.policy import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    Reason,
    decide,
    decide_chain,
    explain,
    load_policy,
)

_AUTH = "authentication: {method: client_secret_basic, secret_ref: 'env:X'}"

POLICY_YAML = f"""
roles:
  reader: {{permissions: [docs:read, kb:read]}}
  writer: {{permissions: [docs:write]}}
  llm-user: {{permissions: ["llm:*"]}}
group_bindings:
  - {{idp: corp, group: readers, roles: [reader]}}
  - {{idp: corp, group: writers, roles: [reader, writer]}}
  - {{idp: corp, group: ai, roles: [llm-user]}}
  - {{idp: other, group: readers, roles: [writer]}}
person_bindings:
  - {{idp: corp, subject: vip, roles: [writer]}}
agents:
  main:
    {_AUTH}
    ceiling: [docs:read, docs:write, "llm:openai:*"]
    default_scopes: [docs:read, docs:write]
    audiences: [api, llm]
    max_token_lifetime_seconds: 600
    act_for: ["group:corp/readers", "group:corp/writers", "person:corp/vip", "role:llm-user"]
    may_delegate_to: [sub]
  sub:
    {_AUTH}
    ceiling: [docs:read, kb:read, "llm:*"]
    default_scopes: [docs:read]
    audiences: [api, llm, extra]
    max_token_lifetime_seconds: 7200
    act_for: ["role:reader", "role:llm-user"]
    accepts_person_tokens: false
    may_delegate_to: [leaf]
  leaf:
    {_AUTH}
    ceiling: [docs:read]
    audiences: [api]
    act_for: ["role:reader"]
    accepts_person_tokens: false
    may_delegate_to: [leaf2]
  leaf2:
    {_AUTH}
    ceiling: [docs:read]
    audiences: [api]
    act_for: ["role:reader"]
    accepts_person_tokens: false
  lonely:
    {_AUTH}
    ceiling: [docs:read]
    act_for: ["group:corp/readers"]
limits: {{max_token_lifetime_seconds: 3600, max_delegation_depth: 3}}
"""

READER = Person("corp", "alice", frozenset({"readers"}))
WRITER = Person("corp", "wanda", frozenset({"writers"}))
VIP = Person("corp", "vip")
AI_USER = Person("corp", "ai-person", frozenset({"ai"}))
STRANGER = Person("corp", "mallory", frozenset({"visitors"}))


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> Policy:
    directory = tmp_path_factory.mktemp("policy")
    (directory / "policy.yaml").write_text(textwrap.dedent(POLICY_YAML))
    return load_policy(directory).policy


def _decide(
    policy: Policy,
    person: Person,
    agent: str,
    scopes: tuple[str, ...] | None = None,
    audiences: tuple[str, ...] = (),
    parent: ParentGrant | None = None,
) -> Decision:
    return decide(policy, ExchangeRequest(person, agent, scopes, audiences, parent))


def _parent(decision: Decision) -> ParentGrant:
    assert decision.allowed, decision.description
    return ParentGrant(decision.actor_chain, frozenset(decision.scopes), decision.audiences)


def _denied(decision: Decision, reason: Reason, error: str) -> None:
    assert not decision.allowed
    assert decision.reasons[0] == reason, decision.description
    assert decision.reason == str(reason)
    assert decision.error == error
    assert decision.scopes == ()
    assert decision.max_lifetime_seconds == 0


# -- granted --------------------------------------------------------------------------------


def test_granted(policy: Policy) -> None:
    decision = _decide(policy, READER, "main", ("docs:read",), ("api",))
    assert decision.allowed
    assert decision.reasons == ()
    assert decision.reason == str(Reason.GRANTED)
    assert decision.error is None
    assert decision.scopes == ("docs:read",)
    assert decision.audiences == ("api",)
    assert decision.actor_chain == ("main",)
    assert decision.policy_version == policy.version
    assert [v.scope for v in decision.scope_verdicts] == ["docs:read"]
    assert all(v.allowed for v in decision.scope_verdicts)


def test_granted_through_person_binding_and_wildcard_role(policy: Policy) -> None:
    assert _decide(policy, VIP, "main", ("docs:write",)).scopes == ("docs:write",)
    # llm-user holds llm:*; main's ceiling is narrower (llm:openai:*).
    assert _decide(policy, AI_USER, "main", ("llm:openai:chat",)).allowed
    _denied(
        _decide(policy, AI_USER, "main", ("llm:anthropic:messages",)),
        Reason.CEILING_EXCLUDES_SCOPE,
        "invalid_scope",
    )


def test_requested_scopes_keep_order_and_drop_duplicates(policy: Policy) -> None:
    decision = _decide(policy, WRITER, "main", ("docs:write", "docs:read", "docs:write"))
    assert decision.scopes == ("docs:write", "docs:read")


def test_bindings_are_per_identity_provider(policy: Policy) -> None:
    # 'readers' at idp 'other' is bound to writer, not reader, and main does not act for it.
    other_reader = Person("other", "alice", frozenset({"readers"}))
    assert policy.roles_of(other_reader) == frozenset({"writer"})
    _denied(
        _decide(policy, other_reader, "main", ("docs:write",)),
        Reason.NOT_ACT_FOR,
        "unauthorized_client",
    )


# -- one test per reason code ------------------------------------------------------------------


def test_unknown_agent(policy: Policy) -> None:
    _denied(
        _decide(policy, READER, "ghost", ("docs:read",)),
        Reason.UNKNOWN_AGENT,
        "unauthorized_client",
    )


@pytest.mark.parametrize("bad", ["Docs:Read", "llm:*", "*", "docs::read", "", "docs read"])
def test_malformed_scope(policy: Policy, bad: str) -> None:
    decision = _decide(policy, READER, "main", ("docs:read", bad))
    _denied(decision, Reason.MALFORMED_SCOPE, "invalid_scope")
    verdicts = {v.scope: v.reasons for v in decision.scope_verdicts}
    assert verdicts == {"docs:read": (), bad: (Reason.MALFORMED_SCOPE,)}


def test_person_lacks_scope(policy: Policy) -> None:
    decision = _decide(policy, READER, "main", ("docs:write",))
    _denied(decision, Reason.PERSON_LACKS_SCOPE, "invalid_scope")
    assert decision.scope_verdicts[0].reasons == (Reason.PERSON_LACKS_SCOPE,)


def test_ceiling_excludes_scope(policy: Policy) -> None:
    decision = _decide(policy, READER, "main", ("kb:read",))  # reader holds kb:read; main can't
    _denied(decision, Reason.CEILING_EXCLUDES_SCOPE, "invalid_scope")
    assert decision.scope_verdicts[0].reasons == (Reason.CEILING_EXCLUDES_SCOPE,)


def test_person_and_ceiling_both_reported(policy: Policy) -> None:
    decision = _decide(policy, READER, "main", ("reports:read",))
    assert decision.scope_verdicts[0].reasons == (
        Reason.PERSON_LACKS_SCOPE,
        Reason.CEILING_EXCLUDES_SCOPE,
    )


def test_parent_lacks_scope(policy: Policy) -> None:
    parent = _parent(_decide(policy, READER, "main", ("docs:read",)))
    # The person holds kb:read and the sub-agent's ceiling admits it, but the parent token
    # does not carry it: a sub-agent cannot widen what it was handed.
    decision = _decide(policy, READER, "sub", ("kb:read",), parent=parent)
    _denied(decision, Reason.PARENT_LACKS_SCOPE, "invalid_scope")
    assert decision.actor_chain == ("sub", "main")


def test_not_act_for(policy: Policy) -> None:
    decision = _decide(policy, STRANGER, "main", ("docs:read",))
    _denied(decision, Reason.NOT_ACT_FOR, "unauthorized_client")
    assert decision.scope_verdicts
    assert all(Reason.NOT_ACT_FOR in v.reasons for v in decision.scope_verdicts)


def test_delegation_not_allowed(policy: Policy) -> None:
    parent = _parent(_decide(policy, READER, "main", ("docs:read",)))
    _denied(
        _decide(policy, READER, "leaf", ("docs:read",), parent=parent),
        Reason.DELEGATION_NOT_ALLOWED,
        "unauthorized_client",
    )
    # A parent with no actor at all cannot delegate either.
    orphan = ParentGrant((), frozenset({"docs:read"}), ("api",))
    _denied(
        _decide(policy, READER, "sub", ("docs:read",), parent=orphan),
        Reason.DELEGATION_NOT_ALLOWED,
        "unauthorized_client",
    )
    # Nor can a parent whose agent is not (or no longer) in the policy.
    gone = ParentGrant(("ghost",), frozenset({"docs:read"}), ("api",))
    _denied(
        _decide(policy, READER, "sub", ("docs:read",), parent=gone),
        Reason.DELEGATION_NOT_ALLOWED,
        "unauthorized_client",
    )


def test_requires_delegation(policy: Policy) -> None:
    _denied(
        _decide(policy, READER, "sub", ("docs:read",)),
        Reason.REQUIRES_DELEGATION,
        "unauthorized_client",
    )


def test_depth_exceeded(policy: Policy) -> None:
    within = decide_chain(policy, READER, ["main", "sub", "leaf"], ("docs:read",))
    assert within.allowed
    assert within.actor_chain == ("leaf", "sub", "main")
    beyond = decide_chain(policy, READER, ["main", "sub", "leaf", "leaf2"], ("docs:read",))
    _denied(beyond, Reason.DEPTH_EXCEEDED, "invalid_grant")
    assert beyond.actor_chain == ("leaf2", "leaf", "sub", "main")


def test_audience_not_allowed(policy: Policy) -> None:
    _denied(
        _decide(policy, READER, "main", ("docs:read",), ("api", "elsewhere")),
        Reason.AUDIENCE_NOT_ALLOWED,
        "invalid_target",
    )


def test_parent_lacks_audience(policy: Policy) -> None:
    parent = _parent(_decide(policy, READER, "main", ("docs:read",), ("api",)))
    # 'llm' is among sub's audiences, but the parent token was only for 'api'.
    _denied(
        _decide(policy, READER, "sub", ("docs:read",), ("llm",), parent=parent),
        Reason.PARENT_LACKS_AUDIENCE,
        "invalid_target",
    )


def test_no_audience(policy: Policy) -> None:
    _denied(_decide(policy, READER, "lonely", ("docs:read",)), Reason.NO_AUDIENCE, "invalid_target")


def test_no_scope_when_no_default_is_allowed(policy: Policy) -> None:
    decision = _decide(policy, AI_USER, "main")  # defaults docs:read, docs:write; holds only llm:*
    _denied(decision, Reason.NO_SCOPE, "invalid_scope")
    assert {v.scope for v in decision.scope_verdicts} == {"docs:read", "docs:write"}


def test_no_scope_for_an_explicitly_empty_request(policy: Policy) -> None:
    _denied(_decide(policy, READER, "main", ()), Reason.NO_SCOPE, "invalid_scope")


def test_every_reason_code_is_exercised() -> None:
    # Guards this file: a new Reason needs a test above (and an error code in the engine).
    covered = {
        Reason.GRANTED,
        Reason.UNKNOWN_AGENT,
        Reason.MALFORMED_SCOPE,
        Reason.PERSON_LACKS_SCOPE,
        Reason.CEILING_EXCLUDES_SCOPE,
        Reason.PARENT_LACKS_SCOPE,
        Reason.NOT_ACT_FOR,
        Reason.DELEGATION_NOT_ALLOWED,
        Reason.REQUIRES_DELEGATION,
        Reason.DEPTH_EXCEEDED,
        Reason.AUDIENCE_NOT_ALLOWED,
        Reason.PARENT_LACKS_AUDIENCE,
        Reason.NO_SCOPE,
        Reason.NO_AUDIENCE,
        Reason.AUDIENCE_REQUIRED,  # tests/unit/test_policy_identity.py
        Reason.APPROVAL_REQUIRED,  # tests/unit/test_policy_approvals.py
    }
    assert covered == set(Reason)


# -- defaults, narrowing, lifetimes ------------------------------------------------------------


def test_defaults_are_filtered_silently(policy: Policy) -> None:
    decision = _decide(policy, READER, "main")  # defaults: docs:read, docs:write
    assert decision.allowed
    assert decision.scopes == ("docs:read",)
    verdicts = {v.scope: v.reasons for v in decision.scope_verdicts}
    assert verdicts == {"docs:read": (), "docs:write": (Reason.PERSON_LACKS_SCOPE,)}


def test_explicit_request_is_all_or_nothing(policy: Policy) -> None:
    decision = _decide(policy, READER, "main", ("docs:read", "docs:write"))
    _denied(decision, Reason.PERSON_LACKS_SCOPE, "invalid_scope")
    assert "docs:write" in decision.description
    assert _decide(policy, WRITER, "main", ("docs:read", "docs:write")).scopes == (
        "docs:read",
        "docs:write",
    )


def test_default_audiences_are_all_of_the_agents(policy: Policy) -> None:
    assert _decide(policy, READER, "main", ("docs:read",)).audiences == ("api", "llm")


def test_requested_audiences_are_deduplicated(policy: Policy) -> None:
    assert _decide(policy, READER, "main", ("docs:read",), ("llm", "api", "llm")).audiences == (
        "llm",
        "api",
    )


def test_sub_agent_cannot_widen_scope(policy: Policy) -> None:
    parent = _parent(_decide(policy, WRITER, "main", ("docs:read", "docs:write")))
    # docs:write: the person holds it and the parent carries it, but sub's ceiling excludes it.
    decision = _decide(policy, WRITER, "sub", ("docs:write",), parent=parent)
    _denied(decision, Reason.CEILING_EXCLUDES_SCOPE, "invalid_scope")
    # Defaults of the sub-agent are filtered by the parent's scopes too.
    narrow = _parent(_decide(policy, AI_USER, "main", ("llm:openai:chat",)))
    decision = _decide(policy, AI_USER, "sub", parent=narrow)  # sub's default docs:read
    _denied(decision, Reason.NO_SCOPE, "invalid_scope")
    assert Reason.PARENT_LACKS_SCOPE in decision.scope_verdicts[0].reasons


def test_sub_agent_cannot_widen_audience(policy: Policy) -> None:
    parent = _parent(_decide(policy, READER, "main", ("docs:read",)))
    assert set(parent.audiences) == {"api", "llm"}
    # sub also allows 'extra', but by default only gets what the parent had.
    decision = _decide(policy, READER, "sub", ("docs:read",), parent=parent)
    assert decision.allowed
    assert decision.audiences == ("api", "llm")
    _denied(
        _decide(policy, READER, "sub", ("docs:read",), ("extra",), parent=parent),
        Reason.PARENT_LACKS_AUDIENCE,
        "invalid_target",
    )
    # A parent for 'api' only narrows the sub-agent's default audiences to 'api'.
    only_api = _parent(_decide(policy, READER, "main", ("docs:read",), ("api",)))
    leaf_parent = _parent(_decide(policy, READER, "sub", ("docs:read",), parent=only_api))
    assert leaf_parent.audiences == ("api",)


def test_sub_agent_without_request_narrows_the_parents_scopes(policy: Policy) -> None:
    # leaf has no default scopes: it inherits the parent's, narrowed by its own ceiling.
    parent = ParentGrant(("sub", "main"), frozenset({"docs:read", "kb:read"}), ("api",))
    decision = _decide(policy, READER, "leaf", parent=parent)
    assert decision.allowed
    assert decision.scopes == ("docs:read",)


def test_accepts_person_tokens_false_only_blocks_direct_use(policy: Policy) -> None:
    _denied(_decide(policy, READER, "sub"), Reason.REQUIRES_DELEGATION, "unauthorized_client")
    chained = decide_chain(policy, READER, ["main", "sub"], None)
    assert chained.allowed
    assert chained.scopes == ("docs:read",)


def test_lifetime_is_the_minimum_of_agent_and_limits(policy: Policy) -> None:
    assert policy.max_token_lifetime_seconds == 3600
    assert _decide(policy, READER, "main", ("docs:read",)).max_lifetime_seconds == 600
    parent = _parent(_decide(policy, READER, "main", ("docs:read",)))
    # sub allows 7200 s, the policy limit is 3600 s.
    assert _decide(policy, READER, "sub", ("docs:read",), parent=parent).max_lifetime_seconds == (
        3600
    )


def test_explain_matches_decide(policy: Policy) -> None:
    granted = explain(policy, ExchangeRequest(READER, "main"))
    assert "decision:       GRANTED" in granted
    assert "granted:        docs:read" in granted
    assert "- docs:write: denied: person_lacks_scope" in granted
    assert "max lifetime:   600s" in granted
    denied = explain(policy, ExchangeRequest(READER, "main", ("kb:read",)))
    assert "DENIED (invalid_scope)" in denied
    assert "ceiling_excludes_scope" in denied
    assert "granted:" not in denied


def test_decide_is_deterministic_and_pure(policy: Policy) -> None:
    request = ExchangeRequest(WRITER, "main", ("docs:write",), ("api",))
    assert decide(policy, request) == decide(policy, request)
    assert policy.rights_of(WRITER).covers("docs:write")


def test_duplicate_default_scopes_are_granted_once(tmp_path: Path) -> None:
    # Regression: duplicated default_scopes used to be granted twice ("docs:read docs:read").
    text = POLICY_YAML.replace(
        "default_scopes: [docs:read, docs:write]", "default_scopes: [docs:read, docs:read]"
    )
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(text))
    policy = load_policy(tmp_path).policy
    assert _decide(policy, READER, "main").scopes == ("docs:read",)

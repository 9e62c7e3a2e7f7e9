"""Identity in the policy language: IdP roles apart from groups, one group normalisation, one
binding or selector for several IdPs, audiences a request must name or gets by default, and the
groups a token carries (only those the policy uses)."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.clock import SystemClock
from broker.policy import (
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    PolicyError,
    Reason,
    decide,
    explain,
    load_policy,
)
from broker.policy.engine import standing
from broker.settings import IdentityProviderConfig
from broker.types import Principal, Provenance, TokenType, normalise_group
from idp_adapters.jwks import StaticJwks
from idp_adapters.oidc import OidcAdapter
from tests.support.jose import public_jwk

_AUTH = "authentication: {method: client_secret_basic, secret_ref: 'env:X'}"
KEYCLOAK_ISSUER = "https://keycloak.example/realms/corp"


def _load(tmp_path: Path, text: str) -> Policy:
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(text))
    return load_policy(tmp_path).policy


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        _load(tmp_path, text)
    return info.value.problems


def _decide(policy: Policy, person: Person, agent: str, **request: Any) -> Any:
    return decide(policy, ExchangeRequest(person, agent, **request))


# -- IdP roles are not groups --------------------------------------------------------------------


async def _keycloak_principal(claims: dict[str, Any]) -> Principal:
    """A Keycloak-shaped ID token signed by a key generated here, verified by the OIDC adapter
    with the keycloak preset."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": KEYCLOAK_ISSUER,
            "aud": "broker",
            "sub": "7d9f3c52-5a1b-4c1e-9a51-0a11ce000001",
            "iat": now,
            "exp": now + 300,
            **claims,
        },
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    config = IdentityProviderConfig(
        name="kc", issuer=KEYCLOAK_ISSUER, client_ids=["broker"], preset="keycloak"
    )
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(
            config, http, SystemClock(), keys=StaticJwks({"keys": [public_jwk(key, "k1")]})
        )
        return await adapter.authenticate(token, TokenType.ID_TOKEN)


PRIVILEGED = f"""
roles:
  admin: {{permissions: [prod:deploy]}}
group_bindings:
  - {{idp: kc, group: admins, roles: [admin]}}
agents:
  ops:
    {_AUTH}
    ceiling: [prod:deploy]
    audiences: [prod]
    act_for: ["group:kc/admins"]
"""


@pytest.mark.anyio
async def test_a_realm_role_named_like_a_privileged_group_is_not_that_group(
    tmp_path: Path,
) -> None:
    principal = await _keycloak_principal(
        {"groups": ["/staff"], "realm_access": {"roles": ["admins", "offline_access"]}}
    )
    assert principal.groups == {"staff"}
    assert principal.idp_roles == {"admins", "offline_access"}
    person = Person.of(Provenance.from_principal(principal))

    policy = _load(tmp_path, PRIVILEGED)
    assert policy.roles_of(person) == frozenset()
    denied = _decide(policy, person, "ops", scopes=("prod:deploy",))
    assert not denied.allowed
    assert denied.reasons[0] is Reason.NOT_ACT_FOR
    assert standing(policy, person, ("ops",)).reason is Reason.NOT_ACT_FOR

    # Binding the IdP role explicitly (and acting for it) is what grants it.
    explicit = PRIVILEGED.replace("group: admins", "idp_role: admins").replace(
        '"group:kc/admins"', '"idp-role:kc/admins"'
    )
    policy = _load(tmp_path, explicit)
    assert policy.roles_of(person) == {"admin"}
    granted = _decide(policy, person, "ops", scopes=("prod:deploy",))
    assert granted.allowed, granted.description
    # ...and a group named like the role does not satisfy the role binding either.
    group_only = Person("kc", person.subject, frozenset({"admins"}))
    assert not _decide(policy, group_only, "ops", scopes=("prod:deploy",)).allowed


def test_a_binding_names_a_group_or_an_idp_role(tmp_path: Path) -> None:
    both = _problems(
        tmp_path,
        """
        roles: {r: {permissions: [a:b]}}
        group_bindings:
          - {idp: kc, group: g, idp_role: g, roles: [r]}
          - {idp: kc, roles: [r]}
          - {idp: kc, idp_role: x, roles: [r], cost_centre: cc}
        """,
    )
    assert sum("exactly one of group or idp_role" in p for p in both) == 2
    assert any("cost_centre is only for group bindings" in p for p in both)


# -- one group normalisation ----------------------------------------------------------------------


def test_group_paths_are_normalised_in_one_place(tmp_path: Path) -> None:
    assert normalise_group("/team/sub") == "team/sub"
    assert normalise_group("team/sub") == "team/sub"
    policy = _load(
        tmp_path,
        f"""
        roles: {{r: {{permissions: [a:b]}}}}
        group_bindings: [{{idp: kc, group: /team/sub, roles: [r]}}]
        agents:
          ag: {{ {_AUTH}, ceiling: [a:b], audiences: [u], act_for: ["group:kc//team/sub"]}}
        """,
    )
    person = Person("kc", "s", frozenset({"team/sub"}))
    assert policy.roles_of(person) == {"r"}
    assert _decide(policy, person, "ag", scopes=("a:b",)).allowed


# -- one entry for several IdPs ------------------------------------------------------------------

MULTI = f"""
roles:
  support: {{permissions: [tickets:read]}}
  lead: {{permissions: [tickets:write]}}
group_bindings:
  - {{idp: [okta, entra, keycloak], group: support, roles: [support], cost_centre: cs}}
  - {{idp: okta, group: leads, roles: [lead]}}
  - {{idp: [entra], idp_role: Support.Lead, roles: [lead]}}
agents:
  triage:
    {_AUTH}
    ceiling: [tickets:read, tickets:write]
    audiences: [tickets]
    act_for: ["group:okta,entra,keycloak/support", "idp-role:entra,keycloak/Support.Lead"]
"""


@pytest.mark.parametrize("idp", ["okta", "entra", "keycloak"])
def test_one_binding_and_one_selector_for_several_idps(tmp_path: Path, idp: str) -> None:
    policy = _load(tmp_path, MULTI)
    person = Person(idp, "alice", frozenset({"support"}))
    decision = _decide(policy, person, "triage", scopes=("tickets:read",))
    assert decision.allowed, decision.description
    assert policy.cost_centre_of("triage", idp, {"support"}) == "cs"
    # An IdP the entry does not name is still a different organisation.
    assert not _decide(policy, Person("google", "alice", frozenset({"support"})), "triage").allowed


def test_multi_idp_idp_roles_and_single_idp_entries_keep_their_meaning(tmp_path: Path) -> None:
    policy = _load(tmp_path, MULTI)
    lead = Person("entra", "bob", idp_roles=frozenset({"Support.Lead"}))
    assert _decide(policy, lead, "triage", scopes=("tickets:write",)).allowed
    # keycloak is in the selector but not in the binding: may act for, holds nothing.
    kc_lead = Person("keycloak", "bob", idp_roles=frozenset({"Support.Lead"}))
    refused = _decide(policy, kc_lead, "triage", scopes=("tickets:write",))
    assert refused.reasons[0] is Reason.PERSON_LACKS_SCOPE
    assert policy.group_roles[("okta", "leads")] == {"lead"}
    assert ("entra", "leads") not in policy.group_roles


@pytest.mark.parametrize(
    "selector",
    ["group:okta,/support", "group:,okta/support", "person:okta,entra/alice", "idp-role:x"],
)
def test_malformed_multi_idp_selectors_are_refused(tmp_path: Path, selector: str) -> None:
    text = MULTI.replace('"group:okta,entra,keycloak/support"', f'"{selector}"')
    assert any("is not a selector" in p for p in _problems(tmp_path, text))


def test_an_empty_idp_list_is_refused(tmp_path: Path) -> None:
    text = MULTI.replace("idp: [entra], idp_role", "idp: [], idp_role")
    assert _problems(tmp_path, text)


# -- audiences a request must name, or gets by default ------------------------------------------

AUDIENCES = f"""
roles: {{r: {{permissions: [a:b]}}}}
group_bindings: [{{idp: i, group: g, roles: [r]}}]
agents:
  open:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u1, u2]
    act_for: ["group:i/g"]
    may_delegate_to: [strict, defaulted]
  strict:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u1, u2]
    act_for: ["group:i/g"]
    require_audience: true
  defaulted:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u1, u2, u3]
    default_audiences: [u2]
    act_for: ["group:i/g"]
    may_delegate_to: [strict]
"""
MEMBER = Person("i", "alice", frozenset({"g"}))


def test_require_audience_refuses_a_request_without_one(tmp_path: Path) -> None:
    policy = _load(tmp_path, AUDIENCES)
    refused = _decide(policy, MEMBER, "strict", scopes=("a:b",))
    assert not refused.allowed
    assert refused.reasons[0] is Reason.AUDIENCE_REQUIRED
    assert refused.error == "invalid_target"
    assert "'u1', 'u2'" in refused.description
    assert _decide(policy, MEMBER, "strict", scopes=("a:b",), audiences=("u2",)).audiences == (
        "u2",
    )
    # Today's behaviour stays the default: every audience of the agent.
    assert _decide(policy, MEMBER, "open", scopes=("a:b",)).audiences == ("u1", "u2")


def test_default_audiences_are_what_a_request_without_one_gets(tmp_path: Path) -> None:
    policy = _load(tmp_path, AUDIENCES)
    decision = _decide(policy, MEMBER, "defaulted", scopes=("a:b",))
    assert decision.audiences == ("u2",)
    assert _decide(policy, MEMBER, "defaulted", scopes=("a:b",), audiences=("u3",)).allowed
    # On a re-exchange: the default, within the parent token's audiences.
    parent = ParentGrant(("open",), frozenset({"a:b"}), ("u1",))
    narrowed = _decide(policy, MEMBER, "defaulted", scopes=("a:b",), parent=parent)
    assert narrowed.reasons[0] is Reason.NO_AUDIENCE
    parent = ParentGrant(("defaulted",), frozenset({"a:b"}), ("u2",))
    refused = _decide(policy, MEMBER, "strict", scopes=("a:b",), parent=parent)
    assert refused.reasons[0] is Reason.AUDIENCE_REQUIRED
    assert "'u2'" in refused.description and "'u1'" not in refused.description


def test_require_audience_for_the_whole_policy(tmp_path: Path) -> None:
    policy = _load(tmp_path, AUDIENCES + "limits: {require_audience: true}\n")
    assert _decide(policy, MEMBER, "open", scopes=("a:b",)).reasons[0] is (
        Reason.AUDIENCE_REQUIRED
    )
    assert _decide(policy, MEMBER, "defaulted", scopes=("a:b",)).audiences == ("u2",)
    relaxed = AUDIENCES.replace(
        "    may_delegate_to: [strict, defaulted]",
        "    may_delegate_to: [strict, defaulted]\n    require_audience: false",
    )
    policy = _load(tmp_path, relaxed + "limits: {require_audience: true}\n")
    assert _decide(policy, MEMBER, "open", scopes=("a:b",)).audiences == ("u1", "u2")


def test_audience_settings_are_checked_at_load(tmp_path: Path) -> None:
    problems = _problems(
        tmp_path,
        AUDIENCES.replace(
            "default_audiences: [u2]", "default_audiences: [u9]\n    require_audience: true"
        ),
    )
    assert any("default_audiences: 'u9' is not one of the agent's audiences" in p for p in problems)
    assert any("require_audience and default_audiences contradict" in p for p in problems)


# -- what a token carries -----------------------------------------------------------------------

CARRIED = f"""
roles:
  r: {{permissions: [a:b]}}
group_bindings:
  - {{idp: i, group: bound, roles: [r]}}
  - {{idp: i, idp_role: boss, roles: [r]}}
agents:
  first:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u]
    act_for: ["group:i/first-users"]
    may_delegate_to: [second]
  second:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u]
    act_for: ["group:i/second-users", "idp-role:i/helper"]
    accepts_person_tokens: false
  unrelated:
    {_AUTH}
    ceiling: [a:b]
    audiences: [u]
    act_for: ["group:i/unrelated-users"]
"""


def test_a_token_carries_only_the_groups_and_idp_roles_the_policy_uses(tmp_path: Path) -> None:
    policy = _load(tmp_path, CARRIED)
    noise = {f"g{n}" for n in range(700)}
    person = Person(
        "i",
        "alice",
        frozenset({"bound", "first-users", "second-users", "unrelated-users", *noise}),
        frozenset({"boss", "helper", "offline_access"}),
    )
    used = policy.identity_used(person, "first")
    assert used.groups == {"bound", "first-users", "second-users"}
    assert used.idp_roles == {"boss", "helper"}
    # The same decisions for the trimmed person, here and on the re-exchange it may serve.
    full = _decide(policy, person, "first", scopes=("a:b",))
    assert full == _decide(policy, used, "first", scopes=("a:b",))
    parent = ParentGrant(full.actor_chain, frozenset(full.scopes), full.audiences)
    assert _decide(policy, person, "second", parent=parent) == _decide(
        policy, used, "second", parent=parent
    )
    assert standing(policy, used, ("second", "first")) == standing(
        policy, person, ("second", "first")
    )
    # A token for the sub-agent alone carries less still; an unknown agent only bound groups.
    assert policy.identity_used(used, "second").groups == {"bound", "second-users"}
    assert policy.identity_used(person, "ghost").groups == {"bound"}
    text = explain(policy, ExchangeRequest(person, "first", ("a:b",)))
    assert "token carries:  groups: bound, first-users, second-users; IdP roles: boss, helper" in (
        text
    )
    assert "IdP roles:      boss, helper, offline_access" in text

"""Claim-mapping presets, overrides, and group/attribute extraction."""

from __future__ import annotations

from typing import Any

import pytest

from broker.settings import ClaimMapping
from idp_adapters.presets import (
    PRESETS,
    ClaimPreset,
    extract_attributes,
    extract_groups,
    extract_strings,
    lookup_claim,
    resolve_claim_mapping,
)


def test_every_configurable_preset_exists() -> None:
    assert set(PRESETS) == {"generic", "okta", "entra", "auth0", "keycloak", "google"}


@pytest.mark.parametrize(
    ("preset", "subject", "groups", "roles"),
    [
        ("generic", "sub", ("groups",), ()),
        ("okta", "sub", ("groups",), ()),
        ("entra", "oid", ("groups",), ("roles",)),
        ("auth0", "sub", ("groups",), ()),
        ("keycloak", "sub", ("groups",), ("realm_access.roles",)),
        ("google", "sub", (), ()),
    ],
)
def test_preset_sources(
    preset: str, subject: str, groups: tuple[str, ...], roles: tuple[str, ...]
) -> None:
    """IdP roles are never a source of groups (a role named like a group is not that group)."""
    mapping = resolve_claim_mapping(preset, ClaimMapping())
    assert mapping.subject == subject
    assert mapping.groups == groups
    assert mapping.roles == roles


def test_entra_uses_oid_not_pairwise_sub() -> None:
    claims = {
        "sub": "pairwise-per-app",
        "oid": "00000000-0000-0000-0000-0000000000aa",
        "preferred_username": "alice@contoso.example",
        "groups": ["11111111-1111-1111-1111-111111111111"],
        "roles": ["Support.Agent"],
    }
    mapping = resolve_claim_mapping("entra", ClaimMapping())
    assert lookup_claim(claims, mapping.subject) == "00000000-0000-0000-0000-0000000000aa"
    assert extract_groups(claims, mapping.groups) == {"11111111-1111-1111-1111-111111111111"}
    assert extract_strings(claims, mapping.roles) == {"Support.Agent"}
    assert extract_attributes(claims, mapping) == {"email": "alice@contoso.example"}
    assert extract_attributes({**claims, "email": "a@contoso.example"}, mapping) == {
        "email": "a@contoso.example"
    }


def test_auth0_does_not_turn_permissions_into_groups() -> None:
    claims = {"sub": "auth0|1", "permissions": ["read:tickets"], "groups": ["support"]}
    mapping = resolve_claim_mapping("auth0", ClaimMapping())
    assert extract_groups(claims, mapping.groups) == {"support"}


def test_auth0_namespaced_claim_override() -> None:
    claims = {"sub": "auth0|1", "https://example.com/groups": ["support", "billing"]}
    mapping = resolve_claim_mapping("auth0", ClaimMapping(groups=["https://example.com/groups"]))
    assert extract_groups(claims, mapping.groups) == {"support", "billing"}


def test_keycloak_groups_and_realm_roles() -> None:
    claims = {
        "sub": "f3c1",
        "groups": ["/support", "/org/finance", "plain"],
        "realm_access": {"roles": ["offline_access", "agent-admin"]},
    }
    mapping = resolve_claim_mapping("keycloak", ClaimMapping())
    assert extract_groups(claims, mapping.groups) == {"support", "org/finance", "plain"}
    assert extract_strings(claims, mapping.roles) == {"offline_access", "agent-admin"}


def test_google_has_no_groups() -> None:
    mapping = resolve_claim_mapping("google", ClaimMapping())
    claims = {"sub": "1089", "email": "a@example.com", "hd": "example.com", "groups": ["x"]}
    assert extract_groups(claims, mapping.groups) == frozenset()
    assert extract_attributes(claims, mapping) == {"email": "a@example.com"}


def test_overrides_replace_fields() -> None:
    mapping = resolve_claim_mapping(
        "entra",
        ClaimMapping(
            subject="sub", groups=["wids"], email="upn", name="given_name", roles=["app_roles"]
        ),
    )
    assert mapping == ClaimPreset(
        subject="sub",
        groups=("wids",),
        email="upn",
        name="given_name",
        email_fallback=None,
        roles=("app_roles",),
    )
    assert resolve_claim_mapping("okta", ClaimMapping(groups=[])).groups == ()


def test_unknown_preset() -> None:
    with pytest.raises(ValueError, match="unknown claim preset"):
        resolve_claim_mapping("ldap", ClaimMapping())


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["a", "b"], {"a", "b"}),
        ("single", {"single"}),
        (["a", 1, None, {"x": "y"}, ["nested"], True, "b"], {"a", "b"}),
        (["", "/", "/x"], {"x"}),
        (42, set()),
        ({"a": "b"}, set()),
        (None, set()),
    ],
)
def test_extract_groups_value_shapes(value: Any, expected: set[str]) -> None:
    assert extract_groups({"groups": value}, ("groups",)) == expected


def test_dotted_paths() -> None:
    claims = {"a": {"b": {"c": ["deep"]}}, "a.b": "literal", "x": "not-a-dict"}
    assert extract_groups(claims, ("a.b.c",)) == {"deep"}
    assert lookup_claim(claims, "a.b") == "literal"
    assert lookup_claim(claims, "x.y") is None
    assert lookup_claim(claims, "missing.path") is None


def test_attributes_only_when_strings() -> None:
    mapping = resolve_claim_mapping("generic", ClaimMapping())
    assert extract_attributes({"email": ["a@b"], "name": ""}, mapping) == {}
    assert extract_attributes({"email": "a@b", "name": "A"}, mapping) == {
        "email": "a@b",
        "name": "A",
    }

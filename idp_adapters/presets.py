"""Claim-mapping presets: which claims of a verified token carry the person's stable subject,
groups, IdP roles, email and display name, for the identity providers the broker knows by name.

Groups and IdP roles are kept apart: groups are bound in policy with ``group:`` (bindings
``group:``, selectors ``group:<idp>/<group>``), IdP roles with ``idp_role:`` (selectors
``idp-role:<idp>/<role>``), so a realm role that happens to be named like a privileged group
never satisfies that group's bindings.

Every preset can be overridden field by field with `ClaimMapping` in the configuration.
Claim paths may be dotted (``realm_access.roles``); a claim whose literal name contains dots (an
Auth0 namespaced claim such as ``https://example.com/groups``) is found by its literal name first.

Presets (source of the subject / of groups / of IdP roles):

generic
    ``sub`` / ``groups``. Any OpenID Connect provider that emits a ``groups`` claim.
okta
    ``sub`` (the Okta user id, ``00u...``) / ``groups``: Okta emits ``groups`` only once a groups
    claim is configured on the authorization server (or the app, for the org server).
entra
    ``oid`` (the user's object id: stable and identical across applications in the tenant;
    ``sub`` is pairwise per application and must not be used) / ``groups`` (group object ids,
    GUIDs; needs ``groupMembershipClaims`` in the app manifest) / ``roles`` (app roles).
    Group overage (``_claim_names``, more than 200 groups) is not resolved: bind app roles or
    fewer groups. Email from ``email``, falling back to ``preferred_username`` (usually the UPN).
    ``oid`` is unique within a tenant; the exact issuer (which embeds the tenant id) pins it.
auth0
    ``sub`` (``<connection>|<id>``) / ``groups``. Auth0 has no built-in groups claim: an Action
    adds one, usually namespaced (``https://your.domain/groups``), and that name must be set in
    ``claims.groups``. ``permissions`` (RBAC API permissions) is deliberately *not* a default: an
    API permission is an authorisation grant for one API, not a group membership, and treating
    ``read:messages`` as a group would let Auth0 API settings silently create policy groups.
keycloak
    ``sub`` (the user's UUID) / ``groups`` (needs the "Group Membership" mapper; full paths such
    as ``/support`` are normalised to ``support``) / ``realm_access.roles`` (realm roles).
google
    ``sub`` / none: Google ID tokens carry no groups (``hd`` is only the Workspace domain), so
    groups come from the broker's person bindings. Email from ``email``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from broker.settings import ClaimMapping
from broker.types import normalise_groups


@dataclass(frozen=True, slots=True)
class ClaimPreset:
    """Where to find each piece of a person's identity in verified claims.

    `email_fallback` is tried when the `email` claim is absent (Entra's ``preferred_username``).
    """

    subject: str
    groups: tuple[str, ...]
    email: str | None
    name: str | None
    email_fallback: str | None = None
    roles: tuple[str, ...] = ()


PRESETS: Mapping[str, ClaimPreset] = MappingProxyType(
    {
        "generic": ClaimPreset(subject="sub", groups=("groups",), email="email", name="name"),
        "okta": ClaimPreset(subject="sub", groups=("groups",), email="email", name="name"),
        "entra": ClaimPreset(
            subject="oid",
            groups=("groups",),
            roles=("roles",),
            email="email",
            name="name",
            email_fallback="preferred_username",
        ),
        "auth0": ClaimPreset(subject="sub", groups=("groups",), email="email", name="name"),
        "keycloak": ClaimPreset(
            subject="sub",
            groups=("groups",),
            roles=("realm_access.roles",),
            email="email",
            name="name",
        ),
        "google": ClaimPreset(subject="sub", groups=(), email="email", name="name"),
    }
)
"""The built-in presets, by the name used in `IdentityProviderConfig.preset`."""


def resolve_claim_mapping(preset: str, overrides: ClaimMapping) -> ClaimPreset:
    """The preset named `preset` with every non-None field of `overrides` replacing its value.

    Overriding ``email`` also drops the preset's email fallback. Unknown presets raise ValueError.
    """
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown claim preset {preset!r}") from None
    if overrides.subject is not None:
        base = replace(base, subject=overrides.subject)
    if overrides.groups is not None:
        base = replace(base, groups=tuple(overrides.groups))
    if overrides.roles is not None:
        base = replace(base, roles=tuple(overrides.roles))
    if overrides.email is not None:
        base = replace(base, email=overrides.email, email_fallback=None)
    if overrides.name is not None:
        base = replace(base, name=overrides.name)
    return base


def lookup_claim(claims: Mapping[str, Any], path: str) -> Any | None:
    """The value at `path`: the literal claim name if present, else a dotted path (objects)."""
    if path in claims:
        return claims[path]
    current: Any = claims
    for part in path.split("."):
        if not isinstance(current, Mapping) or part not in current:
            return None
        current = current[part]
    return current


def extract_groups(claims: Mapping[str, Any], paths: Iterable[str]) -> frozenset[str]:
    """Collect group names from the claims at `paths`, normalised by `normalise_group` (leading
    ``/`` of Keycloak group paths stripped); empty names are dropped."""
    return normalise_groups(extract_strings(claims, paths))


def extract_strings(claims: Mapping[str, Any], paths: Iterable[str]) -> frozenset[str]:
    """Collect the non-empty strings at `paths` (IdP roles, and groups before normalising).

    Each value may be a list (non-string items are ignored) or a single string.
    """
    values: set[str] = set()
    for path in paths:
        value = lookup_claim(claims, path)
        items: Iterable[Any]
        if isinstance(value, str):
            items = (value,)
        elif isinstance(value, list):
            items = value
        else:
            continue
        values.update(item for item in items if isinstance(item, str) and item)
    return frozenset(values)


def extract_string(claims: Mapping[str, Any], path: str | None) -> str | None:
    """The non-empty string at `path`, or None."""
    if path is None:
        return None
    value = lookup_claim(claims, path)
    return value if isinstance(value, str) and value else None


def extract_attributes(claims: Mapping[str, Any], mapping: ClaimPreset) -> dict[str, str]:
    """``email`` and ``name`` attributes, present only when the mapped claims are strings."""
    attributes: dict[str, str] = {}
    email = extract_string(claims, mapping.email) or extract_string(claims, mapping.email_fallback)
    if email is not None:
        attributes["email"] = email
    name = extract_string(claims, mapping.name)
    if name is not None:
        attributes["name"] = name
    return attributes

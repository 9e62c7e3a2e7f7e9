"""Domain values shared by every layer: frozen, hashable where it matters, free of I/O."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class TokenType(enum.StrEnum):
    """RFC 8693 section 3 token type identifiers."""

    ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
    ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105
    JWT = "urn:ietf:params:oauth:token-type:jwt"
    SAML2 = "urn:ietf:params:oauth:token-type:saml2"
    ID_JAG = "urn:ietf:params:oauth:token-type:id-jag"
    """An Identity Assertion JWT Authorization Grant (draft-ietf-oauth-identity-assertion-authz)."""
    REFRESH_TOKEN = "urn:ietf:params:oauth:token-type:refresh_token"  # noqa: S105


def _frozen_mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    return MappingProxyType(dict(value or {}))


def normalise_group(name: str) -> str:
    """A group name as the broker compares it, whatever protocol carried it: leading ``/`` are
    stripped, so Keycloak's full path ``/team/sub`` (OIDC, or SAML with "full path" on) and a
    policy's ``team/sub`` are the same group. Every identity adapter and the policy loader use
    this one function; nothing else rewrites group names."""
    return name.lstrip("/")


def normalise_groups(names: Iterable[str]) -> frozenset[str]:
    """`normalise_group` over `names`, dropping names that end up empty."""
    return frozenset(n for n in (normalise_group(name) for name in names) if n)


@dataclass(frozen=True, slots=True)
class Principal:
    """A person, as proven by a verified identity token from a trusted IdP.

    `idp` is the configured name of the identity provider (never taken from the token),
    `subject` the stable identifier the IdP's claim mapping selected. `groups` (normalised by
    `normalise_group`) and `idp_roles` (the IdP's own roles: Keycloak realm roles, Entra app
    roles) are kept apart: a role named like a group is not that group.
    """

    idp: str
    subject: str
    groups: frozenset[str]
    token_type: TokenType
    expires_at: int
    auth_time: int | None = None
    attributes: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    issued_at: int | None = None
    """When the IdP issued the token (JWT ``iat``, SAML ``IssueInstant``)."""
    idp_roles: frozenset[str] = frozenset()

    @property
    def earliest_time(self) -> int | None:
        """The earliest instant the token vouches for (sign-in, else issue): what a person's
        revocation time is compared with. None when the token carries neither."""
        times = [t for t in (self.auth_time, self.issued_at) if t is not None]
        return min(times) if times else None

    def __post_init__(self) -> None:
        object.__setattr__(self, "attributes", _frozen_mapping(self.attributes))

    @property
    def person_id(self) -> str:
        """The person's identifier, unambiguous across IdPs: ``<idp>/<subject>``.

        IdP names cannot contain ``/`` so the first ``/`` always separates the two parts.
        """
        return f"{self.idp}/{self.subject}"


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where the person came from. Immutable through every later hop (like STS source identity).

    In a token the broker issues, `groups` and `idp_roles` are only those the policy uses for
    the agent and the agents it may delegate to (`Policy.identity_used`), never every group the
    IdP asserted: that bounds the token's size and tells resource servers no more than needed.
    """

    idp: str
    subject: str
    groups: frozenset[str]
    auth_time: int | None
    token_type: TokenType
    session_expires_at: int
    idp_roles: frozenset[str] = frozenset()

    @property
    def person_id(self) -> str:
        return f"{self.idp}/{self.subject}"

    @classmethod
    def from_principal(cls, principal: Principal) -> Provenance:
        return cls(
            idp=principal.idp,
            subject=principal.subject,
            groups=principal.groups,
            auth_time=principal.auth_time,
            token_type=principal.token_type,
            session_expires_at=principal.expires_at,
            idp_roles=principal.idp_roles,
        )

    def to_claim(self) -> dict[str, object]:
        claim: dict[str, object] = {
            "idp": self.idp,
            "sub": self.subject,
            "groups": sorted(self.groups),
            "auth_time": self.auth_time,
            "token_type": str(self.token_type),
            "session_exp": self.session_expires_at,
        }
        if self.idp_roles:
            claim["idp_roles"] = sorted(self.idp_roles)
        return claim

    @classmethod
    def from_claim(cls, claim: object) -> Provenance:
        if not isinstance(claim, Mapping):
            raise ValueError("provenance must be a JSON object")
        groups = claim.get("groups") or []
        idp_roles = claim.get("idp_roles") or []
        auth_time = claim.get("auth_time")
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError("provenance.groups must be a list of strings")
        if not isinstance(idp_roles, list) or not all(isinstance(r, str) for r in idp_roles):
            raise ValueError("provenance.idp_roles must be a list of strings")
        return cls(
            idp=str(claim["idp"]),
            subject=str(claim["sub"]),
            groups=frozenset(groups),
            auth_time=int(auth_time) if isinstance(auth_time, int) else None,
            token_type=TokenType(str(claim["token_type"])),
            session_expires_at=int(claim["session_exp"]),  # type: ignore[call-overload]
            idp_roles=frozenset(idp_roles),
        )


@dataclass(frozen=True, slots=True)
class BrokerToken:
    """A verified token this broker issued, as presented back to it (re-exchange, introspection)."""

    jti: str
    subject: str
    client_id: str
    scopes: frozenset[str]
    audiences: tuple[str, ...]
    actor_chain: tuple[str, ...]
    """Agents from the most recent actor to the first one (the order of nested ``act``)."""
    provenance: Provenance
    policy_version: str
    issued_at: int
    expires_at: int
    parent_jti: str | None
    claims: Mapping[str, object]
    lineage: tuple[str, ...] = ()
    """The ``jti`` of every ancestor token, root first (so revoking one reaches all below it)."""
    jkt: str | None = None
    """The key the token is bound to (DPoP ``cnf.jkt``), or None for a bearer token."""


@dataclass(frozen=True, slots=True)
class IssuedToken:
    jti: str
    token: str
    expires_in: int
    scopes: tuple[str, ...]
    audiences: tuple[str, ...]
    claims: Mapping[str, object]


class Sensitive:
    """A secret string (token, client secret, assertion) whose repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Sensitive('***')"

    __str__ = __repr__

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sensitive) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

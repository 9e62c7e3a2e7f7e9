"""The policy file schema (pydantic). `broker policy schema` exports it as JSON Schema for editors.

A policy directory holds any number of ``*.yaml`` files; each may contain any of the top-level
sections below and they are merged (a name defined twice is an error). Policy tests live in
``tests/`` beside them and are not part of the policy itself.
"""

from __future__ import annotations

import re
from datetime import date
from decimal import Decimal
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from broker.policy.permissions import is_pattern, is_permission
from broker.settings import NAME_PATTERN
from broker.urls import require_https_unless_loopback

_IDP_NAME = r"[a-z0-9][a-z0-9_-]*"
_SELECTOR_RE = re.compile(
    rf"^(group|idp-role):{_IDP_NAME}(,{_IDP_NAME})*/(.+)$"
    rf"|^person:{_IDP_NAME}/(.+)$"
    r"|^role:([a-z0-9][a-z0-9_.-]*)$"
)
_SECRET_REF_RE = re.compile(r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:.+)$")
_SECRET_HASH_RE = re.compile(r"^(sha256|scrypt)\$")


def _permission(value: str) -> str:
    if not is_permission(value):
        raise ValueError(
            f"{value!r} is not a permission: lowercase segments separated by ':' (no wildcard)"
        )
    return value


def _pattern(value: str) -> str:
    if not is_pattern(value):
        raise ValueError(
            f"{value!r} is not a permission pattern: segments separated by ':', optionally "
            "ending in ':*' (a bare '*' is not allowed)"
        )
    return value


def _selector(value: str) -> str:
    if not _SELECTOR_RE.match(value):
        raise ValueError(
            f"{value!r} is not a selector: use 'group:<idp>/<group>', "
            "'idp-role:<idp>/<IdP role>', 'person:<idp>/<subject>' or 'role:<role>' (a group or "
            "IdP role selector may name several IdPs: 'group:okta,entra/<group>')"
        )
    return value


def _approver(value: str) -> str:
    if value == "person":
        return value
    try:
        return _selector(value)
    except ValueError:
        raise ValueError(
            f"{value!r} is neither 'person' (the person the agent acts for: consent) nor a "
            "selector ('group:<idp>/<group>', 'idp-role:<idp>/<IdP role>', "
            "'person:<idp>/<subject>' or 'role:<role>')"
        ) from None


Permission = Annotated[str, AfterValidator(_permission)]
PermissionPattern = Annotated[str, AfterValidator(_pattern)]
Selector = Annotated[str, AfterValidator(_selector)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
Approver = Annotated[str, AfterValidator(_approver)]
RoleName = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Role(_Strict):
    description: str = ""
    permissions: list[PermissionPattern] = Field(min_length=1)


class GroupBinding(_Strict):
    """Everyone in `group` (or holding the IdP's own role `idp_role`) at identity provider `idp`
    (or at any of several) holds `roles`. Groups and IdP roles are separate namespaces: a
    Keycloak realm role or Entra app role named like a group never matches a `group` binding."""

    idp: Name | Annotated[list[Name], Field(min_length=1)] = Field(
        description="A configured identity provider, or a list of them (one binding for all)."
    )
    group: str | None = Field(
        None, min_length=1, description="A group name; a leading '/' (Keycloak paths) is ignored."
    )
    idp_role: str | None = Field(
        None,
        min_length=1,
        description="An IdP role (Keycloak realm role, Entra app role, SAML role attribute).",
    )
    roles: list[RoleName] = Field(min_length=1)
    cost_centre: str | None = Field(
        None,
        max_length=128,
        description="Who pays for credential fetches made for members of this group, when the "
        "agent has no cost_centre of its own (broker usage report).",
    )

    @model_validator(mode="after")
    def _group_or_idp_role(self) -> GroupBinding:
        if (self.group is None) == (self.idp_role is None):
            raise ValueError("a binding names exactly one of group or idp_role")
        if self.idp_role is not None and self.cost_centre is not None:
            raise ValueError("cost_centre is only for group bindings")
        return self

    @property
    def idps(self) -> tuple[str, ...]:
        return (self.idp,) if isinstance(self.idp, str) else tuple(dict.fromkeys(self.idp))


class PersonBinding(_Strict):
    """One person (by their IdP's stable subject) holds `roles`."""

    idp: Name
    subject: str = Field(min_length=1)
    roles: list[RoleName] = Field(min_length=1)


class PrivateKeyJwtAuth(_Strict):
    """RFC 7523 client assertion signed with a key from `jwks` or `jwks_uri`."""

    method: Literal["private_key_jwt"]
    jwks: dict[str, list[dict[str, object]]] | None = None
    jwks_uri: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["ES256", "RS256", "PS256", "EdDSA"])

    @model_validator(mode="after")
    def _one_key_source(self) -> PrivateKeyJwtAuth:
        if (self.jwks is None) == (self.jwks_uri is None):
            raise ValueError("private_key_jwt needs exactly one of jwks or jwks_uri")
        if self.jwks_uri is not None:
            require_https_unless_loopback(self.jwks_uri)
        if self.jwks is not None:
            keys = self.jwks.get("keys")
            if not keys or any("d" in k or "p" in k for k in keys):
                raise ValueError("jwks must hold public keys only (no private parts)")
        bad = [a for a in self.algorithms if a.upper().startswith("HS") or a.lower() == "none"]
        if bad:
            raise ValueError(f"algorithms {bad} are not allowed for client assertions")
        return self


class ClientSecretBasicAuth(_Strict):
    """HTTP Basic with a client secret: the policy holds a salted hash or a reference, never the
    secret itself. `broker policy hash-secret` makes both a secret and its hash."""

    method: Literal["client_secret_basic"]
    secret_hash: str | None = Field(
        None,
        description="scrypt$<n>$<r>$<p>$<salt>$<hash> or sha256$<salt>$<hash> (base64url), "
        "as printed by `broker policy hash-secret`",
    )
    secret_ref: str | None = Field(None, description="env:VARIABLE or file:/path/to/secret")

    @model_validator(mode="after")
    def _one_source(self) -> ClientSecretBasicAuth:
        if (self.secret_hash is None) == (self.secret_ref is None):
            raise ValueError("client_secret_basic needs exactly one of secret_hash or secret_ref")
        if self.secret_hash is not None and not _SECRET_HASH_RE.match(self.secret_hash):
            raise ValueError("secret_hash must start with 'sha256$' or 'scrypt$'")
        if self.secret_ref is not None and not _SECRET_REF_RE.match(self.secret_ref):
            raise ValueError("secret_ref must be 'env:NAME' or 'file:/path'")
        return self


ClientAuthentication = Annotated[
    PrivateKeyJwtAuth | ClientSecretBasicAuth, Field(discriminator="method")
]


def _one_per_method(value: list[ClientAuthentication]) -> list[ClientAuthentication]:
    methods = [m.method for m in value]
    if len(methods) != len(set(methods)):
        raise ValueError("a client may list each authentication method at most once")
    return value


ClientAuthentications = (
    ClientAuthentication
    | Annotated[
        list[ClientAuthentication],
        Field(min_length=1, max_length=2),
        AfterValidator(_one_per_method),
    ]
)
"""One method, or a list of at most one of each (a client secret and private_key_jwt at once,
e.g. while migrating from the one to the other): the client may use any method listed."""


def authentication_methods(
    authentication: PrivateKeyJwtAuth | ClientSecretBasicAuth | list | None,
) -> tuple[PrivateKeyJwtAuth | ClientSecretBasicAuth, ...]:
    """The methods a client spec's `authentication` allows, as a tuple (empty for None)."""
    if authentication is None:
        return ()
    if isinstance(authentication, list):
        return tuple(authentication)
    return (authentication,)


class WorkloadBinding(_Strict):
    """An agent proven by a workload JWT (Kubernetes service account, SPIFFE JWT-SVID)."""

    issuer: Name = Field(description="Name of a configured workload issuer.")
    subject: str = Field(min_length=1, description="Exact `sub`, e.g. spiffe://corp/agents/x.")


class RateLimits(_Strict):
    """Per-agent limits, enforced across every replica (sliding one-minute windows)."""

    exchanges_per_minute: int | None = Field(None, ge=1)
    credential_fetches_per_minute: int | None = Field(None, ge=1)


class Backchannel(_Strict):
    """How the agent receives the answer to an OpenID CIBA request for approval: it polls the
    token endpoint (``poll``), or the broker calls `client_notification_endpoint` once the
    request is decided (``ping``) and the agent then redeems it."""

    token_delivery_mode: Literal["poll", "ping"] = "poll"  # noqa: S105 - a mode, not a secret
    client_notification_endpoint: str | None = Field(
        None,
        max_length=2048,
        description="With ping: the agent's https URL (plain http only on loopback).",
    )

    @model_validator(mode="after")
    def _endpoint_for_ping(self) -> Backchannel:
        endpoint = self.client_notification_endpoint
        ping = self.token_delivery_mode != "poll"  # noqa: S105 - a mode, not a secret
        if ping and endpoint is None:
            raise ValueError("ping needs a client_notification_endpoint")
        if not ping and endpoint is not None:
            raise ValueError("client_notification_endpoint is only for token_delivery_mode ping")
        if endpoint is not None:
            require_https_unless_loopback(endpoint)
            if urlsplit(endpoint).fragment:
                raise ValueError("client_notification_endpoint must not have a fragment")
        return self


class Agent(_Strict):
    description: str = ""
    authentication: ClientAuthentications | None = Field(
        None,
        description="One method, or a list of at most one per method (e.g. while migrating "
        "from a client secret to private_key_jwt).",
    )
    workload_identities: list[WorkloadBinding] = Field(default_factory=list)
    ceiling: list[PermissionPattern] = Field(
        default_factory=list, description="The most this agent may ever hold, for anyone."
    )
    default_scopes: list[Permission] = Field(default_factory=list)
    audiences: list[str] = Field(default_factory=list)
    default_audiences: list[str] = Field(
        default_factory=list,
        description="What a token requested without an audience is for (a subset of "
        "audiences). Without it, such a request gets every audience, unless "
        "require_audience.",
    )
    require_audience: bool | None = Field(
        None,
        description="True: a request without an audience is refused (invalid_target) unless "
        "default_audiences names one. None: as limits.require_audience.",
    )
    max_token_lifetime_seconds: int = Field(900, gt=0, le=86400)
    act_for: list[Selector] = Field(default_factory=list, description="Who this agent may act for.")
    may_delegate_to: list[Name] = Field(default_factory=list)
    accepts_person_tokens: bool = Field(
        True, description="False for sub-agents reachable only through delegation."
    )
    rate_limits: RateLimits = RateLimits()
    cost_centre: str | None = Field(
        None,
        max_length=128,
        description="Who pays for the credential fetches this agent starts (broker usage report).",
    )
    backchannel: Backchannel = Field(
        default_factory=Backchannel,
        description="How it receives the answer to an OpenID CIBA request for approval "
        "(default: it polls).",
    )
    dpop: Literal["optional", "required"] = Field(
        "optional",
        description="required: every token it obtains is bound to its key (RFC 9449 DPoP); a "
        "token request without a DPoP proof is refused. optional: bound when it sends a proof.",
    )

    @model_validator(mode="after")
    def _authenticates_somehow(self) -> Agent:
        if self.authentication is None and not self.workload_identities:
            raise ValueError("an agent needs authentication or workload_identities")
        return self


class ResourceServer(_Strict):
    """A registered caller of introspection (an API or gateway that receives agent tokens)."""

    description: str = ""
    authentication: ClientAuthentications = Field(
        description="One method, or a list of at most one per method."
    )
    audiences: list[str] = Field(min_length=1, description="Tokens it may introspect.")


class Credential(_Strict):
    """A provider credential the broker serves to gateways, read from a configured secret
    backend. An agent token unlocks it when its scope carries `requires`."""

    description: str = ""
    backend: Name = Field(description="Name of a configured secret backend.")
    path: str = Field(min_length=1, description="Vault KV path / AWS secret name or ARN.")
    field: str | None = Field(None, description="One field of a structured secret.")
    stage: str | None = Field(None, description="AWS staging label (default AWSCURRENT).")
    requires: Permission = Field(description="The permission an agent token must carry.")
    refresh_interval_seconds: float = Field(300.0, gt=0, le=86400)
    max_stale_seconds: float = Field(
        3600.0, ge=0, le=7 * 86400, description="Serve the last good value this long in outages."
    )
    previous_version_grace_seconds: float = Field(
        0.0,
        ge=0,
        le=86400,
        description="How long after a rotation ?version=previous may be served (0: never).",
    )


class Gateway(ResourceServer):
    """A resource server that calls providers for agents and may receive `credentials`."""

    credentials: list[Name] = Field(default_factory=list)
    url: str | None = Field(
        None,
        description="The URL agents call this gateway at: the DPoP proofs it forwards for "
        "bound agent tokens must be made for it (or a path under it). Without it, a bound "
        "token unlocks nothing through this gateway.",
    )

    @field_validator("url")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None:
            parts = urlsplit(value)
            if parts.scheme not in {"https", "http"} or not parts.netloc or parts.query:
                raise ValueError("url must be an absolute http(s) URL without a query")
        return value


class AuthorizationServer(_Strict):
    """An authorization server of resources agents reach with enterprise-managed authorization
    (an MCP server's, say): agents listed here may obtain Identity Assertion JWT Authorization
    Grants (ID-JAG) for it, for the resources listed, within what the policy grants them."""

    description: str = ""
    issuer: str = Field(
        min_length=1,
        description="Its issuer identifier: the ID-JAG's aud, and the audience an agent names. "
        "'self' is this broker (its jwt-bearer grant redeems the ID-JAG).",
    )
    resources: list[str] = Field(
        min_length=1, description="Resources (e.g. MCP server URLs) it issues tokens for."
    )
    agents: list[Name] = Field(min_length=1, description="Who may obtain ID-JAGs for it.")
    client_ids: dict[Name, str] = Field(
        default_factory=dict,
        description="How an agent is known as a client there (default: its name here).",
    )


AdminPermission = Literal["revocations:write", "policy:reload", "credentials:refresh"]
ADMIN_PERMISSIONS: tuple[AdminPermission, ...] = (
    "revocations:write",
    "policy:reload",
    "credentials:refresh",
)


class Admin(_Strict):
    """An operator or automation allowed parts of the admin API, and only those it lists in
    `permissions` (none listed: every admin call is refused). A rotation hook needs only
    ``credentials:refresh``, perhaps only for its own `credentials`."""

    description: str = ""
    authentication: ClientAuthentications = Field(
        description="One method, or a list of at most one per method."
    )
    permissions: list[AdminPermission] = Field(
        default_factory=list,
        description="What this admin may do: revocations:write (POST /v1/admin/revocations), "
        "policy:reload (POST /v1/admin/policy/reload), credentials:refresh (POST "
        "/v1/admin/credentials/{name}/refresh). None listed: every admin call is refused.",
    )
    credentials: list[Name] | None = Field(
        None,
        description="With credentials:refresh: the only credentials it may refresh "
        "(omitted: every credential).",
    )


class Limits(_Strict):
    max_token_lifetime_seconds: int = Field(3600, gt=0, le=86400)
    max_delegation_depth: int = Field(4, ge=1, le=16)
    require_audience: bool = Field(
        False,
        description="Every agent without default_audiences (or require_audience: false) "
        "refuses requests that name no audience, instead of granting all its audiences.",
    )


MIN_REQUEST_EXPIRY_SECONDS = 30
MAX_REQUEST_EXPIRY_SECONDS = 86400


def _distinct(value: list[str]) -> list[str]:
    repeated = sorted({v for v in value if value.count(v) > 1})
    if repeated:
        raise ValueError(f"listed more than once: {', '.join(repeated)}")
    return value


class ApprovalRule(_Strict):
    """Granted permissions matching `permissions`, for the `agents` and `people` named (each
    omitted: any), need an approval before they are granted: by the person themselves
    (``person``: consent) and/or by people the `approvers` selectors name, `quorum` distinct
    ones. Approval only lifts this requirement: it never grants what the person's roles, the
    agents' ceilings or a parent token do not allow."""

    description: str = ""
    permissions: list[PermissionPattern] = Field(
        min_length=1, description="Patterns; a granted permission matching one needs approval."
    )
    agents: list[Name] | None = Field(
        None,
        min_length=1,
        description="The rule applies when one of these agents is in the delegation chain "
        "(omitted: any agent).",
    )
    people: list[Selector] | None = Field(
        None,
        min_length=1,
        description="The rule applies to requests for these people (omitted: everyone).",
    )
    approvers: Annotated[list[Approver], AfterValidator(_distinct)] = Field(
        min_length=1,
        description="Who may approve: 'person' (the person the agent acts for: consent) "
        "and/or selectors group:/idp-role:/person:/role:. Nobody in the agent chain, and not "
        "the person unless 'person' is listed, may approve.",
    )
    quorum: int = Field(1, ge=1, le=100, description="How many distinct eligible approvers.")
    request_expiry_seconds: int = Field(
        300,
        ge=MIN_REQUEST_EXPIRY_SECONDS,
        le=MAX_REQUEST_EXPIRY_SECONDS,
        description="How long a request for approval stays open.",
    )
    token_lifetime_seconds: int | None = Field(
        None,
        gt=0,
        le=86400,
        description="The longest an approved token lives (bounded by every other cap).",
    )
    channels: Annotated[list[Name], AfterValidator(_distinct)] = Field(
        default_factory=list,
        description="Notification channels (broker settings notifications.channels) that "
        "announce a request for approval.",
    )

    @model_validator(mode="after")
    def _quorum_reachable(self) -> ApprovalRule:
        # Where approvers names only people, no more than that many distinct approvers exist.
        only_people = all(a == "person" or a.startswith("person:") for a in self.approvers)
        if only_people and self.quorum > len(self.approvers):
            raise ValueError(
                f"quorum {self.quorum} can never be met: only {len(self.approvers)} "
                "approver(s) can ever approve (approvers names only people)"
            )
        return self

    @property
    def consent(self) -> bool:
        return "person" in self.approvers

    @property
    def approver_selectors(self) -> tuple[str, ...]:
        return tuple(a for a in self.approvers if a != "person")


Currency = Annotated[str, Field(pattern=r"^[A-Z]{3}$", description="ISO 4217 code, e.g. EUR.")]
Money = Annotated[Decimal, Field(ge=0, max_digits=18, decimal_places=6)]
UnitName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,39}$")]
Percent = Annotated[int, Field(ge=1, le=1000)]


class Price(_Strict):
    """What one model of one provider costs, per million units of each unit it bills by, from
    `valid_from` (a UTC date) until the next entry for the same provider and model."""

    provider: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,62}$")]
    model: Annotated[str, Field(min_length=1, max_length=128)]
    currency: Currency
    valid_from: date
    per_million: dict[UnitName, Money] = Field(
        min_length=1,
        description="Price per million units, by unit (input_tokens, output_tokens, "
        "cached_tokens, images, ...). A unit reported but not listed is not priced: the "
        "record is then unpriced, never silently zero.",
    )


class BudgetScope(_Strict):
    """What a budget counts: exactly one of a cost centre, an agent (the one the person
    invoked), a person (<idp>/<subject>) or a credential."""

    cost_centre: str | None = Field(None, max_length=128)
    agent: Name | None = None
    person: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9._-]{0,62}/.+$")
    credential: Name | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetScope:
        given = [v for v in (self.cost_centre, self.agent, self.person, self.credential) if v]
        if len(given) != 1:
            raise ValueError(
                "a budget scope names exactly one of cost_centre, agent, person, credential"
            )
        return self

    @property
    def kind(self) -> str:
        for name in ("cost_centre", "agent", "person", "credential"):
            if getattr(self, name):
                return name
        raise AssertionError("validated")

    @property
    def value(self) -> str:
        return str(getattr(self, self.kind))


class Budget(_Strict):
    """A spending limit per day or calendar month (in the configuration's time zone), in one
    currency (costs in another currency are not counted against it)."""

    description: str = ""
    scope: BudgetScope
    period: Literal["day", "month"] = "month"
    amount: Money = Field(gt=0)
    currency: Currency
    action: Literal["deny", "alert"] = Field(
        "alert",
        description="deny: credential fetches in scope are refused once spent (and reserved) "
        "reaches the amount; alert: only alerts.",
    )
    reserve_per_call: Money | None = Field(
        None,
        description="deny budgets: what a fetch reserves until the gateway reports the call's "
        "cost (an unreported reservation is released after usage.reservation_hold_seconds).",
    )
    thresholds: Annotated[list[Percent], AfterValidator(_distinct)] = Field(
        default_factory=lambda: [80, 100],
        description="Percentages of the amount at which an alert goes out, once per period.",
    )
    channels: Annotated[list[Name], AfterValidator(_distinct)] = Field(
        default_factory=list, description="Notification channels of the broker configuration."
    )

    @model_validator(mode="after")
    def _deny_reserves(self) -> Budget:
        if self.action == "deny" and self.reserve_per_call is None:
            raise ValueError("a deny budget needs reserve_per_call (what a fetch reserves)")
        if self.reserve_per_call is not None and self.reserve_per_call > self.amount:
            raise ValueError("reserve_per_call exceeds the budget's amount")
        return self


class PolicyDocument(_Strict):
    """One policy file. Every section is optional; files in a directory are merged."""

    roles: dict[RoleName, Role] = Field(default_factory=dict)
    group_bindings: list[GroupBinding] = Field(default_factory=list)
    person_bindings: list[PersonBinding] = Field(default_factory=list)
    agents: dict[Name, Agent] = Field(default_factory=dict)
    resource_servers: dict[Name, ResourceServer] = Field(default_factory=dict)
    gateways: dict[Name, Gateway] = Field(default_factory=dict)
    credentials: dict[Name, Credential] = Field(default_factory=dict)
    admins: dict[Name, Admin] = Field(default_factory=dict)
    prices: list[Price] = Field(
        default_factory=list, description="What provider models cost (usage is priced by it)."
    )
    budgets: dict[Name, Budget] = Field(
        default_factory=dict, description="Spending limits and alerts per scope and period."
    )
    authorization_servers: dict[Name, AuthorizationServer] = Field(
        default_factory=dict,
        description="Authorization servers agents may obtain ID-JAGs for (enterprise-managed "
        "authorization).",
    )
    approvals: dict[Name, ApprovalRule] = Field(
        default_factory=dict,
        description="Approval rules by name: permissions that need a person's approval "
        "(OpenID CIBA) before they are granted.",
    )
    limits: Limits | None = None


_PERSON_PATTERN = r"^[a-z0-9][a-z0-9_-]*/.+$"
_REASON_DESCRIPTION = (
    "A reason code the refusal must carry (e.g. missing_permission, audience_mismatch, "
    "person_lacks_scope)."
)


class PolicyTestCase(_Strict):
    """An exchange: given person P with groups G via agent chain A requesting S, expect T or a
    denial. (``kind: exchange`` may be omitted.)"""

    kind: Literal["exchange"] = "exchange"
    name: str
    person: str = Field(pattern=_PERSON_PATTERN, description="<idp>/<subject>")
    groups: list[str] = Field(default_factory=list)
    idp_roles: list[str] = Field(
        default_factory=list, description="The person's IdP roles (not groups)."
    )
    agents: list[Name] = Field(min_length=1, description="The delegation chain, first agent first.")
    scope: list[str] | None = None
    audience: list[str] = Field(default_factory=list)
    expect_granted: list[str] | None = None
    expect_error: (
        Literal["invalid_scope", "invalid_target", "unauthorized_client", "invalid_grant"] | None
    ) = None
    expect_reason: str | None = Field(
        None,
        description="A reason code (e.g. person_lacks_scope, approval_required) the denial "
        "must include.",
    )
    approved: list[Permission] = Field(
        default_factory=list,
        description="Permissions an approval covers (as after an approved OpenID CIBA "
        "request): approval rules governing them do not hold them back.",
    )

    @model_validator(mode="after")
    def _one_expectation(self) -> PolicyTestCase:
        if (self.expect_granted is None) == (self.expect_error is None):
            raise ValueError("a policy test needs exactly one of expect_granted or expect_error")
        return self


class IdJagTestCase(_Strict):
    """An ID-JAG request: person P with groups G via agent chain A (the last agent asks) for
    authorization server `authorization_server` (its name here) and `resource`, requesting S;
    expect the ID-JAG's scopes T or a denial."""

    kind: Literal["id_jag"]
    name: str
    person: str = Field(pattern=_PERSON_PATTERN, description="<idp>/<subject>")
    groups: list[str] = Field(default_factory=list)
    idp_roles: list[str] = Field(default_factory=list)
    agents: list[Name] = Field(min_length=1, description="The delegation chain, first agent first.")
    authorization_server: Name = Field(description="Its name under authorization_servers.")
    resource: str = Field(min_length=1)
    scope: list[str] | None = None
    expect_granted: list[str] | None = None
    expect_error: (
        Literal["invalid_scope", "invalid_target", "unauthorized_client", "invalid_grant"] | None
    ) = None
    expect_reason: str | None = Field(
        None,
        description="A reason code the denial must include (unknown_resource, "
        "id_jag_not_allowed, person_lacks_scope, ...).",
    )

    @model_validator(mode="after")
    def _one_expectation(self) -> IdJagTestCase:
        if (self.expect_granted is None) == (self.expect_error is None):
            raise ValueError("a policy test needs exactly one of expect_granted or expect_error")
        return self


class ApprovalTestCase(_Strict):
    """A request for approval: person P with groups G via agent chain A asks for S (as with
    OpenID CIBA); may `approver` (with their own groups and IdP roles) approve it? The request
    must need approval. ``eligible``: the approver may approve at least one rule it needs (those
    of `expect_rules`, when given, exactly); ``refused``: none, for `expect_reason` when given
    (not_eligible, self_approval, in_agent_chain)."""

    kind: Literal["approval"]
    name: str
    person: str = Field(pattern=_PERSON_PATTERN, description="<idp>/<subject>")
    groups: list[str] = Field(default_factory=list)
    idp_roles: list[str] = Field(default_factory=list)
    agents: list[Name] = Field(min_length=1, description="The delegation chain, first agent first.")
    scope: list[str] | None = None
    audience: list[str] = Field(default_factory=list)
    approver: str = Field(pattern=_PERSON_PATTERN, description="The approver, <idp>/<subject>.")
    approver_groups: list[str] = Field(default_factory=list)
    approver_idp_roles: list[str] = Field(default_factory=list)
    expect: Literal["eligible", "refused"]
    expect_rules: list[Name] | None = Field(
        None, description="With eligible: exactly the rules the approver's approval counts for."
    )
    expect_reason: Literal["not_eligible", "self_approval", "in_agent_chain"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ApprovalTestCase:
        if self.expect == "eligible" and self.expect_reason is not None:
            raise ValueError("expect_reason is for expect: refused")
        if self.expect == "refused" and self.expect_rules is not None:
            raise ValueError("expect_rules is for expect: eligible")
        return self


class FetchTestCase(_Strict):
    """A credential fetch: gateway G presents an agent token of this shape (person, groups,
    agent chain, scopes, audiences) for credential C; expect it allowed or refused (and why).
    The same decision the broker makes at ``POST /v1/credentials/{name}``, after the token
    itself was verified."""

    kind: Literal["fetch"]
    name: str
    gateway: Name
    credential: str = Field(min_length=1)
    person: str = Field(pattern=_PERSON_PATTERN, description="The token's person, <idp>/<subject>.")
    groups: list[str] = Field(default_factory=list)
    idp_roles: list[str] = Field(default_factory=list)
    agents: list[Name] = Field(
        min_length=1, description="The token's delegation chain, first agent first."
    )
    scope: list[str] = Field(description="The scopes the token carries.")
    audience: list[str] = Field(min_length=1, description="The audiences the token carries.")
    version: Literal["current", "previous"] = "current"
    approved: list[Permission] = Field(
        default_factory=list, description="The permissions the token's approval covers."
    )
    spent: dict[Name, Money] = Field(
        default_factory=dict,
        description="What each budget has spent (and reserved) so far this period: a deny "
        "budget refuses the fetch (budget_exceeded) when its reservation does not fit.",
    )
    expect: Literal["allowed", "denied"]
    expect_reason: str | None = Field(None, description=_REASON_DESCRIPTION)


class IntrospectionTestCase(_Strict):
    """Introspection: may `client` learn what a valid token addressed to `audience` carries?"""

    kind: Literal["introspection"]
    name: str
    client: Name
    audience: list[str] = Field(min_length=1, description="The audiences the token carries.")
    expect: Literal["allowed", "denied"]
    expect_reason: str | None = Field(None, description=_REASON_DESCRIPTION)


class AdminTestCase(_Strict):
    """An admin call: may admin client `admin` use `permission` (for `credential`)?"""

    kind: Literal["admin"]
    name: str
    admin: Name
    permission: AdminPermission
    credential: str | None = Field(None, description="With credentials:refresh: which one.")
    expect: Literal["allowed", "denied"]
    expect_reason: str | None = Field(None, description=_REASON_DESCRIPTION)


def _test_kind(value: object) -> str:
    kind = value.get("kind", "exchange") if isinstance(value, dict) else getattr(value, "kind", "")
    return kind if isinstance(kind, str) else ""


AnyPolicyTestCase = Annotated[
    Annotated[PolicyTestCase, Tag("exchange")]
    | Annotated[FetchTestCase, Tag("fetch")]
    | Annotated[IntrospectionTestCase, Tag("introspection")]
    | Annotated[AdminTestCase, Tag("admin")]
    | Annotated[ApprovalTestCase, Tag("approval")]
    | Annotated[IdJagTestCase, Tag("id_jag")],
    Discriminator(
        _test_kind,
        custom_error_type="invalid_test_kind",
        custom_error_message="kind must be exchange (the default), fetch, introspection, admin, "
        "approval or id_jag",
    ),
]


class PolicyTestFile(_Strict):
    tests: list[AnyPolicyTestCase] = Field(min_length=1)

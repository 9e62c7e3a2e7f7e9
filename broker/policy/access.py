"""The pure decisions besides the token exchange: a gateway's credential fetch, introspection and
the admin API. No I/O, no clock.

The runtime (`broker.credentials`, `broker.introspection`, the admin endpoints) and the policy
tests / `broker policy explain` call the same functions, so what a policy test says about a
fetch, an introspection or an admin call is what the broker does. What needs I/O (verifying the
token, revocation, rate limits, reading the secret) stays at the edge; these functions decide on
what the verified token carries and the policy in force.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cachetools import LRUCache

from broker.errors import AccessDenied, InvalidClient
from broker.policy.approvals import approved_in
from broker.policy.engine import Person, Policy, Standing, standing
from broker.policy.model import ADMIN_PERMISSIONS, AdminPermission
from broker.types import BrokerToken

if TYPE_CHECKING:
    from broker.client_auth import AuthenticatedClient


class AccessReason(enum.StrEnum):
    GRANTED = "granted"
    # credential fetch
    NOT_A_GATEWAY = "not_a_gateway"
    AUDIENCE_MISMATCH = "audience_mismatch"
    GATEWAY_NOT_ALLOWED = "gateway_not_allowed"
    MISSING_PERMISSION = "missing_permission"
    PERMISSION_WITHDRAWN = "permission_withdrawn"
    PREVIOUS_NOT_ALLOWED = "previous_not_allowed"
    BUDGET_EXCEEDED = "budget_exceeded"
    # introspection
    NOT_AN_INTROSPECTOR = "not_an_introspector"
    # admin API
    NOT_AN_ADMIN = "not_an_admin"
    ADMIN_PERMISSION_MISSING = "admin_permission_missing"
    ADMIN_CREDENTIAL_NOT_ALLOWED = "admin_credential_not_allowed"


class RememberedStandings:
    """`standing` for a token's person (with the groups and IdP roles it carries), agent chain
    and approval (`approvals.approved_in`), computed once per policy version and remembered:
    the credential fetch and introspection paths are hot, and the answer changes only when the
    policy does."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self._found: LRUCache[tuple[object, ...], Standing] = LRUCache(maxsize=maxsize)

    def of(self, policy: Policy, token: BrokerToken) -> Standing:
        provenance = token.provenance
        approved = approved_in(token.claims) if policy.approval_rules else frozenset()
        key = (
            policy.version,
            provenance.idp,
            provenance.subject,
            provenance.groups,
            provenance.idp_roles,
            token.actor_chain,
            approved,
        )
        found = self._found.get(key)
        if found is None:
            found = self._found[key] = standing(
                policy, Person.of(provenance), token.actor_chain, approved
            )
        return found


_ERROR_FOR_REASON: Mapping[AccessReason, str] = {
    AccessReason.NOT_A_GATEWAY: "invalid_client",
    AccessReason.AUDIENCE_MISMATCH: "invalid_token",
    AccessReason.GATEWAY_NOT_ALLOWED: "access_denied",
    AccessReason.MISSING_PERMISSION: "insufficient_scope",
    AccessReason.PERMISSION_WITHDRAWN: "insufficient_scope",
    AccessReason.PREVIOUS_NOT_ALLOWED: "access_denied",
    AccessReason.BUDGET_EXCEEDED: "access_denied",
    AccessReason.NOT_AN_INTROSPECTOR: "unauthorized_client",
    AccessReason.NOT_AN_ADMIN: "invalid_client",
    AccessReason.ADMIN_PERMISSION_MISSING: "access_denied",
    AccessReason.ADMIN_CREDENTIAL_NOT_ALLOWED: "access_denied",
}


@dataclass(frozen=True, slots=True)
class AccessDecision:
    allowed: bool
    reason: AccessReason
    description: str
    policy_version: str
    detail: str | None = None
    """A finer reason code where there is one (for ``permission_withdrawn``: the engine's
    reason, e.g. ``person_lacks_scope``)."""

    @property
    def error(self) -> str | None:
        """The protocol error code of a refusal (None when allowed)."""
        return None if self.allowed else _ERROR_FOR_REASON[self.reason]


def _shown(value: str, limit: int = 64) -> str:
    return repr(value) if len(value) <= limit else repr(value[:limit] + "...")


def _granted(policy: Policy, description: str = "granted") -> AccessDecision:
    return AccessDecision(True, AccessReason.GRANTED, description, policy.version)


def _denied(
    policy: Policy, reason: AccessReason, description: str, detail: str | None = None
) -> AccessDecision:
    return AccessDecision(False, reason, description, policy.version, detail)


# -- credential fetch -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FetchRequest:
    """A gateway asks for `credential`, presenting an agent token of this shape."""

    gateway: str
    credential: str
    person: Person
    """The token's person, with the groups its provenance carries."""
    actor_chain: tuple[str, ...]
    """The token's agents, most recent first (the nesting order of ``act``)."""
    scopes: frozenset[str]
    """The scopes the (verified) agent token carries."""
    audiences: tuple[str, ...]
    """The audiences the agent token is addressed to."""
    previous: bool = False
    """``?version=previous``."""
    approved: frozenset[str] = frozenset()
    """The permissions the token's approval covers (`approvals.approved_in`)."""


def is_gateway(policy: Policy, client_id: str) -> bool:
    return client_id in policy.gateways


def decide_fetch(
    policy: Policy, request: FetchRequest, *, standing_now: Standing | None = None
) -> AccessDecision:
    """May `request.gateway` receive `request.credential` for a token of this shape? Pure.

    In order: the caller is a registered gateway; the token is addressed to it (its audiences
    meet the gateway's); the gateway is listed for the credential (the same answer whether or
    not the credential exists); the token's scope carries the permission the credential
    requires, and the policy in force still grants that permission to the token's person and
    every agent of its chain (`engine.standing`; the runtime passes the one it remembers as
    `standing_now`); ``previous`` only where the credential has a grace period.
    """
    gateway = policy.gateways.get(request.gateway)
    if gateway is None:
        return _denied(
            policy, AccessReason.NOT_A_GATEWAY, "only registered gateways may fetch credentials"
        )
    if not set(gateway.audiences).intersection(request.audiences):
        return _denied(
            policy,
            AccessReason.AUDIENCE_MISMATCH,
            "the agent token is not addressed to this gateway",
        )
    name = request.credential
    credential = policy.credentials.get(name)
    if credential is None or name not in gateway.credentials:
        return _denied(
            policy,
            AccessReason.GATEWAY_NOT_ALLOWED,
            f"gateway {request.gateway!r} may not receive credential {_shown(name)}",
        )
    if credential.requires not in request.scopes:
        return _denied(
            policy,
            AccessReason.MISSING_PERMISSION,
            f"the agent token lacks the permission {credential.requires!r} that credential "
            f"{name!r} requires",
        )
    if standing_now is None:
        standing_now = standing(policy, request.person, request.actor_chain, request.approved)
    withdrawn = standing_now.withdrawn(credential.requires)
    if withdrawn is not None:
        return _denied(
            policy,
            AccessReason.PERMISSION_WITHDRAWN,
            f"the policy in force no longer grants the permission {credential.requires!r} "
            f"to this token: {Standing.describe(withdrawn)}",
            detail=str(withdrawn),
        )
    if request.previous and credential.previous_version_grace_seconds <= 0:
        return _denied(
            policy,
            AccessReason.PREVIOUS_NOT_ALLOWED,
            f"the policy does not allow the previous version of {name!r}",
        )
    return _granted(policy)


# -- introspection ----------------------------------------------------------------------------


def introspection_audiences(policy: Policy, client_id: str) -> tuple[str, ...] | None:
    """The audiences `client_id` may introspect tokens for, or None when it may not introspect
    at all (only registered resource servers and gateways may)."""
    server = policy.resource_servers.get(client_id) or policy.gateways.get(client_id)
    return None if server is None else tuple(server.audiences)


def decide_introspection(
    policy: Policy, client_id: str, token_audiences: tuple[str, ...]
) -> AccessDecision:
    """May `client_id` learn what a valid token addressed to `token_audiences` carries? Pure.

    A registered resource server or gateway learns about a token only when the token is
    addressed to it; anyone else may not introspect at all.
    """
    audiences = introspection_audiences(policy, client_id)
    if audiences is None:
        return _denied(
            policy,
            AccessReason.NOT_AN_INTROSPECTOR,
            "only registered resource servers and gateways may introspect tokens",
        )
    if not set(audiences).intersection(token_audiences):
        return _denied(
            policy, AccessReason.AUDIENCE_MISMATCH, "the token is not addressed to this client"
        )
    return _granted(policy)


# -- admin API --------------------------------------------------------------------------------


def decide_admin(
    policy: Policy,
    admin: str,
    permission: AdminPermission,
    credential: str | None = None,
) -> AccessDecision:
    """May admin client `admin` do `permission` (for `credential`, with credentials:refresh)?

    Fail closed: an admin holds exactly the permissions its policy entry lists (none listed:
    none held); ``credentials:refresh`` is further limited to the admin's ``credentials`` when
    it names any.
    """
    if permission not in ADMIN_PERMISSIONS:
        raise ValueError(f"unknown admin permission {permission!r}")
    spec = policy.admins.get(admin)
    if spec is None:
        return _denied(policy, AccessReason.NOT_AN_ADMIN, "admin authentication is required")
    if permission not in spec.permissions:
        held = ", ".join(spec.permissions) or "none"
        return _denied(
            policy,
            AccessReason.ADMIN_PERMISSION_MISSING,
            f"admin {admin!r} lacks the permission {permission!r} (it holds: {held})",
        )
    if (
        permission == "credentials:refresh"
        and credential is not None
        and spec.credentials is not None
        and credential not in spec.credentials
    ):
        return _denied(
            policy,
            AccessReason.ADMIN_CREDENTIAL_NOT_ALLOWED,
            f"admin {admin!r} may not refresh credential {_shown(credential)}",
        )
    return _granted(policy)


def require_admin(
    policy: Policy,
    client: AuthenticatedClient | None,
    permission: AdminPermission,
    credential: str | None = None,
) -> str:
    """`decide_admin` at an admin endpoint: the admin's client id, or the refusal as an OAuth
    error (401 for a caller that is not an admin, 403 naming the missing permission). The
    edge records the refusal (``request.denied`` with this reason)."""
    if client is None or client.kind != "admin":
        raise InvalidClient("admin authentication is required", reason="not_an_admin")
    decision = decide_admin(policy, client.client_id, permission, credential)
    if decision.allowed:
        return client.client_id
    if decision.reason is AccessReason.NOT_AN_ADMIN:
        raise InvalidClient(decision.description, reason=str(decision.reason))
    raise AccessDenied(decision.description, reason=str(decision.reason))


# -- explanations (`broker policy explain`) ---------------------------------------------------


def _verdict_lines(decision: AccessDecision) -> list[str]:
    lines = [f"decision:       {'ALLOWED' if decision.allowed else f'DENIED ({decision.error})'}"]
    if not decision.allowed:
        detail = f" ({decision.detail})" if decision.detail else ""
        lines.append(f"reason:         {decision.reason}{detail}: {decision.description}")
    return lines


def explain_fetch(policy: Policy, request: FetchRequest) -> str:
    """A human-readable account of `decide_fetch`."""
    decision = decide_fetch(policy, request)
    person = request.person
    lines = [f"policy version: {policy.version}"]
    gateway = policy.gateways.get(request.gateway)
    if gateway is None:
        lines.append(f"gateway:        {request.gateway} (not a registered gateway)")
    else:
        lines.append(
            f"gateway:        {request.gateway} (audiences: {', '.join(gateway.audiences)}; "
            f"may receive: {', '.join(gateway.credentials) or '-'})"
        )
    credential = policy.credentials.get(request.credential)
    required = f"requires {credential.requires}" if credential is not None else "not declared"
    lines += [
        f"credential:     {request.credential} ({required})"
        + (" [previous version]" if request.previous else ""),
        f"token person:   {person.person_id} (groups: {', '.join(sorted(person.groups)) or '-'})",
        f"token chain:    {' <- '.join(request.actor_chain) or '-'}",
        f"token scope:    {' '.join(sorted(request.scopes)) or '-'}",
        f"token audience: {' '.join(request.audiences) or '-'}",
    ]
    if credential is not None:
        held = standing(policy, person, request.actor_chain, request.approved)
        withdrawn = held.withdrawn(credential.requires)
        still = "yes" if withdrawn is None else f"no: {Standing.describe(withdrawn)}"
        lines.append(f"policy grants {credential.requires} to this person and chain now: {still}")
    return "\n".join(lines + _verdict_lines(decision))


def explain_introspection(policy: Policy, client: str, token_audiences: tuple[str, ...]) -> str:
    """A human-readable account of `decide_introspection`."""
    decision = decide_introspection(policy, client, token_audiences)
    audiences = introspection_audiences(policy, client)
    lines = [
        f"policy version: {policy.version}",
        f"client:         {client} "
        + (
            "(not a resource server or gateway)"
            if audiences is None
            else f"(may introspect tokens for: {', '.join(audiences)})"
        ),
        f"token audience: {' '.join(token_audiences) or '-'}",
    ]
    return "\n".join(lines + _verdict_lines(decision))


def explain_admin(
    policy: Policy, admin: str, permission: AdminPermission, credential: str | None = None
) -> str:
    """A human-readable account of `decide_admin`."""
    decision = decide_admin(policy, admin, permission, credential)
    spec = policy.admins.get(admin)
    if spec is None:
        holds = "(not an admin)"
    else:
        only = f"; refresh only: {', '.join(spec.credentials)}" if spec.credentials else ""
        holds = f"(holds: {', '.join(spec.permissions) or 'nothing'}{only})"
    lines = [
        f"policy version: {policy.version}",
        f"admin:          {admin} {holds}",
        f"asks for:       {permission}" + (f" on {credential}" if credential else ""),
    ]
    return "\n".join(lines + _verdict_lines(decision))

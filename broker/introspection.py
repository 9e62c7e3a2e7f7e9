"""RFC 7662 token introspection for registered resource servers (and, later, gateways).

A caller learns about a token only if the token is addressed to it (its audiences intersect the
token's ``aud``); otherwise the answer is ``{"active": false}``, as for any invalid token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from broker.audit import DecisionLog
from broker.client_auth import AuthenticatedClient
from broker.errors import InvalidRequest, TemporarilyUnavailable, UnauthorizedClient
from broker.oauth_request import OAuthForm
from broker.policy import Policy
from broker.policy.access import (
    RememberedStandings,
    decide_introspection,
    introspection_audiences,
)
from broker.revocation import Revocations, TokenRevoked
from broker.state import StateUnavailable
from broker.tokens import BrokerTokenVerifier
from idp_adapters.base import TokenRejected

INACTIVE: dict[str, Any] = {"active": False}
_EXPOSED_CLAIMS = (
    "iss",
    "sub",
    "aud",
    "client_id",
    "scope",
    "act",
    "iat",
    "nbf",
    "exp",
    "jti",
    "auth_time",
    "provenance",
    "policy_version",
    "parent_jti",
    "approval",
    "cnf",  # RFC 9449 §6.2: the key a DPoP-bound token is bound to
)


class Introspection:
    def __init__(
        self,
        *,
        verifier: BrokerTokenVerifier,
        policy: Callable[[], Policy],
        decisions: DecisionLog,
        revocations: Revocations,
    ) -> None:
        self._revocations = revocations
        self._verifier = verifier
        self._policy = policy
        self._decisions = decisions
        self._standings = RememberedStandings()

    async def handle(
        self, form: OAuthForm, client: AuthenticatedClient, *, request_id: str
    ) -> dict[str, Any]:
        policy = self._policy()
        if (
            client.kind not in {"resource_server", "gateway"}
            or introspection_audiences(policy, client.client_id) is None
        ):
            raise UnauthorizedClient(
                "only registered resource servers and gateways may introspect tokens"
            )
        token = form.non_empty("token")
        if token is None:
            raise InvalidRequest("token is required")
        try:
            verified = await self._verifier.verify(token)
        except TokenRejected as exc:
            self._decisions.record(
                "token.introspect",
                outcome="inactive",
                reason=exc.reason,
                client_id=client.client_id,
                request_id=request_id,
            )
            return INACTIVE
        try:
            await self._revocations.check(verified)
        except TokenRevoked as exc:
            self._decisions.record(
                "token.introspect",
                outcome="inactive",
                reason=exc.reason,
                jti=verified.jti,
                client_id=client.client_id,
                request_id=request_id,
            )
            return INACTIVE
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "revocation state cannot be checked right now; refusing (fail closed)",
                reason="state_unavailable",
            ) from None
        # The same pure decision policy tests and `broker policy explain` use.
        decision = decide_introspection(policy, client.client_id, verified.audiences)
        if not decision.allowed:
            self._decisions.record(
                "token.introspect",
                outcome="inactive",
                reason=str(decision.reason),
                jti=verified.jti,
                client_id=client.client_id,
                request_id=request_id,
            )
            return INACTIVE
        # Tokens already issued are narrowed by the policy in force, as at credential fetch: a
        # right withdrawn since issue is no longer reported, and a chain that holds nothing any
        # more (an agent removed, no longer acting for the person) makes the token inactive.
        held = self._standings.of(policy, verified)
        withdrawn = {s: why for s in verified.scopes if (why := held.withdrawn(s)) is not None}
        scopes = [s for s in verified.scopes if s not in withdrawn]
        if not scopes:
            self._decisions.record(
                "token.introspect",
                outcome="inactive",
                reason=str(held.reason or next(iter(withdrawn.values()))),
                jti=verified.jti,
                client_id=client.client_id,
                request_id=request_id,
            )
            return INACTIVE
        self._decisions.record(
            "token.introspect",
            outcome="active",
            jti=verified.jti,
            person=verified.subject,
            agent_chain=list(verified.actor_chain),
            scopes=scopes,
            withdrawn_scopes=sorted(withdrawn) or None,
            client_id=client.client_id,
            request_id=request_id,
        )
        response: dict[str, Any] = {
            "active": True,
            "token_type": "DPoP" if verified.jkt else "Bearer",
        }
        response.update({k: verified.claims[k] for k in _EXPOSED_CLAIMS if k in verified.claims})
        response["scope"] = " ".join(scopes)
        return response

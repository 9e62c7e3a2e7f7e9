"""OpenID Connect CIBA (Client-Initiated Backchannel Authentication) Core 1.0, the agent's side
of an approval: ``POST /oauth2/bc-authorize`` opens a request, the token endpoint's
``urn:openid:params:grant-type:ciba`` grant redeems it once it is approved.

The subject is presented exactly as for the token exchange (``subject_token`` and
``subject_token_type``, optionally ``actor_token``), not with CIBA's ``login_hint`` /
``id_token_hint`` / ``login_hint_token``: the agent already holds the person's token (or, for a
sub-agent, a broker token), and verifying it the one way the exchange does keeps one code path
for "who is this for" (issuer routing, revocation, the groups the policy uses). The ``scope`` is
the permissions asked for (``openid`` is neither needed nor meaningful here).
"""

from __future__ import annotations

import json
import math
import unicodedata
from collections.abc import Callable
from typing import Any

from broker.approvals.errors import (
    ApprovalDenied,
    ApprovalExpired,
    ApprovalNotFound,
    ApprovalPending,
)
from broker.approvals.errors import SlowDown as PollTooSoon
from broker.approvals.model import ApprovalRecord, Delivery, ParentRef
from broker.approvals.service import ApprovalService
from broker.audit import DecisionLog, recorded_request_var
from broker.binding import TokenBinding
from broker.client_auth import AuthenticatedClient
from broker.clock import Clock
from broker.dpop import DPoPProof
from broker.errors import (
    ApprovalDeniedError,
    AuthorizationPending,
    ExpiredToken,
    InvalidAuthorizationDetails,
    InvalidBindingMessage,
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    OAuthError,
    SlowDown,
    TemporarilyUnavailable,
)
from broker.exchange import (
    DECISION_ERRORS,
    TokenExchangeGrant,
    bounded_lifetime,
    issue_or_refuse,
    record_denial,
)
from broker.oauth_request import OAuthForm
from broker.policy import ExchangeRequest, ParentGrant, Policy, decide
from broker.policy.approvals import approved_permissions
from broker.revocation import Revocations, check_exchange_allowed
from broker.state import StateUnavailable
from broker.tokens import TokenIssuer
from broker.types import BrokerToken, Sensitive, TokenType

GRANT_TYPE = "urn:openid:params:grant-type:ciba"
BC_AUTHORIZE_PATH = "/oauth2/bc-authorize"
MAX_BINDING_MESSAGE_CHARS = 256
MAX_AUTHORIZATION_DETAILS_BYTES = 8192
MAX_AUTHORIZATION_DETAILS_DEPTH = 6
MAX_AUTH_REQ_ID_CHARS = 128
MAX_NOTIFICATION_TOKEN_CHARS = 1024
_HINTS = ("login_hint", "login_hint_token", "id_token_hint")


def _binding_message(form: OAuthForm) -> str | None:
    message = form.get("binding_message")
    if message is None:
        return None
    if not message.strip() or len(message) > MAX_BINDING_MESSAGE_CHARS:
        raise InvalidBindingMessage(
            f"binding_message must be 1 to {MAX_BINDING_MESSAGE_CHARS} characters"
        )
    if any(unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs") for c in message):
        raise InvalidBindingMessage(
            "binding_message must be printable text (no control characters)"
        )
    return message.strip()


def _depth(value: object, level: int = 0) -> int:
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _authorization_details(form: OAuthForm) -> list[dict[str, Any]] | None:
    """RFC 9396: a JSON array of objects, each with a string ``type``. Carried verbatim to the
    approver and into the token, so bounded in size and depth, and free of non-finite numbers."""
    raw = form.get("authorization_details")
    if raw is None:
        return None
    if len(raw.encode()) > MAX_AUTHORIZATION_DETAILS_BYTES:
        raise InvalidAuthorizationDetails(
            f"authorization_details exceeds {MAX_AUTHORIZATION_DETAILS_BYTES} bytes"
        )

    def refuse_constant(name: str) -> float:
        raise ValueError(name)

    try:
        details = json.loads(raw, parse_constant=refuse_constant)
    except (ValueError, RecursionError):
        raise InvalidAuthorizationDetails("authorization_details is not valid JSON") from None
    if not isinstance(details, list) or not details:
        raise InvalidAuthorizationDetails("authorization_details must be a non-empty JSON array")
    for entry in details:
        if not isinstance(entry, dict):
            raise InvalidAuthorizationDetails("each authorization_details entry must be an object")
        kind = entry.get("type")
        if not isinstance(kind, str) or not kind or len(kind) > 256:
            raise InvalidAuthorizationDetails(
                "each authorization_details entry needs a string 'type'"
            )
    if _depth(details) > MAX_AUTHORIZATION_DETAILS_DEPTH:
        raise InvalidAuthorizationDetails(
            f"authorization_details nests deeper than {MAX_AUTHORIZATION_DETAILS_DEPTH} levels"
        )
    if any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(details)):
        raise InvalidAuthorizationDetails("authorization_details holds a non-finite number")
    return details


def _leaves(value: object) -> list[object]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]


def _requested_expiry(form: OAuthForm) -> int | None:
    raw = form.get("requested_expiry")
    if raw is None:
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 9 or int(raw) < 1:
        raise InvalidRequest("requested_expiry must be a positive integer (seconds)")
    return int(raw)


class BackchannelAuthentication:
    """``POST /oauth2/bc-authorize``: open an approval request for what the policy grants only
    with approval. Answers ``auth_req_id``, ``expires_in`` and ``interval``."""

    def __init__(
        self,
        *,
        exchange: TokenExchangeGrant,
        approvals: ApprovalService,
        decisions: DecisionLog,
        policy: Callable[[], Policy],
    ) -> None:
        self._exchange = exchange
        self._approvals = approvals
        self._decisions = decisions
        self._policy = policy

    async def handle(
        self, form: OAuthForm, client: AuthenticatedClient | None, *, request_id: str
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"request_id": request_id}
        try:
            return await self._handle(form, client, record, request_id)
        except OAuthError as err:
            record_denial(self._decisions, "approval.request", err, record)
            raise

    async def _handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        record: dict[str, Any],
        request_id: str,
    ) -> dict[str, Any]:
        if client is None:
            raise InvalidClient("client authentication is required")
        for hint in _HINTS:
            if form.get(hint) is not None:
                raise InvalidRequest(
                    f"{hint} is not supported: present the person's token as subject_token "
                    "(with subject_token_type), as for the token exchange"
                )
        binding_message = _binding_message(form)
        details = _authorization_details(form)
        requested_expiry = _requested_expiry(form)
        prepared = await self._exchange.prepare(form, client, record, rate_limit="ciba")
        if prepared.issued_type is not TokenType.ACCESS_TOKEN:
            raise InvalidRequest("an approved request is redeemed for an access token only")
        agent = prepared.policy.agents.get(prepared.actor.client_id)
        backchannel = getattr(agent.spec, "backchannel", None) if agent else None
        delivery = Delivery()
        notification_token: Sensitive | None = None
        mode = backchannel.token_delivery_mode if backchannel is not None else "poll"
        if backchannel is not None and mode == "ping":
            delivery = Delivery("ping", str(backchannel.client_notification_endpoint))
            token = form.non_empty("client_notification_token")
            if token is None or len(token) > MAX_NOTIFICATION_TOKEN_CHARS:
                raise InvalidRequest(
                    "client_notification_token is required for an agent registered for ping "
                    f"delivery (at most {MAX_NOTIFICATION_TOKEN_CHARS} characters)"
                )
            notification_token = Sensitive(token)

        decision = decide(
            prepared.policy, self._exchange.exchange_request(prepared, for_approval=True)
        )
        record["agent_chain"] = list(decision.actor_chain)
        if not decision.allowed:
            error = DECISION_ERRORS[decision.error or "invalid_grant"]
            raise error(decision.description, reason=decision.reason)
        if not decision.approvals:
            raise InvalidRequest(
                "nothing requested needs approval: exchange the token at the token endpoint "
                "(grant_type=urn:ietf:params:oauth:grant-type:token-exchange)",
                reason="approval_not_needed",
            )
        parent = prepared.parent
        try:
            auth_req_id, approval = await self._approvals.open(
                client_id=prepared.actor.client_id,
                person=prepared.person,
                provenance=prepared.provenance,
                agent_chain=decision.actor_chain,
                scopes=decision.scopes,
                audiences=decision.audiences,
                requirements=decision.approvals,
                binding_message=binding_message,
                authorization_details=details,
                requested_expiry=requested_expiry,
                parent=_parent_ref(parent) if parent else None,
                policy_version=decision.policy_version,
                delivery=delivery,
                notification_token=notification_token,
                request_id=request_id,
                subject_time=prepared.subject_time,
            )
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "approval state cannot be written right now; try again",
                reason="state_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return {
            "auth_req_id": auth_req_id,
            "expires_in": int(approval.expires_at - approval.created_at),
            "interval": approval.interval,
        }


def _parent_ref(parent: BrokerToken) -> ParentRef:
    from broker.policy.approvals import approved_in

    return ParentRef(
        jti=parent.jti,
        actor_chain=parent.actor_chain,
        scopes=tuple(sorted(parent.scopes)),
        audiences=parent.audiences,
        expires_at=parent.expires_at,
        lineage=parent.lineage,
        approved=tuple(sorted(approved_in(parent.claims))),
        issued_at=parent.issued_at,
    )


def _parent_token(record: ApprovalRecord) -> BrokerToken | None:
    """The parent token as far as the revocation check needs it (ids, chain, issue time)."""
    parent = record.parent
    if parent is None:
        return None
    return BrokerToken(
        jti=parent.jti,
        subject=record.person.person_id,
        client_id=parent.actor_chain[0] if parent.actor_chain else "",
        scopes=frozenset(parent.scopes),
        audiences=parent.audiences,
        actor_chain=parent.actor_chain,
        provenance=record.provenance,
        policy_version="",
        issued_at=parent.issued_at,
        expires_at=parent.expires_at,
        parent_jti=parent.lineage[-1] if parent.lineage else None,
        claims={},
        lineage=parent.lineage,
    )


class CibaGrant:
    """The token endpoint's ``urn:openid:params:grant-type:ciba`` grant (a `GrantHandler`).

    Polls answer ``authorization_pending``, ``slow_down``, ``access_denied``, ``expired_token``
    or, once, the token: decided again under the policy in force now (a policy narrowed since
    the request narrows the token), with revocations checked again, and an ``approval`` claim
    naming the request, who approved, when, the rules and permissions, and the authorization
    details. Waiting polls are not decisions and leave no audit record; every outcome does.
    """

    grant_type = GRANT_TYPE
    repeatable: frozenset[str] = frozenset()

    def __init__(
        self,
        *,
        approvals: ApprovalService,
        policy: Callable[[], Policy],
        issuer: TokenIssuer,
        revocations: Revocations,
        decisions: DecisionLog,
        clock: Clock,
        max_lifetime_seconds: int,
    ) -> None:
        self._approvals = approvals
        self._policy = policy
        self._issuer = issuer
        self._revocations = revocations
        self._decisions = decisions
        self._clock = clock
        self._max_lifetime = max_lifetime_seconds

    async def handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        *,
        request_id: str,
        dpop: DPoPProof | None = None,
    ) -> dict[str, Any]:
        if client is None:
            raise InvalidClient("client authentication is required")
        agent = self._policy().agents.get(client.client_id)
        TokenBinding.require(
            client.client_id,
            agent is not None and agent.spec.dpop == "required",
            dpop,
            parent_bound=False,
        )
        auth_req_id = form.non_empty("auth_req_id")
        if auth_req_id is None:
            raise InvalidRequest("auth_req_id is required")
        try:
            if len(auth_req_id) > MAX_AUTH_REQ_ID_CHARS:
                raise ApprovalNotFound("unknown auth_req_id")
            approval = await self._approvals.poll(auth_req_id, client.client_id)
        except (ApprovalPending, PollTooSoon) as waiting:
            recorded_request_var.set(request_id)  # a poll is not a decision: no record
            if isinstance(waiting, PollTooSoon):
                raise SlowDown(
                    f"polling too fast: wait {waiting.interval} s between polls"
                ) from None
            raise AuthorizationPending(
                "nobody has decided yet; poll again after the interval"
            ) from None
        except ApprovalNotFound:
            raise InvalidGrant(
                "auth_req_id is unknown, redeemed, or not this client's",
                reason="unknown_auth_req_id",
            ) from None
        except ApprovalDenied:
            raise ApprovalDeniedError("the request was denied", reason="approval_denied") from None
        except ApprovalExpired:
            raise ExpiredToken(
                "the request expired before anyone decided it; ask again",
                reason="approval_expired",
            ) from None
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "approval state cannot be read right now; poll again",
                reason="state_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        return await self._issue(approval, client, request_id, dpop)

    async def _issue(
        self,
        approval: ApprovalRecord,
        client: AuthenticatedClient,
        request_id: str,
        dpop: DPoPProof | None,
    ) -> dict[str, Any]:
        policy = self._policy()
        record: dict[str, Any] = {
            "request_id": request_id,
            "client_id": client.client_id,
            "approval_id": approval.id,
            "person": approval.person.person_id,
            "idp": approval.person.idp,
            "provenance": approval.provenance.to_claim(),
            "parent_jti": approval.parent.jti if approval.parent else None,
            "policy_version": policy.version,
            "agent_chain": list(approval.agent_chain),
            "requested_scopes": list(approval.scopes),
            "requested_audiences": list(approval.audiences),
        }
        try:
            await check_exchange_allowed(
                self._revocations,
                person=approval.person.person_id,
                subject_time=approval.subject_time,
                parent=_parent_token(approval),
                actor=client.client_id,
                actor_credential_time=client.issued_at,
            )
            parent = approval.parent
            approved = approved_permissions(approval.requirements)
            if parent is not None:
                approved |= frozenset(parent.approved)
            decision = decide(
                policy,
                ExchangeRequest(
                    person=approval.person,
                    agent=client.client_id,
                    scopes=approval.scopes,
                    audiences=approval.audiences,
                    parent=ParentGrant(
                        parent.actor_chain, frozenset(parent.scopes), parent.audiences
                    )
                    if parent
                    else None,
                    approved=approved,
                ),
            )
            if not decision.allowed:
                error = DECISION_ERRORS[decision.error or "invalid_grant"]
                raise error(
                    f"the approved request is no longer allowed: {decision.description}",
                    reason=decision.reason,
                )
            lifetime = bounded_lifetime(
                self._clock.now(),
                decision.max_lifetime_seconds,
                self._max_lifetime,
                approval.provenance.session_expires_at,
                parent.expires_at if parent else None,
            )
            claim: dict[str, Any] = {
                "id": approval.id,
                "approved_by": list(approval.approvers),
                "approved_at": int(approval.decided_at or self._clock.now()),
                "rules": list(approval.rules),
                "permissions": sorted(approved & frozenset(decision.scopes)),
            }
            if approval.authorization_details is not None:
                claim["authorization_details"] = approval.authorization_details
            issued = issue_or_refuse(
                self._issuer,
                provenance=approval.provenance,
                client_id=client.client_id,
                actor_chain=decision.actor_chain,
                scopes=decision.scopes,
                audiences=decision.audiences,
                lifetime_seconds=lifetime,
                policy_version=decision.policy_version,
                parent_jti=parent.jti if parent else None,
                lineage=parent.lineage if parent else (),
                approval=claim,
                jkt=dpop.jkt if dpop else None,
            )
        except OAuthError as err:
            record_denial(self._decisions, "token.ciba", err, record)
            raise
        self._decisions.record(
            "token.ciba",
            outcome="granted",
            reason="granted",
            granted_scopes=list(decision.scopes),
            audiences=list(decision.audiences),
            approved_by=list(approval.approvers),
            jti=issued.jti,
            expires_in=lifetime,
            jkt=dpop.jkt if dpop else None,
            **record,
        )
        self._approvals.record_redeemed(approval, issued.jti, request_id)
        return {
            "access_token": issued.token,
            "issued_token_type": str(TokenType.ACCESS_TOKEN),
            "token_type": "DPoP" if dpop else "Bearer",
            "expires_in": lifetime,
            "scope": " ".join(decision.scopes),
        }

"""The approvers' JSON API: the same decisions as the page, for chat-ops bots and ticketing
automations acting with the approver's own SSO token.

``GET /v1/approvals`` (what the approver may decide), ``GET /v1/approvals/{approval_id}``, and
``POST /v1/approvals/{approval_id}/decision`` (``{"decision": "approve"|"deny", "comment"?}``).
The caller presents ``Authorization: Bearer <the approver's SSO token>``: verified by the
broker's identity adapter for its exact issuer (signature, expiry, the adapter's accepted
audiences and claim mapping) and required, on top, to carry one of ``approvals.api_audiences``
as ``aud``: a token meant for anything else (the one an agent holds to exchange, say) is refused.
Nothing here approves with a shared secret.

Errors are RFC 6749 §5.2 bodies: RFC 6750 ``invalid_token`` (401, ``WWW-Authenticate: Bearer``)
for a missing or refused token, ``insufficient_scope`` (403, with the policy's ``reason``) for
an approver who may not decide, ``access_denied`` (403) for an approver deciding twice,
``not_found`` (404) for an unknown, expired or decided request (one answer for all three).
"""

from __future__ import annotations

import logging
from typing import Any

import jwt
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from broker.approvals.errors import AlreadyDecided, ApprovalNotFound, NotEligible
from broker.approvals.model import ApprovalRecord, ApprovalState
from broker.audit import AuditUnavailable, recorded_request_var
from broker.endpoints.edge import NO_STORE, Edge
from broker.errors import (
    AccessDenied,
    InsufficientScope,
    InvalidRequest,
    InvalidToken,
    NotFound,
    OAuthError,
    ServerError,
    TemporarilyUnavailable,
)
from broker.logs import (
    client_request_id,
    client_request_id_var,
    new_request_id,
    request_id_var,
)
from broker.oauth_request import read_form_or_json
from broker.policy import Person
from broker.revocation import person_key
from broker.state import StateUnavailable
from broker.types import TokenType
from idp_adapters.base import IdentityError, IdentityProviderUnavailable
from idp_adapters.jwt_verify import claim_audiences

log = logging.getLogger("broker.approvals.api")

API_PREFIX = "/v1/approvals"
MAX_TOKEN_BYTES = 16384
MAX_COMMENT_CHARS = 500
_REFUSAL_TEXT = {
    "not_eligible": "you are not among the approvers of this request",
    "self_approval": "the request is made on your behalf and its rule is not a consent rule",
    "in_agent_chain": "you are in the chain of agents making this request",
}


def approval_json(record: ApprovalRecord, now: float) -> dict[str, Any]:
    """What an approver is shown of a request (never the agent's auth_req_id)."""
    return {
        "id": record.id,
        "state": str(record.state),
        "person": record.person.person_id,
        "agent_chain": list(record.agent_chain),
        "approval_permissions": list(record.approval_permissions),
        "scope": " ".join(record.scopes),
        "audiences": list(record.audiences),
        "binding_message": record.binding_message,
        "authorization_details": record.authorization_details,
        "rules": [
            {"rule": r.rule, "quorum": r.quorum, "consent": r.consent} for r in record.requirements
        ],
        "approvals_so_far": len(record.approvers),
        "outstanding": record.outstanding() if record.state is ApprovalState.PENDING else {},
        "created_at": int(record.created_at),
        "expires_at": int(record.expires_at),
        "expires_in": record.time_left(now),
    }


class ApprovalApi:
    """The API's handlers, bound to one process's services."""

    def __init__(self, edge: Edge) -> None:
        self._edge = edge
        self._services = edge.services
        self._audiences = frozenset(edge.settings.approvals.api_audiences)
        self._max_body = edge.settings.http.max_body_bytes

    async def approver(self, request: Request) -> Person:
        """The approver the bearer token proves, or `InvalidToken`."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise InvalidToken("an approver's SSO token is required (Authorization: Bearer)")
        if len(token) > MAX_TOKEN_BYTES:
            raise InvalidToken("the token is too large")
        if not self._audiences:
            raise InvalidToken("this broker accepts no approver tokens (approvals.api_audiences)")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            raise InvalidToken("the token is not a JWT") from None
        issuer = unverified.get("iss") if isinstance(unverified, dict) else None
        adapter = self._services.identities.jwt.get(issuer) if isinstance(issuer, str) else None
        if adapter is None:
            raise InvalidToken("the token's issuer is not a trusted identity provider")
        try:
            principal = await adapter.authenticate(token, TokenType.JWT)
        except IdentityProviderUnavailable:
            raise TemporarilyUnavailable(
                "the identity provider's keys cannot be fetched right now",
                headers={"Retry-After": "5"},
            ) from None
        except IdentityError as exc:
            raise InvalidToken(f"the token was refused: {exc.reason}") from None
        if self._audiences.isdisjoint(claim_audiences(unverified)):
            raise InvalidToken("the token is not meant for the approvals API (audience)")
        revoked = person_key(principal.person_id)
        status = await self._services.state.revocation_status([], [revoked])
        before = status.not_before.get(revoked)
        if before is not None and (
            principal.earliest_time is None or principal.earliest_time < before
        ):
            raise InvalidToken("the token predates the person's revocation; sign in again")
        return Person(principal.idp, principal.subject, principal.groups, principal.idp_roles)

    async def list(self, request: Request) -> dict[str, Any]:
        approver = await self.approver(request)
        records = await self._services.approvals.pending_for(approver)
        now = self._services.clock.now()
        return {
            "approver": approver.person_id,
            "approvals": [
                approval_json(r, now) for r in sorted(records, key=lambda r: r.expires_at)
            ],
        }

    async def get(self, request: Request) -> dict[str, Any]:
        approver = await self.approver(request)
        approval_id = str(request.path_params["approval_id"])
        try:
            record = await self._services.approvals.get_for(approval_id, approver)
        except ApprovalNotFound:
            raise NotFound("no such open approval request") from None
        except NotEligible as refused:
            raise _not_eligible(refused.reason) from None
        return approval_json(record, self._services.clock.now())

    async def decide(self, request: Request) -> dict[str, Any]:
        approver = await self.approver(request)
        approval_id = str(request.path_params["approval_id"])
        form = await read_form_or_json(request, max_bytes=self._max_body)
        decision = form.get("decision")
        if decision not in {"approve", "deny"}:
            raise InvalidRequest('decision must be "approve" or "deny"')
        comment = (form.get("comment") or "").strip()[:MAX_COMMENT_CHARS] or None
        try:
            record = await self._services.approvals.decide(
                approval_id, approver, approve=decision == "approve", comment=comment, via="api"
            )
        except ApprovalNotFound:
            raise NotFound("no such open approval request") from None
        except NotEligible as refused:
            raise _not_eligible(refused.reason) from None
        except AlreadyDecided:
            raise AccessDenied(
                "you have already decided this request", reason="already_decided"
            ) from None
        return {
            "id": record.id,
            "decision": decision,
            "state": str(record.state),
            "outstanding": record.outstanding() if record.state is ApprovalState.PENDING else {},
        }

    def endpoint(self, handler: Any, route: str) -> Any:
        """One shape: a request id, JSON answers, every error in RFC 6749 §5.2 terms, every
        refusal recorded (``request.denied``, naming the route template and the source only,
        as for any unauthenticated caller), and no answer before its records are durable."""
        edge = self._edge
        decisions = self._services.decisions

        async def endpoint(request: Request) -> JSONResponse:
            request_id = new_request_id()
            token = request_id_var.set(request_id)
            client_token = client_request_id_var.set(
                client_request_id(request.headers.get("x-request-id"))
            )
            try:
                try:
                    body = await handler(request)
                    response = JSONResponse(body, headers={**NO_STORE, "X-Request-Id": request_id})
                except StateUnavailable:
                    raise TemporarilyUnavailable(
                        "the broker's state cannot be reached", headers={"Retry-After": "5"}
                    ) from None
                except OAuthError as err:
                    if recorded_request_var.get() != request_id:
                        edge.record_refusal(route, err, None, request_id, request, None)
                    response = edge.error_response(err, request_id)
                try:  # answer nothing whose record is not yet durable (group commit)
                    await decisions.wait_durable()
                except AuditUnavailable:
                    response = edge.error_response(
                        ServerError("the audit trail cannot be written; refusing"), request_id
                    )
                return response
            finally:
                request_id_var.reset(token)
                client_request_id_var.reset(client_token)

        return endpoint


def _not_eligible(reason: str) -> InsufficientScope:
    err = InsufficientScope(
        f"you may not decide this request: {_REFUSAL_TEXT.get(reason, reason)} ({reason})",
        reason=reason,
        headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'},
    )
    return err


def install_approval_api(app: FastAPI, edge: Edge) -> None:
    api = ApprovalApi(edge)
    one = f"{API_PREFIX}/{{approval_id}}"
    decision = f"{API_PREFIX}/{{approval_id}}/decision"
    app.add_route(API_PREFIX, api.endpoint(api.list, API_PREFIX), methods=["GET"])
    app.add_route(one, api.endpoint(api.get, one), methods=["GET"])
    app.add_route(decision, api.endpoint(api.decide, decision), methods=["POST"])

"""The broker's HTTP API described for others: an OpenAPI 3.1 document, built from one table.

`OPERATIONS` lists every route the app serves (method, path, who may call it, what it reads and
what it answers); `openapi_document(issuer)` turns the table into the document served at
``GET /openapi.json``. A test keeps the table and the app's routes in step, and `make test`
fuzzes every operation from this document (schemathesis), so what it says is what the broker does.

Errors are RFC 6749 §5.2 JSON bodies everywhere (``error``, ``error_description``, optionally
``error_uri``), with ``WWW-Authenticate`` on 401 and ``Retry-After`` on 429 and on a 503 that
will clear by itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from broker.approvals.ciba import BC_AUTHORIZE_PATH
from broker.approvals.ciba import GRANT_TYPE as CIBA_GRANT_TYPE
from broker.client_auth import CLIENT_ASSERTION_TYPE
from broker.exchange import GRANT_TYPE, ISSUABLE_TOKEN_TYPES, SUBJECT_TOKEN_TYPES
from broker.id_jag import JWT_BEARER_GRANT_TYPE
from broker.types import TokenType

OPENAPI_PATH = "/openapi.json"
FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
Body = Literal["form", "form_or_json", "json", "none"]
Caller = Literal["agent", "gateway", "resource_server", "admin", "approver", "anyone"]

_ERROR_TEXT: Mapping[int, str] = {
    400: "Malformed request or refused grant (`invalid_request`, `invalid_grant`, "
    "`unauthorized_client`, `unsupported_grant_type`, `invalid_scope`, `invalid_target`).",
    401: "Client authentication failed (`invalid_client`, with `WWW-Authenticate: Basic`), or the "
    "presented agent token is not acceptable (`invalid_token`, `WWW-Authenticate: Bearer`).",
    403: "Authenticated but not allowed (`access_denied`, `insufficient_scope`).",
    404: "Nothing by that name (`not_found`).",
    413: "The body exceeds `http.max_body_bytes` (`invalid_request`).",
    415: "Unsupported body media type (`invalid_request`).",
    422: "The policy on disk was refused; the previous version keeps serving (`invalid_policy`).",
    429: "Over a rate limit (`too_many_requests`); retry after `Retry-After` seconds.",
    500: "The broker cannot answer safely, e.g. the audit trail cannot be written "
    "(`server_error`).",
    503: "A dependency (state store, identity provider keys, secret backend) cannot be reached "
    "right now; the broker refuses rather than guess (`temporarily_unavailable`).",
}
# Every authenticated POST can answer these: a malformed or oversized body, failed client
# authentication, throttling, and fail-closed refusals when state or the audit trail are down.
_POST_ERRORS = (400, 401, 413, 415, 429, 500, 503)
_ERROR_CODE = "^[\\x20-\\x21\\x23-\\x5B\\x5D-\\x7E]+$"  # RFC 6749 §5.2 `error` characters


def _string(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


def _optional(values: list[str]) -> list[str]:
    """The values of an optional parameter: an empty one counts as absent (RFC 6749 §3.1)."""
    return [*values, ""]


_CLIENT_AUTH_FIELDS: dict[str, Any] = {
    "client_id": _string(
        "Optional with HTTP Basic or a client assertion; must then name the same client."
    ),
    "client_assertion_type": _string(
        "`private_key_jwt` (RFC 7523 §2.2): always this value, together with `client_assertion`.",
        enum=_optional([CLIENT_ASSERTION_TYPE]),
    ),
    "client_assertion": _string(
        "`private_key_jwt`: a JWT signed with the client's registered key; `iss` = `sub` = the "
        "client id, `aud` = the issuer or the token endpoint, short `exp`, single-use `jti`."
    ),
}
_AGENT_TOKEN = _string("An access token this broker issued (the agent token).", minLength=1)


@dataclass(frozen=True, slots=True)
class Operation:
    """One route of the API: enough to describe it, and to check the app serves exactly it."""

    method: Literal["get", "post"]
    path: str
    operation_id: str
    summary: str
    description: str
    tag: str
    caller: Caller
    response: dict[str, Any]
    body: Body = "none"
    fields: Mapping[str, Any] | None = None
    required: tuple[str, ...] = ()
    repeatable: tuple[str, ...] = ()
    body_required: bool = True
    query: Mapping[str, Any] | None = None
    errors: tuple[int, ...] = ()
    cache: str = "no-store"
    media_type: str = JSON
    also_answers: tuple[int, ...] = ()  # statuses with the success body (readiness: 503)


_SCOPE = _string("Space-separated permissions.")
_APPROVAL = {
    "type": "object",
    "required": ["id", "state", "person", "agent_chain", "approval_permissions", "expires_in"],
    "description": "An approval request as its approvers see it (never the agent's `auth_req_id`).",
    "properties": {
        "id": _string("The approval's public reference (`apr_...`)."),
        "state": _string("Where it stands.", enum=["pending", "approved", "denied"]),
        "person": _string("The person the agents act for, `<idp>/<subject>`."),
        "agent_chain": {"type": "array", "items": {"type": "string"}},
        "approval_permissions": {"type": "array", "items": {"type": "string"}},
        "scope": _SCOPE,
        "audiences": {"type": "array", "items": {"type": "string"}},
        "binding_message": {"type": ["string", "null"]},
        "authorization_details": {
            "type": ["array", "null"],
            "description": "RFC 9396 details, verbatim as the agent sent them.",
        },
        "rules": {"type": "array", "items": {"type": "object"}},
        "approvals_so_far": {"type": "integer", "minimum": 0},
        "outstanding": {"type": "object", "additionalProperties": {"type": "integer"}},
        "created_at": {"type": "integer"},
        "expires_at": {"type": "integer"},
        "expires_in": {"type": "integer", "minimum": 0},
    },
}
_APPROVER_ERRORS = (401, 403, 404, 429, 500, 503)
_TOKEN_RESPONSE = {
    "type": "object",
    "required": ["access_token", "issued_token_type", "token_type", "expires_in", "scope"],
    "properties": {
        "access_token": _string("The agent token (RFC 9068 JWT, `typ: at+jwt`)."),
        "issued_token_type": _string(
            "RFC 8693 token type URI.", enum=sorted(str(t) for t in ISSUABLE_TOKEN_TYPES)
        ),
        "token_type": _string("Always `Bearer`.", enum=["Bearer"]),
        "expires_in": {"type": "integer", "minimum": 0},
        "scope": _SCOPE,
    },
}
_CIBA_RESPONSE = {
    "type": "object",
    "required": ["auth_req_id", "expires_in", "interval"],
    "properties": {
        "auth_req_id": _string("Poll the token endpoint with it (CIBA grant)."),
        "expires_in": {"type": "integer", "minimum": 1},
        "interval": {"type": "integer", "minimum": 1},
    },
}
_INTROSPECTION_RESPONSE = {
    "type": "object",
    "required": ["active"],
    "description": 'RFC 7662 §2.2; an inactive token is only `{"active": false}`.',
    "properties": {
        "active": {"type": "boolean"},
        "token_type": _string("`Bearer`."),
        "iss": {"type": "string"},
        "sub": {"type": "string"},
        "aud": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
        "client_id": {"type": "string"},
        "scope": _SCOPE,
        "act": {"type": "object", "description": "RFC 8693 §4.1 actor chain."},
        "iat": {"type": "number"},
        "nbf": {"type": "number"},
        "exp": {"type": "number"},
        "auth_time": {"type": "number"},
        "jti": {"type": "string"},
        "provenance": {"type": "object"},
        "policy_version": {"type": "string"},
        "parent_jti": {"type": "string"},
    },
}
_REVOCATION_RESULT = {
    "type": "object",
    "required": ["revoked"],
    "properties": {
        "revoked": _string("What was revoked.", enum=["token", "person", "agent"]),
        "jti": {"type": "string"},
        "cascades": {"type": "boolean"},
        "person": {"type": "string"},
        "agent": {"type": "string"},
        "issued_before": {"type": "number"},
    },
}
_CREDENTIAL = {
    "type": "object",
    "required": ["credential", "version", "refresh_in", "stale", "served_for"],
    "properties": {
        "credential": {"type": "string"},
        "value": _string("The secret (a credential naming one `field`)."),
        "fields": {"type": "object", "additionalProperties": {"type": "string"}},
        "version": {"type": ["string", "null"]},
        "stage": {"type": ["string", "null"]},
        "refresh_in": {"type": "number"},
        "stale": {"type": "boolean"},
        "expires_at": {"type": "integer"},
        "usage_ref": _string(
            "The budget reservation this fetch holds: name it in the call's usage report."
        ),
        "served_for": {
            "type": "object",
            "properties": {
                "sub": {"type": "string"},
                "act": {"type": ["object", "null"]},
                "client_id": {"type": ["string", "null"]},
            },
        },
    },
}
_REFRESHED = {
    "type": "object",
    "required": ["credential", "version", "refresh_in"],
    "properties": {
        "credential": {"type": "string"},
        "version": {"type": ["string", "null"]},
        "refresh_in": {"type": "number"},
    },
}
_RELOADED = {
    "type": "object",
    "required": ["version", "changed", "warnings"],
    "properties": {
        "version": {"type": "string"},
        "previous_version": {"type": ["string", "null"]},
        "changed": {"type": "boolean"},
        "warnings": {"type": "integer", "minimum": 0},
    },
}
_METADATA = {
    "type": "object",
    "required": ["issuer", "token_endpoint", "jwks_uri"],
    "description": "RFC 8414 authorization server metadata.",
    "properties": {
        "issuer": {"type": "string"},
        "token_endpoint": {"type": "string"},
        "jwks_uri": {"type": "string"},
        "introspection_endpoint": {"type": "string"},
        "revocation_endpoint": {"type": "string"},
        "grant_types_supported": {"type": "array", "items": {"type": "string"}},
        "token_endpoint_auth_methods_supported": {"type": "array", "items": {"type": "string"}},
        "openapi_uri": _string("This document."),
    },
}
_USAGE_RECORD = {
    "type": "object",
    "required": ["call_id", "token", "credential", "provider", "model", "units"],
    "properties": {
        "call_id": _string("The gateway's id of the call (idempotency key).", maxLength=128),
        "token": _AGENT_TOKEN,
        "usage_ref": _string("The fetch's `usage_ref`: the reservation this call settles."),
        "credential": _string("The credential the call used."),
        "provider": _string("e.g. openai."),
        "model": _string("e.g. gpt-4o-mini."),
        "units": {
            "type": "object",
            "description": "Units used: input_tokens, output_tokens, cached_tokens, ...",
            "additionalProperties": {"type": "number", "minimum": 0},
        },
        "status": _string("ok (default), error, ..."),
        "occurred_at": {"type": "number", "description": "Seconds since the epoch."},
        "cost": {
            "type": "object",
            "description": "The gateway's own cost of the call (taken as is).",
            "required": ["amount", "currency"],
            "properties": {
                "amount": _string("A decimal amount."),
                "currency": _string("ISO 4217.", pattern="^[A-Z]{3}$"),
            },
        },
    },
}
_USAGE_RESULTS = {
    "type": "object",
    "required": ["results"],
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "call_id": {"type": ["string", "null"]},
                    "outcome": _string("recorded or duplicate", enum=["recorded", "duplicate"]),
                    "cost": {"type": ["string", "null"]},
                    "currency": {"type": ["string", "null"]},
                    "priced_by": _string("price_table, gateway or unpriced"),
                    "error": {"type": "string"},
                    "error_description": {"type": "string"},
                },
            },
        }
    },
}
_JWKS = {
    "type": "object",
    "required": ["keys"],
    "description": "RFC 7517 JWK set: the current signing key and retired ones still valid.",
    "properties": {"keys": {"type": "array", "items": {"type": "object"}}},
}
_READINESS = {
    "type": "object",
    "required": ["ready", "checks"],
    "properties": {
        "ready": {"type": "boolean"},
        "checks": {
            "type": "object",
            "description": "`policy`, `signing_keys`, `secret_backends`, `state`: each with `ok`.",
            "additionalProperties": {
                "type": "object",
                "required": ["ok"],
                "properties": {"ok": {"type": "boolean"}},
            },
        },
    },
}

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/oauth2/token",
        "exchangeToken",
        "Token exchange (RFC 8693), ID-JAG redemption (RFC 7523) and approved requests (CIBA)",
        "Exchange a person's SSO token (or a token this broker issued, for delegation) for a "
        "short-lived agent token, or for an ID-JAG (`requested_token_type` id-jag, `audience` a "
        "registered authorization server, `resource` one of its resources; `token_type` N_A); "
        "redeem an ID-JAG (`grant_type` jwt-bearer, `assertion`) for an agent token; or, with "
        "the CIBA grant and an `auth_req_id` from `/oauth2/bc-authorize`, poll for the token an "
        "approval yields (`authorization_pending`, `slow_down`, `access_denied`, "
        "`expired_token`). A `DPoP` header (RFC 9449) binds the issued token to its key "
        "(`token_type` DPoP; `invalid_dpop_proof`, `use_dpop_nonce` with a `DPoP-Nonce` "
        "header). No refresh tokens. The caller is an agent: HTTP Basic, `private_key_jwt` in "
        "the body, or a workload identity as `actor_token`.",
        "OAuth 2.0",
        "agent",
        _TOKEN_RESPONSE,
        body="form",
        fields={
            "grant_type": _string(
                "The token-exchange grant, the jwt-bearer grant (an ID-JAG), or the CIBA grant.",
                enum=[GRANT_TYPE, JWT_BEARER_GRANT_TYPE, CIBA_GRANT_TYPE],
            ),
            "assertion": _string("jwt-bearer grant: the ID-JAG (`oauth-id-jag+jwt`)."),
            "subject_token_dpop": _string(
                "Re-exchange of a DPoP-bound token: a proof by its key for this request, with "
                "`ath` of `subject_token`."
            ),
            "auth_req_id": _string("CIBA grant: the id `/oauth2/bc-authorize` answered."),
            "subject_token": _string(
                "Token exchange: a person's OIDC ID token, JWT access token or SAML assertion, "
                "or an agent token of this broker (re-exchange for a sub-agent).",
                minLength=1,
            ),
            "subject_token_type": _string(
                "RFC 8693 token type of `subject_token`.",
                enum=sorted(str(t) for t in SUBJECT_TOKEN_TYPES),
            ),
            "requested_token_type": _string(
                "Default `access_token`.",
                enum=_optional(sorted(str(t) for t in ISSUABLE_TOKEN_TYPES)),
            ),
            "scope": _string("Space-separated permissions; omitted: the agent's defaults."),
            "audience": {
                "type": "array",
                "items": {"type": "string"},
                "description": "Repeatable: logical names of the target services.",
            },
            "resource": {
                "type": "array",
                "items": {"type": "string", "format": "uri"},
                "description": "Repeatable (RFC 8707): absolute URIs of the target services.",
            },
            "actor_token": _string(
                "The agent's workload JWT (Kubernetes service account, SPIFFE JWT-SVID)."
            ),
            "actor_token_type": _string(
                "With `actor_token`.",
                enum=_optional([str(TokenType.JWT), str(TokenType.ACCESS_TOKEN)]),
            ),
            **_CLIENT_AUTH_FIELDS,
        },
        required=("grant_type",),
        repeatable=("audience", "resource"),
        errors=_POST_ERRORS,
    ),
    Operation(
        "post",
        BC_AUTHORIZE_PATH,
        "backchannelAuthentication",
        "Ask for approval (OpenID CIBA backchannel authentication)",
        "Open an approval request for permissions the policy grants only with a person's "
        "approval. The subject is presented as for the token exchange; the answer's "
        "`auth_req_id` is then polled at the token endpoint with the CIBA grant.",
        "OAuth 2.0",
        "agent",
        _CIBA_RESPONSE,
        body="form",
        fields={
            "subject_token": _string(
                "The person's SSO token, or an agent token of this broker (sub-agent).",
                minLength=1,
            ),
            "subject_token_type": _string(
                "RFC 8693 token type of `subject_token`.",
                enum=sorted(str(t) for t in SUBJECT_TOKEN_TYPES),
            ),
            "scope": _string("Space-separated permissions, among them those needing approval."),
            "audience": {"type": "array", "items": {"type": "string"}},
            "resource": {"type": "array", "items": {"type": "string", "format": "uri"}},
            "binding_message": _string("Shown to the approver (at most 256 characters)."),
            "requested_expiry": _string("Seconds the request may wait (a positive integer)."),
            "authorization_details": _string(
                "RFC 9396 JSON array of objects with a `type`, shown to the approver and "
                "carried into the token."
            ),
            "client_notification_token": _string("Ping-mode agents: the bearer for the ping."),
            "actor_token": _string("The agent's workload JWT."),
            "actor_token_type": _string(
                "With `actor_token`.",
                enum=_optional([str(TokenType.JWT), str(TokenType.ACCESS_TOKEN)]),
            ),
            **_CLIENT_AUTH_FIELDS,
        },
        required=("subject_token", "subject_token_type"),
        repeatable=("audience", "resource"),
        errors=_POST_ERRORS,
    ),
    Operation(
        "post",
        "/oauth2/introspect",
        "introspectToken",
        "Token introspection (RFC 7662)",
        "A registered resource server or gateway asks whether an agent token is active for it.",
        "OAuth 2.0",
        "resource_server",
        _INTROSPECTION_RESPONSE,
        body="form",
        fields={
            "token": _AGENT_TOKEN,
            "token_type_hint": _string("Ignored."),
            **_CLIENT_AUTH_FIELDS,
        },
        required=("token",),
        errors=_POST_ERRORS,
    ),
    Operation(
        "post",
        "/oauth2/revoke",
        "revokeToken",
        "Token revocation (RFC 7009)",
        "An agent in the token's chain revokes it and every token derived from it. A token "
        "that is not valid is not an error (RFC 7009 §2.2).",
        "OAuth 2.0",
        "agent",
        {"type": "object", "maxProperties": 0, "description": "Empty on success."},
        body="form",
        fields={
            "token": _AGENT_TOKEN,
            "token_type_hint": _string("Ignored."),
            **_CLIENT_AUTH_FIELDS,
        },
        required=("token",),
        errors=_POST_ERRORS,
    ),
    Operation(
        "post",
        "/v1/admin/revocations",
        "revokeByAdmin",
        "Revoke as an admin",
        "Revoke one token by `jti` (and its lineage), or every token of a `person` or an `agent` "
        "issued before `not_before` (default: now). Exactly one of `jti`, `person`, `agent`. "
        "The admin needs the permission `revocations:write` (403 `access_denied` otherwise).",
        "Admin",
        "admin",
        _REVOCATION_RESULT,
        body="form_or_json",
        fields={
            "jti": _string("A token id."),
            "person": _string("A person id, `<idp>/<subject>`."),
            "agent": _string("An agent's client id."),
            "not_before": _string("Seconds since the epoch (a decimal number, as a string)."),
            **_CLIENT_AUTH_FIELDS,
        },
        errors=(*_POST_ERRORS, 403),
    ),
    Operation(
        "post",
        "/v1/admin/policy/reload",
        "reloadPolicy",
        "Reload the policy now",
        "Re-read the policy directory; a policy that does not load is refused and the previous "
        "version keeps serving. The admin needs the permission `policy:reload`.",
        "Admin",
        "admin",
        _RELOADED,
        body="form_or_json",
        fields=dict(_CLIENT_AUTH_FIELDS),
        body_required=False,
        errors=(*_POST_ERRORS, 403, 422),
    ),
    Operation(
        "post",
        "/v1/credentials/{name}",
        "fetchCredential",
        "Fetch a provider credential (gateways)",
        "A registered gateway presents the agent token it received (`token`) and gets the "
        "credential that token unlocks, served from the broker's cache. The gateway "
        "authenticates itself (HTTP Basic or `private_key_jwt`); the agent token travels in "
        "the body, never as the gateway's own authentication. A DPoP-bound agent token needs "
        "the agent's own proof for its call to the gateway, forwarded in the `DPoP` header "
        "(401 `invalid_dpop_proof` otherwise).",
        "Credentials",
        "gateway",
        _CREDENTIAL,
        body="form_or_json",
        fields={
            "token": _AGENT_TOKEN,
            "rejected_version": _string(
                "The version the provider just refused: the broker re-checks its store if it "
                "is the version it holds (at most once a second per credential).",
                maxLength=256,
            ),
            "dpop_method": _string(
                "DPoP-bound agent token: the method of the agent's call the forwarded proof "
                "was made for (default POST).",
                enum=_optional(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
            ),
            **_CLIENT_AUTH_FIELDS,
        },
        required=("token",),
        query={
            "version": {
                "description": "`previous`: the version current before the last rotation, "
                "while the credential's `previous_version_grace_seconds` allows it.",
                "schema": {"type": "string", "enum": _optional(["current", "previous"])},
            }
        },
        errors=(*_POST_ERRORS, 403, 404),
    ),
    Operation(
        "post",
        "/v1/admin/credentials/{name}/refresh",
        "refreshCredential",
        "Push refresh after a rotation",
        "An admin client holding `credentials:refresh` (a rotation hook) makes the cache "
        "re-read the credential now. Concurrent pushes share one store round; push rounds of "
        "one credential start at most once a second.",
        "Admin",
        "admin",
        _REFRESHED,
        body="form_or_json",
        fields=dict(_CLIENT_AUTH_FIELDS),
        body_required=False,
        errors=(*_POST_ERRORS, 403, 404),
    ),
    Operation(
        "get",
        "/v1/approvals",
        "listApprovals",
        "Approval requests the caller may decide",
        "Open requests (OpenID CIBA) the approver may decide and has not decided yet. "
        "Authenticated by the approver's own SSO token (`Authorization: Bearer`): verified by "
        "the broker's adapter for its issuer and carrying an audience of "
        "`approvals.api_audiences`; anything else is `invalid_token` (401).",
        "Approvals",
        "approver",
        {
            "type": "object",
            "required": ["approver", "approvals"],
            "properties": {
                "approver": _string("The caller's person id."),
                "approvals": {"type": "array", "items": _APPROVAL},
            },
        },
        errors=(401, 429, 500, 503),
    ),
    Operation(
        "get",
        "/v1/approvals/{approval_id}",
        "getApproval",
        "One approval request",
        "403 `insufficient_scope` names why the caller may not decide it (`not_eligible`, "
        "`self_approval`, `in_agent_chain`); 404 for an unknown, expired or decided request.",
        "Approvals",
        "approver",
        _APPROVAL,
        errors=_APPROVER_ERRORS,
    ),
    Operation(
        "post",
        "/v1/approvals/{approval_id}/decision",
        "decideApproval",
        "Approve or deny an approval request",
        "The approver's decision counts once; a denial decides, the last approval a quorum "
        "needed approves. 403 `insufficient_scope` for an approver who may not decide it, "
        "`access_denied` for one who already did; 404 for an unknown, expired or decided "
        "request.",
        "Approvals",
        "approver",
        {
            "type": "object",
            "required": ["id", "decision", "state", "outstanding"],
            "properties": {
                "id": {"type": "string"},
                "decision": _string("As sent.", enum=["approve", "deny"]),
                "state": _string(
                    "Where the request now stands.", enum=["pending", "approved", "denied"]
                ),
                "outstanding": {"type": "object", "additionalProperties": {"type": "integer"}},
            },
        },
        body="form_or_json",
        fields={
            "decision": _string("The decision.", enum=["approve", "deny"]),
            "comment": _string("Optional; kept in the audit record (at most 500 characters)."),
        },
        required=("decision",),
        errors=(400, 401, 403, 404, 413, 415, 429, 500, 503),
    ),
    Operation(
        "post",
        "/v1/usage",
        "reportUsage",
        "Report usage of provider calls (gateways)",
        "A gateway reports the calls it made with credentials it fetched for agent tokens: the "
        "broker attributes each from its token (expired or revoked alike), prices it (the "
        "gateway's `cost`, else the policy's price table, else unpriced), counts it against "
        "budgets (settling the fetch's reservation, `usage_ref`), and records it. Idempotent by "
        "`call_id` per gateway (`duplicate`). One result per record, in order; a record that "
        "cannot be accepted gets its own `error`.",
        "Credentials",
        "gateway",
        _USAGE_RESULTS,
        body="json",
        fields={
            "records": {
                "type": "array",
                "minItems": 1,
                "maxItems": 100,
                "items": _USAGE_RECORD,
            }
        },
        required=("records",),
        errors=(*_POST_ERRORS, 403),
    ),
    Operation(
        "get",
        "/oauth2/authorize",
        "authorize",
        "No authorization-code flow (RFC 6749 §3.1)",
        "Listed in the metadata for clients that require an authorization endpoint (the MCP "
        "SDK's); always 400 `unsupported_response_type`: agents use the token endpoint.",
        "Discovery",
        "anyone",
        {"type": "object"},
        errors=(400,),
    ),
    Operation(
        "get",
        "/.well-known/oauth-authorization-server",
        "serverMetadata",
        "Authorization server metadata (RFC 8414)",
        "Endpoints, grants and client authentication methods.",
        "Discovery",
        "anyone",
        _METADATA,
        cache="",
    ),
    Operation(
        "get",
        "/.well-known/jwks.json",
        "jwks",
        "The broker's public signing keys",
        "Resource servers verify agent tokens with these keys.",
        "Discovery",
        "anyone",
        _JWKS,
        cache="max-age=300",
    ),
    Operation(
        "get",
        OPENAPI_PATH,
        "openapi",
        "This API description (OpenAPI 3.1)",
        "The document you are reading.",
        "Discovery",
        "anyone",
        {"type": "object", "required": ["openapi", "paths"]},
        cache="max-age=300",
    ),
    Operation(
        "get",
        "/healthz",
        "healthz",
        "Liveness",
        "The process answers.",
        "Operations",
        "anyone",
        {"type": "object", "required": ["status"], "properties": {"status": {"enum": ["ok"]}}},
        cache="",
    ),
    Operation(
        "get",
        "/readyz",
        "readyz",
        "Readiness",
        "Policy loaded, signing keys published, every secret backend and the state store "
        "reachable. 503 with the same body when not ready.",
        "Operations",
        "anyone",
        _READINESS,
        also_answers=(503,),
    ),
    Operation(
        "get",
        "/metrics",
        "metrics",
        "Prometheus metrics",
        "Unauthenticated: serve it on an internal network only.",
        "Operations",
        "anyone",
        {"type": "string"},
        cache="",
        media_type="text/plain",
    ),
)

_HEADERS: dict[str, Any] = {
    "XRequestId": {
        "description": "The broker's own id for the request (never the caller's); every "
        "record and log line of the request carries it as `request_id`.",
        "schema": {"type": "string"},
    },
    "CacheControl": {"schema": {"type": "string"}},
    "WWWAuthenticate": {
        "description": '`Basic realm="broker"` for client authentication, '
        '`Bearer error="invalid_token"` for a refused agent token.',
        "schema": {"type": "string"},
    },
    "RetryAfter": {"description": "Seconds.", "schema": {"type": "integer", "minimum": 0}},
}
_ERROR_HEADERS: Mapping[int, tuple[str, ...]] = {
    401: ("WWW-Authenticate",),
    429: ("Retry-After",),
    503: ("Retry-After",),
}
_HEADER_REFS = {
    "X-Request-Id": "XRequestId",
    "Cache-Control": "CacheControl",
    "WWW-Authenticate": "WWWAuthenticate",
    "Retry-After": "RetryAfter",
}


def _header_refs(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: {"$ref": f"#/components/headers/{_HEADER_REFS[name]}"} for name in names}


def _error_response(status: int) -> dict[str, Any]:
    headers = ("Cache-Control", "X-Request-Id", *_ERROR_HEADERS.get(status, ()))
    return {
        "description": _ERROR_TEXT[status],
        "headers": _header_refs(headers),
        "content": {JSON: {"schema": {"$ref": "#/components/schemas/OAuthError"}}},
    }


def _request_body(op: Operation) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": dict(op.fields or {})}
    if op.required:
        schema["required"] = list(op.required)
    if op.body == "json":  # a structured JSON document, only
        return {"required": op.body_required, "content": {JSON: {"schema": schema}}}
    content: dict[str, Any] = {FORM: {"schema": schema}}
    if op.repeatable:  # repeated parameters, as RFC 8693 §2.1 allows for these
        content[FORM]["encoding"] = {
            name: {"style": "form", "explode": True} for name in op.repeatable
        }
    if op.body == "form_or_json":
        # A JSON object of string members (RFC 7662 style), read exactly like the form.
        content[JSON] = {"schema": {**schema, "additionalProperties": {"type": "string"}}}
    return {"required": op.body_required, "content": content}


# `{}`: no Authorization header; the client authenticates in the body (`private_key_jwt`), or,
# at the token endpoint, an agent presents only a workload `actor_token`.
_CLIENT_SECURITY: list[dict[str, list[str]]] = [{"clientSecretBasic": []}, {}]
_CALLER_TEXT: Mapping[Caller, str] = {
    "agent": "Caller: an agent of the policy.",
    "gateway": "Caller: a gateway of the policy (`gateways:`).",
    "resource_server": "Caller: a resource server or gateway of the policy.",
    "admin": "Caller: an admin client of the policy (`admins:`).",
    "approver": "Caller: an approver, with their own SSO token.",
}
_SECURITY: Mapping[Caller, list[dict[str, list[str]]]] = {
    "anyone": [],
    "approver": [{"approverBearer": []}],
}
_PATH_PARAMETERS: Mapping[str, dict[str, Any]] = {
    "name": {
        "description": "A credential name of the policy.",
        "schema": {"type": "string", "minLength": 1},
    },
    "approval_id": {
        "description": "An approval's reference (`apr_...`).",
        "schema": {"type": "string", "minLength": 1},
    },
}


def _operation(op: Operation) -> dict[str, Any]:
    caller = _CALLER_TEXT.get(op.caller)
    doc: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "description": f"{op.description} {caller}" if caller else op.description,
        "tags": [op.tag],
        "security": _SECURITY.get(op.caller, _CLIENT_SECURITY),
    }
    parameters: list[dict[str, Any]] = []
    for name, spec in _PATH_PARAMETERS.items():
        if f"{{{name}}}" in op.path:
            parameters.append({"name": name, "in": "path", "required": True, **spec})
    for name, spec in (op.query or {}).items():
        parameters.append({"name": name, "in": "query", "required": False, **spec})
    if op.method == "post":
        parameters.append({"$ref": "#/components/parameters/XRequestId"})
        doc["requestBody"] = _request_body(op)
    if parameters:
        doc["parameters"] = parameters
    success_headers = ("Cache-Control",) if op.cache else ()
    if op.method == "post":
        success_headers = ("Cache-Control", "X-Request-Id")
    ok = {
        "description": "Success.",
        "content": {op.media_type: {"schema": op.response}},
    }
    if success_headers:
        ok["headers"] = _header_refs(success_headers)
    responses: dict[str, Any] = {"200": ok}
    for status in op.also_answers:
        responses[str(status)] = {
            "description": "Not ready; the body says which check failed.",
            "content": {op.media_type: {"schema": op.response}},
        }
    for status in sorted(op.errors):
        responses[str(status)] = {"$ref": f"#/components/responses/Error{status}"}
    doc["responses"] = responses
    return doc


def openapi_document(issuer: str) -> dict[str, Any]:
    """The OpenAPI 3.1 description of every route, for a broker whose issuer is `issuer`."""
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op)
    statuses = sorted({status for op in OPERATIONS for status in op.errors})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Agent identity broker",
            "version": "1",
            "description": "RFC 8693 token exchange for agents acting for people, provider "
            "credentials for gateways, revocation and introspection. Client authentication: "
            "HTTP Basic (`client_secret_basic`) or `private_key_jwt` (RFC 7523: the form or "
            "JSON members `client_assertion_type` and `client_assertion`). Errors are RFC 6749 "
            "§5.2 JSON bodies.",
        },
        "servers": [{"url": issuer}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "clientSecretBasic": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "`client_secret_basic` (RFC 6749 §2.3.1): the client id and "
                    "secret, each form-urlencoded before Basic encoding. Alternatively, "
                    "`private_key_jwt` in the body (`client_assertion_type`, "
                    "`client_assertion`).",
                },
                "approverBearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "bearerFormat": "JWT",
                    "description": "An approver's own SSO token (RFC 6750), from an identity "
                    "provider of the broker, with an audience of `approvals.api_audiences`.",
                },
            },
            "parameters": {
                "XRequestId": {
                    "name": "X-Request-Id",
                    "in": "header",
                    "required": False,
                    "description": "The caller's own request id: recorded apart, as "
                    "`client_request_id`, when it is 1-64 visible ASCII characters "
                    "(dropped otherwise, never refused). The response's `X-Request-Id` is the "
                    "broker's own.",
                    "schema": {"type": "string"},
                }
            },
            "headers": _HEADERS,
            "schemas": {
                "OAuthError": {
                    "type": "object",
                    "description": "RFC 6749 §5.2 error response.",
                    "required": ["error"],
                    "properties": {
                        "error": {"type": "string", "pattern": _ERROR_CODE},
                        "error_description": {"type": "string"},
                        "error_uri": {"type": "string", "format": "uri"},
                    },
                }
            },
            "responses": {f"Error{status}": _error_response(status) for status in statuses},
        },
    }

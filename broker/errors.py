"""One OAuth error model, rendered in one place.

Every error carries a public ``description`` (shown to the caller, never containing a token or
secret) and a private ``debug`` part (logged, and shown to callers only when the operator turns on
``expose_error_debug``, which nobody should do in production).

Hierarchy::

    BrokerError
    └── OAuthError                       RFC 6749 §5.2 / RFC 8693 §2.2.2 / RFC 7009 / RFC 7662
        ├── InvalidRequest               400 invalid_request
        │   └── RequestTooLarge          413 invalid_request
        ├── InvalidClient                401 invalid_client (+ WWW-Authenticate)
        ├── InvalidGrant                 400 invalid_grant
        ├── UnauthorizedClient           400 unauthorized_client
        ├── UnsupportedGrantType         400 unsupported_grant_type
        ├── UnsupportedResponseType      400 unsupported_response_type (no authorization endpoint)
        ├── UnsupportedTokenType         400 unsupported_token_type (RFC 7009)
        ├── InvalidScope                 400 invalid_scope
        ├── InvalidTarget                400 invalid_target (RFC 8707 / RFC 8693)
        ├── AccessDenied                 403 access_denied
        ├── AuthorizationPending         400 authorization_pending (OpenID CIBA §11)
        ├── SlowDown                     400 slow_down (CIBA §11)
        ├── ExpiredToken                 400 expired_token (CIBA §11)
        ├── ApprovalDeniedError          400 access_denied (CIBA §11: at the token endpoint)
        ├── InvalidAuthorizationDetails  400 invalid_authorization_details (RFC 9396)
        ├── InvalidBindingMessage        400 invalid_binding_message (CIBA §13)
        ├── InvalidDPoPProof             400 invalid_dpop_proof (RFC 9449 §5, token endpoint)
        │   └── DPoPProofRefused         401 invalid_dpop_proof (RFC 9449 §7.1, + WWW-Authenticate)
        ├── UseDPoPNonce                 400 use_dpop_nonce (RFC 9449 §8, + DPoP-Nonce)
        ├── InvalidToken                 401 invalid_token (RFC 6750, presented agent token)
        ├── InsufficientScope            403 insufficient_scope (RFC 6750)
        ├── NotFound                     404 not_found
        ├── InvalidPolicy                422 invalid_policy (admin policy reload refused)
        ├── TooManyRequests              429 too_many_requests (+ Retry-After)
        ├── TemporarilyUnavailable       503 temporarily_unavailable
        └── ServerError                  500 server_error
"""

from __future__ import annotations

from typing import ClassVar


class BrokerError(Exception):
    """Base class of every error the broker raises on purpose."""


class OAuthError(BrokerError):
    error: ClassVar[str] = "server_error"
    status_code: ClassVar[int] = 400

    def __init__(
        self,
        description: str,
        *,
        debug: str | None = None,
        headers: dict[str, str] | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.debug = debug
        self.headers = dict(headers or {})
        # A short machine-readable reason for decision records and metrics (never user data).
        self.reason = reason or self.error

    def to_body(self, *, expose_debug: bool = False) -> dict[str, str]:
        body = {"error": self.error, "error_description": self.description}
        if expose_debug and self.debug:
            body["error_debug"] = self.debug
        return body

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, reason={self.reason!r})"


class InvalidRequest(OAuthError):
    error = "invalid_request"


class RequestTooLarge(InvalidRequest):
    status_code = 413


class UnsupportedMediaType(InvalidRequest):
    status_code = 415


class AuthorizationPending(OAuthError):
    """CIBA: nobody has decided the request yet; poll again after the interval."""

    error = "authorization_pending"


class SlowDown(OAuthError):
    """CIBA: polled sooner than the interval; the interval grows by 5 seconds."""

    error = "slow_down"


class ExpiredToken(OAuthError):
    """CIBA: the ``auth_req_id`` expired before anyone decided; ask again."""

    error = "expired_token"


class ApprovalDeniedError(OAuthError):
    """CIBA: an approver denied the request (``access_denied`` with the token endpoint's 400)."""

    error = "access_denied"


class InvalidAuthorizationDetails(OAuthError):
    """RFC 9396 §5: ``authorization_details`` is malformed or not acceptable."""

    error = "invalid_authorization_details"


class InvalidBindingMessage(OAuthError):
    """CIBA §13: the ``binding_message`` is invalid or unacceptable."""

    error = "invalid_binding_message"


class InvalidClient(OAuthError):
    error = "invalid_client"
    status_code = 401

    def __init__(self, description: str, **kwargs: object) -> None:
        super().__init__(description, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("WWW-Authenticate", 'Basic realm="broker"')


class InvalidGrant(OAuthError):
    error = "invalid_grant"


class UnauthorizedClient(OAuthError):
    error = "unauthorized_client"


class UnsupportedGrantType(OAuthError):
    error = "unsupported_grant_type"


class UnsupportedResponseType(OAuthError):
    """RFC 6749 §4.1.2.1: this broker has no authorization-code (or implicit) flow."""

    error = "unsupported_response_type"


class UnsupportedTokenType(OAuthError):
    error = "unsupported_token_type"


class InvalidScope(OAuthError):
    error = "invalid_scope"


class InvalidTarget(OAuthError):
    error = "invalid_target"


class AccessDenied(OAuthError):
    error = "access_denied"
    status_code = 403


class InvalidDPoPProof(OAuthError):
    """A DPoP proof is missing where it is required, malformed, or proves the wrong thing."""

    error = "invalid_dpop_proof"


class DPoPProofRefused(InvalidDPoPProof):
    """The agent's DPoP proof for a bound token presented to a resource (the credential
    endpoint): 401 with a ``DPoP`` challenge."""

    status_code = 401

    def __init__(self, description: str, **kwargs: object) -> None:
        super().__init__(description, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("WWW-Authenticate", 'DPoP error="invalid_dpop_proof"')


class UseDPoPNonce(OAuthError):
    """The server wants its nonce in the DPoP proof: retry with the ``DPoP-Nonce`` given."""

    error = "use_dpop_nonce"

    def __init__(self, description: str, *, nonce: str, **kwargs: object) -> None:
        super().__init__(description, **kwargs)  # type: ignore[arg-type]
        self.headers["DPoP-Nonce"] = nonce


class InvalidToken(OAuthError):
    error = "invalid_token"
    status_code = 401

    def __init__(self, description: str, **kwargs: object) -> None:
        super().__init__(description, **kwargs)  # type: ignore[arg-type]
        self.headers.setdefault("WWW-Authenticate", 'Bearer error="invalid_token"')


class InsufficientScope(OAuthError):
    error = "insufficient_scope"
    status_code = 403


class NotFound(OAuthError):
    error = "not_found"
    status_code = 404


class InvalidPolicy(OAuthError):
    """An admin-requested policy reload was refused; the previous version keeps serving."""

    error = "invalid_policy"
    status_code = 422


class TooManyRequests(OAuthError):
    error = "too_many_requests"
    status_code = 429


class TemporarilyUnavailable(OAuthError):
    error = "temporarily_unavailable"
    status_code = 503


class ServerError(OAuthError):
    error = "server_error"
    status_code = 500


def render_error(
    err: OAuthError, *, expose_debug: bool = False
) -> tuple[int, dict[str, str], dict[str, str]]:
    """The single place an error becomes an HTTP response: (status, JSON body, headers)."""
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache", **err.headers}
    return err.status_code, err.to_body(expose_debug=expose_debug), headers

"""The kit's refusals, each rendering its HTTP status and ``WWW-Authenticate`` challenge.

RFC 6750 §3 (Bearer) and RFC 9449 §7.1 (DPoP) challenges, with RFC 9728 §5.1's
``resource_metadata`` so a client (an MCP client, say) can find the authorization server, and
``scope`` on ``insufficient_scope`` so it can step up. Descriptions are fixed text chosen by the
kit: no token, and no part of one, ever appears in a message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

_UNSAFE_CHALLENGE_CHARS = re.compile(r'[^\x20\x21\x23-\x5b\x5d-\x7e]')
"""What RFC 6750 §3 forbids in ``error_description`` and ``scope`` (and ``"``/``\\``)."""


def _quoted(value: str) -> str:
    return '"' + _UNSAFE_CHALLENGE_CHARS.sub("?", value) + '"'


class KitError(Exception):
    """A request the resource server refuses. ``status`` and `headers` make the HTTP answer.

    ``error`` is the OAuth error code (None for a request without credentials, RFC 6750 §3.1),
    ``description`` fixed public text, ``scheme`` the challenge's scheme (``Bearer``, or ``DPoP``
    when the token is bound or DPoP was used), ``resource_metadata`` the RFC 9728 metadata URL,
    ``algs`` the DPoP algorithms accepted, ``scope`` the scopes needed (insufficient_scope).
    """

    status = 401
    error: str | None = "invalid_token"

    def __init__(
        self,
        description: str,
        *,
        scheme: str = "Bearer",
        resource_metadata: str | None = None,
        algs: Sequence[str] = (),
        scope: Sequence[str] = (),
        offer_dpop: bool = False,
    ) -> None:
        super().__init__(description)
        self.description = description
        self.scheme = scheme
        self.resource_metadata = resource_metadata
        self.algs = tuple(algs)
        self.scope = tuple(scope)
        self.offer_dpop = offer_dpop

    def _challenge(self, scheme: str, *, with_error: bool) -> str:
        params: list[str] = []
        if scheme == "DPoP" and self.algs:
            params.append("algs=" + _quoted(" ".join(self.algs)))
        if with_error and self.error is not None:
            params.append("error=" + _quoted(self.error))
            params.append("error_description=" + _quoted(self.description))
        if with_error and self.scope:
            params.append("scope=" + _quoted(" ".join(self.scope)))
        if self.resource_metadata is not None:
            params.append("resource_metadata=" + _quoted(self.resource_metadata))
        return scheme if not params else f"{scheme} " + ", ".join(params)

    @property
    def challenges(self) -> tuple[str, ...]:
        """One ``WWW-Authenticate`` value per challenge: the error's scheme first; for a request
        without credentials at a resource that also takes DPoP, a ``DPoP`` challenge too."""
        first = self._challenge(self.scheme, with_error=True)
        if self.offer_dpop and self.scheme != "DPoP":
            return (first, self._challenge("DPoP", with_error=False))
        return (first,)

    @property
    def www_authenticate(self) -> str:
        """The challenge(s) as one header value (RFC 9110 §11.6.1 allows a comma-joined list)."""
        return ", ".join(self.challenges)

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The response headers: one ``WWW-Authenticate`` per challenge (plus ``DPoP-Nonce``
        for `UseDPoPNonce`), and ``Cache-Control: no-store``."""
        headers = [("WWW-Authenticate", c) for c in self.challenges]
        headers.append(("Cache-Control", "no-store"))
        return headers

    def header_map(self) -> dict[str, str]:
        """`headers` as a dict (challenges comma-joined): for frameworks that take a dict."""
        merged: dict[str, str] = {}
        for name, value in self.headers:
            merged[name] = f"{merged[name]}, {value}" if name in merged else value
        return merged

    def body(self) -> bytes:
        """A JSON body naming the error (RFC 6750 leaves the body open; this mirrors RFC 6749)."""
        document = {"error": self.error or "unauthorized", "error_description": self.description}
        return json.dumps(document).encode()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description!r}, scheme={self.scheme!r})"


class InvalidRequest(KitError):
    """The request is malformed (RFC 6750 §3.1 ``invalid_request``): 400."""

    status = 400
    error = "invalid_request"


class InvalidToken(KitError):
    """The token is missing a property it must have: signature, issuer, audience, type, expiry,
    a key binding it claims, a revocation check it failed (``invalid_token``): 401."""


class MissingToken(InvalidToken):
    """No credentials of this resource's schemes at all: 401 with a challenge and no error code
    (RFC 6750 §3.1), so a client starts its authorization flow."""

    error = None


class InsufficientScope(KitError):
    """A valid token without a scope this route needs: 403 ``insufficient_scope`` with
    ``scope=`` naming what to ask for (RFC 6750 §3.1; the MCP step-up flow)."""

    status = 403
    error = "insufficient_scope"


class InvalidDPoPProof(KitError):
    """A DPoP-bound token whose proof is missing or wrong (RFC 9449 §7.1 ``invalid_dpop_proof``)."""

    error = "invalid_dpop_proof"


class UseDPoPNonce(KitError):
    """The resource wants its nonce in the proof (RFC 9449 §9): 401 with ``DPoP-Nonce``."""

    error = "use_dpop_nonce"

    def __init__(self, description: str, *, nonce: str, **kwargs: object) -> None:
        super().__init__(description, **kwargs)  # type: ignore[arg-type]
        self.nonce = nonce

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [*super().headers, ("DPoP-Nonce", self.nonce)]


class Unavailable(KitError):
    """The broker's keys or introspection cannot be reached, so the token cannot be checked:
    503 (fail closed), with no challenge to retry another token with."""

    status = 503
    error = "temporarily_unavailable"

    @property
    def headers(self) -> list[tuple[str, str]]:
        return [("Cache-Control", "no-store"), ("Retry-After", "5")]

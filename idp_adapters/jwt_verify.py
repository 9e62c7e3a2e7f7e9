"""The one strict JWT verification routine (RFC 7519 / RFC 8725), shared by every JWT consumer:
identity adapters, workload verifiers, and the broker (client assertions, its own tokens).

Structure, header and time rules are enforced here; the signature is verified by PyJWT's algorithm
implementation (`jwt.PyJWK.Algorithm.verify`, backed by `cryptography`) with a key chosen by a
`SigningKeyResolver` from configured keys only. The compact serialization is parsed once, strictly
(canonical base64url, no duplicate JSON members), and the same bytes are what the signature covers.
``exp``/``nbf``/``iat``/``iss``/``aud`` are checked here against the injected `Clock`.

Every refusal is a `TokenRejected` whose ``reason`` is fixed text: no part of the token (not even
its ``kid`` or ``iss``) ever appears in a reason or a log line. Library messages go to ``debug``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Collection, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import jwt

from broker.clock import Clock
from idp_adapters._json import StrictJsonError, loads_strict_object
from idp_adapters.base import TokenRejected
from idp_adapters.jwks import KEY_REQUIREMENTS, SigningKeyResolver

_B64URL = re.compile(r"[A-Za-z0-9_-]+")

IGNORED_KEY_HEADERS = ("jku", "x5u", "jwk", "x5c")
"""Header parameters that could point at or carry a key. Never consulted (RFC 8725 section 3.10)."""


@dataclass(frozen=True, slots=True)
class VerifiedJwt:
    """A JWT whose signature, issuer, times and (if asked) audience have been verified."""

    header: dict[str, Any]
    claims: dict[str, Any]

    @property
    def typ(self) -> str | None:
        """The header ``typ``, normalised (see `normalize_typ`), or None when absent."""
        value = self.header.get("typ")
        return normalize_typ(value) if isinstance(value, str) else None


def normalize_typ(value: str) -> str:
    """Normalise a media type for comparison: case-insensitive, ``application/`` prefix optional
    (RFC 7515 section 4.1.9, RFC 8725 section 3.11)."""
    lowered = value.strip().lower()
    return lowered.removeprefix("application/")


def _b64url_decode(segment: str) -> bytes:
    """Strict base64url without padding (RFC 7515 section 2): canonical encodings only."""
    if len(segment) % 4 == 1 or _B64URL.fullmatch(segment) is None:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not base64url") from None
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url")
    return data


def _decode_json_segment(segment: str, what: str) -> dict[str, Any]:
    try:
        return loads_strict_object(_b64url_decode(segment))
    except StrictJsonError as exc:
        if "duplicate" in str(exc):
            raise TokenRejected(f"token {what} has duplicate members") from None
        raise TokenRejected(f"token {what} is malformed", debug=str(exc)) from None
    except ValueError as exc:
        raise TokenRejected(f"token {what} is malformed", debug=str(exc)) from None


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def claim_audiences(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """The ``aud`` claim as a tuple of strings (a string or a non-empty list of strings)."""
    aud = claims.get("aud")
    if aud is None:
        raise TokenRejected("token has no audience")
    if isinstance(aud, str):
        return (aud,)
    if isinstance(aud, list) and aud and all(isinstance(item, str) for item in aud):
        return tuple(aud)
    raise TokenRejected("token audience is malformed")


def _check_algorithm(alg: object, algorithms: Collection[str]) -> str:
    if not isinstance(alg, str):
        raise TokenRejected("token algorithm is not allowed", debug="alg missing or not a string")
    # Exact comparison against configuration; never a normalised or token-derived list. Only
    # asymmetric algorithms are ever acceptable, whatever the caller passes.
    if alg not in algorithms or alg not in KEY_REQUIREMENTS:
        raise TokenRejected("token algorithm is not allowed")
    return alg


def _check_typ(header: Mapping[str, Any], allowed_typ: Collection[str | None] | None) -> None:
    typ = header.get("typ")
    if typ is not None and not isinstance(typ, str):
        raise TokenRejected("token type header is malformed")
    if allowed_typ is None:
        return
    allowed = {normalize_typ(t) if t is not None else None for t in allowed_typ}
    if (normalize_typ(typ) if typ is not None else None) not in allowed:
        raise TokenRejected("token type header is not acceptable")


def _verify_signature(signing_input: bytes, signature: bytes, key: jwt.PyJWK, alg: str) -> None:
    # The resolver binds each key to one algorithm; a key is never used with another one.
    if key.algorithm_name != alg:
        raise TokenRejected("token algorithm is not allowed", debug="key bound to another alg")
    try:
        valid = key.Algorithm.verify(signing_input, key.key, signature)
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        raise TokenRejected("token signature is invalid", debug=type(exc).__name__) from None
    if not valid:
        raise TokenRejected("token signature is invalid")


def split_jws(token: str, *, max_bytes: int) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """A compact JWS parsed strictly, nothing verified: (header, payload, signing input,
    signature). For proofs that carry their own key (DPoP), which `verify_jwt` does not take."""
    if not isinstance(token, str) or not token.isascii():
        raise TokenRejected("token is malformed")
    if len(token) > max_bytes:
        raise TokenRejected("token is too large")
    segments = token.split(".")
    if len(segments) != 3 or not segments[2]:
        raise TokenRejected("token is malformed", debug=f"{len(segments)} segments, expected 3")
    header = _decode_json_segment(segments[0], "header")
    payload = _decode_json_segment(segments[1], "payload")
    try:
        signature = _b64url_decode(segments[2])
    except ValueError:
        raise TokenRejected("token signature is malformed") from None
    return header, payload, f"{segments[0]}.{segments[1]}".encode(), signature


verify_signature = _verify_signature
"""Check `signature` over `signing_input` with `key` (bound to `alg`); `TokenRejected` if not."""


def unverified_claims(token: str, *, max_bytes: int) -> dict[str, Any]:
    """The payload of a compact JWS, parsed as strictly as `verify_jwt` parses it, NOT verified.

    Only for routing (which issuer's keys to verify with); never trust what it returns.
    """
    return _peek(token, max_bytes)[1]


def unverified_issuer(token: str, *, max_bytes: int) -> object:
    """The ``iss`` of a compact JWS (any JSON value, or None), parsed as `unverified_claims`
    parses it, NOT verified: for routing only.

    The parsed payload is kept for the current task's next `verify_jwt`, which then does not
    parse the same segment again when it verifies this token: the same characters parse to the
    same claims, and no caller ever holds that copy (this returns only the issuer), so nothing
    can have changed it. Used once, and only for a payload segment equal to the one peeked."""
    segment, claims = _peek(token, max_bytes)
    _peeked_payload.set((segment, claims))
    return claims.get("iss")


_peeked_payload: ContextVar[tuple[str, dict[str, Any]] | None] = ContextVar(
    "jwt_peeked_payload", default=None
)


def _peek(token: str, max_bytes: int) -> tuple[str, dict[str, Any]]:
    if not isinstance(token, str) or len(token) > max_bytes:
        raise TokenRejected("token is too large")
    if not token.isascii():
        raise TokenRejected("token is malformed", debug="non-ASCII characters")
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenRejected("token is malformed", debug=f"{len(segments)} segments, expected 3")
    return segments[1], _decode_json_segment(segments[1], "payload")


def _payload_claims(segment: str) -> dict[str, Any]:
    """The payload segment parsed, or the claims `unverified_issuer` parsed from these same
    characters in this task (taken once)."""
    peeked = _peeked_payload.get()
    if peeked is not None:
        _peeked_payload.set(None)
        if peeked[0] == segment:
            return peeked[1]
    return _decode_json_segment(segment, "payload")


def _check_times(
    claims: Mapping[str, Any], now: float, leeway: int, *, check_expiry: bool = True
) -> None:
    for name in ("exp", "nbf", "iat"):
        if name in claims and not _is_number(claims[name]):
            raise TokenRejected(f"token claim {name!r} is not a number")
    exp = claims.get("exp")
    if check_expiry and exp is not None and now >= exp + leeway:
        raise TokenRejected("token has expired")
    nbf = claims.get("nbf")
    if nbf is not None and now + leeway < nbf:
        raise TokenRejected("token is not yet valid")
    iat = claims.get("iat")
    if iat is not None and iat > now + leeway:
        raise TokenRejected("token was issued in the future")


async def verify_jwt(
    token: str,
    *,
    keys: SigningKeyResolver,
    issuer: str,
    audiences: Collection[str] | None,
    algorithms: Collection[str],
    clock: Clock,
    leeway: int,
    max_bytes: int,
    require: Collection[str] = ("exp", "iat", "iss", "sub"),
    allowed_typ: Collection[str | None] | None = None,
    check_expiry: bool = True,
) -> VerifiedJwt:
    """Verify a compact JWS JWT strictly and return its header and claims.

    * `issuer`: the exact expected ``iss`` (byte-for-byte; no prefix or trailing-slash variants).
    * `audiences`: when not None, ``aud`` must contain at least one of them (missing ``aud`` fails).
    * `algorithms`: the configured allow-list, compared exactly with the header ``alg``.
    * `require`: claims that must be present (``exp`` always is, whatever is passed).
    * `allowed_typ`: when not None, the accepted header ``typ`` values (None = absent is fine).

    Raises `TokenRejected` for any problem with the token and lets `IdentityProviderUnavailable`
    from the key resolver through (the key set could not be obtained).
    """
    if not isinstance(token, str):
        raise TokenRejected("token is malformed", debug="not a string")
    if len(token) > max_bytes:
        raise TokenRejected("token is too large")
    if not token.isascii():
        raise TokenRejected("token is malformed", debug="non-ASCII characters")
    segments = token.split(".")
    if len(segments) != 3:
        raise TokenRejected("token is malformed", debug=f"{len(segments)} segments, expected 3")
    header_segment, payload_segment, signature_segment = segments
    header = _decode_json_segment(header_segment, "header")
    alg = _check_algorithm(header.get("alg"), algorithms)
    if "crit" in header:
        raise TokenRejected("token uses critical header extensions this broker does not support")
    _check_typ(header, allowed_typ)
    kid = header.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise TokenRejected("token key id is malformed")
    claims = _payload_claims(payload_segment)
    if not signature_segment:
        raise TokenRejected("token is not signed")
    try:
        signature = _b64url_decode(signature_segment)
    except ValueError:
        raise TokenRejected("token signature is malformed") from None

    key = await keys.get_signing_key(kid, alg)
    _verify_signature(f"{header_segment}.{payload_segment}".encode(), signature, key, alg)

    for name in ("exp", *require):
        if name not in claims:
            raise TokenRejected(f"token is missing the required claim {name!r}")
    if claims.get("iss") != issuer:
        raise TokenRejected("token issuer is not the expected issuer")
    if "sub" in claims and not isinstance(claims["sub"], str):
        raise TokenRejected("token subject is malformed")
    _check_times(claims, clock.now(), leeway, check_expiry=check_expiry)
    if audiences is not None:
        accepted = set(audiences)
        if not any(aud in accepted for aud in claim_audiences(claims)):
            raise TokenRejected("token audience is not acceptable")
    return VerifiedJwt(header=header, claims=claims)

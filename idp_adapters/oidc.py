"""`OidcAdapter`: people's ID tokens and JWT access tokens from any OpenID Connect provider.

Keys come from the issuer's JWKS (via discovery, or the configured ``jwks_uri``) through a
`JwksCache`, so keys rotated at the IdP are picked up without a restart. Verification is
`verify_jwt`; on top of it each RFC 8693 token type has a profile:

ID token (``urn:ietf:params:oauth:token-type:id_token``)
    ``aud`` contains one of ``client_ids``; with several audiences, ``azp`` must be one of
    ``client_ids`` (OpenID Connect Core 3.1.3.7); ``typ`` is not ``at+jwt``.
Access token (``urn:ietf:params:oauth:token-type:access_token``)
    ``aud`` contains one of ``audiences``; ``typ`` is ``at+jwt``, ``JWT`` or absent (RFC 9068);
    no ``nonce``, ``at_hash`` or ``c_hash`` (those mark an ID token).
JWT (``urn:ietf:params:oauth:token-type:jwt``)
    Either profile; the resulting `Principal.token_type` names the one that matched.

Keep ``client_ids`` and ``audiences`` disjoint: a nonce-free ID token whose ``aud`` is also an
accepted access-token audience cannot be told apart from an access token.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

import httpx

from broker.clock import Clock
from broker.settings import IdentityProviderConfig
from broker.types import Principal, TokenType
from idp_adapters.base import TokenRejected
from idp_adapters.discovery import signing_keys_for
from idp_adapters.jwks import SigningKeyResolver
from idp_adapters.jwt_verify import VerifiedJwt, claim_audiences, verify_jwt
from idp_adapters.presets import (
    ClaimPreset,
    extract_attributes,
    extract_groups,
    extract_strings,
    lookup_claim,
    resolve_claim_mapping,
)

_log = logging.getLogger(__name__)

ACCEPTED_TOKEN_TYPES = frozenset({TokenType.ID_TOKEN, TokenType.ACCESS_TOKEN, TokenType.JWT})
ID_TOKEN_MARKERS = ("nonce", "at_hash", "c_hash")
ACCESS_TOKEN_TYPS = frozenset({"at+jwt", "jwt", None})
MAX_SUBJECT_LENGTH = 512


NOT_AN_ID_TOKEN = (
    f"token is an access token, not an ID token: present it as {TokenType.ACCESS_TOKEN}"
)
NOT_AN_ACCESS_TOKEN = (
    f"token is an ID token, not an access token: present it as {TokenType.ID_TOKEN}"
)


def _check_id_token(
    verified: VerifiedJwt,
    audiences: tuple[str, ...],
    client_ids: set[str],
    access_audiences: Collection[str] = (),
) -> None:
    if verified.typ == "at+jwt":
        raise TokenRejected(NOT_AN_ID_TOKEN)
    if not any(aud in client_ids for aud in audiences):
        if any(aud in access_audiences for aud in audiences):  # meant for us as an access token
            raise TokenRejected(NOT_AN_ID_TOKEN)
        raise TokenRejected("token audience is not acceptable")
    if len(audiences) > 1 and verified.claims.get("azp") not in client_ids:
        raise TokenRejected("token authorized party is not acceptable")


def _check_access_token(
    verified: VerifiedJwt,
    audiences: tuple[str, ...],
    accepted: set[str],
    client_ids: Collection[str] = (),
) -> None:
    if verified.typ not in ACCESS_TOKEN_TYPS:
        raise TokenRejected("token type header is not acceptable for an access token")
    # An ID token sent as an access token: say so (its audience is a client id, not ours).
    if any(marker in verified.claims for marker in ID_TOKEN_MARKERS):
        raise TokenRejected(NOT_AN_ACCESS_TOKEN)
    if not any(aud in accepted for aud in audiences):
        if any(aud in client_ids for aud in audiences):
            raise TokenRejected(NOT_AN_ACCESS_TOKEN)
        raise TokenRejected("token audience is not acceptable")


def subject_from(claims: dict[str, Any], claim: str) -> str:
    """The mapped subject: a non-empty string without control characters, at most 512 long."""
    value = lookup_claim(claims, claim)
    if not isinstance(value, str) or not value:
        raise TokenRejected("token has no usable subject claim")
    if len(value) > MAX_SUBJECT_LENGTH or not value.isprintable():
        raise TokenRejected("token subject claim is malformed")
    return value


class OidcAdapter:
    """Verifies ID tokens and JWT access tokens from one OpenID Connect issuer (kinds ``oidc``
    and ``dev``). Implements `IdentityAdapter`."""

    def __init__(
        self,
        config: IdentityProviderConfig,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        keys: SigningKeyResolver | None = None,
    ) -> None:
        """`keys` replaces discovery/JWKS (e.g. a `StaticJwks`); by default keys come from the
        configured ``jwks_uri`` or the issuer's discovery document."""
        self._config = config
        self._clock = clock
        self._keys = keys if keys is not None else signing_keys_for(config, http, clock)
        self._mapping: ClaimPreset = resolve_claim_mapping(config.preset, config.claims)
        self._client_ids = set(config.client_ids)
        self._audiences = set(config.audiences)
        if self._client_ids & self._audiences:
            _log.warning(
                "identity provider %s: client_ids and audiences overlap; nonce-free ID tokens "
                "for those values are indistinguishable from access tokens",
                config.name,
            )

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def issuer(self) -> str:
        return self._config.issuer

    @property
    def claim_mapping(self) -> ClaimPreset:
        return self._mapping

    @property
    def keys(self) -> SigningKeyResolver:
        return self._keys

    def accepts(self, token_type: TokenType) -> bool:
        return token_type in ACCEPTED_TOKEN_TYPES

    async def authenticate(self, token: str, token_type: TokenType) -> Principal:
        if not self.accepts(token_type):
            raise TokenRejected("this identity provider does not accept this token type")
        if token_type is TokenType.ID_TOKEN and not self._client_ids:
            raise TokenRejected("this identity provider accepts no ID tokens")
        if token_type is TokenType.ACCESS_TOKEN and not self._audiences:
            raise TokenRejected("this identity provider accepts no access tokens")
        verified = await verify_jwt(
            token,
            keys=self._keys,
            issuer=self._config.issuer,
            audiences=None,
            algorithms=self._config.algorithms,
            clock=self._clock,
            leeway=self._config.leeway_seconds,
            max_bytes=self._config.max_token_bytes,
            require=("exp", "iat", "iss"),
        )
        profile = self._profile(verified, token_type)
        return self._principal(verified.claims, profile)

    def _profile(self, verified: VerifiedJwt, token_type: TokenType) -> TokenType:
        audiences = claim_audiences(verified.claims)
        if token_type is TokenType.ID_TOKEN:
            _check_id_token(verified, audiences, self._client_ids, self._audiences)
            return TokenType.ID_TOKEN
        if token_type is TokenType.ACCESS_TOKEN:
            _check_access_token(verified, audiences, self._audiences, self._client_ids)
            return TokenType.ACCESS_TOKEN
        failures: list[str] = []
        if self._client_ids:
            try:
                _check_id_token(verified, audiences, self._client_ids)
                return TokenType.ID_TOKEN
            except TokenRejected as exc:
                failures.append(f"as ID token: {exc.reason}")
        if self._audiences:
            try:
                _check_access_token(verified, audiences, self._audiences)
                return TokenType.ACCESS_TOKEN
            except TokenRejected as exc:
                failures.append(f"as access token: {exc.reason}")
        raise TokenRejected(
            "token is neither an acceptable ID token nor an acceptable access token",
            debug="; ".join(failures),
        )

    def _principal(self, claims: dict[str, Any], token_type: TokenType) -> Principal:
        auth_time = claims.get("auth_time")
        iat = claims.get("iat")
        return Principal(
            idp=self._config.name,
            subject=subject_from(claims, self._mapping.subject),
            groups=extract_groups(claims, self._mapping.groups),
            idp_roles=extract_strings(claims, self._mapping.roles),
            token_type=token_type,
            expires_at=int(claims["exp"]),
            auth_time=auth_time
            if isinstance(auth_time, int) and not isinstance(auth_time, bool)
            else None,
            attributes=extract_attributes(claims, self._mapping),
            issued_at=int(iat)
            if isinstance(iat, int | float) and not isinstance(iat, bool)
            else None,
        )

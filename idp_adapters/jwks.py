"""Signing-key resolution for JWT verification: a caching, rate-limited JWKS fetcher and an inline
key set, both behind the `SigningKeyResolver` protocol.

A key is only ever chosen from a configured key set, by the token's ``kid`` (an opaque string) and
compatibility with the token's algorithm. Nothing in a token (``jku``, ``x5u``, ``jwk``, ``x5c``)
can add a key or point at a URL.

Which published keys are usable:

* ``kty`` must be ``RSA``, ``EC`` or ``OKP`` (symmetric ``oct`` keys are never accepted);
* ``use``, when present, must be ``sig``; ``key_ops``, when present, must contain ``verify``;
* keys carrying private members (``d``) are skipped: a key set publishing private keys is broken;
* RSA keys must have at least 2048 bits;
* PyJWT must be able to load the key (`jwt.PyJWK`); anything else is skipped.

A key fits an algorithm when its type (and curve) is the one the algorithm needs (RSA for RS*/PS*,
P-256 for ES256, ..., Ed25519/Ed448 for EdDSA) and its ``alg`` member, when present, names exactly
that algorithm. An RSA key therefore never verifies an HS256 token: no HMAC algorithm is supported.

Used for identity providers' keys and, by the broker, for agents' ``jwks_uri`` (private_key_jwt).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, cast, runtime_checkable

import httpx
import jwt

from broker.clock import Clock
from idp_adapters._http import fetch_json_object
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected

_log = logging.getLogger(__name__)

_RSA = ("RSA", None)
KEY_REQUIREMENTS: Mapping[str, tuple[str, frozenset[str] | None]] = MappingProxyType(
    {
        "RS256": _RSA,
        "RS384": _RSA,
        "RS512": _RSA,
        "PS256": _RSA,
        "PS384": _RSA,
        "PS512": _RSA,
        "ES256": ("EC", frozenset({"P-256"})),
        "ES384": ("EC", frozenset({"P-384"})),
        "ES512": ("EC", frozenset({"P-521"})),
        "EdDSA": ("OKP", frozenset({"Ed25519", "Ed448"})),
    }
)
"""The asymmetric JWS algorithms supported, with the key type and curves each one requires."""

MIN_RSA_BITS = 2048
MAX_KEYS_PER_SET = 100

UNKNOWN_KEY_REASON = "token signing key is unknown"


@runtime_checkable
class SigningKeyResolver(Protocol):
    """Finds the verification key for a token's ``kid`` and (already allow-listed) ``alg``."""

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """Return the key, bound to `alg`; raise `TokenRejected` if no usable key matches, or
        `IdentityProviderUnavailable` if the key set cannot be obtained at all."""
        ...


@dataclass(frozen=True, slots=True)
class _UsableKey:
    """One verification key from a key set, with what is needed to match it."""

    kid: str | None
    kty: str
    crv: str | None
    alg: str | None
    jwk: Mapping[str, Any]
    loaded: jwt.PyJWK

    def fits(self, alg: str) -> bool:
        kty, curves = KEY_REQUIREMENTS[alg]
        if self.kty != kty:
            return False
        if curves is not None and self.crv not in curves:
            return False
        return self.alg is None or self.alg == alg

    def bound_to(self, alg: str) -> jwt.PyJWK:
        """The key as a PyJWK whose algorithm is `alg` (PyJWT verifies with the PyJWK's one)."""
        if self.loaded.algorithm_name == alg:
            return self.loaded
        return jwt.PyJWK(dict(self.jwk), algorithm=alg)


def load_public_key(jwk: Any) -> _UsableKey | None:
    """Return the usable verification key described by `jwk`, or None (with the reason logged)."""
    if not isinstance(jwk, dict):
        return None
    kty = jwk.get("kty")
    kid = jwk.get("kid")
    alg = jwk.get("alg")
    crv = jwk.get("crv")
    use = jwk.get("use")
    key_ops = jwk.get("key_ops")
    problem: str | None = None
    if not isinstance(kty, str) or kty not in {"RSA", "EC", "OKP"}:
        problem = "unsupported kty"
    elif "d" in jwk:
        problem = "contains private key material"
    elif use is not None and use != "sig":
        problem = "use is not sig"
    elif key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        problem = "key_ops does not allow verify"
    elif kid is not None and not isinstance(kid, str):
        problem = "kid is not a string"
    elif alg is not None and (not isinstance(alg, str) or alg not in KEY_REQUIREMENTS):
        problem = "alg is not a supported asymmetric JWS algorithm"
    elif crv is not None and not isinstance(crv, str):
        problem = "crv is not a string"
    if problem is not None:
        _log.debug("skipping JWK %r: %s", kid if isinstance(kid, str) else None, problem)
        return None
    try:
        loaded = jwt.PyJWK(dict(jwk))
    except (jwt.PyJWTError, ValueError, TypeError) as exc:
        _log.debug("skipping JWK %r: PyJWT cannot load it (%s)", kid, type(exc).__name__)
        return None
    key_size = getattr(loaded.key, "key_size", None)
    if kty == "RSA" and (not isinstance(key_size, int) or key_size < MIN_RSA_BITS):
        _log.debug("skipping JWK %r: RSA key shorter than %d bits", kid, MIN_RSA_BITS)
        return None
    return _UsableKey(
        kid=kid,
        kty=cast(str, kty),  # checked above
        crv=crv,
        alg=alg,
        jwk=MappingProxyType(dict(jwk)),
        loaded=loaded,
    )


def parse_jwks(document: Mapping[str, Any]) -> tuple[_UsableKey, ...]:
    """Parse a JWK Set document into its usable verification keys (possibly none).

    Raises ValueError if the document has no ``keys`` list or too many keys.
    """
    keys = document.get("keys")
    if not isinstance(keys, list):
        raise ValueError("a JWK Set needs a 'keys' list")
    if len(keys) > MAX_KEYS_PER_SET:
        raise ValueError(f"a JWK Set may hold at most {MAX_KEYS_PER_SET} keys")
    return tuple(key for key in map(load_public_key, keys) if key is not None)


def _require_supported(alg: str) -> None:
    if alg not in KEY_REQUIREMENTS:
        raise TokenRejected("token algorithm is not allowed", debug="no key type for this alg")


def select_key(keys: tuple[_UsableKey, ...], kid: str | None, alg: str) -> jwt.PyJWK | None:
    """Pick the key for (`kid`, `alg`) from `keys`; None when no key matches.

    With a ``kid``: the one compatible key with exactly that ``kid``. Without: the only compatible
    key of the set (several compatible keys and no ``kid`` is refused rather than guessed).
    """
    compatible = [key for key in keys if key.fits(alg)]
    if kid is None:
        if len(compatible) > 1:
            raise TokenRejected(
                "token has no key id and the identity provider publishes several keys"
            )
        return compatible[0].bound_to(alg) if compatible else None
    matching = [key for key in compatible if key.kid == kid]
    if len(matching) > 1:
        raise TokenRejected("token key id is ambiguous in the published key set")
    return matching[0].bound_to(alg) if matching else None


class StaticJwks:
    """A fixed, inline JWK Set (from configuration or tests)."""

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        self._keys = parse_jwks(jwks)

    @property
    def key_ids(self) -> tuple[str | None, ...]:
        """The ``kid`` of every usable key, in published order."""
        return tuple(key.kid for key in self._keys)

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        _require_supported(alg)
        found = select_key(self._keys, kid, alg)
        if found is None:
            raise TokenRejected(UNKNOWN_KEY_REASON)
        return found


MIN_REFRESH_INTERVAL_SECONDS = 1.0
"""The least `min_refresh_interval` accepted: below it, a stream of tokens with unknown ``kid``
values becomes a stream of JWKS fetches (0 would turn the storm guard off)."""


def check_min_refresh_interval(value: float) -> float:
    """`value`, or ValueError when it is below `MIN_REFRESH_INTERVAL_SECONDS` (or NaN)."""
    if not value >= MIN_REFRESH_INTERVAL_SECONDS:
        raise ValueError(
            f"min_refresh_interval must be at least {MIN_REFRESH_INTERVAL_SECONDS} s "
            "(it guards the identity provider against unknown-kid refetch storms)"
        )
    return value


class JwksCache:
    """A JWK Set fetched from `jwks_uri` on first use and kept fresh.

    * The set is refetched when it is older than `max_age` seconds (monotonic clock).
    * A token whose ``kid`` is not in the set triggers a refetch, but fetch attempts of any kind are
      at most one per `min_refresh_interval` seconds, so a stream of bad tokens causes no storm.
    * Concurrent callers share one in-flight fetch (single flight).
    * When a fetch fails but a set is cached, the cached set stays in use. When nothing is cached,
      the failure is an `IdentityProviderUnavailable`; after a failure the next attempt waits
      ``min(min_refresh_interval, 1s)`` (callers in between get the same error at once).
    * A fetched set with no usable key counts as a failed fetch.

    The cache belongs to one event loop at a time (the broker's); it is not thread-safe.
    """

    def __init__(
        self,
        jwks_uri: str,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        min_refresh_interval: float,
        max_age: float,
        timeout: float,
    ) -> None:
        check_min_refresh_interval(min_refresh_interval)
        self._uri = jwks_uri
        self._http = http
        self._clock = clock
        self._min_refresh_interval = min_refresh_interval
        self._failure_backoff = min(min_refresh_interval, 1.0)
        self._max_age = max_age
        self._timeout = timeout
        self._keys: tuple[_UsableKey, ...] | None = None
        self._fetched_at = 0.0
        self._last_attempt: float | None = None
        self._last_error: IdentityProviderUnavailable | None = None
        self._generation = 0
        self._lock: asyncio.Lock | None = None
        self._lock_loop: asyncio.AbstractEventLoop | None = None

    @property
    def jwks_uri(self) -> str:
        return self._uri

    @property
    def key_ids(self) -> tuple[str | None, ...]:
        """The ``kid`` of every usable key currently cached (empty before the first fetch)."""
        return tuple(key.kid for key in self._keys or ())

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        _require_supported(alg)
        keys = await self._current_keys()
        found = select_key(keys, kid, alg)
        if found is not None:
            return found
        if self._attempt_allowed(self._min_refresh_interval):
            keys = await self._refresh()
            found = select_key(keys, kid, alg)
            if found is not None:
                return found
        raise TokenRejected(UNKNOWN_KEY_REASON)

    def _attempt_allowed(self, interval: float) -> bool:
        return (
            self._last_attempt is None or self._clock.monotonic() - self._last_attempt >= interval
        )

    async def _current_keys(self) -> tuple[_UsableKey, ...]:
        if self._keys is None:
            if not self._attempt_allowed(self._failure_backoff) and self._last_error is not None:
                raise IdentityProviderUnavailable(
                    self._last_error.reason, debug=self._last_error.debug
                )
            return await self._refresh()
        stale = self._clock.monotonic() - self._fetched_at >= self._max_age
        if stale and self._attempt_allowed(self._min_refresh_interval):
            return await self._refresh()
        return self._keys

    def _get_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        if self._lock is None or self._lock_loop is not loop:
            self._lock = asyncio.Lock()
            self._lock_loop = loop
        return self._lock

    async def _refresh(self) -> tuple[_UsableKey, ...]:
        """Fetch the set once for everyone waiting; return the best set available afterwards."""
        generation = self._generation
        async with self._get_lock():
            if self._generation == generation:
                # No fetch completed since this caller decided to refresh: it fetches. (Callers
                # that arrived while a fetch was in flight see the generation move and reuse it.)
                self._last_attempt = self._clock.monotonic()
                try:
                    keys = await self._fetch()
                except IdentityProviderUnavailable as exc:
                    self._last_error = exc
                    _log.warning(
                        "JWKS fetch failed%s: %s",
                        " (keeping the cached key set)" if self._keys is not None else "",
                        exc.debug or exc.reason,
                    )
                else:
                    self._keys = keys
                    self._fetched_at = self._clock.monotonic()
                    self._last_error = None
                finally:
                    self._generation += 1
            if self._keys is None:
                error = self._last_error or IdentityProviderUnavailable(
                    "identity provider signing keys unavailable"
                )
                raise IdentityProviderUnavailable(error.reason, debug=error.debug)
            return self._keys

    async def _fetch(self) -> tuple[_UsableKey, ...]:
        document = await fetch_json_object(
            self._http, self._uri, timeout=self._timeout, what="signing keys"
        )
        try:
            keys = parse_jwks(document)
        except ValueError as exc:
            raise IdentityProviderUnavailable(
                "identity provider signing keys unavailable",
                debug=f"{self._uri}: {exc}",
            ) from None
        if not keys:
            raise IdentityProviderUnavailable(
                "identity provider publishes no usable signing keys",
                debug=f"{self._uri}: no key passed the usability rules",
            )
        return keys

"""DPoP (RFC 9449): proofs of possession of an agent's key, made and checked.

One module for both sides, light to install (PyJWT, cryptography, joserfc for the RFC 7638
thumbprint): the broker checks proofs at its token and credential endpoints, the resource-server
kit (`broker.kit`) checks them at tools, and the clients (`broker.client`) make them with a
`DPoPKey`.

What `DPoPVerifier.verify` checks, in RFC 9449 §4.3's order: one proof; a well-formed JWT whose
``typ`` is ``dpop+jwt``; an asymmetric ``alg`` from the allow-list (never ``none``, never HMAC);
a public ``jwk`` (any private member is refused, not ignored) of the type the ``alg`` needs; the
signature by that key; ``jti``, ``htm``, ``htu`` and ``iat`` present; ``htm`` and ``htu`` equal to
the request's method and URL (query and fragment ignored, scheme and host case and default ports
normalised); ``iat`` within the freshness window; the server's nonce where it asks for one;
``ath`` equal to the hash of the access token presented with it; the key equal to the token's
``cnf.jkt``; and the ``jti`` never seen before while the proof could be fresh (single use across
replicas when the replay guard is the broker's state store).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

import jwt
from cachetools import LRUCache, TTLCache
from cryptography.hazmat.primitives.asymmetric import ec
from joserfc.jwk import JWKRegistry

from broker.clock import Clock, SystemClock
from idp_adapters.base import TokenRejected
from idp_adapters.jwks import KEY_REQUIREMENTS, load_public_key
from idp_adapters.jwt_verify import normalize_typ, split_jws, verify_signature

DPOP_TYP = "dpop+jwt"
DPOP_ALGORITHMS: tuple[str, ...] = ("ES256", "ES384", "ES512", "PS256", "RS256", "EdDSA")
"""Asymmetric algorithms only (RFC 9449 §4.2): what ``dpop_signing_alg_values_supported`` lists."""
PRIVATE_JWK_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
MAX_PROOF_BYTES = 8192
MAX_JTI_CHARS = 256
DEFAULT_MAX_AGE_SECONDS = 60
DEFAULT_FUTURE_SKEW_SECONDS = 5


class DPoPError(Exception):
    """A refused proof. ``error`` is the RFC 9449 code, ``reason`` public, ``debug`` private."""

    error = "invalid_dpop_proof"

    def __init__(self, reason: str, *, debug: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.debug = debug


class InvalidDPoPProof(DPoPError):
    """The proof is missing, malformed, or does not prove what it must (RFC 9449 §4.3)."""


class UseDPoPNonce(DPoPError):
    """The server wants its nonce in the proof (RFC 9449 §8, §9): retry with ``nonce``."""

    error = "use_dpop_nonce"

    def __init__(self, reason: str, *, nonce: str) -> None:
        super().__init__(reason)
        self.nonce = nonce


class ReplayGuard(Protocol):
    """Records single-use ids: the broker's `StateStore` is one (shared across replicas)."""

    async def use_once(self, key: str, ttl_seconds: float) -> bool: ...


class LocalReplayGuard:
    """A process-local `ReplayGuard` (bounded): what a single-process tool uses by default."""

    def __init__(self, *, max_entries: int = 100_000, ttl_seconds: float = 600) -> None:
        self._seen: TTLCache[str, bool] = TTLCache(maxsize=max_entries, ttl=ttl_seconds)

    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        if key in self._seen:
            return False
        self._seen[key] = True
        return True


@dataclass(frozen=True, slots=True)
class DPoPProof:
    """A verified proof: the key's thumbprint and what the proof was made for."""

    jkt: str
    jti: str
    htm: str
    htu: str
    iat: int


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def jwk_thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (``cnf.jkt``)."""
    return JWKRegistry.import_key(dict(jwk)).thumbprint()


def access_token_hash(token: str) -> str:
    """``ath``: base64url(SHA-256(ASCII(token))) (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii")).digest())


def normalize_htu(url: str) -> str:
    """The URL a proof's ``htu`` is compared by: scheme and host lower-cased, the scheme's
    default port dropped, query and fragment removed, an empty path as ``/``."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        raise InvalidDPoPProof("DPoP proof htu is not a valid URL") from None
    netloc = (
        host
        if port is None or (scheme, port) in {("https", 443), ("http", 80)}
        else (f"{host}:{port}")
    )
    return urlunsplit((scheme, netloc, parts.path or "/", "", ""))


def htu_within(htu: str, base: str) -> bool:
    """Whether a proof's ``htu`` is `base` or a path under it (a gateway's registered URL)."""
    proof, registered = normalize_htu(htu), normalize_htu(base)
    return proof == registered or proof.startswith(registered.rstrip("/") + "/")


def one_header(values: Sequence[str]) -> str | None:
    """The single ``DPoP`` header of a request (None when absent); more than one is refused."""
    if len(values) > 1:
        raise InvalidDPoPProof("more than one DPoP header")
    return values[0] if values else None


def cnf_jkt(claims: Mapping[str, Any]) -> str | None:
    """The key a token is bound to (``cnf.jkt``), or None for a bearer token. A malformed
    ``cnf`` is an error, never a bearer token."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    jkt = cnf.get("jkt") if isinstance(cnf, Mapping) else None
    if not isinstance(jkt, str) or not 20 <= len(jkt) <= 128:
        raise ValueError("cnf is not a DPoP key binding")
    return jkt


class DPoPNonces:
    """Server-provided nonces (RFC 9449 §8) without shared state: a nonce is a time window
    and its HMAC under `secret`, so every replica sharing the secret accepts it. The current
    and the previous window are accepted."""

    def __init__(self, secret: bytes, *, window_seconds: int = 300, clock: Clock | None = None):
        if len(secret) < 16:
            raise ValueError("the DPoP nonce secret must be at least 16 bytes")
        self._secret = secret
        self._window = window_seconds
        self._clock = clock or SystemClock()

    def _for(self, window: int) -> str:
        mac = hmac.new(self._secret, str(window).encode(), hashlib.sha256).digest()[:18]
        return f"{window}.{b64url(mac)}"

    def current(self) -> str:
        return self._for(int(self._clock.now() // self._window))

    def valid(self, nonce: object) -> bool:
        if not isinstance(nonce, str) or len(nonce) > 64:
            return False
        now = int(self._clock.now() // self._window)
        return any(hmac.compare_digest(nonce, self._for(w)) for w in (now, now - 1))


class DPoPVerifier:
    """Checks DPoP proofs (see the module docstring for the list)."""

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        replay: ReplayGuard | None = None,
        algorithms: Collection[str] = DPOP_ALGORITHMS,
        max_age_seconds: int = DEFAULT_MAX_AGE_SECONDS,
        future_skew_seconds: int = DEFAULT_FUTURE_SKEW_SECONDS,
        nonces: DPoPNonces | None = None,
        replay_prefix: str = "dpop:",
    ) -> None:
        unsupported = set(algorithms) - set(DPOP_ALGORITHMS)
        if unsupported:
            raise ValueError(f"not asymmetric DPoP algorithms: {sorted(unsupported)}")
        self._clock = clock or SystemClock()
        self._replay = replay or LocalReplayGuard()
        self._algorithms = frozenset(algorithms)
        self._max_age = max_age_seconds
        self._skew = future_skew_seconds
        self._nonces = nonces
        self._prefix = replay_prefix
        self._keys: LRUCache[str, tuple[Any, str]] = LRUCache(maxsize=10_000)

    @property
    def algorithms(self) -> list[str]:
        return [a for a in DPOP_ALGORITHMS if a in self._algorithms]

    def _public_key(self, jwk: dict[str, Any]) -> tuple[Any, str]:
        """The loaded key and its RFC 7638 thumbprint, remembered per JWK (an agent proves
        with the same key on every request; loading and hashing it is most of a check)."""
        try:
            canonical = json.dumps(jwk, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError):
            raise InvalidDPoPProof("DPoP proof jwk is malformed") from None
        known = self._keys.get(canonical)
        if known is None:
            key = load_public_key(jwk)
            try:
                thumbprint = jwk_thumbprint(jwk) if key is not None else ""
            except Exception:  # joserfc's own errors for a key it cannot read
                raise InvalidDPoPProof("DPoP proof jwk is not a usable public key") from None
            known = self._keys[canonical] = (key, thumbprint)
        return known

    @property
    def nonces(self) -> DPoPNonces | None:
        return self._nonces

    async def verify(
        self,
        proof: str,
        *,
        method: str,
        url: str | None = None,
        url_base: str | None = None,
        access_token: str | None = None,
        jkt: str | None = None,
        check_nonce: bool = True,
        replay_scope: str = "",
    ) -> DPoPProof:
        """Verify `proof` for a request: `method`, and `url` (exactly) or `url_base` (a path
        under it); with `access_token`, ``ath`` must be its hash; with `jkt`, the key must be
        that one. `check_nonce=False` for proofs made for another server (a gateway's, which
        forwards them): this server's nonces are not theirs. `replay_scope` separates the
        single-use records of distinct uses of one proof a caller may make (a gateway's second
        fetch with a rejected-version hint). Raises `InvalidDPoPProof` or `UseDPoPNonce`."""
        try:
            header, claims, signing_input, signature = split_jws(proof, max_bytes=MAX_PROOF_BYTES)
        except TokenRejected as exc:
            raise InvalidDPoPProof(
                f"DPoP proof is not a well-formed JWT: {exc.reason}", debug=exc.debug
            ) from None
        typ = header.get("typ")
        if not isinstance(typ, str) or normalize_typ(typ) != DPOP_TYP:
            raise InvalidDPoPProof("DPoP proof typ must be dpop+jwt")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms or alg not in KEY_REQUIREMENTS:
            raise InvalidDPoPProof("DPoP proof alg must be one of " + " ".join(self.algorithms))
        if "crit" in header:
            raise InvalidDPoPProof("DPoP proof uses critical header extensions")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict):
            raise InvalidDPoPProof("DPoP proof has no jwk header")
        if PRIVATE_JWK_MEMBERS & set(jwk):
            raise InvalidDPoPProof("DPoP proof jwk contains private key material")
        key, thumbprint = self._public_key(jwk)
        if key is None or not key.fits(alg):
            raise InvalidDPoPProof("DPoP proof jwk is not a usable public key for its alg")
        try:
            verify_signature(signing_input, signature, key.bound_to(alg), alg)
        except TokenRejected as exc:
            raise InvalidDPoPProof("DPoP proof signature is invalid", debug=exc.debug) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise InvalidDPoPProof(
                "DPoP proof jwk is not a usable public key", debug=type(exc).__name__
            ) from None

        jti, htm, htu, iat = (claims.get(n) for n in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI_CHARS:
            raise InvalidDPoPProof("DPoP proof jti is missing or malformed")
        if not isinstance(htm, str) or not isinstance(htu, str):
            raise InvalidDPoPProof("DPoP proof htm and htu are required")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise InvalidDPoPProof("DPoP proof iat is missing or malformed")
        if htm != method.upper():
            raise InvalidDPoPProof(f"DPoP proof htm does not match the request method {method}")
        if url is not None and normalize_htu(htu) != normalize_htu(url):
            raise InvalidDPoPProof("DPoP proof htu does not match the request URL")
        if url_base is not None and not htu_within(htu, url_base):
            raise InvalidDPoPProof("DPoP proof htu is not this service's URL")
        now = self._clock.now()
        if iat > now + self._skew:
            raise InvalidDPoPProof("DPoP proof iat is in the future")
        if iat < now - self._max_age:
            raise InvalidDPoPProof(f"DPoP proof is older than {self._max_age} seconds")
        if check_nonce and self._nonces is not None and not self._nonces.valid(claims.get("nonce")):
            raise UseDPoPNonce(
                "DPoP proof must carry the server's nonce", nonce=self._nonces.current()
            )
        if access_token is not None:
            ath = claims.get("ath")
            if not isinstance(ath, str):
                raise InvalidDPoPProof("DPoP proof ath (the access token hash) is missing")
            if not hmac.compare_digest(ath, access_token_hash(access_token)):
                raise InvalidDPoPProof("DPoP proof ath does not match the access token")
        elif "ath" in claims:
            raise InvalidDPoPProof("DPoP proof carries ath but no access token was presented")
        if jkt is not None and not hmac.compare_digest(thumbprint, jkt):
            raise InvalidDPoPProof("DPoP proof is not signed by the key the token is bound to")
        replay_key = self._prefix + b64url(
            hashlib.sha256(f"{thumbprint}.{jti}.{replay_scope}".encode()).digest()
        )
        if not await self._replay.use_once(replay_key, self._max_age + self._skew + 1):
            raise InvalidDPoPProof("DPoP proof jti has been used before")
        return DPoPProof(jkt=thumbprint, jti=jti, htm=htm, htu=htu, iat=int(iat))


class DPoPKey:
    """An agent's DPoP key pair (EC P-256 unless given one) and the proofs it makes."""

    algorithm = "ES256"

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._private_key = private_key or ec.generate_private_key(ec.SECP256R1())
        public = jwt.algorithms.ECAlgorithm.to_jwk(self._private_key.public_key(), as_dict=True)
        self._public_jwk: dict[str, Any] = {k: public[k] for k in ("kty", "crv", "x", "y")}
        self.jkt = jwk_thumbprint(self._public_jwk)

    @property
    def public_jwk(self) -> dict[str, Any]:
        return dict(self._public_jwk)

    def proof(
        self,
        method: str,
        url: str,
        *,
        access_token: str | None = None,
        nonce: str | None = None,
        issued_at: float | None = None,
    ) -> str:
        """A fresh proof for one request (``htu`` without query or fragment)."""
        parts = urlsplit(url)
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(18),
            "htm": method.upper(),
            "htu": urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", "")),
            "iat": int(time.time() if issued_at is None else issued_at),
        }
        if access_token is not None:
            claims["ath"] = access_token_hash(access_token)
        if nonce is not None:
            claims["nonce"] = nonce
        return jwt.encode(
            claims,
            self._private_key,
            algorithm=self.algorithm,
            headers={"typ": DPOP_TYP, "jwk": self._public_jwk},
        )

    def __repr__(self) -> str:
        return f"DPoPKey(jkt={self.jkt!r})"

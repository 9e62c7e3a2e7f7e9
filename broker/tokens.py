"""The broker's own tokens: signing keys (keyring, rotation, JWKS), issuing RFC 9068 JWT access
tokens, and verifying them when they come back (re-exchange, introspection).

Keys live in a directory, one JSON file per key (private key as PKCS#8 PEM, mode 0600). The newest
key that is not retired signs; retired keys stay published until every token they signed has
expired (retirement time + the maximum token lifetime + leeway), then are deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cachetools import LRUCache
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from broker.clock import Clock
from broker.dpop import cnf_jkt
from broker.types import BrokerToken, IssuedToken, Provenance
from idp_adapters.base import TokenRejected
from idp_adapters.jwt_verify import verify_jwt

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 - a media type, not a secret
ID_JAG_TYP = "oauth-id-jag+jwt"
"""The ``typ`` of an Identity Assertion JWT Authorization Grant: never accepted as a token."""
NOT_ISSUED_HERE = (
    "token is not an agent token issued by this broker (a person's identity provider token, "
    "say): exchange it for one at the token endpoint first"
)
MAX_TOKEN_BYTES = 16384
"""The largest token of its own the broker accepts back (`BrokerTokenVerifier`), and so the
largest it issues (`TokenIssuer`)."""
_KEY_FILE_SUFFIX = ".key.json"


def _generate_private_key(algorithm: str) -> Any:
    if algorithm == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if algorithm == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if algorithm in {"RS256", "PS256"}:
        return rsa.generate_private_key(public_exponent=65537, key_size=3072)
    if algorithm == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported signing algorithm {algorithm}")


_CLAIMS_ENCODER = json.JSONEncoder(separators=(",", ":"))
"""The claims' JSON as PyJWT's ``jwt.encode`` writes it, by one encoder built once."""


def sign_claims(claims: Mapping[str, Any], key: SigningKey, headers: dict[str, Any]) -> str:
    """A compact JWS of `claims` signed with `key`: the claims serialized here (plain JSON
    values only: numbers, strings, lists, objects), the JWS built and signed by PyJWT, as
    ``jwt.encode`` does after the same serialization."""
    payload = _CLAIMS_ENCODER.encode(claims).encode("utf-8")
    return jwt.api_jws.encode(payload, key.private_key, algorithm=key.algorithm, headers=headers)


@dataclass(frozen=True, slots=True)
class SigningKey:
    kid: str
    algorithm: str
    private_key: Any
    public_jwk: Mapping[str, Any]
    created_at: float
    retired_at: float | None
    verification_key: jwt.PyJWK


class KeyringError(Exception):
    pass


def has_key_files(directory: Path) -> bool:
    """Whether `directory` holds any signing key file (a read-only look)."""
    return directory.is_dir() and any(directory.glob("*" + _KEY_FILE_SUFFIX))


class Keyring:
    """Signing keys on disk. Cheap to read on the hot path; re-reads the directory when it changes
    (checked at most once a second), so `broker keys rotate` reaches a running broker."""

    def __init__(
        self,
        directory: Path,
        *,
        algorithm: str,
        clock: Clock,
        publish_grace_seconds: float,
        generate_if_missing: bool = True,
    ) -> None:
        self._directory = directory
        self._algorithm = algorithm
        self._clock = clock
        self._grace = publish_grace_seconds
        self._lock = threading.Lock()
        self._checked_at = float("-inf")
        self._signature: tuple[tuple[str, int], ...] = ()
        self._keys: dict[str, SigningKey] = {}
        self._active: SigningKey | None = None
        self._jwks: dict[str, Any] = {"keys": []}
        self._on_change: list[Callable[[str | None, str | None, list[str]], None]] = []
        if generate_if_missing and not self._key_files():
            self.rotate()
        self._load()
        if self._active is None:
            raise KeyringError(f"no usable signing key in {directory}")

    # -- reading ---------------------------------------------------------------------------
    def _key_files(self) -> list[Path]:
        if not self._directory.is_dir():
            return []
        return sorted(self._directory.glob("*" + _KEY_FILE_SUFFIX))

    def _dir_signature(self) -> tuple[tuple[str, int], ...]:
        return tuple((p.name, p.stat().st_mtime_ns) for p in self._key_files())

    def _load(self) -> None:
        keys: dict[str, SigningKey] = {}
        for path in self._key_files():
            try:
                record = json.loads(path.read_text())
                private_key = serialization.load_pem_private_key(
                    record["private_key_pem"].encode(), password=None
                )
                algorithm = record["alg"]
                public_jwk = jwt.get_algorithm_by_name(algorithm).to_jwk(
                    private_key.public_key(), as_dict=True
                )
                public_jwk.update({"kid": record["kid"], "alg": algorithm, "use": "sig"})
                keys[record["kid"]] = SigningKey(
                    kid=record["kid"],
                    algorithm=algorithm,
                    private_key=private_key,
                    public_jwk=public_jwk,
                    created_at=float(record["created_at"]),
                    retired_at=record.get("retired_at"),
                    verification_key=jwt.PyJWK(dict(public_jwk), algorithm=algorithm),
                )
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise KeyringError(f"unreadable signing key file {path.name}: {exc}") from None
        now = self._clock.now()
        published = {
            kid: key
            for kid, key in keys.items()
            if key.retired_at is None or key.retired_at + self._grace > now
        }
        candidates = [k for k in published.values() if k.retired_at is None]
        active = max(candidates, key=lambda k: k.created_at) if candidates else None
        with self._lock:
            previous = self._active
            self._keys = published
            self._active = active
            self._jwks = {"keys": [dict(k.public_jwk) for k in published.values()]}
            self._signature = self._dir_signature()
        previous_kid = previous.kid if previous else None
        active_kid = active.kid if active else None
        if previous is not None and previous_kid != active_kid:
            for callback in self._on_change:
                callback(previous_kid, active_kid, sorted(published))

    def on_active_key_change(
        self, callback: Callable[[str | None, str | None, list[str]], None]
    ) -> None:
        """Call ``callback(previous kid, new kid, published kids)`` whenever the active signing
        key changes after start (a rotation in this process or by `broker keys rotate`)."""
        self._on_change.append(callback)

    def refresh(self, *, force: bool = False) -> None:
        now = self._clock.monotonic()
        if not force and now - self._checked_at < 1.0:
            return
        self._checked_at = now
        if force or self._dir_signature() != self._signature:
            self._load()

    @property
    def active(self) -> SigningKey:
        self.refresh()
        if self._active is None:
            raise KeyringError("no active signing key")
        return self._active

    def jwks(self) -> dict[str, Any]:
        self.refresh()
        return self._jwks

    def published_kids(self) -> list[str]:
        self.refresh()
        return sorted(self._keys)

    def is_published(self, kid: str) -> bool:
        self.refresh()
        return kid in self._keys

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """`SigningKeyResolver` for verifying tokens this broker issued."""
        self.refresh()
        key = self._keys.get(kid) if kid is not None else None
        if key is None or key.algorithm != alg:
            raise TokenRejected("token was not signed by a current key of this broker")
        return key.verification_key

    # -- rotation --------------------------------------------------------------------------
    def rotate(self) -> SigningKey:
        """Add a new active key; retire the previous one (still published for its tokens);
        delete keys whose tokens have all expired."""
        self._directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        now = self._clock.now()
        for path in self._key_files():
            record = json.loads(path.read_text())
            if record.get("retired_at") is None:
                record["retired_at"] = now
                self._write(path, record)
            elif record["retired_at"] + self._grace <= now:
                path.unlink()
        private_key = _generate_private_key(self._algorithm)
        kid = time.strftime("%Y%m%d", time.gmtime(now)) + "-" + secrets.token_hex(4)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        record = {
            "kid": kid,
            "alg": self._algorithm,
            "created_at": now,
            "retired_at": None,
            "private_key_pem": pem,
        }
        self._write(self._directory / f"{kid}{_KEY_FILE_SUFFIX}", record)
        self._load()
        return self._keys[kid]

    @staticmethod
    def _write(path: Path, record: dict[str, Any]) -> None:
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle)
        os.replace(tmp, path)


def _nest_act(actor_chain: tuple[str, ...]) -> dict[str, Any]:
    """RFC 8693 §4.1: the current actor outermost, earlier actors nested inside."""
    act: dict[str, Any] | None = None
    for agent in reversed(actor_chain):
        act = {"sub": agent} if act is None else {"sub": agent, "act": act}
    assert act is not None
    return act


def actor_chain_from_claim(act: object, *, max_depth: int = 16) -> tuple[str, ...]:
    chain: list[str] = []
    while act is not None:
        if (
            not isinstance(act, dict)
            or not isinstance(act.get("sub"), str)
            or len(chain) >= max_depth
        ):
            raise ValueError("malformed act claim")
        chain.append(act["sub"])
        act = act.get("act")
    return tuple(chain)


def _lineage(claims: Mapping[str, Any]) -> tuple[str, ...]:
    lineage = claims.get("lineage", [])
    if not isinstance(lineage, list) or not all(isinstance(j, str) for j in lineage):
        raise ValueError("malformed lineage")
    if lineage and lineage[-1] != claims.get("parent_jti"):
        raise ValueError("lineage does not end with parent_jti")
    return tuple(lineage)


class TokenTooLarge(Exception):
    """The token would be larger than the broker itself accepts back: it is not issued."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"the token would be {size} bytes, more than the {limit} accepted")
        self.size = size
        self.limit = limit


class TokenIssuer:
    """Signs RFC 9068 JWT access tokens for agents.

    Never issues a token its own verifier would refuse: one larger than `max_bytes` (give it the
    verifier's `max_bytes`) raises `TokenTooLarge` instead.
    """

    def __init__(
        self, keyring: Keyring, issuer: str, clock: Clock, *, max_bytes: int = MAX_TOKEN_BYTES
    ) -> None:
        self._keyring = keyring
        self._issuer = issuer
        self._clock = clock
        self._max_bytes = max_bytes

    def issue(
        self,
        *,
        provenance: Provenance,
        client_id: str,
        actor_chain: tuple[str, ...],
        scopes: tuple[str, ...],
        audiences: tuple[str, ...],
        lifetime_seconds: int,
        policy_version: str,
        parent_jti: str | None,
        lineage: tuple[str, ...] = (),
        approval: Mapping[str, Any] | None = None,
        jkt: str | None = None,
    ) -> IssuedToken:
        now = int(self._clock.now())
        jti = secrets.token_urlsafe(18)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": provenance.person_id,
            "aud": audiences[0] if len(audiences) == 1 else list(audiences),
            "client_id": client_id,
            "scope": " ".join(scopes),
            "act": _nest_act(actor_chain),
            "iat": now,
            "nbf": now,
            "exp": now + lifetime_seconds,
            "jti": jti,
            "provenance": provenance.to_claim(),
            "policy_version": policy_version,
        }
        if provenance.auth_time is not None:
            claims["auth_time"] = provenance.auth_time
        if parent_jti is not None:
            claims["parent_jti"] = parent_jti
            claims["lineage"] = [*lineage, parent_jti]
        if approval is not None:
            claims["approval"] = dict(approval)
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}  # RFC 9449 §6: bound to the agent's DPoP key
        key = self._keyring.active
        token = sign_claims(claims, key, {"kid": key.kid, "typ": ACCESS_TOKEN_TYP})
        if len(token) > self._max_bytes:
            raise TokenTooLarge(len(token), self._max_bytes)
        return IssuedToken(
            jti=jti,
            token=token,
            expires_in=lifetime_seconds,
            scopes=scopes,
            audiences=audiences,
            claims=claims,
        )

    def issue_id_jag(
        self,
        *,
        provenance: Provenance,
        client_id: str,
        actor_chain: tuple[str, ...],
        scopes: tuple[str, ...],
        audience: str,
        resource: str,
        lifetime_seconds: int,
        policy_version: str,
        jkt: str | None = None,
    ) -> IssuedToken:
        """An Identity Assertion JWT Authorization Grant (draft-ietf-oauth-identity-assertion-
        authz-grant §3.1) for the authorization server `audience`: ``typ`` oauth-id-jag+jwt, the
        person as ``sub``, the client as known there, the resource and scopes granted, the agent
        chain in ``act`` and the person's provenance (what this broker's own jwt-bearer grant
        rebuilds the person from)."""
        now = int(self._clock.now())
        jti = secrets.token_urlsafe(18)
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": provenance.person_id,
            "aud": audience,
            "client_id": client_id,
            "jti": jti,
            "iat": now,
            "exp": now + lifetime_seconds,
            "resource": resource,
            "scope": " ".join(scopes),
            "act": _nest_act(actor_chain),
            "provenance": provenance.to_claim(),
            "policy_version": policy_version,
        }
        if provenance.auth_time is not None:
            claims["auth_time"] = provenance.auth_time
        if jkt is not None:
            claims["cnf"] = {"jkt": jkt}
        key = self._keyring.active
        token = sign_claims(claims, key, {"kid": key.kid, "typ": ID_JAG_TYP})
        if len(token) > self._max_bytes:
            raise TokenTooLarge(len(token), self._max_bytes)
        return IssuedToken(
            jti=jti,
            token=token,
            expires_in=lifetime_seconds,
            scopes=scopes,
            audiences=(audience,),
            claims=claims,
        )


class BrokerTokenVerifier:
    """Verifies a token this broker issued: signature by a published key, issuer, expiry, type.

    No leeway on expiry: the broker judges its own tokens by the clock that set their ``exp``,
    so a token is accepted exactly while ``now < exp``, which is as long as its revocation entry
    lives (a leeway here would make a revoked token valid again after its ``exp``). `skew`
    tolerates replicas' clocks for ``iat``/``nbf`` only (a token another replica just issued).

    Gateways present the same agent token on many calls, so a verdict is remembered (bounded LRU,
    keyed by the SHA-256 of the token, never the token itself) until the token expires or its
    signing key stops being published; expiry and key publication are re-checked on every hit.
    Revocation, which can change at any time, is the caller's check on every call.
    """

    def __init__(
        self,
        keyring: Keyring,
        issuer: str,
        clock: Clock,
        *,
        algorithms: tuple[str, ...],
        skew: int = 0,
        max_bytes: int = MAX_TOKEN_BYTES,
        verdict_cache_size: int = 10_000,
    ) -> None:
        self._keyring = keyring
        self._issuer = issuer
        self._clock = clock
        self._skew = skew
        self._algorithms = algorithms
        self._max_bytes = max_bytes
        self._verdicts: LRUCache[bytes, tuple[BrokerToken, str]] = LRUCache(
            maxsize=verdict_cache_size
        )

    @property
    def max_bytes(self) -> int:
        """The largest token accepted: what `TokenIssuer` must never exceed."""
        return self._max_bytes

    async def verify(self, token: str) -> BrokerToken:
        if len(token) > self._max_bytes:
            raise TokenRejected("token is too large")
        digest = hashlib.sha256(token.encode()).digest()
        remembered = self._verdicts.get(digest)
        if remembered is not None:
            verified_token, kid = remembered
            if self._clock.now() < verified_token.expires_at and self._keyring.is_published(kid):
                return verified_token
            self._verdicts.pop(digest, None)
        verified_token, kid = await self._verify(token)
        self._verdicts[digest] = (verified_token, kid)
        return verified_token

    async def verify_for_accounting(self, token: str) -> BrokerToken:
        """A token this broker issued, verified in every respect but expiry (never cached):
        what usage reports for calls made before it expired are attributed from. Never a
        grant of anything."""
        verified_token, _ = await self._verify(token, check_expiry=False)
        return verified_token

    async def _verify(self, token: str, *, check_expiry: bool = True) -> tuple[BrokerToken, str]:
        try:
            verified = await verify_jwt(
                token,
                keys=self._keyring,
                issuer=self._issuer,
                audiences=None,
                algorithms=self._algorithms,
                clock=self._clock,
                leeway=self._skew,
                max_bytes=self._max_bytes,
                require=("exp", "iat", "iss", "sub", "jti", "client_id", "act", "provenance"),
                allowed_typ=(ACCESS_TOKEN_TYP,),
                check_expiry=check_expiry,
            )
        except TokenRejected as exc:
            if _claims_another_issuer(token, self._issuer):
                # The cause worth naming (a person's IdP token, say): not which check tripped.
                raise TokenRejected(NOT_ISSUED_HERE, debug=exc.reason) from None
            raise
        claims = verified.claims
        if check_expiry and self._clock.now() >= claims["exp"]:  # skew never extends expiry
            raise TokenRejected("token has expired")
        try:
            chain = actor_chain_from_claim(claims["act"])
            provenance = Provenance.from_claim(claims["provenance"])
            aud = claims.get("aud")
            audiences = (aud,) if isinstance(aud, str) else tuple(aud or ())
            scope = claims.get("scope", "")
            if not isinstance(scope, str) or not all(isinstance(a, str) for a in audiences):
                raise ValueError("malformed scope or aud")
            if claims["sub"] != provenance.person_id:
                raise ValueError("sub does not match provenance")
            for name in ("jti", "client_id", "policy_version", "parent_jti"):
                value = claims.get(name, "")
                if value is not None and (not isinstance(value, str) or len(value) > 256):
                    raise ValueError(f"{name} is not a short string")
            if not claims["jti"]:
                raise ValueError("jti is empty")
            if "approval" in claims:
                check_approval_claim(claims["approval"])
            jkt = cnf_jkt(claims)
            broker_token = BrokerToken(
                jti=claims["jti"],
                subject=str(claims["sub"]),
                client_id=claims["client_id"],
                scopes=frozenset(scope.split()),
                audiences=audiences,
                actor_chain=chain,
                provenance=provenance,
                policy_version=str(claims.get("policy_version", "")),
                issued_at=int(claims["iat"]),
                expires_at=int(claims["exp"]),
                parent_jti=claims.get("parent_jti"),
                claims=claims,
                lineage=_lineage(claims),
                jkt=jkt,
            )
            return broker_token, str(verified.header["kid"])
        except (KeyError, ValueError, TypeError) as exc:
            raise TokenRejected(
                "token issued by this broker is malformed", debug=str(exc)
            ) from None


def _strings(value: object, name: str) -> None:
    if not isinstance(value, list) or not all(isinstance(v, str) and len(v) <= 256 for v in value):
        raise ValueError(f"approval.{name} is not a list of short strings")


def check_approval_claim(approval: object) -> None:
    """The ``approval`` claim of a token issued for an approved request (OpenID CIBA): its
    shape, strictly (ValueError otherwise), so nothing downstream reads a malformed one."""
    if not isinstance(approval, Mapping):
        raise ValueError("approval is not an object")
    if not isinstance(approval.get("id"), str) or len(approval["id"]) > 64:
        raise ValueError("approval.id is not a short string")
    for name in ("approved_by", "rules", "permissions"):
        _strings(approval.get(name), name)
    approved_at = approval.get("approved_at")
    if not isinstance(approved_at, int) or isinstance(approved_at, bool):
        raise ValueError("approval.approved_at is not an integer")
    details = approval.get("authorization_details")
    if details is not None and not (
        isinstance(details, list) and all(isinstance(d, Mapping) for d in details)
    ):
        raise ValueError("approval.authorization_details is not a list of objects")
    unknown = set(approval) - {
        "id",
        "approved_by",
        "approved_at",
        "rules",
        "permissions",
        "authorization_details",
    }
    if unknown:
        raise ValueError("approval has unknown members")


def _claims_another_issuer(token: str, issuer: str) -> bool:
    """Whether a token's (unverified) payload names an issuer other than this broker: only to
    word a refusal, never to accept anything."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return False
    return isinstance(claims, dict) and claims.get("iss") != issuer

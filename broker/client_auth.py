"""Who is calling: client authentication at the token and introspection endpoints.

- ``client_secret_basic`` (RFC 6749 §2.3.1): the policy holds a salted hash or a reference
  (``env:NAME`` / ``file:/path``); compared in constant time.
- ``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9): a signed client assertion; key from the
  policy's inline JWKS or its ``jwks_uri``; ``jti`` single use within the assertion's lifetime.
- A workload identity (Kubernetes service-account token, SPIFFE JWT-SVID) as the RFC 8693
  ``actor_token``, mapped to an agent by the policy: see `WorkloadActorResolver`.

A client may allow both methods (a policy `authentication:` list), e.g. while migrating from a
secret to ``private_key_jwt``; each method presented is checked on its own.

Probing and starving (README, "Client authentication under attack"):

- Every failure is the same `invalid_client` to the caller (no client enumeration), and takes the
  same work: an unknown client id (or one without the presented method) is checked against a
  dummy hash of the policy's costliest kind (`dummy_like`), a cheaper client is padded to it, and
  an unknown assertion issuer is verified against an empty key set, failing exactly like a known
  client's assertion signed with a key it does not have. The precise cause goes to the private
  debug part and the decision log.
- scrypt runs on a bounded pool of its own (`BoundedSecretVerifier`); when it is saturated the
  answer is 503 ``temporarily_unavailable`` at once.
- Failed authentications are counted in the shared state per (claimed client id, source address)
  and per source address (`FailedAuthThrottle`); over a limit the caller gets 429 with
  ``Retry-After`` before any secret is checked. Never per client id alone: anyone could then lock
  a legitimate client out.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import httpx
import jwt
from cachetools import LRUCache, TTLCache

from broker.client_secrets import (
    BoundedSecretVerifier,
    SecretVerifier,
    SecretVerifierBusy,
    dummy_like,
    hash_cost,
)
from broker.clock import Clock
from broker.errors import InvalidClient, InvalidRequest, TemporarilyUnavailable, TooManyRequests
from broker.policy import Policy
from broker.policy.model import (
    ClientSecretBasicAuth,
    PrivateKeyJwtAuth,
    authentication_methods,
)
from broker.state import StateStore, StateUnavailable
from broker.types import Sensitive
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwks import (
    UNKNOWN_KEY_REASON,
    JwksCache,
    SigningKeyResolver,
    StaticJwks,
)
from idp_adapters.jwt_verify import unverified_claims, verify_jwt
from idp_adapters.workload import WorkloadVerifier

log = logging.getLogger(__name__)

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
MAX_ASSERTION_BYTES = 8192
ClientKind = Literal["agent", "resource_server", "gateway", "admin"]


@dataclass(frozen=True, slots=True)
class AuthenticatedClient:
    client_id: str
    kind: ClientKind
    method: Literal["client_secret_basic", "private_key_jwt", "workload_identity"]
    issued_at: float | None = None
    """When the presented credential was issued (a client assertion's or a workload token's
    ``iat``); None for a client secret or a credential without ``iat``."""


class SecretReferenceResolver:
    """Reads `env:NAME` / `file:/path` secret references, caching file reads briefly."""

    def __init__(self, *, ttl_seconds: float = 30.0) -> None:
        self._files: TTLCache[str, Sensitive | None] = TTLCache(maxsize=256, ttl=ttl_seconds)

    def resolve(self, reference: str) -> Sensitive | None:
        kind, _, target = reference.partition(":")
        if kind == "env":
            value = os.environ.get(target)
            return Sensitive(value) if value else None
        if target in self._files:
            return self._files[target]
        try:
            value = Path(target).read_text().strip()
        except OSError:
            value = ""
        resolved = Sensitive(value) if value else None
        self._files[target] = resolved
        return resolved


def _parse_basic(header: str) -> tuple[str, Sensitive]:
    scheme, _, encoded = header.partition(" ")
    if scheme.lower() != "basic" or not encoded:
        raise InvalidClient("unsupported Authorization scheme; use HTTP Basic or private_key_jwt")
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise InvalidClient("malformed HTTP Basic credentials") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not client_id:
        raise InvalidClient("malformed HTTP Basic credentials")
    # RFC 6749 §2.3.1: both parts are form-urlencoded before Basic encoding.
    return unquote(client_id), Sensitive(unquote(secret))


def source_address(
    peer: str | None,
    forwarded_for: str | None,
    trusted_proxies: Iterable[ipaddress.IPv4Network | ipaddress.IPv6Network],
) -> str:
    """The caller's address: the ASGI peer, or, when the peer is a trusted proxy, the nearest
    X-Forwarded-For entry (read from the right) that is not itself a trusted proxy. Nothing a
    caller writes in X-Forwarded-For is believed unless it came through a trusted proxy."""
    proxies = tuple(trusted_proxies)
    if not proxies:  # nothing to believe but the peer (the common case: no parsing at all)
        return (peer or "unknown")[:64]

    def parse(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        try:
            return ipaddress.ip_address(text.strip().strip("[]"))
        except ValueError:
            return None

    current = parse(peer or "")
    if current is None:
        return (peer or "unknown")[:64]
    hops = [h for h in (forwarded_for or "").split(",") if h.strip()][-32:]
    while hops and any(current in net for net in proxies):
        previous = parse(hops.pop())
        if previous is None:
            break  # a malformed hop: stop at the last address a trusted proxy vouched for
        current = previous
    return str(current)


def _claimed_basic_id(header: str) -> str | None:
    try:
        return _parse_basic(header)[0]
    except InvalidClient:
        return None


def _claimed_assertion_id(assertion: str) -> str | None:
    try:
        iss = unverified_claims(assertion, max_bytes=MAX_ASSERTION_BYTES).get("iss")
    except TokenRejected:
        return None
    return iss if isinstance(iss, str) and iss else None


@functools.lru_cache(maxsize=4096)
def _address_block(source: str) -> str:
    """What one party controls: an IPv4 address, or the /64 of an IPv6 address (a single host
    commonly holds a whole /64, so counting per IPv6 address would be no limit at all)."""
    try:
        address = ipaddress.ip_address(source)
    except ValueError:
        return source[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


class FailedAuthThrottle:
    """Counts failed client authentications in the shared state (so across replicas) per
    (claimed client id, source address) and per source address; `check` refuses with 429 and
    ``Retry-After`` while either is over its limit in the sliding window.

    Not per client id alone: an attacker could then lock any legitimate client out from
    anywhere. A legitimate client is refused only while its own address is over a limit (a
    shared NAT with an attacker, or its own mistakes). Claimed ids are hashed into the keys
    (bounded, never echoed). When the state cannot be read, `check` fails closed (503).

    The hot path: a (client id, source) pair that just authenticated successfully is not checked
    in the shared state again for `recheck_after` seconds (under a second), as revocation
    remembers "not revoked". Any failure counted by this process forgets every such pair at
    once, so a guess here is always checked; failures counted at another replica reach this one
    within `recheck_after`. Only successes are remembered, never "refused" or "cannot tell"."""

    def __init__(
        self,
        state: StateStore,
        *,
        per_client_and_source: int,
        per_source: int,
        window_seconds: float,
        clock: Clock | None = None,
        recheck_after: float = 0.5,
    ) -> None:
        if not 0 <= recheck_after < 1:
            raise ValueError("recheck_after must be under one second")
        self._state = state
        self._per_pair = per_client_and_source
        self._per_source = per_source
        self._window = window_seconds
        self._clock = clock
        self._recheck_after = recheck_after if clock is not None else 0.0
        self._clean_until: LRUCache[tuple[str | None, str], float] = LRUCache(maxsize=10_000)

    def succeeded(self, client_id: str | None, source: str) -> None:
        """`client_id` authenticated from `source`: remember it briefly (see the class)."""
        if self._recheck_after and self._clock is not None:
            self._clean_until[(client_id, source)] = self._clock.monotonic() + self._recheck_after

    def _keys(self, client_id: str | None, source: str) -> list[tuple[str, int]]:
        source = _address_block(source)
        keys = [(f"authfail:source:{source}", self._per_source)]
        if client_id is not None:
            digest = hashlib.sha256(client_id.encode("utf-8", "replace")).hexdigest()[:32]
            keys.append((f"authfail:client:{digest}:{source}", self._per_pair))
        return keys

    async def check(self, client_id: str | None, source: str) -> None:
        if self._clock is not None and self._clean_until.get((client_id, source), 0.0) > (
            self._clock.monotonic()
        ):
            return
        try:
            results = await asyncio.gather(
                *(
                    self._state.rate_limit_status(key, limit, self._window)
                    for key, limit in self._keys(client_id, source)
                )
            )
        except StateUnavailable as exc:
            raise TemporarilyUnavailable(
                "client authentication cannot be checked right now; refusing (fail closed)",
                debug=str(exc),
                reason="state_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        refused = [r for r in results if not r.allowed]
        if refused:
            retry_after = max(1, math.ceil(max(r.retry_after for r in refused)))
            raise TooManyRequests(
                f"too many failed client authentications; retry after {retry_after} s",
                reason="client_auth_throttled",
                headers={"Retry-After": str(retry_after)},
            )

    async def failed(self, client_id: str | None, source: str) -> None:
        self._clean_until.clear()  # every guess at this process is checked from now on
        try:
            for key, limit in self._keys(client_id, source):
                await self._state.rate_limit(key, limit, self._window)
        except StateUnavailable as exc:  # already refusing; the next check fails closed
            log.warning("cannot count a failed client authentication: %s", exc)


class _NoKeys:
    """The key set of a client that does not exist: no key matches, as for a known client's
    assertion signed with a key it does not have."""

    async def get_signing_key(self, kid: str | None, alg: str) -> jwt.PyJWK:
        raise TokenRejected(UNKNOWN_KEY_REASON)


_DEFAULT_ASSERTION_ALGORITHMS = tuple(
    PrivateKeyJwtAuth.model_fields["algorithms"].get_default(call_default_factory=True)
)


class ClientAuthenticator:
    def __init__(
        self,
        *,
        policy: Callable[[], Policy],
        replay: StateStore,
        clock: Clock,
        http: httpx.AsyncClient,
        assertion_audiences: frozenset[str],
        assertion_max_lifetime: int,
        leeway: int,
        secret_refs: SecretReferenceResolver | None = None,
        secrets_verifier: SecretVerifier | None = None,
        throttle: FailedAuthThrottle | None = None,
    ) -> None:
        self._policy = policy
        self._replay = replay
        self._clock = clock
        self._http = http
        self._assertion_audiences = assertion_audiences
        self._assertion_max_lifetime = assertion_max_lifetime
        self._leeway = leeway
        self._secret_refs = secret_refs or SecretReferenceResolver()
        self._verifier = secrets_verifier or BoundedSecretVerifier(
            workers=os.cpu_count() or 1, queue=64
        )
        self._throttle = throttle
        self._remote_jwks: dict[str, JwksCache] = {}
        self._static_jwks: TTLCache[tuple[str, str], StaticJwks] = TTLCache(maxsize=1024, ttl=3600)
        self._dummy: tuple[str, str | None, int] | None = None  # (policy version, hash, cost)

    def _lookup(self, client_id: str) -> tuple[ClientKind, tuple[object, ...]] | None:
        policy = self._policy()
        agent = policy.agents.get(client_id)
        if agent is not None:
            return "agent", authentication_methods(agent.spec.authentication)
        server = policy.resource_servers.get(client_id)
        if server is not None:
            return "resource_server", authentication_methods(server.authentication)
        gateway = policy.gateways.get(client_id)
        if gateway is not None:
            return "gateway", authentication_methods(gateway.authentication)
        admin = policy.admins.get(client_id)
        if admin is not None:
            return "admin", authentication_methods(admin.authentication)
        return None

    def _dummy_hash(self) -> tuple[str | None, int]:
        """A hash no secret matches, of the costliest kind the policy's clients use (None when
        no client has a secret_hash), and that cost; made once per policy version."""
        policy = self._policy()
        if self._dummy is None or self._dummy[0] != policy.version:
            specs = [
                *(a.spec.authentication for a in policy.agents.values()),
                *(r.authentication for r in policy.resource_servers.values()),
                *(g.authentication for g in policy.gateways.values()),
                *(a.authentication for a in policy.admins.values()),
            ]
            hashes = [
                m.secret_hash
                for spec in specs
                for m in authentication_methods(spec)
                if isinstance(m, ClientSecretBasicAuth) and m.secret_hash is not None
            ]
            costliest = max(hashes, key=hash_cost, default=None)
            dummy = dummy_like(costliest) if costliest is not None else None
            self._dummy = (policy.version, dummy, hash_cost(dummy) if dummy else 0)
        return self._dummy[1], self._dummy[2]

    async def authenticate(
        self, headers: Mapping[str, str], form: Mapping[str, str], *, source: str | None = None
    ) -> AuthenticatedClient | None:
        """Authenticate the caller, or return None when it presented no client credentials.
        `source` is the caller's address (see `source_address`), for the failure throttle."""
        authorization = headers.get("authorization")
        assertion = form.get("client_assertion")
        assertion_type = form.get("client_assertion_type")
        if form.get("client_secret") is not None:
            raise InvalidClient("client_secret_post is not supported; use HTTP Basic")
        if authorization and (assertion or assertion_type):
            raise InvalidRequest("use exactly one client authentication method")
        if not authorization and not assertion and not assertion_type:
            return None
        where = source or "unknown"
        if authorization:
            claimed = _claimed_basic_id(authorization)
        else:
            claimed = _claimed_assertion_id(assertion) if assertion else None
        if self._throttle is not None:
            await self._throttle.check(claimed, where)
        try:
            if authorization:
                client = await self._authenticate_basic(authorization, form.get("client_id"), where)
            elif assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
                raise InvalidClient(
                    f"client_assertion_type must be {CLIENT_ASSERTION_TYPE} with a client_assertion"
                )
            else:
                client = await self._authenticate_assertion(
                    Sensitive(assertion), form.get("client_id")
                )
        except InvalidClient:
            if self._throttle is not None:
                await self._throttle.failed(claimed, where)
            raise
        if self._throttle is not None:
            self._throttle.succeeded(claimed, where)
        return client

    # -- client_secret_basic ------------------------------------------------------------
    async def _verify_hash(self, secret: str, stored: str, source: str) -> bool:
        try:
            return await self._verifier.verify(secret, stored, source=source)
        except SecretVerifierBusy:
            raise TemporarilyUnavailable(
                "client authentication is busy; retry shortly",
                reason="secret_verifier_busy",
                headers={"Retry-After": "1"},
            ) from None

    async def _authenticate_basic(
        self, header: str, form_client_id: str | None, source: str
    ) -> AuthenticatedClient:
        client_id, secret = _parse_basic(header)
        if form_client_id is not None and form_client_id != client_id:
            raise InvalidClient("client_id does not match the authenticated client")
        found = self._lookup(client_id)
        method = next(
            (m for m in (found[1] if found else ()) if isinstance(m, ClientSecretBasicAuth)), None
        )
        dummy, dummy_cost = self._dummy_hash()
        if found is None or method is None:
            # Equal work for an id that does not exist (or has no secret): the same check as a
            # real client's, against a hash no secret matches.
            if dummy is not None:
                await self._verify_hash(secret.reveal(), dummy, source)
            else:
                hmac.compare_digest(secret.reveal().encode(), secrets.token_bytes(32))
            raise InvalidClient(
                "client authentication failed", debug=f"no client_secret_basic client {client_id!r}"
            )
        kind = found[0]
        if method.secret_hash is not None:
            ok = await self._verify_hash(secret.reveal(), method.secret_hash, source)
            own_cost = hash_cost(method.secret_hash)
        else:
            expected = self._secret_refs.resolve(method.secret_ref or "")
            ok = expected is not None and hmac.compare_digest(
                secret.reveal().encode(), expected.reveal().encode()
            )
            own_cost = 0
            if expected is None:
                log.warning("the secret reference of client %r does not resolve", client_id)
        if dummy is not None and own_cost < dummy_cost and own_cost <= 1:
            # A fast client (sha256, a reference) beside scrypt clients: pad it to their cost,
            # so timing tells apart neither fast clients from unknown ids nor any two ids.
            await self._verify_hash(secret.reveal(), dummy, source)
        if not ok:
            raise InvalidClient(
                "client authentication failed", debug=f"bad secret for {client_id!r}"
            )
        return AuthenticatedClient(client_id, kind, "client_secret_basic")

    # -- private_key_jwt -----------------------------------------------------------------
    def _keys_for(self, client_id: str, method: PrivateKeyJwtAuth) -> SigningKeyResolver:
        if method.jwks_uri is not None:
            cache = self._remote_jwks.get(method.jwks_uri)
            if cache is None:
                cache = JwksCache(
                    method.jwks_uri,
                    self._http,
                    self._clock,
                    min_refresh_interval=30.0,
                    max_age=3600.0,
                    timeout=5.0,
                )
                self._remote_jwks[method.jwks_uri] = cache
            return cache
        key = (self._policy().version, client_id)
        static = self._static_jwks.get(key)
        if static is None:
            static = StaticJwks(dict(method.jwks or {}))
            self._static_jwks[key] = static
        return static

    async def _authenticate_assertion(
        self, assertion: Sensitive, form_client_id: str | None
    ) -> AuthenticatedClient:
        raw = assertion.reveal()
        if len(raw) > MAX_ASSERTION_BYTES:
            raise InvalidClient("client_assertion is too large")
        try:
            unverified = unverified_claims(raw, max_bytes=MAX_ASSERTION_BYTES)
        except TokenRejected:
            raise InvalidClient("client_assertion is not a well-formed JWT") from None
        client_id = unverified.get("iss")
        if not isinstance(client_id, str) or not client_id:
            raise InvalidClient("client_assertion has no iss")
        if form_client_id is not None and form_client_id != client_id:
            raise InvalidClient("client_id does not match the client assertion")
        found = self._lookup(client_id)
        method = next(
            (m for m in (found[1] if found else ()) if isinstance(m, PrivateKeyJwtAuth)), None
        )
        # An unknown issuer (or a client without private_key_jwt) goes through the same
        # verification against a key set with no keys: the same checks, the same answer as a
        # known client's assertion signed with a key it does not have.
        keys: SigningKeyResolver = (
            self._keys_for(client_id, method) if method is not None else _NoKeys()
        )
        algorithms = tuple(method.algorithms) if method else _DEFAULT_ASSERTION_ALGORITHMS
        try:
            verified = await verify_jwt(
                raw,
                keys=keys,
                issuer=client_id,
                audiences=self._assertion_audiences,
                algorithms=algorithms,
                clock=self._clock,
                leeway=self._leeway,
                max_bytes=MAX_ASSERTION_BYTES,
                require=("exp", "iss", "sub", "aud", "jti"),
            )
        except TokenRejected as exc:
            debug = exc.debug if method else f"no private_key_jwt client {client_id!r}"
            raise InvalidClient(f"client assertion rejected: {exc.reason}", debug=debug) from None
        except IdentityProviderUnavailable as exc:
            raise TemporarilyUnavailable(
                f"cannot verify the client assertion: {exc.reason}", debug=exc.debug
            ) from None
        if found is None or method is None:  # unreachable: no key ever verifies
            raise InvalidClient("client authentication failed")
        kind = found[0]
        claims = verified.claims
        if claims.get("sub") != client_id:
            raise InvalidClient("client assertion sub must equal iss (the client_id)")
        now = self._clock.now()
        exp = float(claims["exp"])
        iat = claims.get("iat")
        issued = float(iat) if isinstance(iat, int | float) and not isinstance(iat, bool) else now
        if exp - issued > self._assertion_max_lifetime or exp - now > self._assertion_max_lifetime:
            raise InvalidClient(
                f"client assertion lifetime exceeds {self._assertion_max_lifetime} seconds"
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti or len(jti) > 256:
            raise InvalidClient("client assertion needs a jti")
        try:
            first_use = await self._replay.use_once(
                f"client_assertion:{client_id}:{jti}", exp - now + self._leeway
            )
        except StateUnavailable as exc:
            raise TemporarilyUnavailable(
                "cannot check client assertion replay", debug=str(exc)
            ) from None
        if not first_use:
            raise InvalidClient(
                "client assertion has already been used (jti replay)", reason="assertion_replay"
            )
        return AuthenticatedClient(
            client_id, kind, "private_key_jwt", issued_at=issued if iat is not None else None
        )

    def close(self) -> None:
        """Stop the secret-hashing threads (when this authenticator made its own pool)."""
        close = getattr(self._verifier, "close", None)
        if close is not None:
            close()


class WorkloadActorResolver:
    """Maps a verified workload JWT (the RFC 8693 actor_token) to the agent bound to it."""

    def __init__(
        self, verifiers: Mapping[str, WorkloadVerifier], policy: Callable[[], Policy]
    ) -> None:
        self._verifiers = verifiers  # keyed by exact issuer
        self._policy = policy

    async def resolve(self, actor_token: Sensitive) -> AuthenticatedClient:
        raw = actor_token.reveal()
        if len(raw) > 16384:
            raise InvalidClient("actor_token is too large")
        try:
            issuer = unverified_claims(raw, max_bytes=16384).get("iss")
        except TokenRejected:
            raise InvalidClient("actor_token is not a well-formed JWT") from None
        verifier = self._verifiers.get(issuer) if isinstance(issuer, str) else None
        if verifier is None:
            raise InvalidClient("actor_token issuer is not a trusted workload issuer")
        try:
            identity = await verifier.verify(raw)
        except TokenRejected as exc:
            raise InvalidClient(f"actor_token rejected: {exc.reason}", debug=exc.debug) from None
        except IdentityProviderUnavailable as exc:
            raise TemporarilyUnavailable(f"cannot verify actor_token: {exc.reason}") from None
        for name, agent in self._policy().agents.items():
            for binding in agent.spec.workload_identities:
                if binding.issuer == identity.issuer_name and binding.subject == identity.subject:
                    return AuthenticatedClient(
                        name, "agent", "workload_identity", issued_at=identity.issued_at
                    )
        raise InvalidClient(
            "no agent is bound to this workload identity",
            debug=f"{identity.issuer_name}:{identity.subject}",
        )

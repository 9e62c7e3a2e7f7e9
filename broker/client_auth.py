"""Who is calling: client authentication at the token and introspection endpoints.

- ``client_secret_basic`` (RFC 6749 §2.3.1): the policy holds a salted hash or a reference
  (``env:NAME`` / ``file:/path``); compared in constant time.
- ``private_key_jwt`` (RFC 7523 §2.2, OIDC Core §9): a signed client assertion; key from the
  policy's inline JWKS or its ``jwks_uri``; ``jti`` single use within the assertion's lifetime.
- A workload identity (Kubernetes service-account token, SPIFFE JWT-SVID) as the RFC 8693
  ``actor_token``, mapped to an agent by the policy: see `WorkloadActorResolver`.

Every failure is the same `invalid_client` to the caller (no client enumeration); the precise cause
goes to the private debug part and the decision log.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import unquote

import httpx
from cachetools import TTLCache

from broker.client_secrets import verify_client_secret
from broker.clock import Clock
from broker.errors import InvalidClient, InvalidRequest, TemporarilyUnavailable
from broker.policy import Policy
from broker.policy.model import ClientSecretBasicAuth, PrivateKeyJwtAuth
from broker.state import StateStore, StateUnavailable
from broker.types import Sensitive
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwks import JwksCache, SigningKeyResolver, StaticJwks
from idp_adapters.jwt_verify import unverified_claims, verify_jwt
from idp_adapters.workload import WorkloadVerifier

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
    ) -> None:
        self._policy = policy
        self._replay = replay
        self._clock = clock
        self._http = http
        self._assertion_audiences = assertion_audiences
        self._assertion_max_lifetime = assertion_max_lifetime
        self._leeway = leeway
        self._secret_refs = secret_refs or SecretReferenceResolver()
        self._remote_jwks: dict[str, JwksCache] = {}
        self._static_jwks: TTLCache[tuple[str, str], StaticJwks] = TTLCache(maxsize=1024, ttl=3600)

    def _lookup(self, client_id: str) -> tuple[ClientKind, object] | None:
        policy = self._policy()
        agent = policy.agents.get(client_id)
        if agent is not None:
            return "agent", agent.spec.authentication
        server = policy.resource_servers.get(client_id)
        if server is not None:
            return "resource_server", server.authentication
        gateway = policy.gateways.get(client_id)
        if gateway is not None:
            return "gateway", gateway.authentication
        admin = policy.admins.get(client_id)
        if admin is not None:
            return "admin", admin.authentication
        return None

    async def authenticate(
        self, headers: Mapping[str, str], form: Mapping[str, str]
    ) -> AuthenticatedClient | None:
        """Authenticate the caller, or return None when it presented no client credentials."""
        authorization = headers.get("authorization")
        assertion = form.get("client_assertion")
        assertion_type = form.get("client_assertion_type")
        if form.get("client_secret") is not None:
            raise InvalidClient("client_secret_post is not supported; use HTTP Basic")
        if authorization and (assertion or assertion_type):
            raise InvalidRequest("use exactly one client authentication method")
        if authorization:
            return await self._authenticate_basic(authorization, form.get("client_id"))
        if assertion or assertion_type:
            if assertion_type != CLIENT_ASSERTION_TYPE or not assertion:
                raise InvalidClient(
                    f"client_assertion_type must be {CLIENT_ASSERTION_TYPE} with a client_assertion"
                )
            return await self._authenticate_assertion(Sensitive(assertion), form.get("client_id"))
        return None

    # -- client_secret_basic ------------------------------------------------------------
    async def _authenticate_basic(
        self, header: str, form_client_id: str | None
    ) -> AuthenticatedClient:
        client_id, secret = _parse_basic(header)
        if form_client_id is not None and form_client_id != client_id:
            raise InvalidClient("client_id does not match the authenticated client")
        found = self._lookup(client_id)
        if found is None or not isinstance(found[1], ClientSecretBasicAuth):
            raise InvalidClient(
                "client authentication failed", debug=f"no client_secret_basic client {client_id!r}"
            )
        kind, method = found
        assert isinstance(method, ClientSecretBasicAuth)
        if method.secret_hash is not None:
            # scrypt costs tens of milliseconds by design: keep it off the event loop.
            ok = await asyncio.to_thread(verify_client_secret, secret.reveal(), method.secret_hash)
        else:
            expected = self._secret_refs.resolve(method.secret_ref or "")
            if expected is None:
                raise InvalidClient(
                    "client authentication failed",
                    debug=f"secret reference for {client_id!r} does not resolve",
                )
            ok = hmac.compare_digest(secret.reveal().encode(), expected.reveal().encode())
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
        if found is None or not isinstance(found[1], PrivateKeyJwtAuth):
            raise InvalidClient(
                "client authentication failed", debug=f"no private_key_jwt client {client_id!r}"
            )
        kind, method = found
        assert isinstance(method, PrivateKeyJwtAuth)
        try:
            verified = await verify_jwt(
                raw,
                keys=self._keys_for(client_id, method),
                issuer=client_id,
                audiences=self._assertion_audiences,
                algorithms=tuple(method.algorithms),
                clock=self._clock,
                leeway=self._leeway,
                max_bytes=MAX_ASSERTION_BYTES,
                require=("exp", "iss", "sub", "aud", "jti"),
            )
        except TokenRejected as exc:
            raise InvalidClient(
                f"client assertion rejected: {exc.reason}", debug=exc.debug
            ) from None
        except IdentityProviderUnavailable as exc:
            raise TemporarilyUnavailable(
                f"cannot verify the client assertion: {exc.reason}", debug=exc.debug
            ) from None
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

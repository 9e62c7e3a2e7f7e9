"""`ResourceServer`: verifies broker tokens at a tool (an MCP server, an API) and says who calls.

Offline by default: the broker's JWKS (cached, rotation-aware: an unknown ``kid`` refetches, at
most once per `jwks_min_refresh_interval`), the header ``typ`` ``at+jwt``, the exact issuer, this
resource's identifier among the token's audiences, ``exp`` (never extended by the clock skew,
which only forgives ``iat``/``nbf``), the ``act`` chain, the scopes a route needs, and for a token
bound to a key (``cnf.jkt``) a DPoP proof by that key for this request (RFC 9449 §7). Optionally
online too: the broker's introspection endpoint (RFC 7662) says whether the token was revoked,
remembered for `revocation_cache_seconds`.

Every refusal is a `KitError` carrying its status and ``WWW-Authenticate`` challenge; nothing the
caller sent is ever echoed into a message or a log line.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from cachetools import TTLCache

from broker import dpop
from broker.clock import Clock, SystemClock
from broker.kit._errors import (
    InsufficientScope,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    KitError,
    MissingToken,
    Unavailable,
    UseDPoPNonce,
)
from broker.tokens import actor_chain_from_claim
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwks import KEY_REQUIREMENTS, JwksCache
from idp_adapters.jwt_verify import verify_jwt

_log = logging.getLogger("broker.kit")

ACCESS_TOKEN_TYP = "at+jwt"  # noqa: S105 (a media type, not a secret)
WELL_KNOWN_PRM = "/.well-known/oauth-protected-resource"
DEFAULT_ALGORITHMS: tuple[str, ...] = tuple(KEY_REQUIREMENTS)
"""Every asymmetric JWS algorithm (the broker signs with ES256, RS256, PS256 or EdDSA)."""
REQUIRED_CLAIMS = ("exp", "iat", "iss", "sub", "jti", "client_id", "act")
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
"""RFC 6750 §2.1 ``b64token``: what a Bearer or DPoP credential may look like."""


@dataclass(frozen=True, slots=True)
class Introspection:
    """Where and as whom to ask the broker whether a token is still active (RFC 7662): the
    policy's ``resource_servers:`` entry for this service, whose ``audiences`` cover it."""

    url: str
    client_id: str
    client_secret: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, from a verified token.

    ``agent_chain`` is the broker's order (the nested ``act`` claim): the agent presenting the
    token first, the agent that first acted for the person last. ``scopes`` are the token's;
    ``approval`` the broker's approval record when a person approved this grant; ``jkt`` the
    DPoP key thumbprint for a bound token (None for a bearer token).
    """

    person: str
    agent_chain: tuple[str, ...]
    client_id: str
    scopes: frozenset[str]
    approval: Mapping[str, Any] | None
    token_id: str
    expires_at: int
    claims: Mapping[str, Any] = field(repr=False)
    jkt: str | None = None

    @property
    def agent(self) -> str:
        """The agent presenting the token (the outermost ``act``)."""
        return self.agent_chain[0]

    def has_scopes(self, scopes: Iterable[str]) -> bool:
        return set(scopes) <= self.scopes

    @classmethod
    def from_claims(cls, claims: Mapping[str, Any], *, jkt: str | None = None) -> Caller:
        """The caller described by an already verified token's claims; ValueError when the
        claims are not a broker token's."""
        sub, client_id, jti, exp = (claims.get(n) for n in ("sub", "client_id", "jti", "exp"))
        if not isinstance(sub, str) or not sub:
            raise ValueError("subject is malformed")
        if not isinstance(client_id, str) or not client_id:
            raise ValueError("client_id is malformed")
        if not isinstance(jti, str) or not jti:
            raise ValueError("jti is malformed")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise ValueError("exp is malformed")
        chain = actor_chain_from_claim(claims.get("act"))
        if not chain:
            raise ValueError("act is missing")
        scope = claims.get("scope", "")
        if not isinstance(scope, str):
            raise ValueError("scope is malformed")
        approval = claims.get("approval")
        if approval is not None and not isinstance(approval, Mapping):
            raise ValueError("approval is malformed")
        return cls(
            person=sub,
            agent_chain=chain,
            client_id=client_id,
            scopes=frozenset(scope.split()),
            approval=MappingProxyType(dict(approval)) if approval is not None else None,
            token_id=jti,
            expires_at=int(exp),
            claims=MappingProxyType(dict(claims)),
            jkt=jkt,
        )


def protected_resource_metadata_url(resource: str) -> str:
    """RFC 9728 §3.1: the well-known segment inserted between the host and the resource's path
    (``https://h/mcp`` -> ``https://h/.well-known/oauth-protected-resource/mcp``)."""
    parts = urlsplit(resource)
    path = "" if parts.path in ("", "/") else parts.path
    return urlunsplit((parts.scheme, parts.netloc, WELL_KNOWN_PRM + path, "", ""))


def _check_resource(resource: str) -> str:
    parts = urlsplit(resource)
    if parts.scheme not in ("https", "http") or not parts.netloc:
        raise ValueError("resource must be an absolute http(s) URL (RFC 8707, RFC 9728)")
    if parts.query or parts.fragment:
        raise ValueError("resource must not carry a query or fragment (RFC 9728 §2)")
    return resource


class ResourceServer:
    """Verifies broker tokens for one resource (see the module docstring).

    `issuer` is the broker's issuer URL, `resource` this service's identifier: the audience the
    broker puts in its tokens (the policy's agent ``audiences`` entry) and the ``resource`` of
    its RFC 9728 metadata. `single_audience` refuses tokens that name other audiences too (a
    token one of them could replay here). `dpop_required` refuses bearer tokens altogether.

    `dpop_verifier` defaults to a `DPoPVerifier` remembering proof ``jti``s in this process:
    a tool running several replicas passes one whose replay guard they share (any object with
    ``use_once``, e.g. the broker's state store). `introspection` (the policy's
    ``resource_servers:`` credentials) adds the revocation check. `http` is an
    ``httpx.AsyncClient`` to use (default: one of its own, closed by `aclose`).
    """

    def __init__(
        self,
        *,
        issuer: str,
        resource: str,
        jwks_uri: str | None = None,
        introspection: Introspection | tuple[str, str, str] | None = None,
        revocation_cache_seconds: float = 30.0,
        dpop_verifier: dpop.DPoPVerifier | None = None,
        dpop_required: bool = False,
        clock: Clock | None = None,
        http: httpx.AsyncClient | None = None,
        algorithms: Collection[str] = DEFAULT_ALGORITHMS,
        skew_seconds: int = 10,
        single_audience: bool = False,
        scopes_supported: Sequence[str] = (),
        resource_name: str | None = None,
        resource_documentation: str | None = None,
        jwks_min_refresh_interval: float = 10.0,
        jwks_max_age: float = 300.0,
        timeout: float = 5.0,
        max_token_bytes: int = 16 * 1024,
    ) -> None:
        unsupported = set(algorithms) - set(KEY_REQUIREMENTS)
        if unsupported:
            raise ValueError(f"not asymmetric JWS algorithms: {sorted(unsupported)}")
        self.issuer = issuer
        self.resource = _check_resource(resource)
        self.jwks_uri = jwks_uri or issuer.rstrip("/") + "/.well-known/jwks.json"
        if isinstance(introspection, tuple):
            introspection = Introspection(*introspection)
        self._introspection = introspection
        self._clock = clock or SystemClock()
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout, follow_redirects=False)
        self._timeout = timeout
        self._dpop = dpop_verifier or dpop.DPoPVerifier(clock=self._clock)
        self._dpop_required = dpop_required
        self._algorithms = frozenset(algorithms)
        self._skew = skew_seconds
        self._single_audience = single_audience
        self._scopes_supported = tuple(scopes_supported)
        self._resource_name = resource_name
        self._resource_documentation = resource_documentation
        self._max_token_bytes = max_token_bytes
        self._keys = JwksCache(
            self.jwks_uri,
            self._http,
            self._clock,
            min_refresh_interval=jwks_min_refresh_interval,
            max_age=jwks_max_age,
            timeout=timeout,
        )
        self._active: TTLCache[bytes, bool] = TTLCache(
            maxsize=50_000, ttl=revocation_cache_seconds, timer=self._clock.monotonic
        )
        self.resource_metadata_url = protected_resource_metadata_url(self.resource)

    # -- what the resource publishes ----------------------------------------------------------

    @property
    def metadata_paths(self) -> tuple[str, ...]:
        """Where adapters serve `metadata()`: the RFC 9728 §3.1 path for this resource, and the
        bare well-known path (where clients that do not insert the resource path look)."""
        path = urlsplit(self.resource_metadata_url).path
        return (path,) if path == WELL_KNOWN_PRM else (path, WELL_KNOWN_PRM)

    @property
    def dpop_algorithms(self) -> list[str]:
        return self._dpop.algorithms

    def metadata(self) -> dict[str, Any]:
        """The RFC 9728 protected resource metadata document."""
        document: dict[str, Any] = {
            "resource": self.resource,
            "authorization_servers": [self.issuer],
            "bearer_methods_supported": ["header"],
            "dpop_signing_alg_values_supported": self.dpop_algorithms,
            "dpop_bound_access_tokens_required": self._dpop_required,
        }
        if self._scopes_supported:
            document["scopes_supported"] = list(self._scopes_supported)
        if self._resource_name is not None:
            document["resource_name"] = self._resource_name
        if self._resource_documentation is not None:
            document["resource_documentation"] = self._resource_documentation
        return document

    def request_url(self, path: str) -> str:
        """The URL a client used for `path` on this resource's origin (what a DPoP proof's
        ``htu`` names): the resource identifier's scheme and host, whatever proxy is between."""
        parts = urlsplit(self.resource)
        return urlunsplit((parts.scheme, parts.netloc, path or "/", "", ""))

    def _error(self, cls: type[KitError], description: str, *, dpop_scheme: bool = False,
               **kwargs: Any) -> KitError:
        return cls(
            description,
            scheme="DPoP" if dpop_scheme or self._dpop_required else "Bearer",
            resource_metadata=self.resource_metadata_url,
            algs=self.dpop_algorithms,
            **kwargs,
        )

    def challenge(self) -> MissingToken:
        """The refusal for a request that brought no credentials (RFC 6750 §3.1)."""
        error = self._error(MissingToken, "authentication required")
        error.offer_dpop = not self._dpop_required
        assert isinstance(error, MissingToken)
        return error

    # -- verification -------------------------------------------------------------------------

    async def authenticate(
        self,
        authorization: str | None,
        dpop_headers: Sequence[str] = (),
        *,
        method: str = "GET",
        url: str | None = None,
        required_scopes: Iterable[str] = (),
    ) -> Caller:
        """Verify the request's ``Authorization`` value (``Bearer`` or ``DPoP`` scheme) and its
        ``DPoP`` header values, made for `method` on `url` (needed for bound tokens), and check
        the token holds `required_scopes`. Returns the `Caller`; raises a `KitError`."""
        scheme, token = self._credentials(authorization)
        dpop_scheme = scheme == "dpop"
        claims = await self._verify_token(token, dpop_scheme=dpop_scheme)
        try:
            jkt = dpop.cnf_jkt(claims)
        except ValueError:
            raise self._error(InvalidToken, "token key binding is malformed") from None
        if jkt is not None:
            if not dpop_scheme:
                raise self._error(
                    InvalidToken,
                    "token is bound to a DPoP key: present it with the DPoP scheme and a proof",
                    dpop_scheme=True,
                )
            await self._check_proof(token, jkt, dpop_headers, method=method, url=url)
        elif dpop_scheme:
            raise self._error(InvalidToken, "token is not bound to a DPoP key", dpop_scheme=True)
        elif self._dpop_required:
            raise self._error(InvalidToken, "this resource accepts DPoP-bound tokens only")
        try:
            caller = Caller.from_claims(claims, jkt=jkt)
        except ValueError as exc:
            _log.info("refused a broker token: %s", exc)
            raise self._error(InvalidToken, "token claims are malformed",
                              dpop_scheme=dpop_scheme) from None
        await self._check_active(token, dpop_scheme=dpop_scheme)
        self.check_scopes(caller, required_scopes)
        return caller

    async def verify_bearer(self, token: str, *, required_scopes: Iterable[str] = ()) -> Caller:
        """Verify a token presented with the Bearer scheme (no request to prove possession for:
        a DPoP-bound token is refused). What interfaces that only see the token (the MCP SDK's
        `TokenVerifier`) use."""
        return await self.authenticate(f"Bearer {token}", required_scopes=required_scopes)

    def check_scopes(self, caller: Caller, required_scopes: Iterable[str]) -> None:
        """`InsufficientScope` naming every scope needed when `caller` lacks any of them."""
        needed = tuple(dict.fromkeys(required_scopes))
        if not set(needed) <= caller.scopes:
            raise self._error(
                InsufficientScope,
                "the token lacks a scope this request needs",
                dpop_scheme=caller.jkt is not None,
                scope=needed,
            )

    def _credentials(self, authorization: str | None) -> tuple[str, str]:
        if not authorization or not authorization.strip():
            raise self.challenge()
        scheme, _, rest = authorization.strip().partition(" ")
        scheme = scheme.lower()
        if scheme not in ("bearer", "dpop"):
            raise self.challenge()  # another scheme (Basic, ...): no credentials of ours
        token = rest.strip()
        if len(token) > self._max_token_bytes:
            raise self._error(InvalidToken, "token is too large", dpop_scheme=scheme == "dpop")
        if not token or _B64TOKEN.fullmatch(token) is None:
            raise self._error(InvalidRequest, "the Authorization header is malformed",
                              dpop_scheme=scheme == "dpop")
        return scheme, token

    async def _verify_token(self, token: str, *, dpop_scheme: bool) -> dict[str, Any]:
        try:
            verified = await verify_jwt(
                token,
                keys=self._keys,
                issuer=self.issuer,
                audiences=None,
                algorithms=self._algorithms,
                clock=self._clock,
                leeway=self._skew,
                max_bytes=self._max_token_bytes,
                require=REQUIRED_CLAIMS,
                allowed_typ=(ACCESS_TOKEN_TYP,),
            )
        except TokenRejected as exc:
            _log.info("refused a token: %s", exc.reason)
            raise self._error(InvalidToken, exc.reason, dpop_scheme=dpop_scheme) from None
        except IdentityProviderUnavailable as exc:
            _log.warning("cannot verify tokens: %s", exc.debug or exc.reason)
            raise self._error(Unavailable, "the authorization server's keys are unavailable",
                              dpop_scheme=dpop_scheme) from None
        claims = verified.claims
        if self._clock.now() >= claims["exp"]:  # the skew never extends a token's life
            raise self._error(InvalidToken, "token has expired", dpop_scheme=dpop_scheme)
        aud = claims.get("aud")
        audiences = (aud,) if isinstance(aud, str) else aud
        if (
            not isinstance(audiences, list | tuple)
            or self.resource not in audiences
            or (self._single_audience and len(audiences) != 1)
        ):
            raise self._error(InvalidToken, "token was not issued for this resource",
                              dpop_scheme=dpop_scheme)
        return claims

    async def _check_proof(
        self, token: str, jkt: str, headers: Sequence[str], *, method: str, url: str | None
    ) -> None:
        if url is None:
            raise self._error(InvalidDPoPProof, "the request URL is needed to check DPoP proofs",
                              dpop_scheme=True)
        try:
            proof = dpop.one_header(headers)
            if proof is None:
                raise dpop.InvalidDPoPProof("DPoP proof is missing")
            await self._dpop.verify(proof, method=method, url=url, access_token=token, jkt=jkt)
        except dpop.UseDPoPNonce as exc:
            raise self._error(UseDPoPNonce, exc.reason, dpop_scheme=True,
                              nonce=exc.nonce) from None
        except dpop.DPoPError as exc:
            _log.info("refused a DPoP proof: %s", exc.reason)
            raise self._error(InvalidDPoPProof, exc.reason, dpop_scheme=True) from None

    async def _check_active(self, token: str, *, dpop_scheme: bool) -> None:
        if self._introspection is None:
            return
        key = hashlib.sha256(token.encode("ascii")).digest()
        active = self._active.get(key)
        if active is None:
            active = await self._introspect(token, dpop_scheme=dpop_scheme)
            self._active[key] = active
        if not active:
            raise self._error(InvalidToken, "token is no longer active", dpop_scheme=dpop_scheme)

    async def _introspect(self, token: str, *, dpop_scheme: bool) -> bool:
        config = self._introspection
        assert config is not None
        try:
            response = await self._http.post(
                config.url,
                data={"token": token, "token_type_hint": "access_token"},
                auth=(config.client_id, config.client_secret),
                headers={"Accept": "application/json"},
                timeout=self._timeout,
                follow_redirects=False,
            )
            document = response.json() if response.status_code == 200 else None
        except (httpx.HTTPError, ValueError) as exc:
            _log.warning("introspection failed: %s", type(exc).__name__)
            document = None
        else:
            if response.status_code != 200:
                _log.warning("introspection answered HTTP %d", response.status_code)
        if not isinstance(document, dict) or not isinstance(document.get("active"), bool):
            raise self._error(Unavailable, "the authorization server cannot be asked about tokens",
                              dpop_scheme=dpop_scheme)
        return document["active"]

    # -- lifecycle ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the HTTP client the server made (one passed in is the caller's to close)."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> ResourceServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"ResourceServer(issuer={self.issuer!r}, resource={self.resource!r})"

"""Agent workload identity: verification of the ``actor_token`` an agent presents.

Two kinds of issuer (`IdentityProviderConfig` in ``workload_issuers``):

kubernetes
    A projected service-account token (``serviceAccountToken`` volume or TokenRequest API).
    ``iss`` is the cluster's service-account issuer, ``aud`` must contain one of the configured
    audiences, ``exp`` and ``iat`` are required, and ``sub`` must be
    ``system:serviceaccount:<namespace>:<name>``. Keys come from the API server's OIDC discovery
    (``<issuer>/.well-known/openid-configuration``) or a configured ``jwks_uri``. Legacy
    secret-based tokens have no ``exp`` and are refused.
spiffe
    A JWT-SVID. ``sub`` must be a SPIFFE ID for a workload (``spiffe://<trust-domain>/<path>``),
    ``aud`` and ``exp`` are required. The SVID issuer must be configured to set ``iss`` (SPIRE:
    ``jwt_issuer``) because the broker routes workload tokens by exact issuer; keys come from the
    SPIRE OIDC discovery provider or a configured ``jwks_uri`` (the bundle endpoint's JWKS).

Returns a `WorkloadIdentity`; the policy layer decides which agent it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import httpx

from broker.clock import Clock
from broker.settings import IdentityProviderConfig
from idp_adapters.base import TokenRejected
from idp_adapters.discovery import signing_keys_for
from idp_adapters.jwks import SigningKeyResolver
from idp_adapters.jwt_verify import verify_jwt

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?"
_DNS_SUBDOMAIN = r"[a-z0-9](?:[-a-z0-9.]{0,251}[a-z0-9])?"
KUBERNETES_SUBJECT = re.compile(rf"system:serviceaccount:({_DNS_LABEL}):({_DNS_SUBDOMAIN})")

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
MAX_SPIFFE_ID_LENGTH = 2048

KUBERNETES_REQUIRED = ("exp", "iat", "iss", "sub", "aud")
SPIFFE_REQUIRED = ("exp", "iss", "sub", "aud")  # iat is optional in a JWT-SVID

WORKLOAD_KINDS = frozenset({"kubernetes", "spiffe"})


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    """A verified workload: which configured issuer vouched for it, its subject, and until when."""

    issuer_name: str
    subject: str
    expires_at: int
    issued_at: int | None = None
    """The token's ``iat`` (optional in a JWT-SVID)."""


def is_workload_spiffe_id(value: str) -> bool:
    """Whether `value` is a SPIFFE ID naming a workload (SPIFFE ID standard, section 2):
    ``spiffe://`` + lowercase trust domain + a non-empty path of ``[A-Za-z0-9._-]`` segments,
    none of them ``.`` or ``..``, no trailing slash, no query, fragment, port or userinfo."""
    if len(value) > MAX_SPIFFE_ID_LENGTH or not value.startswith("spiffe://"):
        return False
    rest = value.removeprefix("spiffe://")
    trust_domain, slash, path = rest.partition("/")
    if not slash or not _TRUST_DOMAIN.fullmatch(trust_domain):
        return False
    segments = path.split("/")
    return all(
        _PATH_SEGMENT.fullmatch(segment) and segment not in {".", ".."} for segment in segments
    )


class WorkloadVerifier:
    """Verifies workload JWTs from one configured workload issuer (kind kubernetes or spiffe)."""

    def __init__(
        self,
        config: IdentityProviderConfig,
        http: httpx.AsyncClient,
        clock: Clock,
        *,
        keys: SigningKeyResolver | None = None,
    ) -> None:
        if config.kind not in WORKLOAD_KINDS:
            raise ValueError(
                f"workload issuer {config.name!r}: kind must be kubernetes or spiffe, "
                f"not {config.kind!r}"
            )
        if not config.audiences:
            raise ValueError(f"workload issuer {config.name!r}: audiences are required")
        self._config = config
        self._clock = clock
        self._keys = keys if keys is not None else signing_keys_for(config, http, clock)

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def issuer(self) -> str:
        return self._config.issuer

    @property
    def kind(self) -> str:
        return self._config.kind

    async def verify(self, token: str) -> WorkloadIdentity:
        """Verify a workload token; raise `TokenRejected` or `IdentityProviderUnavailable`."""
        kubernetes = self._config.kind == "kubernetes"
        verified = await verify_jwt(
            token,
            keys=self._keys,
            issuer=self._config.issuer,
            audiences=self._config.audiences,
            algorithms=self._config.algorithms,
            clock=self._clock,
            leeway=self._config.leeway_seconds,
            max_bytes=self._config.max_token_bytes,
            require=KUBERNETES_REQUIRED if kubernetes else SPIFFE_REQUIRED,
            allowed_typ=(None, "JWT") if kubernetes else (None, "JWT", "JOSE"),
        )
        claims: dict[str, Any] = verified.claims
        subject = claims["sub"]
        if kubernetes and not KUBERNETES_SUBJECT.fullmatch(subject):
            raise TokenRejected("token subject is not a Kubernetes service account")
        if not kubernetes and not is_workload_spiffe_id(subject):
            raise TokenRejected("token subject is not a workload SPIFFE ID")
        iat = claims.get("iat")
        return WorkloadIdentity(
            issuer_name=self._config.name,
            subject=subject,
            expires_at=int(claims["exp"]),
            issued_at=int(iat)
            if isinstance(iat, int | float) and not isinstance(iat, bool)
            else None,
        )

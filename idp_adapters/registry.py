"""Building the configured identity adapters and workload verifiers, keyed by exact issuer.

People's identity providers are routed in two families, because one IdP often speaks both
protocols under one name (a Keycloak realm's OIDC ``iss`` is also its SAML entity id): JWT
subject tokens by ``iss`` among the ``oidc``/``dev`` providers, SAML assertions by ``Issuer``
among the ``saml`` ones. An issuer is unique within its family.

Kinds map to implementations:

* ``oidc`` -> `OidcAdapter`;
* ``dev``  -> `OidcAdapter` as well (the development IdP is a real OIDC issuer on loopback), but
  only when development components are explicitly allowed;
* ``saml`` -> `SamlAdapter` (SAML 2.0 assertions; needs the shared `StateStore` for replay
  protection);
* ``kubernetes``, ``spiffe`` -> `WorkloadVerifier` (workload issuers only).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import httpx

from broker.clock import Clock
from broker.settings import IdentityProviderConfig
from broker.state import StateStore
from idp_adapters.base import IdentityAdapter
from idp_adapters.oidc import OidcAdapter
from idp_adapters.saml import SamlAdapter
from idp_adapters.workload import WORKLOAD_KINDS, WorkloadVerifier


@dataclass(frozen=True)
class IdentityRoutes:
    """The adapters for people's subject tokens: `jwt` by exact ``iss``, `saml` by exact
    ``Issuer`` (entity id)."""

    jwt: Mapping[str, IdentityAdapter] = field(default_factory=dict)
    saml: Mapping[str, IdentityAdapter] = field(default_factory=dict)


def build_identity_adapters(
    configs: Iterable[IdentityProviderConfig],
    http: httpx.AsyncClient,
    clock: Clock,
    *,
    allow_development: bool,
    state: StateStore | None = None,
) -> IdentityRoutes:
    """One adapter per configured identity provider, routed by family and exact issuer.

    Raises ValueError for a ``dev`` provider without `allow_development`, a ``saml`` provider
    without `state` (its assertion IDs must be single use), a workload kind among people's
    identity providers, or two providers of one family sharing an issuer.
    """
    jwt: dict[str, IdentityAdapter] = {}
    saml: dict[str, IdentityAdapter] = {}
    for config in configs:
        if config.kind == "dev" and not allow_development:
            raise ValueError(
                f"identity provider {config.name!r} is the development IdP (kind: dev), which "
                "is refused unless allow_development_components is set; never in production"
            )
        if config.kind in WORKLOAD_KINDS:
            raise ValueError(
                f"identity provider {config.name!r}: kind {config.kind!r} belongs in "
                "workload_issuers"
            )
        family = saml if config.kind == "saml" else jwt
        if config.issuer in family:
            raise ValueError(f"identity provider {config.name!r}: issuer configured twice")
        if config.kind == "saml":
            if state is None:
                raise ValueError(
                    f"identity provider {config.name!r}: kind saml needs the shared state store "
                    "(assertion replay protection)"
                )
            saml[config.issuer] = SamlAdapter(config, state, clock)
            continue
        jwt[config.issuer] = OidcAdapter(config, http, clock)
    return IdentityRoutes(jwt=jwt, saml=saml)


def build_workload_verifiers(
    configs: Iterable[IdentityProviderConfig],
    http: httpx.AsyncClient,
    clock: Clock,
) -> dict[str, WorkloadVerifier]:
    """One verifier per configured workload issuer, keyed by its exact issuer.

    Raises ValueError for a kind other than kubernetes/spiffe or a duplicated issuer.
    """
    verifiers: dict[str, WorkloadVerifier] = {}
    for config in configs:
        if config.issuer in verifiers:
            raise ValueError(f"workload issuer {config.name!r}: issuer configured twice")
        verifiers[config.issuer] = WorkloadVerifier(config, http, clock)
    return verifiers

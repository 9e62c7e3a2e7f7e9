"""Building the configured identity adapters and workload verifiers, keyed by exact issuer.

Kinds map to implementations:

* ``oidc`` -> `OidcAdapter`;
* ``dev``  -> `OidcAdapter` as well (the development IdP is a real OIDC issuer on loopback), but
  only when development components are explicitly allowed;
* ``saml`` -> `SamlAdapter` (SAML 2.0 assertions; needs the shared `StateStore` for replay
  protection);
* ``kubernetes``, ``spiffe`` -> `WorkloadVerifier` (workload issuers only).
"""

from __future__ import annotations

from collections.abc import Iterable

import httpx

from broker.clock import Clock
from broker.settings import IdentityProviderConfig
from broker.state import StateStore
from idp_adapters.base import IdentityAdapter
from idp_adapters.oidc import OidcAdapter
from idp_adapters.saml import SamlAdapter
from idp_adapters.workload import WORKLOAD_KINDS, WorkloadVerifier


def build_identity_adapters(
    configs: Iterable[IdentityProviderConfig],
    http: httpx.AsyncClient,
    clock: Clock,
    *,
    allow_development: bool,
    state: StateStore | None = None,
) -> dict[str, IdentityAdapter]:
    """One adapter per configured identity provider, keyed by its exact issuer.

    Raises ValueError for a ``dev`` provider without `allow_development`, a ``saml`` provider
    without `state` (its assertion IDs must be single use), a workload kind among people's
    identity providers, or two providers sharing an issuer.
    """
    adapters: dict[str, IdentityAdapter] = {}
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
        if config.issuer in adapters:
            raise ValueError(f"identity provider {config.name!r}: issuer configured twice")
        if config.kind == "saml":
            if state is None:
                raise ValueError(
                    f"identity provider {config.name!r}: kind saml needs the shared state store "
                    "(assertion replay protection)"
                )
            adapters[config.issuer] = SamlAdapter(config, state, clock)
            continue
        adapters[config.issuer] = OidcAdapter(config, http, clock)
    return adapters


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

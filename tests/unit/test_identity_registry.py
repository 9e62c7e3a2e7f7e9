"""build_identity_adapters / build_workload_verifiers: kind mapping and refusals (no network)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from broker.clock import FrozenClock
from broker.settings import IdentityProviderConfig
from idp_adapters.base import IdentityAdapter
from idp_adapters.oidc import OidcAdapter
from idp_adapters.registry import build_identity_adapters, build_workload_verifiers
from idp_adapters.workload import WorkloadVerifier


def idp(name: str, issuer: str, **values: Any) -> IdentityProviderConfig:
    values.setdefault("client_ids", ["app"])
    return IdentityProviderConfig(name=name, issuer=issuer, **values)


@pytest.fixture
def http() -> Iterator[httpx.AsyncClient]:
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda r: httpx.Response(599)))
    yield client
    asyncio.run(client.aclose())


def test_adapters_keyed_by_exact_issuer(http: httpx.AsyncClient) -> None:
    configs = [
        idp("okta", "https://example.okta.com/oauth2/default", preset="okta"),
        idp("entra", "https://login.microsoftonline.com/tid/v2.0", preset="entra"),
    ]
    routes = build_identity_adapters(configs, http, FrozenClock(), allow_development=False)
    adapters = routes.jwt
    assert list(adapters) == [c.issuer for c in configs] and not routes.saml
    for config, adapter in zip(configs, adapters.values(), strict=True):
        assert isinstance(adapter, OidcAdapter)
        assert isinstance(adapter, IdentityAdapter)
        assert adapter.name == config.name
    assert adapters[configs[1].issuer].claim_mapping.subject == "oid"  # type: ignore[attr-defined]


def test_dev_kind_needs_explicit_permission(http: httpx.AsyncClient) -> None:
    dev = [idp("dev", "http://127.0.0.1:8081", kind="dev")]
    with pytest.raises(ValueError, match="development"):
        build_identity_adapters(dev, http, FrozenClock(), allow_development=False)
    adapters = build_identity_adapters(dev, http, FrozenClock(), allow_development=True).jwt
    assert isinstance(adapters["http://127.0.0.1:8081"], OidcAdapter)


def test_workload_kinds_are_not_people_idps(http: httpx.AsyncClient) -> None:
    cluster = idp("cluster", "https://k8s.example", kind="kubernetes", audiences=["broker"])
    with pytest.raises(ValueError, match="workload_issuers"):
        build_identity_adapters([cluster], http, FrozenClock(), allow_development=True)


def test_duplicate_issuers(http: httpx.AsyncClient) -> None:
    configs = [idp("a", "https://idp.example"), idp("b", "https://idp.example")]
    with pytest.raises(ValueError, match="twice"):
        build_identity_adapters(configs, http, FrozenClock(), allow_development=False)


def test_workload_verifiers(http: httpx.AsyncClient) -> None:
    configs = [
        idp("cluster", "https://k8s.example", kind="kubernetes", audiences=["broker"]),
        idp("spire", "https://spire.example", kind="spiffe", audiences=["broker"]),
    ]
    verifiers = build_workload_verifiers(configs, http, FrozenClock())
    assert {issuer: v.kind for issuer, v in verifiers.items()} == {
        "https://k8s.example": "kubernetes",
        "https://spire.example": "spiffe",
    }
    assert all(isinstance(v, WorkloadVerifier) for v in verifiers.values())

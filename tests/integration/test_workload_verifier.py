"""WorkloadVerifier (actor tokens) for kubernetes and spiffe issuers, against a loopback issuer
(the DevIdentityProvider's keys and discovery stand in for the API server / SPIRE)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from idp_adapters.base import TokenRejected
from idp_adapters.registry import build_workload_verifiers
from idp_adapters.workload import WorkloadIdentity, WorkloadVerifier, is_workload_spiffe_id

pytestmark = pytest.mark.anyio

SERVICE_ACCOUNT = "system:serviceaccount:agents:triage-bot"
SPIFFE_ID = "spiffe://example.org/ns/agents/sa/triage-bot"


def workload_claims(served: Any, subject: str, **overrides: Any) -> dict[str, Any]:
    now = int(served.clock.now())
    claims: dict[str, Any] = {
        "iss": served.issuer,
        "sub": subject,
        "aud": ["broker"],
        "iat": now,
        "nbf": now,
        "exp": now + 600,
    }
    for name, value in overrides.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


async def test_kubernetes_service_account_token(dev_idp: Any) -> None:
    config = dev_idp.config(name="cluster", kind="kubernetes", client_ids=[], audiences=["broker"])
    claims = workload_claims(
        dev_idp,
        SERVICE_ACCOUNT,
        **{"kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "triage-bot"}}},
    )
    async with httpx.AsyncClient() as http:
        verifier = WorkloadVerifier(config, http, dev_idp.clock)
        identity = await verifier.verify(dev_idp.provider.sign(claims, typ=None))
    assert identity == WorkloadIdentity(
        issuer_name="cluster",
        subject=SERVICE_ACCOUNT,
        expires_at=claims["exp"],
        issued_at=claims["iat"],  # an agent's revocation is compared with it
    )
    assert (verifier.name, verifier.issuer, verifier.kind) == (
        "cluster",
        dev_idp.issuer,
        "kubernetes",
    )
    assert dev_idp.discovery_hits == 1


@pytest.mark.parametrize(
    ("overrides", "typ", "reason"),
    [
        ({"sub": "system:serviceaccount:agents"}, None, "Kubernetes service account"),
        ({"sub": "system:serviceaccount:Agents:bot"}, None, "Kubernetes service account"),
        ({"sub": "system:serviceaccount:agents:bot:extra"}, None, "Kubernetes service account"),
        ({"sub": "system:node:worker-1"}, None, "Kubernetes service account"),
        ({"sub": SPIFFE_ID}, None, "Kubernetes service account"),
        ({"aud": ["https://kubernetes.default.svc"]}, None, "audience"),
        ({"aud": None}, None, "'aud'"),
        ({"exp": None}, None, "'exp'"),
        ({"iat": None}, None, "'iat'"),
        ({"iss": "kubernetes/serviceaccount"}, None, "issuer"),
        ({}, "at+jwt", "type"),
    ],
)
async def test_kubernetes_rejections(
    overrides: dict[str, Any], typ: str | None, reason: str, shared_dev_idp: Any
) -> None:
    config = shared_dev_idp.config(
        name="cluster", kind="kubernetes", client_ids=[], audiences=["broker"]
    )
    token = shared_dev_idp.provider.sign(
        workload_claims(shared_dev_idp, SERVICE_ACCOUNT, **overrides), typ=typ
    )
    async with httpx.AsyncClient() as http:
        verifier = WorkloadVerifier(config, http, shared_dev_idp.clock)
        with pytest.raises(TokenRejected) as info:
            await verifier.verify(token)
    assert reason in info.value.reason


async def test_spiffe_jwt_svid(dev_idp: Any) -> None:
    config = dev_idp.config(
        name="spire",
        kind="spiffe",
        client_ids=[],
        audiences=["broker"],
        jwks_uri=dev_idp.provider.jwks_uri,
    )
    claims = workload_claims(dev_idp, SPIFFE_ID, iat=None, nbf=None, aud="broker")
    async with httpx.AsyncClient() as http:
        verifier = WorkloadVerifier(config, http, dev_idp.clock)
        identity = await verifier.verify(dev_idp.provider.sign(claims, typ="JOSE"))
        assert identity.subject == SPIFFE_ID
        assert identity.issuer_name == "spire"
        with pytest.raises(TokenRejected, match="SPIFFE"):
            bad = workload_claims(dev_idp, "spiffe://example.org")
            await verifier.verify(dev_idp.provider.sign(bad))
        with pytest.raises(TokenRejected, match="'aud'"):
            await verifier.verify(
                dev_idp.provider.sign(workload_claims(dev_idp, SPIFFE_ID, aud=None))
            )
    assert dev_idp.discovery_hits == 0  # configured jwks_uri: no discovery


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (SPIFFE_ID, True),
        ("spiffe://example.org/a", True),
        ("spiffe://my-domain.example_1.org/a.b/c-d/e_f", True),
        ("spiffe://example.org", False),
        ("spiffe://example.org/", False),
        ("spiffe://example.org/a/", False),
        ("spiffe://example.org//a", False),
        ("spiffe://example.org/a/../b", False),
        ("spiffe://example.org/./a", False),
        ("spiffe://Example.org/a", False),
        ("spiffe://example.org:8443/a", False),
        ("spiffe://user@example.org/a", False),
        ("spiffe://example.org/a?x=1", False),
        ("spiffe://example.org/a#f", False),
        ("spiffe://example.org/a%20b", False),
        ("SPIFFE://example.org/a", False),
        ("https://example.org/a", False),
        ("spiffe:///a", False),
        ("spiffe://example.org/" + "a" * 2100, False),
    ],
)
def test_spiffe_id_syntax(value: str, ok: bool) -> None:
    assert is_workload_spiffe_id(value) is ok


async def test_verifier_configuration_errors(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="kubernetes or spiffe"):
            WorkloadVerifier(dev_idp.config(), http, dev_idp.clock)
        with pytest.raises(ValueError, match="audiences"):
            WorkloadVerifier(dev_idp.config(kind="spiffe", audiences=[]), http, dev_idp.clock)
        cluster = dev_idp.config(name="cluster", kind="kubernetes", client_ids=[])
        verifiers = build_workload_verifiers([cluster], http, dev_idp.clock)
        assert list(verifiers) == [dev_idp.issuer]
        with pytest.raises(ValueError, match="twice"):
            build_workload_verifiers([cluster, cluster], http, dev_idp.clock)
        with pytest.raises(ValueError, match="kubernetes or spiffe"):
            build_workload_verifiers([dev_idp.config(kind="oidc")], http, dev_idp.clock)

"""Group paths mean the same whichever protocol signed the person in: a Keycloak-shaped OIDC ID
token (verified by the OIDC adapter) and a SAML assertion signed by a real pysaml2 IdP (verified by
the SAML adapter) asserting the same groups lead to the same decisions, under one policy entry
naming both IdPs."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.clock import SystemClock
from broker.policy import Decision, ExchangeRequest, Person, decide, load_policy
from broker.settings import IdentityProviderConfig
from broker.state import InMemoryStateStore
from broker.types import Principal, Provenance, TokenType
from idp_adapters.jwks import StaticJwks
from idp_adapters.oidc import OidcAdapter
from idp_adapters.saml import SamlAdapter
from tests.support.jose import public_jwk
from tests.support.saml_idp import (
    ACS_URL,
    IDP_ENTITY_ID,
    SP_ENTITY_ID,
    SamlTestIdp,
    assertion_token,
    make_key_pair,
)

OIDC_ISSUER = "https://keycloak.example/realms/corp"
POLICY = """
roles:
  support: {permissions: [tickets:read]}
  lead: {permissions: [tickets:write]}
group_bindings:
  - {idp: [kc, kc-saml], group: /org/support, roles: [support]}
  - {idp: [kc, kc-saml], group: org/support/leads, roles: [lead]}
agents:
  triage:
    authentication: {method: client_secret_basic, secret_ref: "env:X"}
    ceiling: [tickets:read, tickets:write]
    audiences: [tickets]
    act_for: ["group:kc,kc-saml/org/support"]
"""


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> SamlTestIdp:
    return SamlTestIdp(make_key_pair(tmp_path_factory.mktemp("saml-idp"), "idp"))


async def _over_oidc(groups: list[str]) -> Principal:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    token = jwt.encode(
        {
            "iss": OIDC_ISSUER,
            "aud": "broker",
            "sub": "alice",
            "iat": now,
            "exp": now + 300,
            "groups": groups,
            "realm_access": {"roles": ["offline_access"]},
        },
        key,
        algorithm="RS256",
        headers={"kid": "k1"},
    )
    config = IdentityProviderConfig(
        name="kc", issuer=OIDC_ISSUER, client_ids=["broker"], preset="keycloak"
    )
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(
            config, http, SystemClock(), keys=StaticJwks({"keys": [public_jwk(key, "k1")]})
        )
        return await adapter.authenticate(token, TokenType.ID_TOKEN)


async def _over_saml(idp: SamlTestIdp, groups: list[str]) -> Principal:
    clock = SystemClock()
    config = IdentityProviderConfig(
        name="kc-saml",
        kind="saml",
        issuer=IDP_ENTITY_ID,
        sp_entity_id=SP_ENTITY_ID,
        acs_url=ACS_URL,
        idp_certificate_ref=f"file:{idp.keys.cert_file}",
    )
    adapter = SamlAdapter(config, InMemoryStateStore(clock), clock)
    token = assertion_token(idp.response("alice", {"groups": groups}))
    return await adapter.authenticate(token, TokenType.SAML2)


def _decisions(policy: Any, principal: Principal) -> list[Decision]:
    person = Person.of(Provenance.from_principal(principal))
    return [
        decide(policy, ExchangeRequest(person, "triage", scopes, ("tickets",)))
        for scopes in (("tickets:read",), ("tickets:write",), ("tickets:read", "tickets:write"))
    ]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("oidc_groups", "saml_groups"),
    [
        # Keycloak sends full paths over OIDC; its SAML mapper with "full path" on does too.
        (["/org/support", "/org/support/leads"], ["/org/support", "/org/support/leads"]),
        # A SAML mapper (or another IdP) that sends the path without its leading '/'.
        (["/org/support", "/org/support/leads"], ["org/support", "org/support/leads"]),
        (["/org/support"], ["org/support"]),
    ],
)
async def test_oidc_and_saml_give_the_same_decisions(
    tmp_path: Path, idp: SamlTestIdp, oidc_groups: list[str], saml_groups: list[str]
) -> None:
    (tmp_path / "policy.yaml").write_text(textwrap.dedent(POLICY))
    policy = load_policy(tmp_path).policy
    oidc = await _over_oidc(oidc_groups)
    saml = await _over_saml(idp, saml_groups)
    assert oidc.groups == saml.groups == {g.lstrip("/") for g in oidc_groups}
    assert oidc.idp_roles == {"offline_access"} and saml.idp_roles == frozenset()

    over_oidc, over_saml = _decisions(policy, oidc), _decisions(policy, saml)
    assert [d.allowed for d in over_oidc] == [d.allowed for d in over_saml]
    assert [d.scopes for d in over_oidc] == [d.scopes for d in over_saml]
    assert [d.reasons for d in over_oidc] == [d.reasons for d in over_saml]
    assert over_oidc[0].allowed  # the group binding and act_for hold over both
    assert over_oidc[1].allowed == ("/org/support/leads" in oidc_groups)

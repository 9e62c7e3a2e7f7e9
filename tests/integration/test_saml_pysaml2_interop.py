"""Interop: SAML 2.0 assertions issued and signed by pysaml2 (an IdP implementation nobody here
wrote, signing with the xmlsec1 command; RSA-SHA256) are verified by the broker's python3-saml
based adapter, as a bare base64url assertion (RFC 7522 style) and as a base64 ``samlp:Response``,
directly and end to end through the token endpoint."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest
from lxml import etree

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.clock import SystemClock
from broker.settings import IdentityProviderConfig
from broker.state import InMemoryStateStore
from broker.types import TokenType
from idp_adapters.saml import (
    MS_CLAIMS,
    OID_EPPN,
    XMLSOAP_CLAIMS,
    SamlAdapter,
)
from tests.support.harness import TICKETS, RunningBroker, exchange_form, run_broker
from tests.support.saml_idp import (
    ACS_URL,
    ASSERTION,
    IDP_ENTITY_ID,
    NS_SAML,
    SP_ENTITY_ID,
    SamlTestIdp,
    assertion_token,
    make_key_pair,
    response_token,
    set_attribute,
)

SECRET = generate_client_secret()
ADMIN = ("saml-admin", generate_client_secret())
SAML2 = str(TokenType.SAML2)
TRANSIENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
IDENTITY = {"groups": ["support", "oncall"], "email": ["alice@example.com"]}


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> SamlTestIdp:
    return SamlTestIdp(make_key_pair(tmp_path_factory.mktemp("saml-idp"), "idp"))


def provider_config(idp: SamlTestIdp, **overrides: Any) -> dict[str, Any]:
    return {
        "name": "corp-saml",
        "kind": "saml",
        "issuer": IDP_ENTITY_ID,
        "sp_entity_id": SP_ENTITY_ID,
        "acs_url": ACS_URL,
        "idp_certificate_ref": f"file:{idp.keys.cert_file}",
        **overrides,
    }


def adapter(idp: SamlTestIdp, **overrides: Any) -> SamlAdapter:
    clock = SystemClock()
    config = IdentityProviderConfig(**provider_config(idp, **overrides))
    return SamlAdapter(config, InMemoryStateStore(clock), clock)


def _time(root: etree._Element, path: str, attribute: str) -> int:
    element = root.find(ASSERTION).find(path, namespaces={"saml": NS_SAML})
    value = element.get(attribute)
    return int(datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp())


@pytest.mark.anyio
@pytest.mark.parametrize("form", ["assertion", "response", "response-signed-twice"])
async def test_pysaml2_signed_messages_are_verified(idp: SamlTestIdp, form: str) -> None:
    xml = idp.response("alice", IDENTITY, sign_response=form == "response-signed-twice")
    token = assertion_token(xml) if form == "assertion" else response_token(xml)
    root = etree.fromstring(xml.encode())

    principal = await adapter(idp).authenticate(token, TokenType.SAML2)

    assert principal.idp == "corp-saml"
    assert principal.subject == "alice"
    assert principal.groups == frozenset({"support", "oncall"})
    assert principal.token_type is TokenType.SAML2
    assert principal.auth_time == _time(root, "saml:AuthnStatement", "AuthnInstant")
    assert principal.expires_at == _time(root, "saml:Conditions", "NotOnOrAfter")
    assert abs(principal.expires_at - (time.time() + 300)) < 30


@pytest.mark.anyio
async def test_the_bare_assertion_is_base64url_and_the_response_standard_base64(
    idp: SamlTestIdp,
) -> None:
    xml = idp.response("alice", IDENTITY)
    bare = assertion_token(xml)
    assert "+" not in bare and "/" not in bare and not bare.endswith("=")
    wrapped = response_token(xml)
    assert set(wrapped) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
    wrapped_lines = "\n".join(wrapped[i : i + 76] for i in range(0, len(wrapped), 76))
    principal = await adapter(idp).authenticate(wrapped_lines, TokenType.SAML2)
    assert principal.subject == "alice"


@pytest.mark.anyio
async def test_session_not_on_or_after_caps_the_session(idp: SamlTestIdp) -> None:
    soon = (datetime.now(UTC) + timedelta(seconds=120)).strftime("%Y-%m-%dT%H:%M:%SZ")
    root = idp.signed(edit=set_attribute("saml:AuthnStatement", "SessionNotOnOrAfter", soon))
    principal = await adapter(idp).authenticate(assertion_token(root), TokenType.SAML2)
    expected = datetime.strptime(soon, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert principal.expires_at == int(expected.timestamp())


@pytest.mark.anyio
async def test_shibboleth_preset_reads_eduperson_attributes(idp: SamlTestIdp) -> None:
    """pysaml2 names these attributes by their OIDs, as a Shibboleth IdP does; the NameID is
    transient, so the subject is eduPersonPrincipalName."""
    identity = {
        "eduPersonPrincipalName": ["alice@uni.example"],
        "mail": ["alice.liddell@uni.example"],
        "isMemberOf": ["support", "staff"],
        "displayName": ["Alice Liddell"],
    }
    xml = idp.response("AAdzZWNyZXQx", identity, name_id_format=TRANSIENT)
    assert OID_EPPN in xml
    principal = await adapter(idp, saml_preset="shibboleth").authenticate(
        response_token(xml), TokenType.SAML2
    )
    assert principal.subject == "alice@uni.example"
    assert principal.groups == frozenset({"support", "staff"})
    assert dict(principal.attributes) == {
        "email": "alice.liddell@uni.example",
        "name": "Alice Liddell",
    }


@pytest.mark.anyio
async def test_adfs_preset_reads_microsoft_claim_types(idp: SamlTestIdp) -> None:
    identity = {
        f"{MS_CLAIMS}/groups": ["S-1-5-21-support"],
        f"{MS_CLAIMS}/role": ["Support.Agent"],
        f"{XMLSOAP_CLAIMS}/upn": ["alice@corp.example"],
        "http://schemas.microsoft.com/identity/claims/displayname": ["Alice"],
    }
    principal = await adapter(idp, saml_preset="adfs").authenticate(
        assertion_token(idp.response("alice@corp.example", identity)), TokenType.SAML2
    )
    assert principal.subject == "alice@corp.example"
    assert principal.groups == frozenset({"S-1-5-21-support"})  # a role is not a group
    assert principal.idp_roles == frozenset({"Support.Agent"})
    assert dict(principal.attributes) == {"email": "alice@corp.example", "name": "Alice"}


@pytest.mark.anyio
async def test_okta_preset_and_claim_overrides(idp: SamlTestIdp) -> None:
    identity = {"groups": ["Everyone", "support"], "email": ["alice@okta.example"]}
    xml = idp.response("00u1alice", identity)
    principal = await adapter(idp, saml_preset="okta").authenticate(
        assertion_token(xml), TokenType.SAML2
    )
    assert (principal.subject, principal.groups) == ("00u1alice", frozenset(identity["groups"]))
    # claims.* override the preset: the subject from an attribute, groups from another
    identity = {"staffId": ["E1234"], "teams": ["support"], "groups": ["Everyone"]}
    principal = await adapter(
        idp, saml_preset="okta", claims={"subject": "staffId", "groups": ["teams"]}
    ).authenticate(assertion_token(idp.response("00u1alice", identity)), TokenType.SAML2)
    assert principal.subject == "E1234" and principal.groups == frozenset({"support"})


# --- end to end through the token endpoint ----------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, idp: SamlTestIdp) -> Iterator[RunningBroker]:
    policy_extra = {
        "group_bindings": [{"idp": "corp-saml", "group": "support", "roles": ["support"]}],
        "agents": {
            "saml-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRET),
                },
                "ceiling": ["tickets:read"],
                "audiences": [TICKETS],
                "act_for": ["group:corp-saml/support"],
            }
        },
        "admins": {
            ADMIN[0]: {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(ADMIN[1], method="sha256"),
                },
                "permissions": ["revocations:write"],
            }
        },
    }
    with run_broker(
        tmp_path_factory.mktemp("saml-broker"), [provider_config(idp)], policy_extra=policy_extra
    ) as running:
        yield running


@pytest.mark.parametrize("form", ["assertion", "response"])
def test_exchange_over_http(broker: RunningBroker, idp: SamlTestIdp, form: str) -> None:
    xml = idp.response("alice", IDENTITY)
    token = assertion_token(xml) if form == "assertion" else response_token(xml)
    not_on_or_after = _time(etree.fromstring(xml.encode()), "saml:Conditions", "NotOnOrAfter")

    response = httpx.post(
        broker.token_endpoint,
        data=exchange_form(token, SAML2, scope="tickets:read", audience=TICKETS),
        auth=("saml-agent", SECRET),
        timeout=10,
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["scope"] == "tickets:read"
    claims = jwt.decode(body["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "corp-saml/alice"
    assert claims["act"] == {"sub": "saml-agent"}
    assert claims["provenance"]["idp"] == "corp-saml"
    assert claims["provenance"]["sub"] == "alice"
    assert claims["provenance"]["token_type"] == SAML2
    # Only the groups the policy uses ("oncall" is bound to nothing, named by no act_for).
    assert claims["provenance"]["groups"] == ["support"]
    assert claims["provenance"]["session_exp"] <= not_on_or_after
    assert claims["exp"] <= not_on_or_after  # never outlives the assertion
    record = broker.decisions.records[-1]
    assert record["outcome"] == "granted" and record["person"] == "corp-saml/alice"


def test_a_person_outside_act_for_is_not_served(broker: RunningBroker, idp: SamlTestIdp) -> None:
    token = assertion_token(idp.response("erin", {"groups": ["contractors"]}))
    response = httpx.post(
        broker.token_endpoint,
        data=exchange_form(token, SAML2, scope="tickets:read", audience=TICKETS),
        auth=("saml-agent", SECRET),
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"] in {"unauthorized_client", "invalid_scope"}


def test_a_saml_token_presented_as_an_id_token_is_not_a_jwt(
    broker: RunningBroker, idp: SamlTestIdp
) -> None:
    token = assertion_token(idp.response("alice", IDENTITY))
    response = httpx.post(
        broker.token_endpoint,
        data=exchange_form(token, scope="tickets:read", audience=TICKETS),
        auth=("saml-agent", SECRET),
        timeout=10,
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"


def test_a_revoked_persons_saml_assertion_cannot_be_exchanged(
    broker: RunningBroker, idp: SamlTestIdp
) -> None:
    """Revoking a person refuses their SAML assertions signed in before the revocation (its
    AuthnInstant), still inside their validity; a sign-in after it is served."""

    def exchange(xml: str) -> httpx.Response:
        return httpx.post(
            broker.token_endpoint,
            data=exchange_form(assertion_token(xml), SAML2, scope="tickets:read", audience=TICKETS),
            auth=("saml-agent", SECRET),
            timeout=10,
        )

    before = idp.response("frank", {"groups": ["support"]})  # signed in, not yet used
    time.sleep(1.1)  # SAML instants have one-second resolution
    revoked = httpx.post(
        f"{broker.url}/v1/admin/revocations", json={"person": "corp-saml/frank"}, auth=ADMIN
    )
    assert revoked.status_code == 200, revoked.text
    refused = exchange(before)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"] == "invalid_grant"
    record = broker.decisions.records[-1]
    assert record["reason"] == "subject_revoked" and record["person"] == "corp-saml/frank"
    time.sleep(1.1)
    assert exchange(idp.response("frank", {"groups": ["support"]})).status_code == 200
    # Somebody else is not touched by frank's revocation.
    assert exchange(idp.response("alice", IDENTITY)).status_code == 200

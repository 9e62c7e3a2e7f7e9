"""Hostile SAML subject tokens: each is refused with `TokenRejected` by the adapter and with
``invalid_grant`` (never a 500) by the real token endpoint, without echoing the token.

Every hostile token is derived from a genuinely signed pysaml2 message; where there is one, the
untouched original is checked to be accepted, so a refusal is never a broken test fixture.
"""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
from lxml import etree

from broker.client_secrets import hash_client_secret
from broker.clock import SystemClock
from broker.settings import IdentityProviderConfig
from broker.state import InMemoryStateStore
from broker.types import TokenType
from idp_adapters.base import TokenRejected
from idp_adapters.saml import SamlAdapter
from tests.support.harness import TICKETS, RunningBroker, exchange_form, run_broker
from tests.support.saml_idp import (
    ACS_URL,
    IDP_ENTITY_ID,
    NAME_ID,
    RSA_SHA1,
    RSA_SHA256,
    SHA1,
    SIGNATURE,
    SP_ENTITY_ID,
    SUBJECT,
    XSW,
    SamlTestIdp,
    assertion_element,
    assertion_token,
    bare_advice_wrapping,
    bare_object_wrapping,
    inject_comment_in_name_id,
    make_key_pair,
    response_token,
    set_attribute,
    set_issuer,
    set_text,
    shift_times,
    xml_token,
)

SAML2 = str(TokenType.SAML2)
SECRET = "saml-agent-secret-for-hostile-tests-0123456789"
IDP_NAME = "corp-saml"
POLICY = {
    "group_bindings": [{"idp": IDP_NAME, "group": "support", "roles": ["support"]}],
    "agents": {
        "saml-agent": {
            "authentication": {
                "method": "client_secret_basic",
                "secret_hash": hash_client_secret(SECRET),
            },
            "ceiling": ["tickets:read"],
            "audiences": [TICKETS],
            "act_for": [f"group:{IDP_NAME}/support"],
        }
    },
}


@dataclass(frozen=True)
class Idps:
    genuine: SamlTestIdp
    attacker: SamlTestIdp
    """Same entity id, its own key: what an attacker without the IdP's key can sign."""


@pytest.fixture(scope="module")
def idps(tmp_path_factory: pytest.TempPathFactory) -> Idps:
    directory = tmp_path_factory.mktemp("saml-keys")
    return Idps(
        SamlTestIdp(make_key_pair(directory, "idp")),
        SamlTestIdp(make_key_pair(directory, "attacker")),
    )


def provider_config(idps: Idps) -> dict[str, Any]:
    return {
        "name": IDP_NAME,
        "kind": "saml",
        "issuer": IDP_ENTITY_ID,
        "sp_entity_id": SP_ENTITY_ID,
        "acs_url": ACS_URL,
        "idp_certificate_ref": f"file:{idps.genuine.keys.cert_file}",
    }


def adapter(idps: Idps) -> SamlAdapter:
    """A fresh adapter (and replay store) per use."""
    clock = SystemClock()
    return SamlAdapter(
        IdentityProviderConfig(**provider_config(idps)), InMemoryStateStore(clock), clock
    )


# --- the catalogue ----------------------------------------------------------------------------

Built = tuple[str, str | None]
"""(hostile token, the genuine token it was derived from, when there is one)"""


def _xsw(name: str) -> Callable[[Idps], Built]:
    def build(idps: Idps) -> Built:
        # XSW1-2 wrap the Response signature, so those responses are signed at both levels.
        root = idps.genuine.signed(sign_response=name in {"xsw1", "xsw2"})
        original = response_token(root)
        XSW[name](root)
        return response_token(root), original

    return build


def _bare(wrap: Callable[[etree._Element], etree._Element]) -> Callable[[Idps], Built]:
    def build(idps: Idps) -> Built:
        assertion = assertion_element(idps.genuine.signed())
        return assertion_token(wrap(copy.deepcopy(assertion))), assertion_token(assertion)

    return build


def _signature_removed(idps: Idps) -> Built:
    assertion = assertion_element(idps.genuine.signed())
    original = assertion_token(assertion)
    assertion.remove(assertion.find(SIGNATURE))
    return assertion_token(assertion), original


def _tampered(idps: Idps) -> Built:
    assertion = assertion_element(idps.genuine.signed())
    original = assertion_token(assertion)
    assertion.find(f"{SUBJECT}/{NAME_ID}").text = "admin"
    return assertion_token(assertion), original


def _second_assertion(idps: Idps) -> Built:
    root = idps.genuine.signed()
    original = response_token(root)
    other = assertion_element(idps.genuine.signed("admin", {"groups": ["admins"]}))
    root.append(other)
    return response_token(root), original


def _doctype_wrapped(idps: Idps, doctype: str, reference: str) -> Built:
    """A genuinely signed assertion behind a DTD, with the entity used in its NameID."""
    assertion = assertion_element(idps.genuine.signed())
    original = assertion_token(assertion)
    xml = etree.tostring(assertion).decode()
    marker = "alice</"
    assert marker in xml
    xml = xml.replace(marker, f"alice{reference}</", 1)
    return xml_token(f'<?xml version="1.0"?>\n{doctype}\n{xml}'), original


def _xxe(idps: Idps) -> Built:
    return _doctype_wrapped(
        idps,
        '<!DOCTYPE foo [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>',
        "&xxe;",
    )


def _billion_laughs(idps: Idps) -> Built:
    entities = ['<!ENTITY lol0 "lol">'] + [
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    ]
    return _doctype_wrapped(idps, f"<!DOCTYPE lolz [{''.join(entities)}]>", "&lol9;")


def _response_xxe(idps: Idps) -> Built:
    xml = etree.tostring(idps.genuine.signed()).decode()
    doctype = '<!DOCTYPE r [<!ENTITY xxe SYSTEM "http://127.0.0.1:1/steal">]>'
    xml = xml.replace("alice</", "alice&xxe;</", 1)
    hostile = base64.b64encode(f"{doctype}{xml}".encode()).decode()
    return hostile, None


def _signed(*, attacker: bool = False, **kwargs: Any) -> Callable[[Idps], Built]:
    """A bare assertion pysaml2 signed after an edit (with the attacker's key and certificate
    when `attacker`)."""

    def build(idps: Idps) -> Built:
        signer = idps.attacker.keys if attacker else None
        return assertion_token(idps.genuine.signed(signer=signer, **kwargs)), None

    return build


def _response(*, attacker: bool = False, **kwargs: Any) -> Callable[[Idps], Built]:
    """A Response (base64) pysaml2 signed after an edit."""

    def build(idps: Idps) -> Built:
        signer = idps.attacker.keys if attacker else None
        return response_token(idps.genuine.signed(signer=signer, **kwargs)), None

    return build


def _unsigned_response_from_pysaml2(idps: Idps) -> Built:
    return response_token(idps.genuine.response(sign_assertion=False, sign_response=True)), None


def _unsigned_assertion(idps: Idps) -> Built:
    return assertion_token(idps.genuine.response(sign_assertion=False)), None


HOSTILE: dict[str, Callable[[Idps], Built]] = {
    **{name: _xsw(name) for name in XSW},
    "xsw-bare-assertion-in-signature-object": _bare(bare_object_wrapping),
    "xsw-bare-assertion-in-advice": _bare(bare_advice_wrapping),
    "unsigned-assertion": _unsigned_assertion,
    "signed-response-unsigned-assertion": _unsigned_response_from_pysaml2,
    "signature-removed": _signature_removed,
    "content-changed-after-signing": _tampered,
    "second-assertion": _second_assertion,
    "attacker-key-with-its-certificate-in-keyinfo": _signed(attacker=True),
    "attacker-signed-response-and-assertion": _response(attacker=True, sign_response=True),
    "sha1-signature-and-digest": _signed(sign_alg=RSA_SHA1, digest_alg=SHA1),
    "sha1-digest": _signed(sign_alg=RSA_SHA256, digest_alg=SHA1),
    "xxe-external-entity": _xxe,
    "billion-laughs": _billion_laughs,
    "xxe-in-response": _response_xxe,
    "expired": _signed(edit=shift_times(-900)),
    "not-yet-valid": _signed(edit=shift_times(900)),
    "wrong-audience": _signed(
        edit=set_text("saml:Conditions/saml:AudienceRestriction/saml:Audience", "https://other.sp")
    ),
    "wrong-recipient": _signed(
        edit=set_attribute(
            "saml:Subject/saml:SubjectConfirmation/saml:SubjectConfirmationData",
            "Recipient",
            "https://other.sp/acs",
        )
    ),
    "wrong-destination": _response(edit=lambda root: root.set("Destination", "https://x/acs")),
    "wrong-issuer": _signed(edit=set_issuer("https://evil.example/idp")),
    "issuer-with-trailing-slash": _signed(edit=set_issuer(IDP_ENTITY_ID + "/")),
    "session-expired": _signed(
        edit=set_attribute("saml:AuthnStatement", "SessionNotOnOrAfter", "2001-01-01T00:00:00Z")
    ),
    "not-base64": lambda idps: ("%%% not base64 %%%", None),
    "not-xml": lambda idps: (xml_token("this is not XML"), None),
    "utf16-xml": lambda idps: (
        xml_token(etree.tostring(assertion_element(idps.genuine.signed()), encoding="utf-16")),
        None,
    ),
}


@pytest.fixture(scope="module")
def catalogue(idps: Idps) -> dict[str, Built]:
    return {name: build(idps) for name, build in HOSTILE.items()}


# --- adapter level ----------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_adapter_refuses(name: str, idps: Idps, catalogue: dict[str, Built]) -> None:
    hostile, original = catalogue[name]
    if original is not None:  # the control: what it was built from is acceptable
        principal = await adapter(idps).authenticate(original, TokenType.SAML2)
        assert principal.subject == "alice"
    with pytest.raises(TokenRejected) as caught:
        await adapter(idps).authenticate(hostile, TokenType.SAML2)
    reason = caught.value.reason
    assert reason and "alice" not in reason and "admin" not in reason
    assert hostile[:40] not in reason


PARSE_LEVEL = frozenset(
    {"xxe-external-entity", "billion-laughs", "xxe-in-response", "not-base64", "not-xml"}
    | {"utf16-xml"}
)
"""Refused before any XML reaches python3-saml or xmlsec."""


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(set(HOSTILE) - PARSE_LEVEL))
async def test_python3_saml_alone_refuses(
    name: str, idps: Idps, catalogue: dict[str, Built]
) -> None:
    """python3-saml, which runs first, refuses each of these by itself."""
    with pytest.raises(TokenRejected) as caught:
        await adapter(idps).authenticate(catalogue[name][0], TokenType.SAML2)
    assert (caught.value.debug or "").startswith("python3-saml"), caught.value.debug


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(HOSTILE))
async def test_the_brokers_own_checks_alone_refuse(
    name: str, idps: Idps, catalogue: dict[str, Built], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: with python3-saml's validation switched off, the broker's own
    structure, signature and condition checks still refuse every hostile token (and accept the
    genuine originals)."""
    monkeypatch.setattr(SamlAdapter, "_python3_saml", lambda self, root: None)
    hostile, original = catalogue[name]
    if original is not None:
        assert (await adapter(idps).authenticate(original, TokenType.SAML2)).subject == "alice"
    with pytest.raises(TokenRejected) as caught:
        await adapter(idps).authenticate(hostile, TokenType.SAML2)
    assert not (caught.value.debug or "").startswith("python3-saml")


@pytest.mark.anyio
async def test_xsw_refusals_name_the_defence(idps: Idps, catalogue: dict[str, Built]) -> None:
    """Every wrapping variant fails on structure or signature, never on something incidental."""
    for name in (*XSW, "xsw-bare-assertion-in-signature-object", "xsw-bare-assertion-in-advice"):
        with pytest.raises(TokenRejected) as caught:
            await adapter(idps).authenticate(catalogue[name][0], TokenType.SAML2)
        assert any(
            word in caught.value.reason
            for word in ("exactly one assertion", "signature", "signed", "schema-valid", "ID")
        ), (name, caught.value.reason)


@pytest.mark.anyio
async def test_comment_in_name_id_never_truncates_the_subject(idps: Idps) -> None:
    """The IdP signed ``alice@example.com.evil.com``; a comment inserted after signing (the
    exclusive C14N digest ignores comments) must not turn it into ``alice@example.com``."""
    root = idps.genuine.signed("alice@example.com.evil.com")
    assertion = assertion_element(root)
    inject_comment_in_name_id(assertion, len("alice@example.com"))
    token = assertion_token(assertion)
    assert b"<!---->" in base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    try:
        principal = await adapter(idps).authenticate(token, TokenType.SAML2)
    except TokenRejected:
        return
    assert principal.subject == "alice@example.com.evil.com"


@pytest.mark.anyio
async def test_the_same_assertion_is_accepted_once(idps: Idps) -> None:
    token = assertion_token(idps.genuine.signed())
    verifier = adapter(idps)
    assert (await verifier.authenticate(token, TokenType.SAML2)).subject == "alice"
    with pytest.raises(TokenRejected, match="replay"):
        await verifier.authenticate(token, TokenType.SAML2)
    # the same assertion inside a Response is the same assertion
    response = idps.genuine.signed()
    verifier = adapter(idps)
    await verifier.authenticate(response_token(response), TokenType.SAML2)
    with pytest.raises(TokenRejected, match="replay"):
        await verifier.authenticate(assertion_token(response), TokenType.SAML2)


# --- through the token endpoint ---------------------------------------------------------------


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, idps: Idps) -> Iterator[RunningBroker]:
    with run_broker(
        tmp_path_factory.mktemp("saml-hostile"), [provider_config(idps)], policy_extra=POLICY
    ) as running:
        yield running


def _exchange(broker: RunningBroker, token: str) -> httpx.Response:
    return httpx.post(
        broker.token_endpoint,
        data=exchange_form(token, SAML2, scope="tickets:read", audience=TICKETS),
        auth=("saml-agent", SECRET),
        timeout=10,
    )


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_endpoint_refuses(name: str, broker: RunningBroker, catalogue: dict[str, Built]) -> None:
    hostile, _ = catalogue[name]
    before = len(broker.decisions.records)
    response = _exchange(broker, hostile)
    assert response.status_code == 400, (name, response.status_code, response.text)
    body = response.json()
    assert body["error"] == "invalid_grant", body
    assert body["error_description"]
    assert hostile[:40] not in response.text and "admin" not in response.text
    records = broker.decisions.records[before:]
    assert records and records[0]["outcome"] == "denied" and records[0]["reason"]
    assert hostile not in json.dumps(records)


def test_endpoint_control_and_replay(broker: RunningBroker, idps: Idps) -> None:
    token = assertion_token(idps.genuine.signed())
    first = _exchange(broker, token)
    assert first.status_code == 200, first.text
    claims = jwt.decode(first.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == f"{IDP_NAME}/alice"
    second = _exchange(broker, token)
    assert second.status_code == 400
    assert second.json()["error"] == "invalid_grant"
    assert "replay" in second.json()["error_description"]


def test_endpoint_comment_injection_never_yields_the_truncated_person(
    broker: RunningBroker, idps: Idps
) -> None:
    root = idps.genuine.signed("alice@example.com.evil.com", {"groups": ["support"]})
    assertion = assertion_element(root)
    inject_comment_in_name_id(assertion, len("alice@example.com"))
    response = _exchange(broker, assertion_token(assertion))
    assert response.status_code in (200, 400), response.text
    if response.status_code == 200:
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
        assert claims["sub"] == f"{IDP_NAME}/alice@example.com.evil.com"
        assert claims["provenance"]["sub"] == "alice@example.com.evil.com"
    else:
        assert response.json()["error"] == "invalid_grant"


def test_a_stale_assertion_is_refused_quickly(broker: RunningBroker, idps: Idps) -> None:
    """Hostile input costs the broker milliseconds, not seconds."""
    token = assertion_token(idps.genuine.signed(edit=shift_times(-3600)))
    started = time.perf_counter()
    response = _exchange(broker, token)
    assert response.status_code == 400
    assert time.perf_counter() - started < 2.0

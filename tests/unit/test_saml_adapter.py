"""SamlAdapter details: configuration, certificates, decoding, routing, clock and skew, replay
bookkeeping, and the broker's own checks that are stricter than python3-saml's."""

from __future__ import annotations

import base64
import datetime
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from pydantic import ValidationError

from broker.clock import FrozenClock, SystemClock
from broker.errors import InvalidGrant, TemporarilyUnavailable
from broker.exchange import SubjectTokenVerifier
from broker.settings import BrokerSettings, ClaimMapping, IdentityProviderConfig
from broker.state import InMemoryStateStore, RateLimitResult, RevocationStatus, StateUnavailable
from broker.types import Sensitive, TokenType
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.registry import IdentityRoutes, build_identity_adapters
from idp_adapters.saml import (
    NAMEID_SUBJECT,
    OID_EPPN,
    ReplayCheckUnavailable,
    SamlAdapter,
    decode_saml_token,
    load_idp_certificates,
    resolve_saml_mapping,
    saml_issuer,
)
from tests.support.jose import compact
from tests.support.saml_idp import (
    ACS_URL,
    ASSERTION,
    IDP_ENTITY_ID,
    NS_SAML,
    SIGNATURE,
    SP_ENTITY_ID,
    Edit,
    SamlTestIdp,
    assertion_token,
    make_key_pair,
    response_token,
    set_attribute,
    xml_token,
)

SAML_CONDITIONS = f"{{{NS_SAML}}}Conditions"


@pytest.fixture(scope="module")
def idp(tmp_path_factory: pytest.TempPathFactory) -> SamlTestIdp:
    return SamlTestIdp(make_key_pair(tmp_path_factory.mktemp("saml-unit"), "idp"))


def config(cert_file: Path, **overrides: Any) -> IdentityProviderConfig:
    values: dict[str, Any] = {
        "name": "corp-saml",
        "kind": "saml",
        "issuer": IDP_ENTITY_ID,
        "sp_entity_id": SP_ENTITY_ID,
        "acs_url": ACS_URL,
        "idp_certificate_ref": f"file:{cert_file}",
    }
    values.update(overrides)
    return IdentityProviderConfig(**values)


def adapter(
    idp: SamlTestIdp, *, clock: Any = None, state: Any = None, **overrides: Any
) -> SamlAdapter:
    clock = clock or SystemClock()
    return SamlAdapter(
        config(idp.keys.cert_file, **overrides), state or InMemoryStateStore(clock), clock
    )


def in_assertion(path: str, change: Callable[[etree._Element], None]) -> Edit:
    def edit(root: etree._Element) -> None:
        element = root.find(ASSERTION).find(path, namespaces={"saml": NS_SAML})
        assert element is not None, path
        change(element)

    return edit


def without_python3_saml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SamlAdapter, "_python3_saml", lambda self, root: None)


# --- configuration ----------------------------------------------------------------------------


def test_saml_config_needs_no_client_ids_and_accepts_non_https_entity_ids(tmp_path: Path) -> None:
    for entity_id in ("http://www.okta.com/exk1", "urn:example:idp", "https://sts.windows.net/t/"):
        parsed = config(tmp_path / "idp.crt", issuer=entity_id)
        assert parsed.issuer == entity_id and not parsed.client_ids and not parsed.audiences
    with pytest.raises(ValidationError, match="kind saml needs"):
        IdentityProviderConfig(name="x", kind="saml", issuer="urn:x", acs_url=ACS_URL)
    with pytest.raises(ValidationError, match="file:/path"):
        config(tmp_path / "idp.crt", idp_certificate_ref="env:IDP_CERT")
    with pytest.raises(ValidationError, match="https"):
        config(tmp_path / "idp.crt", acs_url="http://broker.example.com/acs")
    with pytest.raises(ValidationError, match="need kind saml"):
        IdentityProviderConfig(
            name="okta", issuer="https://o.example", client_ids=["a"], sp_entity_id="x"
        )
    with pytest.raises(ValidationError, match="need kind saml"):
        IdentityProviderConfig(
            name="okta", issuer="https://o.example", client_ids=["a"], saml_preset="adfs"
        )
    with pytest.raises(ValidationError):  # an OIDC issuer is still https unless loopback
        IdentityProviderConfig(name="okta", issuer="http://o.example", client_ids=["a"])
    with pytest.raises(ValidationError, match="workload_issuers take"):
        BrokerSettings(workload_issuers=[config(tmp_path / "idp.crt")])


def test_registry_builds_saml_adapters_only_with_a_state_store(idp: SamlTestIdp) -> None:
    http = httpx.AsyncClient()
    configs = [config(idp.keys.cert_file)]
    with pytest.raises(ValueError, match="state store"):
        build_identity_adapters(configs, http, FrozenClock(), allow_development=False)
    clock = FrozenClock()
    adapters = build_identity_adapters(
        configs, http, clock, allow_development=False, state=InMemoryStateStore(clock)
    )
    assert not adapters.jwt
    built = adapters.saml[IDP_ENTITY_ID]
    assert isinstance(built, SamlAdapter)
    assert built.accepts(TokenType.SAML2) and not built.accepts(TokenType.ID_TOKEN)


def test_acs_url_must_be_plain(idp: SamlTestIdp) -> None:
    with pytest.raises(ValueError, match="acs_url"):
        adapter(idp, acs_url="https://broker.example.com/acs?x=1")


def test_presets_and_overrides() -> None:
    assert resolve_saml_mapping("generic", ClaimMapping()).subject == NAMEID_SUBJECT
    assert resolve_saml_mapping("shibboleth", ClaimMapping()).subject == OID_EPPN
    adfs = resolve_saml_mapping("adfs", ClaimMapping())
    assert "http://schemas.microsoft.com/ws/2008/06/identity/claims/groups" in adfs.groups
    # The role claim carries IdP roles, never groups.
    assert adfs.roles == ("http://schemas.microsoft.com/ws/2008/06/identity/claims/role",)
    assert not set(adfs.roles) & set(adfs.groups)
    overridden = resolve_saml_mapping(
        "shibboleth",
        ClaimMapping(subject="NameID", groups=["memberOf"], email="mail", roles=["eduRole"]),
    )
    assert (overridden.subject, overridden.groups, overridden.email, overridden.roles) == (
        "NameID",
        ("memberOf",),
        ("mail",),
        ("eduRole",),
    )
    with pytest.raises(ValueError):
        resolve_saml_mapping("entra", ClaimMapping())


# --- certificates -----------------------------------------------------------------------------


def _self_signed(key: Any, algorithm: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, algorithm)
    )
    return certificate.public_bytes(serialization.Encoding.PEM)


def test_certificate_loading_refuses_weak_or_missing_certificates(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_idp_certificates(f"file:{tmp_path / 'missing.pem'}")
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(ValueError, match="no PEM certificate"):
        load_idp_certificates(f"file:{tmp_path / 'junk.pem'}")
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    (tmp_path / "small.pem").write_bytes(_self_signed(small, hashes.SHA256()))
    with pytest.raises(ValueError, match="2048"):
        load_idp_certificates(f"file:{tmp_path / 'small.pem'}")
    dsa_key = dsa.generate_private_key(key_size=2048)
    (tmp_path / "dsa.pem").write_bytes(_self_signed(dsa_key, hashes.SHA256()))
    with pytest.raises(ValueError, match="RSA and EC"):
        load_idp_certificates(f"file:{tmp_path / 'dsa.pem'}")
    with pytest.raises(ValueError, match="file:"):
        load_idp_certificates("https://idp.example/cert.pem")


@pytest.mark.anyio
async def test_a_certificate_bundle_supports_key_rollover(idp: SamlTestIdp, tmp_path: Path) -> None:
    next_keys = make_key_pair(tmp_path, "next")
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(idp.keys.cert_pem + next_keys.cert_pem)
    assert len(load_idp_certificates(f"file:{bundle}")) == 2
    token = assertion_token(idp.signed(signer=next_keys))
    with pytest.raises(TokenRejected, match="signature"):
        await adapter(idp).authenticate(token, TokenType.SAML2)
    principal = await adapter(idp, idp_certificate_ref=f"file:{bundle}").authenticate(
        token, TokenType.SAML2
    )
    assert principal.subject == "alice"


# --- decoding and routing ---------------------------------------------------------------------


def test_decoding_accepts_both_alphabets_and_caps_size() -> None:
    data = b"<?xml version='1.0'?><x>\xff\xfe\xfd??>>></x>"
    assert decode_saml_token(base64.urlsafe_b64encode(data).decode().rstrip("=")) == data
    assert decode_saml_token(base64.b64encode(data).decode()) == data
    with pytest.raises(TokenRejected, match="exceeds"):
        decode_saml_token("A" * 20000)
    for bad in ("", "a", "abc$", "ab==cd"):
        with pytest.raises(TokenRejected, match="base64"):
            decode_saml_token(bad)


def test_saml_issuer_peeks_without_trusting(idp: SamlTestIdp) -> None:
    xml = idp.response()
    assert saml_issuer(assertion_token(xml)) == IDP_ENTITY_ID
    assert saml_issuer(response_token(xml)) == IDP_ENTITY_ID
    no_issuer = f'<saml:Assertion xmlns:saml="{NS_SAML}" ID="a" Version="2.0"/>'
    assert saml_issuer(xml_token(no_issuer)) is None
    for hostile in (
        "<x/>",
        '<!DOCTYPE x [<!ENTITY e "e">]><saml:Assertion xmlns:saml="urn:x"/>',
        "not xml",
    ):
        with pytest.raises(TokenRejected):
            saml_issuer(xml_token(hostile))
    with pytest.raises(TokenRejected, match="exceeds"):
        saml_issuer(assertion_token(xml), max_bytes=512)


def test_onelogin_parser_refuses_dtds_on_its_own() -> None:
    """Behind the broker's pre-check, the python3-saml parser refuses DTDs too."""
    from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

    with pytest.raises(ValueError):
        OneLogin_Saml2_XML.to_etree(b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x/>')


class _DeadState:
    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        raise StateUnavailable("down")

    async def revoke_tokens(self, expiries: Mapping[str, float]) -> None:
        raise StateUnavailable("down")

    async def revoke_before(self, subject: str, not_before: float, ttl_seconds: float) -> None:
        raise StateUnavailable("down")

    async def revocation_status(
        self, token_ids: Iterable[str], subjects: Iterable[str]
    ) -> RevocationStatus:
        raise StateUnavailable("down")

    async def revocation_epoch(self) -> str:
        raise StateUnavailable("down")

    async def rate_limit(self, key: str, limit: int, window_seconds: float) -> RateLimitResult:
        raise StateUnavailable("down")

    async def ping(self) -> None:
        raise StateUnavailable("down")


class _RecordingState(InMemoryStateStore):
    def __init__(self) -> None:
        super().__init__(SystemClock())
        self.calls: list[tuple[str, float]] = []

    async def use_once(self, key: str, ttl_seconds: float) -> bool:
        self.calls.append((key, ttl_seconds))
        return await super().use_once(key, ttl_seconds)


@pytest.mark.anyio
async def test_replay_key_and_lifetime(idp: SamlTestIdp) -> None:
    root = idp.signed()
    state = _RecordingState()
    principal = await adapter(idp, state=state).authenticate(assertion_token(root), TokenType.SAML2)
    [(key, ttl)] = state.calls
    assert key == f"saml:{IDP_ENTITY_ID}:{root.find(ASSERTION).get('ID')}"
    now = SystemClock().now()
    assert principal.expires_at + 30 - now - 2 <= ttl <= principal.expires_at + 30 - now + 2
    # IssueInstant and AuthnInstant are surfaced: a person's revocation is compared with them.
    assert principal.issued_at is not None and abs(principal.issued_at - now) <= 5
    assert principal.earliest_time == min(principal.issued_at, principal.auth_time or now)


@pytest.mark.anyio
async def test_session_follows_conditions_while_replay_follows_the_earliest_end(
    idp: SamlTestIdp,
) -> None:
    """AD FS style: Conditions valid for an hour, the bearer confirmation for five minutes."""
    later = (datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=1)).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    root = idp.signed(edit=set_attribute("saml:Conditions", "NotOnOrAfter", later))
    state = _RecordingState()
    principal = await adapter(idp, state=state).authenticate(assertion_token(root), TokenType.SAML2)
    now = SystemClock().now()
    assert 3500 < principal.expires_at - now <= 3600
    [(_, ttl)] = state.calls
    assert 300 < ttl <= 300 + 30 + 2  # the confirmation's five minutes, plus leeway


@pytest.mark.anyio
async def test_state_outage_fails_closed(idp: SamlTestIdp) -> None:
    with pytest.raises(ReplayCheckUnavailable) as caught:
        await adapter(idp, state=_DeadState()).authenticate(
            assertion_token(idp.signed()), TokenType.SAML2
        )
    assert isinstance(caught.value, IdentityProviderUnavailable)


@pytest.mark.anyio
async def test_exchange_routing_of_saml_subject_tokens(idp: SamlTestIdp) -> None:
    def verifier(state: Any) -> SubjectTokenVerifier:
        saml = adapter(idp, state=state)
        routes = IdentityRoutes(saml={IDP_ENTITY_ID: saml})
        return SubjectTokenVerifier(routes, None, "http://127.0.0.1:1")  # type: ignore[arg-type]

    live = verifier(InMemoryStateStore(SystemClock()))
    subject = await live.verify(Sensitive(assertion_token(idp.signed())), TokenType.SAML2)
    assert subject.parent is None
    assert subject.provenance.token_type is TokenType.SAML2
    assert subject.provenance.person_id == "corp-saml/alice"

    cases = {
        "unknown_issuer": assertion_token(
            SamlTestIdp(idp.keys, entity_id="https://other.example/idp").signed()
        ),
        "subject_token_malformed": "!!!",
        "subject_token_rejected": assertion_token(idp.response(sign_assertion=False)),
    }
    for reason, token in cases.items():
        with pytest.raises(InvalidGrant) as caught:
            await live.verify(Sensitive(token), TokenType.SAML2)
        assert caught.value.reason == reason
    # A JWT naming the SAML IdP's entity id as `iss` is not routed to the SAML adapter.
    jwt_like = compact({"alg": "RS256", "typ": "JWT"}, {"iss": IDP_ENTITY_ID, "sub": "alice"})
    with pytest.raises(InvalidGrant) as caught:
        await live.verify(Sensitive(jwt_like), TokenType.ID_TOKEN)
    assert caught.value.reason == "unknown_issuer"
    with pytest.raises(TemporarilyUnavailable) as unavailable:
        await verifier(_DeadState()).verify(
            Sensitive(assertion_token(idp.signed())), TokenType.SAML2
        )
    assert unavailable.value.reason == "state_unavailable"
    assert unavailable.value.status_code == 503


# --- clock and skew ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_injected_clock_and_leeway_govern_expiry(idp: SamlTestIdp) -> None:
    """python3-saml checks against the system clock (300 s drift); the broker's own window uses
    the injected clock and ``leeway_seconds``."""
    root = idp.signed()
    end = adapter(idp)._verify(assertion_token(root))[1].expires_at
    clock = FrozenClock(start=end + 10)
    principal = await adapter(idp, clock=clock).authenticate(assertion_token(root), TokenType.SAML2)
    assert principal.expires_at == end  # within the 30 s leeway
    clock = FrozenClock(start=end + 31)
    with pytest.raises(TokenRejected, match=r"subject confirmation|expired"):
        await adapter(idp, clock=clock).authenticate(assertion_token(root), TokenType.SAML2)
    with pytest.raises(TokenRejected):
        await adapter(idp, clock=FrozenClock(start=end + 11), leeway_seconds=10).authenticate(
            assertion_token(root), TokenType.SAML2
        )


# --- checks stricter than python3-saml's ------------------------------------------------------


def _append_audience_restriction(audience: str) -> Edit:
    def change(conditions: etree._Element) -> None:
        restriction = etree.SubElement(conditions, f"{{{NS_SAML}}}AudienceRestriction")
        etree.SubElement(restriction, f"{{{NS_SAML}}}Audience").text = audience

    return in_assertion("saml:Conditions", change)


def _remove_audience_restrictions(conditions: etree._Element) -> None:
    for restriction in conditions.findall(f"{{{NS_SAML}}}AudienceRestriction"):
        conditions.remove(restriction)


SCD = "saml:Subject/saml:SubjectConfirmation/saml:SubjectConfirmationData"

STRICTER: dict[str, tuple[Edit, str]] = {
    # python3-saml: `acs_url in Recipient` (a substring test)
    "recipient-merely-contains-the-acs-url": (
        set_attribute(SCD, "Recipient", f"https://evil.example/?next={ACS_URL}"),
        "subject confirmation",
    ),
    # python3-saml: Destination.startswith(acs_url)
    "destination-extends-the-acs-url": (
        lambda root: root.set("Destination", ACS_URL + "/../evil"),
        "destination",
    ),
    # python3-saml: an audience anywhere suffices; SAML requires every restriction to hold
    "second-audience-restriction-excludes-us": (
        _append_audience_restriction("https://someone-else.example"),
        "audience",
    ),
    # python3-saml: no AudienceRestriction at all passes
    "no-audience-restriction": (
        in_assertion("saml:Conditions", _remove_audience_restrictions),
        "audience",
    ),
    # python3-saml: a bearer confirmation without NotOnOrAfter passes
    "confirmation-without-expiry": (
        in_assertion(SCD, lambda data: data.attrib.pop("NotOnOrAfter")),
        "subject confirmation",
    ),
    "issuer-with-another-format": (
        in_assertion(
            "saml:Issuer",
            lambda issuer: issuer.set(
                "Format", "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified"
            ),
        ),
        "issuer",
    ),
    "issued-in-the-future": (
        lambda root: root.find(ASSERTION).set(
            "IssueInstant",
            (datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=200)).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        ),
        "future",
    ),
    "transient-name-id": (
        in_assertion(
            "saml:Subject/saml:NameID",
            lambda name_id: name_id.set(
                "Format", "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
            ),
        ),
        "transient",
    ),
    "sp-name-qualifier-for-another-sp": (
        in_assertion(
            "saml:Subject/saml:NameID",
            lambda name_id: name_id.set("SPNameQualifier", "https://other.sp"),
        ),
        "SPNameQualifier",
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(STRICTER))
async def test_broker_checks_stricter_than_python3_saml(idp: SamlTestIdp, name: str) -> None:
    edit, reason = STRICTER[name]
    root = idp.signed(edit=edit)
    token = response_token(root)
    with pytest.raises(TokenRejected, match=reason) as caught:
        await adapter(idp).authenticate(token, TokenType.SAML2)
    assert caught.value.debug is None  # python3-saml let it through; the broker's check did not


def _unknown_condition(conditions: etree._Element) -> None:
    etree.SubElement(conditions, f"{{{NS_SAML}}}Condition").set(
        "{http://www.w3.org/2001/XMLSchema-instance}type", "ext:Unknown"
    )


def _extra_transform(root: etree._Element) -> None:
    transforms = root.find(ASSERTION).find(f"{SIGNATURE}//{{*}}Transforms")
    etree.SubElement(transforms, "{http://www.w3.org/2000/09/xmldsig#}Transform").set(
        "Algorithm", "http://www.w3.org/TR/1999/REC-xpath-19991116"
    )


def _duplicate_id(root: etree._Element) -> None:
    assertion_id = root.find(ASSERTION).get("ID")
    root.find(f"{{{NS_SAML}}}Issuer").set("ID", assertion_id)


def _reference_elsewhere(root: etree._Element) -> None:
    root.find(ASSERTION).set("ID", "_renamed")


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("after_signing", "reason"),
    [
        (_extra_transform, "transforms"),
        (_duplicate_id, "repeats an ID"),
        (_reference_elsewhere, "does not reference the assertion"),
    ],
)
async def test_broker_signature_structure_checks(
    idp: SamlTestIdp,
    monkeypatch: pytest.MonkeyPatch,
    after_signing: Callable[[etree._Element], None],
    reason: str,
) -> None:
    root = idp.signed()
    after_signing(root)
    with pytest.raises(TokenRejected):
        await adapter(idp).authenticate(response_token(root), TokenType.SAML2)
    without_python3_saml(monkeypatch)
    with pytest.raises(TokenRejected, match=reason):
        await adapter(idp).authenticate(response_token(root), TokenType.SAML2)


@pytest.mark.anyio
async def test_unknown_conditions_are_refused(
    idp: SamlTestIdp, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = assertion_token(idp.signed(edit=in_assertion("saml:Conditions", _unknown_condition)))
    with pytest.raises(TokenRejected):  # python3-saml: not schema-valid
        await adapter(idp).authenticate(token, TokenType.SAML2)
    without_python3_saml(monkeypatch)
    with pytest.raises(TokenRejected, match="condition"):
        await adapter(idp).authenticate(token, TokenType.SAML2)


@pytest.mark.anyio
async def test_encrypted_assertions_are_refused_without_decryption(idp: SamlTestIdp) -> None:
    root = idp.signed()
    assertion = root.find(ASSERTION)
    encrypted = etree.Element(f"{{{NS_SAML}}}EncryptedAssertion")
    root.replace(assertion, encrypted)
    with pytest.raises(TokenRejected, match="encrypted"):
        await adapter(idp).authenticate(response_token(root), TokenType.SAML2)


@pytest.mark.anyio
async def test_only_the_saml2_token_type_is_accepted(idp: SamlTestIdp) -> None:
    with pytest.raises(TokenRejected, match="only SAML"):
        await adapter(idp).authenticate(assertion_token(idp.signed()), TokenType.ID_TOKEN)


@pytest.mark.anyio
async def test_max_token_bytes_applies(idp: SamlTestIdp) -> None:
    with pytest.raises(TokenRejected, match="exceeds"):
        await adapter(idp, max_token_bytes=1024).authenticate(
            response_token(idp.signed()), TokenType.SAML2
        )


@pytest.mark.anyio
async def test_conditions_element_is_required(idp: SamlTestIdp) -> None:
    def drop(root: etree._Element) -> None:
        assertion = root.find(ASSERTION)
        assertion.remove(assertion.find(SAML_CONDITIONS))

    with pytest.raises(TokenRejected, match="Conditions"):
        await adapter(idp).authenticate(assertion_token(idp.signed(edit=drop)), TokenType.SAML2)


def test_one_idp_may_speak_oidc_and_saml_under_one_name(idp: SamlTestIdp) -> None:
    """A Keycloak realm's OIDC `iss` is also its SAML entity id: both are routed, apart."""
    from broker.settings import BrokerSettings, IdentityProviderConfig
    from idp_adapters.oidc import OidcAdapter

    oidc = IdentityProviderConfig(
        name="realm-oidc", issuer=IDP_ENTITY_ID, client_ids=["portal"], preset="keycloak"
    )
    saml = config(idp.keys.cert_file)
    clock = FrozenClock()
    routes = build_identity_adapters(
        [oidc, saml], httpx.AsyncClient(), clock, allow_development=False,
        state=InMemoryStateStore(clock),
    )  # fmt: skip
    assert isinstance(routes.jwt[IDP_ENTITY_ID], OidcAdapter)
    assert isinstance(routes.saml[IDP_ENTITY_ID], SamlAdapter)
    BrokerSettings(identity_providers=[oidc, saml])  # accepted by the settings too
    with pytest.raises(ValueError, match="share an issuer"):
        BrokerSettings(identity_providers=[oidc, oidc.model_copy(update={"name": "again"})])
    with pytest.raises(ValueError, match="twice"):
        build_identity_adapters(
            [saml, saml.model_copy(update={"name": "again"})], httpx.AsyncClient(), clock,
            allow_development=False, state=InMemoryStateStore(clock),
        )  # fmt: skip

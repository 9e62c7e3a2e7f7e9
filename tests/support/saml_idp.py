"""A SAML 2.0 identity provider for tests: pysaml2's `saml2.server.Server`, signing with the
``xmlsec1`` command (an implementation independent of the broker's python3-saml/python-xmlsec),
with an RSA key and self-signed certificate generated here, SHA-256 by default.

`SamlTestIdp.response` is pysaml2 end to end (``create_authn_response`` signs). `SamlTestIdp.signed`
lets pysaml2 build the unsigned Response, applies an edit to the tree, and then has pysaml2's
security context sign the assertion (and optionally the Response): how the hostile variants get
genuine signatures over content of the test's choosing. `XSW` builds the eight XML signature
wrapping attacks of "On Breaking SAML" (Somorovsky et al., 2012) / SAML Raider from a genuinely
signed Response.
"""

from __future__ import annotations

import base64
import copy
import datetime
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # pysaml2 imports deprecated cryptography names
    from saml2 import BINDING_HTTP_POST
    from saml2.config import IdPConfig
    from saml2.saml import NAMEID_FORMAT_PERSISTENT, NameID
    from saml2.server import Server
    from saml2.sigver import pre_signature_part

NS_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"
ASSERTION = f"{{{NS_SAML}}}Assertion"
ISSUER = f"{{{NS_SAML}}}Issuer"
SUBJECT = f"{{{NS_SAML}}}Subject"
NAME_ID = f"{{{NS_SAML}}}NameID"
SIGNATURE = f"{{{NS_DS}}}Signature"
ASSERTION_NODE = "urn:oasis:names:tc:SAML:2.0:assertion:Assertion"
RESPONSE_NODE = "urn:oasis:names:tc:SAML:2.0:protocol:Response"

RSA_SHA256 = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
RSA_SHA1 = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
SHA256 = "http://www.w3.org/2001/04/xmlenc#sha256"
SHA1 = "http://www.w3.org/2000/09/xmldsig#sha1"
PASSWORD_PROTECTED_TRANSPORT = "urn:oasis:names:tc:SAML:2.0:ac:classes:PasswordProtectedTransport"
NAME_FORMAT_URI = "urn:oasis:names:tc:SAML:2.0:attrname-format:uri"

IDP_ENTITY_ID = "https://idp.example.org/idp/shibboleth"
SP_ENTITY_ID = "https://broker.example.com/saml"
ACS_URL = "https://broker.example.com/oauth2/token"


@dataclass(frozen=True)
class KeyPair:
    """An RSA private key and its self-signed certificate, as PEM files."""

    key_file: Path
    cert_file: Path

    @property
    def cert_pem(self) -> str:
        return self.cert_file.read_text()

    @property
    def cert_base64(self) -> str:
        """The certificate body, as pysaml2 embeds it in KeyInfo."""
        lines = self.cert_pem.strip().splitlines()
        return "".join(lines[1:-1])


def make_key_pair(directory: Path, name: str) -> KeyPair:
    """A fresh 2048-bit RSA key and a self-signed SHA-256 certificate valid for a month."""
    directory.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    pair = KeyPair(directory / f"{name}.key", directory / f"{name}.crt")
    pair.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    pair.cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return pair


def _sp_metadata(sp_entity_id: str, acs_url: str) -> str:
    return (
        '<?xml version="1.0"?>'
        '<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" '
        f'entityID="{sp_entity_id}">'
        '<md:SPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">'
        '<md:AssertionConsumerService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" '
        f'Location="{acs_url}" index="0"/>'
        "</md:SPSSODescriptor></md:EntityDescriptor>"
    )


Edit = Callable[[etree._Element], None]
"""An edit applied to the unsigned Response (the root element) before signing."""


def xmlsec1_binary() -> str:
    """The ``xmlsec1`` program pysaml2 signs with, from PATH; a clear error when it is missing
    (`make test` installs it: Debian's ``xmlsec1`` package)."""
    path = shutil.which("xmlsec1")
    if path is None:
        raise RuntimeError(
            "the xmlsec1 program is not on PATH (the SAML test IdP signs with it): "
            "run `make test`, or `apt-get install xmlsec1`"
        )
    return path


class SamlTestIdp:
    """A pysaml2 identity provider with its own key pair."""

    def __init__(
        self,
        keys: KeyPair,
        *,
        entity_id: str = IDP_ENTITY_ID,
        sp_entity_id: str = SP_ENTITY_ID,
        acs_url: str = ACS_URL,
        lifetime_minutes: int = 5,
    ) -> None:
        self.keys = keys
        self.entity_id = entity_id
        self.sp_entity_id = sp_entity_id
        self.acs_url = acs_url
        config = IdPConfig()
        config.load(
            {
                "entityid": entity_id,
                "xmlsec_binary": xmlsec1_binary(),
                "key_file": str(keys.key_file),
                "cert_file": str(keys.cert_file),
                "service": {
                    "idp": {
                        "endpoints": {
                            "single_sign_on_service": [(f"{entity_id}/sso", BINDING_HTTP_POST)]
                        },
                        "policy": {
                            "default": {
                                "lifetime": {"minutes": lifetime_minutes},
                                "attribute_restrictions": None,
                                "name_form": NAME_FORMAT_URI,
                            }
                        },
                        "signing_algorithm": RSA_SHA256,
                        "digest_algorithm": SHA256,
                    }
                },
                "metadata": {"inline": [_sp_metadata(sp_entity_id, acs_url)]},
            }
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.server = Server(config=config)

    def response(
        self,
        subject: str = "alice",
        identity: Mapping[str, list[str]] | None = None,
        *,
        sign_assertion: bool = True,
        sign_response: bool = False,
        name_id_format: str = NAMEID_FORMAT_PERSISTENT,
        sign_alg: str = RSA_SHA256,
        digest_alg: str = SHA256,
    ) -> str:
        """A samlp:Response built and signed by pysaml2 (XML text)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xml = self.server.create_authn_response(
                identity=dict(identity if identity is not None else {"groups": ["support"]}),
                in_response_to=None,
                destination=self.acs_url,
                sp_entity_id=self.sp_entity_id,
                name_id=NameID(format=name_id_format, text=subject),
                authn={
                    "class_ref": PASSWORD_PROTECTED_TRANSPORT,
                    "authn_auth": self.entity_id,
                },
                sign_response=sign_response,
                sign_assertion=sign_assertion,
                sign_alg=sign_alg,
                digest_alg=digest_alg,
            )
        return str(xml)

    def signed(
        self,
        subject: str = "alice",
        identity: Mapping[str, list[str]] | None = None,
        *,
        edit: Edit | None = None,
        sign_assertion: bool = True,
        sign_response: bool = False,
        signer: KeyPair | None = None,
        sign_alg: str = RSA_SHA256,
        digest_alg: str = SHA256,
    ) -> etree._Element:
        """pysaml2 builds the Response unsigned, `edit` changes it, pysaml2 signs it (with
        `signer`'s key and certificate when given: an attacker's)."""
        root = etree.fromstring(
            self.response(subject, identity, sign_assertion=False, sign_response=False).encode()
        )
        if edit is not None:
            edit(root)
        keys = signer or self.keys
        if sign_assertion:
            root = self._sign(
                root, root.find(ASSERTION), ASSERTION_NODE, keys, sign_alg, digest_alg
            )
        if sign_response:
            root = self._sign(root, root, RESPONSE_NODE, keys, sign_alg, digest_alg)
        return root

    def _sign(
        self,
        root: etree._Element,
        element: etree._Element,
        node_name: str,
        keys: KeyPair,
        sign_alg: str,
        digest_alg: str,
    ) -> etree._Element:
        node_id = element.get("ID")
        identifier = 2 if node_name == ASSERTION_NODE else 1  # distinct ds:Signature Ids
        template = pre_signature_part(
            node_id, keys.cert_base64, identifier, digest_alg=digest_alg, sign_alg=sign_alg
        )
        element.insert(1, etree.fromstring(str(template).encode()))  # right after the Issuer
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            signed = self.server.sec.sign_statement(
                etree.tostring(root).decode(),
                node_name,
                key_file=str(keys.key_file),
                node_id=node_id,
            )
        return etree.fromstring(signed.encode())


def response_token(root: etree._Element | str) -> str:
    """A Response as the ``SAMLResponse`` form value: standard base64."""
    xml = root.encode() if isinstance(root, str) else etree.tostring(root)
    return base64.b64encode(xml).decode("ascii")


def assertion_element(root: etree._Element | str) -> etree._Element:
    response = etree.fromstring(root.encode()) if isinstance(root, str) else root
    return response.find(ASSERTION) if response.tag != ASSERTION else response


def assertion_token(root: etree._Element | str) -> str:
    """The (signed) assertion alone, base64url without padding (RFC 7522)."""
    xml = etree.tostring(assertion_element(root))
    return base64.urlsafe_b64encode(xml).decode("ascii").rstrip("=")


def xml_token(xml: str | bytes) -> str:
    """Arbitrary XML text as a base64url subject token."""
    data = xml.encode() if isinstance(xml, str) else xml
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


# --- edits ------------------------------------------------------------------------------------


def _saml_time(moment: datetime.datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def shift_times(seconds: int) -> Edit:
    """Move every time in the assertion by `seconds` (negative: into the past)."""

    def edit(root: etree._Element) -> None:
        for element in root.iter():
            for attribute in (
                "IssueInstant",
                "NotBefore",
                "NotOnOrAfter",
                "AuthnInstant",
                "SessionNotOnOrAfter",
            ):
                value = element.get(attribute)
                if value is None:
                    continue
                moment = datetime.datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ")
                element.set(attribute, _saml_time(moment + datetime.timedelta(seconds=seconds)))

    return edit


def set_text(path: str, value: str) -> Edit:
    """Set the text of the element at `path` (ElementPath, relative to the assertion)."""

    def edit(root: etree._Element) -> None:
        element = root.find(ASSERTION).find(path, namespaces={"saml": NS_SAML})
        assert element is not None, path
        element.text = value

    return edit


def set_attribute(path: str, name: str, value: str) -> Edit:
    """Set attribute `name` of the element at `path` (relative to the assertion; "." itself)."""

    def edit(root: etree._Element) -> None:
        element = root.find(ASSERTION).find(path, namespaces={"saml": NS_SAML})
        assert element is not None, path
        element.set(name, value)

    return edit


def set_issuer(value: str) -> Edit:
    """Both Issuers (Response and Assertion) become `value`."""

    def edit(root: etree._Element) -> None:
        root.find(ISSUER).text = value
        root.find(ASSERTION).find(ISSUER).text = value

    return edit


# --- XML signature wrapping -------------------------------------------------------------------


def _become_admin(assertion: etree._Element) -> None:
    """The attacker's change to the content the application will read."""
    name_id = assertion.find(f"{SUBJECT}/{NAME_ID}")
    assert name_id is not None
    name_id.text = "admin"


def _without_signature(element: etree._Element) -> etree._Element:
    clone = copy.deepcopy(element)
    for signature in clone.findall(SIGNATURE):
        clone.remove(signature)
    return clone


def xsw1(response: etree._Element) -> None:
    """Evil Response (new ID) keeps the Response signature; the original Response, unsigned,
    goes inside that signature."""
    original = _without_signature(response)
    response.find(SIGNATURE).append(original)
    response.set("ID", "_evil_response")
    _become_admin(response.find(ASSERTION))


def xsw2(response: etree._Element) -> None:
    """As XSW1, with the original Response placed before the signature (detached)."""
    original = _without_signature(response)
    signature = response.find(SIGNATURE)
    response.insert(response.index(signature), original)
    response.set("ID", "_evil_response")
    _become_admin(response.find(ASSERTION))


def xsw3(response: etree._Element) -> None:
    """An unsigned evil Assertion (new ID) before the signed original."""
    assertion = response.find(ASSERTION)
    evil = _without_signature(assertion)
    evil.set("ID", "_evil_assertion")
    _become_admin(evil)
    response.insert(response.index(assertion), evil)


def xsw4(response: etree._Element) -> None:
    """The evil Assertion wraps the signed original as its child."""
    assertion = response.find(ASSERTION)
    evil = _without_signature(assertion)
    evil.set("ID", "_evil_assertion")
    _become_admin(evil)
    response.replace(assertion, evil)
    evil.append(assertion)


def xsw5(response: etree._Element) -> None:
    """The evil Assertion keeps the signature (new ID); an unsigned copy of the original
    (original ID) is appended to the Response."""
    assertion = response.find(ASSERTION)
    response.append(_without_signature(assertion))
    assertion.set("ID", "_evil_assertion")
    _become_admin(assertion)


def xsw6(response: etree._Element) -> None:
    """As XSW5, with the unsigned original copy inside the evil Assertion's signature."""
    assertion = response.find(ASSERTION)
    assertion.find(SIGNATURE).append(_without_signature(assertion))
    assertion.set("ID", "_evil_assertion")
    _become_admin(assertion)


def xsw7(response: etree._Element) -> None:
    """The signed original moves into an Extensions element; an unsigned evil Assertion with the
    same ID takes its place."""
    assertion = response.find(ASSERTION)
    evil = _without_signature(assertion)
    _become_admin(evil)
    extensions = etree.Element(f"{{{NS_SAMLP}}}Extensions")
    response.replace(assertion, extensions)
    extensions.append(assertion)
    response.insert(response.index(extensions) + 1, evil)


def xsw8(response: etree._Element) -> None:
    """The evil Assertion keeps the signature (new ID); the unsigned original sits in a
    ds:Object inside that signature."""
    assertion = response.find(ASSERTION)
    original = _without_signature(assertion)
    container = etree.SubElement(assertion.find(SIGNATURE), f"{{{NS_DS}}}Object")
    container.append(original)
    assertion.set("ID", "_evil_assertion")
    _become_admin(assertion)


XSW: Mapping[str, Callable[[etree._Element], None]] = {
    "xsw1": xsw1,
    "xsw2": xsw2,
    "xsw3": xsw3,
    "xsw4": xsw4,
    "xsw5": xsw5,
    "xsw6": xsw6,
    "xsw7": xsw7,
    "xsw8": xsw8,
}
"""XSW1-2 wrap the Response signature, XSW3-8 the Assertion signature."""


def bare_object_wrapping(assertion: etree._Element) -> etree._Element:
    """XSW8 on a bare assertion: evil root Assertion, the signed original in ds:Object."""
    evil = copy.deepcopy(assertion)
    original = _without_signature(assertion)
    etree.SubElement(evil.find(SIGNATURE), f"{{{NS_DS}}}Object").append(original)
    evil.set("ID", "_evil_assertion")
    _become_admin(evil)
    return evil


def bare_advice_wrapping(assertion: etree._Element) -> etree._Element:
    """An unsigned evil Assertion carrying the signed original in its saml:Advice."""
    evil = _without_signature(assertion)
    evil.set("ID", "_evil_assertion")
    _become_admin(evil)
    advice = etree.Element(f"{{{NS_SAML}}}Advice")
    advice.append(copy.deepcopy(assertion))
    evil.insert(evil.index(evil.find(f"{{{NS_SAML}}}Conditions")) + 1, advice)
    return evil


def inject_comment_in_name_id(assertion: etree._Element, after: str) -> None:
    """``alice@example.com<!---->.evil.com``: a comment after the first `after` characters."""
    name_id = assertion.find(f"{SUBJECT}/{NAME_ID}")
    text = name_id.text or ""
    name_id.text = text[:after]
    comment = etree.Comment("")
    comment.tail = text[after:]
    name_id.append(comment)

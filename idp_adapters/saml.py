"""`SamlAdapter`: people's SAML 2.0 assertions as RFC 8693 subject tokens.

With ``subject_token_type=urn:ietf:params:oauth:token-type:saml2`` the subject token is

* a signed ``<saml:Assertion>``, base64url-encoded (RFC 7522 section 2.1 style), or
* a ``<samlp:Response>`` from a web sign-in (the ``SAMLResponse`` form value, standard base64)
  whose one assertion is signed.

Validation happens twice, and both must pass:

1. **python3-saml** (`OneLogin_Saml2_Response`, strict): schema validity, exactly one assertion,
   ``wantAssertionsSigned``, ``rejectDeprecatedAlgorithm`` (no SHA-1 digests or signatures, no
   DSA), the signature against the *pinned* IdP certificate(s) only, audience, issuer,
   destination, recipient and time windows (its own fixed 300 s drift, on the system clock). A
   bare assertion is given to it inside a synthetic, unsigned ``<samlp:Response>`` wrapper; the
   wrapper carries nothing the broker ever reads.
2. **The broker's own checks**, on a fresh parse: the anti-wrapping structure (one assertion in
   the whole document, no encrypted assertions, unique IDs, exactly one signature on the assertion
   whose only reference is ``#<assertion ID>``, transforms limited to enveloped-signature and
   exclusive C14N, SHA-2 only), the signature verified again with xmlsec against the pinned
   certificate(s) with those transforms enforced, and then **the identity is read only from a
   re-parse of the exclusive-C14N serialisation of the element whose signature verified** (what
   the digest covered). On that element: issuer byte for byte, one ``Conditions`` with an
   ``AudienceRestriction`` naming ``sp_entity_id`` (every restriction must), no unknown
   conditions, a bearer ``SubjectConfirmationData`` whose ``Recipient`` equals ``acs_url`` exactly
   and that has a ``NotOnOrAfter``, ``NotBefore``/``NotOnOrAfter``/``SessionNotOnOrAfter`` with
   ``leeway_seconds`` of skew on the injected clock, exactly one ``AuthnStatement``. A Response's
   ``Destination`` (when present) must equal ``acs_url`` and its ``Issuer`` (when present) the
   configured issuer.

Hostile XML: DTDs and entity declarations are refused before and during parsing (the
`OneLogin_Saml2_XML` parser forbids them, never resolves entities or touches the network, and drops
comments and processing instructions); only UTF-8 is accepted. Comments inside a ``NameID`` (the
2018 comment-truncation attack) cannot truncate it: comments are dropped at parse time and the
surrounding text merges, so the subject is the full literal text the IdP signed.

Identity, from the signed assertion only: the subject is the ``NameID`` (a transient one is
refused: it is not a stable subject) or, with ``claims.subject`` or the ``shibboleth`` preset,
a single-valued attribute; groups, email and name come from attributes by ``Name`` through
`SAML_PRESETS` (``saml_preset``) and ``claims.*`` overrides. ``auth_time`` is the
``AuthnInstant``; ``expires_at`` the assertion's ``NotOnOrAfter`` (Conditions, else the bearer
confirmation's), or ``SessionNotOnOrAfter`` when earlier. Encrypted assertions, NameIDs and
attributes are not supported (the broker holds no SP decryption key). The pinned certificates'
validity dates are not enforced: they only carry the IdP's public key, as in SAML metadata.

Replay: each assertion ID is accepted once per issuer until its expiry plus skew
(`StateStore.use_once` with key ``saml:<issuer>:<assertion ID>``).

Errors: `TokenRejected` with a short reason that never quotes the token; `ReplayCheckUnavailable`
(an `IdentityProviderUnavailable`) when the state store cannot answer: the caller fails closed.

Verification is synchronous inside `authenticate`: it is pure CPU work on an input capped at
``max_token_bytes``, 3-5 ms per message (half of it python3-saml compiling its XSD schema), and
most of it holds the GIL (four threads on two cores verified only 1.2 times faster than one), so
a worker thread would add a hand-off per message and move lxml trees across threads for little
gain. `_verify` is self-contained: ``await asyncio.to_thread(self._verify, token)`` is the
one-line change should SAML traffic ever dominate.
"""

from __future__ import annotations

import base64
import binascii
import copy
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import xmlsec
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from lxml import etree
from onelogin.saml2.errors import OneLogin_Saml2_ValidationError
from onelogin.saml2.response import OneLogin_Saml2_Response
from onelogin.saml2.settings import OneLogin_Saml2_Settings
from onelogin.saml2.utils import OneLogin_Saml2_Utils
from onelogin.saml2.xml_utils import OneLogin_Saml2_XML

from broker.clock import Clock
from broker.settings import ClaimMapping, IdentityProviderConfig
from broker.state import StateStore, StateUnavailable
from broker.types import Principal, TokenType, normalise_groups
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected

NS_SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
NS_SAMLP = "urn:oasis:names:tc:SAML:2.0:protocol"
NS_DS = "http://www.w3.org/2000/09/xmldsig#"

ASSERTION = f"{{{NS_SAML}}}Assertion"
ENCRYPTED_ASSERTION = f"{{{NS_SAML}}}EncryptedAssertion"
ISSUER = f"{{{NS_SAML}}}Issuer"
SUBJECT = f"{{{NS_SAML}}}Subject"
NAME_ID = f"{{{NS_SAML}}}NameID"
ENCRYPTED_ID = f"{{{NS_SAML}}}EncryptedID"
BASE_ID = f"{{{NS_SAML}}}BaseID"
SUBJECT_CONFIRMATION = f"{{{NS_SAML}}}SubjectConfirmation"
SUBJECT_CONFIRMATION_DATA = f"{{{NS_SAML}}}SubjectConfirmationData"
CONDITIONS = f"{{{NS_SAML}}}Conditions"
AUDIENCE_RESTRICTION = f"{{{NS_SAML}}}AudienceRestriction"
AUDIENCE = f"{{{NS_SAML}}}Audience"
ONE_TIME_USE = f"{{{NS_SAML}}}OneTimeUse"
PROXY_RESTRICTION = f"{{{NS_SAML}}}ProxyRestriction"
AUTHN_STATEMENT = f"{{{NS_SAML}}}AuthnStatement"
ATTRIBUTE_STATEMENT = f"{{{NS_SAML}}}AttributeStatement"
ATTRIBUTE = f"{{{NS_SAML}}}Attribute"
ENCRYPTED_ATTRIBUTE = f"{{{NS_SAML}}}EncryptedAttribute"
ATTRIBUTE_VALUE = f"{{{NS_SAML}}}AttributeValue"
RESPONSE = f"{{{NS_SAMLP}}}Response"
STATUS = f"{{{NS_SAMLP}}}Status"
STATUS_CODE = f"{{{NS_SAMLP}}}StatusCode"
SIGNATURE = f"{{{NS_DS}}}Signature"
SIGNED_INFO = f"{{{NS_DS}}}SignedInfo"
C14N_METHOD = f"{{{NS_DS}}}CanonicalizationMethod"
SIGNATURE_METHOD = f"{{{NS_DS}}}SignatureMethod"
REFERENCE = f"{{{NS_DS}}}Reference"
TRANSFORMS = f"{{{NS_DS}}}Transforms"
TRANSFORM = f"{{{NS_DS}}}Transform"
DIGEST_METHOD = f"{{{NS_DS}}}DigestMethod"
ID_ATTRIBUTES = ("ID", "Id", "id", "{http://www.w3.org/XML/1998/namespace}id")

STATUS_SUCCESS = "urn:oasis:names:tc:SAML:2.0:status:Success"
CM_BEARER = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
NAMEID_TRANSIENT = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient"
NAMEID_ENTITY = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity"
BINDING_HTTP_POST = "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"

EXC_C14N = "http://www.w3.org/2001/10/xml-exc-c14n#"
ENVELOPED_SIGNATURE = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
SIGNATURE_ALGORITHMS: Mapping[str, Any] = MappingProxyType(
    {
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256": xmlsec.Transform.RSA_SHA256,
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha384": xmlsec.Transform.RSA_SHA384,
        "http://www.w3.org/2001/04/xmldsig-more#rsa-sha512": xmlsec.Transform.RSA_SHA512,
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256": xmlsec.Transform.ECDSA_SHA256,
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha384": xmlsec.Transform.ECDSA_SHA384,
        "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha512": xmlsec.Transform.ECDSA_SHA512,
    }
)
"""Accepted ``SignatureMethod`` algorithms (SHA-2 only; never SHA-1, DSA or HMAC)."""
DIGEST_ALGORITHMS: Mapping[str, Any] = MappingProxyType(
    {
        "http://www.w3.org/2001/04/xmlenc#sha256": xmlsec.Transform.SHA256,
        "http://www.w3.org/2001/04/xmldsig-more#sha384": xmlsec.Transform.SHA384,
        "http://www.w3.org/2001/04/xmlenc#sha512": xmlsec.Transform.SHA512,
    }
)
"""Accepted ``DigestMethod`` algorithms (SHA-2 only)."""

NAMEID_SUBJECT = "NameID"
"""As a subject source: the assertion's ``<saml:NameID>`` (otherwise: an attribute name)."""
DEFAULT_MAX_TOKEN_BYTES = 16384
MAX_SUBJECT_LENGTH = 512
MAX_ID_LENGTH = 256
_XML_WHITESPACE = " \t\r\n"
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_WHITESPACE = re.compile(r"[ \t\r\n]+")
_ENCODING_DECLARATION = re.compile(r"""\s*<\?xml[^>]*?\bencoding\s*=\s*["']([^"']*)["']""")
_SAML_TIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d{1,9})?Z")

MS_CLAIMS = "http://schemas.microsoft.com/ws/2008/06/identity/claims"
XMLSOAP_CLAIMS = "http://schemas.xmlsoap.org/ws/2005/05/identity/claims"
OID_IS_MEMBER_OF = "urn:oid:1.3.6.1.4.1.5923.1.5.1.1"
OID_EPPN = "urn:oid:1.3.6.1.4.1.5923.1.1.1.6"
OID_MAIL = "urn:oid:0.9.2342.19200300.100.1.3"
OID_DISPLAY_NAME = "urn:oid:2.16.840.1.113730.3.1.241"


class ReplayCheckUnavailable(IdentityProviderUnavailable):
    """The single-use record of assertion IDs cannot be consulted (`StateUnavailable`).

    Fail closed: the exchange answers ``temporarily_unavailable`` (503)."""


# ---------------------------------------------------------------------------------------------
# attribute mapping presets
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SamlAttributeMapping:
    """Where a person's identity is found in a verified assertion.

    `subject` is `NAMEID_SUBJECT` (the ``NameID``) or the ``Name`` of a single-valued attribute;
    `groups` are attribute names whose values all become groups (normalised by
    `normalise_group`, as over OIDC: a Keycloak full path ``/team/sub`` is ``team/sub``); `roles`
    attribute names whose values become IdP roles (never groups); `email` and `name` are
    attribute names tried in order (the first value of the first present one wins).
    """

    subject: str
    groups: tuple[str, ...]
    email: tuple[str, ...]
    name: tuple[str, ...]
    roles: tuple[str, ...] = ()


SAML_PRESETS: Mapping[str, SamlAttributeMapping] = MappingProxyType(
    {
        "generic": SamlAttributeMapping(
            subject=NAMEID_SUBJECT,
            groups=("groups",),
            email=("email", "mail"),
            name=("name", "displayName"),
        ),
        # AD FS and Microsoft Entra ID: claim-type URIs as attribute names.
        "adfs": SamlAttributeMapping(
            subject=NAMEID_SUBJECT,
            groups=(f"{MS_CLAIMS}/groups",),
            roles=(f"{MS_CLAIMS}/role",),
            email=(f"{XMLSOAP_CLAIMS}/emailaddress", f"{XMLSOAP_CLAIMS}/upn"),
            name=(
                "http://schemas.microsoft.com/identity/claims/displayname",
                f"{XMLSOAP_CLAIMS}/name",
            ),
        ),
        # Okta: attribute statements named by the admin; a group attribute statement "groups".
        "okta": SamlAttributeMapping(
            subject=NAMEID_SUBJECT,
            groups=("groups",),
            email=("email",),
            name=("displayName", "name"),
        ),
        # Shibboleth IdP: eduPerson/inetOrgPerson OIDs. Its NameID is usually transient, so the
        # stable subject is eduPersonPrincipalName.
        "shibboleth": SamlAttributeMapping(
            subject=OID_EPPN,
            groups=(OID_IS_MEMBER_OF,),
            email=(OID_MAIL,),
            name=(OID_DISPLAY_NAME,),
        ),
    }
)
"""The built-in SAML attribute presets, by the name used in ``saml_preset``."""


def resolve_saml_mapping(preset: str, overrides: ClaimMapping) -> SamlAttributeMapping:
    """The preset named `preset` with each non-None field of `overrides` (``claims.*`` in the
    configuration, attribute names here; ``claims.subject: NameID`` selects the NameID)."""
    try:
        mapping = SAML_PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown SAML preset {preset!r}") from None
    if overrides.subject is not None:
        mapping = replace(mapping, subject=overrides.subject)
    if overrides.groups is not None:
        mapping = replace(mapping, groups=tuple(overrides.groups))
    if overrides.roles is not None:
        mapping = replace(mapping, roles=tuple(overrides.roles))
    if overrides.email is not None:
        mapping = replace(mapping, email=(overrides.email,))
    if overrides.name is not None:
        mapping = replace(mapping, name=(overrides.name,))
    return mapping


# ---------------------------------------------------------------------------------------------
# decoding and parsing (shared by routing and verification)
# ---------------------------------------------------------------------------------------------


def decode_saml_token(token: str, *, max_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> bytes:
    """The XML bytes of a base64url (RFC 7522) or standard base64 (``SAMLResponse``) token.

    Whitespace (line-wrapped base64) is ignored; anything longer than `max_bytes` is refused
    before decoding."""
    if len(token) > max_bytes:
        raise TokenRejected(f"SAML token exceeds {max_bytes} bytes")
    compact = _WHITESPACE.sub("", token)
    if not compact or not _BASE64.fullmatch(compact):
        raise TokenRejected("SAML token is not base64 or base64url encoded")
    body = compact.rstrip("=").translate(str.maketrans("-_", "+/"))
    if len(body) % 4 == 1:
        raise TokenRejected("SAML token is not base64 or base64url encoded")
    try:
        return base64.b64decode(body + "=" * (-len(body) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise TokenRejected("SAML token is not base64 or base64url encoded") from None


def parse_saml_xml(data: bytes) -> etree._Element:
    """Parse untrusted SAML XML: UTF-8 only, no DTD, no entity declarations, no network, comments
    and processing instructions dropped (`OneLogin_Saml2_XML`, which forbids DTDs and entities)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise TokenRejected("SAML token is not UTF-8 XML") from None
    if "<!DOCTYPE" in text or "<!ENTITY" in text:
        raise TokenRejected("SAML token carries a DTD or entity declarations, which are refused")
    declared = _ENCODING_DECLARATION.match(text)
    if declared and declared.group(1).lower() not in {"utf-8", "utf8"}:
        raise TokenRejected("SAML token declares an encoding other than UTF-8")
    try:
        root = OneLogin_Saml2_XML.to_etree(data)
    except (etree.LxmlError, ValueError) as exc:  # DTDForbidden/EntitiesForbidden are ValueErrors
        raise TokenRejected("SAML token is not well-formed XML", debug=type(exc).__name__) from None
    if root.tag not in (ASSERTION, RESPONSE):
        raise TokenRejected("SAML token is neither a saml:Assertion nor a samlp:Response")
    return root


def _text(element: etree._Element) -> str | None:
    """The whole text of a simple-content element (None with element children or when blank).

    The parser has already dropped comments, and adjacent text merges, so
    ``alice@example.com<!---->.evil.com`` reads as ``alice@example.com.evil.com``."""
    if len(element):
        return None
    value = (element.text or "").strip(_XML_WHITESPACE)
    return value or None


def saml_issuer(token: str, *, max_bytes: int = DEFAULT_MAX_TOKEN_BYTES) -> str | None:
    """The unverified ``Issuer`` of a SAML subject token, for routing only (like peeking at a
    JWT's ``iss``): the assertion's Issuer, or the Response's when the Response does not hold
    exactly one assertion. None when there is none.

    Raises `TokenRejected` when the token is not base64 of well-formed, DTD-free SAML XML of at
    most `max_bytes`."""
    root = parse_saml_xml(decode_saml_token(token, max_bytes=max_bytes))
    source = root
    if root.tag == RESPONSE:
        assertions = root.findall(ASSERTION)
        if len(assertions) == 1:
            source = assertions[0]
    issuers = source.findall(ISSUER)
    return _text(issuers[0]) if len(issuers) == 1 else None


# ---------------------------------------------------------------------------------------------
# configuration helpers
# ---------------------------------------------------------------------------------------------


def load_idp_certificates(ref: str | None) -> tuple[str, ...]:
    """The PEM certificates named by ``idp_certificate_ref`` (``file:/path``; several
    certificates in one file are all accepted, for a signing-key rollover).

    Raises ValueError when the reference, the file or a certificate is unusable (RSA keys must
    have at least 2048 bits; EC keys are accepted; DSA and others are refused)."""
    if not ref or not ref.startswith("file:"):
        raise ValueError("idp_certificate_ref must be file:/path/to/idp-signing-cert.pem")
    path = Path(ref.removeprefix("file:"))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read the IdP certificate {path}: {exc.strerror}") from None
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ValueError(f"{path} holds no PEM certificate") from None
    pems: list[str] = []
    for certificate in certificates:
        key = certificate.public_key()
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise ValueError(f"{path}: RSA keys under 2048 bits are refused")
        elif not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{path}: only RSA and EC signing certificates are accepted")
        pems.append(certificate.public_bytes(Encoding.PEM).decode("ascii"))
    return tuple(pems)


def _request_data(acs_url: str) -> dict[str, Any]:
    """python3-saml's view of "the URL this message was received at": the configured ACS URL."""
    parts = urlsplit(acs_url)
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("acs_url must be a plain URL without query, fragment or credentials")
    data: dict[str, Any] = {
        "https": "on" if parts.scheme == "https" else "off",
        "http_host": parts.netloc,
        "script_name": parts.path or "/",
        "get_data": {},
        "post_data": {},
    }
    if OneLogin_Saml2_Utils.get_self_url_no_query(data) != acs_url:
        raise ValueError("acs_url must be an absolute http(s) URL with a path, e.g. .../acs")
    return data


def _onelogin_settings(
    config: IdentityProviderConfig, certificates: Sequence[str]
) -> OneLogin_Saml2_Settings:
    """Strict python3-saml settings: the IdP certificate pinned, SHA-1/DSA refused, assertions
    must be signed. No SP key: encrypted assertions are not supported."""
    settings = OneLogin_Saml2_Settings(
        {
            "strict": True,
            "debug": False,
            "sp": {
                "entityId": config.sp_entity_id,
                "assertionConsumerService": {"url": config.acs_url, "binding": BINDING_HTTP_POST},
            },
            "idp": {
                "entityId": config.issuer,
                "x509certMulti": {"signing": list(certificates)},
            },
            "security": {
                "wantAssertionsSigned": True,
                "wantMessagesSigned": False,
                "wantAssertionsEncrypted": False,
                "wantNameIdEncrypted": False,
                "wantNameId": True,
                "wantAttributeStatement": False,
                "rejectDeprecatedAlgorithm": True,
                "allowRepeatAttributeName": False,
                "failOnAuthnContextMismatch": False,
                "requestedAuthnContext": False,
                "allowSingleLabelDomains": True,
            },
        },
        sp_validation_only=True,
    )
    errors = settings.get_errors()
    if errors:
        raise ValueError(f"identity provider {config.name!r}: SAML settings rejected: {errors}")
    return settings


_PYTHON3_SAML_REASONS: Mapping[int, str] = MappingProxyType(
    {
        OneLogin_Saml2_ValidationError.UNSUPPORTED_SAML_VERSION: "unsupported SAML version",
        OneLogin_Saml2_ValidationError.MISSING_ID: "SAML message has no ID",
        OneLogin_Saml2_ValidationError.WRONG_NUMBER_OF_ASSERTIONS: "exactly one assertion is "
        "required",
        OneLogin_Saml2_ValidationError.MISSING_STATUS: "response status is not success",
        OneLogin_Saml2_ValidationError.MISSING_STATUS_CODE: "response status is not success",
        OneLogin_Saml2_ValidationError.STATUS_CODE_IS_NOT_SUCCESS: "response status is not success",
        OneLogin_Saml2_ValidationError.INVALID_XML_FORMAT: "not a schema-valid SAML message",
        OneLogin_Saml2_ValidationError.MISSING_CONDITIONS: "assertion has no Conditions",
        OneLogin_Saml2_ValidationError.ASSERTION_TOO_EARLY: "assertion is not yet valid",
        OneLogin_Saml2_ValidationError.ASSERTION_EXPIRED: "assertion has expired",
        OneLogin_Saml2_ValidationError.SESSION_EXPIRED: "assertion session has expired",
        OneLogin_Saml2_ValidationError.RESPONSE_EXPIRED: "assertion has expired",
        OneLogin_Saml2_ValidationError.WRONG_NUMBER_OF_AUTHSTATEMENTS: "exactly one "
        "AuthnStatement is required",
        OneLogin_Saml2_ValidationError.ENCRYPTED_ATTRIBUTES: "encrypted attributes are not "
        "supported",
        OneLogin_Saml2_ValidationError.WRONG_DESTINATION: "response destination is not acceptable",
        OneLogin_Saml2_ValidationError.EMPTY_DESTINATION: "response destination is not acceptable",
        OneLogin_Saml2_ValidationError.WRONG_AUDIENCE: "assertion audience is not acceptable",
        OneLogin_Saml2_ValidationError.ISSUER_MULTIPLE_IN_RESPONSE: "issuer is not acceptable",
        OneLogin_Saml2_ValidationError.ISSUER_NOT_FOUND_IN_ASSERTION: "issuer is not acceptable",
        OneLogin_Saml2_ValidationError.WRONG_ISSUER: "issuer is not acceptable",
        OneLogin_Saml2_ValidationError.WRONG_SUBJECTCONFIRMATION: "assertion has no acceptable "
        "bearer subject confirmation",
        OneLogin_Saml2_ValidationError.NO_SIGNED_ASSERTION: "assertion is not signed",
        OneLogin_Saml2_ValidationError.NO_SIGNATURE_FOUND: "assertion is not signed",
        OneLogin_Saml2_ValidationError.NO_NAMEID: "assertion has no NameID",
        OneLogin_Saml2_ValidationError.EMPTY_NAMEID: "assertion has no NameID",
        OneLogin_Saml2_ValidationError.DUPLICATED_ATTRIBUTE_NAME_FOUND: "assertion repeats an "
        "attribute name",
        OneLogin_Saml2_ValidationError.DEPRECATED_SIGNATURE_METHOD: "deprecated or unsupported "
        "signature algorithm",
        OneLogin_Saml2_ValidationError.DEPRECATED_DIGEST_METHOD: "deprecated or unsupported "
        "digest algorithm",
    }
)
"""Safe public reasons for python3-saml's validation error codes; every other code (the
signature and signed-element checks) reads "signature is not valid"."""


@dataclass(frozen=True, slots=True)
class _SignedAlgorithms:
    signature: Any
    digest: Any


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------


class SamlAdapter:
    """Verifies SAML 2.0 assertions from one identity provider (kind ``saml``). Implements
    `IdentityAdapter` for `TokenType.SAML2` only."""

    def __init__(
        self,
        config: IdentityProviderConfig,
        state: StateStore,
        clock: Clock,
        *,
        certificates: Sequence[str] | None = None,
    ) -> None:
        """`certificates` (PEM) replaces loading ``idp_certificate_ref``. Raises ValueError for a
        configuration that is not a usable SAML one."""
        if config.kind != "saml":
            raise ValueError(f"identity provider {config.name!r} is not of kind saml")
        if not config.sp_entity_id or not config.acs_url:
            raise ValueError(f"identity provider {config.name!r}: set sp_entity_id and acs_url")
        self._config = config
        self._state = state
        self._clock = clock
        self._certificates = (
            tuple(certificates)
            if certificates is not None
            else load_idp_certificates(config.idp_certificate_ref)
        )
        if not self._certificates:
            raise ValueError(f"identity provider {config.name!r}: no IdP certificate")
        self._mapping = resolve_saml_mapping(config.saml_preset, config.claims)
        self._request_data = _request_data(config.acs_url)
        self._settings = _onelogin_settings(config, self._certificates)
        self._sp_entity_id: str = config.sp_entity_id
        self._acs_url: str = config.acs_url

    @property
    def name(self) -> str:
        return self._config.name

    @property
    def issuer(self) -> str:
        return self._config.issuer

    @property
    def attribute_mapping(self) -> SamlAttributeMapping:
        return self._mapping

    def accepts(self, token_type: TokenType) -> bool:
        return token_type is TokenType.SAML2

    async def authenticate(self, token: str, token_type: TokenType) -> Principal:
        """Verify a base64url assertion or base64 Response; accept each assertion ID once.

        Raises `TokenRejected`, or `ReplayCheckUnavailable` when single use cannot be checked.
        """
        if not self.accepts(token_type):
            raise TokenRejected("this identity provider accepts only SAML 2.0 assertions")
        assertion_id, principal, replay_until = self._verify(token)
        ttl = max(replay_until - self._clock.now(), 1.0)
        try:
            first_use = await self._state.use_once(
                f"saml:{self._config.issuer}:{assertion_id}", ttl
            )
        except StateUnavailable as exc:
            raise ReplayCheckUnavailable(
                "cannot check SAML assertion replay", debug=str(exc)
            ) from None
        if not first_use:
            raise TokenRejected("assertion has already been used (replay)")
        return principal

    # -- verification ---------------------------------------------------------------------------

    def _verify(self, token: str) -> tuple[str, Principal, float]:
        data = decode_saml_token(token, max_bytes=self._config.max_token_bytes)
        self._python3_saml(parse_saml_xml(data))
        root = parse_saml_xml(data)  # a fresh tree for the broker's own checks
        assertion = _single_assertion(root)
        if root.tag == RESPONSE:
            self._check_response_envelope(root)
        signed = self._verified_signed_assertion(root, assertion)
        return self._evaluate(signed)

    def _python3_saml(self, root: etree._Element) -> None:
        """python3-saml's strict validation; any error, raised or listed, rejects."""
        if any(True for _ in root.iter(ENCRYPTED_ASSERTION)):
            raise TokenRejected("encrypted assertions are not supported")
        if root.tag == ASSERTION:
            root = self._wrap(root)
        message = base64.b64encode(etree.tostring(root)).decode("ascii")
        try:
            response = OneLogin_Saml2_Response(self._settings, message)
            valid = response.is_valid(self._request_data, raise_exceptions=True)
        except OneLogin_Saml2_ValidationError as exc:
            raise TokenRejected(
                _PYTHON3_SAML_REASONS.get(exc.code, "assertion signature is not valid"),
                debug=f"python3-saml validation error code {exc.code}",
            ) from None
        except Exception as exc:  # any other failure inside python3-saml/xmlsec/lxml rejects
            raise TokenRejected(
                "assertion could not be validated", debug=f"python3-saml: {type(exc).__name__}"
            ) from None
        if valid is not True or response.get_error() is not None:
            raise TokenRejected("assertion failed SAML validation", debug="python3-saml")

    def _wrap(self, assertion: etree._Element) -> etree._Element:
        """A synthetic unsigned Response around a bare assertion, for python3-saml only."""
        wrapper = etree.Element(RESPONSE, nsmap={"samlp": NS_SAMLP})
        wrapper.set("ID", f"_broker-wrapper-{uuid.uuid4().hex}")
        wrapper.set("Version", "2.0")
        wrapper.set(
            "IssueInstant",
            datetime.fromtimestamp(int(self._clock.now()), UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        status = etree.SubElement(wrapper, STATUS)
        etree.SubElement(status, STATUS_CODE).set("Value", STATUS_SUCCESS)
        wrapper.append(assertion)
        return wrapper

    def _check_response_envelope(self, response: etree._Element) -> None:
        """The (usually unsigned) Response may only narrow: Destination and Issuer must match."""
        destination = response.get("Destination")
        if destination is not None and destination != self._acs_url:
            raise TokenRejected("response destination is not acceptable")
        issuers = response.findall(ISSUER)
        if len(issuers) > 1 or (issuers and _text(issuers[0]) != self._config.issuer):
            raise TokenRejected("issuer is not acceptable")

    def _verified_signed_assertion(
        self, root: etree._Element, assertion: etree._Element
    ) -> etree._Element:
        """Verify the assertion's own enveloped signature against the pinned certificates and
        return a re-parse of exactly the content that signature covers."""
        signature = _single_signature(root, assertion)
        assertion_id = assertion.get("ID") or ""
        if not assertion_id or len(assertion_id) > MAX_ID_LENGTH:
            raise TokenRejected("assertion has no usable ID")
        algorithms = _check_signed_info(signature, assertion_id)
        xmlsec.tree.add_ids(root, ["ID"])
        if not any(
            self._signature_verifies(signature, pem, algorithms) for pem in self._certificates
        ):
            raise TokenRejected("assertion signature is not valid")
        covered = copy.deepcopy(assertion)
        for enveloped in covered.findall(SIGNATURE):
            covered.remove(enveloped)
        canonical = etree.tostring(covered, method="c14n", exclusive=True, with_comments=False)
        signed = parse_saml_xml(canonical)
        if signed.tag != ASSERTION or signed.get("ID") != assertion_id:
            raise TokenRejected("assertion signature is not valid")
        return signed

    @staticmethod
    def _signature_verifies(
        signature: etree._Element, certificate_pem: str, algorithms: _SignedAlgorithms
    ) -> bool:
        """xmlsec with the pinned key only (KeyInfo is never consulted) and only the transforms
        this profile allows."""
        context = xmlsec.SignatureContext()
        try:
            context.key = xmlsec.Key.from_memory(
                certificate_pem.encode("ascii"), xmlsec.KeyFormat.CERT_PEM, None
            )
            for transform in (
                xmlsec.Transform.ENVELOPED,
                xmlsec.Transform.EXCL_C14N,
                algorithms.digest,
            ):
                context.enable_reference_transform(transform)
            for transform in (xmlsec.Transform.EXCL_C14N, algorithms.signature):
                context.enable_signature_transform(transform)
            context.verify(signature)
        except xmlsec.Error:
            return False
        return True

    def _evaluate(self, signed: etree._Element) -> tuple[str, Principal, float]:
        """Every remaining check, and the identity, on the signed assertion only."""
        now = self._clock.now()
        skew = float(self._config.leeway_seconds)
        if signed.get("Version") != "2.0":
            raise TokenRejected("unsupported SAML version")
        assertion_id = signed.get("ID") or ""
        if not assertion_id.isprintable():
            raise TokenRejected("assertion has no usable ID")
        issued_at = _saml_time(signed.get("IssueInstant"), "IssueInstant")
        if issued_at > now + skew:
            raise TokenRejected("assertion was issued in the future")
        self._check_issuer(signed)
        confirmation_end = self._check_subject_confirmation(signed, now, skew)
        conditions_end = self._check_conditions(signed, now, skew)
        auth_time, session_end = _authn_statement(signed, now, skew)
        # The session ends with the assertion (Conditions NotOnOrAfter, else the confirmation's),
        # or with SessionNotOnOrAfter if earlier; it is acceptable (and remembered for replay)
        # until the earliest of all of them, plus skew.
        expires_at = conditions_end if conditions_end is not None else confirmation_end
        if session_end is not None:
            expires_at = min(expires_at, session_end)
        acceptable_until = min(
            end for end in (confirmation_end, conditions_end, session_end) if end is not None
        )
        attributes = _attributes(signed)
        principal = Principal(
            idp=self._config.name,
            subject=self._subject(signed, attributes),
            groups=normalise_groups(
                value for name in self._mapping.groups for value in attributes.get(name, ())
            ),
            idp_roles=frozenset(
                value
                for name in self._mapping.roles
                for value in attributes.get(name, ())
                if value
            ),
            token_type=TokenType.SAML2,
            expires_at=int(expires_at),
            auth_time=int(auth_time),
            attributes=_profile_attributes(attributes, self._mapping),
            issued_at=int(issued_at),
        )
        return assertion_id, principal, acceptable_until + skew

    def _check_issuer(self, signed: etree._Element) -> None:
        issuers = signed.findall(ISSUER)
        if len(issuers) != 1 or _text(issuers[0]) != self._config.issuer:
            raise TokenRejected("issuer is not acceptable")
        if issuers[0].get("Format") not in (None, NAMEID_ENTITY):
            raise TokenRejected("issuer is not acceptable")

    def _check_subject_confirmation(self, signed: etree._Element, now: float, skew: float) -> float:
        """A bearer confirmation for this recipient, with an expiry, currently valid; returns its
        ``NotOnOrAfter``."""
        subjects = signed.findall(SUBJECT)
        if len(subjects) != 1:
            raise TokenRejected("assertion must have exactly one Subject")
        for confirmation in subjects[0].findall(SUBJECT_CONFIRMATION):
            if confirmation.get("Method") != CM_BEARER:
                continue
            for data in confirmation.findall(SUBJECT_CONFIRMATION_DATA):
                if data.get("Recipient") != self._acs_url:
                    continue
                not_on_or_after = data.get("NotOnOrAfter")
                if not_on_or_after is None:
                    continue
                end = _saml_time(not_on_or_after, "SubjectConfirmationData NotOnOrAfter")
                not_before = data.get("NotBefore")
                if not_before is not None and (
                    _saml_time(not_before, "SubjectConfirmationData NotBefore") > now + skew
                ):
                    continue
                if now < end + skew:
                    return end
        raise TokenRejected(
            "assertion has no acceptable bearer subject confirmation (recipient or validity)"
        )

    def _check_conditions(self, signed: etree._Element, now: float, skew: float) -> float | None:
        """One Conditions: time window, every AudienceRestriction names us, nothing unknown;
        returns its ``NotOnOrAfter``, if any."""
        conditions = signed.findall(CONDITIONS)
        if len(conditions) != 1:
            raise TokenRejected("assertion must have exactly one Conditions")
        element = conditions[0]
        not_before = element.get("NotBefore")
        if not_before is not None and _saml_time(not_before, "NotBefore") > now + skew:
            raise TokenRejected("assertion is not yet valid")
        end: float | None = None
        not_on_or_after = element.get("NotOnOrAfter")
        if not_on_or_after is not None:
            end = _saml_time(not_on_or_after, "NotOnOrAfter")
            if now >= end + skew:
                raise TokenRejected("assertion has expired")
        restrictions = 0
        for condition in element:
            if condition.tag == AUDIENCE_RESTRICTION:
                restrictions += 1
                audiences = {_text(a) for a in condition.findall(AUDIENCE)}
                if self._sp_entity_id not in audiences:
                    raise TokenRejected("assertion audience is not acceptable")
            elif condition.tag not in (ONE_TIME_USE, PROXY_RESTRICTION):
                raise TokenRejected("assertion carries a condition the broker does not understand")
        if not restrictions:
            raise TokenRejected("assertion audience is not acceptable")
        return end

    def _subject(self, signed: etree._Element, attributes: Mapping[str, list[str]]) -> str:
        subject = signed.find(SUBJECT)
        if subject is not None and (
            subject.find(ENCRYPTED_ID) is not None or subject.find(BASE_ID) is not None
        ):
            raise TokenRejected("encrypted or base identifiers are not supported")
        if self._mapping.subject == NAMEID_SUBJECT:
            name_ids = subject.findall(NAME_ID) if subject is not None else []
            if len(name_ids) != 1:
                raise TokenRejected("assertion must have exactly one NameID")
            name_id = name_ids[0]
            if name_id.get("Format") == NAMEID_TRANSIENT:
                raise TokenRejected(
                    "a transient NameID is not a stable subject; map claims.subject to an attribute"
                )
            qualifier = name_id.get("SPNameQualifier")
            if qualifier is not None and qualifier != self._sp_entity_id:
                raise TokenRejected("NameID SPNameQualifier is not acceptable")
            value = _text(name_id)
        else:
            values = attributes.get(self._mapping.subject, [])
            value = values[0] if len(values) == 1 else None
        if not value:
            raise TokenRejected("assertion has no usable subject")
        if len(value) > MAX_SUBJECT_LENGTH or not value.isprintable():
            raise TokenRejected("assertion subject is malformed")
        return value


# ---------------------------------------------------------------------------------------------
# structural checks and extraction helpers
# ---------------------------------------------------------------------------------------------


def _single_assertion(root: etree._Element) -> etree._Element:
    """Exactly one assertion in the whole document, where the profile puts it, and unique IDs
    (so that the signature's ``#ID`` reference can only mean that assertion)."""
    if any(True for _ in root.iter(ENCRYPTED_ASSERTION)):
        raise TokenRejected("encrypted assertions are not supported")
    assertions = list(root.iter(ASSERTION))
    if len(assertions) != 1:
        raise TokenRejected("exactly one assertion is required")
    assertion = assertions[0]
    if assertion is not root and assertion.getparent() is not root:
        raise TokenRejected("the assertion must be a direct child of the response")
    seen: set[str] = set()
    for element in root.iter():
        for attribute in ID_ATTRIBUTES:
            value = element.get(attribute)
            if value is None:
                continue
            if value in seen:
                raise TokenRejected("SAML token repeats an ID")
            seen.add(value)
    return assertion


def _single_signature(root: etree._Element, assertion: etree._Element) -> etree._Element:
    """The assertion's one enveloped signature; any other signature must be the Response's own."""
    own = assertion.findall(SIGNATURE)
    if not own:
        raise TokenRejected("assertion is not signed")
    if len(own) > 1:
        raise TokenRejected("assertion signature is not valid")
    for signature in root.iter(SIGNATURE):
        if signature is own[0]:
            continue
        if not (root.tag == RESPONSE and signature.getparent() is root):
            raise TokenRejected("SAML token carries an unexpected signature")
    return own[0]


def _single(parent: etree._Element, tag: str) -> etree._Element:
    found = parent.findall(tag)
    if len(found) != 1:
        raise TokenRejected("assertion signature is not valid")
    return found[0]


def _check_signed_info(signature: etree._Element, assertion_id: str) -> _SignedAlgorithms:
    """One reference, to this assertion, with only enveloped-signature and exclusive C14N, and
    SHA-2 digest and signature algorithms."""
    signed_info = _single(signature, SIGNED_INFO)
    if _single(signed_info, C14N_METHOD).get("Algorithm") != EXC_C14N:
        raise TokenRejected("signature canonicalization is not acceptable")
    signature_algorithm = SIGNATURE_ALGORITHMS.get(
        _single(signed_info, SIGNATURE_METHOD).get("Algorithm") or ""
    )
    if signature_algorithm is None:
        raise TokenRejected("deprecated or unsupported signature algorithm")
    reference = _single(signed_info, REFERENCE)
    if reference.get("URI") != f"#{assertion_id}":
        raise TokenRejected("assertion signature does not reference the assertion")
    transforms = reference.findall(TRANSFORMS)
    algorithms = (
        [t.get("Algorithm") for t in transforms[0].findall(TRANSFORM)] if transforms else []
    )
    if (
        len(transforms) > 1
        or ENVELOPED_SIGNATURE not in algorithms
        or any(a not in (ENVELOPED_SIGNATURE, EXC_C14N) for a in algorithms)
    ):
        raise TokenRejected("signature transforms are not acceptable")
    digest_algorithm = DIGEST_ALGORITHMS.get(
        _single(reference, DIGEST_METHOD).get("Algorithm") or ""
    )
    if digest_algorithm is None:
        raise TokenRejected("deprecated or unsupported digest algorithm")
    return _SignedAlgorithms(signature=signature_algorithm, digest=digest_algorithm)


def _saml_time(value: str | None, what: str) -> float:
    """Seconds since the epoch of a SAML UTC ``xs:dateTime`` (``...Z``, optional fraction)."""
    if value is None:
        raise TokenRejected(f"assertion has no {what}")
    match = _SAML_TIME.fullmatch(value)
    if match is None:
        raise TokenRejected(f"assertion {what} is not a SAML UTC time")
    try:
        moment = datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise TokenRejected(f"assertion {what} is not a SAML UTC time") from None
    fraction = float(match.group(2)) if match.group(2) else 0.0
    return moment.timestamp() + fraction


def _authn_statement(signed: etree._Element, now: float, skew: float) -> tuple[float, float | None]:
    """``AuthnInstant`` and ``SessionNotOnOrAfter`` (checked) of the one AuthnStatement."""
    statements = signed.findall(AUTHN_STATEMENT)
    if len(statements) != 1:
        raise TokenRejected("exactly one AuthnStatement is required")
    auth_time = _saml_time(statements[0].get("AuthnInstant"), "AuthnInstant")
    if auth_time > now + skew:
        raise TokenRejected("assertion authentication time is in the future")
    session = statements[0].get("SessionNotOnOrAfter")
    if session is None:
        return auth_time, None
    session_end = _saml_time(session, "SessionNotOnOrAfter")
    if now >= session_end + skew:
        raise TokenRejected("assertion session has expired")
    return auth_time, session_end


def _attributes(signed: etree._Element) -> dict[str, list[str]]:
    """Attribute name -> its simple string values (complex values are ignored)."""
    attributes: dict[str, list[str]] = {}
    for statement in signed.findall(ATTRIBUTE_STATEMENT):
        if statement.find(ENCRYPTED_ATTRIBUTE) is not None:
            raise TokenRejected("encrypted attributes are not supported")
        for attribute in statement.findall(ATTRIBUTE):
            name = attribute.get("Name")
            if not name:
                continue
            values = attributes.setdefault(name, [])
            for element in attribute.findall(ATTRIBUTE_VALUE):
                value = _text(element)
                if value is not None and value.isprintable():
                    values.append(value)
    return attributes


def _first(attributes: Mapping[str, list[str]], names: Iterable[str]) -> str | None:
    for name in names:
        values = attributes.get(name)
        if values:
            return values[0]
    return None


def _profile_attributes(
    attributes: Mapping[str, list[str]], mapping: SamlAttributeMapping
) -> dict[str, str]:
    """``email`` and ``name``, when the mapped attributes carry them."""
    profile: dict[str, str] = {}
    email = _first(attributes, mapping.email)
    if email is not None:
        profile["email"] = email
    name = _first(attributes, mapping.name)
    if name is not None:
        profile["name"] = name
    return profile

"""Hostile tokens against OidcAdapter (real loopback issuer): each is refused with TokenRejected,
never another exception, and the public reason never repeats any part of the token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from broker.types import TokenType
from idp_adapters._loopback import RunningServer
from idp_adapters.base import TokenRejected
from idp_adapters.oidc import OidcAdapter
from tests.support.jose import b64, compact, public_jwk

pytestmark = pytest.mark.anyio

ServeRecorded = Callable[[Any], tuple[RunningServer, Any]]


def json_app(document: dict[str, Any]) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": json.dumps(document).encode()})

    return app


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def adapter(shared_dev_idp: Any) -> AsyncIterator[OidcAdapter]:
    async with httpx.AsyncClient() as http:
        yield OidcAdapter(shared_dev_idp.config(), http, shared_dev_idp.clock)


class Hostile:
    """Builds tokens for the shared dev IdP: valid claims, signed by its real key unless told."""

    def __init__(self, served: Any) -> None:
        self.idp = served.provider
        self.clock = served.clock

    @property
    def now(self) -> int:
        return int(self.clock.now())

    @property
    def kid(self) -> str:
        return self.idp.signing_key[0]

    @property
    def key(self) -> rsa.RSAPrivateKey:
        return self.idp.signing_key[1]

    def claims(self, **overrides: Any) -> dict[str, Any]:
        return self.idp.claims_for("alice", extra_claims=overrides)

    def header(self, **overrides: Any) -> dict[str, Any]:
        header: dict[str, Any] = {"alg": "RS256", "typ": "JWT", "kid": self.kid}
        header.update(overrides)
        return {k: v for k, v in header.items() if v is not None}


@pytest.fixture
def hostile(shared_dev_idp: Any) -> Hostile:
    return Hostile(shared_dev_idp)


async def refused(
    adapter: OidcAdapter,
    token: str,
    token_type: TokenType = TokenType.ID_TOKEN,
    match: str | None = None,
) -> str:
    try:
        await adapter.authenticate(token, token_type)
    except TokenRejected as exc:
        assert type(exc) is TokenRejected
        for part in token.split("."):
            if len(part) >= 6:
                assert part not in exc.reason
                assert part not in str(exc)
        if match is not None:
            assert match in exc.reason, exc.reason
        return exc.reason
    except BaseException as exc:  # pragma: no cover - the failure being tested for
        pytest.fail(f"expected TokenRejected, got {type(exc).__name__}: {exc}")
    pytest.fail("hostile token was accepted")


async def test_control_a_valid_token_is_accepted(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(), hostile.key)
    assert (await adapter.authenticate(token, TokenType.ID_TOKEN)).subject == "alice"


# --- algorithm confusion -----------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "AAAA"])
async def test_alg_none(alg: str, signature: str, adapter: OidcAdapter, hostile: Hostile) -> None:
    unsigned = compact(hostile.header(alg=alg), hostile.claims())
    await refused(adapter, unsigned[: unsigned.rindex(".") + 1] + signature, match="algorithm")


@pytest.mark.parametrize("pem_format", [PublicFormat.SubjectPublicKeyInfo, PublicFormat.PKCS1])
async def test_hs256_signed_with_public_key_pem(
    pem_format: PublicFormat, adapter: OidcAdapter, hostile: Hostile
) -> None:
    pem = hostile.key.public_key().public_bytes(Encoding.PEM, pem_format)
    header = b64(json.dumps(hostile.header(alg="HS256")).encode())
    payload = b64(json.dumps(hostile.claims()).encode())
    mac = hmac.new(pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    await refused(adapter, f"{header}.{payload}.{b64(mac)}", match="algorithm")


async def test_header_alg_swapped_after_signing(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(), hostile.key)
    _, payload, signature = token.split(".")
    swapped = b64(json.dumps(hostile.header(alg="PS256")).encode())
    await refused(adapter, f"{swapped}.{payload}.{signature}")


# --- keys from the token ------------------------------------------------------------------


@pytest.mark.parametrize("kid_choice", ["attacker", "legit", "absent"])
async def test_embedded_jwk_header_is_not_trusted(
    kid_choice: str, adapter: OidcAdapter, hostile: Hostile, attacker_key: rsa.RSAPrivateKey
) -> None:
    kid = {"attacker": "attacker-1", "legit": hostile.kid, "absent": None}[kid_choice]
    header = hostile.header(kid=kid, jwk=public_jwk(attacker_key, kid))
    await refused(adapter, compact(header, hostile.claims(), attacker_key))


@pytest.mark.parametrize("member", ["jku", "x5u"])
@pytest.mark.parametrize("kid_choice", ["attacker", "legit"])
async def test_key_url_headers_are_never_fetched(
    member: str,
    kid_choice: str,
    adapter: OidcAdapter,
    hostile: Hostile,
    attacker_key: rsa.RSAPrivateKey,
    serve_recorded: ServeRecorded,
) -> None:
    kid = "attacker-1" if kid_choice == "attacker" else hostile.kid
    server, recorder = serve_recorded(json_app({"keys": [public_jwk(attacker_key, kid)]}))
    header = hostile.header(kid=kid, **{member: f"{server.url}/jwks.json"})
    await refused(adapter, compact(header, hostile.claims(), attacker_key))
    assert sum(recorder.hits.values()) == 0


async def test_x5c_header_is_not_trusted(
    adapter: OidcAdapter, hostile: Hostile, attacker_key: rsa.RSAPrivateKey
) -> None:
    der = attacker_key.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    header = hostile.header(kid="attacker-1", x5c=[base64.b64encode(der).decode()])
    await refused(adapter, compact(header, hostile.claims(), attacker_key))


@pytest.mark.parametrize(
    "kid", ["unknown-kid", "../../etc/passwd", "' OR 1=1 --", "%2e%2e%2f", "*", ""]
)
async def test_unknown_and_injection_kids(kid: str, adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(kid=kid), hostile.claims(), hostile.key)
    await refused(adapter, token, match="signing key is unknown")


async def test_signed_by_another_key(
    adapter: OidcAdapter, hostile: Hostile, attacker_key: rsa.RSAPrivateKey
) -> None:
    token = compact(hostile.header(), hostile.claims(), attacker_key)
    await refused(adapter, token, match="signature is invalid")


# --- time -------------------------------------------------------------------------------


async def test_expired(adapter: OidcAdapter, hostile: Hostile) -> None:
    now = hostile.now
    token = compact(hostile.header(), hostile.claims(iat=now - 7200, exp=now - 3600), hostile.key)
    await refused(adapter, token, match="expired")


async def test_not_yet_valid(adapter: OidcAdapter, hostile: Hostile) -> None:
    now = hostile.now
    token = compact(hostile.header(), hostile.claims(nbf=now + 3600), hostile.key)
    await refused(adapter, token, match="not yet valid")


async def test_issued_in_the_future(adapter: OidcAdapter, hostile: Hostile) -> None:
    now = hostile.now
    token = compact(hostile.header(), hostile.claims(iat=now + 3600, exp=now + 7200), hostile.key)
    await refused(adapter, token, match="future")


async def test_missing_exp(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(exp=None), hostile.key)
    await refused(adapter, token, match="'exp'")


# --- issuer and audience ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["other", "prefix", "trailing-slash", "uppercase", "list"])
async def test_wrong_issuer(variant: str, adapter: OidcAdapter, hostile: Hostile) -> None:
    issuer = hostile.idp.issuer
    iss = {
        "other": "https://evil.example.com",
        "prefix": issuer[:-1],
        "trailing-slash": issuer + "/",
        "uppercase": issuer.upper(),
        "list": [issuer],
    }[variant]
    token = compact(hostile.header(), hostile.claims(iss=iss), hostile.key)
    await refused(adapter, token, match="issuer")


async def test_wrong_audience(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(aud="some-other-app"), hostile.key)
    await refused(adapter, token, match="audience")


async def test_missing_audience(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(aud=None), hostile.key)
    await refused(adapter, token, match="audience")


async def test_id_token_presented_as_access_token(
    adapter: OidcAdapter, hostile: Hostile, shared_dev_idp: Any
) -> None:
    await refused(adapter, hostile.idp.mint("alice"), TokenType.ACCESS_TOKEN, match="ID token")
    # Even with an audience accepted for both, an ID token's nonce/at_hash gives it away.
    client_id = hostile.idp.client_id
    async with httpx.AsyncClient() as http:
        overlapping = OidcAdapter(
            shared_dev_idp.config(audiences=[client_id]), http, shared_dev_idp.clock
        )
        for marker in ({"nonce": "n-1"}, {"at_hash": "abc"}, {"c_hash": "def"}):
            token = hostile.idp.mint("alice", extra_claims=marker)
            await refused(overlapping, token, TokenType.ACCESS_TOKEN, match="ID token")


async def test_access_token_presented_as_id_token(
    adapter: OidcAdapter, hostile: Hostile, shared_dev_idp: Any
) -> None:
    access = hostile.idp.mint("alice", token_type="access_token")
    await refused(adapter, access, TokenType.ID_TOKEN, match="access token")
    async with httpx.AsyncClient() as http:
        overlapping = OidcAdapter(
            shared_dev_idp.config(client_ids=[hostile.idp.audience]), http, shared_dev_idp.clock
        )
        await refused(overlapping, access, TokenType.ID_TOKEN, match="access token")


# --- size and structure ----------------------------------------------------------------


async def test_oversized_token(adapter: OidcAdapter, hostile: Hostile) -> None:
    padding = "x" * (32 * 1024)
    token = compact(hostile.header(), hostile.claims(padding=padding), hostile.key)
    await refused(adapter, token, match="too large")


async def test_duplicate_claims_resigned(adapter: OidcAdapter, hostile: Hostile) -> None:
    body = json.dumps(hostile.claims())
    duplicated = (body[:-1] + ', "sub": "admin"}').encode()
    token = compact(hostile.header(), duplicated, hostile.key)
    await refused(adapter, token, match="duplicate")


async def test_duplicate_header_members_resigned(adapter: OidcAdapter, hostile: Hostile) -> None:
    header = json.dumps(hostile.header())[:-1] + ', "alg": "none"}'
    token = compact(header.encode(), hostile.claims(), hostile.key)
    await refused(adapter, token, match="duplicate")


async def test_truncated_signature(adapter: OidcAdapter, hostile: Hostile) -> None:
    token = compact(hostile.header(), hostile.claims(), hostile.key)
    for cut in (1, 2, 4, 100, len(token.rsplit(".", 1)[1])):
        await refused(adapter, token[:-cut])


async def test_unknown_crit(adapter: OidcAdapter, hostile: Hostile) -> None:
    for crit in (["urn:example:unknown"], ["exp"], ["b64"]):
        header = hostile.header(crit=crit, **{"urn:example:unknown": 1, "b64": False})
        await refused(adapter, compact(header, hostile.claims(), hostile.key), match="critical")


@pytest.mark.parametrize("segments", [2, 4, 5, 1])
async def test_wrong_segment_count(segments: int, adapter: OidcAdapter, hostile: Hostile) -> None:
    parts = compact(hostile.header(), hostile.claims(), hostile.key).split(".")
    parts = (parts + [parts[-1]] * 3)[:segments]
    await refused(adapter, ".".join(parts), match="malformed")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "!!!.@@@.###",
        "eyJ.eyJ.eyJ",
        "e30.e30.e30",
        "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
        "eyJhbGciOiJSUzI1NiJ9====.e30.AAAA",
        "eyJhbGciOiJSUzI1NiJ9.e30.AA+/",
        "W10.e30.AAAA",
        "\u0000.\u0000.\u0000",
        "ëyJ.ëyJ.ëyJ",
    ],
)
async def test_garbage(token: str, adapter: OidcAdapter) -> None:
    await refused(adapter, token)


async def test_type_confusion_in_claims(adapter: OidcAdapter, hostile: Hostile) -> None:
    for overrides in ({"exp": "tomorrow"}, {"sub": 12345}, {"aud": {"x": 1}}, {"iat": True}):
        token = compact(hostile.header(), hostile.claims(**overrides), hostile.key)
        await refused(adapter, token)

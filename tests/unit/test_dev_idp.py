"""The development IdP's pure parts: people file, minting, key rotation, loopback-only rules."""

from __future__ import annotations

from pathlib import Path

import jwt
import pytest

from broker.clock import FrozenClock
from idp_adapters._loopback import reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider, DevPerson, load_dev_people

PEOPLE = {"alice": DevPerson("alice", ("support",), "alice@example.com", "Alice")}


@pytest.fixture(scope="module")
def provider() -> DevIdentityProvider:
    return DevIdentityProvider("http://127.0.0.1:9", PEOPLE, clock=FrozenClock(start=1_800_000_000))


def decode(provider: DevIdentityProvider, token: str, audience: str) -> dict[str, object]:
    kid, key = provider.signing_key
    assert jwt.get_unverified_header(token)["kid"] == kid
    return jwt.decode(
        token,
        key.public_key(),
        algorithms=["RS256"],
        audience=audience,
        options={"verify_exp": False, "verify_iat": False},
    )


def test_load_people_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "people.yaml"
    path.write_text(
        "people:\n"
        "  alice: {groups: [support], email: alice@example.com, name: Alice Example}\n"
        "  erin: {groups: []}\n"
    )
    people = load_dev_people(path)
    assert people["alice"] == DevPerson("alice", ("support",), "alice@example.com", "Alice Example")
    assert people["erin"] == DevPerson("erin", (), "erin@example.com", "erin")


@pytest.mark.parametrize(
    "text",
    [
        "[]",
        "people: []",
        "people: {alice: [support]}",
        "people: {alice: {groups: support}}",
        "people: {alice: {groups: [1]}}",
        "people: {alice: {email: 7}}",
        "people: {alice: {role: admin}}",
    ],
)
def test_load_people_rejects_bad_shapes(text: str, tmp_path: Path) -> None:
    path = tmp_path / "people.yaml"
    path.write_text(text)
    with pytest.raises(ValueError):
        load_dev_people(path)


@pytest.mark.parametrize(
    "issuer", ["https://idp.example.com", "http://10.0.0.1:8081", "ftp://127.0.0.1/x"]
)
def test_refuses_non_loopback_issuers(issuer: str) -> None:
    with pytest.raises(ValueError, match="loopback"):
        DevIdentityProvider(issuer, PEOPLE)


def test_refuses_symmetric_or_unknown_algorithms() -> None:
    with pytest.raises(ValueError, match="algorithm"):
        DevIdentityProvider("http://127.0.0.1:9", PEOPLE, algorithm="HS256")


def test_minted_id_and_access_tokens(provider: DevIdentityProvider) -> None:
    id_token = provider.mint("alice")
    assert jwt.get_unverified_header(id_token)["typ"] == "JWT"
    claims = decode(provider, id_token, "broker-dev")
    assert claims["iss"] == "http://127.0.0.1:9"
    assert claims["sub"] == "alice"
    assert claims["groups"] == ["support"]
    assert claims["exp"] == 1_800_000_000 + 3600
    assert "nonce" not in claims
    access = provider.mint("alice", token_type="access_token", lifetime=60)
    assert jwt.get_unverified_header(access)["typ"] == "at+jwt"
    claims = decode(provider, access, "broker")
    assert claims["scope"] == "openid profile email"
    assert claims["client_id"] == "broker-dev"
    assert claims["exp"] == 1_800_000_000 + 60
    with pytest.raises(KeyError):
        provider.mint("mallory")


def test_extra_claims_and_headers(provider: DevIdentityProvider) -> None:
    token = provider.mint(
        "alice", extra_claims={"aud": None, "acr": "1"}, headers={"kid": None, "x": "y"}
    )
    header = jwt.get_unverified_header(token)
    assert "kid" not in header
    assert header["x"] == "y"
    payload = jwt.decode(token, options={"verify_signature": False})
    assert "aud" not in payload
    assert payload["acr"] == "1"
    with pytest.raises(ValueError, match="alg"):
        provider.mint("alice", headers={"alg": "none"})


def test_rotation_keeps_old_public_keys() -> None:
    provider = DevIdentityProvider("http://127.0.0.1:9", PEOPLE)
    first = provider.signing_key[0]
    second = provider.rotate_keys()
    assert provider.signing_key[0] == second != first
    assert [k["kid"] for k in provider.jwks()["keys"]] == [first, second]
    assert all("d" not in k and k["use"] == "sig" for k in provider.jwks()["keys"])
    provider.retire_key(first)
    assert provider.key_ids == (second,)
    with pytest.raises(ValueError):
        provider.retire_key(second)


def test_issuer_with_path_and_discovery_document() -> None:
    provider = DevIdentityProvider("http://localhost:9/realms/dev", PEOPLE)
    document = provider.discovery_document()
    assert document["issuer"] == "http://localhost:9/realms/dev"
    assert document["jwks_uri"] == "http://localhost:9/realms/dev/jwks.json"
    assert (
        provider.discovery_url == "http://localhost:9/realms/dev/.well-known/openid-configuration"
    )


def test_loopback_server_refuses_other_hosts() -> None:
    with pytest.raises(ValueError, match="loopback"):
        reserve_loopback_socket("0.0.0.0")
    with pytest.raises(ValueError, match="loopback"):
        serve_in_thread(object(), "192.0.2.1", 0)


def test_serve_in_thread_port_zero_and_stop() -> None:
    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        raise AssertionError("not called")

    server = serve_in_thread(app)
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"
    assert server.running
    server.stop()
    server.stop()
    assert not server.running
    sock = reserve_loopback_socket()
    sock.close()

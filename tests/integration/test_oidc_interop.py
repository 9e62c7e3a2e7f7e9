"""Interop: ID tokens signed by an independent OIDC provider (oidc-provider-mock, built on Authlib),
obtained through its real authorization code flow over HTTP, verified by OidcAdapter."""

from __future__ import annotations

import base64
import json
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from broker.clock import SystemClock
from broker.settings import IdentityProviderConfig
from broker.types import TokenType
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.oidc import OidcAdapter

with warnings.catch_warnings():
    # Authlib (under oidc-provider-mock) warns about its own deprecated modules on import, after
    # installing an "always" filter for those warnings; silence them for this import only.
    import authlib.deprecate  # noqa: F401

    warnings.simplefilter("ignore")
    import oidc_provider_mock

pytestmark = pytest.mark.anyio

CLIENT_ID = "broker-interop"
REDIRECT_URI = "http://localhost/callback"


@pytest.fixture(scope="module")
def mock_provider() -> Iterator[str]:
    """oidc-provider-mock on a free loopback port; yields its issuer (``http://localhost:<port>``,
    the host the provider derives its issuer from)."""
    users = [
        oidc_provider_mock.User(
            sub="alice",
            claims={"email": "alice@example.com", "name": "Alice Interop", "groups": ["support"]},
        )
    ]
    with oidc_provider_mock.run_server_in_thread(port=0, user_claims=users) as server:
        yield f"http://localhost:{server.server_port}"


async def authorization_code_flow(
    http: httpx.AsyncClient, issuer: str, *, sub: str = "alice", nonce: str = "n-0S6_WzA2Mj"
) -> dict[str, Any]:
    """Run the provider's authorization code flow like a browser + relying party would."""
    metadata = (await http.get(f"{issuer}/.well-known/openid-configuration")).json()
    params = {
        "client_id": CLIENT_ID,
        "redirect_uri": REDIRECT_URI,
        "response_type": "code",
        "scope": "openid email profile",
        "state": "af0ifjsldkj",
        "nonce": nonce,
    }
    form = await http.get(metadata["authorization_endpoint"], params=params)
    assert form.status_code == 200
    consent = await http.post(metadata["authorization_endpoint"], params=params, data={"sub": sub})
    assert consent.status_code == 302
    redirect = urlsplit(consent.headers["location"])
    query = parse_qs(redirect.query)
    assert query["state"] == ["af0ifjsldkj"]
    response = await http.post(
        metadata["token_endpoint"],
        data={
            "grant_type": "authorization_code",
            "code": query["code"][0],
            "redirect_uri": REDIRECT_URI,
            "client_id": CLIENT_ID,
            "client_secret": "interop-secret",
        },
    )
    assert response.status_code == 200, response.text
    tokens: dict[str, Any] = response.json()
    return tokens


def config(issuer: str, **overrides: Any) -> IdentityProviderConfig:
    values: dict[str, Any] = {
        "name": "interop",
        "issuer": issuer,
        "client_ids": [CLIENT_ID],
        "audiences": ["https://broker.example"],
    }
    values.update(overrides)
    return IdentityProviderConfig(**values)


def unverified_payload(token: str) -> dict[str, Any]:
    segment = token.split(".")[1]
    payload: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    )
    return payload


async def test_id_token_from_authorization_code_flow(mock_provider: str) -> None:
    async with httpx.AsyncClient() as http:
        tokens = await authorization_code_flow(http, mock_provider)
        adapter = OidcAdapter(config(mock_provider), http, SystemClock())
        principal = await adapter.authenticate(tokens["id_token"], TokenType.ID_TOKEN)
        via_jwt = await adapter.authenticate(tokens["id_token"], TokenType.JWT)
    claims = unverified_payload(tokens["id_token"])
    assert claims["iss"] == mock_provider
    assert claims["nonce"] == "n-0S6_WzA2Mj"
    assert principal.idp == "interop"
    assert principal.subject == "alice"
    assert principal.groups == {"support"}
    assert principal.attributes == {"email": "alice@example.com", "name": "Alice Interop"}
    assert principal.token_type is TokenType.ID_TOKEN
    assert principal.expires_at == claims["exp"]
    assert principal.auth_time == claims["auth_time"]
    assert via_jwt.token_type is TokenType.ID_TOKEN


async def test_ad_hoc_user(mock_provider: str) -> None:
    async with httpx.AsyncClient() as http:
        tokens = await authorization_code_flow(http, mock_provider, sub="bob@example.com")
        adapter = OidcAdapter(config(mock_provider), http, SystemClock())
        principal = await adapter.authenticate(tokens["id_token"], TokenType.ID_TOKEN)
    assert principal.subject == "bob@example.com"
    assert principal.groups == frozenset()


async def test_mock_tokens_are_refused_where_they_do_not_fit(mock_provider: str) -> None:
    async with httpx.AsyncClient() as http:
        tokens = await authorization_code_flow(http, mock_provider)
        adapter = OidcAdapter(config(mock_provider), http, SystemClock())
        # The ID token is not an access token (wrong audience, and it carries nonce/at_hash).
        with pytest.raises(TokenRejected):
            await adapter.authenticate(tokens["id_token"], TokenType.ACCESS_TOKEN)
        # The provider's access token is opaque, not a JWT.
        with pytest.raises(TokenRejected, match="malformed"):
            await adapter.authenticate(tokens["access_token"], TokenType.ACCESS_TOKEN)
        # Another relying party's client id.
        other = OidcAdapter(config(mock_provider, client_ids=["someone-else"]), http, SystemClock())
        with pytest.raises(TokenRejected, match="audience"):
            await other.authenticate(tokens["id_token"], TokenType.ID_TOKEN)
        # A tampered payload.
        header, _, signature = tokens["id_token"].split(".")
        forged = {**unverified_payload(tokens["id_token"]), "sub": "admin"}
        body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
        with pytest.raises(TokenRejected, match="signature"):
            await adapter.authenticate(f"{header}.{body}.{signature}", TokenType.ID_TOKEN)


async def test_issuer_must_match_the_providers_exactly(mock_provider: str) -> None:
    alias = mock_provider.replace("localhost", "127.0.0.1")
    async with httpx.AsyncClient() as http:
        tokens = await authorization_code_flow(http, mock_provider)
        # The provider names itself after the Host it is reached by: reached as 127.0.0.1 it
        # serves a consistent document for that issuer, and the localhost token does not match.
        aliased = OidcAdapter(config(alias), http, SystemClock())
        with pytest.raises(TokenRejected, match="issuer"):
            await aliased.authenticate(tokens["id_token"], TokenType.ID_TOKEN)
        # A discovery document naming another issuer than the configured one: nothing is trusted.
        mismatched = OidcAdapter(
            config(alias, discovery_url=f"{mock_provider}/.well-known/openid-configuration"),
            http,
            SystemClock(),
        )
        with pytest.raises(IdentityProviderUnavailable, match="different issuer"):
            await mismatched.authenticate(tokens["id_token"], TokenType.ID_TOKEN)
        # With keys configured directly (no discovery), the token's iss still has to match.
        pinned = OidcAdapter(config(alias, jwks_uri=f"{mock_provider}/jwks"), http, SystemClock())
        with pytest.raises(TokenRejected, match="issuer"):
            await pinned.authenticate(tokens["id_token"], TokenType.ID_TOKEN)

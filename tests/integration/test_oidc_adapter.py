"""OidcAdapter against a real loopback OIDC issuer (the DevIdentityProvider over HTTP).

Covers discovery, ID and access token profiles, key rotation without restart, the unknown-kid
refresh limit (counting JWKS requests), outages, and discovery/issuer consistency.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.clock import SystemClock
from broker.settings import IdentityProviderConfig
from broker.types import TokenType
from idp_adapters._loopback import RunningServer, reserve_loopback_socket
from idp_adapters.base import IdentityAdapter, IdentityProviderUnavailable, TokenRejected
from idp_adapters.dev import load_dev_people
from idp_adapters.oidc import OidcAdapter
from idp_adapters.registry import build_identity_adapters

pytestmark = pytest.mark.anyio

ServeRecorded = Callable[[Any], tuple[RunningServer, Any]]


def json_app(document: dict[str, Any]) -> Callable[..., Any]:
    """A minimal ASGI app answering every GET with `document` as JSON."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.dumps(document).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


async def test_id_token_via_discovery(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        assert isinstance(adapter, IdentityAdapter)
        assert adapter.name == "dev"
        assert adapter.issuer == dev_idp.issuer
        assert dev_idp.discovery_hits == 0  # lazy: nothing fetched before the first token
        principal = await adapter.authenticate(dev_idp.provider.mint("alice"), TokenType.ID_TOKEN)
    assert principal.idp == "dev"
    assert principal.subject == "alice"
    assert principal.person_id == "dev/alice"
    assert principal.groups == {"support"}
    assert principal.token_type is TokenType.ID_TOKEN
    assert principal.attributes == {"email": "alice@example.com", "name": "Alice Example"}
    assert principal.auth_time == int(dev_idp.clock.now())
    assert principal.issued_at == int(dev_idp.clock.now())  # iat, for revocation checks
    assert principal.expires_at == int(dev_idp.clock.now()) + 3600
    assert (dev_idp.discovery_hits, dev_idp.jwks_hits) == (1, 1)


async def test_access_token_and_jwt_type(dev_idp: Any) -> None:
    provider = dev_idp.provider
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        access = provider.mint("bob", token_type="access_token")
        principal = await adapter.authenticate(access, TokenType.ACCESS_TOKEN)
        assert principal.token_type is TokenType.ACCESS_TOKEN
        assert principal.auth_time is None
        assert principal.groups == {"engineering", "oncall"}
        as_jwt = await adapter.authenticate(access, TokenType.JWT)
        assert as_jwt.token_type is TokenType.ACCESS_TOKEN
        id_as_jwt = await adapter.authenticate(provider.mint("bob"), TokenType.JWT)
        assert id_as_jwt.token_type is TokenType.ID_TOKEN
        assert not adapter.accepts(TokenType.SAML2)
        with pytest.raises(TokenRejected, match="does not accept"):
            await adapter.authenticate(access, TokenType.REFRESH_TOKEN)
    assert dev_idp.jwks_hits == 1


async def test_tokens_from_the_token_endpoint(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        for kind, token_type in (("id_token", TokenType.ID_TOKEN), ("access_token", None)):
            response = await http.post(
                dev_idp.provider.token_endpoint, data={"person": "alice", "token_type": kind}
            )
            assert response.status_code == 200
            body = response.json()
            expected = token_type or TokenType.ACCESS_TOKEN
            assert body["issued_token_type"] == str(expected)
            principal = await adapter.authenticate(body[kind], expected)
            assert principal.subject == "alice"
        refused = await http.post(dev_idp.provider.token_endpoint, data={"person": "mallory"})
        assert refused.status_code == 400
        people = (await http.get(f"{dev_idp.issuer}/people")).json()["people"]
        assert {p["subject"] for p in people} == {"alice", "bob"}


async def test_profiles_need_configuration(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        only_access = OidcAdapter(dev_idp.config(client_ids=[]), http, dev_idp.clock)
        with pytest.raises(TokenRejected, match="accepts no ID tokens"):
            await only_access.authenticate(dev_idp.provider.mint("alice"), TokenType.ID_TOKEN)
        with pytest.raises(TokenRejected, match="neither"):
            await only_access.authenticate(dev_idp.provider.mint("alice"), TokenType.JWT)
        only_id = OidcAdapter(dev_idp.config(audiences=[]), http, dev_idp.clock)
        access = dev_idp.provider.mint("alice", token_type="access_token")
        with pytest.raises(TokenRejected, match="accepts no access tokens"):
            await only_id.authenticate(access, TokenType.ACCESS_TOKEN)


async def test_id_token_with_several_audiences_needs_azp(dev_idp: Any) -> None:
    provider = dev_idp.provider
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        multi = {"aud": [provider.client_id, "another-app"]}
        with pytest.raises(TokenRejected, match="authorized party"):
            await adapter.authenticate(
                provider.mint("alice", extra_claims=multi), TokenType.ID_TOKEN
            )
        with_azp = provider.mint("alice", extra_claims={**multi, "azp": provider.client_id})
        assert (await adapter.authenticate(with_azp, TokenType.ID_TOKEN)).subject == "alice"


async def test_claim_preset_and_subject_rules(dev_idp: Any) -> None:
    provider = dev_idp.provider
    async with httpx.AsyncClient() as http:
        entra = OidcAdapter(dev_idp.config(preset="entra"), http, dev_idp.clock)
        token = provider.mint("alice", extra_claims={"oid": "object-id-1", "roles": ["Agent"]})
        principal = await entra.authenticate(token, TokenType.ID_TOKEN)
        assert principal.subject == "object-id-1"
        assert principal.groups == {"support"}  # an app role is not a group
        assert principal.idp_roles == {"Agent"}
        with pytest.raises(TokenRejected, match="no usable subject"):
            await entra.authenticate(provider.mint("alice"), TokenType.ID_TOKEN)
        generic = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        for bad_subject in ("", "x" * 600, "line\nbreak"):
            token = provider.mint("alice", extra_claims={"sub": bad_subject})
            with pytest.raises(TokenRejected, match="subject"):
                await generic.authenticate(token, TokenType.ID_TOKEN)


async def test_key_rotation_is_picked_up_without_restart(dev_idp: Any) -> None:
    provider = dev_idp.provider
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        old_token = provider.mint("alice")
        await adapter.authenticate(old_token, TokenType.ID_TOKEN)
        provider.rotate_keys()
        new_token = provider.mint("alice")
        # Within the refresh interval the new kid is not fetched yet...
        with pytest.raises(TokenRejected, match="signing key is unknown"):
            await adapter.authenticate(new_token, TokenType.ID_TOKEN)
        assert dev_idp.jwks_hits == 1
        # ...once it has passed, the unknown kid triggers one refetch and verifies.
        dev_idp.clock.advance(31)
        assert (await adapter.authenticate(new_token, TokenType.ID_TOKEN)).subject == "alice"
        assert (await adapter.authenticate(old_token, TokenType.ID_TOKEN)).subject == "alice"
        assert dev_idp.jwks_hits == 2
        # A key the IdP stops publishing stops verifying after the next refresh.
        provider.retire_key(provider.key_ids[0])
        dev_idp.clock.advance(3600)
        with pytest.raises(TokenRejected, match="signing key is unknown"):
            await adapter.authenticate(old_token, TokenType.ID_TOKEN)
        assert dev_idp.discovery_hits == 1


async def test_unknown_kid_refresh_is_limited_per_interval(dev_idp: Any) -> None:
    provider = dev_idp.provider
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    claims = provider.claims_for("alice")
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        await adapter.authenticate(provider.mint("alice"), TokenType.ID_TOKEN)
        assert dev_idp.jwks_hits == 1

        def forged(i: int) -> str:
            return jwt.encode(claims, stranger, algorithm="RS256", headers={"kid": f"bad-{i}"})

        for i in range(20):
            with pytest.raises(TokenRejected, match="signing key is unknown"):
                await adapter.authenticate(forged(i), TokenType.ID_TOKEN)
        assert dev_idp.jwks_hits == 1
        dev_idp.clock.advance(30)
        outcomes = await asyncio.gather(
            *(adapter.authenticate(forged(i), TokenType.ID_TOKEN) for i in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(outcome, TokenRejected) for outcome in outcomes)
        assert dev_idp.jwks_hits == 2
        for i in range(20):
            with pytest.raises(TokenRejected):
                await adapter.authenticate(forged(i), TokenType.ID_TOKEN)
        assert dev_idp.jwks_hits == 2


async def test_concurrent_first_requests_share_one_fetch(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        tokens = [dev_idp.provider.mint(p) for p in ("alice", "bob") * 10]
        principals = await asyncio.gather(
            *(adapter.authenticate(t, TokenType.ID_TOKEN) for t in tokens)
        )
    assert {p.subject for p in principals} == {"alice", "bob"}
    assert (dev_idp.discovery_hits, dev_idp.jwks_hits) == (1, 1)


async def test_jwks_endpoint_down(dev_idp: Any) -> None:
    dev_idp.recorder.failing.add("/jwks.json")
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        token = dev_idp.provider.mint("alice")
        with pytest.raises(IdentityProviderUnavailable) as info:
            await adapter.authenticate(token, TokenType.ID_TOKEN)
        assert info.value.reason == "identity provider signing keys unavailable"
        assert "503" in (info.value.debug or "")
        dev_idp.recorder.failing.clear()
        dev_idp.clock.advance(1)
        assert (await adapter.authenticate(token, TokenType.ID_TOKEN)).subject == "alice"


async def test_discovery_down(dev_idp: Any) -> None:
    dev_idp.recorder.failing.add("/.well-known/openid-configuration")
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        with pytest.raises(IdentityProviderUnavailable, match="discovery"):
            await adapter.authenticate(dev_idp.provider.mint("alice"), TokenType.ID_TOKEN)


async def test_cached_keys_survive_a_jwks_outage(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(), http, dev_idp.clock)
        await adapter.authenticate(dev_idp.provider.mint("alice"), TokenType.ID_TOKEN)
        dev_idp.recorder.failing.add("/jwks.json")
        dev_idp.clock.advance(7200)  # well past max age: a refresh is attempted and fails
        principal = await adapter.authenticate(dev_idp.provider.mint("bob"), TokenType.ID_TOKEN)
        assert principal.subject == "bob"
        assert dev_idp.jwks_hits == 2


async def test_nothing_listening(dev_idp: Any) -> None:
    sock = reserve_loopback_socket()
    port = sock.getsockname()[1]
    sock.close()
    issuer = f"http://127.0.0.1:{port}"
    config = IdentityProviderConfig(name="gone", issuer=issuer, client_ids=["broker-dev"])
    token = dev_idp.provider.mint("alice", extra_claims={"iss": issuer})
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(config, http, SystemClock())
        with pytest.raises(IdentityProviderUnavailable, match="discovery") as info:
            await adapter.authenticate(token, TokenType.ID_TOKEN)
        assert "ConnectError" in (info.value.debug or "")
        # A malformed token is refused before anything is fetched.
        with pytest.raises(TokenRejected):
            await adapter.authenticate("a.b.c", TokenType.ID_TOKEN)


async def test_discovery_issuer_mismatch_is_refused(dev_idp: Any) -> None:
    # The same server, reached as "localhost": its document names 127.0.0.1 as issuer.
    issuer = dev_idp.issuer.replace("127.0.0.1", "localhost")
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(issuer=issuer), http, dev_idp.clock)
        token = dev_idp.provider.mint("alice", extra_claims={"iss": issuer})
        with pytest.raises(IdentityProviderUnavailable, match="different issuer") as info:
            await adapter.authenticate(token, TokenType.ID_TOKEN)
    assert dev_idp.jwks_hits == 0
    assert issuer not in info.value.reason


async def test_configured_jwks_uri_skips_discovery(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        config = dev_idp.config(jwks_uri=dev_idp.provider.jwks_uri)
        adapter = OidcAdapter(config, http, dev_idp.clock)
        await adapter.authenticate(dev_idp.provider.mint("alice"), TokenType.ID_TOKEN)
    assert (dev_idp.discovery_hits, dev_idp.jwks_hits) == (0, 1)


async def test_discovered_jwks_uri_must_be_https_unless_loopback(
    dev_idp: Any, serve_recorded: ServeRecorded
) -> None:
    server, recorder = serve_recorded(
        json_app({"issuer": "", "jwks_uri": "http://keys.example.com/jwks.json"})
    )
    issuer = server.url
    recorder.app = json_app({"issuer": issuer, "jwks_uri": "http://keys.example.com/jwks.json"})
    async with httpx.AsyncClient() as http:
        adapter = OidcAdapter(dev_idp.config(issuer=issuer), http, dev_idp.clock)
        token = dev_idp.provider.mint("alice", extra_claims={"iss": issuer})
        with pytest.raises(IdentityProviderUnavailable, match="invalid") as info:
            await adapter.authenticate(token, TokenType.ID_TOKEN)
    assert "https" in (info.value.debug or "")


async def test_registry_refuses_dev_unless_allowed(dev_idp: Any) -> None:
    async with httpx.AsyncClient() as http:
        configs = [dev_idp.config()]
        with pytest.raises(ValueError, match="development"):
            build_identity_adapters(configs, http, dev_idp.clock, allow_development=False)
        adapters = build_identity_adapters(
            configs, http, dev_idp.clock, allow_development=True
        ).jwt
        assert list(adapters) == [dev_idp.issuer]
        principal = await adapters[dev_idp.issuer].authenticate(
            dev_idp.provider.mint("alice"), TokenType.ID_TOKEN
        )
        assert principal.subject == "alice"
        oidc = [dev_idp.config(kind="oidc")]
        assert build_identity_adapters(oidc, http, dev_idp.clock, allow_development=False)


def test_packaged_dev_people_load() -> None:
    people = load_dev_people()
    assert people
    assert all(person.subject == key for key, person in people.items())

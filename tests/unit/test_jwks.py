"""JwksCache: laziness, max age, rate-limited unknown-kid refresh, single flight, failure handling.

HTTP is an in-process httpx.MockTransport (no network); time is a FrozenClock.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.clock import FrozenClock
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwks import JwksCache, SigningKeyResolver, StaticJwks

JWKS_URI = "https://idp.example.com/jwks"

pytestmark = pytest.mark.anyio


def public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "use": "sig"})
    return jwk


@pytest.fixture(scope="module")
def keys() -> list[rsa.RSAPrivateKey]:
    return [rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(2)]


class FakeIdp:
    """Serves a mutable JWKS through httpx.MockTransport and counts requests."""

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.requests = 0
        self.status = 200
        self.body: bytes | None = None
        self.error: Exception | None = None
        self.delay = 0.0

    async def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error is not None:
            raise self.error
        body = self.body if self.body is not None else json.dumps(self.jwks).encode()
        return httpx.Response(self.status, content=body)


def make_cache(
    idp: FakeIdp, clock: FrozenClock, **overrides: float
) -> tuple[JwksCache, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.MockTransport(idp.handle))
    options: dict[str, float] = {"min_refresh_interval": 30.0, "max_age": 3600.0, "timeout": 2.0}
    options.update(overrides)
    return JwksCache(JWKS_URI, http, clock, **options), http  # type: ignore[arg-type]


async def test_protocol_is_satisfied(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        assert isinstance(cache, SigningKeyResolver)
        assert isinstance(StaticJwks({"keys": []}), SigningKeyResolver)


async def test_lazy_fetch_and_cache(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        assert idp.requests == 0
        key = await cache.get_signing_key("a", "RS256")
        assert key.key_id == "a"
        assert key.algorithm_name == "RS256"
        for _ in range(10):
            await cache.get_signing_key("a", "RS256")
        assert idp.requests == 1
        assert cache.key_ids == ("a",)


async def test_refetch_after_max_age(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, clock, max_age=100.0)
    async with http:
        await cache.get_signing_key("a", "RS256")
        clock.advance(99)
        await cache.get_signing_key("a", "RS256")
        assert idp.requests == 1
        clock.advance(1)
        await cache.get_signing_key("a", "RS256")
        assert idp.requests == 2


async def test_unknown_kid_refetch_is_rate_limited(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, clock, min_refresh_interval=30.0)
    async with http:
        # Immediately after the first fetch, an unknown kid does not refetch.
        with pytest.raises(TokenRejected, match="unknown"):
            await cache.get_signing_key("zzz", "RS256")
        assert idp.requests == 1
        clock.advance(30)
        for _ in range(50):
            with pytest.raises(TokenRejected, match="unknown"):
                await cache.get_signing_key("zzz", "RS256")
        assert idp.requests == 2
        # A rotated-in key is found by the refetch the next interval allows.
        idp.jwks = {"keys": [public_jwk(keys[0], "a"), public_jwk(keys[1], "b")]}
        with pytest.raises(TokenRejected):
            await cache.get_signing_key("b", "RS256")
        clock.advance(30)
        assert (await cache.get_signing_key("b", "RS256")).key_id == "b"
        assert idp.requests == 3


async def test_removed_key_stops_verifying(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a"), public_jwk(keys[1], "b")]})
    cache, http = make_cache(idp, clock, max_age=60.0, min_refresh_interval=10.0)
    async with http:
        await cache.get_signing_key("a", "RS256")
        idp.jwks = {"keys": [public_jwk(keys[1], "b")]}
        clock.advance(60)
        with pytest.raises(TokenRejected):
            await cache.get_signing_key("a", "RS256")


async def test_single_flight_on_cold_start(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    idp.delay = 0.05
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        results = await asyncio.gather(*(cache.get_signing_key("a", "RS256") for _ in range(25)))
        assert {key.key_id for key in results} == {"a"}
        assert idp.requests == 1


async def test_single_flight_for_unknown_kids(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, clock)
    async with http:
        await cache.get_signing_key("a", "RS256")
        clock.advance(31)
        idp.delay = 0.05
        outcomes = await asyncio.gather(
            *(cache.get_signing_key(f"bad-{i}", "RS256") for i in range(25)),
            return_exceptions=True,
        )
        assert all(isinstance(o, TokenRejected) for o in outcomes)
        assert idp.requests == 2


@pytest.mark.parametrize(
    "failure",
    ["status", "connect", "timeout", "not-json", "not-object", "no-keys-list", "no-usable-keys"],
)
async def test_fetch_failures_without_cache(failure: str, keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    match failure:
        case "status":
            idp.status = 500
        case "connect":
            idp.error = httpx.ConnectError("refused")
        case "timeout":
            idp.error = httpx.ReadTimeout("slow")
        case "not-json":
            idp.body = b"<html>"
        case "not-object":
            idp.body = b"[1, 2]"
        case "no-keys-list":
            idp.body = b'{"keys": {}}'
        case "no-usable-keys":
            idp.body = b'{"keys": [{"kty": "oct", "k": "AAAA"}]}'
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        with pytest.raises(IdentityProviderUnavailable) as info:
            await cache.get_signing_key("a", "RS256")
        assert JWKS_URI not in info.value.reason
        assert JWKS_URI in (info.value.debug or "")


async def test_oversized_jwks_is_refused(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    idp.body = b'{"keys": [], "padding": "' + b"x" * (600 * 1024) + b'"}'
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        with pytest.raises(IdentityProviderUnavailable):
            await cache.get_signing_key("a", "RS256")


async def test_failure_backoff_without_cache(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    idp.status = 503
    cache, http = make_cache(idp, clock)
    async with http:
        for _ in range(5):
            with pytest.raises(IdentityProviderUnavailable):
                await cache.get_signing_key("a", "RS256")
        assert idp.requests == 1
        idp.status = 200
        clock.advance(1)
        assert (await cache.get_signing_key("a", "RS256")).key_id == "a"
        assert idp.requests == 2


async def test_cached_keys_survive_failed_refresh(keys: list[rsa.RSAPrivateKey]) -> None:
    clock = FrozenClock()
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, clock, max_age=60.0)
    async with http:
        await cache.get_signing_key("a", "RS256")
        idp.error = httpx.ConnectError("down")
        clock.advance(61)
        assert (await cache.get_signing_key("a", "RS256")).key_id == "a"
        assert idp.requests == 2
        # Failed attempts are rate limited too, and known kids keep verifying meanwhile.
        for _ in range(5):
            assert (await cache.get_signing_key("a", "RS256")).key_id == "a"
        assert idp.requests == 2
        with pytest.raises(TokenRejected):
            await cache.get_signing_key("unknown", "RS256")
        assert idp.requests == 2


async def test_unsupported_algorithm_never_fetches(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        for alg in ("HS256", "none", "rs256"):
            with pytest.raises(TokenRejected, match="algorithm"):
                await cache.get_signing_key("a", alg)
        assert idp.requests == 0


async def test_redirects_are_not_followed(keys: list[rsa.RSAPrivateKey]) -> None:
    idp = FakeIdp({"keys": [public_jwk(keys[0], "a")]})
    idp.status = 302
    cache, http = make_cache(idp, FrozenClock())
    async with http:
        with pytest.raises(IdentityProviderUnavailable):
            await cache.get_signing_key("a", "RS256")

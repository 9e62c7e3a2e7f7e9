"""The resource-server kit's core (`broker.kit.ResourceServer`): every refusal with its status and
``WWW-Authenticate`` challenge, DPoP-bound tokens, JWKS rotation, introspection with its cache,
and the RFC 9728 metadata document.

The authorization server is a loopback HTTP stand-in (`tests.support.kit_fakes`); the kit's clock
is a FrozenClock the tests move.
"""

from __future__ import annotations

import base64
import json
import logging
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from broker.clock import FrozenClock
from broker.dpop import DPoPKey, DPoPNonces, DPoPVerifier
from broker.kit import (
    Caller,
    InsufficientScope,
    InvalidDPoPProof,
    InvalidRequest,
    InvalidToken,
    KitError,
    MissingToken,
    ResourceServer,
    Unavailable,
    UseDPoPNonce,
    protected_resource_metadata_url,
)
from idp_adapters._loopback import RunningServer, serve_in_thread
from tests.support.kit_fakes import (
    RS_CLIENT_ID,
    RS_SECRET,
    FakeAuthorizationServer,
    SigningKey,
    broker_claims,
    sign,
)

pytestmark = pytest.mark.anyio

RESOURCE = "https://notes.example.com/mcp"
METADATA_URL = "https://notes.example.com/.well-known/oauth-protected-resource/mcp"
NOW = 1_800_000_000.0


@pytest.fixture
def auth_server() -> Iterator[tuple[FakeAuthorizationServer, RunningServer]]:
    fake = FakeAuthorizationServer()
    with serve_in_thread(fake) as server:
        yield fake, server


@pytest.fixture
def clock() -> FrozenClock:
    return FrozenClock(start=NOW)


class Env:
    def __init__(self, fake: FakeAuthorizationServer, url: str, clock: FrozenClock) -> None:
        self.fake = fake
        self.issuer = url
        self.clock = clock

    def token(self, *, key: SigningKey | None = None, typ: str | None = "at+jwt",
              headers: dict[str, Any] | None = None, **claims: Any) -> str:
        claims.setdefault("aud", RESOURCE)
        aud = claims.pop("aud")
        return sign(
            broker_claims(self.issuer, aud, self.clock.now(), **claims),
            key or self.fake.published[0],
            typ=typ,
            headers=headers,
        )

    def rs(self, **kwargs: Any) -> ResourceServer:
        kwargs.setdefault("jwks_min_refresh_interval", 5.0)
        return ResourceServer(issuer=self.issuer, resource=RESOURCE, clock=self.clock, **kwargs)


@pytest.fixture
async def env(
    auth_server: tuple[FakeAuthorizationServer, RunningServer], clock: FrozenClock
) -> AsyncIterator[Env]:
    fake, server = auth_server
    yield Env(fake, server.url, clock)


async def refused(rs: ResourceServer, authorization: str | None, **kwargs: Any) -> KitError:
    with pytest.raises(KitError) as caught:
        await rs.authenticate(authorization, **kwargs)
    return caught.value


def params(challenge: str) -> dict[str, str]:
    return dict(re.findall(r'(\w+)="([^"]*)"', challenge))


# -- accepted tokens ---------------------------------------------------------------------------


async def test_a_broker_token_names_the_person_the_agent_chain_and_the_approval(env: Env) -> None:
    token = env.token(jti="tok-1")
    async with env.rs() as rs:
        caller = await rs.authenticate(f"Bearer {token}", required_scopes=["notes:read"])
    assert isinstance(caller, Caller)
    assert caller.person == "dev/alice"
    assert caller.agent_chain == ("summariser-agent", "triage-agent")
    assert caller.agent == "summariser-agent"
    assert caller.client_id == "summariser-agent"
    assert caller.scopes == {"notes:read", "notes:list"}
    assert caller.approval is not None and caller.approval["approved_by"] == "dev/dave"
    assert caller.token_id == "tok-1"
    assert caller.expires_at == int(NOW) + 300
    assert caller.jkt is None
    assert caller.claims["iss"] == env.issuer
    assert token not in repr(caller)


async def test_a_token_for_several_audiences_including_this_one(env: Env) -> None:
    token = env.token(aud=["https://other.example", RESOURCE])
    async with env.rs() as rs:
        assert (await rs.authenticate(f"bearer  {token} ")).person == "dev/alice"
    async with env.rs(single_audience=True) as strict:
        error = await refused(strict, f"Bearer {token}")
    assert isinstance(error, InvalidToken)
    assert error.description == "token was not issued for this resource"


async def test_clock_skew_forgives_iat_and_nbf_but_never_exp(env: Env) -> None:
    early = env.token(iat=int(NOW) + 5, nbf=int(NOW) + 5)
    async with env.rs(skew_seconds=10) as rs:
        assert (await rs.authenticate(f"Bearer {early}")).person == "dev/alice"
        just_expired = env.token(exp=int(NOW) - 1, iat=int(NOW) - 100, nbf=int(NOW) - 100)
        error = await refused(rs, f"Bearer {just_expired}")
    assert isinstance(error, InvalidToken) and error.description == "token has expired"


# -- refusals ----------------------------------------------------------------------------------


REFUSALS: list[tuple[str, dict[str, Any], str]] = [
    ("wrong audience", {"aud": "https://notes.example.com/other"}, "not issued for this resource"),
    ("audience differs by a slash", {"aud": RESOURCE + "/"}, "not issued for this resource"),
    ("wrong issuer", {"iss": "https://evil.example"}, "issuer"),
    ("expired", {"exp": int(NOW) - 60, "iat": int(NOW) - 600, "nbf": None}, "expired"),
    ("not yet valid", {"nbf": int(NOW) + 120}, "not yet valid"),
    ("issued in the future", {"iat": int(NOW) + 120}, "future"),
    ("no jti", {"jti": None}, "jti"),
    ("no act chain", {"act": None}, "act"),
    ("malformed act chain", {"act": {"name": "x"}}, "malformed"),
    ("no client_id", {"client_id": None}, "client_id"),
    ("malformed cnf", {"cnf": {"jkt": 7}}, "key binding"),
]


@pytest.mark.parametrize(("case", "claims", "reason"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_invalid_tokens_are_refused_with_a_bearer_challenge(
    env: Env, case: str, claims: dict[str, Any], reason: str
) -> None:
    token = env.token(**claims)
    async with env.rs() as rs:
        error = await refused(rs, f"Bearer {token}")
    assert isinstance(error, InvalidToken), case
    assert error.status == 401
    assert reason in error.description
    (challenge,) = error.challenges
    assert challenge.startswith("Bearer ")
    assert params(challenge) == {
        "error": "invalid_token",
        "error_description": error.description,
        "resource_metadata": METADATA_URL,
    }
    assert token not in error.www_authenticate and token not in error.body().decode()


@pytest.mark.parametrize("typ", [None, "JWT", "dpop+jwt", "oauth-id-jag+jwt"])
async def test_only_access_token_typ_is_accepted(env: Env, typ: str | None) -> None:
    async with env.rs() as rs:
        error = await refused(rs, f"Bearer {env.token(typ=typ)}")
        accepted = await rs.authenticate(f"Bearer {env.token(typ='application/at+jwt')}")
    assert isinstance(error, InvalidToken) and "type" in error.description
    assert accepted.person == "dev/alice"


async def test_a_bad_signature_and_an_unsigned_token_are_refused(env: Env) -> None:
    impostor = SigningKey("key-1")  # same kid, another key
    forged = env.token(key=impostor)
    good = env.token()
    header, payload, _ = good.split(".")
    _, _, other_signature = env.token(sub="dev/bob").split(".")
    spliced = f"{header}.{payload}.{other_signature}"
    none_header = base64.urlsafe_b64encode(
        json.dumps({"alg": "none", "typ": "at+jwt", "kid": "key-1"}).encode()
    ).rstrip(b"=").decode()
    unsigned = f"{none_header}.{payload}."
    async with env.rs() as rs:
        for token in (forged, spliced):
            error = await refused(rs, f"Bearer {token}")
            assert isinstance(error, InvalidToken)
            assert error.description == "token signature is invalid"
        error = await refused(rs, f"Bearer {unsigned}")
        assert isinstance(error, InvalidToken)
        assert error.description == "token algorithm is not allowed"


async def test_no_credentials_get_a_challenge_without_an_error_code(env: Env) -> None:
    async with env.rs() as rs:
        for authorization in (None, "", "Basic dXNlcjpwYXNz"):
            error = await refused(rs, authorization)
            assert isinstance(error, MissingToken)
            assert error.status == 401
            bearer, dpop = error.challenges
            assert bearer == f'Bearer resource_metadata="{METADATA_URL}"'
            assert dpop.startswith('DPoP algs="ES256 ')
            assert "error" not in dpop and f'resource_metadata="{METADATA_URL}"' in dpop
            assert ("Cache-Control", "no-store") in error.headers


async def test_a_malformed_authorization_header_is_a_bad_request(env: Env) -> None:
    async with env.rs() as rs:
        for authorization in ("Bearer", "Bearer a b", 'Bearer "quoted"', "Bearer é"):
            error = await refused(rs, authorization)
            assert isinstance(error, InvalidRequest), authorization
            assert error.status == 400
            assert params(error.challenges[0])["error"] == "invalid_request"


async def test_a_missing_scope_is_insufficient_scope_naming_what_to_ask_for(env: Env) -> None:
    token = env.token(scope="notes:read")
    async with env.rs() as rs:
        error = await refused(
            rs, f"Bearer {token}", required_scopes=["notes:read", "notes:write", "notes:admin"]
        )
    assert isinstance(error, InsufficientScope)
    assert error.status == 403
    (challenge,) = error.challenges
    assert challenge.startswith("Bearer ")
    assert params(challenge) == {
        "error": "insufficient_scope",
        "error_description": "the token lacks a scope this request needs",
        "scope": "notes:read notes:write notes:admin",
        "resource_metadata": METADATA_URL,
    }


async def test_keys_or_introspection_out_of_reach_fail_closed_with_503(env: Env) -> None:
    env.fake.down = True
    async with env.rs() as rs:
        error = await refused(rs, f"Bearer {env.token()}")
    assert isinstance(error, Unavailable) and error.status == 503
    assert not any(name == "WWW-Authenticate" for name, _ in error.headers)
    env.fake.down = False
    async with env.rs(introspection=(f"{env.issuer}/oauth2/introspect", "wrong", "secret")) as rs:
        error = await refused(rs, f"Bearer {env.token()}")
    assert isinstance(error, Unavailable)


# -- DPoP --------------------------------------------------------------------------------------

URL = RESOURCE


def bound(env: Env, key: DPoPKey, **claims: Any) -> str:
    return env.token(cnf={"jkt": key.jkt}, **claims)


async def test_a_bound_token_with_its_proof_is_accepted(env: Env) -> None:
    key = DPoPKey()
    token = bound(env, key)
    proof = key.proof("POST", URL + "?session=1", access_token=token, issued_at=NOW)
    async with env.rs() as rs:
        caller = await rs.authenticate(
            f"DPoP {token}", [proof], method="POST", url=URL + "?session=1"
        )
    assert caller.jkt == key.jkt and caller.person == "dev/alice"


async def test_a_bound_token_presented_as_bearer_is_refused(env: Env) -> None:
    key = DPoPKey()
    token = bound(env, key)
    proof = key.proof("POST", URL, access_token=token, issued_at=NOW)
    async with env.rs() as rs:
        error = await refused(rs, f"Bearer {token}", dpop_headers=[proof], method="POST", url=URL)
    assert isinstance(error, InvalidToken) and error.status == 401
    (challenge,) = error.challenges
    assert challenge.startswith('DPoP algs="')
    assert params(challenge)["error"] == "invalid_token"
    assert params(challenge)["resource_metadata"] == METADATA_URL


async def test_a_bearer_token_presented_with_the_dpop_scheme_is_refused(env: Env) -> None:
    key = DPoPKey()
    token = env.token()
    proof = key.proof("GET", URL, access_token=token, issued_at=NOW)
    async with env.rs() as rs:
        error = await refused(rs, f"DPoP {token}", dpop_headers=[proof], url=URL)
    assert isinstance(error, InvalidToken)
    assert error.description == "token is not bound to a DPoP key"
    assert error.challenges[0].startswith("DPoP ")


async def test_hostile_proofs_are_invalid_dpop_proof(env: Env) -> None:
    key, other = DPoPKey(), DPoPKey()
    token = bound(env, key)
    cases: dict[str, tuple[list[str], str, str]] = {
        "no proof": ([], "POST", URL),
        "two proofs": (
            [key.proof("POST", URL, access_token=token, issued_at=NOW)] * 2, "POST", URL
        ),
        "another URL": (
            [key.proof("POST", "https://notes.example.com/other", access_token=token,
                       issued_at=NOW)], "POST", URL,
        ),
        "another method": ([key.proof("GET", URL, access_token=token, issued_at=NOW)],
                           "POST", URL),
        "another key": ([other.proof("POST", URL, access_token=token, issued_at=NOW)],
                        "POST", URL),
        "no ath": ([key.proof("POST", URL, issued_at=NOW)], "POST", URL),
        "another token's ath": (
            [key.proof("POST", URL, access_token=bound(env, key), issued_at=NOW)], "POST", URL
        ),
        "stale": ([key.proof("POST", URL, access_token=token, issued_at=NOW - 300)],
                  "POST", URL),
    }
    async with env.rs() as rs:
        for case, (proofs, method, url) in cases.items():
            error = await refused(rs, f"DPoP {token}", dpop_headers=proofs, method=method, url=url)
            assert isinstance(error, InvalidDPoPProof), case
            assert error.status == 401
            challenge = error.challenges[0]
            assert challenge.startswith('DPoP algs="'), case
            assert params(challenge)["error"] == "invalid_dpop_proof", case
            assert token not in error.www_authenticate


async def test_a_replayed_proof_is_refused(env: Env) -> None:
    key = DPoPKey()
    token = bound(env, key)
    proof = key.proof("POST", URL, access_token=token, issued_at=NOW)
    async with env.rs() as rs:
        await rs.authenticate(f"DPoP {token}", [proof], method="POST", url=URL)
        error = await refused(rs, f"DPoP {token}", dpop_headers=[proof], method="POST", url=URL)
    assert isinstance(error, InvalidDPoPProof)
    assert error.description == "DPoP proof jti has been used before"


async def test_a_server_nonce_is_asked_for_then_accepted(env: Env) -> None:
    key = DPoPKey()
    token = bound(env, key)
    nonces = DPoPNonces(b"0123456789abcdef0123", clock=env.clock)
    verifier = DPoPVerifier(clock=env.clock, nonces=nonces)
    async with env.rs(dpop_verifier=verifier) as rs:
        first = key.proof("POST", URL, access_token=token, issued_at=NOW)
        error = await refused(rs, f"DPoP {token}", dpop_headers=[first], method="POST", url=URL)
        assert isinstance(error, UseDPoPNonce)
        assert ("DPoP-Nonce", nonces.current()) in error.headers
        assert params(error.challenges[0])["error"] == "use_dpop_nonce"
        retry = key.proof("POST", URL, access_token=token, nonce=error.nonce, issued_at=NOW)
        caller = await rs.authenticate(f"DPoP {token}", [retry], method="POST", url=URL)
    assert caller.jkt == key.jkt


async def test_dpop_required_refuses_bearer_tokens(env: Env) -> None:
    async with env.rs(dpop_required=True) as rs:
        error = await refused(rs, f"Bearer {env.token()}")
        missing = await refused(rs, None)
        assert rs.metadata()["dpop_bound_access_tokens_required"] is True
    assert isinstance(error, InvalidToken) and error.challenges[0].startswith("DPoP ")
    assert missing.challenges == (
        f'DPoP algs="{" ".join(rs.dpop_algorithms)}", resource_metadata="{METADATA_URL}"',
    )


async def test_a_missing_scope_on_a_bound_token_gets_a_dpop_challenge(env: Env) -> None:
    key = DPoPKey()
    token = bound(env, key, scope="notes:read")
    proof = key.proof("GET", URL, access_token=token, issued_at=NOW)
    async with env.rs() as rs:
        error = await refused(rs, f"DPoP {token}", dpop_headers=[proof], url=URL,
                              required_scopes=["notes:write"])
    assert isinstance(error, InsufficientScope)
    assert error.challenges[0].startswith('DPoP algs="')
    assert params(error.challenges[0])["scope"] == "notes:write"


# -- keys --------------------------------------------------------------------------------------


async def test_a_rotated_signing_key_is_picked_up_by_its_kid(env: Env) -> None:
    async with env.rs(jwks_min_refresh_interval=5.0) as rs:
        await rs.authenticate(f"Bearer {env.token()}")
        assert env.fake.hits["/.well-known/jwks.json"] == 1
        new_key = SigningKey("key-2")
        env.fake.published.append(new_key)
        # An unknown kid refetches the set (the cache is older than the refresh interval).
        env.clock.advance(6)
        caller = await rs.authenticate(f"Bearer {env.token(key=new_key)}")
        assert caller.person == "dev/alice"
        assert env.fake.hits["/.well-known/jwks.json"] == 2
        # A stream of unknown kids does not hammer the authorization server.
        stranger = SigningKey("key-3")
        for _ in range(5):
            error = await refused(rs, f"Bearer {env.token(key=stranger)}")
            assert isinstance(error, InvalidToken)
            assert error.description == "token signing key is unknown"
        assert env.fake.hits["/.well-known/jwks.json"] == 2
        # The old key, once no longer published, stops verifying after the next refresh.
        env.fake.published = [new_key]
        env.clock.advance(301)
        error = await refused(rs, f"Bearer {env.token(key=SigningKey('key-1'))}")
        assert isinstance(error, InvalidToken)
        assert env.fake.hits["/.well-known/jwks.json"] == 3


# -- revocation through introspection ----------------------------------------------------------


async def test_introspection_refuses_revoked_tokens_and_is_cached_briefly(env: Env) -> None:
    introspection = (f"{env.issuer}/oauth2/introspect", RS_CLIENT_ID, RS_SECRET)
    token = env.token()
    async with env.rs(introspection=introspection, revocation_cache_seconds=20) as rs:
        await rs.authenticate(f"Bearer {token}")
        await rs.authenticate(f"Bearer {token}")
        assert env.fake.hits["/oauth2/introspect"] == 1
        assert env.fake.introspected_tokens == [token]
        env.fake.revoke(token)
        env.clock.advance(10)
        await rs.authenticate(f"Bearer {token}")  # still within the cache
        assert env.fake.hits["/oauth2/introspect"] == 1
        env.clock.advance(11)
        error = await refused(rs, f"Bearer {token}")
        assert isinstance(error, InvalidToken)
        assert error.description == "token is no longer active"
        assert env.fake.hits["/oauth2/introspect"] == 2
        # An invalid token is never sent to the authorization server.
        await refused(rs, f"Bearer {env.token(aud='https://elsewhere.example')}")
        assert env.fake.hits["/oauth2/introspect"] == 2


# -- metadata and hygiene ----------------------------------------------------------------------


async def test_protected_resource_metadata(env: Env) -> None:
    async with env.rs(
        scopes_supported=["notes:read", "notes:write"], resource_name="Notes"
    ) as rs:
        document = rs.metadata()
        assert rs.metadata_paths == (
            "/.well-known/oauth-protected-resource/mcp",
            "/.well-known/oauth-protected-resource",
        )
    assert document == {
        "resource": RESOURCE,
        "authorization_servers": [env.issuer],
        "bearer_methods_supported": ["header"],
        "scopes_supported": ["notes:read", "notes:write"],
        "dpop_signing_alg_values_supported": ["ES256", "ES384", "ES512", "PS256", "RS256",
                                              "EdDSA"],
        "dpop_bound_access_tokens_required": False,
        "resource_name": "Notes",
    }
    assert rs.resource_metadata_url == METADATA_URL
    assert protected_resource_metadata_url("https://h.example") == (
        "https://h.example/.well-known/oauth-protected-resource"
    )
    assert protected_resource_metadata_url("https://h.example:8443/a/b") == (
        "https://h.example:8443/.well-known/oauth-protected-resource/a/b"
    )
    with pytest.raises(ValueError, match="query"):
        ResourceServer(issuer=env.issuer, resource=RESOURCE + "?x=1")
    with pytest.raises(ValueError, match="asymmetric"):
        ResourceServer(issuer=env.issuer, resource=RESOURCE, algorithms=["HS256"])


async def test_no_token_reaches_a_log_line(
    env: Env, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    key = DPoPKey()
    tokens = [env.token(aud="https://x.example"), env.token(typ="JWT"), bound(env, key)]
    async with env.rs() as rs:
        for token in tokens:
            await refused(rs, f"Bearer {token}")
    assert caplog.records
    for token in tokens:
        assert token not in caplog.text
        assert token.split(".")[1] not in caplog.text

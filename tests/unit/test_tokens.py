"""The keyring (rotation, publication window, pruning) and the broker's token shape."""

from __future__ import annotations

import asyncio
from pathlib import Path

import jwt
import pytest

from broker.clock import FrozenClock
from broker.tokens import (
    MAX_TOKEN_BYTES,
    BrokerTokenVerifier,
    Keyring,
    TokenIssuer,
    TokenTooLarge,
    _nest_act,
    actor_chain_from_claim,
    sign_claims,
)
from broker.types import Provenance, TokenType
from idp_adapters.base import TokenRejected

ISSUER = "https://broker.example"
PROVENANCE = Provenance(
    "okta", "00u1", frozenset({"support"}), 1_799_999_000, TokenType.ID_TOKEN, 1_800_003_600
)


def _keyring(tmp_path: Path, clock: FrozenClock, grace: float = 3630) -> Keyring:
    return Keyring(tmp_path / "keys", algorithm="ES256", clock=clock, publish_grace_seconds=grace)


def _issue(issuer: TokenIssuer, **overrides: object) -> str:
    kwargs: dict[str, object] = {
        "provenance": PROVENANCE,
        "client_id": "triage",
        "actor_chain": ("triage",),
        "scopes": ("tickets:read",),
        "audiences": ("api",),
        "lifetime_seconds": 600,
        "policy_version": "sha256:abc",
        "parent_jti": None,
    }
    kwargs.update(overrides)
    return issuer.issue(**kwargs).token  # type: ignore[arg-type]


def test_first_key_is_generated_with_private_file_mode(tmp_path: Path) -> None:
    keyring = _keyring(tmp_path, FrozenClock())
    files = list((tmp_path / "keys").iterdir())
    assert len(files) == 1
    assert files[0].stat().st_mode & 0o777 == 0o600
    assert [k["kid"] for k in keyring.jwks()["keys"]] == [keyring.active.kid]
    assert "d" not in keyring.jwks()["keys"][0]


def test_rotation_keeps_old_key_published_until_its_tokens_expire(tmp_path: Path) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock, grace=1000)
    old = keyring.active.kid
    clock.advance(10)
    new = keyring.rotate().kid
    assert keyring.active.kid == new != old
    assert set(keyring.published_kids()) == {old, new}
    clock.advance(999)
    keyring.refresh(force=True)
    assert old in keyring.published_kids()
    clock.advance(2)
    keyring.refresh(force=True)
    assert keyring.published_kids() == [new]
    keyring.rotate()  # prunes the long-retired key file from disk
    assert not list((tmp_path / "keys").glob(f"{old}*"))


def test_running_keyring_picks_up_rotation_by_another_process(tmp_path: Path) -> None:
    clock = FrozenClock()
    serving = _keyring(tmp_path, clock)
    cli = _keyring(tmp_path, clock)
    new = cli.rotate().kid
    clock.advance(1.5)  # the serving keyring re-checks the directory at most once a second
    assert serving.active.kid == new


def test_issued_token_shape_and_round_trip(tmp_path: Path) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock)
    token = _issue(
        TokenIssuer(keyring, ISSUER, clock),
        actor_chain=("summariser", "triage"),
        audiences=("a", "b"),
        parent_jti="parent-1",
    )
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": keyring.active.kid, "typ": "at+jwt"}
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["act"] == {"sub": "summariser", "act": {"sub": "triage"}}
    assert claims["aud"] == ["a", "b"]
    assert claims["sub"] == "okta/00u1"
    assert claims["exp"] - claims["iat"] == 600
    verifier = BrokerTokenVerifier(keyring, ISSUER, clock, algorithms=("ES256",))
    verified = asyncio.run(verifier.verify(token))
    assert verified.actor_chain == ("summariser", "triage")
    assert verified.parent_jti == "parent-1"
    assert verified.provenance == PROVENANCE


def test_the_issuer_never_signs_a_token_its_verifier_would_refuse(tmp_path: Path) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock)
    verifier = BrokerTokenVerifier(keyring, ISSUER, clock, algorithms=("ES256",))
    assert verifier.max_bytes == MAX_TOKEN_BYTES
    issuer = TokenIssuer(keyring, ISSUER, clock, max_bytes=verifier.max_bytes)
    many = frozenset(f"group-{n:05d}-with-a-long-descriptive-name" for n in range(700))
    big = Provenance("okta", "00u1", many, None, TokenType.ID_TOKEN, 1_800_003_600)
    with pytest.raises(TokenTooLarge) as info:
        _issue(issuer, provenance=big)
    assert info.value.size > info.value.limit == MAX_TOKEN_BYTES
    # A token within the limit is issued and verifies; the IdP roles in provenance round-trip.
    roles = Provenance(
        "okta", "00u1", frozenset({"support"}), None, TokenType.ID_TOKEN, 1_800_003_600,
        idp_roles=frozenset({"Support.Agent"}),
    )
    token = _issue(issuer, provenance=roles)
    assert asyncio.run(verifier.verify(token)).provenance == roles


def test_verifier_rejects_expired_foreign_and_tampered_tokens(tmp_path: Path) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock)
    verifier = BrokerTokenVerifier(keyring, ISSUER, clock, algorithms=("ES256",))
    token = _issue(TokenIssuer(keyring, ISSUER, clock))
    other = _keyring(tmp_path / "other", clock)
    foreign = _issue(TokenIssuer(other, ISSUER, clock))
    wrong_issuer = _issue(TokenIssuer(keyring, "https://evil.example", clock))
    header, payload, signature = token.split(".")
    tampered = ".".join([header, payload[:-4] + "AAAA", signature])
    for bad in (foreign, wrong_issuer, tampered):
        with pytest.raises(TokenRejected):
            asyncio.run(verifier.verify(bad))
    clock.advance(606)
    with pytest.raises(TokenRejected):
        asyncio.run(verifier.verify(token))


def test_act_nesting_round_trips_and_rejects_malformed() -> None:
    chain = ("c", "b", "a")
    assert actor_chain_from_claim(_nest_act(chain)) == chain
    for bad in ({"act": {}}, {"sub": 1}, "agent", {"sub": "a", "act": {"sub": None}}):
        with pytest.raises(ValueError):
            actor_chain_from_claim(bad)
    deep: dict[str, object] = {"sub": "x"}
    for _ in range(20):
        deep = {"sub": "x", "act": deep}
    with pytest.raises(ValueError):
        actor_chain_from_claim(deep)


def test_remembered_verdicts_still_expire_and_follow_key_publication(tmp_path: Path) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock, grace=100)
    verifier = BrokerTokenVerifier(keyring, ISSUER, clock, algorithms=("ES256",))
    token = _issue(TokenIssuer(keyring, ISSUER, clock), lifetime_seconds=50)
    first = asyncio.run(verifier.verify(token))
    assert asyncio.run(verifier.verify(token)) is first  # remembered, not re-verified
    clock.advance(51)
    with pytest.raises(TokenRejected):
        asyncio.run(verifier.verify(token))

    long_lived = _issue(TokenIssuer(keyring, ISSUER, clock), lifetime_seconds=3600)
    asyncio.run(verifier.verify(long_lived))
    keyring.rotate()
    clock.advance(101)  # the retired key leaves the JWKS (e.g. removed after a compromise)
    keyring.refresh(force=True)
    with pytest.raises(TokenRejected):
        asyncio.run(verifier.verify(long_lived))

    header, payload, signature = token.split(".")
    forged = f"{header}.{payload}.{signature[:-4]}AAAA"
    with pytest.raises(TokenRejected):
        asyncio.run(verifier.verify(forged))


def test_the_broker_accepts_its_own_tokens_until_exp_only_whatever_the_skew(
    tmp_path: Path,
) -> None:
    clock = FrozenClock()
    keyring = _keyring(tmp_path, clock)
    verifier = BrokerTokenVerifier(keyring, ISSUER, clock, skew=300, algorithms=("ES256",))
    cached = _issue(TokenIssuer(keyring, ISSUER, clock), lifetime_seconds=6)
    fresh = _issue(TokenIssuer(keyring, ISSUER, clock), lifetime_seconds=6)
    asyncio.run(verifier.verify(cached))  # remembered
    clock.advance(5.9)
    asyncio.run(verifier.verify(cached))
    clock.advance(0.1)
    for token in (cached, fresh):  # at exp, from the verdict cache or verified anew
        with pytest.raises(TokenRejected, match="expired"):
            asyncio.run(verifier.verify(token))


@pytest.mark.parametrize("algorithm", ["ES256", "ES384", "EdDSA", "PS256"])
def test_sign_claims_writes_what_jwt_encode_writes(tmp_path: Path, algorithm: str) -> None:
    """The issuer serializes the claims itself and has PyJWT build and sign the JWS: the header
    and payload are byte for byte what ``jwt.encode`` writes, and the signature verifies."""
    keyring = Keyring(
        tmp_path / "keys", algorithm=algorithm, clock=FrozenClock(), publish_grace_seconds=0
    )
    key = keyring.active
    claims = {
        "iss": "https://broker.example",
        "sub": "dev/ålice",  # non-ASCII, escaped as jwt.encode escapes it
        "aud": ["a", "b"],
        "act": {"sub": "sub-agent", "act": {"sub": "triage-agent"}},
        "iat": 1_800_000_000,
        "exp": 1_800_000_900,
        "provenance": {"idp": "dev", "groups": [], "auth_time": None},
    }
    headers = {"kid": key.kid, "typ": "at+jwt"}
    token = sign_claims(claims, key, headers)
    expected = jwt.encode(claims, key.private_key, algorithm=key.algorithm, headers=headers)
    assert token.rsplit(".", 1)[0] == expected.rsplit(".", 1)[0]
    decoded = jwt.decode(
        token,
        key.verification_key,
        algorithms=[key.algorithm],
        audience="a",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert decoded == claims

"""verify_jwt and StaticJwks: pure verification logic (no network), FrozenClock time."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Collection
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.clock import FrozenClock
from idp_adapters.base import TokenRejected
from idp_adapters.jwks import StaticJwks
from idp_adapters.jwt_verify import (
    VerifiedJwt,
    claim_audiences,
    normalize_typ,
    unverified_issuer,
    verify_jwt,
)
from tests.support.jose import compact

ISSUER = "https://idp.example.com/tenant"
AUDIENCE = "broker"
NOW = 1_800_000_000


def public_jwk(private_key: Any, kid: str | None, **members: Any) -> dict[str, Any]:
    if isinstance(private_key, rsa.RSAPrivateKey):
        jwk = jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    else:
        jwk = jwt.algorithms.OKPAlgorithm.to_jwk(private_key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    jwk.update(members)
    return jwk


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def jwks(rsa_key: Any, ec_key: Any, ed_key: Any) -> StaticJwks:
    return StaticJwks(
        {
            "keys": [
                public_jwk(rsa_key, "rsa-1", use="sig"),
                public_jwk(ec_key, "ec-1", alg="ES256"),
                public_jwk(ed_key, "ed-1"),
            ]
        }
    )


def claims(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "iss": ISSUER,
        "sub": "user-1",
        "aud": AUDIENCE,
        "iat": NOW - 10,
        "exp": NOW + 300,
    }
    for name, value in overrides.items():
        if value is None:
            values.pop(name, None)
        else:
            values[name] = value
    return values


def sign(key: Any, payload: dict[str, Any], *, alg: str = "RS256", **header: Any) -> str:
    header.setdefault("kid", "rsa-1")
    header = {k: v for k, v in header.items() if v is not None or k == "typ"}
    return jwt.encode(payload, key, algorithm=alg, headers=header)


def verify(
    token: str,
    keys: Any,
    *,
    clock: FrozenClock | None = None,
    audiences: Collection[str] | None = (AUDIENCE,),
    algorithms: Collection[str] = ("RS256", "PS256", "ES256", "EdDSA"),
    leeway: int = 30,
    max_bytes: int = 16384,
    require: Collection[str] = ("exp", "iat", "iss", "sub"),
    allowed_typ: Collection[str | None] | None = None,
) -> VerifiedJwt:
    return asyncio.run(
        verify_jwt(
            token,
            keys=keys,
            issuer=ISSUER,
            audiences=audiences,
            algorithms=algorithms,
            clock=clock or FrozenClock(start=NOW),
            leeway=leeway,
            max_bytes=max_bytes,
            require=require,
            allowed_typ=allowed_typ,
        )
    )


def rejected(token: str, keys: Any, **kwargs: Any) -> str:
    with pytest.raises(TokenRejected) as info:
        verify(token, keys, **kwargs)
    reason = info.value.reason
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in reason
    return reason


# --- accepted tokens -------------------------------------------------------------------


def test_valid_rs256_token(rsa_key: Any, jwks: StaticJwks) -> None:
    verified = verify(sign(rsa_key, claims()), jwks)
    assert verified.claims["sub"] == "user-1"
    assert verified.header["kid"] == "rsa-1"
    assert verified.typ == "jwt"


def test_valid_es256_and_eddsa_tokens(ec_key: Any, ed_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(ec_key, claims(), alg="ES256", kid="ec-1"), jwks).claims["sub"] == "user-1"
    assert verify(sign(ed_key, claims(), alg="EdDSA", kid="ed-1"), jwks).claims["sub"] == "user-1"


def test_ps256_with_rsa_key_that_declares_no_alg(rsa_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(rsa_key, claims(), alg="PS256"), jwks).claims["iss"] == ISSUER


def test_key_declaring_alg_is_not_used_for_another_alg(rsa_key: Any) -> None:
    keys = StaticJwks({"keys": [public_jwk(rsa_key, "rsa-1", alg="RS256")]})
    assert verify(sign(rsa_key, claims()), keys)
    assert rejected(sign(rsa_key, claims(), alg="PS256"), keys) == "token signing key is unknown"


def test_audience_list_and_none(rsa_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(rsa_key, claims(aud=["other", AUDIENCE])), jwks)
    assert verify(sign(rsa_key, claims(aud=None)), jwks, audiences=None)


def test_jku_x5u_jwk_x5c_headers_are_ignored(rsa_key: Any, jwks: StaticJwks) -> None:
    token = sign(
        rsa_key,
        claims(),
        jku="https://attacker.example/jwks.json",
        x5u="https://attacker.example/cert.pem",
        jwk={"kty": "oct", "k": "AAAA"},
        x5c=["AAAA"],
    )
    assert verify(token, jwks).claims["sub"] == "user-1"


# --- algorithm -----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE", "rs256", "RS256 ", "HS256", ""])
def test_algorithm_not_in_allow_list(alg: str, rsa_key: Any, jwks: StaticJwks) -> None:
    token = compact({"alg": alg, "kid": "rsa-1"}, claims(), rsa_key)
    assert rejected(token, jwks) == "token algorithm is not allowed"


def test_algorithm_must_be_string(rsa_key: Any, jwks: StaticJwks) -> None:
    token = compact({"alg": ["RS256"], "kid": "rsa-1"}, claims(), rsa_key)
    assert rejected(token, jwks) == "token algorithm is not allowed"
    token = compact({"kid": "rsa-1"}, claims(), rsa_key)
    assert rejected(token, jwks) == "token algorithm is not allowed"


def test_hmac_is_refused_even_if_the_caller_allows_it(rsa_key: Any, jwks: StaticJwks) -> None:
    pem = rsa_key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    token = compact({"alg": "HS256", "kid": "rsa-1"}, claims(), pem, alg="HS256")
    reason = rejected(token, jwks, algorithms=["HS256", "RS256"])
    assert reason == "token algorithm is not allowed"


def test_algorithm_not_configured_even_if_supported(ec_key: Any, jwks: StaticJwks) -> None:
    token = sign(ec_key, claims(), alg="ES256", kid="ec-1")
    assert rejected(token, jwks, algorithms=["RS256"]) == "token algorithm is not allowed"


# --- keys ----------------------------------------------------------------------------


def test_wrong_key_bad_signature(other_rsa_key: Any, jwks: StaticJwks) -> None:
    assert rejected(sign(other_rsa_key, claims()), jwks) == "token signature is invalid"


@pytest.mark.parametrize("kid", ["nope", "../../etc/passwd", "' OR 1=1 --", "", "rsa-1\x00"])
def test_unknown_kid(kid: str, rsa_key: Any, jwks: StaticJwks) -> None:
    assert rejected(sign(rsa_key, claims(), kid=kid), jwks) == "token signing key is unknown"


def test_kid_must_be_string(rsa_key: Any, jwks: StaticJwks) -> None:
    token = compact({"alg": "RS256", "kid": 1}, claims(), rsa_key)
    assert rejected(token, jwks) == "token key id is malformed"


def test_key_type_must_match_algorithm(rsa_key: Any, ec_key: Any, jwks: StaticJwks) -> None:
    # An EC token naming the RSA key's kid, and an RSA token naming the EC key's kid.
    assert rejected(sign(ec_key, claims(), alg="ES256", kid="rsa-1"), jwks) == (
        "token signing key is unknown"
    )
    assert rejected(sign(rsa_key, claims(), kid="ec-1"), jwks) == "token signing key is unknown"


def test_ec_curve_must_match_algorithm() -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    keys = StaticJwks({"keys": [public_jwk(p384, "p384")]})
    token = compact({"alg": "ES256", "kid": "p384"}, claims(), p384, alg="ES384")
    assert rejected(token, keys) == "token signing key is unknown"
    assert verify(sign(p384, claims(), alg="ES384", kid="p384"), keys, algorithms=["ES384"])


def test_no_kid_with_one_compatible_key(rsa_key: Any, jwks: StaticJwks) -> None:
    # The set holds one RSA, one EC and one OKP key: only one fits RS256.
    assert verify(sign(rsa_key, claims(), kid=None), jwks).claims["sub"] == "user-1"


def test_no_kid_with_several_compatible_keys(rsa_key: Any, other_rsa_key: Any) -> None:
    keys = StaticJwks({"keys": [public_jwk(rsa_key, "a"), public_jwk(other_rsa_key, "b")]})
    reason = rejected(sign(rsa_key, claims(), kid=None), keys)
    assert reason == "token has no key id and the identity provider publishes several keys"


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
def test_unusable_jwks_members_are_skipped(rsa_key: Any) -> None:
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    private_jwk = jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key, as_dict=True)
    keys = StaticJwks(
        {
            "keys": [
                {**private_jwk, "kid": "private"},
                public_jwk(rsa_key, "enc", use="enc"),
                public_jwk(rsa_key, "ops", key_ops=["encrypt"]),
                public_jwk(rsa_key, "hmac-alg", alg="HS256"),
                public_jwk(small, "small"),
                {"kty": "oct", "k": "c2VjcmV0", "kid": "oct"},
                {"kty": "RSA", "kid": "broken", "n": "AQAB"},
                {"kty": ["RSA"], "kid": "list-kty"},
                {**public_jwk(rsa_key, "list-alg"), "alg": ["RS256"]},
                {**public_jwk(rsa_key, "list-crv"), "crv": ["P-256"]},
                {**public_jwk(rsa_key, "dict-use"), "use": {"sig": 1}},
                "not a key",
                public_jwk(rsa_key, "good", key_ops=["verify"]),
            ]
        }
    )
    assert keys.key_ids == ("good",)
    for kid in ("private", "enc", "ops", "hmac-alg", "oct", "broken", "list-alg", "dict-use"):
        assert rejected(sign(rsa_key, claims(), kid=kid), keys) == "token signing key is unknown"
    assert rejected(sign(small, claims(), kid="small"), keys) == "token signing key is unknown"


def test_static_jwks_requires_keys_list() -> None:
    with pytest.raises(ValueError, match="keys"):
        StaticJwks({"kty": "RSA"})


# --- header --------------------------------------------------------------------------


@pytest.mark.parametrize("crit", [["exp"], [], ["b64"], "b64"])
def test_crit_is_rejected(crit: Any, rsa_key: Any, jwks: StaticJwks) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1", "crit": crit, "exp": 1}, claims(), rsa_key)
    assert "critical" in rejected(token, jwks)


def test_allowed_typ(rsa_key: Any, jwks: StaticJwks) -> None:
    at = sign(rsa_key, claims(), typ="application/AT+JWT")
    untyped = sign(rsa_key, claims(), typ=None)
    assert normalize_typ("application/AT+JWT") == "at+jwt"
    assert verify(at, jwks, allowed_typ=("at+jwt",)).typ == "at+jwt"
    assert verify(untyped, jwks, allowed_typ=("at+jwt", None)).typ is None
    assert rejected(untyped, jwks, allowed_typ=("at+jwt",)) == "token type header is not acceptable"
    assert rejected(sign(rsa_key, claims()), jwks, allowed_typ=("at+jwt",))
    token = compact({"alg": "RS256", "kid": "rsa-1", "typ": 7}, claims(), rsa_key)
    assert rejected(token, jwks) == "token type header is malformed"


def test_duplicate_header_member(rsa_key: Any, jwks: StaticJwks) -> None:
    header = b'{"alg":"RS256","kid":"rsa-1","kid":"other"}'
    token = compact(header, claims(), rsa_key)
    assert rejected(token, jwks) == "token header has duplicate members"


# --- payload -------------------------------------------------------------------------


def test_duplicate_claims_even_nested(rsa_key: Any, jwks: StaticJwks) -> None:
    body = json.dumps(claims())[:-1]
    token = compact(
        {"alg": "RS256", "kid": "rsa-1"}, (body + ', "sub": "admin"}').encode(), rsa_key
    )
    assert rejected(token, jwks) == "token payload has duplicate members"
    nested = (body + ', "act": {"sub": "a", "sub": "b"}}').encode()
    token = compact({"alg": "RS256", "kid": "rsa-1"}, nested, rsa_key)
    assert rejected(token, jwks) == "token payload has duplicate members"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_numbers(literal: str, rsa_key: Any, jwks: StaticJwks) -> None:
    body = json.dumps(claims(exp=None))[:-1] + f', "exp": {literal}}}'
    token = compact({"alg": "RS256", "kid": "rsa-1"}, body.encode(), rsa_key)
    assert rejected(token, jwks) == "token payload is malformed"


@pytest.mark.parametrize("payload", [b"[]", b'"x"', b"{", b"\xff\xfe{}", b""])
def test_payload_not_a_json_object(payload: bytes, rsa_key: Any, jwks: StaticJwks) -> None:
    token = compact({"alg": "RS256", "kid": "rsa-1"}, payload, rsa_key)
    assert rejected(token, jwks) in {"token payload is malformed"}


# --- structure -----------------------------------------------------------------------


def test_size_cap_before_parsing(jwks: StaticJwks) -> None:
    assert rejected("x" * 20000, jwks) == "token is too large"
    assert rejected("a.b.c" + "A" * 600, jwks, max_bytes=512) == "token is too large"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b",
        "a.b.c.d",
        "a.b.c.d.e",
        "...",
        "!!!.???.***",
        "eyJhbGciOiJSUzI1NiJ9.eyJ9.",
        "é.é.é",
        "eyJhbGciOiJSUzI1NiJ9=.e30.AAAA",
    ],
)
def test_malformed_structure(token: str, jwks: StaticJwks) -> None:
    rejected(token, jwks)


def test_unsigned_and_truncated_signatures(rsa_key: Any, jwks: StaticJwks) -> None:
    token = sign(rsa_key, claims())
    head, _, sig = token.rpartition(".")
    assert rejected(head + ".", jwks) == "token is not signed"
    assert rejected(f"{head}.{sig[:-10]}", jwks) in {
        "token signature is invalid",
        "token signature is malformed",
    }
    assert rejected(f"{head}.{sig[:-1]}", jwks) in {
        "token signature is invalid",
        "token signature is malformed",
    }


def test_non_canonical_base64(rsa_key: Any, jwks: StaticJwks) -> None:
    token = sign(rsa_key, claims())
    head, payload, sig = token.split(".")
    # Flip the unused low bits of the last signature character (same bytes, different text).
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    tweaked = sig[:-1] + alphabet[last ^ 1]
    assert rejected(f"{head}.{payload}.{tweaked}", jwks) in {
        "token signature is malformed",
        "token signature is invalid",
    }


# --- claims --------------------------------------------------------------------------


@pytest.mark.parametrize("iss", [ISSUER + "/", ISSUER[:-1], "https://IDP.example.com/tenant", ""])
def test_issuer_must_match_exactly(iss: str, rsa_key: Any, jwks: StaticJwks) -> None:
    reason = rejected(sign(rsa_key, claims(iss=iss)), jwks)
    assert reason == "token issuer is not the expected issuer"


def test_issuer_missing_or_not_string(rsa_key: Any, jwks: StaticJwks) -> None:
    assert "'iss'" in rejected(sign(rsa_key, claims(iss=None)), jwks)
    token = compact({"alg": "RS256", "kid": "rsa-1"}, claims(iss=[ISSUER]), rsa_key)
    assert rejected(token, jwks) == ("token issuer is not the expected issuer")


def test_exp_is_always_required(rsa_key: Any, jwks: StaticJwks) -> None:
    reason = rejected(sign(rsa_key, claims(exp=None)), jwks, require=())
    assert reason == "token is missing the required claim 'exp'"


def test_required_claims(rsa_key: Any, jwks: StaticJwks) -> None:
    assert "'jti'" in rejected(sign(rsa_key, claims()), jwks, require=("jti",))
    assert "'sub'" in rejected(sign(rsa_key, claims(sub=None)), jwks)
    assert verify(sign(rsa_key, claims(sub=None, iat=None)), jwks, require=("exp",))


def test_subject_must_be_string(rsa_key: Any, jwks: StaticJwks) -> None:
    assert rejected(sign(rsa_key, claims(sub=42)), jwks) == "token subject is malformed"


def test_expiry_with_leeway(rsa_key: Any, jwks: StaticJwks) -> None:
    token = sign(rsa_key, claims(exp=NOW - 29))
    assert verify(token, jwks)
    assert rejected(token, jwks, leeway=0) == "token has expired"
    assert rejected(sign(rsa_key, claims(exp=NOW - 30)), jwks) == "token has expired"
    clock = FrozenClock(start=NOW)
    later = sign(rsa_key, claims(exp=NOW + 100))
    assert verify(later, jwks, clock=clock)
    clock.advance(130)
    assert rejected(later, jwks, clock=clock) == "token has expired"


def test_not_before_with_leeway(rsa_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(rsa_key, claims(nbf=NOW + 30)), jwks)
    assert rejected(sign(rsa_key, claims(nbf=NOW + 31)), jwks) == "token is not yet valid"


def test_issued_in_the_future(rsa_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(rsa_key, claims(iat=NOW + 30)), jwks)
    assert rejected(sign(rsa_key, claims(iat=NOW + 31)), jwks) == "token was issued in the future"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["1900000000", True, None, [1], {"n": 1}])
def test_time_claims_must_be_numbers(name: str, value: Any, rsa_key: Any, jwks: StaticJwks) -> None:
    payload = claims()
    payload[name] = value
    reason = rejected(sign(rsa_key, payload), jwks)
    assert reason == f"token claim {name!r} is not a number"


def test_fractional_numeric_dates(rsa_key: Any, jwks: StaticJwks) -> None:
    assert verify(sign(rsa_key, claims(exp=NOW + 0.5, iat=NOW - 0.5)), jwks)


@pytest.mark.parametrize(
    ("aud", "reason"),
    [
        ("other", "token audience is not acceptable"),
        (["a", "b"], "token audience is not acceptable"),
        (None, "token has no audience"),
        ([], "token audience is malformed"),
        ([AUDIENCE, 3], "token audience is malformed"),
        ({"aud": AUDIENCE}, "token audience is malformed"),
    ],
)
def test_audience(aud: Any, reason: str, rsa_key: Any, jwks: StaticJwks) -> None:
    assert rejected(sign(rsa_key, claims(aud=aud)), jwks) == reason


def test_empty_audience_list_accepts_nothing(rsa_key: Any, jwks: StaticJwks) -> None:
    assert (
        rejected(sign(rsa_key, claims()), jwks, audiences=[]) == "token audience is not acceptable"
    )


def test_claim_audiences_helper() -> None:
    assert claim_audiences({"aud": "a"}) == ("a",)
    assert claim_audiences({"aud": ["a", "b"]}) == ("a", "b")
    with pytest.raises(TokenRejected):
        claim_audiences({})


# --- no token material in errors, no foreign exceptions --------------------------------


def test_reason_and_debug_never_contain_the_token(rsa_key: Any, jwks: StaticJwks) -> None:
    secretish = "SECRET-MARKER-0123456789"
    tokens = [
        sign(rsa_key, claims(iss=secretish)),
        sign(rsa_key, claims(), kid=secretish),
        sign(rsa_key, claims(aud=secretish)),
        sign(rsa_key, claims(exp=NOW - 1000, sub=secretish)),
        compact({"alg": secretish}, claims(), rsa_key),
        compact({"alg": "RS256", "kid": "rsa-1", "typ": secretish}, claims(), rsa_key),
    ]
    for token in tokens:
        with pytest.raises(TokenRejected) as info:
            verify(token, jwks, allowed_typ=("JWT",))
        assert secretish not in info.value.reason
        assert secretish not in (info.value.debug or "")
        assert secretish not in str(info.value)


@settings(max_examples=150, deadline=None)
@given(text=st.text(max_size=300))
def test_arbitrary_text_is_only_ever_rejected(text: str, jwks: StaticJwks) -> None:
    with pytest.raises(TokenRejected):
        verify(text, jwks)


@pytest.fixture(scope="module")
def valid_token(rsa_key: Any) -> str:
    return sign(rsa_key, claims())


@settings(max_examples=150, deadline=None)
@given(
    position=st.integers(min_value=0, max_value=10_000),
    replacement=st.sampled_from(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=+/ "
    ),
)
def test_any_single_character_change_is_rejected(
    position: int, replacement: str, valid_token: str, jwks: StaticJwks
) -> None:
    position %= len(valid_token)
    mutated = valid_token[:position] + replacement + valid_token[position + 1 :]
    if mutated == valid_token:
        return
    with pytest.raises(TokenRejected):
        verify(mutated, jwks)


async def _verify_rs256(token: str, keys: Any) -> VerifiedJwt:
    return await verify_jwt(
        token,
        keys=keys,
        issuer=ISSUER,
        audiences=(AUDIENCE,),
        algorithms=("RS256",),
        clock=FrozenClock(start=NOW),
        leeway=30,
        max_bytes=16384,
    )


def _peek_then_verify(peeked: str, verified: str, keys: Any) -> tuple[object, VerifiedJwt]:
    """As the token exchange routes and then verifies: both in one task."""

    async def both() -> tuple[object, VerifiedJwt]:
        issuer = unverified_issuer(peeked, max_bytes=16384)
        return issuer, await _verify_rs256(verified, keys)

    return asyncio.run(both())


def _count_payload_parses(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    import idp_adapters.jwt_verify as module

    parsed: list[str] = []
    original = module._decode_json_segment

    def counting(segment: str, what: str) -> dict[str, Any]:
        if what == "payload":
            parsed.append(segment)
        return original(segment, what)

    monkeypatch.setattr(module, "_decode_json_segment", counting)
    return parsed


def test_the_issuer_peek_saves_verification_a_second_parse_of_the_same_payload(
    rsa_key: Any, jwks: StaticJwks, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _count_payload_parses(monkeypatch)
    token = sign(rsa_key, claims(groups=["a", "b"]))
    issuer, result = _peek_then_verify(token, token, jwks)
    assert issuer == ISSUER
    assert result.claims == claims(groups=["a", "b"])
    assert len(parsed) == 1  # the peek's parse, used by the verification


def test_a_peeked_payload_never_stands_in_for_another_tokens(
    rsa_key: Any, other_rsa_key: Any, jwks: StaticJwks, monkeypatch: pytest.MonkeyPatch
) -> None:
    parsed = _count_payload_parses(monkeypatch)
    peeked = sign(rsa_key, claims(sub="someone-else"))
    verified = sign(rsa_key, claims())
    _, result = _peek_then_verify(peeked, verified, jwks)
    assert result.claims["sub"] == "user-1" and len(parsed) == 2
    # The same payload under a signature by a key the issuer does not have is still refused:
    # the peek saves a parse, never a signature check.
    forged = sign(other_rsa_key, claims())
    with pytest.raises(TokenRejected, match="signature"):
        _peek_then_verify(forged, forged, jwks)


def test_a_peeked_payload_is_used_once(rsa_key: Any, jwks: StaticJwks) -> None:
    token = sign(rsa_key, claims())

    async def peek_once_verify_twice() -> list[Any]:
        unverified_issuer(token, max_bytes=16384)
        results = []
        for _ in range(2):
            verified = await _verify_rs256(token, jwks)
            verified.claims["sub"] = "changed by the caller"  # a caller's own copy
            results.append(verified.claims)
        return results

    first, second = asyncio.run(peek_once_verify_twice())
    assert first is not second
    assert second["sub"] == "changed by the caller" and claims()["sub"] == "user-1"
    from idp_adapters.jwt_verify import _peeked_payload

    assert _peeked_payload.get() is None  # nothing left in this (outer) context either

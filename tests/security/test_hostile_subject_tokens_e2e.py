"""Hostile subject tokens through the real token endpoint: each is refused with a 4xx RFC 6749
error body, never a 500, and neither the error nor the decision record repeats the token."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from idp_adapters._loopback import serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    ID_TOKEN,
    RunningBroker,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.jose import b64, compact, public_jwk

SECRET = "triage-secret-for-hostile-tests-0123456789"
ATTACKER = rsa.generate_private_key(public_exponent=65537, key_size=2048)


class AttackerJwks:
    """An attacker's JWKS server; counts requests (the broker must never fetch it)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.hits[scope["path"]] += 1
        body = json.dumps({"keys": [public_jwk(ATTACKER, "attacker")]}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def attacker_jwks() -> Iterator[tuple[AttackerJwks, str]]:
    app = AttackerJwks()
    server = serve_in_thread(app)
    try:
        yield app, server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory, idp: DevIdentityProvider
) -> Iterator[RunningBroker]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TRIAGE_AGENT_SECRET", SECRET)
    try:
        with run_broker(tmp_path_factory.mktemp("hostile"), [oidc_provider_config(idp)]) as b:
            yield b
    finally:
        mp.undo()


def _claims(idp: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    return idp.claims_for("alice", extra_claims=overrides)


def _header(idp: DevIdentityProvider, **overrides: Any) -> dict[str, Any]:
    header = {"alg": "RS256", "typ": "JWT", "kid": idp.signing_key[0], **overrides}
    return {k: v for k, v in header.items() if v is not None}


def _signed(
    idp: DevIdentityProvider, header: dict[str, Any] | bytes, payload: dict[str, Any] | bytes
) -> str:
    return compact(header, payload, key=idp.signing_key[1])


def _hs256_with_public_key(idp: DevIdentityProvider) -> str:
    pem = (
        idp.signing_key[1]
        .public_key()
        .public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    )
    signing_input = (
        f"{b64(json.dumps(_header(idp, alg='HS256')).encode())}."
        f"{b64(json.dumps(_claims(idp)).encode())}"
    )
    mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def _duplicate_claims(idp: DevIdentityProvider) -> str:
    claims = json.dumps(_claims(idp))
    payload = (claims[:-1] + ', "sub": "admin"}').encode()
    return _signed(idp, _header(idp), payload)


Build = Callable[[DevIdentityProvider, str], tuple[str, str]]
now = int(time.time())


def _unsigned_with_alg(alg: str) -> Build:
    return lambda idp, _: (compact(_header(idp, alg=alg), _claims(idp)), ID_TOKEN)


HOSTILE: dict[str, Build] = {
    **{f"alg-{alg}": _unsigned_with_alg(alg) for alg in ("none", "None", "NONE", "nOnE")},
    "hs256-signed-with-public-key": lambda idp, _: (_hs256_with_public_key(idp), ID_TOKEN),
    "embedded-jwk": lambda idp, _: (
        compact(
            _header(idp, kid="attacker", jwk=public_jwk(ATTACKER, "attacker")),
            _claims(idp),
            key=ATTACKER,
        ),
        ID_TOKEN,
    ),
    "jku-to-attacker": lambda idp, jku: (
        compact(_header(idp, kid="attacker", jku=f"{jku}/jwks.json"), _claims(idp), key=ATTACKER),
        ID_TOKEN,
    ),
    "x5u-to-attacker": lambda idp, jku: (
        compact(_header(idp, kid="attacker", x5u=f"{jku}/cert.pem"), _claims(idp), key=ATTACKER),
        ID_TOKEN,
    ),
    "unknown-kid": lambda idp, _: (
        compact(_header(idp, kid="no-such-key"), _claims(idp), key=ATTACKER),
        ID_TOKEN,
    ),
    "kid-path-traversal": lambda idp, _: (
        compact(_header(idp, kid="../../../../etc/passwd"), _claims(idp), key=ATTACKER),
        ID_TOKEN,
    ),
    "kid-sql-injection": lambda idp, _: (
        compact(_header(idp, kid="' OR 1=1 --"), _claims(idp), key=ATTACKER),
        ID_TOKEN,
    ),
    "expired": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, exp=now - 600, iat=now - 4000)),
        ID_TOKEN,
    ),
    "not-yet-valid": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, nbf=now + 600)),
        ID_TOKEN,
    ),
    "issued-in-the-future": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, iat=now + 600)),
        ID_TOKEN,
    ),
    "wrong-issuer": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, iss="https://evil.example")),
        ID_TOKEN,
    ),
    "issuer-prefix": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, iss=idp.issuer[:-1])),
        ID_TOKEN,
    ),
    "issuer-trailing-slash": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, iss=idp.issuer + "/")),
        ID_TOKEN,
    ),
    "wrong-audience": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, aud="someone-else")),
        ID_TOKEN,
    ),
    "missing-audience": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, aud=None)),
        ID_TOKEN,
    ),
    "missing-exp": lambda idp, _: (_signed(idp, _header(idp), _claims(idp, exp=None)), ID_TOKEN),
    "id-token-as-access-token": lambda idp, _: (idp.mint("alice"), ACCESS_TOKEN),
    "access-token-as-id-token": lambda idp, _: (
        idp.mint("alice", token_type="access_token"),
        ID_TOKEN,
    ),
    "oversized-32k": lambda idp, _: (
        _signed(idp, _header(idp), _claims(idp, padding="x" * 32_000)),
        ID_TOKEN,
    ),
    "duplicate-claims": lambda idp, _: (_duplicate_claims(idp), ID_TOKEN),
    "truncated-signature": lambda idp, _: (idp.mint("alice")[:-10], ID_TOKEN),
    "unknown-crit": lambda idp, _: (
        _signed(
            idp,
            _header(
                idp, crit=["urn:example:must-understand"], **{"urn:example:must-understand": True}
            ),
            _claims(idp),
        ),
        ID_TOKEN,
    ),
    "two-segments": lambda idp, _: (".".join(idp.mint("alice").split(".")[:2]), ID_TOKEN),
    "four-segments": lambda idp, _: (idp.mint("alice") + ".AAAA", ID_TOKEN),
    "garbage": lambda idp, _: ("!!!.???.***", ID_TOKEN),
    "json-payload-not-object": lambda idp, _: (_signed(idp, _header(idp), b"[1,2,3]"), ID_TOKEN),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_subject_token_is_refused(
    name: str,
    broker: RunningBroker,
    idp: DevIdentityProvider,
    attacker_jwks: tuple[AttackerJwks, str],
) -> None:
    app, jku = attacker_jwks
    token, token_type = HOSTILE[name](idp, jku)
    before = len(broker.decisions.records)
    response = httpx.post(
        broker.token_endpoint,
        data=exchange_form(token, token_type),
        auth=("triage-agent", SECRET),
        timeout=10,
    )
    assert 400 <= response.status_code < 500, (name, response.status_code, response.text)
    body = response.json()
    assert body["error"] in {"invalid_grant", "invalid_request"}, body
    assert body["error_description"]
    for part in token.split("."):
        if len(part) >= 8:
            assert part not in response.text
    record = broker.decisions.records[before]
    assert record["outcome"] == "denied" and record["reason"]
    assert token not in json.dumps(broker.decisions.records[before:])
    assert sum(app.hits.values()) == 0  # attacker-supplied key URLs are never fetched


def test_the_genuine_token_passes(broker: RunningBroker, idp: DevIdentityProvider) -> None:
    """The control: the same builders with nothing hostile produce an accepted token."""
    token = _signed(idp, _header(idp), _claims(idp))
    response = httpx.post(
        broker.token_endpoint, data=exchange_form(token), auth=("triage-agent", SECRET), timeout=10
    )
    assert response.status_code == 200, response.text


def test_a_one_megabyte_token_is_refused_before_parsing(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    token = "a" * 1_000_000 + "." + "b" * 10 + "." + "c" * 10
    response = httpx.post(
        broker.token_endpoint, data=exchange_form(token), auth=("triage-agent", SECRET), timeout=10
    )
    assert response.status_code == 413
    assert response.json()["error"] == "invalid_request"


def test_a_flood_of_unknown_kids_fetches_the_jwks_at_most_once_per_interval(
    tmp_path: Path,
) -> None:
    hits: Counter[str] = Counter()
    with serve_idp() as (provider, _):
        inner = provider.asgi_app()

        async def counting(scope: dict[str, Any], receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                hits[scope["path"]] += 1
            await inner(scope, receive, send)

        server = serve_in_thread(counting)
        config = oidc_provider_config(provider) | {
            "jwks_uri": f"{server.url}/jwks.json",
            "jwks_min_refresh_interval_seconds": 30.0,
        }
        mp = pytest.MonkeyPatch()
        mp.setenv("TRIAGE_AGENT_SECRET", SECRET)
        try:
            with run_broker(tmp_path, [config]) as broker:
                ok = httpx.post(
                    broker.token_endpoint,
                    data=exchange_form(provider.mint("alice")),
                    auth=("triage-agent", SECRET),
                )
                assert ok.status_code == 200, ok.text
                for i in range(30):
                    bad = compact(
                        _header(provider, kid=f"unknown-{i}"), _claims(provider), key=ATTACKER
                    )
                    response = httpx.post(
                        broker.token_endpoint,
                        data=exchange_form(bad),
                        auth=("triage-agent", SECRET),
                    )
                    assert response.status_code == 400
        finally:
            mp.undo()
            server.stop()
    assert hits["/jwks.json"] <= 2  # the first load, plus at most one refresh in 30 s


def test_rotated_idp_keys_are_picked_up_without_restart(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    idp.rotate_keys()
    time.sleep(1.1)  # the test IdP config allows one unknown-kid refresh per second
    token = idp.mint("alice")
    response = httpx.post(
        broker.token_endpoint, data=exchange_form(token), auth=("triage-agent", SECRET), timeout=10
    )
    assert response.status_code == 200, response.text
    assert jwt.get_unverified_header(token)["kid"] == idp.signing_key[0]

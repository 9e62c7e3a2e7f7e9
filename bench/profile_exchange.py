"""Where one token exchange's CPU time goes, in process (no HTTP server, no load generator).

``python -m bench.profile_exchange [--requests N]`` builds the broker app exactly as
``broker serve`` does (same settings shape, example policies, the development issuer on loopback
for the JWKS), then:

1. times N sequential exchanges and N ``GET /healthz`` calls made straight into the ASGI app
   (a minimal ASGI driver: no sockets, no uvicorn), so the difference is the exchange's own cost;
2. runs the N exchanges under cProfile and prints the cumulative time of the steps of an
   exchange (per exchange) and the functions with the most own time;
3. times the primitives the exchange is made of, through the project's own functions where it
   has them (the issuer peek, the signature check and the whole of ``verify_jwt``, the strict JSON
   parse, the decision record; ES256 signing through PyJWT as ``TokenIssuer.issue`` does it, the
   form parse, the JSON response) beside the bare ``cryptography`` calls, with no profiler. PyJWT's
   ``jwt.decode``, which the broker no longer calls, is timed for comparison only.

cProfile's overhead inflates pure-Python code relative to C (the crypto), so read (1) and (3) for
absolute costs and (2) for the shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import secrets
import tempfile
from collections.abc import Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from bench._inprocess import (
    as_asgi,
    asgi_call,
    decision_records_to,
    environment,
    micro,
    profile_tables,
    time_beside_healthz,
)
from bench._report import table
from bench._servers import broker_config, dev_issuer
from bench.exchange import AUDIENCE, PERSON, SCOPE, exchange_request

STEPS: list[tuple[str, str, str]] = [
    # (label, file suffix, function name) for the per-exchange cumulative table
    ("whole ASGI app (BrokerApp: straight to the endpoint)", "broker/app.py", "__call__"),
    ("  token endpoint body (endpoints/oauth.py token)", "broker/endpoints/oauth.py", "token"),
    ("    grant dispatch (TokenEndpoint.handle)", "broker/grants.py", "handle"),
    ("    read_form (body, parse_qsl)", "broker/oauth_request.py", "read_form"),
    ("    client authentication (Basic)", "broker/client_auth.py", "authenticate"),
    ("    TokenExchangeGrant.handle", "broker/exchange.py", "handle"),
    ("      subject token verify (all)", "broker/exchange.py", "verify"),
    ("        issuer peek (unverified_claims)", "idp_adapters/jwt_verify.py", "unverified_claims"),
    ("        OIDC adapter authenticate", "idp_adapters/oidc.py", "authenticate"),
    ("          verify_jwt (strict parse + checks)", "idp_adapters/jwt_verify.py", "verify_jwt"),
    ("            _verify_signature", "idp_adapters/jwt_verify.py", "_verify_signature"),
    ("              RSA verify (PyJWT RSAAlgorithm)", "jwt/algorithms.py", "verify"),
    ("      policy decide", "broker/policy/engine.py", "decide"),
    ("      TokenIssuer.issue (claims + sign)", "broker/tokens.py", "issue"),
    ("        jwt.encode (PyJWT)", "jwt/api_jwt.py", "encode"),
    ("          ES256 sign (PyJWT ECAlgorithm)", "jwt/algorithms.py", "sign"),
    ("      DecisionLog.record", "broker/audit.py", "record"),
    ("  JSONResponse render", "starlette/responses.py", "render"),
    ("  response send path (Response.__call__)", "starlette/responses.py", "__call__"),
]


def _run_sync(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a coroutine that never suspends (no I/O) to completion, without an event loop."""
    try:
        coroutine.send(None)
    except StopIteration as done:
        return done.value
    coroutine.close()
    raise RuntimeError("the coroutine suspended")


def _primitives(person_token: str, broker_app: Any, issuer_jwks: dict[str, Any]) -> str:
    import jwt
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding
    from starlette.responses import JSONResponse

    from broker.clock import SystemClock
    from broker.endpoints.edge import NO_STORE as _NO_STORE
    from broker.exchange import DEFAULT_MAX_SUBJECT_TOKEN_BYTES
    from broker.oauth_request import MAX_FIELDS
    from broker.tokens import ACCESS_TOKEN_TYP
    from idp_adapters.jwks import StaticJwks
    from idp_adapters.jwt_verify import (
        _b64url_decode,
        _decode_json_segment,
        _verify_signature,
        unverified_claims,
        verify_jwt,
    )

    header_b64, payload_b64, sig_b64 = person_token.split(".")
    signing_input = f"{header_b64}.{payload_b64}".encode()
    signature = _b64url_decode(sig_b64)
    claims = unverified_claims(person_token, max_bytes=DEFAULT_MAX_SUBJECT_TOKEN_BYTES)
    header = _decode_json_segment(header_b64, "header")
    keys = StaticJwks(issuer_jwks)  # the key a resolver hands verify_jwt (cached PyJWK)
    pyjwk = _run_sync(keys.get_signing_key(header.get("kid"), "RS256"))
    rsa_public = pyjwk.key
    services = broker_app.state.services
    key = services.keyring.active
    ec_private = key.private_key
    clock = SystemClock()
    record = {
        "outcome": "granted",
        "reason": "granted",
        "granted_scopes": SCOPE.split(),
        "audiences": [AUDIENCE],
        "jti": secrets.token_urlsafe(18),
        "expires_in": 900,
        "request_id": secrets.token_hex(16),
        "policy_version": "x" * 16,
        "client_id": "triage-agent",
        "client_auth": "client_secret_basic",
        "person": "dev/alice",
        "idp": "dev",
        "agent_chain": ["triage-agent"],
    }
    response_body = {"access_token": person_token, "token_type": "Bearer", "expires_in": 900}
    response_headers = {**_NO_STORE, "X-Request-Id": secrets.token_hex(16)}
    form_body = exchange_request("triage-agent", "secret", person_token)[1].decode()
    rows = [
        micro(
            "issuer peek (jwt_verify.unverified_claims)",
            lambda: unverified_claims(person_token, max_bytes=DEFAULT_MAX_SUBJECT_TOKEN_BYTES),
            5000,
        ),
        micro(
            "strict JSON parse of header + payload (jwt_verify)",
            lambda: (
                _decode_json_segment(header_b64, "header"),
                _decode_json_segment(payload_b64, "payload"),
            ),
            5000,
        ),
        micro(
            "RS256 verify, cryptography directly",
            lambda: rsa_public.verify(
                signature, signing_input, padding.PKCS1v15(), hashes.SHA256()
            ),
            2000,
        ),
        micro(
            "RS256 verify as verify_jwt does (jwt_verify._verify_signature)",
            lambda: _verify_signature(signing_input, signature, pyjwk, "RS256"),
            2000,
        ),
        micro(
            "verify_jwt whole (parse + signature + claims; in-memory key)",
            lambda: _run_sync(
                verify_jwt(
                    person_token,
                    keys=keys,
                    issuer=claims["iss"],
                    audiences=None,
                    algorithms=["RS256"],
                    clock=clock,
                    leeway=60,
                    max_bytes=DEFAULT_MAX_SUBJECT_TOKEN_BYTES,
                    require=("exp", "iat", "iss"),
                )
            ),
            2000,
        ),
        micro(
            "PyJWT jwt.decode with RS256 verify, for comparison",
            lambda: jwt.decode(
                person_token, key=pyjwk, algorithms=["RS256"], options={"verify_aud": False}
            ),
            2000,
        ),
        micro(
            "PyJWT jwt.decode unverified, for comparison",
            lambda: jwt.decode(person_token, options={"verify_signature": False}),
            5000,
        ),
        micro(
            "ES256 sign, cryptography directly",
            lambda: ec_private.sign(signing_input, ec.ECDSA(hashes.SHA256())),
            2000,
        ),
        micro(
            "ES256 sign via jwt.encode (PyJWT, as TokenIssuer.issue)",
            lambda: jwt.encode(
                claims,
                ec_private,
                algorithm=key.algorithm,
                headers={"kid": key.kid, "typ": ACCESS_TOKEN_TYP},
            ),
            2000,
        ),
        micro(
            "decision record (the app's DecisionLog.record, to its file)",
            lambda: services.decisions.record("token.exchange", **record),
            20000,
        ),
        micro(
            "JSONResponse(body, headers) construction",
            lambda: JSONResponse(response_body, headers=response_headers),
            20000,
        ),
        micro(
            "parse_qsl of the exchange form (as read_form)",
            lambda: parse_qsl(
                form_body, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS
            ),
            20000,
        ),
    ]
    return "Primitives (best of 5, no profiler):\n" + table(["primitive", "us/call"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_exchange")
    parser.add_argument("--requests", type=int, default=2000, help="exchanges per measurement")
    parser.add_argument("--top", type=int, default=25, help="rows of the own-time table")
    args = parser.parse_args(argv)

    from broker.app import create_app
    from broker.settings import load_settings

    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-prof-")))
        issuer = stack.enter_context(dev_issuer())
        secret = secrets.token_urlsafe(32)
        stack.enter_context(environment({"TRIAGE_AGENT_SECRET": secret}))
        settings = load_settings(None, **broker_config(issuer, "http://127.0.0.1:8080", workdir))
        # Decision records go to a file, flushed per record, as under `broker serve` (whose
        # stdout/stderr the benchmark sends to a file), whichever sink the broker uses.
        records = stack.enter_context(decision_records_to(workdir / "decisions.jsonl"))
        with contextlib.redirect_stdout(records):
            app = create_app(settings)
        token = issuer.provider.mint(PERSON, token_type="id_token", lifetime=24 * 3600)
        http_headers, body = exchange_request("triage-agent", secret, token)
        headers = as_asgi(http_headers)
        n = args.requests

        async def exchanges(count: int) -> None:
            for _ in range(count):
                status, payload = await asgi_call(app, "POST", "/oauth2/token", headers, body)
                if status != 200:
                    raise RuntimeError(f"exchange failed: {status} {payload[:300]!r}")

        # warm: discovery + JWKS fetched once, caches filled
        ex_s, hz_s = asyncio.run(time_beside_healthz(app, exchanges, n))
        print(
            f"In-process, sequential, {n} requests each (no sockets, no uvicorn/h11):\n"
            + table(
                ["request", "us/request"],
                [
                    ["POST /oauth2/token (token exchange)", ex_s * 1e6],
                    ["GET /healthz", hz_s * 1e6],
                    ["exchange minus healthz", (ex_s - hz_s) * 1e6],
                ],
            )
        )

        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(exchanges(n))
        profiler.disable()
        print(profile_tables(pstats.Stats(profiler), STEPS, n, args.top, "exchange"))
        print("\n" + _primitives(token, app, issuer.provider.jwks()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

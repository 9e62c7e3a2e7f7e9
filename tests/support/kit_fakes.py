"""A stand-in authorization server for the resource-server kit's unit tests, served over loopback.

It publishes a JWK Set (keys the test rotates), answers RFC 7662 introspection for one resource
server (tokens the test revokes), counts requests, and can be taken down. Tokens are signed here
with the broker's claim layout (typ at+jwt, act chain, scope string, jti), every claim overridable,
so each refusal the kit makes can be provoked on its own.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

RS_CLIENT_ID = "notes-api"
RS_SECRET = "notes-api-secret-0123456789"


@dataclass
class SigningKey:
    kid: str
    private: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1())
    )

    @property
    def public_jwk(self) -> dict[str, Any]:
        jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        jwk.update({"kid": self.kid, "alg": "ES256", "use": "sig"})
        return jwk


def token_digest(token: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).decode()


class FakeAuthorizationServer:
    """ASGI app: ``GET /.well-known/jwks.json`` and ``POST /oauth2/introspect``."""

    def __init__(self) -> None:
        self.published: list[SigningKey] = [SigningKey("key-1")]
        self.revoked: set[str] = set()
        self.hits: Counter[str] = Counter()
        self.down = False
        self.introspected_tokens: list[str] = []

    def revoke(self, token: str) -> None:
        self.revoked.add(token_digest(token))

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        self.hits[path] += 1
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if self.down:
            await _send(send, 503, {"error": "down"})
        elif path == "/.well-known/jwks.json":
            await _send(send, 200, {"keys": [k.public_jwk for k in self.published]})
        elif path == "/oauth2/introspect" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            expected = base64.b64encode(f"{RS_CLIENT_ID}:{RS_SECRET}".encode())
            if headers.get(b"authorization") != b"Basic " + expected:
                await _send(send, 401, {"error": "invalid_client"})
                return
            token = parse_qs(body.decode())["token"][0]
            self.introspected_tokens.append(token)
            active = token_digest(token) not in self.revoked
            await _send(send, 200, {"active": True, "sub": "x"} if active else {"active": False})
        else:
            await _send(send, 404, {"error": "not found"})


async def _send(send: Any, status: int, document: Mapping[str, Any]) -> None:
    body = json.dumps(document).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def broker_claims(
    issuer: str, audience: str | list[str], now: float, **overrides: Any
) -> dict[str, Any]:
    """Claims laid out as the broker issues them (a two-agent chain, an approval)."""
    claims: dict[str, Any] = {
        "iss": issuer,
        "sub": "dev/alice",
        "aud": audience,
        "client_id": "summariser-agent",
        "scope": "notes:read notes:list",
        "act": {"sub": "summariser-agent", "act": {"sub": "triage-agent"}},
        "iat": int(now),
        "nbf": int(now),
        "exp": int(now) + 300,
        "jti": secrets.token_urlsafe(12),
        "provenance": {"person_id": "dev/alice"},
        "policy_version": "test",
        "approval": {"id": "apr-1", "approved_by": "dev/dave"},
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def sign(
    claims: Mapping[str, Any],
    key: SigningKey,
    *,
    typ: str | None = "at+jwt",
    headers: Mapping[str, Any] | None = None,
) -> str:
    header: dict[str, Any] = {"kid": key.kid, "typ": typ}  # None: PyJWT then sends no typ
    header.update(headers or {})
    return jwt.encode(dict(claims), key.private, algorithm="ES256", headers=header)

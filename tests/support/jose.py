"""Hand-built JWS for hostile-input tests (signatures still come from PyJWT's algorithms)."""

from __future__ import annotations

import base64
import json
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def compact(
    header: dict[str, Any] | bytes,
    payload: dict[str, Any] | bytes,
    key: Any = None,
    alg: str = "RS256",
) -> str:
    """Hand-build a compact JWS from arbitrary header/payload bytes (signature via PyJWT's alg)."""
    raw_header = header if isinstance(header, bytes) else json.dumps(header).encode()
    raw_payload = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(raw_header)}.{b64(raw_payload)}"
    signature = b""
    if key is not None:
        signature = jwt.get_algorithm_by_name(alg).sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def public_jwk(key: rsa.RSAPrivateKey, kid: str | None) -> dict[str, Any]:
    jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    if kid is not None:
        jwk["kid"] = kid
    return jwk

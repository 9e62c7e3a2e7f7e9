"""!!! DEVELOPMENT ONLY -- NEVER USE IN PRODUCTION !!!

The development identity provider: a real OpenID Connect issuer on loopback that signs tokens for
a fixed list of example people *to anyone who asks*. There is no login, no password, no consent:
``POST /token`` with ``person=alice`` returns a valid token for Alice. Trusting it (``kind: dev``)
in a real deployment would let any local process impersonate any listed person, which is why the
broker refuses ``kind: dev`` unless ``allow_development_components`` is set, and why the issuer
must be a loopback URL.

What it serves (under the issuer URL):

* ``GET /.well-known/openid-configuration`` -- discovery document;
* ``GET /jwks.json`` -- all public keys, including rotated-out ones (so old tokens still verify);
* ``POST /token`` (form ``person``, optional ``token_type`` = ``id_token`` | ``access_token``);
* ``GET /people`` -- the example people.

ID tokens: ``typ: JWT``, ``aud`` = the client id, no nonce. Access tokens: ``typ: at+jwt``,
``aud`` = the audience, with ``scope`` and ``client_id`` (RFC 9068). Both carry ``groups``,
``email`` and ``name``. Tests mint hostile tokens with `DevIdentityProvider.signing_key`.
"""

from __future__ import annotations

import logging
import secrets
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from broker import settings as broker_settings
from broker.clock import Clock, SystemClock
from broker.types import TokenType
from broker.urls import is_loopback_url

_log = logging.getLogger(__name__)

DevTokenKind = Literal["id_token", "access_token"]
_TYP_BY_KIND: Mapping[str, str] = MappingProxyType({"id_token": "JWT", "access_token": "at+jwt"})
_ISSUED_TYPE_BY_KIND: Mapping[str, TokenType] = MappingProxyType(
    {"id_token": TokenType.ID_TOKEN, "access_token": TokenType.ACCESS_TOKEN}
)

DEV_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
DEV_SCOPE = "openid profile email"
RSA_KEY_BITS = 2048


@dataclass(frozen=True, slots=True)
class DevPerson:
    """An example person of the development IdP (development only)."""

    subject: str
    groups: tuple[str, ...]
    email: str
    name: str


def default_people_file() -> Path:
    """The packaged example people, ``broker/dev/people.yaml`` (found next to broker.settings,
    which works whether or not ``broker`` is a namespace package)."""
    return Path(broker_settings.__file__).resolve().parent / "dev" / "people.yaml"


def load_dev_people(path: Path | None = None) -> dict[str, DevPerson]:
    """Read example people from YAML (default: the packaged ``broker/dev/people.yaml``).

    Format: ``people: {<subject>: {groups: [...], email: ..., name: ...}, ...}``. Returns the
    people keyed by subject. Raises ValueError when the file does not have that shape.
    """
    path = path if path is not None else default_people_file()
    source = str(path)
    text = path.read_text("utf-8")
    document = yaml.safe_load(text)
    people = document.get("people") if isinstance(document, dict) else None
    if not isinstance(people, dict):
        raise ValueError(f"{source}: expected a top-level 'people' mapping")
    result: dict[str, DevPerson] = {}
    for subject, entry in people.items():
        if not isinstance(subject, str) or not subject:
            raise ValueError(f"{source}: person keys must be non-empty strings")
        if not isinstance(entry, dict):
            raise ValueError(f"{source}: person {subject!r} must be a mapping")
        groups = entry.get("groups") or []
        email = entry.get("email", f"{subject}@example.com")
        name = entry.get("name", subject)
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise ValueError(f"{source}: person {subject!r}: groups must be a list of strings")
        if not isinstance(email, str) or not isinstance(name, str):
            raise ValueError(f"{source}: person {subject!r}: email and name must be strings")
        unknown = set(entry) - {"groups", "email", "name"}
        if unknown:
            raise ValueError(f"{source}: person {subject!r}: unknown fields {sorted(unknown)}")
        result[subject] = DevPerson(subject=subject, groups=tuple(groups), email=email, name=name)
    return result


def _new_kid() -> str:
    return f"dev-{secrets.token_hex(6)}"


class DevIdentityProvider:
    """A development-only OIDC issuer holding generated RSA keys (see the module docstring)."""

    def __init__(
        self,
        issuer: str,
        people: Mapping[str, DevPerson],
        *,
        client_id: str = "broker-dev",
        audience: str = "broker",
        algorithm: str = "RS256",
        clock: Clock | None = None,
    ) -> None:
        """`issuer` must be an http(s) loopback URL; `people` are keyed by the name used in
        `mint` (normally the subject); `clock` defaults to the system clock."""
        if not is_loopback_url(issuer) or urlsplit(issuer).scheme not in {"http", "https"}:
            raise ValueError("the development identity provider only runs on a loopback URL")
        if algorithm not in DEV_ALGORITHMS:
            raise ValueError(f"algorithm must be one of {sorted(DEV_ALGORITHMS)}")
        self._issuer = issuer.rstrip("/") if urlsplit(issuer).path in {"", "/"} else issuer
        self._people = dict(people)
        self._client_id = client_id
        self._audience = audience
        self._algorithm = algorithm
        self._clock: Clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._keys: tuple[tuple[str, rsa.RSAPrivateKey], ...] = ()
        self.rotate_keys()

    @property
    def issuer(self) -> str:
        return self._issuer

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def audience(self) -> str:
        return self._audience

    @property
    def algorithm(self) -> str:
        return self._algorithm

    @property
    def people(self) -> Mapping[str, DevPerson]:
        return dict(self._people)

    @property
    def discovery_url(self) -> str:
        return f"{self._issuer.rstrip('/')}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self._issuer.rstrip('/')}/jwks.json"

    @property
    def token_endpoint(self) -> str:
        return f"{self._issuer.rstrip('/')}/token"

    @property
    def signing_key(self) -> tuple[str, rsa.RSAPrivateKey]:
        """The current signing key as (kid, private key). Tests use it to build hostile tokens."""
        return self._keys[-1]

    @property
    def key_ids(self) -> tuple[str, ...]:
        """Every published kid, oldest first; the last one signs."""
        return tuple(kid for kid, _ in self._keys)

    def rotate_keys(self) -> str:
        """Generate a new signing key (returned kid); earlier public keys stay published."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_KEY_BITS)
        kid = _new_kid()
        with self._lock:
            self._keys = (*self._keys, (kid, key))
        return kid

    def retire_key(self, kid: str) -> None:
        """Stop publishing `kid` (it must not be the current signing key)."""
        with self._lock:
            if kid == self._keys[-1][0]:
                raise ValueError("cannot retire the current signing key")
            self._keys = tuple(entry for entry in self._keys if entry[0] != kid)

    def jwks(self) -> dict[str, Any]:
        """The public JWK Set (every key still published)."""
        keys = []
        for kid, private_key in self._keys:
            jwk: dict[str, Any] = jwt.algorithms.RSAAlgorithm.to_jwk(
                private_key.public_key(), as_dict=True
            )
            jwk.update({"kid": kid, "use": "sig", "alg": self._algorithm})
            keys.append(jwk)
        return {"keys": keys}

    def discovery_document(self) -> dict[str, Any]:
        return {
            "issuer": self._issuer,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": self.token_endpoint,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self._algorithm],
            "claims_supported": ["sub", "groups", "email", "name", "auth_time"],
            "development_only": True,
        }

    def claims_for(
        self,
        person: str,
        *,
        token_type: DevTokenKind = "id_token",  # noqa: S107 (a token kind, not a secret)
        lifetime: int = 3600,
        extra_claims: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The claims `mint` would sign. In `extra_claims`, a None value removes that claim."""
        try:
            who = self._people[person]
        except KeyError:
            raise KeyError(f"no development person {person!r}") from None
        now = int(self._clock.now())
        claims: dict[str, Any] = {
            "iss": self._issuer,
            "sub": who.subject,
            "iat": now,
            "exp": now + lifetime,
            "jti": secrets.token_urlsafe(12),
            "groups": list(who.groups),
            "email": who.email,
            "name": who.name,
        }
        if token_type not in _TYP_BY_KIND:
            raise ValueError("token_type must be 'id_token' or 'access_token'")
        if _TYP_BY_KIND[token_type] == "JWT":
            claims.update({"aud": self._client_id, "auth_time": now})
        else:
            claims.update({"aud": self._audience, "client_id": self._client_id, "scope": DEV_SCOPE})
        for name, value in (extra_claims or {}).items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def sign(
        self,
        claims: Mapping[str, Any],
        *,
        typ: str | None = "JWT",
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """Sign `claims` with the current key (header ``kid``, ``typ``; `headers` merged, a None
        value removing that header). The algorithm is always the configured one."""
        kid, private_key = self.signing_key
        header: dict[str, Any] = {"kid": kid, "typ": typ}
        for name, value in (headers or {}).items():
            if name == "alg":
                raise ValueError("the development IdP always signs with its configured alg")
            header[name] = value
        header = {name: value for name, value in header.items() if value is not None}
        if "typ" not in header:
            header["typ"] = None  # PyJWT adds typ JWT unless told to drop it
        return jwt.encode(dict(claims), private_key, algorithm=self._algorithm, headers=header)

    def mint(
        self,
        person: str,
        *,
        token_type: DevTokenKind = "id_token",  # noqa: S107 (a token kind, not a secret)
        lifetime: int = 3600,
        extra_claims: Mapping[str, Any] | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        """A signed ID token (``typ: JWT``) or access token (``typ: at+jwt``) for `person`."""
        claims = self.claims_for(
            person, token_type=token_type, lifetime=lifetime, extra_claims=extra_claims
        )
        return self.sign(claims, typ=_TYP_BY_KIND[token_type], headers=headers)

    def asgi_app(self) -> FastAPI:
        """The issuer's HTTP endpoints (see the module docstring), under the issuer's path."""
        _log.warning(
            "DEVELOPMENT identity provider serving %s: it signs tokens for anyone who asks; "
            "never use it in production",
            self._issuer,
        )
        prefix = urlsplit(self._issuer).path.rstrip("/")
        app = FastAPI(
            title="Development identity provider (NOT FOR PRODUCTION)",
            docs_url=None,
            redoc_url=None,
            openapi_url=None,
        )

        @app.get(f"{prefix}/.well-known/openid-configuration")
        async def discovery() -> JSONResponse:
            return JSONResponse(self.discovery_document())

        @app.get(f"{prefix}/jwks.json")
        async def jwks() -> JSONResponse:
            return JSONResponse(self.jwks(), headers={"Cache-Control": "max-age=60"})

        @app.get(f"{prefix}/people")
        async def people() -> JSONResponse:
            return JSONResponse(
                {
                    "people": [
                        {
                            "person": key,
                            "subject": p.subject,
                            "groups": list(p.groups),
                            "email": p.email,
                            "name": p.name,
                        }
                        for key, p in self._people.items()
                    ]
                }
            )

        @app.post(f"{prefix}/token")
        async def token(request: Request) -> JSONResponse:
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            person = (form.get("person") or [""])[0]
            kind = (form.get("token_type") or ["id_token"])[0]
            if kind not in _TYP_BY_KIND:
                return JSONResponse(
                    {
                        "error": "invalid_request",
                        "error_description": "unknown token_type; known: "
                        + ", ".join(sorted(_TYP_BY_KIND)),
                    },
                    status_code=400,
                )
            if person not in self._people:
                return JSONResponse(
                    {
                        "error": "invalid_request",
                        "error_description": "unknown person; the people of this development "
                        "IdP are: " + ", ".join(sorted(self._people)),
                    },
                    status_code=400,
                )
            lifetime = 3600
            minted = self.mint(person, token_type=kind, lifetime=lifetime)  # type: ignore[arg-type]
            issued = _ISSUED_TYPE_BY_KIND[kind]
            return JSONResponse(
                {
                    kind: minted,
                    "issued_token_type": str(issued),
                    "token_type": "N_A" if issued is TokenType.ID_TOKEN else "Bearer",
                    "expires_in": lifetime,
                },
                headers={"Cache-Control": "no-store"},
            )

        return app

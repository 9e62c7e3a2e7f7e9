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
* ``POST /token`` (form ``person``, optional ``token_type`` = ``id_token`` | ``access_token``,
  optional ``audience`` for an access token);
* ``GET /authorize`` -- the authorization code flow (OpenID Connect Core 3.1, PKCE S256
  required): a page listing the example people as buttons; picking one (a form POST back to
  ``/authorize``) redirects to the client's registered redirect URI with ``code`` and ``state``;
* ``POST /token`` with ``grant_type=authorization_code`` (``code``, ``redirect_uri``,
  ``client_id``, ``code_verifier``): the code is single use, lives 60 seconds and is bound to the
  client id, the redirect URI and the PKCE challenge; answers an ID token (with the ``nonce``)
  and an access token;
* ``GET /people`` -- the example people.

Redirect URIs must be registered (`redirect_uris`, `register_redirect_uri`); an unregistered one
gets an error page, never a redirect. The page picks a person without any password: that is the
point of a development IdP, and why it must never run in production.

ID tokens: ``typ: JWT``, ``aud`` = the client id, no nonce (the code flow's carry its nonce).
Access tokens: ``typ: at+jwt``, ``aud`` = the audience, with ``scope`` and ``client_id``
(RFC 9068). Both carry ``groups``, ``email`` and ``name``. Tests mint hostile tokens with
`DevIdentityProvider.signing_key`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import secrets
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import jinja2
import jwt
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

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
CODE_LIFETIME_SECONDS = 60
MAX_PENDING_CODES = 1000
AUTHORIZATION_PARAMETERS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
)
_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
_PAGES = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_AUTHORIZE_PAGE = _PAGES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Development sign-in</title>
<style>body{font-family:sans-serif;max-width:40em;margin:2em auto}
button{display:block;width:100%;margin:.4em 0;padding:.6em;text-align:left}
.warn{background:#fee;border:1px solid #c00;padding:.5em}</style></head>
<body>
<p class="warn">DEVELOPMENT identity provider: anyone may sign in as anyone.
Never in production.</p>
<h1>Sign in to {{ client_id }}</h1>
<p>Pick who you are; you will be sent back to <code>{{ redirect_uri }}</code>.</p>
<form method="post" action="{{ action }}">
{% for name, value in parameters %}<input type="hidden" name="{{ name }}" value="{{ value }}">
{% endfor %}
{% for key, person in people %}<button type="submit" name="person" value="{{ key }}">
{{ person.name }} ({{ key }}{% if person.groups %}; groups: {{ person.groups | join(", ") }}{%
endif %})</button>
{% endfor %}
<button type="submit" name="cancel" value="1">Cancel</button>
</form>
</body></html>
"""
)
_ERROR_PAGE = _PAGES.from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign-in refused</title></head>
<body><h1>Sign-in refused</h1><p>{{ message }}</p></body></html>
"""
)


@dataclass(frozen=True, slots=True)
class _IssuedCode:
    """What an authorization code is bound to (kept in memory, used once)."""

    person: str
    client_id: str
    redirect_uri: str
    code_challenge: str
    nonce: str | None
    expires_at: float


class _AuthorizationRefused(Exception):
    """An authorization request that cannot go back to the client (unknown client or redirect
    URI): shown as a page, never redirected."""


def _s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


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
        redirect_uris: Iterable[str] = (),
    ) -> None:
        """`issuer` must be an http(s) loopback URL; `people` are keyed by the name used in
        `mint` (normally the subject); `clock` defaults to the system clock; `redirect_uris` are
        where the authorization code flow may send `client_id`'s codes (exact match)."""
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
        self._redirect_uris: set[str] = set()
        self._codes: dict[str, _IssuedCode] = {}
        for uri in redirect_uris:
            self.register_redirect_uri(uri)
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
    def authorization_endpoint(self) -> str:
        return f"{self._issuer.rstrip('/')}/authorize"

    @property
    def redirect_uris(self) -> frozenset[str]:
        return frozenset(self._redirect_uris)

    def register_redirect_uri(self, uri: str) -> None:
        """Let the authorization code flow redirect to `uri` (an absolute http(s) URL without a
        fragment; compared exactly)."""
        parts = urlsplit(uri)
        if parts.scheme not in {"http", "https"} or not parts.netloc or parts.fragment:
            raise ValueError("a redirect URI is an absolute http(s) URL without a fragment")
        with self._lock:
            self._redirect_uris.add(uri)

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
            "authorization_endpoint": self.authorization_endpoint,
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none", "client_secret_basic"],
            "scopes_supported": DEV_SCOPE.split(),
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": [self._algorithm],
            "claims_supported": ["sub", "groups", "email", "name", "auth_time", "nonce"],
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

    # --- the authorization code flow (development sign-in pages) -----------------------------

    def check_authorization_request(self, values: Mapping[str, str]) -> dict[str, str]:
        """The authorization request's parameters, checked. Raises `_AuthorizationRefused` when
        the client or redirect URI is unknown (nothing may be sent there), ValueError
        ``(error, description)`` for a request to refuse at the redirect URI."""
        client_id = values.get("client_id", "")
        redirect_uri = values.get("redirect_uri", "")
        if client_id != self._client_id:
            raise _AuthorizationRefused("unknown client_id")
        if redirect_uri not in self._redirect_uris:
            raise _AuthorizationRefused(
                "redirect_uri is not registered with this development identity provider"
            )
        if values.get("response_type") != "code":
            raise ValueError("unsupported_response_type", "only response_type=code")
        if values.get("code_challenge_method") != "S256" or not values.get("code_challenge"):
            raise ValueError("invalid_request", "PKCE is required: code_challenge with S256")
        if "openid" not in values.get("scope", "").split():
            raise ValueError("invalid_scope", "scope must include openid")
        return {name: values[name] for name in AUTHORIZATION_PARAMETERS if values.get(name)}

    def issue_code(self, person: str, request: Mapping[str, str]) -> str:
        """A fresh single-use code for `person` bound to the checked `request`."""
        if person not in self._people:
            raise KeyError(person)
        code = secrets.token_urlsafe(32)
        now = self._clock.now()
        issued = _IssuedCode(
            person=person,
            client_id=request["client_id"],
            redirect_uri=request["redirect_uri"],
            code_challenge=request["code_challenge"],
            nonce=request.get("nonce"),
            expires_at=now + CODE_LIFETIME_SECONDS,
        )
        with self._lock:
            self._codes = {k: v for k, v in self._codes.items() if v.expires_at > now}
            if len(self._codes) >= MAX_PENDING_CODES:
                raise ValueError("temporarily_unavailable", "too many pending codes")
            self._codes[code] = issued
        return code

    def redeem_code(
        self, code: str, *, client_id: str, redirect_uri: str, code_verifier: str
    ) -> _IssuedCode:
        """The code's binding, once: raises ValueError ``(error, description)`` when the code
        is unknown, used, expired, or not bound to this client, redirect URI and verifier."""
        with self._lock:
            issued = self._codes.pop(code, None)  # single use, whatever follows
        if issued is None or issued.expires_at <= self._clock.now():
            raise ValueError("invalid_grant", "unknown, used or expired code")
        if issued.client_id != client_id or issued.redirect_uri != redirect_uri:
            raise ValueError("invalid_grant", "the code was issued to another client or redirect")
        try:
            verified = secrets.compare_digest(_s256(code_verifier), issued.code_challenge)
        except (UnicodeEncodeError, TypeError):
            verified = False
        if not verified:
            raise ValueError("invalid_grant", "code_verifier does not match the code_challenge")
        return issued

    def _authorize_page(self, request: Mapping[str, str], action: str) -> HTMLResponse:
        html = _AUTHORIZE_PAGE.render(
            client_id=request["client_id"],
            redirect_uri=request["redirect_uri"],
            action=action,
            parameters=sorted(request.items()),
            people=sorted(((key, p) for key, p in self._people.items()), key=lambda item: item[0]),
        )
        headers = {
            **_PAGE_HEADERS,
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action 'self' {_origin(request['redirect_uri'])}; frame-ancestors 'none'",
        }
        return HTMLResponse(html, headers=headers)

    @staticmethod
    def _refused_page(message: str) -> HTMLResponse:
        headers = {
            **_PAGE_HEADERS,
            "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
        }
        return HTMLResponse(_ERROR_PAGE.render(message=message), status_code=400, headers=headers)

    @staticmethod
    def _back_to_client(redirect_uri: str, state: str | None, **params: str) -> Response:
        if state:
            params["state"] = state
        separator = "&" if urlsplit(redirect_uri).query else "?"
        location = f"{redirect_uri}{separator}{urlencode(params)}"
        return RedirectResponse(location, status_code=303, headers={"Cache-Control": "no-store"})

    def _authorization_code_grant(
        self, form: Mapping[str, list[str]], authorization: str
    ) -> JSONResponse:
        def one(name: str) -> str:
            values = form.get(name) or [""]
            return values[0] if len(values) == 1 else ""

        client_id = one("client_id")
        scheme, _, encoded = authorization.partition(" ")
        if scheme.lower() == "basic" and encoded:
            try:
                decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                decoded = ""
            basic_client = unquote(decoded.partition(":")[0])
            if client_id and basic_client != client_id:
                return _token_error("invalid_client", "client_id differs from HTTP Basic")
            client_id = basic_client
        if client_id != self._client_id:
            return _token_error("invalid_client", "unknown client", status=401)
        try:
            issued = self.redeem_code(
                one("code"),
                client_id=client_id,
                redirect_uri=one("redirect_uri"),
                code_verifier=one("code_verifier"),
            )
        except ValueError as exc:
            error, description = exc.args
            return _token_error(error, description)
        lifetime = 3600
        extra = {"nonce": issued.nonce, "azp": client_id} if issued.nonce else {"azp": client_id}
        id_token = self.mint(issued.person, lifetime=lifetime, extra_claims=extra)
        access_token = self.mint(
            issued.person,
            token_type="access_token",  # noqa: S106 (a token kind, not a secret)
            lifetime=lifetime,
        )
        return JSONResponse(
            {
                "access_token": access_token,
                "id_token": id_token,
                "token_type": "Bearer",
                "expires_in": lifetime,
                "scope": DEV_SCOPE,
            },
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"},
        )

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

        authorize_path = f"{prefix}/authorize"

        @app.get(authorize_path)
        async def authorize(request: Request) -> Response:
            values = {k: v for k, v in request.query_params.items()}
            try:
                checked = self.check_authorization_request(values)
            except _AuthorizationRefused as exc:
                return self._refused_page(str(exc))
            except ValueError as exc:
                error, description = exc.args
                return self._back_to_client(
                    values["redirect_uri"],
                    values.get("state"),
                    error=error,
                    error_description=description,
                )
            return self._authorize_page(checked, self.authorization_endpoint)

        @app.post(authorize_path)
        async def choose(request: Request) -> Response:
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            values = {k: v[0] for k, v in form.items() if len(v) == 1}
            try:
                checked = self.check_authorization_request(values)
            except _AuthorizationRefused as exc:
                return self._refused_page(str(exc))
            except ValueError as exc:
                error, description = exc.args
                return self._back_to_client(
                    values["redirect_uri"],
                    values.get("state"),
                    error=error,
                    error_description=description,
                )
            state = checked.get("state")
            if values.get("cancel"):
                return self._back_to_client(checked["redirect_uri"], state, error="access_denied")
            person = values.get("person", "")
            if person not in self._people:
                return self._refused_page("unknown person")
            try:
                code = self.issue_code(person, checked)
            except ValueError as exc:
                error, description = exc.args
                return self._back_to_client(
                    checked["redirect_uri"], state, error=error, error_description=description
                )
            return self._back_to_client(checked["redirect_uri"], state, code=code)

        @app.post(f"{prefix}/token")
        async def token(request: Request) -> JSONResponse:
            form = parse_qs((await request.body()).decode("utf-8", "replace"))
            if (form.get("grant_type") or [""])[0] == "authorization_code":
                return self._authorization_code_grant(
                    form, request.headers.get("authorization", "")
                )
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
            audience = (form.get("audience") or [""])[0]
            extra = {"aud": audience} if audience and kind == "access_token" else None
            minted = self.mint(
                person,
                token_type=kind,  # type: ignore[arg-type]
                lifetime=lifetime,
                extra_claims=extra,
            )
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


def _token_error(error: str, description: str, *, status: int = 400) -> JSONResponse:
    headers = {"Cache-Control": "no-store", "Pragma": "no-cache"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Basic realm="dev-idp"'
    return JSONResponse(
        {"error": error, "error_description": description}, status_code=status, headers=headers
    )

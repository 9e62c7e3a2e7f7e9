"""The development IdP's authorization code flow (OpenID Connect Core 3.1 with PKCE S256), over
loopback HTTP: registered redirect URIs only, codes single use, short-lived and bound to the
client, the redirect URI and the verifier; the ID token carries the nonce. ``POST /token`` with
``person`` is unchanged."""

from __future__ import annotations

import base64
import hashlib
import secrets
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from broker.clock import FrozenClock
from idp_adapters.dev import CODE_LIFETIME_SECONDS, DevIdentityProvider
from tests.support.approvals import forms_of
from tests.support.harness import serve_idp

REDIRECT = "http://127.0.0.1:1/approvals/callback"
VERIFIER = secrets.token_urlsafe(48)
CHALLENGE = base64.urlsafe_b64encode(hashlib.sha256(VERIFIER.encode()).digest()).rstrip(b"=")


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[DevIdentityProvider, FrozenClock]]:
    clock = FrozenClock(start=1_800_000_000)
    with serve_idp(clock=clock, redirect_uris=[REDIRECT]) as (provider, _):
        yield provider, clock


def params(provider: DevIdentityProvider, **overrides: str) -> dict[str, str]:
    values = {
        "response_type": "code",
        "client_id": provider.client_id,
        "redirect_uri": REDIRECT,
        "scope": "openid profile email",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": CHALLENGE.decode(),
        "code_challenge_method": "S256",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v}


def code_for(provider: DevIdentityProvider, person: str = "carol", **overrides: str) -> str:
    page = httpx.get(provider.authorization_endpoint, params=params(provider, **overrides))
    assert page.status_code == 200, page.text
    [form] = forms_of(page.text)
    assert ("person", person) in form["buttons"]
    picked = httpx.post(provider.authorization_endpoint, data={**form["fields"], "person": person})
    assert picked.status_code == 303
    location = urlsplit(picked.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["st-1"]
    return query["code"][0]


def redeem(provider: DevIdentityProvider, issued: str, **overrides: str) -> httpx.Response:
    form = {
        "grant_type": "authorization_code",
        "code": issued,
        "redirect_uri": REDIRECT,
        "client_id": provider.client_id,
        "code_verifier": VERIFIER,
        **overrides,
    }
    return httpx.post(provider.token_endpoint, data=form)


def test_discovery_advertises_the_code_flow(
    served: tuple[DevIdentityProvider, FrozenClock],
) -> None:
    provider, _ = served
    document = httpx.get(provider.discovery_url).json()
    assert document["authorization_endpoint"] == provider.authorization_endpoint
    assert document["response_types_supported"] == ["code"]
    assert document["code_challenge_methods_supported"] == ["S256"]
    assert "authorization_code" in document["grant_types_supported"]


def test_a_picked_person_gets_an_id_token_with_the_nonce(
    served: tuple[DevIdentityProvider, FrozenClock],
) -> None:
    provider, _ = served
    answer = redeem(provider, code_for(provider))
    assert answer.status_code == 200, answer.text
    assert answer.headers["cache-control"] == "no-store"
    claims = jwt.decode(answer.json()["id_token"], options={"verify_signature": False})
    assert claims["sub"] == "carol" and claims["nonce"] == "n-1"
    assert claims["aud"] == provider.client_id and claims["groups"] == ["finance"]
    assert claims["email"] == "carol@example.com" and claims["name"] == "Carol Finance"


def test_a_code_is_used_once(served: tuple[DevIdentityProvider, FrozenClock]) -> None:
    provider, _ = served
    code = code_for(provider)
    assert redeem(provider, code).status_code == 200
    again = redeem(provider, code)
    assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    "overrides",
    [
        {"code_verifier": secrets.token_urlsafe(48)},
        {"code_verifier": ""},
        {"redirect_uri": "http://127.0.0.1:1/other"},
        {"code": "made-up"},
    ],
    ids=["wrong verifier", "no verifier", "other redirect", "unknown code"],
)
def test_a_code_is_bound_to_its_verifier_and_redirect(
    served: tuple[DevIdentityProvider, FrozenClock], overrides: dict[str, str]
) -> None:
    provider, _ = served
    code = code_for(provider)
    refused = redeem(provider, code, **overrides)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
    if "code" not in overrides:  # spent by the failed attempt all the same
        assert redeem(provider, code).status_code == 400


def test_another_client_cannot_redeem(served: tuple[DevIdentityProvider, FrozenClock]) -> None:
    provider, _ = served
    refused = redeem(provider, code_for(provider), client_id="someone-else")
    assert refused.status_code == 401 and refused.json()["error"] == "invalid_client"


def test_a_code_expires(served: tuple[DevIdentityProvider, FrozenClock]) -> None:
    provider, clock = served
    code = code_for(provider)
    clock.advance(CODE_LIFETIME_SECONDS + 1)
    assert redeem(provider, code).json()["error"] == "invalid_grant"


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"code_challenge": "", "code_challenge_method": ""}, "invalid_request"),
        ({"code_challenge_method": "plain"}, "invalid_request"),
        ({"response_type": "token"}, "unsupported_response_type"),
        ({"scope": "profile"}, "invalid_scope"),
    ],
)
def test_bad_requests_go_back_to_the_client_as_errors(
    served: tuple[DevIdentityProvider, FrozenClock], overrides: dict[str, str], error: str
) -> None:
    provider, _ = served
    answer = httpx.get(provider.authorization_endpoint, params=params(provider, **overrides))
    assert answer.status_code == 303
    query = parse_qs(urlsplit(answer.headers["location"]).query)
    assert query["error"] == [error] and query["state"] == ["st-1"] and "code" not in query


@pytest.mark.parametrize(
    "overrides",
    [{"redirect_uri": "https://evil.example/cb"}, {"client_id": "evil"}, {"redirect_uri": ""}],
)
def test_unknown_clients_and_redirects_get_a_page_not_a_redirect(
    served: tuple[DevIdentityProvider, FrozenClock], overrides: dict[str, str]
) -> None:
    provider, _ = served
    shown = httpx.get(provider.authorization_endpoint, params=params(provider, **overrides))
    assert shown.status_code == 400 and "location" not in shown.headers
    assert "Sign-in refused" in shown.text


def test_cancel_tells_the_client_access_denied(
    served: tuple[DevIdentityProvider, FrozenClock],
) -> None:
    provider, _ = served
    page = httpx.get(provider.authorization_endpoint, params=params(provider))
    [form] = forms_of(page.text)
    cancelled = httpx.post(provider.authorization_endpoint, data={**form["fields"], "cancel": "1"})
    assert parse_qs(urlsplit(cancelled.headers["location"]).query)["error"] == ["access_denied"]


def test_the_page_escapes_what_it_echoes_and_cannot_be_framed(
    served: tuple[DevIdentityProvider, FrozenClock],
) -> None:
    provider, _ = served
    page = httpx.get(
        provider.authorization_endpoint, params=params(provider, state='"><script>x</script>')
    )
    assert "<script>x" not in page.text and "&#34;&gt;&lt;script&gt;" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert "form-action 'self' http://127.0.0.1:1" in page.headers["content-security-policy"]


def test_the_person_form_of_the_token_endpoint_is_unchanged(
    served: tuple[DevIdentityProvider, FrozenClock],
) -> None:
    provider, _ = served
    answer = httpx.post(provider.token_endpoint, data={"person": "alice"})
    assert answer.status_code == 200 and set(answer.json()) == {
        "id_token",
        "issued_token_type",
        "token_type",
        "expires_in",
    }
    claims = jwt.decode(answer.json()["id_token"], options={"verify_signature": False})
    assert "nonce" not in claims and claims["aud"] == provider.client_id

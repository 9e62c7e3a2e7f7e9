"""The approvals page and the approvers' JSON API under attack, over real loopback HTTP against a
served broker and a test dev IdP: CSRF, session fixation and sign-out, open redirects through
``next`` and the callback, stale/foreign/decided ids, signed-out and ineligible approvers, the
person approving their own non-consent request, one approver counted twice toward a quorum, and
no token in any page, URL or log; bearer tokens the API must refuse."""

from __future__ import annotations

import base64
import json
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest

from broker.approvals.web import SESSION_COOKIE, csrf_token, safe_next
from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters._loopback import reserve_loopback_socket
from tests.support.approvals import (
    TEST_AGENT,
    ApprovalStack,
    decision_form,
    forms_of,
    run_approval_stack,
    sign_in_http,
)
from tests.support.harness import run_broker

ADMIN_SECRET = generate_client_secret()
QUORUM_RULE = {
    "admins": {
        "approvals-test-admin": {
            "authentication": {
                "method": "client_secret_basic",
                "secret_hash": hash_client_secret(ADMIN_SECRET),
            },
            "permissions": ["revocations:write"],
        }
    },
    "approvals": {
        "writes-need-two-in-finance": {
            "description": "Two people in finance approve ticket writes (a test rule).",
            "permissions": ["tickets:write"],
            "agents": [TEST_AGENT],
            "approvers": ["group:dev/finance"],
            "quorum": 2,
            "request_expiry_seconds": 300,
        }
    },
}
JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApprovalStack]:
    with run_approval_stack(
        tmp_path_factory.mktemp("approvals-hostile"), policy_extra=QUORUM_RULE
    ) as running:
        yield running


class Seen:
    """Every broker answer a test's client saw (bodies, locations, URLs)."""

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.texts: list[str] = []

    def __call__(self, response: httpx.Response) -> None:
        if str(response.url).startswith(self.broker_url):
            response.read()
            self.texts.extend([str(response.url), response.headers.get("location", "")])
            self.texts.append(response.text)


@pytest.fixture
def seen(stack: ApprovalStack) -> Seen:
    return Seen(stack.url)


@pytest.fixture
def client(seen: Seen) -> Iterator[httpx.Client]:
    with httpx.Client(event_hooks={"response": [seen]}) as http:
        yield http


@contextmanager
def signed_in(
    stack: ApprovalStack, person: str, seen: Seen | None = None
) -> Iterator[httpx.Client]:
    hooks = {"response": [seen]} if seen else {}
    with httpx.Client(event_hooks=hooks) as http:
        sign_in_http(http, stack, person)
        yield http


def refund(stack: ApprovalStack, message: str) -> str:
    """dave asks, through triage-agent, to refund (finance must approve; dave may not)."""
    return stack.ask("dave", "tickets:read tickets:refund", binding_message=message)


def approval_id(stack: ApprovalStack, http: httpx.Client, message: str) -> str:
    page = http.get(f"{stack.url}/approvals/")
    match = re.search(
        r'data-id="(apr_[0-9a-f]{32})">(?:(?!</tr>).)*?' + re.escape(message), page.text, re.S
    )
    assert match, page.text
    return match.group(1)


def own_token(http: httpx.Client, approval: str, action: str) -> dict[str, str]:
    """A decision form with a valid CSRF token of `http`'s own session (as if its page had
    offered the form)."""
    session = cookie_payload(http.cookies[SESSION_COOKIE])["approver"]
    return {"decision": action, "csrf": csrf_token(session["csrf"], approval, action)}


def main_of(page: httpx.Response) -> str:
    return page.text.split("<main>", 1)[1]


def cookie_payload(value: str) -> dict:
    """The session cookie's signed JSON (itsdangerous: base64 payload, timestamp, signature)."""
    data = value.split(".", 1)[0]
    return json.loads(base64.b64decode(data + "=" * (-len(data) % 4)))


# --- CSRF --------------------------------------------------------------------------------------


def test_decisions_without_the_pages_csrf_token_or_from_elsewhere_are_refused(
    stack: ApprovalStack,
) -> None:
    refund(stack, "csrf refund")
    with signed_in(stack, "carol") as carol:
        target = approval_id(stack, carol, "csrf refund")
        url = f"{stack.url}/approvals/{target}/decision"
        good = decision_form(carol, stack, target, "approve")
        deny_token = decision_form(carol, stack, target, "deny")["csrf"]
        attempts = [
            {"decision": "approve"},  # no token
            {"decision": "approve", "csrf": "0" * 64},  # a wrong one
            {"decision": "approve", "csrf": deny_token},  # the token of another action
        ]
        for form in attempts:
            refused = carol.post(url, data=form)
            assert refused.status_code == 403 and "CSRF" in refused.text
        for headers in (
            {"Origin": "https://evil.example"},
            {"Origin": "null"},  # without Sec-Fetch-Site: same-origin
            {"Sec-Fetch-Site": "cross-site"},
            {"Sec-Fetch-Site": "same-site"},  # another port on this host: another origin
            {"Origin": stack.idp.issuer, "Sec-Fetch-Site": "same-site"},
        ):
            refused = carol.post(url, data=good, headers=headers)
            assert refused.status_code == 403, headers
        assert "csrf refund" in carol.get(f"{stack.url}/approvals/").text  # still pending
        refusals = [
            r["reason"]
            for r in stack.broker.decisions.records
            if r["event"] == "approval.refused" and r.get("approval_id") == target
        ]
        assert refusals == ["csrf"] * 8  # every forged or foreign form is on the record
        # A browser's own same-origin POST under no-referrer: Origin null, Sec-Fetch-Site.
        accepted = carol.post(
            url, data=good, headers={"Origin": "null", "Sec-Fetch-Site": "same-origin"}
        )
        assert accepted.status_code == 200 and "It is approved" in accepted.text


def test_another_sessions_token_does_not_decide(stack: ApprovalStack) -> None:
    refund(stack, "two sessions")
    with signed_in(stack, "carol") as one, signed_in(stack, "carol") as two:
        target = approval_id(stack, one, "two sessions")
        token_of_one = decision_form(one, stack, target, "approve")
        refused = two.post(f"{stack.url}/approvals/{target}/decision", data=token_of_one)
        assert refused.status_code == 403


def test_sign_out_needs_the_csrf_token(stack: ApprovalStack) -> None:
    with signed_in(stack, "erin") as erin:
        assert erin.post(f"{stack.url}/approvals/sign-out", data={}).status_code == 403
        assert erin.get(f"{stack.url}/approvals/").status_code == 200  # still signed in


# --- the session -------------------------------------------------------------------------------


def test_the_session_is_rebuilt_at_sign_in_and_a_planted_cookie_gets_nothing(
    stack: ApprovalStack, client: httpx.Client
) -> None:
    started = client.get(f"{stack.url}/approvals/sign-in")
    planted = client.cookies[SESSION_COOKIE]  # what an attacker could have planted
    assert "approver" not in cookie_payload(planted)
    authorize = client.get(started.headers["location"])
    [form] = forms_of(authorize.text)
    picked = client.post(
        stack.idp.authorization_endpoint, data={**form["fields"], "person": "carol"}
    )
    client.get(picked.headers["location"])
    after = client.cookies[SESSION_COOKIE]
    assert after != planted
    session = cookie_payload(after)
    assert set(session) == {"approver"}  # nothing from before the sign-in survives
    assert set(session["approver"]) == {
        "idp",
        "subject",
        "groups",
        "roles",
        "name",
        "sid",
        "csrf",
        "at",
    }
    first_sid = session["approver"]["sid"]
    with httpx.Client(cookies={SESSION_COOKIE: planted}) as attacker:
        denied = attacker.get(f"{stack.url}/approvals/")
        assert denied.status_code == 303 and "/approvals/sign-in" in denied.headers["location"]
    sign_in_http(client, stack, "carol")  # signing in again: a new session id
    assert cookie_payload(client.cookies[SESSION_COOKIE])["approver"]["sid"] != first_sid


def test_the_session_cookie_is_scoped_and_lax(stack: ApprovalStack, client: httpx.Client) -> None:
    started = client.get(f"{stack.url}/approvals/sign-in")
    cookie = started.headers["set-cookie"]
    assert f"{SESSION_COOKIE}=" in cookie
    assert "path=/approvals" in cookie.lower() and "samesite=lax" in cookie.lower()
    assert "httponly" in cookie.lower()
    assert "max-age=3600" in cookie.lower()


def test_a_signed_out_session_cannot_be_replayed(stack: ApprovalStack) -> None:
    with signed_in(stack, "carol") as carol:
        cookie = carol.cookies[SESSION_COOKIE]
        page = carol.get(f"{stack.url}/approvals/")
        [sign_out] = [f for f in forms_of(page.text) if f["action"] == "/approvals/sign-out"]
        assert (
            carol.post(f"{stack.url}/approvals/sign-out", data=sign_out["fields"]).status_code
            == 200
        )
    with httpx.Client(cookies={SESSION_COOKIE: cookie}) as replay:
        again = replay.get(f"{stack.url}/approvals/")
        assert again.status_code == 303 and "/approvals/sign-in" in again.headers["location"]


def test_signed_out_approvers_are_sent_to_sign_in_with_a_safe_next(
    stack: ApprovalStack, client: httpx.Client
) -> None:
    target = f"{stack.url}/approvals/apr_{'0' * 32}"
    viewed = client.get(target)
    assert viewed.status_code == 303
    assert viewed.headers["location"] == f"/approvals/sign-in?next=/approvals/apr_{'0' * 32}"
    posted = client.post(f"{target}/decision", data={"decision": "approve"})
    assert posted.status_code == 303
    assert posted.headers["location"] == f"/approvals/sign-in?next=/approvals/apr_{'0' * 32}"


# --- open redirects ----------------------------------------------------------------------------

HOSTILE_NEXT = [
    "//evil.example/approvals",
    "https://evil.example/approvals",
    "/approvals//evil.example",
    "/\\evil.example",
    "/approvals\\..\\..\\evil",
    "/approvals/%2F%2Fevil.example",
    "/approvals/%5C%5Cevil.example",
    "/approvals/../admin",
    "/approvals/./x/../../x",
    "/approvalsevil",
    "javascript:alert(1)",
    "/approvals/\r\nLocation: https://evil.example",
    "/approvals/\tx",
    " /approvals/",
    "/Approvals/",
    "",
    "/" + "a" * 600,
]


@pytest.mark.parametrize("value", HOSTILE_NEXT)
def test_next_is_only_a_relative_path_under_approvals(value: str) -> None:
    assert safe_next(value) == "/approvals/"


@pytest.mark.parametrize("value", ["/approvals", "/approvals/", f"/approvals/apr_{'a' * 32}"])
def test_next_keeps_paths_under_approvals(value: str) -> None:
    assert safe_next(value) == value


@pytest.mark.parametrize("value", ["//evil.example/x", "https://evil.example", "/approvals/%2F"])
def test_sign_in_never_sends_anyone_elsewhere(stack: ApprovalStack, value: str) -> None:
    with httpx.Client() as http:
        assert sign_in_http(http, stack, "carol", next_=value) == "/approvals/"


def test_sign_in_returns_to_the_page_asked_for(stack: ApprovalStack) -> None:
    with httpx.Client() as http:
        target = f"/approvals/apr_{'b' * 32}"
        assert sign_in_http(http, stack, "carol", next_=target) == target


def test_the_dev_idp_never_redirects_to_an_unregistered_uri(stack: ApprovalStack) -> None:
    with httpx.Client() as http:
        start = http.get(f"{stack.url}/approvals/sign-in")
        query = {k: v[0] for k, v in parse_qs(urlsplit(start.headers["location"]).query).items()}
        for redirect in ("https://evil.example/approvals/callback", f"{stack.url}/approvals/cb"):
            hostile = {**query, "redirect_uri": redirect}
            shown = http.get(stack.idp.authorization_endpoint, params=hostile)
            assert shown.status_code == 400 and "location" not in shown.headers
            posted = http.post(
                stack.idp.authorization_endpoint, data={**hostile, "person": "carol"}
            )
            assert posted.status_code == 400 and "location" not in posted.headers


def test_a_callback_not_started_here_signs_nobody_in(stack: ApprovalStack) -> None:
    with httpx.Client() as attacker_start, httpx.Client() as victim:
        # The attacker runs the flow up to the IdP's answer and hands the link to the victim.
        start = attacker_start.get(f"{stack.url}/approvals/sign-in")
        authorize = attacker_start.get(start.headers["location"])
        [form] = forms_of(authorize.text)
        picked = attacker_start.post(
            stack.idp.authorization_endpoint, data={**form["fields"], "person": "erin"}
        )
        forced = victim.get(picked.headers["location"])
        assert forced.status_code == 400 and "location" not in forced.headers
        victim.get(f"{stack.url}/approvals/sign-in")  # the victim's own flow, other state
        crossed = victim.get(picked.headers["location"])
        assert crossed.status_code == 400 and "location" not in crossed.headers
        assert victim.get(f"{stack.url}/approvals/").status_code == 303  # not signed in


# --- who may decide what -----------------------------------------------------------------------


def test_stale_foreign_and_decided_ids_get_one_neutral_answer(stack: ApprovalStack) -> None:
    refund(stack, "decided elsewhere")
    stack.ask(
        "dave", "tickets:read tickets:refund", binding_message="expiring", requested_expiry="1"
    )
    with signed_in(stack, "carol") as carol:
        decided = approval_id(stack, carol, "decided elsewhere")
        expiring = approval_id(stack, carol, "expiring")
        carol.post(
            f"{stack.url}/approvals/{decided}/decision",
            data=decision_form(carol, stack, decided, "approve"),
        )
        time.sleep(1.2)
        answers = [
            carol.get(f"{stack.url}/approvals/{ident}")
            for ident in (decided, expiring, f"apr_{'f' * 32}", "apr_x", "nonsense", "..%2f")
        ]
        for answer in answers:
            assert answer.status_code == 404
            assert main_of(answer) == main_of(answers[0])
        late = carol.post(
            f"{stack.url}/approvals/{expiring}/decision", data=own_token(carol, expiring, "deny")
        )
        assert late.status_code == 404 and main_of(late) == main_of(answers[0])


def test_an_ineligible_approver_is_told_why(stack: ApprovalStack) -> None:
    refund(stack, "erin may not")
    with signed_in(stack, "carol") as carol:
        target = approval_id(stack, carol, "erin may not")
    with signed_in(stack, "erin") as erin:
        assert "erin may not" not in erin.get(f"{stack.url}/approvals/").text
        page = erin.get(f"{stack.url}/approvals/{target}")
        assert page.status_code == 403 and "not_eligible" in page.text


def test_the_person_may_not_approve_their_own_non_consent_request(stack: ApprovalStack) -> None:
    auth_req_id = refund(stack, "own refund")
    with signed_in(stack, "carol") as carol:
        target = approval_id(stack, carol, "own refund")
        carols_form = decision_form(carol, stack, target, "approve")
        with signed_in(stack, "dave") as dave:
            assert "own refund" not in dave.get(f"{stack.url}/approvals/").text
            page = dave.get(f"{stack.url}/approvals/{target}")
            assert page.status_code == 403 and "self_approval" in page.text
            # Even with a valid token of his own session for this request and action:
            refused = dave.post(
                f"{stack.url}/approvals/{target}/decision", data=own_token(dave, target, "approve")
            )
            assert refused.status_code == 403 and "self_approval" in refused.text
        assert "own refund" in carol.get(f"{stack.url}/approvals/").text  # still pending
        approved = carol.post(f"{stack.url}/approvals/{target}/decision", data=carols_form)
        assert approved.status_code == 200 and "It is approved" in approved.text
    issued = stack.poll(auth_req_id)
    assert issued.status_code == 200, issued.text


def test_one_approver_counts_once_toward_a_quorum(stack: ApprovalStack) -> None:
    auth_req_id = stack.ask(
        "dave", "tickets:read tickets:write", agent=TEST_AGENT, binding_message="two needed"
    )
    with signed_in(stack, "carol") as carol:
        target = approval_id(stack, carol, "two needed")
        url = f"{stack.url}/approvals/{target}/decision"
        form = decision_form(carol, stack, target, "approve")
        first = carol.post(url, data=form)
        assert first.status_code == 200 and "needs 1 more approval" in first.text
        again = carol.post(url, data=form)
        assert again.status_code == 409 and "already decided" in again.text
        assert "two needed" not in carol.get(f"{stack.url}/approvals/").text
        by_api = httpx.post(
            f"{stack.url}/v1/approvals/{target}/decision",
            json={"decision": "approve"},
            headers={"Authorization": f"Bearer {stack.api_token('carol')}"},
        )
        assert by_api.status_code == 403 and by_api.json()["error"] == "access_denied"
    with signed_in(stack, "frank") as frank:
        second = frank.post(url, data=decision_form(frank, stack, target, "approve"))
        assert second.status_code == 200 and "It is approved" in second.text
    issued = stack.poll(auth_req_id, TEST_AGENT)
    assert issued.status_code == 200, issued.text
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["approval"]["approved_by"] == ["dev/carol", "dev/frank"]


# --- what pages and logs never hold ------------------------------------------------------------


def test_no_token_in_any_page_url_or_log(
    stack: ApprovalStack, seen: Seen, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    auth_req_id = refund(stack, "nothing secret")
    with signed_in(stack, "carol", seen) as carol:
        target = approval_id(stack, carol, "nothing secret")
        carol.get(f"{stack.url}/approvals/{target}")
        carol.post(
            f"{stack.url}/approvals/{target}/decision",
            data=decision_form(carol, stack, target, "deny"),
        )
    everything = "\n".join(seen.texts)
    assert len(seen.texts) > 10
    assert not JWT_SHAPE.search(everything)
    assert auth_req_id not in everything
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert not JWT_SHAPE.search(logged) and auth_req_id not in logged
    records = json.dumps(stack.broker.decisions.records)
    assert not JWT_SHAPE.search(records) and auth_req_id not in records
    assert "approver.signed_in" in records


def test_pages_are_uncached_unframed_and_scriptless(stack: ApprovalStack) -> None:
    with signed_in(stack, "carol") as carol:
        for page in (carol.get(f"{stack.url}/approvals/"), carol.get(f"{stack.url}/approvals/x")):
            assert page.headers["cache-control"] == "no-store"
            assert page.headers["x-frame-options"] == "DENY"
            assert page.headers["referrer-policy"] == "no-referrer"
            csp = page.headers["content-security-policy"]
            assert csp == (
                "default-src 'none'; style-src 'unsafe-inline'; "
                f"form-action 'self' {stack.idp.issuer}; frame-ancestors 'none'"
            )


def test_without_sign_in_configured_the_page_says_so(tmp_path: Path) -> None:
    with run_broker(tmp_path, []) as running:
        page = httpx.get(f"{running.url}/approvals/")
        assert page.status_code == 503
        assert "Approvals sign-in is not configured" in page.text


# --- the JSON API ------------------------------------------------------------------------------


def api(
    stack: ApprovalStack, method: str, path: str, token: str | None, **kwargs
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.request(method, f"{stack.url}{path}", headers=headers, **kwargs)


def refused_tokens(stack: ApprovalStack) -> dict[str, str | None]:
    kid, key = stack.idp.signing_key
    stranger = jwt.encode(
        {**stack.idp.claims_for("carol", token_type="access_token"), "iss": "http://127.0.0.1:9"},
        key,
        algorithm="RS256",
        headers={"kid": kid, "typ": "at+jwt"},
    )
    return {
        "missing": None,
        "garbage": "not-a-token",
        "expired": stack.api_token("carol", lifetime=-600),
        "wrong audience (the exchange's)": stack.idp.mint("carol", token_type="access_token"),
        "an ID token": stack.idp.mint("carol"),
        "unknown issuer": stranger,
        "tampered": stack.api_token("carol")[:-4] + "AAAA",
    }


def test_the_api_refuses_every_token_not_meant_for_it(stack: ApprovalStack) -> None:
    for name, token in refused_tokens(stack).items():
        for method, path, body in (
            ("GET", "/v1/approvals", None),
            ("GET", f"/v1/approvals/apr_{'0' * 32}", None),
            ("POST", f"/v1/approvals/apr_{'0' * 32}/decision", {"decision": "approve"}),
        ):
            answer = api(stack, method, path, token, json=body)
            assert answer.status_code == 401, (name, path, answer.text)
            assert answer.json()["error"] == "invalid_token", name
            assert answer.headers["www-authenticate"] == 'Bearer error="invalid_token"'


def test_an_eligible_approver_decides_through_the_api(stack: ApprovalStack) -> None:
    auth_req_id = refund(stack, "api refund")
    carol = stack.api_token("carol")
    listed = api(stack, "GET", "/v1/approvals", carol)
    assert listed.status_code == 200 and listed.json()["approver"] == "dev/carol"
    [item] = [a for a in listed.json()["approvals"] if a["binding_message"] == "api refund"]
    assert item["approval_permissions"] == ["tickets:refund"] and item["person"] == "dev/dave"
    assert auth_req_id not in listed.text
    path = f"/v1/approvals/{item['id']}"
    assert api(stack, "GET", path, carol).json()["id"] == item["id"]
    dave = api(stack, "GET", path, stack.api_token("dave"))
    assert dave.status_code == 403 and dave.json()["error"] == "insufficient_scope"
    assert "self_approval" in dave.json()["error_description"]
    erin = api(
        stack, "POST", f"{path}/decision", stack.api_token("erin"), json={"decision": "approve"}
    )
    assert erin.status_code == 403 and "not_eligible" in erin.json()["error_description"]
    bad = api(stack, "POST", f"{path}/decision", carol, json={"decision": "maybe"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_request"
    unknown = api(stack, "GET", f"/v1/approvals/apr_{'e' * 32}", carol)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    decided = api(
        stack, "POST", f"{path}/decision", carol, json={"decision": "approve", "comment": "ok"}
    )
    assert decided.status_code == 200, decided.text
    assert decided.json() == {
        "id": item["id"],
        "decision": "approve",
        "state": "approved",
        "outstanding": {},
    }
    assert api(stack, "GET", path, carol).status_code == 404  # decided: gone
    assert stack.poll(auth_req_id).status_code == 200


def test_a_revoked_person_can_no_longer_approve(stack: ApprovalStack) -> None:
    refund(stack, "revoked approver")
    old_token = stack.api_token("frank")
    with signed_in(stack, "frank") as frank:
        assert "revoked approver" in frank.get(f"{stack.url}/approvals/").text
        time.sleep(1.1)  # the revocation is later than this sign-in (times are in seconds)
        revoked = httpx.post(
            f"{stack.url}/v1/admin/revocations",
            json={"person": "dev/frank"},
            auth=("approvals-test-admin", ADMIN_SECRET),
        )
        assert revoked.status_code == 200, revoked.text
        signed_out = frank.get(f"{stack.url}/approvals/")
        assert signed_out.status_code == 303 and "/sign-in" in signed_out.headers["location"]
    refused = api(stack, "GET", "/v1/approvals", old_token)
    assert refused.status_code == 401 and "revocation" in refused.json()["error_description"]
    time.sleep(1.1)
    with signed_in(stack, "frank") as again:  # a sign-in after the revocation is served
        assert "revoked approver" in again.get(f"{stack.url}/approvals/").text
    assert api(stack, "GET", "/v1/approvals", stack.api_token("frank")).status_code == 200


def test_an_unreachable_identity_provider_is_a_clear_503(tmp_path: Path) -> None:
    closed = reserve_loopback_socket()  # bound, never listening: connections are refused
    try:
        issuer = f"http://127.0.0.1:{closed.getsockname()[1]}"
        idp = {"name": "corp", "issuer": issuer, "client_ids": ["web"], "audiences": ["x"]}
        approvals = {"sign_in": [{"idp": "corp", "client_id": "web"}]}
        with run_broker(tmp_path, [idp], approvals=approvals) as running:
            answer = httpx.get(f"{running.url}/approvals/sign-in")
            assert answer.status_code == 503 and "cannot be reached" in answer.text
            assert answer.headers["cache-control"] == "no-store"
    finally:
        closed.close()


def test_the_redirect_to_the_identity_provider_is_not_cached(stack: ApprovalStack) -> None:
    started = httpx.get(f"{stack.url}/approvals/sign-in")
    assert started.status_code == 302
    assert started.headers["location"].startswith(stack.idp.authorization_endpoint + "?")
    assert started.headers["cache-control"] == "no-store"
    assert started.headers["referrer-policy"] == "no-referrer"
    query = parse_qs(urlsplit(started.headers["location"]).query)
    assert query["code_challenge_method"] == ["S256"] and query["code_challenge"]
    assert query["nonce"] and query["state"]
    assert query["redirect_uri"] == [f"{stack.url}/approvals/callback"]

"""Hostile input to OpenID CIBA over HTTP: ``POST /oauth2/bc-authorize`` and the token
endpoint's CIBA grant of a served broker.

Every malformed parameter is a clear 400 in the protocol's terms (never a 500, never a stack
trace, never the person's token or an auth_req_id in an error body, a log line or an audit
record); an auth_req_id that is not the asking client's own live one is the one neutral
``invalid_grant``; a person or agent revoked, or a policy narrowed, between the request and its
redemption is honoured at redemption.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import jwt
import pytest
import yaml

from broker.clock import FrozenClock
from broker.policy import Person
from broker.revocation import RevocationRequest
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)

SECRETS = example_client_secrets()
TRIAGE = ("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"])
SUMMARISER = ("summariser-agent", SECRETS["SUMMARISER_AGENT_SECRET"])
CIBA = "urn:openid:params:grant-type:ciba"
TICKETS = "https://tickets.internal.example"
CAROL = Person("dev", "carol", frozenset({"finance"}))
SCOPE = "tickets:read tickets:refund"


@contextmanager
def ciba_broker(tmp: Path) -> Iterator[tuple[RunningBroker, Any]]:
    """The example policy's broker on a clock the tests move (past poll intervals, expiries)."""
    write_provider_keys(tmp / "keys.yaml", "sk-x")
    clock = FrozenClock(time.time())
    with run_example_stack(tmp, SECRETS, tmp / "keys.yaml", clock=clock) as (running, idp):
        yield running, idp


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, Any]]:
    with ciba_broker(tmp_path_factory.mktemp("ciba-hostile")) as stack:
        yield stack


@pytest.fixture
def own_env(tmp_path: Path) -> Iterator[tuple[RunningBroker, Any]]:
    """A broker of its own, for tests that revoke or change the policy."""
    with ciba_broker(tmp_path) as stack:
        yield stack


def later(running: RunningBroker, seconds: float = 11) -> None:
    running.services.clock.advance(seconds)  # type: ignore[attr-defined]


def ask_form(person_token: str, **extra: str) -> dict[str, str]:
    form = exchange_form(person_token, scope=SCOPE, audience=TICKETS)
    form.pop("grant_type")
    return {**form, **extra}


def ask(running: RunningBroker, person_token: str, **extra: str) -> httpx.Response:
    return httpx.post(
        f"{running.url}/oauth2/bc-authorize", data=ask_form(person_token, **extra), auth=TRIAGE
    )


def poll(
    running: RunningBroker, auth_req_id: str, auth: tuple[str, str] | None = TRIAGE
) -> httpx.Response:
    return httpx.post(
        running.token_endpoint, data={"grant_type": CIBA, "auth_req_id": auth_req_id}, auth=auth
    )


def pending_id(running: RunningBroker) -> str:
    """The public reference of the one request carol may decide."""
    [waiting] = asyncio.run(running.services.approvals.pending_for(CAROL))
    return waiting.id


def approve(running: RunningBroker, approval_id: str) -> None:
    asyncio.run(
        running.services.approvals.decide(approval_id, CAROL, approve=True, comment=None, via="api")
    )


def assert_clear_refusal(
    response: httpx.Response, error: str, *secrets: str, status: int = 400
) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error, body
    assert isinstance(body.get("error_description"), str) and body["error_description"]
    assert "Traceback" not in response.text
    for secret in secrets:
        assert secret not in response.text


def nested(depth: int) -> str:
    inner: Any = {"type": "deep"}
    for _ in range(depth):
        inner = {"type": "deep", "next": inner}
    return json.dumps([inner])


HOSTILE_DETAILS = {
    "oversized": json.dumps([{"type": "refund", "note": "x" * 9000}]),
    "deep": nested(20),
    "recursion-bomb": "[" * 4000 + "]" * 4000,
    "nan": '[{"type": "refund", "amount": NaN}]',
    "infinity": '[{"type": "refund", "amount": Infinity}]',
    "minus-infinity": '[{"type": "refund", "amount": -Infinity}]',
    "overflow-to-infinity": '[{"type": "refund", "amount": 1e999}]',
    "not-json": "refund 120 EUR",
    "object-not-array": '{"type": "refund"}',
    "empty-array": "[]",
    "entry-not-object": '["refund"]',
    "missing-type": '[{"amount": "1"}]',
    "type-not-string": '[{"type": 7}]',
    "empty-type": '[{"type": ""}]',
    "overlong-type": json.dumps([{"type": "t" * 300}]),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_DETAILS))
def test_hostile_authorization_details_are_invalid_authorization_details(
    env: Any, name: str
) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    before = len(running.decisions.records)
    refused = ask(running, person_token, authorization_details=HOSTILE_DETAILS[name])
    assert_clear_refusal(refused, "invalid_authorization_details", person_token)
    [record] = [r for r in running.decisions.records[before:] if r["event"] == "approval.request"]
    assert record["outcome"] == "denied" and person_token not in json.dumps(record)
    assert not asyncio.run(running.services.approvals.pending_for(CAROL))


HOSTILE_BINDING_MESSAGES = {
    "nul": "Refund\x00 120 EUR",
    "newline": "Refund 120 EUR\nApproved by finance",
    "escape": "Refund \x1b[31m120 EUR",
    "bidi-override": "Refund \u202e021 EUR",
    "zero-width": "Re\u200bfund",
    "private-use": "Refund \ue000",
    "blank": "   ",
    "overlong": "x" * 257,
}


@pytest.mark.parametrize("name", sorted(HOSTILE_BINDING_MESSAGES))
def test_hostile_binding_messages_are_invalid_binding_message(env: Any, name: str) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    refused = ask(running, person_token, binding_message=HOSTILE_BINDING_MESSAGES[name])
    assert_clear_refusal(refused, "invalid_binding_message", person_token)


@pytest.mark.parametrize(
    "value", ["0", "-1", "1.5", "1e9", "abc", "9999999999", "\uff11\uff12", " 60", "0x10"]
)
def test_absurd_requested_expiry_is_invalid_request(env: Any, value: str) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    refused = ask(running, person_token, requested_expiry=value)
    assert_clear_refusal(refused, "invalid_request", person_token)
    assert "requested_expiry" in refused.json()["error_description"]


def test_a_large_requested_expiry_is_capped_by_the_rule(env: Any) -> None:
    running, idp = env
    asked = ask(running, idp.mint("dave"), requested_expiry="999999")
    assert asked.status_code == 200, asked.text
    assert asked.json()["expires_in"] == 900  # refunds-need-finance: request_expiry_seconds
    later(running, 2000)  # gone before the next test lists carol's pending requests
    assert poll(running, asked.json()["auth_req_id"]).json()["error"] in {
        "expired_token",
        "invalid_grant",
    }


def test_parameters_given_twice_and_hints_are_refused(env: Any) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    form = list(ask_form(person_token).items())
    for name, value in (("binding_message", "a"), ("binding_message", "b")):
        form.append((name, value))
    twice = httpx.post(
        f"{running.url}/oauth2/bc-authorize",
        content=urlencode(form),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        auth=TRIAGE,
    )
    assert_clear_refusal(twice, "invalid_request", person_token)
    for hint in ("login_hint", "login_hint_token", "id_token_hint"):
        refused = ask(running, person_token, **{hint: person_token})
        assert_clear_refusal(refused, "invalid_request", person_token)
        assert "subject_token" in refused.json()["error_description"]


def test_bc_authorize_without_or_with_a_wrong_client_authentication(env: Any) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    anonymous = httpx.post(f"{running.url}/oauth2/bc-authorize", data=ask_form(person_token))
    assert_clear_refusal(anonymous, "invalid_client", person_token, status=401)
    wrong = httpx.post(
        f"{running.url}/oauth2/bc-authorize",
        data=ask_form(person_token),
        auth=("triage-agent", "not-the-secret"),
    )
    assert_clear_refusal(wrong, "invalid_client", person_token, status=401)
    forged = ask(running, person_token[:-4] + "AAAA")
    assert forged.status_code == 400 and forged.json()["error"] == "invalid_grant"


def test_foreign_forged_and_overlong_auth_req_ids_are_one_neutral_answer(env: Any) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    asked = ask(running, person_token, binding_message="Refund 5 EUR")
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]
    approval_id = pending_id(running)
    assert approval_id != auth_req_id

    answers = [
        poll(running, auth_req_id, SUMMARISER),  # another client's
        poll(running, approval_id),  # the public reference approvers see
        poll(running, "x" * 10_000),  # overlong
        poll(running, auth_req_id + "x"),
        poll(running, auth_req_id.upper() if auth_req_id.upper() != auth_req_id else "A"),
        poll(running, "\u00e9\u202e\U0001f600"),
        poll(running, "../../" + auth_req_id),
    ]
    for answer in answers:
        assert_clear_refusal(answer, "invalid_grant", auth_req_id)
    descriptions = {a.json()["error_description"] for a in answers}
    assert len(descriptions) == 1  # no oracle between unknown, foreign and malformed

    missing = httpx.post(running.token_endpoint, data={"grant_type": CIBA}, auth=TRIAGE)
    assert_clear_refusal(missing, "invalid_request")
    anonymous = poll(running, auth_req_id, None)
    assert_clear_refusal(anonymous, "invalid_client", auth_req_id, status=401)

    # none of that touched the owner's request: pending, then the token, once
    assert poll(running, auth_req_id).json()["error"] == "authorization_pending"
    approve(running, approval_id)
    later(running)
    issued = poll(running, auth_req_id)
    assert issued.status_code == 200, issued.text
    later(running)
    assert_clear_refusal(poll(running, auth_req_id), "invalid_grant", auth_req_id)

    logged = json.dumps(running.decisions.records)
    for secret in (auth_req_id, person_token, issued.json()["access_token"]):
        assert secret not in logged


def test_polling_too_fast_slows_down_and_the_interval_grows(env: Any) -> None:
    running, idp = env
    asked = ask(running, idp.mint("dave")).json()
    auth_req_id, interval = asked["auth_req_id"], asked["interval"]
    assert poll(running, auth_req_id).json()["error"] == "authorization_pending"
    slow = poll(running, auth_req_id)
    assert_clear_refusal(slow, "slow_down", auth_req_id)
    later(running, interval + 1)  # the old interval is no longer enough after a slow_down
    assert poll(running, auth_req_id).json()["error"] == "slow_down"
    later(running, interval + 6)
    assert poll(running, auth_req_id).json()["error"] == "authorization_pending"
    later(running, 900)  # past the rule's 900 s (the record outlives the request a while)
    assert_clear_refusal(poll(running, auth_req_id), "expired_token", auth_req_id)
    later(running, 30)
    again = poll(running, auth_req_id)
    assert again.status_code == 400 and again.json()["error"] in {"expired_token", "invalid_grant"}


def test_no_secret_in_logs_across_hostile_requests(
    env: Any, caplog: pytest.LogCaptureFixture
) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    caplog.set_level("DEBUG")
    # The broker's logging setup holds httpx at WARNING (it logs full URLs); another test in
    # the same process may have run it. Here its request lines are wanted, to check them.
    caplog.set_level("DEBUG", logger="httpx")
    for details in HOSTILE_DETAILS.values():
        ask(running, person_token, authorization_details=details)
    asked = ask(running, person_token, client_notification_token="ping-secret-xyz")
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]
    poll(running, auth_req_id)
    poll(running, auth_req_id)
    poll(running, auth_req_id, SUMMARISER)
    later(running, 2000)
    poll(running, auth_req_id)
    assert "bc-authorize" in caplog.text  # the requests were logged, and nothing secret with them
    for secret in (person_token, auth_req_id, "ping-secret-xyz", TRIAGE[1]):
        assert secret not in caplog.text
        assert secret not in json.dumps(running.decisions.records)


def _revoke(running: RunningBroker, kind: str, value: str) -> None:
    now = running.services.clock.now()
    asyncio.run(
        running.services.revocations.revoke(
            RevocationRequest(kind, value, not_before=max(now, time.time()) + 1),  # type: ignore[arg-type]
            by="test",
            request_id="test-revocation",
        )
    )


@pytest.mark.parametrize(
    ("kind", "value", "error"),
    [("person", "dev/dave", "invalid_grant"), ("agent", "triage-agent", "unauthorized_client")],
)
def test_revoked_between_request_and_redemption_is_refused_at_redemption(
    own_env: Any, kind: str, value: str, error: str
) -> None:
    running, idp = own_env
    person_token = idp.mint("dave")
    asked = ask(running, person_token)
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]
    approve(running, pending_id(running))
    _revoke(running, kind, value)
    later(running, 11)
    before = len(running.decisions.records)
    refused = poll(running, auth_req_id)
    assert_clear_refusal(refused, error, auth_req_id, person_token)
    [record] = [r for r in running.decisions.records[before:] if r["event"] == "token.ciba"]
    assert record["outcome"] == "denied"
    assert not [r for r in running.decisions.records if r["event"] == "approval.redeemed"]
    later(running, 11)
    assert poll(running, auth_req_id).json()["error"] == "invalid_grant"  # spent either way


def _edit_policy(running: RunningBroker, file: str, change: Any) -> None:
    path = running.policy_dir / file
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))
    result = running.services.policies.reload(trigger="test")
    assert running.services.policies.last_error is None, result


def test_a_policy_narrowed_before_redemption_narrows_the_token(own_env: Any) -> None:
    running, idp = own_env
    asked = ask(running, idp.mint("dave"))
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]
    approve(running, pending_id(running))

    def shorter(document: dict[str, Any]) -> None:
        document["approvals"]["refunds-need-finance"]["token_lifetime_seconds"] = 60

    _edit_policy(running, "approvals.yaml", shorter)
    later(running)
    issued = poll(running, auth_req_id)
    assert issued.status_code == 200, issued.text
    assert issued.json()["expires_in"] <= 60
    claims = jwt.decode(issued.json()["access_token"], options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] <= 60
    assert claims["policy_version"] == running.services.policies.current().version


def test_a_policy_withdrawing_a_permission_before_redemption_refuses_it(own_env: Any) -> None:
    running, idp = own_env
    asked = ask(running, idp.mint("dave"))
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]
    approve(running, pending_id(running))

    def withdraw(document: dict[str, Any]) -> None:
        ceiling = document["agents"]["triage-agent"]["ceiling"]
        document["agents"]["triage-agent"]["ceiling"] = [
            p for p in ceiling if p != "tickets:refund"
        ]

    # the shipped policy tests pin the refund grant; an operator withdrawing it changes them too
    shutil.rmtree(running.policy_dir / "tests")
    _edit_policy(running, "agents.yaml", withdraw)
    later(running)
    refused = poll(running, auth_req_id)
    assert_clear_refusal(refused, "invalid_scope", auth_req_id)
    assert "tickets:refund" in refused.json()["error_description"]
    later(running)
    assert poll(running, auth_req_id).json()["error"] == "invalid_grant"

"""OpenID CIBA's protocol answers over HTTP, beyond the happy path of test_ciba_flow.py: a
request the policy refuses gets the token exchange's own error (the same form at both endpoints
gets the same code), and leaves an ``approval.request`` denial record; the person's consent
(close-tickets-consent) is theirs alone to give; a request nobody decides in time is
``expired_token`` and is then gone for approvers too; answers are never cached; the server
metadata describes CIBA as OpenID CIBA Core 1.0 names it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

from broker.approvals.errors import ApprovalNotFound, NotEligible
from broker.clock import FrozenClock
from broker.policy import Person
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
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
TICKETS = "https://tickets.internal.example"
CAROL = Person("dev", "carol", frozenset({"finance"}))
DAVE = Person("dev", "dave", frozenset({"support-leads"}))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, Any]]:
    tmp = tmp_path_factory.mktemp("ciba-protocol")
    write_provider_keys(tmp / "keys.yaml", "sk-x")
    clock = FrozenClock(time.time())
    with run_example_stack(tmp, SECRETS, tmp / "keys.yaml", clock=clock) as (running, idp):
        yield running, idp


def later(running: RunningBroker, seconds: float = 11) -> None:
    running.services.clock.advance(seconds)  # type: ignore[attr-defined]


def bc_authorize(
    running: RunningBroker, form: dict[str, str], auth: tuple[str, str] = TRIAGE
) -> httpx.Response:
    body = {k: v for k, v in form.items() if k != "grant_type"}
    return httpx.post(f"{running.url}/oauth2/bc-authorize", data=body, auth=auth)


def poll(running: RunningBroker, auth_req_id: str) -> httpx.Response:
    return httpx.post(
        running.token_endpoint, data={"grant_type": CIBA, "auth_req_id": auth_req_id}, auth=TRIAGE
    )


def pending(running: RunningBroker, who: Person) -> list[Any]:
    return asyncio.run(running.services.approvals.pending_for(who))


def decide(running: RunningBroker, approval_id: str, who: Person, approve: bool = True) -> Any:
    return asyncio.run(
        running.services.approvals.decide(
            approval_id, who, approve=approve, comment=None, via="api"
        )
    )


REFUSED_REQUESTS: dict[str, tuple[str, dict[str, str], tuple[str, str], str]] = {
    # name: (person, form extras, agent, error)
    "person lacks the permission": (
        "alice",
        {"scope": "tickets:read tickets:refund", "audience": TICKETS},
        TRIAGE,
        "invalid_scope",
    ),
    "agent may not act for the person": (
        "carol",
        {"scope": "tickets:read tickets:refund", "audience": TICKETS},
        TRIAGE,
        "unauthorized_client",
    ),
    "ceiling excludes a permission": (
        "dave",
        {"scope": "repo:write tickets:refund", "audience": TICKETS},
        TRIAGE,
        "invalid_scope",
    ),
    "audience not allowed": (
        "dave",
        {"scope": "tickets:refund", "audience": "https://git.internal.example"},
        TRIAGE,
        "invalid_target",
    ),
    "sub-agent given a person's token": (
        "dave",
        {"scope": "tickets:read", "audience": TICKETS},
        SUMMARISER,
        "",
    ),
    "forged subject token": (
        "dave",
        {"scope": "tickets:refund", "audience": TICKETS, "subject_token": "eyJhbGciOi.x.y"},
        TRIAGE,
        "invalid_grant",
    ),
    "unknown subject token type": (
        "dave",
        {"scope": "tickets:refund", "audience": TICKETS, "subject_token_type": "urn:x:nothing"},
        TRIAGE,
        "",
    ),
}


@pytest.mark.parametrize("name", sorted(REFUSED_REQUESTS))
def test_a_refused_request_gets_the_exchange_error_and_a_record(env: Any, name: str) -> None:
    running, idp = env
    who, extras, agent, error = REFUSED_REQUESTS[name]
    form = {**exchange_form(idp.mint(who)), **extras}
    exchanged = httpx.post(running.token_endpoint, data=form, auth=agent)
    before = len(running.decisions.records)
    asked = bc_authorize(running, form, agent)
    assert asked.status_code == exchanged.status_code and asked.status_code in (400, 401)
    assert asked.json()["error"] == exchanged.json()["error"], asked.json()
    if error:
        assert asked.json()["error"] == error
    assert asked.headers["cache-control"] == "no-store"
    [record] = [r for r in running.decisions.records[before:] if r["event"] == "approval.request"]
    assert record["outcome"] == "denied" and record["reason"]
    assert not pending(running, CAROL) and not pending(running, DAVE)


def test_an_access_token_is_all_an_approval_yields(env: Any) -> None:
    running, idp = env
    form = exchange_form(
        idp.mint("dave"),
        scope="tickets:refund",
        audience=TICKETS,
        requested_token_type="urn:ietf:params:oauth:token-type:jwt",
    )
    asked = bc_authorize(running, form)
    assert asked.status_code == 400 and asked.json()["error"] == "invalid_request"
    assert "access token" in asked.json()["error_description"]


def test_consent_is_the_persons_alone_and_its_token_says_so(env: Any) -> None:
    running, idp = env
    form = exchange_form(idp.mint("dave"), scope="tickets:read tickets:close", audience=TICKETS)
    refused = httpx.post(running.token_endpoint, data=form, auth=TRIAGE)
    assert refused.json()["error"] == "invalid_scope"
    assert "close-tickets-consent" in refused.json()["error_description"]

    asked = bc_authorize(running, {**form, "binding_message": "Close ticket 4711"})
    assert asked.status_code == 200, asked.text
    assert asked.headers["cache-control"] == "no-store"
    body = asked.json()
    assert body["expires_in"] == 300 and body["interval"] >= 1
    auth_req_id = body["auth_req_id"]

    assert not pending(running, CAROL)  # a consent rule: not finance's to decide
    [mine] = pending(running, DAVE)
    assert mine.binding_message == "Close ticket 4711"
    with pytest.raises(NotEligible):
        decide(running, mine.id, CAROL)
    decide(running, mine.id, DAVE)

    later(running)
    issued = poll(running, auth_req_id)
    assert issued.status_code == 200, issued.text
    assert issued.headers["cache-control"] == "no-store"
    response = issued.json()
    assert response["token_type"] == "Bearer" and response["issued_token_type"] == ACCESS_TOKEN
    assert response["scope"] == "tickets:read tickets:close"
    assert 0 < response["expires_in"] <= 600  # the rule's token lifetime
    claims = jwt.decode(response["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "dev/dave" and claims["act"] == {"sub": "triage-agent"}
    approval = claims["approval"]
    assert approval["approved_by"] == ["dev/dave"]
    assert approval["rules"] == ["close-tickets-consent"]
    assert approval["permissions"] == ["tickets:close"]
    assert approval["id"] == mine.id and "authorization_details" not in approval
    assert claims["iat"] - 12 <= approval["approved_at"] <= claims["iat"]  # decided, 11 s, redeemed


def test_undecided_in_time_is_expired_token_and_gone_for_approvers(env: Any) -> None:
    running, idp = env
    form = exchange_form(idp.mint("dave"), scope="tickets:refund", audience=TICKETS)
    asked = bc_authorize(running, {**form, "requested_expiry": "30"})
    assert asked.status_code == 200, asked.text
    assert asked.json()["expires_in"] == 30
    auth_req_id = asked.json()["auth_req_id"]
    [waiting] = pending(running, CAROL)

    later(running, 31)
    expired = poll(running, auth_req_id)
    assert expired.status_code == 400 and expired.json()["error"] == "expired_token"
    assert expired.headers["cache-control"] == "no-store"
    assert not pending(running, CAROL)
    with pytest.raises(ApprovalNotFound):
        decide(running, waiting.id, CAROL)
    later(running)
    again = poll(running, auth_req_id)
    assert again.status_code == 400 and again.json()["error"] in {"expired_token", "invalid_grant"}
    assert not [
        r
        for r in running.decisions.records
        if r["event"] == "token.ciba" and r.get("approval_id") == waiting.id
    ]


def test_metadata_describes_ciba(env: Any) -> None:
    running, _ = env
    metadata = httpx.get(f"{running.url}/.well-known/oauth-authorization-server").json()
    assert CIBA in metadata["grant_types_supported"]
    assert metadata["backchannel_authentication_endpoint"] == f"{running.url}/oauth2/bc-authorize"
    assert metadata["backchannel_token_delivery_modes_supported"] == ["poll", "ping"]
    assert metadata["backchannel_user_code_parameter_supported"] is False
    assert "authorization_details_types_supported" not in metadata

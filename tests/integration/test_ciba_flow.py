"""The approval path end to end over HTTP: an exchange refused for want of approval names where
to ask; the agent asks (OpenID CIBA), polls, an eligible person approves, the agent redeems the
token once, and the token carries the approval (and a sub-agent's re-exchange keeps only what
narrows)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest

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
TICKETS = "https://tickets.internal.example"
CAROL = Person("dev", "carol", frozenset({"finance"}))
DAVE = Person("dev", "dave", frozenset({"support-leads"}))


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningBroker, Any]]:
    tmp = tmp_path_factory.mktemp("ciba")
    write_provider_keys(tmp / "keys.yaml", "sk-x")
    clock = FrozenClock(time.time())  # moved by the tests past each poll interval
    with run_example_stack(tmp, SECRETS, tmp / "keys.yaml", clock=clock) as (running, idp):
        yield running, idp


def later(running: RunningBroker, seconds: float = 11) -> None:
    running.services.clock.advance(seconds)  # type: ignore[attr-defined]


def ask(running: RunningBroker, person_token: str, **extra: str) -> httpx.Response:
    form = exchange_form(person_token, scope="tickets:read tickets:refund", audience=TICKETS)
    form.pop("grant_type")
    return httpx.post(f"{running.url}/oauth2/bc-authorize", data={**form, **extra}, auth=TRIAGE)


def poll(
    running: RunningBroker, auth_req_id: str, auth: tuple[str, str] = TRIAGE
) -> httpx.Response:
    return httpx.post(
        running.token_endpoint, data={"grant_type": CIBA, "auth_req_id": auth_req_id}, auth=auth
    )


def decide(running: RunningBroker, approval_id: str, who: Person, approve: bool) -> Any:
    return asyncio.run(
        running.services.approvals.decide(
            approval_id, who, approve=approve, comment=None, via="api"
        )
    )


def test_refused_exchange_names_where_to_ask_then_approval_yields_the_token(env: Any) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    refused = httpx.post(
        running.token_endpoint,
        data=exchange_form(person_token, scope="tickets:read tickets:refund", audience=TICKETS),
        auth=TRIAGE,
    )
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_scope"
    assert "/oauth2/bc-authorize" in refused.json()["error_description"]

    details = [{"type": "refund", "amount": "120.00", "currency": "EUR", "order": "4711"}]
    asked = ask(
        running,
        person_token,
        binding_message="Refund 120 EUR on order 4711",
        authorization_details=json.dumps(details),
    )
    assert asked.status_code == 200, asked.text
    body = asked.json()
    assert set(body) == {"auth_req_id", "expires_in", "interval"} and body["expires_in"] == 900
    auth_req_id = body["auth_req_id"]

    pending = poll(running, auth_req_id)
    assert pending.json()["error"] == "authorization_pending"
    assert poll(running, auth_req_id).json()["error"] == "slow_down"  # sooner than interval
    assert poll(running, auth_req_id, SUMMARISER).json()["error"] == "invalid_grant"

    [listed] = asyncio.run(running.services.approvals.pending_for(CAROL))
    assert listed.binding_message == "Refund 120 EUR on order 4711"
    assert listed.authorization_details == details
    assert auth_req_id not in json.dumps(running.decisions.records)
    decide(running, listed.id, CAROL, True)

    later(running)
    issued = poll(running, auth_req_id)
    assert issued.status_code == 200, issued.text
    token_response = issued.json()
    claims = jwt.decode(token_response["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "dev/dave" and claims["act"] == {"sub": "triage-agent"}
    assert claims["scope"] == "tickets:read tickets:refund"
    approval = claims["approval"]
    assert approval["id"] == listed.id and approval["approved_by"] == ["dev/carol"]
    assert approval["permissions"] == ["tickets:refund"]
    assert approval["rules"] == ["refunds-need-finance"]
    assert approval["authorization_details"] == details
    assert token_response["expires_in"] <= 300  # the rule's token lifetime

    later(running)
    assert poll(running, auth_req_id).json()["error"] == "invalid_grant"  # redeemed once
    events = [
        r["event"] for r in running.decisions.records if str(r["event"]).startswith("approval.")
    ]
    assert events[-3:] == ["approval.requested", "approval.approved", "approval.redeemed"]
    [redeemed] = [r for r in running.decisions.records if r["event"] == "approval.redeemed"]
    assert redeemed["jti"] == claims["jti"] and redeemed["approval_id"] == listed.id
    metrics = httpx.get(f"{running.url}/metrics").text
    assert (
        'broker_approval_decision_seconds_count{outcome="approved",rule="refunds-need-finance"}'
        in metrics
    )
    assert "broker_approvals_pending 0.0" in metrics
    introspected = httpx.post(
        f"{running.url}/oauth2/introspect",
        data={"token": token_response["access_token"]},
        auth=("tickets-api", SECRETS["TICKETS_API_SECRET"]),
    ).json()
    assert introspected["active"] is True and introspected["approval"] == approval

    # a sub-agent's re-exchange keeps the approval only for what it still carries
    child = httpx.post(
        running.token_endpoint,
        data=exchange_form(
            token_response["access_token"],
            "urn:ietf:params:oauth:token-type:access_token",
            scope="tickets:read",
            audience=TICKETS,
        ),
        auth=SUMMARISER,
    )
    assert child.status_code == 200, child.text
    child_claims = jwt.decode(child.json()["access_token"], options={"verify_signature": False})
    assert "approval" not in child_claims and child_claims["scope"] == "tickets:read"


def test_denied_request_and_no_approval_needed(env: Any) -> None:
    running, idp = env
    person_token = idp.mint("dave")
    auth_req_id = ask(running, person_token).json()["auth_req_id"]
    [listed] = [r for r in asyncio.run(running.services.approvals.pending_for(CAROL))]
    with pytest.raises(Exception, match="self_approval"):
        decide(running, listed.id, DAVE, True)
    decide(running, listed.id, CAROL, False)
    later(running)
    assert poll(running, auth_req_id).json()["error"] == "access_denied"

    form = exchange_form(person_token, scope="tickets:read", audience=TICKETS)
    form.pop("grant_type")
    plain = httpx.post(f"{running.url}/oauth2/bc-authorize", data=form, auth=TRIAGE)
    assert plain.status_code == 400 and plain.json()["error"] == "invalid_request"
    assert (
        "token exchange" in plain.json()["error_description"]
        or "token endpoint" in plain.json()["error_description"]
    )
    bad = ask(running, person_token, authorization_details='[{"no-type": 1}]')
    assert bad.json()["error"] == "invalid_authorization_details"
    bad = ask(running, person_token, binding_message="x" * 300)
    assert bad.json()["error"] == "invalid_binding_message"
    bad = ask(running, person_token, login_hint="dave")
    assert bad.json()["error"] == "invalid_request"


def test_client_request_approval_polls_until_approved(env: Any) -> None:
    from broker.client import AgentClient

    running, idp = env
    clock = running.services.clock
    polls: list[float] = []

    def sleep(seconds: float) -> None:  # the broker's clock moves as the client waits
        polls.append(seconds)
        clock.advance(seconds)
        if len(polls) == 2:  # the first poll found it pending; carol approves now
            [waiting] = asyncio.run(running.services.approvals.pending_for(CAROL))
            decide(running, waiting.id, CAROL, True)

    with AgentClient(running.url, *TRIAGE, clock=clock.now) as agent:
        request = agent.ask_approval(
            idp.mint("dave"),
            scope="tickets:read tickets:refund",
            audience=TICKETS,
            binding_message="Refund 12 EUR",
            authorization_details=[{"type": "refund", "amount": "12.00"}],
        )
        assert request.auth_req_id not in repr(request)
        token = agent.wait_for_approval(request, sleep=sleep)
    assert polls == [request.interval, request.interval]
    claims = jwt.decode(token.access_token, options={"verify_signature": False})
    assert claims["approval"]["authorization_details"] == [{"type": "refund", "amount": "12.00"}]
    assert token.scopes == ("tickets:read", "tickets:refund")


def test_async_client_denied_expired_and_timeout(env: Any) -> None:
    from broker.client import (
        ApprovalDenied,
        ApprovalExpired,
        ApprovalTimeout,
        AsyncAgentClient,
    )

    running, idp = env
    clock = running.services.clock

    async def scenario() -> None:
        async with AsyncAgentClient(running.url, *TRIAGE, clock=clock.now) as agent:
            person = idp.mint("dave")
            ask = {"scope": "tickets:read tickets:refund", "audience": TICKETS}

            async def deny_then_wait(seconds: float) -> None:
                clock.advance(seconds)
                for waiting in await running.services.approvals.pending_for(CAROL):
                    await running.services.approvals.decide(
                        waiting.id, CAROL, approve=False, comment="no", via="api"
                    )

            request = await agent.ask_approval(person, **ask)
            with pytest.raises(ApprovalDenied):
                await agent.wait_for_approval(request, sleep=deny_then_wait)

            async def expire(seconds: float) -> None:
                clock.advance(100)  # past the request's 60 s (records outlive it by 600 s)

            request = await agent.ask_approval(person, **ask, requested_expiry=60)
            assert request.expires_at - clock.now() <= 60
            with pytest.raises(ApprovalExpired):
                await agent.wait_for_approval(request, sleep=expire)

            async def wait(seconds: float) -> None:
                clock.advance(seconds)

            request = await agent.ask_approval(person, **ask)
            with pytest.raises(ApprovalTimeout):
                await agent.wait_for_approval(request, timeout=12, sleep=wait)

    asyncio.run(scenario())

"""CIBA ping delivery: an agent registered for ping gives a client_notification_token with its
request; once an approver decides (through the approvers' JSON API), the broker POSTs
{"auth_req_id"} to the agent's registered endpoint (a real loopback server here) with that
token as Bearer, and the agent redeems the token."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters._loopback import serve_in_thread
from tests.support.approvals import TICKETS, run_approval_stack
from tests.support.harness import exchange_form

PING_AGENT = "ping-agent"
PING_SECRET = generate_client_secret()
NOTIFICATION_TOKEN = "agent-notification-token-8c1f"


@pytest.fixture
def agent_endpoint() -> Iterator[tuple[str, list[tuple[dict[str, str], Any]]]]:
    received: list[tuple[dict[str, str], Any]] = []

    async def callback(request: Request) -> Response:
        received.append((dict(request.headers), json.loads(await request.body())))
        return Response(status_code=204)

    server = serve_in_thread(Starlette(routes=[Route("/cb", callback, methods=["POST"])]))
    try:
        yield server.url + "/cb", received
    finally:
        server.stop()


def wait_for(condition: Any, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_ping_mode_agent_is_called_back_then_redeems(tmp_path: Path, agent_endpoint: Any) -> None:
    url, received = agent_endpoint
    agent = {
        "authentication": {
            "method": "client_secret_basic",
            "secret_hash": hash_client_secret(PING_SECRET),
        },
        "ceiling": ["tickets:read", "tickets:refund"],
        "audiences": [TICKETS],
        "act_for": ["group:dev/support-leads"],
        "backchannel": {"token_delivery_mode": "ping", "client_notification_endpoint": url},
    }
    with run_approval_stack(tmp_path, policy_extra={"agents": {PING_AGENT: agent}}) as stack:
        form = exchange_form(
            stack.idp.mint("dave"), scope="tickets:read tickets:refund", audience=TICKETS
        )
        form.pop("grant_type")
        bc = f"{stack.url}/oauth2/bc-authorize"
        auth = (PING_AGENT, PING_SECRET)
        missing = httpx.post(bc, data=form, auth=auth)
        assert missing.status_code == 400 and missing.json()["error"] == "invalid_request"
        assert "client_notification_token" in missing.json()["error_description"]

        asked = httpx.post(
            bc, data={**form, "client_notification_token": NOTIFICATION_TOKEN}, auth=auth
        )
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]

        bearer = {"Authorization": f"Bearer {stack.api_token('carol')}"}
        [pending] = httpx.get(f"{stack.url}/v1/approvals", headers=bearer).json()["approvals"]
        assert received == []  # nothing before a decision
        decided = httpx.post(
            f"{stack.url}/v1/approvals/{pending['id']}/decision",
            json={"decision": "approve"},
            headers=bearer,
        )
        assert decided.status_code == 200, decided.text
        wait_for(lambda: received)
        token = httpx.post(
            stack.broker.token_endpoint,
            data={"grant_type": "urn:openid:params:grant-type:ciba", "auth_req_id": auth_req_id},
            auth=auth,
        )
        records = stack.broker.decisions.records
        wait_for(lambda: any(r["event"] == "approval.pinged" for r in records))
        records = list(records)

    [(headers, body)] = received
    assert headers["authorization"] == f"Bearer {NOTIFICATION_TOKEN}"
    assert body == {"auth_req_id": auth_req_id}
    assert token.status_code == 200 and "access_token" in token.json()
    [pinged] = [r for r in records if r["event"] == "approval.pinged"]
    assert pinged["outcome"] == "delivered" and pinged["attempts"] == 1
    assert NOTIFICATION_TOKEN not in json.dumps(records)

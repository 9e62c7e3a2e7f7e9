"""An approval request reaches the channels its rule names: a signed webhook to a real loopback
receiver carries the person, the agents, the permissions, the binding message and the link to
the request's page, and never the agent's auth_req_id or any token."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from broker.notify import signature
from idp_adapters._loopback import serve_in_thread
from tests.support import harness
from tests.support.harness import (
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)

SECRETS = example_client_secrets()
HOOK_SECRET = "whsec-approvals-test"


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[tuple[dict[str, str], bytes]]]]:
    received: list[tuple[dict[str, str], bytes]] = []

    async def hook(request: Request) -> JSONResponse:
        received.append((dict(request.headers), await request.body()))
        return JSONResponse({"ok": True})

    server = serve_in_thread(Starlette(routes=[Route("/hook", hook, methods=["POST"])]))
    try:
        yield server.url + "/hook", received
    finally:
        server.stop()


def test_a_request_notifies_the_rules_channels(
    tmp_path: Path, receiver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, received = receiver
    monkeypatch.setenv("APPROVALS_HOOK_SECRET", HOOK_SECRET)
    write_provider_keys(tmp_path / "keys.yaml", "sk-x")
    # The example policy, with the refund rule naming the channel.
    policies = tmp_path / "example-policies"
    shutil.copytree(harness.EXAMPLE_POLICIES, policies)
    rules = policies / "approvals.yaml"
    rules.write_text(
        rules.read_text().replace(
            "    token_lifetime_seconds: 300",
            "    token_lifetime_seconds: 300\n    channels: [approvals-hook]",
        )
    )
    monkeypatch.setattr(harness, "EXAMPLE_POLICIES", policies)
    channels = {
        "approvals-hook": {
            "kind": "webhook",
            "url": url,
            "secret_ref": "env:APPROVALS_HOOK_SECRET",
        }
    }
    with run_example_stack(
        tmp_path,
        SECRETS,
        tmp_path / "keys.yaml",
        notifications={"channels": channels},
    ) as (running, idp):
        person_token = idp.mint("dave")
        form = exchange_form(
            person_token,
            scope="tickets:read tickets:refund",
            audience="https://tickets.internal.example",
            binding_message="Refund 120 EUR on order 4711",
        )
        form.pop("grant_type")
        asked = httpx.post(
            f"{running.url}/oauth2/bc-authorize",
            data=form,
            auth=("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]),
        )
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]
        deadline = time.monotonic() + 10
        while not received and time.monotonic() < deadline:
            time.sleep(0.05)
        records = running.decisions.records

    [(headers, body)] = received
    expected = signature(HOOK_SECRET.encode(), headers["x-broker-timestamp"], body)
    assert headers["x-broker-signature"] == expected
    sent = json.loads(body)
    assert sent["event"] == "approval.requested"
    facts = {f["name"]: f["value"] for f in sent["fields"]}
    assert facts["Person"] == "dev/dave" and facts["Agents"] == "triage-agent"
    assert facts["Needs approval"] == "tickets:refund"
    assert facts["Message"] == "Refund 120 EUR on order 4711"
    [requested] = [r for r in records if r["event"] == "approval.requested"]
    assert sent["url"] == f"{running.url}/approvals/{requested['approval_id']}"
    assert auth_req_id not in body.decode() and person_token not in body.decode()
    [delivered] = [r for r in records if r["event"] == "notification.delivered"]
    assert delivered["channel"] == "approvals-hook" and url not in json.dumps(records)

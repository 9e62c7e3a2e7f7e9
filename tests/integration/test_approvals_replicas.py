"""Two brokers sharing one real Redis and one approvals session key, as replicas do: an agent
asks at one, the approver signs in at one and decides at the other with the same session, the
agent redeems at the other; a sign-out at one ends the session at both."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from broker.approvals.web import SESSION_COOKIE
from tests.support.approvals import (
    API_AUDIENCE,
    PEOPLE,
    TICKETS,
    ApprovalStack,
    decision_form,
    forms_of,
    sign_in_http,
)
from tests.support.harness import (
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_broker,
    serve_idp,
    write_provider_keys,
)
from tests.support.servers import run_redis

SESSION_KEY_VARIABLE = "APPROVALS_REPLICA_SESSION_KEY"


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[tuple[ApprovalStack, ApprovalStack]]:
    secrets = example_client_secrets()
    write_provider_keys(tmp_path / "keys.yaml", "sk-replicas")
    patch = pytest.MonkeyPatch()
    for key, value in {**secrets, SESSION_KEY_VARIABLE: "replica-session-key-" + "x" * 32}.items():
        patch.setenv(key, value)
    try:
        with ExitStack() as stack:
            redis = stack.enter_context(run_redis(tmp_path))
            idp, _ = stack.enter_context(serve_idp(PEOPLE))
            idp_config = {
                "name": "dev",
                "kind": "oidc",
                "issuer": idp.issuer,
                "client_ids": [idp.client_id],
                "audiences": [idp.audience, API_AUDIENCE],
                "algorithms": [idp.algorithm],
            }
            brokers: list[RunningBroker] = []
            for name in ("a", "b"):
                directory = tmp_path / name
                directory.mkdir()
                running = stack.enter_context(
                    run_broker(
                        directory,
                        [idp_config],
                        secret_backends=[
                            {"name": "vault", "kind": "file", "path": str(tmp_path / "keys.yaml")}
                        ],
                        allow_development_components=True,
                        state={"kind": "redis", "url": redis.url, "key_prefix": "replicas:"},
                        approvals={
                            "sign_in": [{"idp": "dev", "client_id": idp.client_id}],
                            "session_secret_ref": f"env:{SESSION_KEY_VARIABLE}",
                            "api_audiences": [API_AUDIENCE],
                        },
                    )
                )
                idp.register_redirect_uri(f"{running.url}/approvals/callback")
                brokers.append(running)
            yield ApprovalStack(brokers[0], idp, secrets), ApprovalStack(brokers[1], idp, secrets)
    finally:
        patch.undo()


def test_a_session_and_a_request_span_replicas(
    replicas: tuple[ApprovalStack, ApprovalStack],
) -> None:
    one, two = replicas
    form = exchange_form(
        one.idp.mint("dave"), scope="tickets:read tickets:refund", audience=TICKETS
    )
    form.pop("grant_type")
    asked = httpx.post(
        f"{one.url}/oauth2/bc-authorize",
        data={**form, "binding_message": "replicated refund"},
        auth=one.agent(),
    )
    assert asked.status_code == 200, asked.text
    auth_req_id = asked.json()["auth_req_id"]

    with httpx.Client() as carol:
        sign_in_http(carol, one, "carol")  # signed in at one...
        listed = carol.get(f"{two.url}/approvals/")  # ...seen at the other (cookies ignore ports)
        assert listed.status_code == 200 and "replicated refund" in listed.text
        [target] = re.findall(r'data-id="(apr_[0-9a-f]{32})"', listed.text)
        decided = carol.post(
            f"{two.url}/approvals/{target}/decision",
            data=decision_form(carol, two, target, "approve"),
        )
        assert decided.status_code == 200 and "It is approved" in decided.text
        cookie = carol.cookies[SESSION_COOKIE]
        [sign_out] = [f for f in forms_of(listed.text) if f["action"] == "/approvals/sign-out"]
        assert (
            carol.post(f"{two.url}/approvals/sign-out", data=sign_out["fields"]).status_code == 200
        )

    with httpx.Client(cookies={SESSION_COOKIE: cookie}) as replay:
        refused = replay.get(f"{one.url}/approvals/")  # the other replica knows it ended
        assert refused.status_code == 303 and "/approvals/sign-in" in refused.headers["location"]

    issued = two.poll(auth_req_id)  # redeemed at the other replica
    assert issued.status_code == 200, issued.text

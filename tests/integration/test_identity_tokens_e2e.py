"""A person with 700 groups, end to end: the broker's token carries only the groups the policy
uses, so it stays small and every later use works (credential fetch, re-exchange, introspection);
and a token the broker itself would refuse is never issued."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

from broker.tokens import MAX_TOKEN_BYTES
from idp_adapters.dev import DevIdentityProvider, DevPerson
from tests.support.harness import (
    ACCESS_TOKEN,
    TICKETS,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
    write_provider_keys,
)

MANY = tuple(f"/org/department-{n:04d}/project-team" for n in range(700))
PEOPLE = {
    "alice": DevPerson("alice", ("/support", *MANY), "alice@example.com", "Alice Support"),
}
OPENAI_KEY = "sk-test-700-groups"


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    secrets = example_client_secrets()
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    return secrets


@pytest.fixture
def stack(
    tmp_path: Path, secrets_env: dict[str, str], request: pytest.FixtureRequest
) -> Iterator[tuple[RunningBroker, DevIdentityProvider]]:
    secrets_file = tmp_path / "dev-secrets.yaml"
    write_provider_keys(secrets_file, OPENAI_KEY)
    extra: dict[str, Any] | None = getattr(request, "param", None)
    with (
        serve_idp(PEOPLE) as (idp, _),
        run_broker(
            tmp_path,
            [{**oidc_provider_config(idp), "max_token_bytes": 65536}],
            policy_extra=extra,
            secret_backends=[{"name": "vault", "kind": "file", "path": str(secrets_file)}],
            allow_development_components=True,
        ) as running,
    ):
        yield running, idp


def _exchange(
    broker: RunningBroker, auth: tuple[str, str], subject: str, **form: str
) -> httpx.Response:
    return httpx.post(
        broker.token_endpoint, auth=auth, data=exchange_form(subject, **form), timeout=30
    )


def test_a_person_with_700_groups_gets_a_small_token_that_works_everywhere(
    stack: tuple[RunningBroker, DevIdentityProvider], secrets_env: dict[str, str]
) -> None:
    broker, idp = stack
    id_token = idp.mint("alice")
    assert len(id_token) > 2 * MAX_TOKEN_BYTES  # every group really is in the IdP's token

    triage = ("triage-agent", secrets_env["TRIAGE_AGENT_SECRET"])
    response = _exchange(
        broker, triage, id_token, scope="llm:openai:chat tickets:read", audience="llm-gateway"
    )
    assert response.status_code == 200, response.text
    token = response.json()["access_token"]
    assert len(token) < 2048
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["provenance"]["groups"] == ["support"]  # what the policy uses, nothing else
    record = [r for r in broker.decisions.records if r["event"] == "token.exchange"][-1]
    assert record["provenance"]["groups"] == ["support"]

    fetched = httpx.post(
        f"{broker.url}/v1/credentials/openai-api-key",
        auth=("llm-gateway", secrets_env["LLM_GATEWAY_SECRET"]),
        data={"token": token},
        timeout=10,
    )
    assert fetched.status_code == 200, fetched.text
    assert fetched.json()["value"] == OPENAI_KEY

    child = _exchange(
        broker,
        ("summariser-agent", secrets_env["SUMMARISER_AGENT_SECRET"]),
        token,
        subject_token_type=ACCESS_TOKEN,
        scope="llm:openai:chat",
        audience="llm-gateway",
    )
    assert child.status_code == 200, child.text

    tickets = _exchange(broker, triage, idp.mint("alice"), scope="tickets:read", audience=TICKETS)
    assert tickets.status_code == 200, tickets.text
    introspected = httpx.post(
        f"{broker.url}/oauth2/introspect",
        auth=("tickets-api", secrets_env["TICKETS_API_SECRET"]),
        data={"token": tickets.json()["access_token"]},
        timeout=10,
    )
    assert introspected.status_code == 200, introspected.text
    body = introspected.json()
    assert body["active"] is True
    # The resource server learns the groups that granted the rights, not the person's 700.
    assert body["provenance"]["groups"] == ["support"]


BIND_EVERY_GROUP = {
    "group_bindings": [
        {"idp": "dev", "group": group, "roles": ["support"]} for group in MANY
    ]
}


@pytest.mark.parametrize("stack", [BIND_EVERY_GROUP], indirect=True)
def test_a_token_the_broker_would_refuse_is_never_issued(
    stack: tuple[RunningBroker, DevIdentityProvider], secrets_env: dict[str, str]
) -> None:
    """When the policy really uses 700 groups, the token cannot be made small: the exchange
    fails clearly instead of issuing a token every later use would refuse."""
    broker, idp = stack
    response = _exchange(
        broker,
        ("triage-agent", secrets_env["TRIAGE_AGENT_SECRET"]),
        idp.mint("alice"),
        scope="tickets:read",
        audience=TICKETS,
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["error"] == "invalid_request"
    assert f"more than the {MAX_TOKEN_BYTES} bytes this broker accepts" in (
        body["error_description"]
    )
    record = [r for r in broker.decisions.records if r["event"] == "token.exchange"][-1]
    assert record["outcome"] == "denied" and record["reason"] == "token_too_large"

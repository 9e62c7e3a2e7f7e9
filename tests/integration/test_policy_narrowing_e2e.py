"""Narrowing the policy narrows tokens already issued (issue 9, section 2).

A real broker over HTTP reloading its policy from disk as it changes, serving a credential
from a real OpenBao. Tokens issued under one policy version are checked at every credential
fetch against the policy in force: the person's rights and the ceiling of every agent of the
chain, with the groups the token carries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.harness import (
    ACCESS_TOKEN,
    EXAMPLE_SECRET_VARIABLES,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import run_openbao

SCOPE = "llm:openai:chat"


@pytest.fixture
def stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    secrets = example_client_secrets()
    for name in EXAMPLE_SECRET_VARIABLES:
        monkeypatch.setenv(name, secrets[name])
    with run_openbao() as bao, serve_idp() as (idp, _):
        bao.client().secrets.kv.v2.create_or_update_secret("llm/openai", {"api_key": "sk-1"})
        monkeypatch.setenv("TEST_VAULT_TOKEN", bao.root_token)
        backend = {
            "name": "vault",
            "kind": "vault",
            "address": bao.address,
            "auth": {"method": "token", "token_ref": "env:TEST_VAULT_TOKEN"},
        }
        with run_broker(
            tmp_path,
            [oidc_provider_config(idp)],
            secret_backends=[backend],
            lifespan=True,
            policy_reload_interval_seconds=0.2,
        ) as broker:
            yield broker, idp, secrets


def _edit(broker: RunningBroker, file: str, change: Callable[[dict[str, Any]], None]) -> None:
    """Change one policy file as a deploy tool would (atomically), and wait for the reload."""
    path = broker.policy_dir / file
    document = yaml.safe_load(path.read_text())
    change(document)
    before = broker.services.policies.current().version
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(document))
    tmp.replace(path)
    deadline = time.monotonic() + 10
    while broker.services.policies.current().version == before:
        assert time.monotonic() < deadline, "the edit was not reloaded"
        time.sleep(0.05)


def _without(values: list[str]) -> list[str]:
    return [v for v in values if v != SCOPE]


def test_removing_a_right_or_a_ceiling_takes_effect_on_the_next_fetch(
    stack: tuple[RunningBroker, Any, dict[str, str]],
) -> None:
    broker, idp, secrets = stack
    triage = ("triage-agent", secrets["TRIAGE_AGENT_SECRET"])
    summariser = ("summariser-agent", secrets["SUMMARISER_AGENT_SECRET"])
    gateway = ("llm-gateway", secrets["LLM_GATEWAY_SECRET"])

    def exchange(subject: str, kind: str, auth: tuple[str, str]) -> str:
        response = httpx.post(
            broker.token_endpoint, data=exchange_form(subject, kind, scope=SCOPE), auth=auth
        )
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    def fetch(token: str) -> httpx.Response:
        return httpx.post(
            f"{broker.url}/v1/credentials/openai-api-key", data={"token": token}, auth=gateway
        )

    def introspect(token: str) -> dict[str, Any]:
        response = httpx.post(
            f"{broker.url}/oauth2/introspect", data={"token": token}, auth=gateway
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    agent = exchange(idp.mint("alice"), "urn:ietf:params:oauth:token-type:id_token", triage)
    child = exchange(agent, ACCESS_TOKEN, summariser)
    assert fetch(agent).json()["value"] == "sk-1"
    assert fetch(child).json()["value"] == "sk-1"
    assert introspect(child)["active"] is True and introspect(child)["scope"] == SCOPE
    original = {f: (broker.policy_dir / f).read_text() for f in ("agents.yaml", "roles.yaml")}
    # The shipped fetch tests pin these grants (a reload that withdraws them is refused); a
    # security team narrowing on purpose edits those tests too. Here: drop them.
    (broker.policy_dir / "tests" / "access.yaml").unlink()

    def refused(token: str, because: str) -> None:
        response = fetch(token)
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["error"] == "insufficient_scope"
        assert "no longer grants" in body["error_description"]
        assert because in body["error_description"]
        assert "value" not in body
        record = broker.decisions.records[-1]
        assert record["event"] == "credential.fetch" and record["outcome"] == "denied"
        assert record["reason"] == "permission_withdrawn"
        assert record["policy_version"] == broker.services.policies.current().version

    # The sub-agent's ceiling loses the permission: the child token, not its parent.
    def narrow_summariser(doc: dict[str, Any]) -> None:
        ceiling = doc["agents"]["summariser-agent"]["ceiling"]
        doc["agents"]["summariser-agent"]["ceiling"] = _without(ceiling)

    _edit(broker, "agents.yaml", narrow_summariser)
    refused(child, "ceiling")
    assert fetch(agent).status_code == 200
    # Introspection tells resource servers the same: the child holds nothing any more.
    assert introspect(child) == {"active": False}
    assert broker.decisions.records[-1]["reason"] == "ceiling_excludes_scope"
    assert introspect(agent)["scope"] == SCOPE

    # The person's role loses it: every token of the person.
    def narrow_support(doc: dict[str, Any]) -> None:
        permissions = doc["roles"]["support"]["permissions"]
        doc["roles"]["support"]["permissions"] = _without(permissions)

    _edit(broker, "roles.yaml", narrow_support)
    refused(agent, "person does not hold it")
    refused(child, "person does not hold it")

    # Widened again: the same tokens (they still carry the scope) are served again.
    for file, text in original.items():
        _edit(broker, file, lambda doc, text=text: doc.update(yaml.safe_load(text)))
    assert fetch(agent).status_code == 200
    assert fetch(child).status_code == 200
    assert introspect(child)["scope"] == SCOPE

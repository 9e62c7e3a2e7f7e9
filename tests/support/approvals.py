"""Approver-side test support: a broker with approvals sign-in through a test dev IdP, signing in
over plain HTTP (the form the dev IdP's page posts), and opening requests the way an agent does
(OpenID CIBA ``/oauth2/bc-authorize``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters.dev import DevIdentityProvider, DevPerson
from tests.support.harness import (
    EXAMPLE_PEOPLE,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_broker,
    serve_idp,
    write_provider_keys,
)

API_AUDIENCE = "broker-approvals"
TICKETS = "https://tickets.internal.example"
CIBA = "urn:openid:params:grant-type:ciba"
TEST_AGENT = "approvals-test-agent"
"""An agent of this support only (the example policy's own tests never name it), for the
approval rules a test adds."""
TEST_AGENT_SECRET = generate_client_secret()
PEOPLE = {
    **EXAMPLE_PEOPLE,
    "frank": DevPerson("frank", ("finance",), "frank@example.com", "Frank Finance"),
}


@dataclass
class ApprovalStack:
    broker: RunningBroker
    idp: DevIdentityProvider
    secrets: dict[str, str]

    @property
    def url(self) -> str:
        return self.broker.url

    def agent(self, name: str = "triage-agent") -> tuple[str, str]:
        if name == TEST_AGENT:
            return name, TEST_AGENT_SECRET
        variable = name.upper().replace("-", "_") + "_SECRET"
        return name, self.secrets[variable]

    def ask(self, person: str, scope: str, *, agent: str = "triage-agent", **extra: str) -> str:
        """Open an approval request as `agent` for `person`; returns the auth_req_id."""
        form = exchange_form(self.idp.mint(person), scope=scope, audience=TICKETS)
        form.pop("grant_type")
        response = httpx.post(
            f"{self.url}/oauth2/bc-authorize", data={**form, **extra}, auth=self.agent(agent)
        )
        assert response.status_code == 200, response.text
        return str(response.json()["auth_req_id"])

    def poll(self, auth_req_id: str, agent: str = "triage-agent") -> httpx.Response:
        return httpx.post(
            self.broker.token_endpoint,
            data={"grant_type": CIBA, "auth_req_id": auth_req_id},
            auth=self.agent(agent),
        )

    def api_token(self, person: str, audience: str = API_AUDIENCE, **kwargs: Any) -> str:
        return self.idp.mint(
            person,
            token_type="access_token",
            extra_claims={"aud": audience},
            **kwargs,
        )


def approvals_settings(idp_name: str, client_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "sign_in": [{"idp": idp_name, "client_id": client_id}],
        "api_audiences": [API_AUDIENCE],
        **extra,
    }


@contextmanager
def run_approval_stack(
    tmp_path: Path, *, policy_extra: dict[str, Any] | None = None, **overrides: Any
) -> Iterator[ApprovalStack]:
    """The example policy's broker with approvals sign-in through a test dev IdP (named
    ``dev``, as the example policy's approver selectors expect), the JSON API accepting that
    IdP's access tokens for `API_AUDIENCE`, and the example clients' secrets set."""
    secrets = example_client_secrets()
    policy_extra = dict(policy_extra or {})
    policy_extra["agents"] = {
        TEST_AGENT: {
            "authentication": {
                "method": "client_secret_basic",
                "secret_hash": hash_client_secret(TEST_AGENT_SECRET),
            },
            "ceiling": ["tickets:read", "tickets:comment", "tickets:write"],
            "audiences": [TICKETS],
            "act_for": ["group:dev/support", "group:dev/support-leads", "person:dev/bob"],
        },
        **policy_extra.get("agents", {}),
    }
    secrets_file = tmp_path / "dev-secrets.yaml"
    write_provider_keys(secrets_file, "sk-approvals")
    patch = pytest.MonkeyPatch()
    for key, value in secrets.items():
        patch.setenv(key, value)
    try:
        with serve_idp(PEOPLE) as (idp, _):
            idp_config = {
                "name": "dev",
                "kind": "oidc",
                "issuer": idp.issuer,
                "client_ids": [idp.client_id],
                "audiences": [idp.audience, API_AUDIENCE],
                "algorithms": [idp.algorithm],
                "jwks_min_refresh_interval_seconds": 1.0,
            }
            overrides.setdefault("approvals", approvals_settings("dev", idp.client_id))
            with run_broker(
                tmp_path,
                [idp_config, *overrides.pop("extra_identity_providers", [])],
                policy_extra=policy_extra,
                secret_backends=[{"name": "vault", "kind": "file", "path": str(secrets_file)}],
                allow_development_components=True,
                **overrides,
            ) as running:
                idp.register_redirect_uri(f"{running.url}/approvals/callback")
                yield ApprovalStack(running, idp, secrets)
    finally:
        patch.undo()


class _Forms(HTMLParser):
    """The forms of a page: action and their named inputs/buttons."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        if tag == "form":
            self.forms.append({"action": values.get("action") or "", "fields": {}, "buttons": []})
        elif tag in {"input", "button", "textarea"} and self.forms and values.get("name"):
            if tag == "button":
                self.forms[-1]["buttons"].append((values["name"], values.get("value") or ""))
            else:
                self.forms[-1]["fields"][values["name"]] = values.get("value") or ""


def forms_of(html: str) -> list[dict[str, Any]]:
    parser = _Forms()
    parser.feed(html)
    return parser.forms


def sign_in_http(client: httpx.Client, stack: ApprovalStack, person: str, next_: str = "") -> str:
    """Sign in at the approvals page as `person` through the dev IdP's page, like a browser
    without JavaScript; returns where the broker finally sent the approver."""
    query = {"next": next_} if next_ else {}
    start = client.get(f"{stack.url}/approvals/sign-in", params=query)
    assert start.status_code in (302, 303), start.text
    authorize = client.get(start.headers["location"])
    assert authorize.status_code == 200, authorize.text
    [form] = forms_of(authorize.text)
    picked = client.post(
        urljoin(str(authorize.url), form["action"]), data={**form["fields"], "person": person}
    )
    assert picked.status_code == 303, picked.text
    callback = client.get(picked.headers["location"])
    assert callback.status_code == 303, callback.text
    return str(callback.headers["location"])


def decision_form(
    client: httpx.Client, stack: ApprovalStack, approval_id: str, action: str
) -> dict:
    """The fields of the detail page's approve or deny form."""
    page = client.get(f"{stack.url}/approvals/{approval_id}")
    assert page.status_code == 200, page.text
    for form in forms_of(page.text):
        if form["fields"].get("decision") == action:
            return dict(form["fields"])
    raise AssertionError(f"no {action} form on the page")


def records_text(stack: ApprovalStack) -> str:
    return json.dumps(stack.broker.decisions.records)

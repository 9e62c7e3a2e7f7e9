"""Refusals name the cause a newcomer can act on, not the check that happened to trip first:
a token presented as the wrong type, a person's token where an agent token belongs, an unknown
token type (the accepted ones are listed), an unknown development person (the people are
listed)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from broker.types import TokenType
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    ID_TOKEN,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack_with_key,
)

SECRETS = example_client_secrets()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RunningBroker, DevIdentityProvider]]:
    tmp: Path = tmp_path_factory.mktemp("messages")
    with run_example_stack_with_key(tmp, SECRETS, "sk-messages") as (running, idp, _):
        yield running, idp


def _exchange(running: RunningBroker, form: dict[str, str]) -> httpx.Response:
    return httpx.post(
        running.token_endpoint,
        data=form,
        auth=("triage-agent", SECRETS["TRIAGE_AGENT_SECRET"]),
        timeout=10,
    )


def _description(response: httpx.Response) -> str:
    return str(response.json()["error_description"])


def test_an_id_token_sent_as_an_access_token_is_named_an_id_token(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    response = _exchange(running, exchange_form(idp.mint("alice"), ACCESS_TOKEN))
    assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    description = _description(response)
    assert "is an ID token, not an access token" in description, description
    assert ID_TOKEN in description  # what to present it as
    assert "audience" not in description


def test_an_access_token_sent_as_an_id_token_is_named_an_access_token(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    token = idp.mint("alice", token_type="access_token")
    response = _exchange(running, exchange_form(token, ID_TOKEN))
    assert response.status_code == 400
    description = _description(response)
    assert "is an access token, not an ID token" in description, description
    assert ACCESS_TOKEN in description


def test_a_persons_token_at_the_credential_endpoint_says_exchange_it_first(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    for person_token in (idp.mint("alice"), idp.mint("alice", token_type="access_token")):
        response = httpx.post(
            f"{running.url}/v1/credentials/openai-api-key",
            data={"token": person_token},
            auth=("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"]),
            timeout=10,
        )
        assert response.status_code == 401, response.text
        description = _description(response)
        assert "not an agent token issued by this broker" in description, description
        assert "exchange it" in description
        assert "type header" not in description


def test_an_unknown_subject_token_type_lists_the_accepted_ones(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    running, idp = stack
    for bad in ("id_token", "urn:ietf:params:oauth:token-type:refresh_token"):
        response = _exchange(running, exchange_form(idp.mint("alice"), bad))
        assert response.status_code == 400 and response.json()["error"] == "invalid_request"
        description = _description(response)
        for accepted in (TokenType.ID_TOKEN, TokenType.ACCESS_TOKEN, TokenType.SAML2):
            assert str(accepted) in description, description


def test_the_development_idp_lists_its_people_for_an_unknown_person(
    stack: tuple[RunningBroker, DevIdentityProvider],
) -> None:
    _, idp = stack
    response = httpx.post(f"{idp.issuer}/token", data={"person": "mallory"}, timeout=10)
    assert response.status_code == 400
    description = _description(response)
    for person in ("alice", "bob", "carol", "dave", "erin"):
        assert person in description, description
    assert "mallory" not in description  # the caller's input is not echoed
    kind = httpx.post(
        f"{idp.issuer}/token", data={"person": "alice", "token_type": "x"}, timeout=10
    )
    assert "id_token" in _description(kind) and "access_token" in _description(kind)

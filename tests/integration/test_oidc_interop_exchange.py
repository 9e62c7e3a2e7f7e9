"""Interop end to end: an ID token signed by an OIDC provider nobody here wrote
(oidc-provider-mock), obtained through its authorization code flow, exchanged at the broker."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from tests.integration.test_oidc_interop import CLIENT_ID, authorization_code_flow
from tests.support.harness import ID_TOKEN, TICKETS, exchange_form, run_broker

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import oidc_provider_mock

SECRET = generate_client_secret()


@pytest.fixture(scope="module")
def provider() -> Iterator[str]:
    users = [oidc_provider_mock.User(sub="alice", claims={"groups": ["support"]})]
    with oidc_provider_mock.run_server_in_thread(port=0, user_claims=users) as server:
        yield f"http://localhost:{server.server_port}"


def test_token_from_an_independent_provider_is_exchanged(provider: str, tmp_path: Path) -> None:
    async def sign_in() -> str:
        async with httpx.AsyncClient() as http:
            return str((await authorization_code_flow(http, provider))["id_token"])

    id_token = asyncio.run(sign_in())
    policy_extra = {
        "group_bindings": [{"idp": "corp", "group": "support", "roles": ["support"]}],
        "agents": {
            "interop-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRET),
                },
                "ceiling": ["tickets:read"],
                "audiences": [TICKETS],
                "act_for": ["group:corp/support"],
            }
        },
    }
    idp = {
        "name": "corp",
        "issuer": provider,
        "client_ids": [CLIENT_ID],
        "audiences": ["https://broker.example"],
        "algorithms": ["RS256"],
    }
    with run_broker(tmp_path, [idp], policy_extra=policy_extra) as broker:
        response = httpx.post(
            broker.token_endpoint,
            data=exchange_form(id_token, ID_TOKEN, scope="tickets:read"),
            auth=("interop-agent", SECRET),
        )
        assert response.status_code == 200, response.text
        claims = jwt.decode(response.json()["access_token"], options={"verify_signature": False})
    assert claims["sub"] == "corp/alice"
    assert claims["provenance"]["groups"] == ["support"]
    assert claims["act"] == {"sub": "interop-agent"}
    assert claims["exp"] <= jwt.decode(id_token, options={"verify_signature": False})["exp"]

"""Per-agent rate limits declared in the policy: 429 with Retry-After, per agent."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from tests.support.harness import exchange_form, oidc_provider_config, run_broker, serve_idp

SECRET = generate_client_secret()


def _limited_agent() -> dict:
    return {
        "authentication": {
            "method": "client_secret_basic",
            "secret_hash": hash_client_secret(SECRET, method="sha256"),
        },
        "ceiling": ["tickets:read"],
        "default_scopes": ["tickets:read"],
        "audiences": ["https://tickets.internal.example"],
        "act_for": ["group:dev/support"],
        "rate_limits": {"exchanges_per_minute": 3},
    }


def test_exchange_rate_limit_is_per_agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    extra = {"agents": {"limited-a": _limited_agent(), "limited-b": _limited_agent()}}
    with (
        serve_idp() as (idp, _),
        run_broker(tmp_path, [oidc_provider_config(idp)], policy_extra=extra) as broker,
    ):

        def exchange(agent: str) -> httpx.Response:
            return httpx.post(
                broker.token_endpoint, data=exchange_form(idp.mint("alice")), auth=(agent, SECRET)
            )

        assert [exchange("limited-a").status_code for _ in range(3)] == [200, 200, 200]
        refused = exchange("limited-a")
        assert refused.status_code == 429
        assert refused.json()["error"] == "too_many_requests"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert exchange("limited-b").status_code == 200  # another agent's budget is its own
        assert broker.decisions.records[-2]["reason"] == "rate_limited"

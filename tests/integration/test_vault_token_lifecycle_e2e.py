"""The broker's own Vault token expires while it serves: renewed, then re-acquired by AppRole
login at its max TTL, with no failed fetch."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from broker.client_secrets import generate_client_secret
from tests.support.harness import exchange_form, oidc_provider_config, run_broker, serve_idp
from tests.support.servers import OpenBaoServer, run_openbao

READER = (
    'path "secret/data/llm/*" { capabilities = ["read"] }\n'
    'path "secret/metadata/llm/*" { capabilities = ["read"] }\n'
)


def _seed(bao: OpenBaoServer) -> None:
    client = bao.client()
    client.secrets.kv.v2.create_or_update_secret("llm/openai", {"api_key": "lifecycle-value"})
    client.sys.create_or_update_policy("broker-reader", READER)
    client.sys.enable_auth_method("approle")
    client.write(
        "auth/approle/role/broker",
        token_policies=["broker-reader"],
        token_ttl="2s",
        token_max_ttl="4s",
    )
    client.write("auth/approle/role/broker/role-id", role_id="broker-role")
    client.write("auth/approle/role/broker/custom-secret-id", secret_id="broker-secret-id-xyz")


def test_token_renewed_and_reacquired_while_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secrets = {
        "triage": generate_client_secret(),
        "gateway": generate_client_secret(),
        "hook": generate_client_secret(),
    }
    monkeypatch.setenv("TRIAGE_AGENT_SECRET", secrets["triage"])
    monkeypatch.setenv("LLM_GATEWAY_SECRET", secrets["gateway"])
    monkeypatch.setenv("ROTATION_HOOK_SECRET", secrets["hook"])
    secret_id_file = tmp_path / "secret-id"
    secret_id_file.write_text("broker-secret-id-xyz\n")
    with run_openbao() as bao, serve_idp() as (idp, _):
        bao.add_seeder(_seed)
        backend = {
            "name": "vault",
            "kind": "vault",
            "address": bao.address,
            "renew_before_seconds": 1,
            "auth": {
                "method": "approle",
                "role_id": "broker-role",
                "secret_id_ref": f"file:{secret_id_file}",
            },
        }
        with run_broker(tmp_path, [oidc_provider_config(idp)], secret_backends=[backend]) as b:
            token = httpx.post(
                b.token_endpoint,
                auth=("triage-agent", secrets["triage"]),
                data=exchange_form(
                    idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
                ),
            ).json()["access_token"]
            statuses = []
            deadline = time.monotonic() + 7  # beyond the token's 4 s max TTL
            while time.monotonic() < deadline:
                # a push makes every iteration reach OpenBao with the broker's current token
                push = httpx.post(
                    f"{b.url}/v1/admin/credentials/openai-api-key/refresh",
                    auth=("rotation-hook", secrets["hook"]),
                )
                fetch = httpx.post(
                    f"{b.url}/v1/credentials/openai-api-key",
                    data={"token": token},
                    auth=("llm-gateway", secrets["gateway"]),
                )
                statuses.append((push.status_code, fetch.status_code))
                assert fetch.json().get("value") == "lifecycle-value", fetch.text
                time.sleep(0.4)
        paths = bao.request_paths()
    assert all(s == (200, 200) for s in statuses), statuses
    assert paths.count("auth/approle/login") >= 2  # re-acquired after the max TTL
    assert paths.count("auth/token/renew-self") >= 1  # renewed before that

"""Failed client authentication is throttled through the shared state: two broker apps on one
real redis-server share the count; a legitimate client keeps authenticating while another
source hammers wrong secrets; the refusals are RFC 6749-shaped and recorded. Functional, not
timed: nothing here measures how long anything takes."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from broker.client_secrets import generate_client_secret, hash_client_secret
from tests.support.harness import exchange_form, oidc_provider_config, run_broker, serve_idp
from tests.support.servers import RedisServer, run_redis

SECRET = generate_client_secret()
AGENT = "scrypt-agent"


def _policy_extra() -> dict:
    return {
        "agents": {
            AGENT: {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRET),  # scrypt, the costly kind
                },
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": ["https://tickets.internal.example"],
                "act_for": ["group:dev/support"],
            }
        }
    }


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with run_redis(tmp_path) as server:
        yield server


def _post(url: str, form: dict, auth: tuple[str, str], source: str | None = None) -> httpx.Response:
    headers = {"X-Forwarded-For": source} if source else {}
    return httpx.post(f"{url}/oauth2/token", data=form, auth=auth, headers=headers, timeout=30)


def test_two_replicas_share_the_failure_count(tmp_path: Path, redis_server: RedisServer) -> None:
    state = {"kind": "redis", "url": redis_server.url}
    limits = {"failures_per_client_and_source": 3, "failures_per_source": 100}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        serve_idp() as (idp, _),
        run_broker(
            tmp_path / "a",
            [oidc_provider_config(idp)],
            policy_extra=_policy_extra(),
            state=state,
            client_authentication=limits,
        ) as a,
        run_broker(
            tmp_path / "b",
            [oidc_provider_config(idp)],
            policy_extra=_policy_extra(),
            state=state,
            client_authentication=limits,
        ) as b,
    ):
        form = exchange_form(idp.mint("alice"))
        assert _post(a.url, form, (AGENT, "guess-1")).status_code == 401
        assert _post(b.url, form, (AGENT, "guess-2")).status_code == 401
        assert _post(a.url, form, (AGENT, "guess-3")).status_code == 401
        # Three failures across the two replicas: the fourth attempt is refused at either one,
        # before any secret is checked, even with the right secret.
        for url in (b.url, a.url):
            refused = _post(url, form, (AGENT, SECRET))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"] == "too_many_requests"
            assert 1 <= int(refused.headers["retry-after"]) <= 300
            assert SECRET not in refused.text
        record = b.decisions.records[-1]
        assert record["event"] == "request.denied"
        assert record["reason"] == "client_auth_throttled"
        assert record["claimed_client_id"] == AGENT
        # An unknown id gets the same answers in the same order: no existence oracle.
        unknown = [_post(a.url, form, ("no-such-agent", "x")) for _ in range(4)]
        assert [r.status_code for r in unknown] == [401, 401, 401, 429]
        assert unknown[0].json() == _post(b.url, form, ("other-ghost", "x")).json()


def test_a_legitimate_client_authenticates_while_another_source_hammers(
    tmp_path: Path,
) -> None:
    attacker, legitimate = "203.0.113.9", "198.51.100.7"
    with (
        serve_idp() as (idp, _),
        run_broker(
            tmp_path,
            [oidc_provider_config(idp)],
            policy_extra=_policy_extra(),
            http={"trusted_proxies": ["127.0.0.1/32"]},  # the test client plays the proxy
            client_authentication={"failures_per_client_and_source": 5, "failures_per_source": 20},
        ) as broker,
    ):
        form = exchange_form(idp.mint("alice"))
        with ThreadPoolExecutor(max_workers=16) as pool:
            hammer = [
                pool.submit(_post, broker.url, form, (AGENT, f"guess-{i}"), attacker)
                for i in range(120)
            ]
            legit = [_post(broker.url, form, (AGENT, SECRET), legitimate) for _ in range(5)]
            statuses = [f.result().status_code for f in hammer]
        assert [r.status_code for r in legit] == [200] * 5, [r.text for r in legit]
        assert set(statuses) <= {401, 429, 503}
        assert statuses.count(429) > 0  # the hammering source was throttled...
        # ...and stays so, even with the right secret, while the legitimate source is served.
        assert _post(broker.url, form, (AGENT, SECRET), attacker).status_code == 429
        assert _post(broker.url, form, (AGENT, SECRET), legitimate).status_code == 200
        sources = {
            r.get("source")
            for r in broker.decisions.records
            if r.get("reason") == "client_auth_throttled"
        }
        assert sources == {attacker}  # recorded, with the address the proxy vouched for

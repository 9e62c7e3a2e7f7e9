"""Revocation holds for as long as the revoked thing could be used (issue 9, section 2).

A real broker over HTTP, with the largest clock leeway the settings allow and very short token
lifetimes, on the in-memory state store and on a real ``redis-server``. The broker's clock is the
system clock plus an offset the test moves, so time can jump past a token's expiry; where Redis
must expire an entry by itself, real time passes too. Covered: broker tokens after ``exp``, a
revoked person's SSO tokens, a revoked agent's fresh exchanges and older credentials, admin input,
and the RFC 7009 answer.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters.dev import DevIdentityProvider, DevPerson
from tests.support.harness import (
    ACCESS_TOKEN,
    EXAMPLE_SECRET_VARIABLES,
    TICKETS,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
    write_provider_keys,
)
from tests.support.jose import public_jwk
from tests.support.servers import RedisServer, run_redis

LIFETIME = 3
ASSERTION_LIFETIME = 60  # longer than a token: an assertion can outlive an agent's lockout
LEEWAY = 300  # the largest `tokens.leeway_seconds` allowed
ADMIN = ("lifetime-admin", generate_client_secret())
PK_AGENT = "pk-agent"
WL_AGENT = "wl-agent"
SERVICE_ACCOUNT = "system:serviceaccount:agents:wl"
PK_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


class OffsetClock:
    """The system clock plus an offset a test moves forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += seconds


class Stack:
    def __init__(
        self, broker: RunningBroker, idp: Any, clock: OffsetClock, secrets: dict[str, str]
    ) -> None:
        self.broker = broker
        self.idp = idp
        self.clock = clock
        self.secrets = secrets
        self.workloads: DevIdentityProvider | None = None
        self.triage = ("triage-agent", secrets["TRIAGE_AGENT_SECRET"])
        self.summariser = ("summariser-agent", secrets["SUMMARISER_AGENT_SECRET"])
        self.gateway = ("llm-gateway", secrets["LLM_GATEWAY_SECRET"])
        self.tickets = ("tickets-api", secrets["TICKETS_API_SECRET"])

    def exchange(self, subject: str, auth: tuple[str, str], subject_type: str, **extra: str) -> Any:
        return httpx.post(
            self.broker.token_endpoint,
            data=exchange_form(subject, subject_type, **extra),
            auth=auth,
        )

    def chain(self, person: str = "alice") -> tuple[str, str, int]:
        """An agent token and its sub-agent's token; and the agent token's ``exp``."""
        sso = self.idp.mint(person)
        agent = self.exchange(
            sso, self.triage, "urn:ietf:params:oauth:token-type:id_token", scope="llm:openai:chat"
        )
        assert agent.status_code == 200, agent.text
        child = self.exchange(
            agent.json()["access_token"], self.summariser, ACCESS_TOKEN, scope="llm:openai:chat"
        )
        assert child.status_code == 200, child.text
        exp = int(self.clock.now()) + agent.json()["expires_in"]
        return agent.json()["access_token"], child.json()["access_token"], exp

    def fetch(self, token: str) -> httpx.Response:
        return httpx.post(
            f"{self.broker.url}/v1/credentials/openai-api-key",
            data={"token": token},
            auth=self.gateway,
        )

    def active(self, token: str) -> bool:
        response = httpx.post(
            f"{self.broker.url}/oauth2/introspect", data={"token": token}, auth=self.tickets
        )
        return bool(response.json()["active"])

    def assertion(self, issued_at: float) -> dict[str, str]:
        """Client authentication for `PK_AGENT`: a fresh assertion issued at `issued_at`."""
        claims = {
            "iss": PK_AGENT,
            "sub": PK_AGENT,
            "aud": self.broker.token_endpoint,
            "iat": int(issued_at),
            "exp": int(issued_at) + ASSERTION_LIFETIME - 5,
            "jti": uuid.uuid4().hex,
        }
        return {
            "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            "client_assertion": jwt.encode(claims, PK_KEY, "RS256", headers={"kid": "pk-1"}),
        }

    def revoke(self, **target: str) -> None:
        response = httpx.post(f"{self.broker.url}/v1/admin/revocations", json=target, auth=ADMIN)
        assert response.status_code == 200, response.text

    def denials(self) -> list[dict[str, Any]]:
        return [
            r
            for r in self.broker.decisions.records
            if r["event"] == "token.exchange" and r["outcome"] == "denied"
        ]

    def wait_until(self, instant: float) -> None:
        """Let real time pass until the broker's clock reads `instant` (Redis expires entries
        by real time)."""
        delay = instant - self.clock.now()
        if delay > 0:
            time.sleep(delay)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with run_redis(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture(params=["memory", "redis"])
def stack(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Stack]:
    secrets = example_client_secrets()
    for name in EXAMPLE_SECRET_VARIABLES:
        monkeypatch.setenv(name, secrets[name])
    state: dict[str, Any] = {"kind": "memory"}
    if request.param == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        state = {"kind": "redis", "url": server.url, "key_prefix": f"t{uuid.uuid4().hex[:12]}:"}
    secrets_file = tmp_path / "dev-secrets.yaml"
    write_provider_keys(secrets_file, "sk-test-openai")
    admin = {
        "agents": {
            PK_AGENT: {
                "authentication": {
                    "method": "private_key_jwt",
                    "jwks": {"keys": [public_jwk(PK_KEY, "pk-1")]},
                    "algorithms": ["RS256"],
                },
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": [TICKETS],
                "act_for": ["group:dev/support"],
            },
            WL_AGENT: {
                "workload_identities": [{"issuer": "k8s", "subject": SERVICE_ACCOUNT}],
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": [TICKETS],
                "act_for": ["group:dev/support"],
            },
        },
        "admins": {
            ADMIN[0]: {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(ADMIN[1], method="sha256"),
                },
                "permissions": ["revocations:write"],
            }
        },
    }
    clock = OffsetClock()
    workload_people = {SERVICE_ACCOUNT: DevPerson(SERVICE_ACCOUNT, (), "", "")}
    with (
        serve_idp(clock=clock) as (idp, _),
        serve_idp(workload_people, client_id="broker-workloads", clock=clock) as (workloads, _),
        run_broker(
            tmp_path,
            [{**oidc_provider_config(idp), "leeway_seconds": LEEWAY}],
            workload_issuers=[
                {
                    "name": "k8s",
                    "kind": "kubernetes",
                    "issuer": workloads.issuer,
                    "audiences": [workloads.client_id],
                    "algorithms": ["RS256"],
                }
            ],
            policy_extra=admin,
            clock=clock,
            secret_backends=[{"name": "vault", "kind": "file", "path": str(secrets_file)}],
            allow_development_components=True,
            tokens={
                "max_lifetime_seconds": LIFETIME,
                "client_assertion_max_lifetime_seconds": ASSERTION_LIFETIME,
                "leeway_seconds": LEEWAY,
            },
            state=state,
        ) as broker,
    ):
        stack = Stack(broker, idp, clock, secrets)
        stack.workloads = workloads
        yield stack


def test_a_token_revoked_by_its_agent_stays_revoked_after_exp_with_its_children(
    stack: Stack,
) -> None:
    agent, child, exp = stack.chain()
    assert stack.fetch(child).status_code == 200
    revoked = httpx.post(
        f"{stack.broker.url}/oauth2/revoke", data={"token": agent}, auth=stack.triage
    )
    assert revoked.status_code == 200
    for token in (agent, child):
        assert stack.fetch(token).status_code == 401

    stack.wait_until(exp + 1.2)  # the entries have lapsed, in Redis too
    for extra in (0, 24):  # exp+1 and exp+25, well inside the 300 s leeway
        stack.clock.advance(extra)
        for token in (agent, child):
            fetch = stack.fetch(token)
            assert fetch.status_code == 401, fetch.text
            assert fetch.json()["error"] == "invalid_token"
            assert not stack.active(token)
            again = stack.exchange(token, stack.summariser, ACCESS_TOKEN, scope="llm:openai:chat")
            assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


@pytest.mark.parametrize("kind", ["person", "agent"])
def test_person_and_agent_revocations_outlive_what_they_revoke(stack: Stack, kind: str) -> None:
    agent, child, exp = stack.chain(person="dave")
    target = {"person": "dev/dave"} if kind == "person" else {"agent": "triage-agent"}
    stack.clock.advance(1.0)  # tokens carry whole-second iat
    response = httpx.post(f"{stack.broker.url}/v1/admin/revocations", json=target, auth=ADMIN)
    assert response.status_code == 200, response.text
    assert stack.fetch(child).status_code == 401

    # Past the old entry lifetime (max lifetime + 60 s) and the tokens' exp, inside the leeway.
    stack.wait_until(exp + 1.2)
    stack.clock.advance(LIFETIME + 61)
    for token in (agent, child):
        assert stack.fetch(token).status_code == 401
        assert not stack.active(token)


@pytest.mark.parametrize("bad", ["NaN", "nan", "inf", "-inf", "1e309", "-1", "soon", "1e12"])
def test_admin_not_before_must_be_a_sane_time_and_nothing_changes_otherwise(
    stack: Stack, bad: str
) -> None:
    agent, _, _ = stack.chain(person="dave")
    stack.clock.advance(1.0)
    endpoint = f"{stack.broker.url}/v1/admin/revocations"
    assert httpx.post(endpoint, json={"person": "dev/dave"}, auth=ADMIN).status_code == 200
    before = len(stack.broker.decisions.records)

    refused = httpx.post(endpoint, json={"person": "dev/dave", "not_before": bad}, auth=ADMIN)
    assert refused.status_code == 400, refused.text
    body = refused.json()
    assert body["error"] == "invalid_request" and "not_before" in body["error_description"]
    assert bad not in body["error_description"]
    # The earlier revocation still holds (a NaN must not lift it), in either store.
    assert not stack.active(agent)
    assert stack.fetch(agent).status_code == 401
    new = stack.broker.decisions.records[before:]
    assert not [r for r in new if r["event"] == "token.revoked"]
    [denied] = [r for r in new if r["event"] == "request.denied"]
    assert denied["reason"] == "invalid_not_before"
    assert denied["route"] == "/v1/admin/revocations"


def test_rfc7009_answers_alike_for_garbage_and_a_token_the_caller_does_not_hold(
    stack: Stack,
) -> None:
    agent, _, _ = stack.chain()
    endpoint = f"{stack.broker.url}/oauth2/revoke"
    coding = ("coding-agent", stack.secrets["CODING_AGENT_SECRET"])
    answers = [
        httpx.post(endpoint, data={"token": token}, auth=coding)
        for token in (agent, "garbage", agent[:-6] + "AAAAAA")
    ]
    assert {(a.status_code, a.text, a.headers["cache-control"]) for a in answers} == {
        (200, "{}", "no-store")
    }
    assert stack.active(agent)  # nothing was revoked
    records = [r for r in stack.broker.decisions.records if r["event"] == "token.revoke"]
    assert [r["reason"] for r in records] == [
        "not_token_holder",
        "token_not_valid",
        "token_not_valid",
    ]
    assert all(r["outcome"] == "not_revoked" and r["by"] == "coding-agent" for r in records)
    assert "garbage" not in str(stack.broker.decisions.records)
    assert agent not in str(stack.broker.decisions.records)


def test_a_revoked_persons_sso_tokens_cannot_be_exchanged_again(stack: Stack) -> None:
    signed_in_at = stack.clock.now()
    id_token = stack.idp.mint("dave")
    access_token = stack.idp.mint("dave", token_type="access_token")
    for sso, kind in ((id_token, ID_TOKEN), (access_token, ACCESS_TOKEN)):
        assert stack.exchange(sso, stack.triage, kind).status_code == 200
    stack.clock.advance(1.0)
    stack.revoke(person="dev/dave")
    stack.clock.advance(1.0)
    # Still valid for an hour, but issued before the revocation; and a token issued after it
    # (an IdP refresh) for a sign-in before it.
    refreshed = stack.idp.mint("dave", extra_claims={"auth_time": int(signed_in_at)})
    for sso, kind in ((id_token, ID_TOKEN), (access_token, ACCESS_TOKEN), (refreshed, ID_TOKEN)):
        refused = stack.exchange(sso, stack.triage, kind)
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_grant"
        assert "sign in again" in refused.json()["error_description"]
    denied = stack.denials()[-3:]
    assert [r["reason"] for r in denied] == ["subject_revoked"] * 3
    assert all(r["person"] == "dev/dave" for r in denied)

    assert stack.exchange(stack.idp.mint("dave"), stack.triage, ID_TOKEN).status_code == 200
    assert stack.exchange(stack.idp.mint("alice"), stack.triage, ID_TOKEN).status_code == 200


def test_a_revoked_agent_gets_no_token_until_its_tokens_expired_nor_with_older_credentials(
    stack: Stack,
) -> None:
    sso = stack.idp.mint("alice")
    old_assertion = stack.assertion(stack.clock.now())  # made, not yet used
    assert stack.exchange(sso, stack.triage, ID_TOKEN).status_code == 200
    stack.clock.advance(1.0)
    revoked_at = stack.clock.now()
    stack.revoke(agent="triage-agent")
    stack.revoke(agent=PK_AGENT)

    # Locked out, whatever the credential, until every token it held has expired.
    refused = [
        stack.exchange(sso, stack.triage, ID_TOKEN),
        httpx.post(
            stack.broker.token_endpoint,
            data={**exchange_form(sso, ID_TOKEN), **stack.assertion(revoked_at + 1)},
        ),
    ]
    for response in refused:
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "unauthorized_client"
        assert "revoked" in response.json()["error_description"]
    assert [r["reason"] for r in stack.denials()[-2:]] == ["agent_revoked"] * 2

    stack.clock.advance(LIFETIME + 1)
    older = httpx.post(
        stack.broker.token_endpoint, data={**exchange_form(sso, ID_TOKEN), **old_assertion}
    )
    assert older.status_code == 400 and older.json()["error"] == "unauthorized_client"
    assert "issued before its revocation" in older.json()["error_description"]
    fresh = httpx.post(
        stack.broker.token_endpoint,
        data={**exchange_form(sso, ID_TOKEN), **stack.assertion(stack.clock.now())},
    )
    assert fresh.status_code == 200, fresh.text
    assert stack.exchange(sso, stack.triage, ID_TOKEN).status_code == 200


def test_exchange_fails_closed_when_revocations_cannot_be_read(
    stack: Stack, request: pytest.FixtureRequest
) -> None:
    if stack.broker.settings.state.kind != "redis":
        return  # the in-memory store is always readable
    server: RedisServer = request.getfixturevalue("redis_server")
    assert stack.workloads is not None
    sso = stack.idp.mint("alice")
    workload_form = exchange_form(
        sso,
        ID_TOKEN,
        actor_token=stack.workloads.mint(SERVICE_ACCOUNT),
        actor_token_type="urn:ietf:params:oauth:token-type:jwt",
    )
    server.stop()
    try:
        refused = stack.exchange(sso, stack.triage, ID_TOKEN)
        # No client authentication (a workload actor): the revocation check itself is reached.
        by_workload = httpx.post(stack.broker.token_endpoint, data=workload_form)
    finally:
        server.start()
    # Client authentication reads the shared failure counts first, and fails closed too.
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"] == "temporarily_unavailable"
    assert by_workload.status_code == 503, by_workload.text
    assert by_workload.json()["error"] == "temporarily_unavailable"
    assert stack.denials()[-1]["reason"] == "state_unavailable"
    assert any(
        r["event"] == "request.denied" and r["reason"] == "state_unavailable"
        for r in stack.broker.decisions.records
    )
    assert stack.exchange(sso, stack.triage, ID_TOKEN).status_code == 200


def test_a_revoked_agent_presenting_a_workload_token_from_before_is_refused(stack: Stack) -> None:
    assert stack.workloads is not None
    sso = stack.idp.mint("alice")

    def exchange_as_workload(workload_token: str) -> httpx.Response:
        form = exchange_form(
            sso,
            ID_TOKEN,
            actor_token=workload_token,
            actor_token_type="urn:ietf:params:oauth:token-type:jwt",
        )
        return httpx.post(stack.broker.token_endpoint, data=form)

    old = stack.workloads.mint(SERVICE_ACCOUNT)
    assert exchange_as_workload(old).status_code == 200
    stack.clock.advance(1.0)
    stack.revoke(agent=WL_AGENT)
    locked = exchange_as_workload(old)
    assert locked.status_code == 400 and locked.json()["error"] == "unauthorized_client"

    stack.clock.advance(LIFETIME + 1)  # the lockout is over; the old token is still valid
    older = exchange_as_workload(old)
    assert older.status_code == 400, older.text
    assert "issued before its revocation" in older.json()["error_description"]
    assert stack.denials()[-1]["reason"] == "agent_revoked"
    assert exchange_as_workload(stack.workloads.mint(SERVICE_ACCOUNT)).status_code == 200

"""Two broker processes sharing one Redis, as replicas behind a load balancer: revocation,
single-use client assertions and rate limits hold across them; Redis stopped mid-run makes them
fail closed with 503 and nothing crashes; Redis back, service resumes without a restart."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import jwt
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.client_secrets import generate_client_secret, hash_client_secret
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    EXAMPLE_POLICIES,
    broker_process,
    exchange_form,
    oidc_provider_config,
    placeholder_vault,
    serve_idp,
    wait_until_serving,
)
from tests.support.jose import public_jwk
from tests.support.saml_idp import (
    ACS_URL,
    IDP_ENTITY_ID,
    SP_ENTITY_ID,
    SamlTestIdp,
    assertion_token,
    make_key_pair,
)
from tests.support.servers import RedisServer, free_loopback_port, run_redis

SECRETS = {n: generate_client_secret() for n in ("triage", "summariser", "tickets", "limited")}
TRIAGE = ("triage-agent", SECRETS["triage"])
TICKETS_API = ("tickets-api", SECRETS["tickets"])
AGENT_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class Replicas:
    urls: tuple[str, str]
    issuer: str
    idp: DevIdentityProvider
    redis: RedisServer
    saml_idp: SamlTestIdp
    processes: tuple[subprocess.Popen[bytes], ...] = ()


def _policy_extra() -> dict:
    return {
        "group_bindings": [{"idp": "corp-saml", "group": "support", "roles": ["support"]}],
        "agents": {
            "saml-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRETS["limited"], method="sha256"),
                },
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": ["https://tickets.internal.example"],
                "act_for": ["group:corp-saml/support"],
            },
            "pkjwt-agent": {
                "authentication": {
                    "method": "private_key_jwt",
                    "jwks": {"keys": [public_jwk(AGENT_KEY, "k1")]},
                    "algorithms": ["RS256"],
                },
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": ["https://tickets.internal.example"],
                "act_for": ["group:dev/support"],
            },
            "limited-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRETS["limited"], method="sha256"),
                },
                "ceiling": ["tickets:read"],
                "default_scopes": ["tickets:read"],
                "audiences": ["https://tickets.internal.example"],
                "act_for": ["group:dev/support"],
                "rate_limits": {"exchanges_per_minute": 4},
            },
        },
    }


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with start_replicas(tmp_path_factory.mktemp("replicas")) as running:
        yield running
        for process in running.processes:
            assert process.poll() is None, "a replica crashed during the tests"


@contextlib.contextmanager
def start_replicas(
    workdir: Path, saml_idp_factory: Callable[[Path], SamlTestIdp] | None = None
) -> Iterator[Replicas]:
    """Redis, the test IdPs and two broker replicas; whatever started is stopped on every path
    (a failure half-way included: everything is entered on one ExitStack)."""
    policy_dir = workdir / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    (policy_dir / "zz-replicas.yaml").write_text(yaml.safe_dump(_policy_extra()))
    with contextlib.ExitStack() as started:
        redis_server = started.enter_context(run_redis(workdir))
        saml_idp = (saml_idp_factory or _saml_idp)(workdir)
        saml_config = {
            "name": "corp-saml",
            "kind": "saml",
            "issuer": IDP_ENTITY_ID,
            "sp_entity_id": SP_ENTITY_ID,
            "acs_url": ACS_URL,
            "idp_certificate_ref": f"file:{saml_idp.keys.cert_file}",
        }
        idp, _ = started.enter_context(serve_idp())
        ports = (free_loopback_port(), free_loopback_port())
        issuer = f"http://127.0.0.1:{ports[0]}"  # one issuer, as behind a load balancer
        env = os.environ | {
            "TRIAGE_AGENT_SECRET": SECRETS["triage"],
            "SUMMARISER_AGENT_SECRET": SECRETS["summariser"],
            "TICKETS_API_SECRET": SECRETS["tickets"],
        }
        processes: list[subprocess.Popen[bytes]] = []
        for port in ports:
            config = workdir / f"broker-{port}.yaml"
            config.write_text(
                yaml.safe_dump(
                    {
                        "issuer": issuer,
                        "policy_dir": str(policy_dir),
                        **placeholder_vault(workdir),
                        "signing_keys": {"directory": str(workdir / "keys")},
                        "identity_providers": [oidc_provider_config(idp), saml_config],
                        "state": {
                            "kind": "redis",
                            "url": redis_server.url,
                            "socket_timeout_seconds": 0.3,
                            "connect_timeout_seconds": 0.3,
                        },
                        "http": {"port": port},
                    }
                )
            )
            log = workdir / f"broker-{port}.log"
            process = started.enter_context(
                broker_process(["serve", "--config", str(config)], log, env)
            )
            processes.append(process)
            wait_until_serving(f"http://127.0.0.1:{port}", process, log)
        urls = (f"http://127.0.0.1:{ports[0]}", f"http://127.0.0.1:{ports[1]}")
        yield Replicas(urls, issuer, idp, redis_server, saml_idp, tuple(processes))


def _saml_idp(workdir: Path) -> SamlTestIdp:
    return SamlTestIdp(make_key_pair(workdir, "saml-idp"))


def _exchange(url: str, form: dict, auth: tuple[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{url}/oauth2/token", data=form, auth=auth, timeout=10)


def _active(url: str, token: str) -> httpx.Response:
    return httpx.post(
        f"{url}/oauth2/introspect", data={"token": token}, auth=TICKETS_API, timeout=10
    )


def _assertion(issuer: str) -> str:
    now = int(time.time())
    claims = {
        "iss": "pkjwt-agent",
        "sub": "pkjwt-agent",
        "aud": f"{issuer}/oauth2/token",
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
    }
    return jwt.encode(claims, AGENT_KEY, algorithm="RS256", headers={"kid": "k1"})


def test_revocation_at_one_replica_holds_at_the_other_within_a_second(
    replicas: Replicas,
) -> None:
    a, b = replicas.urls
    agent = _exchange(a, exchange_form(replicas.idp.mint("alice")), TRIAGE).json()["access_token"]
    child = _exchange(
        b, exchange_form(agent, ACCESS_TOKEN), ("summariser-agent", SECRETS["summariser"])
    )
    assert child.status_code == 200, child.text
    assert _active(b, child.json()["access_token"]).json()["active"] is True
    revoked_at = time.monotonic()
    assert httpx.post(f"{a}/oauth2/revoke", data={"token": agent}, auth=TRIAGE).status_code == 200
    while _active(b, child.json()["access_token"]).json()["active"]:
        assert time.monotonic() - revoked_at < 1.0, "revocation did not reach the other replica"
        time.sleep(0.05)
    assert time.monotonic() - revoked_at < 1.0


def test_a_client_assertion_used_at_one_replica_is_refused_at_the_other(
    replicas: Replicas,
) -> None:
    a, b = replicas.urls
    form = exchange_form(
        replicas.idp.mint("alice"),
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion=_assertion(replicas.issuer),
    )
    assert _exchange(a, form).status_code == 200
    replay = _exchange(b, form)
    assert replay.status_code == 401 and "already been used" in replay.text


def test_a_saml_assertion_used_at_one_replica_is_refused_at_the_other(
    replicas: Replicas,
) -> None:
    a, b = replicas.urls
    assertion = assertion_token(replicas.saml_idp.response("alice", {"groups": ["support"]}))
    form = exchange_form(assertion, "urn:ietf:params:oauth:token-type:saml2")
    agent = ("saml-agent", SECRETS["limited"])
    first = _exchange(a, form, agent)
    assert first.status_code == 200, first.text
    replay = _exchange(b, form, agent)
    assert replay.status_code == 400 and replay.json()["error"] == "invalid_grant"


def test_a_rate_limit_is_shared_by_the_replicas(replicas: Replicas) -> None:
    a, b = replicas.urls
    limited = ("limited-agent", SECRETS["limited"])
    person = replicas.idp.mint("alice")
    statuses = [
        _exchange(url, exchange_form(person), limited).status_code for url in (a, b, a, b, a)
    ]
    assert statuses == [200, 200, 200, 200, 429]
    assert _exchange(b, exchange_form(person), limited).status_code == 429


def test_redis_down_fails_closed_and_recovers_without_restart(replicas: Replicas) -> None:
    a, b = replicas.urls
    agent = _exchange(a, exchange_form(replicas.idp.mint("alice")), TRIAGE).json()["access_token"]
    replicas.redis.stop()
    try:
        for url in (a, b):
            form = exchange_form(
                replicas.idp.mint("alice"),
                client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                client_assertion=_assertion(replicas.issuer),
            )
            down = _exchange(url, form)
            assert down.status_code == 503, down.text
            assert down.json()["error"] == "temporarily_unavailable"
            introspect = _active(url, agent)
            assert introspect.status_code == 503
            ready = httpx.get(f"{url}/readyz")
            assert ready.status_code == 503 and ready.json()["checks"]["state"]["ok"] is False
            reexchange = _exchange(
                url, exchange_form(agent, ACCESS_TOKEN), ("summariser-agent", SECRETS["summariser"])
            )
            assert reexchange.status_code == 503
            assert "fail closed" in reexchange.json()["error_description"]
    finally:
        replicas.redis.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _active(b, agent).status_code == 200:
            break
        time.sleep(0.2)
    assert _active(b, agent).json()["active"] is True
    recovered = _exchange(
        a,
        exchange_form(
            replicas.idp.mint("alice"),
            client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            client_assertion=_assertion(replicas.issuer),
        ),
    )
    assert recovered.status_code == 200, recovered.text


def _children() -> set[int]:
    """The live (not zombie) child processes of this test process."""
    children = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            children.add(int(stat.parent.name))
    return children


def test_a_failure_half_way_through_starting_stops_what_already_started(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SAML test IdP cannot be built (no xmlsec1 on PATH) after Redis started: Redis is
    stopped, not left behind as an orphan, and the error says what is missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    redis_binary = shutil.which("redis-server")
    assert redis_binary is not None
    (bin_dir / "redis-server").symlink_to(redis_binary)
    monkeypatch.setenv("PATH", str(bin_dir))
    before = _children()
    running_at_failure: set[int] = set()

    def saml_idp_after_redis(workdir: Path) -> SamlTestIdp:
        running_at_failure.update(_children() - before)
        return _saml_idp(workdir)

    with (
        pytest.raises(RuntimeError, match="xmlsec1 program is not on PATH"),
        start_replicas(tmp_path / "replicas", saml_idp_after_redis),
    ):
        pytest.fail("the replicas started without xmlsec1")
    assert running_at_failure, "the failure did not happen after Redis started"
    assert _children() == before

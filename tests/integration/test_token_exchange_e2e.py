"""Token exchange end to end over real HTTP: a loopback OIDC issuer, the broker, standard clients.

The issued tokens are verified by a plain JWT library through the broker's published JWKS only.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from authlib.integrations.requests_client import OAuth2Session
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.tokens import Keyring
from idp_adapters.dev import DevIdentityProvider, DevPerson
from tests.support.harness import (
    ACCESS_TOKEN,
    ID_TOKEN,
    JWT_TYPE,
    TICKETS,
    TOKEN_EXCHANGE,
    RunningBroker,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)

SECRETS = {
    name: generate_client_secret()
    for name in ("triage", "summariser", "coding", "tickets-api", "llm-gateway", "chain")
}
WORKLOAD_SUBJECT = "system:serviceaccount:agents:coder"


def _rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


PKJWT_KEY = _rsa_key()


def _public_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    jwk.update({"kid": kid, "alg": "RS256", "use": "sig"})
    return jwk


REMOTE_KEY = _rsa_key()


@pytest.fixture(scope="module")
def remote_jwks() -> Iterator[str]:
    """An agent's own JWKS endpoint (private_key_jwt with jwks_uri)."""
    from idp_adapters._loopback import serve_in_thread

    body = json.dumps({"keys": [_public_jwk(REMOTE_KEY, "remote-1")]}).encode()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})

    server = serve_in_thread(app)
    try:
        yield f"{server.url}/jwks.json"
    finally:
        server.stop()


def _test_agents(remote_jwks_uri: str) -> dict[str, Any]:
    chain_hash = hash_client_secret(SECRETS["chain"], method="sha256")
    agents: dict[str, Any] = {
        "pkjwt-agent": {
            "authentication": {
                "method": "private_key_jwt",
                "jwks": {"keys": [_public_jwk(PKJWT_KEY, "pkjwt-1")]},
                "algorithms": ["RS256"],
            },
            "ceiling": ["tickets:read", "kb:read", "llm:openai:chat"],
            "default_scopes": ["tickets:read"],
            "audiences": [TICKETS, "llm-gateway"],
            "act_for": ["group:dev/support"],
            "may_delegate_to": ["summariser-agent"],
        },
        "pkjwt-remote-agent": {
            "authentication": {"method": "private_key_jwt", "jwks_uri": remote_jwks_uri},
            "ceiling": ["tickets:read"],
            "audiences": [TICKETS],
            "act_for": ["group:dev/support"],
        },
        "workload-agent": {
            "workload_identities": [{"issuer": "k8s", "subject": WORKLOAD_SUBJECT}],
            "ceiling": ["repo:read"],
            "default_scopes": ["repo:read"],
            "audiences": ["https://git.internal.example"],
            "act_for": ["group:dev/engineering"],
        },
    }
    for i in range(1, 6):
        agents[f"chain-{i}"] = {
            "authentication": {"method": "client_secret_basic", "secret_hash": chain_hash},
            "ceiling": ["tickets:read"],
            "default_scopes": ["tickets:read"],
            "audiences": [TICKETS],
            "act_for": ["role:support"],
            "may_delegate_to": [f"chain-{i + 1}"] if i < 5 else [],
        }
    return {"agents": agents}


@pytest.fixture(scope="module")
def env_secrets() -> Iterator[None]:
    mp = pytest.MonkeyPatch()
    mp.setenv("TRIAGE_AGENT_SECRET", SECRETS["triage"])
    mp.setenv("SUMMARISER_AGENT_SECRET", SECRETS["summariser"])
    mp.setenv("CODING_AGENT_SECRET", SECRETS["coding"])
    mp.setenv("TICKETS_API_SECRET", SECRETS["tickets-api"])
    mp.setenv("LLM_GATEWAY_SECRET", SECRETS["llm-gateway"])
    yield
    mp.undo()


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def workload_idp() -> Iterator[DevIdentityProvider]:
    people = {
        WORKLOAD_SUBJECT: DevPerson(WORKLOAD_SUBJECT, (), "", ""),
        "system:serviceaccount:agents:stranger": DevPerson(
            "system:serviceaccount:agents:stranger", (), "", ""
        ),
    }
    with serve_idp(people, client_id="broker-workloads") as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    idp: DevIdentityProvider,
    workload_idp: DevIdentityProvider,
    env_secrets: None,
    remote_jwks: str,
) -> Iterator[RunningBroker]:
    workload = {
        "name": "k8s",
        "kind": "kubernetes",
        "issuer": workload_idp.issuer,
        "audiences": [workload_idp.client_id],
        "algorithms": ["RS256"],
    }
    with run_broker(
        tmp_path_factory.mktemp("broker"),
        [oidc_provider_config(idp)],
        policy_extra=_test_agents(remote_jwks),
        workload_issuers=[workload],
    ) as running:
        yield running


def _post(
    broker: RunningBroker, data: dict[str, str], auth: tuple[str, str] | None = None, **kwargs: Any
) -> httpx.Response:
    return httpx.post(broker.token_endpoint, data=data, auth=auth, timeout=10, **kwargs)


def triage() -> tuple[str, str]:
    return ("triage-agent", SECRETS["triage"])


def _verify_with_jwks(broker: RunningBroker, token: str, audience: str) -> dict[str, Any]:
    """Verification as any resource server would do it: the published JWKS and nothing else."""
    jwks = jwt.PyJWKClient(f"{broker.url}/.well-known/jwks.json", cache_keys=False)
    key = jwks.get_signing_key_from_jwt(token)
    return jwt.decode(token, key, algorithms=["ES256"], audience=audience, issuer=broker.url)


def _exchange_ok(broker: RunningBroker, form: dict[str, str], auth: tuple[str, str]) -> dict:
    response = _post(broker, form, auth)
    assert response.status_code == 200, response.text
    return response.json()


# -- the happy path --------------------------------------------------------------------------


def test_exchange_issues_a_down_scoped_token_verifiable_through_jwks(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    person_token = idp.mint("alice", lifetime=3600)
    response = _post(
        broker,
        exchange_form(person_token, scope="tickets:read kb:read", audience=TICKETS),
        triage(),
    )
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["issued_token_type"] == ACCESS_TOKEN
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "tickets:read kb:read"
    assert "refresh_token" not in body
    assert 0 < body["expires_in"] <= 900

    token = body["access_token"]
    assert jwt.get_unverified_header(token)["typ"] == "at+jwt"
    claims = _verify_with_jwks(broker, token, TICKETS)
    assert claims["sub"] == "dev/alice"
    assert claims["client_id"] == "triage-agent"
    assert claims["act"] == {"sub": "triage-agent"}
    assert claims["scope"] == "tickets:read kb:read"
    assert claims["aud"] == TICKETS
    assert claims["provenance"]["idp"] == "dev"
    assert claims["provenance"]["sub"] == "alice"
    assert claims["provenance"]["groups"] == ["support"]
    assert claims["policy_version"] == broker.services.policies.current().version
    assert claims["policy_version"].startswith("sha256:")
    assert claims["nbf"] <= claims["iat"] + 1
    assert claims["exp"] - claims["iat"] == body["expires_in"]
    assert "parent_jti" not in claims


def test_defaults_apply_when_no_scope_is_requested(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    body = _exchange_ok(broker, exchange_form(idp.mint("alice")), triage())
    assert body["scope"] == "tickets:read kb:read"


def test_access_token_and_jwt_subject_types_are_accepted(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    access = idp.mint("alice", token_type="access_token")
    assert _exchange_ok(broker, exchange_form(access, ACCESS_TOKEN), triage())["scope"]
    id_token = idp.mint("alice")
    body = _exchange_ok(
        broker, exchange_form(id_token, JWT_TYPE, requested_token_type=JWT_TYPE), triage()
    )
    assert body["issued_token_type"] == JWT_TYPE


def test_token_never_outlives_the_persons_session(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    body = _exchange_ok(broker, exchange_form(idp.mint("alice", lifetime=120)), triage())
    assert body["expires_in"] <= 120


def test_private_key_jwt_with_authlib_client(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    pem = PKJWT_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    client = OAuth2Session("pkjwt-agent", pem, token_endpoint_auth_method="private_key_jwt")
    client.register_client_auth_method(
        PrivateKeyJWT(broker.token_endpoint, headers={"kid": "pkjwt-1"})
    )
    token = client.fetch_token(
        broker.token_endpoint,
        grant_type=TOKEN_EXCHANGE,
        subject_token=idp.mint("alice"),
        subject_token_type=ID_TOKEN,
        scope="tickets:read",
    )
    claims = _verify_with_jwks(broker, token["access_token"], TICKETS)
    assert claims["client_id"] == "pkjwt-agent"
    assert claims["act"] == {"sub": "pkjwt-agent"}
    record = broker.decisions.records[-1]
    assert record["client_auth"] == "private_key_jwt"


def _client_assertion(
    audience: str,
    *,
    jti: str | None = None,
    lifetime: int = 60,
    client_id: str = "pkjwt-agent",
    key: rsa.RSAPrivateKey = PKJWT_KEY,
    kid: str = "pkjwt-1",
) -> str:
    now = int(time.time())
    claims = {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": now,
        "exp": now + lifetime,
        "jti": jti or uuid.uuid4().hex,
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def test_private_key_jwt_with_a_jwks_uri(broker: RunningBroker, idp: DevIdentityProvider) -> None:
    def form(key: rsa.RSAPrivateKey) -> dict[str, str]:
        return exchange_form(
            idp.mint("alice"),
            scope="tickets:read",
            client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            client_assertion=_client_assertion(
                broker.url, client_id="pkjwt-remote-agent", key=key, kid="remote-1"
            ),
        )

    response = _post(broker, form(REMOTE_KEY))
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "tickets:read"
    forged = _post(broker, form(PKJWT_KEY))  # right kid, wrong key
    assert forged.status_code == 401
    assert forged.json()["error"] == "invalid_client"


def test_replayed_client_assertion_is_refused(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    assertion = _client_assertion(broker.token_endpoint)
    form = exchange_form(
        idp.mint("alice"),
        client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        client_assertion=assertion,
    )
    assert _post(broker, form).status_code == 200
    replay = _post(broker, form)
    assert replay.status_code == 401
    assert replay.json()["error"] == "invalid_client"
    assert "already been used" in replay.json()["error_description"]


def test_client_assertion_with_long_lifetime_or_wrong_audience_is_refused(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    for assertion in (
        _client_assertion(broker.token_endpoint, lifetime=7200),
        _client_assertion("https://elsewhere.example/token"),
    ):
        form = exchange_form(
            idp.mint("alice"),
            client_assertion_type="urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            client_assertion=assertion,
        )
        response = _post(broker, form)
        assert response.status_code == 401, response.text
        assert response.json()["error"] == "invalid_client"


def test_workload_identity_as_actor_token_needs_no_client_secret(
    broker: RunningBroker, idp: DevIdentityProvider, workload_idp: DevIdentityProvider
) -> None:
    form = exchange_form(
        idp.mint("bob"),
        actor_token=workload_idp.mint(WORKLOAD_SUBJECT),
        actor_token_type=JWT_TYPE,
    )
    body = _exchange_ok(broker, form, None)  # type: ignore[arg-type]
    claims = _verify_with_jwks(broker, body["access_token"], "https://git.internal.example")
    assert claims["client_id"] == "workload-agent"
    assert claims["sub"] == "dev/bob"

    stranger = exchange_form(
        idp.mint("bob"),
        actor_token=workload_idp.mint("system:serviceaccount:agents:stranger"),
        actor_token_type=JWT_TYPE,
    )
    response = _post(broker, stranger)
    assert response.status_code == 401
    assert response.json()["error"] == "invalid_client"

    mismatch = _post(broker, form | {"actor_token": workload_idp.mint(WORKLOAD_SUBJECT)}, triage())
    assert mismatch.status_code == 400
    assert mismatch.json()["error"] == "invalid_request"


# -- delegation ------------------------------------------------------------------------------


def test_sub_agent_re_exchange_nests_act_and_narrows(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _exchange_ok(
        broker, exchange_form(idp.mint("alice"), scope="tickets:read kb:read"), triage()
    )
    parent_claims = _verify_with_jwks(broker, parent["access_token"], TICKETS)
    child = _exchange_ok(
        broker,
        exchange_form(parent["access_token"], ACCESS_TOKEN, scope="tickets:read", audience=TICKETS),
        ("summariser-agent", SECRETS["summariser"]),
    )
    claims = _verify_with_jwks(broker, child["access_token"], TICKETS)
    assert claims["sub"] == "dev/alice"
    assert claims["act"] == {"sub": "summariser-agent", "act": {"sub": "triage-agent"}}
    assert claims["parent_jti"] == parent_claims["jti"]
    assert claims["provenance"] == parent_claims["provenance"]
    assert claims["scope"] == "tickets:read"
    assert claims["exp"] <= parent_claims["exp"]
    assert child["expires_in"] <= 300  # the summariser's own maximum


def test_sub_agent_cannot_widen_scope_or_audience(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _exchange_ok(
        broker,
        exchange_form(idp.mint("alice"), scope="tickets:read", audience=TICKETS),
        triage(),
    )
    summariser = ("summariser-agent", SECRETS["summariser"])
    wider_scope = _post(
        broker,
        exchange_form(parent["access_token"], ACCESS_TOKEN, scope="tickets:read kb:read"),
        summariser,
    )
    assert wider_scope.status_code == 400
    assert wider_scope.json()["error"] == "invalid_scope"
    assert (
        "'kb:read' (the parent token does not carry it)" in wider_scope.json()["error_description"]
    )
    wider_audience = _post(
        broker,
        exchange_form(parent["access_token"], ACCESS_TOKEN, audience="llm-gateway"),
        summariser,
    )
    assert wider_audience.status_code == 400
    assert wider_audience.json()["error"] == "invalid_target"


def test_delegation_to_an_agent_not_listed_is_refused(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _exchange_ok(broker, exchange_form(idp.mint("alice")), triage())
    response = _post(
        broker, exchange_form(parent["access_token"], ACCESS_TOKEN), ("chain-2", SECRETS["chain"])
    )
    assert response.status_code == 400
    assert response.json()["error"] == "unauthorized_client"
    assert "may not delegate" in response.json()["error_description"]


def test_delegation_past_the_depth_limit_is_refused(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    token = _exchange_ok(broker, exchange_form(idp.mint("alice")), ("chain-1", SECRETS["chain"]))
    for i in range(2, 5):
        token = _exchange_ok(
            broker,
            exchange_form(token["access_token"], ACCESS_TOKEN),
            (f"chain-{i}", SECRETS["chain"]),
        )
    depth4 = _verify_with_jwks(broker, token["access_token"], TICKETS)
    assert depth4["act"]["act"]["act"]["act"] == {"sub": "chain-1"}
    response = _post(
        broker, exchange_form(token["access_token"], ACCESS_TOKEN), ("chain-5", SECRETS["chain"])
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "depth" in response.json()["error_description"]


def test_broker_token_is_not_a_persons_id_token(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _exchange_ok(broker, exchange_form(idp.mint("alice")), triage())
    response = _post(broker, exchange_form(parent["access_token"], ID_TOKEN), triage())
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "not a person's ID token" in response.json()["error_description"]


# -- escalation attempts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("person", "agent", "scope", "error", "phrase"),
    [
        ("alice", "triage-agent", "tickets:write", "invalid_scope", "the person does not hold it"),
        ("dave", "triage-agent", "repo:read", "invalid_scope", "ceiling excludes it"),
        (
            "dave",
            "triage-agent",
            "tickets:close",
            "invalid_scope",
            "'tickets:close' (approval rule 'close-tickets-consent'); request it with OpenID "
            "CIBA at POST http",
        ),
        ("carol", "triage-agent", "llm:openai:chat", "unauthorized_client", "may not act for"),
        (
            "alice",
            "summariser-agent",
            "tickets:read",
            "unauthorized_client",
            "only tokens delegated",
        ),
        ("alice", "triage-agent", "tickets:*", "invalid_scope", "not a well-formed permission"),
    ],
)
def test_escalation_attempts_are_refused(
    broker: RunningBroker,
    idp: DevIdentityProvider,
    person: str,
    agent: str,
    scope: str,
    error: str,
    phrase: str,
) -> None:
    secret = SECRETS["triage" if agent == "triage-agent" else "summariser"]
    response = _post(broker, exchange_form(idp.mint(person), scope=scope), (agent, secret))
    assert response.status_code == 400, response.text
    assert response.json()["error"] == error
    assert phrase in response.json()["error_description"]
    record = broker.decisions.records[-1]
    assert record["outcome"] == "denied"
    assert record["error"] == error
    assert record["person"] == f"dev/{person}"


def test_a_permission_needing_approval_is_refused_saying_where_to_ask(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    form = exchange_form(idp.mint("dave"), scope="tickets:read tickets:refund")
    response = _post(broker, form, triage())
    assert response.status_code == 400
    assert response.json() == {
        "error": "invalid_scope",
        "error_description": "scope needs approval: 'tickets:refund' (approval rule "
        "'refunds-need-finance'); request it with OpenID CIBA at POST "
        f"{broker.url}/oauth2/bc-authorize",
    }
    record = broker.decisions.records[-1]
    assert (record["outcome"], record["reason"]) == ("denied", "approval_required")
    # Asked for by default (no scope): what needs approval is left out, the rest granted.
    granted = _exchange_ok(broker, exchange_form(idp.mint("dave")), triage())
    assert granted["scope"] == "tickets:read kb:read"


def test_audience_not_allowed_for_agent_is_invalid_target(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    response = _post(
        broker,
        exchange_form(idp.mint("alice"), resource="https://ledger.internal.example"),
        triage(),
    )
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_target"


# -- introspection, metadata, keys -----------------------------------------------------------


def test_introspection_for_resource_servers(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent = _exchange_ok(broker, exchange_form(idp.mint("alice"), audience=TICKETS), triage())
    child = _exchange_ok(
        broker,
        exchange_form(parent["access_token"], ACCESS_TOKEN),
        ("summariser-agent", SECRETS["summariser"]),
    )
    url = f"{broker.url}/oauth2/introspect"
    tickets_api = ("tickets-api", SECRETS["tickets-api"])
    active = httpx.post(url, data={"token": child["access_token"]}, auth=tickets_api).json()
    assert active["active"] is True
    assert active["act"] == {"sub": "summariser-agent", "act": {"sub": "triage-agent"}}
    assert active["sub"] == "dev/alice"
    assert active["client_id"] == "summariser-agent"

    other = httpx.post(
        url, data={"token": child["access_token"]}, auth=("llm-gateway", SECRETS["llm-gateway"])
    ).json()
    assert other == {"active": False}
    garbage = httpx.post(url, data={"token": "not-a-token"}, auth=tickets_api).json()
    assert garbage == {"active": False}
    as_agent = httpx.post(url, data={"token": child["access_token"]}, auth=triage())
    assert as_agent.status_code == 400
    assert as_agent.json()["error"] == "unauthorized_client"
    anonymous = httpx.post(url, data={"token": child["access_token"]})
    assert anonymous.status_code == 401


def test_metadata_and_jwks(broker: RunningBroker) -> None:
    metadata = httpx.get(f"{broker.url}/.well-known/oauth-authorization-server").json()
    assert metadata["issuer"] == broker.url
    assert metadata["token_endpoint"] == broker.token_endpoint
    assert metadata["grant_types_supported"] == [
        "urn:ietf:params:oauth:grant-type:jwt-bearer",
        TOKEN_EXCHANGE,
        "urn:openid:params:grant-type:ciba",
    ]
    # ID-JAG (enterprise-managed authorization): issued by the exchange, redeemed by jwt-bearer.
    assert "urn:ietf:params:oauth:token-type:id-jag" in metadata["token_types_supported"]
    assert metadata["authorization_grant_profiles_supported"] == [
        "urn:ietf:params:oauth:grant-profile:id-jag"
    ]
    # DPoP: asymmetric algorithms only.
    algs = metadata["dpop_signing_alg_values_supported"]
    assert "ES256" in algs and not any(a.startswith("HS") or a == "none" for a in algs)
    assert metadata["backchannel_authentication_endpoint"] == f"{broker.url}/oauth2/bc-authorize"
    assert metadata["backchannel_token_delivery_modes_supported"] == ["poll", "ping"]
    assert "private_key_jwt" in metadata["token_endpoint_auth_methods_supported"]
    jwks = httpx.get(metadata["jwks_uri"]).json()
    assert jwks["keys"] and all("d" not in key for key in jwks["keys"])
    ready = httpx.get(f"{broker.url}/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True


def test_tokens_keep_verifying_across_a_key_rotation(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    before = _exchange_ok(broker, exchange_form(idp.mint("alice")), triage())["access_token"]
    Keyring(
        broker.settings.signing_keys.directory,
        algorithm="ES256",
        clock=broker.services.clock,
        publish_grace_seconds=3600,
    ).rotate()
    time.sleep(1.1)  # running brokers re-read the key directory at most once a second
    after = _exchange_ok(broker, exchange_form(idp.mint("alice")), triage())["access_token"]
    old_kid = jwt.get_unverified_header(before)["kid"]
    new_kid = jwt.get_unverified_header(after)["kid"]
    assert old_kid != new_kid
    published = {k["kid"] for k in httpx.get(f"{broker.url}/.well-known/jwks.json").json()["keys"]}
    assert {old_kid, new_kid} <= published
    assert _verify_with_jwks(broker, before, TICKETS)["sub"] == "dev/alice"
    assert _verify_with_jwks(broker, after, TICKETS)["sub"] == "dev/alice"
    # and the broker itself still accepts the pre-rotation token for re-exchange
    child = _post(
        broker, exchange_form(before, ACCESS_TOKEN), ("summariser-agent", SECRETS["summariser"])
    )
    assert child.status_code == 200, child.text


# -- protocol errors -------------------------------------------------------------------------


def test_protocol_errors_are_rfc6749_json_never_500(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    token = idp.mint("alice")
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"json": exchange_form(token), "auth": triage()}, 415, "invalid_request"),
        (
            {
                "content": b"x" * 2_000_000,
                "auth": triage(),
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            413,
            "invalid_request",
        ),
        (
            {
                "content": b"grant_type=a&grant_type=b",
                "auth": triage(),
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "invalid_request",
        ),
        (
            {
                "content": b"\xff\xfe=%%%",
                "auth": triage(),
                "headers": {"content-type": "application/x-www-form-urlencoded"},
            },
            400,
            "invalid_request",
        ),
        (
            {
                "data": {k: v for k, v in exchange_form(token).items() if k != "grant_type"},
                "auth": triage(),
            },
            400,
            "invalid_request",
        ),
        (
            {"data": exchange_form(token) | {"grant_type": "password"}, "auth": triage()},
            400,
            "unsupported_grant_type",
        ),
        ({"data": exchange_form(token)}, 401, "invalid_client"),
        ({"data": exchange_form(token), "auth": ("triage-agent", "wrong")}, 401, "invalid_client"),
        ({"data": exchange_form(token), "auth": ("nobody", "x")}, 401, "invalid_client"),
        (
            {"data": exchange_form(token), "headers": {"authorization": "Basic !!!"}},
            401,
            "invalid_client",
        ),
        (
            {"data": exchange_form(token) | {"client_secret": "x"}, "auth": triage()},
            401,
            "invalid_client",
        ),
        (
            {"data": exchange_form(token, "urn:example:unknown"), "auth": triage()},
            400,
            "invalid_request",
        ),
        (
            {"data": exchange_form(token) | {"subject_token": ""}, "auth": triage()},
            400,
            "invalid_request",
        ),
        ({"data": exchange_form(token, scope=""), "auth": triage()}, 400, "invalid_scope"),
    ]
    for kwargs, status, error in cases:
        response = httpx.post(broker.token_endpoint, timeout=10, **kwargs)
        assert response.status_code == status, (kwargs.keys(), response.text)
        body = response.json()
        assert body["error"] == error
        assert token not in response.text
        if status == 401:
            assert "www-authenticate" in response.headers


def test_decision_records_never_contain_tokens_or_secrets(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    person_token = idp.mint("alice")
    issued = _exchange_ok(broker, exchange_form(person_token), triage())["access_token"]
    _post(broker, exchange_form(person_token, scope="tickets:write"), triage())
    dump = json.dumps(broker.decisions.records)
    for value in (person_token, issued, *SECRETS.values()):
        assert value not in dump
        assert value.split(".")[-1] not in dump
    granted = [r for r in broker.decisions.records if r["outcome"] == "granted"][-1]
    for key in (
        "person",
        "agent_chain",
        "requested_scopes",
        "granted_scopes",
        "policy_version",
        "reason",
        "jti",
        "request_id",
    ):
        assert key in granted or key == "requested_scopes"
    provenance = granted["provenance"]
    assert (provenance["idp"], provenance["sub"]) == ("dev", "alice")
    assert provenance["token_type"] == "urn:ietf:params:oauth:token-type:id_token"
    assert provenance["groups"] == ["support"] and provenance["auth_time"] is not None


def test_unknown_issuer_and_unexpected_tokens_fail_closed(
    broker: RunningBroker, tmp_path: Path
) -> None:
    with serve_idp() as (stranger, _):
        response = _post(broker, exchange_form(stranger.mint("alice")), triage())
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_grant"
    assert "not a trusted identity provider" in response.json()["error_description"]


def test_error_descriptions_never_echo_long_caller_values(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    pasted = idp.mint("alice")  # a token pasted into the wrong parameter
    for extra in ({"scope": pasted}, {"audience": pasted[:500]}, {"requested_token_type": pasted}):
        response = _post(broker, exchange_form(idp.mint("alice")) | extra, triage())
        assert response.status_code == 400, response.text
        assert len(response.json()["error_description"]) < 300
        assert pasted[:120] not in response.text

"""DPoP (RFC 9449) through every hop, over real HTTP: the token endpoint binds tokens to the
agent's key, a bound parent is re-exchanged only with its key's proof (the child bound to the
sub-agent's key), a bound token unlocks a credential from a real OpenBao only with the agent's
proof made for the gateway, introspection shows ``cnf``, nonces, and proof ``jti``s single use
across two brokers sharing a real Redis. Hostile proofs are refused in the protocol's terms."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from broker.client import (
    AgentClient,
    AsyncAgentClient,
    AsyncGatewayClient,
    BrokerClientError,
    GatewayClient,
)
from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.clock import FrozenClock
from broker.dpop import DPoPKey, access_token_hash
from broker.examples.gateway import GatewayConfig, create_gateway_app
from broker.examples.provider import StandInProvider
from broker.policy import Person
from idp_adapters._loopback import reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ACCESS_TOKEN,
    TICKETS,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    oidc_provider_config,
    run_broker,
    serve_idp,
)
from tests.support.servers import OpenBaoServer, run_openbao, run_redis

SECRETS = {name: generate_client_secret() for name in ("bound", "sub", "gw", "nourl")}
GATEWAY_SOCKET = reserve_loopback_socket()
"""The example gateway's address, reserved before the broker starts: its registered url."""
GATEWAY_URL = f"http://127.0.0.1:{GATEWAY_SOCKET.getsockname()[1]}/v1"
CANARY = "sk-dpop-" + secrets.token_hex(12)


def _basic(name: str) -> dict[str, str]:
    return {
        "method": "client_secret_basic",
        "secret_hash": hash_client_secret(SECRETS[name], method="sha256"),
    }


POLICY_EXTRA: dict[str, Any] = {
    "agents": {
        "bound-agent": {
            "authentication": _basic("bound"),
            "dpop": "required",
            "ceiling": ["tickets:read", "kb:read", "llm:openai:chat"],
            "default_scopes": ["tickets:read"],
            "audiences": [TICKETS, "llm-gateway"],
            "act_for": ["group:dev/support"],
            "may_delegate_to": ["bound-sub"],
        },
        "bound-sub": {
            "authentication": _basic("sub"),
            "ceiling": ["tickets:read", "llm:openai:chat"],
            "audiences": [TICKETS, "llm-gateway"],
            "act_for": ["group:dev/support"],
            "accepts_person_tokens": False,
        },
    },
    "gateways": {
        "dpop-gateway": {
            "authentication": _basic("gw"),
            "audiences": ["llm-gateway"],
            "credentials": ["openai-api-key"],
            "url": GATEWAY_URL,
        },
        "nourl-gateway": {
            "authentication": _basic("nourl"),
            "audiences": ["llm-gateway"],
            "credentials": ["openai-api-key"],
        },
    },
}



@pytest.fixture(scope="module", autouse=True)
def _release_reserved_socket() -> Iterator[None]:
    """The socket reserved at import is closed when the module ends, served or not."""
    yield
    GATEWAY_SOCKET.close()

@pytest.fixture(scope="module")
def example_secrets() -> Iterator[dict[str, str]]:
    mp = pytest.MonkeyPatch()
    values = example_client_secrets()
    for key, value in values.items():
        mp.setenv(key, value)
    yield values
    mp.undo()


@pytest.fixture(scope="module")
def idp() -> Iterator[DevIdentityProvider]:
    with serve_idp() as (provider, _):
        yield provider


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with run_openbao() as server:
        server.client().secrets.kv.v2.create_or_update_secret("llm/openai", {"api_key": CANARY})
        yield server


@pytest.fixture(scope="module")
def broker(
    tmp_path_factory: pytest.TempPathFactory,
    idp: DevIdentityProvider,
    bao: OpenBaoServer,
    example_secrets: dict[str, str],
) -> Iterator[RunningBroker]:
    mp = pytest.MonkeyPatch()
    mp.setenv("DPOP_TEST_VAULT_TOKEN", bao.root_token)
    backends = [
        {
            "name": "vault",
            "kind": "vault",
            "address": bao.address,
            "auth": {"method": "token", "token_ref": "env:DPOP_TEST_VAULT_TOKEN"},
        }
    ]
    try:
        with run_broker(
            tmp_path_factory.mktemp("dpop"),
            [oidc_provider_config(idp)],
            policy_extra=POLICY_EXTRA,
            secret_backends=backends,
        ) as running:
            yield running
    finally:
        mp.undo()


def _token(
    broker: RunningBroker,
    form: dict[str, str],
    auth: tuple[str, str],
    *,
    proof: str | list[str] | None = None,
) -> httpx.Response:
    headers: list[tuple[str, str]] = []
    for value in [proof] if isinstance(proof, str) else proof or []:
        headers.append(("DPoP", value))
    return httpx.post(broker.token_endpoint, data=form, auth=auth, headers=headers)


def _bound_token(
    broker: RunningBroker, idp: DevIdentityProvider, key: DPoPKey, **form: str
) -> dict[str, Any]:
    response = _token(
        broker,
        exchange_form(idp.mint("alice"), **form),
        ("bound-agent", SECRETS["bound"]),
        proof=key.proof("POST", broker.token_endpoint),
    )
    assert response.status_code == 200, response.text
    return response.json()


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _introspect(broker: RunningBroker, secrets_: dict[str, str], token: str) -> dict[str, Any]:
    response = httpx.post(
        f"{broker.url}/oauth2/introspect",
        data={"token": token},
        auth=("tickets-api", secrets_["TICKETS_API_SECRET"]),
    )
    assert response.status_code == 200, response.text
    return response.json()


def _denials(broker: RunningBroker, reason: str) -> int:
    return sum(1 for r in broker.decisions.records if r.get("reason") == reason)


# -- the token endpoint -----------------------------------------------------------------------


def test_bearer_stays_the_default_and_a_proof_binds_the_token(
    broker: RunningBroker, idp: DevIdentityProvider, example_secrets: dict[str, str]
) -> None:
    triage = ("triage-agent", example_secrets["TRIAGE_AGENT_SECRET"])
    bearer = _token(broker, exchange_form(idp.mint("alice"), audience=TICKETS), triage)
    assert bearer.status_code == 200 and bearer.json()["token_type"] == "Bearer"
    assert "cnf" not in _claims(bearer.json()["access_token"])

    key = DPoPKey()
    bound = _token(
        broker,
        exchange_form(idp.mint("alice"), audience=TICKETS),
        triage,
        proof=key.proof("POST", broker.token_endpoint),
    )
    assert bound.status_code == 200, bound.text
    body = bound.json()
    assert body["token_type"] == "DPoP"
    assert _claims(body["access_token"])["cnf"] == {"jkt": key.jkt}
    # Introspection tells a resource server the binding (RFC 9449 §6.2).
    seen = _introspect(broker, example_secrets, body["access_token"])
    assert seen["active"] is True and seen["token_type"] == "DPoP"
    assert seen["cnf"] == {"jkt": key.jkt}
    assert "cnf" not in _introspect(broker, example_secrets, bearer.json()["access_token"])


def test_an_agent_the_policy_binds_gets_nothing_without_a_proof(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    before = _denials(broker, "dpop_required")
    refused = _token(broker, exchange_form(idp.mint("alice")), ("bound-agent", SECRETS["bound"]))
    assert refused.status_code == 400
    assert refused.json()["error"] == "invalid_dpop_proof"
    assert "bound-agent" in refused.json()["error_description"]
    assert "access_token" not in refused.json()
    assert _denials(broker, "dpop_required") == before + 1
    key = DPoPKey()
    assert _claims(_bound_token(broker, idp, key)["access_token"])["cnf"]["jkt"] == key.jkt


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _raw_jws(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(sign(signing_input.encode()))}"


def _hostile_proofs(url: str) -> dict[str, Callable[[DPoPKey], str | list[str]]]:
    now = time.time()
    private = ec.generate_private_key(ec.SECP256R1())
    private_jwk = jwt.algorithms.ECAlgorithm.to_jwk(private, as_dict=True)  # carries "d"
    claims = {"jti": secrets.token_urlsafe(12), "htm": "POST", "htu": url, "iat": int(now)}
    public = DPoPKey().public_jwk

    def replayed(key: DPoPKey) -> list[str]:
        proof = key.proof("POST", url)
        assert _post_once(url, proof) == 200  # the first use is accepted...
        return [proof]  # ...and the same proof again is a replay

    return {
        "wrong htm": lambda key: key.proof("GET", url),
        "wrong htu": lambda key: key.proof("POST", url.replace("/oauth2/token", "/oauth2/other")),
        "other host": lambda key: key.proof("POST", "https://attacker.example/oauth2/token"),
        "stale iat": lambda key: key.proof("POST", url, issued_at=now - 600),
        "future iat": lambda key: key.proof("POST", url, issued_at=now + 600),
        "replayed jti": replayed,
        "alg none": lambda key: _raw_jws(  # "header.payload." with no signature
            {"typ": "dpop+jwt", "alg": "none", "jwk": key.public_jwk}, claims, lambda _: b""
        ),
        "HMAC alg": lambda key: jwt.encode(
            claims,
            "a-shared-secret-of-32-bytes-long!",
            algorithm="HS256",
            headers={"typ": "dpop+jwt", "jwk": {"kty": "oct", "k": _b64(b"a-shared-secret")}},
        ),
        "private key in jwk": lambda key: jwt.encode(
            claims, private, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": private_jwk}
        ),
        "wrong typ": lambda key: jwt.encode(
            claims,
            private,
            algorithm="ES256",
            headers={"typ": "JWT", "jwk": {k: private_jwk[k] for k in ("kty", "crv", "x", "y")}},
        ),
        "signed by another key than its jwk": lambda key: jwt.encode(
            claims, private, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": public}
        ),
        "ath without a token": lambda key: key.proof("POST", url, access_token="not-presented"),
        "two DPoP headers": lambda key: [key.proof("POST", url), key.proof("POST", url)],
        "not a JWT": lambda key: "not-a-jwt",
    }


EXPECTED_REFUSALS = {
    "wrong htm": "htm does not match",
    "wrong htu": "htu does not match",
    "other host": "htu does not match",
    "stale iat": "older than 60 seconds",
    "future iat": "iat is in the future",
    "replayed jti": "jti has been used before",
    "alg none": "not a well-formed JWT",  # no signature at all
    "HMAC alg": "alg must be one of",
    "private key in jwk": "private key material",
    "wrong typ": "typ must be dpop+jwt",
    "signed by another key than its jwk": "signature is invalid",
    "ath without a token": "carries ath but no access token",
    "two DPoP headers": "more than one DPoP header",
    "not a JWT": "not a well-formed JWT",
}


def _post_once(url: str, proof: str) -> int:
    # A request the proof is valid for: the triage agent's exchange (set by the test).
    return _PROBE["post"](proof)


_PROBE: dict[str, Callable[[str], int]] = {}


@pytest.mark.parametrize("case", list(_hostile_proofs("https://x.test/oauth2/token")))
def test_hostile_proofs_at_the_token_endpoint_are_refused(
    broker: RunningBroker, idp: DevIdentityProvider, example_secrets: dict[str, str], case: str
) -> None:
    triage = ("triage-agent", example_secrets["TRIAGE_AGENT_SECRET"])
    _PROBE["post"] = lambda proof: (
        _token(
            broker, exchange_form(idp.mint("alice"), audience=TICKETS), triage, proof=proof
        ).status_code
    )
    proof = _hostile_proofs(broker.token_endpoint)[case](DPoPKey())
    response = _token(
        broker, exchange_form(idp.mint("alice"), audience=TICKETS), triage, proof=proof
    )
    assert response.status_code == 400, (case, response.text)
    body = response.json()
    assert body["error"] == "invalid_dpop_proof", (case, body)
    assert "access_token" not in body
    assert "eyJ" not in body["error_description"]  # no proof or token echoed
    assert EXPECTED_REFUSALS[case] in body["error_description"], (case, body)


# -- re-exchange ------------------------------------------------------------------------------


def test_a_bound_parent_is_re_exchanged_only_with_its_keys_proof_and_binds_the_child(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    parent_key, sub_key, stranger = DPoPKey(), DPoPKey(), DPoPKey()
    parent = _bound_token(
        broker, idp, parent_key, scope="tickets:read llm:openai:chat", audience=TICKETS
    )
    parent_token = parent["access_token"]
    sub = ("bound-sub", SECRETS["sub"])
    form = {
        **exchange_form(parent_token, ACCESS_TOKEN),
        "scope": "tickets:read",
        "audience": TICKETS,
    }
    url = broker.token_endpoint

    def attempt(subject_proof: str | None, own_proof: str | None) -> httpx.Response:
        data = dict(form)
        if subject_proof is not None:
            data["subject_token_dpop"] = subject_proof
        return _token(broker, data, sub, proof=own_proof)

    # Without the parent's proof, with a stranger's, with the wrong ath, for another URL.
    for subject_proof in (
        None,
        stranger.proof("POST", url, access_token=parent_token),
        parent_key.proof("POST", url, access_token="another-token"),
        parent_key.proof("POST", url),
        parent_key.proof("POST", f"{broker.url}/oauth2/introspect", access_token=parent_token),
    ):
        refused = attempt(subject_proof, sub_key.proof("POST", url))
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"] == "invalid_dpop_proof"
    # A bound chain never turns into a bearer token: the sub-agent must bind the child.
    no_own = attempt(parent_key.proof("POST", url, access_token=parent_token), None)
    assert no_own.status_code == 400 and no_own.json()["error"] == "invalid_dpop_proof"

    child = attempt(
        parent_key.proof("POST", url, access_token=parent_token), sub_key.proof("POST", url)
    )
    assert child.status_code == 200, child.text
    assert child.json()["token_type"] == "DPoP"
    claims = _claims(child.json()["access_token"])
    assert claims["cnf"] == {"jkt": sub_key.jkt} != {"jkt": parent_key.jkt}
    assert claims["act"] == {"sub": "bound-sub", "act": {"sub": "bound-agent"}}


# -- credential fetch -------------------------------------------------------------------------


def _fetch(
    broker: RunningBroker,
    token: str,
    *,
    proof: str | None = None,
    gateway: str = "dpop-gateway",
    secret: str = "gw",
    **form: str,
) -> httpx.Response:
    return httpx.post(
        f"{broker.url}/v1/credentials/openai-api-key",
        data={"token": token, **form},
        auth=(gateway, SECRETS[secret]),
        headers={"DPoP": proof} if proof is not None else {},
    )


def test_a_bound_token_unlocks_a_credential_only_with_the_agents_proof_for_the_gateway(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    key, stranger = DPoPKey(), DPoPKey()
    token = _bound_token(broker, idp, key, scope="llm:openai:chat", audience="llm-gateway")[
        "access_token"
    ]
    call = f"{GATEWAY_URL}/chat/completions"
    hostile = {
        "no proof (a bound token used as a bearer token)": None,
        "proof by another key": stranger.proof("POST", call, access_token=token),
        "proof for another service": key.proof(
            "POST", "https://elsewhere.test/v1/chat", access_token=token
        ),
        "proof for the gateway's sibling path": key.proof(
            "POST", GATEWAY_URL + "0", access_token=token
        ),
        "proof for another method": key.proof("GET", call, access_token=token),
        "proof without ath": key.proof("POST", call),
        "proof for another token": key.proof("POST", call, access_token="other"),
        "stale proof": key.proof("POST", call, access_token=token, issued_at=time.time() - 600),
        "proof for the token endpoint": key.proof(
            "POST", broker.token_endpoint, access_token=token
        ),
    }
    for case, proof in hostile.items():
        refused = _fetch(broker, token, proof=proof)
        assert refused.status_code == 401, (case, refused.text)
        assert refused.json()["error"] == "invalid_dpop_proof", case
        assert refused.headers["WWW-Authenticate"].startswith("DPoP ")
        assert CANARY not in refused.text

    proof = key.proof("POST", call, access_token=token)
    served = _fetch(broker, token, proof=proof)
    assert served.status_code == 200, served.text
    assert served.json()["value"] == CANARY
    replay = _fetch(broker, token, proof=proof)
    assert replay.status_code == 401 and "used before" in replay.json()["error_description"]

    # The method the agent called the gateway with, as the gateway forwards it.
    put = key.proof("PUT", call, access_token=token)
    assert _fetch(broker, token, proof=put, dpop_method="PUT").status_code == 200

    # A gateway with no registered URL cannot check the proof: a bound token unlocks nothing.
    nourl = _fetch(
        broker,
        token,
        proof=key.proof("POST", call, access_token=token),
        gateway="nourl-gateway",
        secret="nourl",
    )
    assert nourl.status_code == 401 and "no registered url" in nourl.json()["error_description"]

    # A bearer token is served as before, with or without a DPoP header.
    bearer = httpx.post(
        broker.token_endpoint,
        data=exchange_form(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"),
        auth=("triage-agent", _example_secret("TRIAGE_AGENT_SECRET")),
    ).json()["access_token"]
    assert _fetch(broker, bearer).json()["value"] == CANARY


def _example_secret(name: str) -> str:
    import os

    return os.environ[name]


# -- nonces and replicas ----------------------------------------------------------------------


def test_server_nonces_are_asked_for_and_accepted(
    tmp_path: Path, idp: DevIdentityProvider, example_secrets: dict[str, str]
) -> None:
    with run_broker(
        tmp_path,
        [oidc_provider_config(idp)],
        dpop={"require_nonce": True},
    ) as running:
        triage = ("triage-agent", example_secrets["TRIAGE_AGENT_SECRET"])
        key = DPoPKey()
        form = exchange_form(idp.mint("alice"), audience=TICKETS)
        first = _token(running, form, triage, proof=key.proof("POST", running.token_endpoint))
        assert first.status_code == 400 and first.json()["error"] == "use_dpop_nonce"
        nonce = first.headers["DPoP-Nonce"]
        forged = _token(
            running, form, triage, proof=key.proof("POST", running.token_endpoint, nonce="1.forged")
        )
        assert forged.json()["error"] == "use_dpop_nonce"
        ok = _token(
            running, form, triage, proof=key.proof("POST", running.token_endpoint, nonce=nonce)
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["token_type"] == "DPoP"
        # The client retries once with the nonce the broker asks for, by itself.
        with AgentClient(
            running.url, "triage-agent", example_secrets["TRIAGE_AGENT_SECRET"], dpop=True
        ) as agent:
            bound = agent.exchange(idp.mint("alice"), audience=TICKETS)
        assert bound.token_type == "DPoP"


def test_a_proof_is_single_use_across_replicas_sharing_redis(
    tmp_path: Path, idp: DevIdentityProvider, example_secrets: dict[str, str]
) -> None:
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(run_redis(tmp_path))
        state = {"kind": "redis", "url": f"redis://127.0.0.1:{redis.port}/0"}
        first = stack.enter_context(
            run_broker(tmp_path / "a", [oidc_provider_config(idp)], state=state)
        )
        second = stack.enter_context(
            run_broker(tmp_path / "b", [oidc_provider_config(idp)], state=state)
        )
        triage = ("triage-agent", example_secrets["TRIAGE_AGENT_SECRET"])
        key = DPoPKey()
        # Both replicas answer for the same issuer URL in production; here each has its own,
        # so the proof names the first one's token endpoint and is replayed to the second
        # with a proof whose htu is the second's: the jti is what the store remembers.
        jti_proof = _proof_with_jti(key, first.token_endpoint, "shared-jti")
        assert (
            _token(
                first, exchange_form(idp.mint("alice"), audience=TICKETS), triage, proof=jti_proof
            ).status_code
            == 200
        )
        replay = _proof_with_jti(key, second.token_endpoint, "shared-jti")
        refused = _token(
            second, exchange_form(idp.mint("alice"), audience=TICKETS), triage, proof=replay
        )
        assert refused.status_code == 400
        assert "used before" in refused.json()["error_description"]
        fresh = _token(
            second,
            exchange_form(idp.mint("alice"), audience=TICKETS),
            triage,
            proof=key.proof("POST", second.token_endpoint),
        )
        assert fresh.status_code == 200


def _proof_with_jti(key: DPoPKey, url: str, jti: str) -> str:
    """A proof with a chosen jti, signed by `key` (as an attacker replaying it would send)."""
    private = key._private_key  # the test owns the key
    return jwt.encode(
        {"jti": jti, "htm": "POST", "htu": url, "iat": int(time.time())},
        private,
        algorithm="ES256",
        headers={"typ": "dpop+jwt", "jwk": key.public_jwk},
    )


def test_ath_is_the_base64url_sha256_of_the_token() -> None:
    token = "eyJ.example.token"
    expected = base64.urlsafe_b64encode(hashlib.sha256(token.encode()).digest()).rstrip(b"=")
    assert access_token_hash(token) == expected.decode()
    assert hmac.compare_digest(access_token_hash(token), expected.decode())


# -- the Python clients and the example gateway ----------------------------------------------


def test_clients_bind_delegate_and_call_the_example_gateway_with_proofs(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    """The agent client keeps a key and binds its tokens; the sub-agent re-exchanges with the
    parent's delegation proof; each calls the example gateway with ``Authorization: DPoP`` and
    a proof for the call; the gateway forwards it and the broker checks it for the gateway."""
    provider = StandInProvider(CANARY)
    with contextlib.ExitStack() as stack:
        provider_server = stack.enter_context(serve_in_thread(provider.asgi_app()))
        gateway = stack.enter_context(GatewayClient(broker.url, "dpop-gateway", SECRETS["gw"]))
        upstream = stack.enter_context(httpx.Client(base_url=provider_server.url, timeout=10))
        app = create_gateway_app(GatewayConfig(), gateway, upstream)
        stack.enter_context(serve_in_thread(app, sock=GATEWAY_SOCKET))
        agent = stack.enter_context(
            AgentClient(broker.url, "bound-agent", SECRETS["bound"], dpop=True)
        )
        sub = stack.enter_context(AgentClient(broker.url, "bound-sub", SECRETS["sub"], dpop=True))
        call = f"{GATEWAY_URL}/chat/completions"
        body = {"messages": [{"role": "user", "content": "hello"}]}

        token = agent.exchange(idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway")
        assert token.token_type == "DPoP"
        assert _claims(token.access_token)["cnf"] == {"jkt": agent.dpop_key.jkt}
        ok = httpx.post(call, json=body, headers=agent.headers_for("POST", call, token))
        assert ok.status_code == 200, ok.text
        assert provider.stats().accepted >= 1

        # The same token as a bearer token (stolen, say): the broker wants the agent's proof.
        stolen = httpx.post(
            call, json=body, headers={"Authorization": f"Bearer {token.access_token}"}
        )
        assert stolen.status_code == 401
        assert stolen.json()["error"] == "invalid_dpop_proof"
        # A proof replayed by whoever captured the call.
        captured = agent.headers_for("POST", call, token)
        assert httpx.post(call, json=body, headers=captured).status_code == 200
        assert httpx.post(call, json=body, headers=captured).status_code == 401
        # Another key's proof for the same token.
        thief = DPoPKey()
        forged = {
            "Authorization": f"DPoP {token.access_token}",
            "DPoP": thief.proof("POST", call, access_token=token.access_token),
        }
        assert httpx.post(call, json=body, headers=forged).status_code == 401

        child = sub.delegate(
            token, scope="llm:openai:chat", subject_proof=agent.delegation_proof(token)
        )
        assert child.token_type == "DPoP"
        assert _claims(child.access_token)["cnf"] == {"jkt": sub.dpop_key.jkt}
        via_sub = httpx.post(call, json=body, headers=sub.headers_for("POST", call, child))
        assert via_sub.status_code == 200, via_sub.text
        # The parent's key cannot present the child token.
        parent_presenting = httpx.post(
            call, json=body, headers=agent.headers_for("POST", call, child)
        )
        assert parent_presenting.status_code == 401


# -- approvals (OpenID CIBA) --------------------------------------------------------------------

CIBA = "urn:openid:params:grant-type:ciba"
ALICE = Person("dev", "alice", frozenset({"support"}))


def test_an_approval_asked_for_with_a_bound_parent_yields_only_a_bound_token(
    tmp_path: Path, idp: DevIdentityProvider, example_secrets: dict[str, str]
) -> None:
    clock = FrozenClock(time.time())
    extra = {
        **POLICY_EXTRA,
        "approvals": {
            "sub-llm-consent": {
                "permissions": ["llm:openai:chat"],
                "agents": ["bound-sub"],
                "approvers": ["person"],
            }
        },
    }
    with run_broker(
        tmp_path, [oidc_provider_config(idp)], policy_extra=extra, clock=clock
    ) as running:
        parent_key, sub_key = DPoPKey(), DPoPKey()
        now = clock.now()
        parent = _token(
            running,
            exchange_form(
                idp.mint("alice"), scope="tickets:read llm:openai:chat", audience=TICKETS
            ),
            ("bound-agent", SECRETS["bound"]),
            proof=parent_key.proof("POST", running.token_endpoint, issued_at=now),
        ).json()["access_token"]
        bc_authorize = f"{running.url}/oauth2/bc-authorize"
        form = {
            "subject_token": parent,
            "subject_token_type": ACCESS_TOKEN,
            "scope": "llm:openai:chat",
            "audience": TICKETS,
        }
        sub = ("bound-sub", SECRETS["sub"])
        # The parent's proof must be made for this endpoint.
        for proof in (
            None,
            parent_key.proof("POST", running.token_endpoint, access_token=parent, issued_at=now),
        ):
            data = dict(form) if proof is None else {**form, "subject_token_dpop": proof}
            refused = httpx.post(bc_authorize, data=data, auth=sub)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"] == "invalid_dpop_proof"
        asked = httpx.post(
            bc_authorize,
            data={
                **form,
                "subject_token_dpop": parent_key.proof(
                    "POST", bc_authorize, access_token=parent, issued_at=now
                ),
            },
            auth=sub,
        )
        assert asked.status_code == 200, asked.text
        auth_req_id = asked.json()["auth_req_id"]
        [waiting] = asyncio.run(running.services.approvals.pending_for(ALICE))
        asyncio.run(
            running.services.approvals.decide(
                waiting.id, ALICE, approve=True, comment=None, via="api"
            )
        )
        clock.advance(asked.json()["interval"] + 1)
        poll = {"grant_type": CIBA, "auth_req_id": auth_req_id}
        unbound = httpx.post(running.token_endpoint, data=poll, auth=sub)
        assert unbound.status_code == 400 and unbound.json()["error"] == "invalid_dpop_proof"
        clock.advance(asked.json()["interval"] + 1)
        bound = httpx.post(
            running.token_endpoint,
            data=poll,
            auth=sub,
            headers={"DPoP": sub_key.proof("POST", running.token_endpoint, issued_at=clock.now())},
        )
        assert bound.status_code == 200, bound.text
        assert bound.json()["token_type"] == "DPoP"
        claims = _claims(bound.json()["access_token"])
        assert claims["cnf"] == {"jkt": sub_key.jkt}
        assert claims["approval"]["permissions"] == ["llm:openai:chat"]


def test_the_async_clients_bind_and_forward_proofs_too(
    broker: RunningBroker, idp: DevIdentityProvider
) -> None:
    async def run() -> tuple[str, str, str]:
        async with (
            AsyncAgentClient(broker.url, "bound-agent", SECRETS["bound"], dpop=True) as agent,
            AsyncGatewayClient(broker.url, "dpop-gateway", SECRETS["gw"]) as gateway,
        ):
            token = await agent.exchange(
                idp.mint("alice"), scope="llm:openai:chat", audience="llm-gateway"
            )
            call = f"{GATEWAY_URL}/chat/completions"
            proof = agent.headers_for("POST", call, token)["DPoP"]
            served = await gateway.fetch("openai-api-key", token, dpop_proof=proof)
            try:
                await gateway.fetch("openai-api-key", token)
            except BrokerClientError as refused:
                error = refused.error
            else:
                error = "served"
            assert agent.dpop_key is not None
            return token.token_type, served.value or "", error

    token_type, value, refused = asyncio.run(run())
    assert token_type == "DPoP" and value == CANARY and refused == "invalid_dpop_proof"

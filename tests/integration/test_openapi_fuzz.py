"""Property-based fuzzing of every operation in `GET /openapi.json` (schemathesis), against the
real broker over loopback HTTP: the example policy, a test OIDC issuer, the development file
secret backend.

Twice: unauthenticated (and with generated `Authorization` headers), and authenticated as the
policy's agent, gateway and admin clients. Where the generated body carries a token, it is kept
as generated, or replaced by a real one (a person's ID token from the issuer, an agent token from
a real exchange) so requests reach the grant, credential and revocation logic, or by a forged one
(plausible claims with a few broken ones, any JSON, signed by the IdP, by the broker, or not at
all). Whatever is sent, the broker answers without a 5xx, every error is an RFC 6749 §5.2 body,
and every answer conforms to the published description (schemathesis's own checks).

`BROKER_FUZZ_EXAMPLES` and `BROKER_FUZZ_SEED` widen or vary a run (defaults keep `make test` fast
and repeatable).
"""

from __future__ import annotations

import base64
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import jwt  # decoding only: the forged tokens are built by tests.support.jose
import pytest
import schemathesis
from hypothesis import strategies as st

from broker.client_auth import CLIENT_ASSERTION_TYPE
from broker.openapi import OPENAPI_PATH, openapi_document
from idp_adapters.dev import DevIdentityProvider
from tests.support.harness import (
    ID_TOKEN,
    RunningBroker,
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)
from tests.support.jose import compact

MAX_EXAMPLES = int(os.environ.get("BROKER_FUZZ_EXAMPLES", "60"))
SEED = int(os.environ.get("BROKER_FUZZ_SEED", "9"))
ERROR_CODE = re.compile(r"[\x20-\x21\x23-\x5B\x5D-\x7E]+")  # RFC 6749 §5.2 `error` characters
CREDENTIAL = "openai-api-key"
PLACEHOLDER = "http://broker.invalid"  # the servers entry; calls go to the running broker


def _config(*, security_parameters: bool) -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "generation": {
                "mode": "all",  # valid and invalid requests
                "max-examples": MAX_EXAMPLES,
                "with-security-parameters": security_parameters,
                # RFC 6749 §3.1: unrecognised parameters are ignored, so an undeclared one is
                # not "invalid data" the broker must refuse.
                "allow-extra-parameters": False,
                "database": "none",  # the same seed gives the same run; nothing kept between runs
            },
            "phases": {"stateful": {"enabled": False}},
            # A schema-valid OAuth request is still refused without a real grant: 400 is right.
            "checks": {"positive_data_acceptance": {"enabled": False}},
        }
    )


@dataclass(frozen=True)
class Stack:
    broker: RunningBroker
    idp: DevIdentityProvider
    secrets: dict[str, str]

    def basic(self, client: str, variable: str) -> dict[str, str]:
        # RFC 6749 §2.3.1: each part form-urlencoded, then Basic.
        pair = f"{quote(client, safe='')}:{quote(self.secrets[variable], safe='')}"
        return {"Authorization": "Basic " + base64.b64encode(pair.encode()).decode()}

    def agent_token(self) -> str:
        """A real agent token for the llm-gateway, from a real exchange."""
        response = httpx.post(
            self.broker.token_endpoint,
            data=exchange_form(
                self.idp.mint("alice"), ID_TOKEN, scope="llm:openai:chat", audience="llm-gateway"
            ),
            auth=("triage-agent", self.secrets["TRIAGE_AGENT_SECRET"]),
            timeout=10,
        )
        assert response.status_code == 200, response.text
        return response.json()["access_token"]

    def sign(self, signer: str, claims: dict[str, Any], header: dict[str, Any]) -> str:
        """Sign whatever JSON `claims` and `header` hold (PyJWT's encoder would refuse some)
        with the key of `signer`: ``idp``, ``broker``, or ``none`` (a garbage signature)."""
        if signer == "idp":
            kid, key = self.idp.signing_key
            alg, typ = self.idp.algorithm, "JWT"
        elif signer == "broker":
            active = self.broker.services.keyring.active
            kid, key, alg, typ = active.kid, active.private_key, active.algorithm, "at+jwt"
        else:
            kid, key, alg, typ = "forged", None, "RS256", "JWT"
        return compact({"alg": alg, "kid": kid, "typ": typ, **header}, claims, key, alg)


@contextmanager
def _example_stack(tmp_path: Path, **overrides: Any) -> Iterator[Stack]:
    """The example policy's broker (its clients' secrets in the environment), a test OIDC
    issuer, and the development file backend holding the example credentials."""
    secrets = example_client_secrets()
    secrets_file = tmp_path / "dev-secrets.yaml"
    write_provider_keys(secrets_file, "sk-fuzz-provider-key")
    with run_example_stack(tmp_path, secrets, secrets_file, **overrides) as (broker, idp):
        served = httpx.get(f"{broker.url}{OPENAPI_PATH}", timeout=10).json()
        assert served == openapi_document(broker.url)  # what is fuzzed is what is served
        yield Stack(broker, idp, secrets)


@pytest.fixture(scope="module")
def open_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """For callers without credentials: the failed-authentication throttle as shipped."""
    with _example_stack(tmp_path_factory.mktemp("fuzz-open")) as stack:
        yield stack


@pytest.fixture(scope="module")
def client_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """For registered clients: a throttle wide enough that the clients' own fuzzed failures
    (a mismatched `client_id`, a bad assertion) do not lock them out of the rest of the run."""
    throttle = {"failures_per_client_and_source": 100_000, "failures_per_source": 100_000}
    with _example_stack(
        tmp_path_factory.mktemp("fuzz-clients"), client_authentication=throttle
    ) as stack:
        yield stack


# Built from the same table the broker serves; `_example_stack` checks the served document is
# this one. Loaded at collection time: one test per operation; each call goes to the running
# broker (`base_url`).
unauthenticated = schemathesis.openapi.from_dict(
    openapi_document(PLACEHOLDER), config=_config(security_parameters=True)
)
authenticated = schemathesis.openapi.from_dict(
    openapi_document(PLACEHOLDER), config=_config(security_parameters=False)
)


def assert_protocol_answer(response: Any) -> None:
    """No 5xx; an error is an RFC 6749 §5.2 JSON body (`error`, optional description and uri)."""
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.status_code < 400:
        return
    content_type = response.headers.get("content-type", [""])  # schemathesis: lists of values
    assert content_type[0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and ERROR_CODE.fullmatch(body["error"]), body
    for member in ("error_description", "error_uri"):
        assert isinstance(body.get(member, ""), str), body


# -- tokens: as generated, real, or forged -----------------------------------------------------
# "real" reaches past verification into the grant, credential and revocation logic; "forged"
# keeps a plausible token and breaks a few claims or header members (any JSON, NaN and huge
# numbers included), signed by the issuer it names (the IdP, the broker) or not signed at all.
Mode = str
MODES = st.sampled_from(["generated", "real", "forged"])
_CLAIMS = (
    "iss", "sub", "aud", "exp", "iat", "nbf", "auth_time", "jti", "client_id", "scope", "act",
    "provenance", "parent_jti", "lineage", "policy_version", "groups", "azp", "session_exp",
)  # fmt: skip
_HEADER_MEMBERS = ("kid", "typ", "crit", "jku", "x5u", "x5c", "cty", "zip", "jwk")
_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=10**300, max_value=10**310),  # beyond any date or float
    st.floats(),  # NaN and infinities: JSON parsers accept them
    st.text(max_size=12),
)
_JSON = st.recursive(
    _LEAF,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_BROKEN = st.dictionaries(st.sampled_from(_CLAIMS), _JSON, max_size=3)
_BROKEN_HEADER = st.dictionaries(st.sampled_from(_HEADER_MEMBERS), _JSON, max_size=2)


def _forged(data: st.DataObject, stack: Stack, base: dict[str, Any], signer: str) -> str:
    claims = {**base, **data.draw(_BROKEN, label="claims")}
    return stack.sign(signer, claims, data.draw(_BROKEN_HEADER, label="header"))


def _substitute(
    case: Any,
    mode: Mode,
    data: st.DataObject,
    stack: Stack,
    agent_token: str,
    *,
    authenticated: bool,
) -> dict[str, str] | None:
    """Put real or forged tokens where the generated body has one; a forged client assertion
    replaces HTTP Basic (the caller then authenticates with it). Returns replacement headers."""
    if mode == "generated":
        return None
    if "name" in (case.path_parameters or {}):
        case.path_parameters["name"] = CREDENTIAL
    if not isinstance(case.body, dict):
        return None
    agent_claims = jwt.decode(agent_token, options={"verify_signature": False})
    person_claims = stack.idp.claims_for("alice")
    if "subject_token" in case.body:
        if mode == "real":
            case.body["subject_token"] = stack.idp.mint("alice")
        else:
            signer = data.draw(st.sampled_from(["idp", "broker", "none"]), label="signer")
            base = agent_claims if signer == "broker" else person_claims
            case.body["subject_token"] = _forged(data, stack, base, signer)
    if "token" in case.body:
        if mode == "real":
            # A token of its own for a revocation that can succeed: it gets revoked.
            revoking = authenticated and case.path == "/oauth2/revoke"
            case.body["token"] = stack.agent_token() if revoking else agent_token
        else:
            signer = data.draw(st.sampled_from(["broker", "none"]), label="signer")
            case.body["token"] = _forged(data, stack, agent_claims, signer)
    if "actor_token" in case.body and mode == "forged":
        case.body["actor_token"] = _forged(data, stack, person_claims, "none")
    if "client_assertion" in case.body and mode == "forged":
        now = int(time.time())
        assertion = {
            "iss": "triage-agent",
            "sub": "triage-agent",
            "aud": stack.broker.token_endpoint,
            "iat": now,
            "exp": now + 60,
            "jti": base64.b32encode(os.urandom(10)).decode(),
        }
        case.body["client_assertion"] = _forged(data, stack, assertion, "none")
        case.body["client_assertion_type"] = CLIENT_ASSERTION_TYPE
        return {}
    return None


@unauthenticated.parametrize()
@unauthenticated.given(mode=MODES, data=st.data())
def test_fuzzed_requests_without_credentials_get_protocol_answers(
    case: Any, mode: Mode, data: st.DataObject, open_stack: Stack, open_agent_token: str
) -> None:
    _substitute(case, mode, data, open_stack, open_agent_token, authenticated=False)
    response = case.call_and_validate(base_url=open_stack.broker.url)
    assert_protocol_answer(response)


# Who calls each family of operations, as which client of the example policy.
_CALLERS = (
    ("/oauth2/introspect", "llm-gateway", "LLM_GATEWAY_SECRET"),
    ("/oauth2/", "triage-agent", "TRIAGE_AGENT_SECRET"),
    ("/v1/credentials/", "llm-gateway", "LLM_GATEWAY_SECRET"),
    ("/v1/admin/", "rotation-hook", "ROTATION_HOOK_SECRET"),
)


@pytest.fixture(scope="module")
def open_agent_token(open_stack: Stack) -> str:
    return open_stack.agent_token()  # before any fuzzing: the throttle is as shipped here


@pytest.fixture(scope="module")
def client_agent_token(client_stack: Stack) -> str:
    return client_stack.agent_token()


@authenticated.parametrize()
@authenticated.given(mode=MODES, data=st.data())
def test_fuzzed_requests_of_registered_clients_get_protocol_answers(
    case: Any, mode: Mode, data: st.DataObject, client_stack: Stack, client_agent_token: str
) -> None:
    headers: dict[str, str] = {}
    for prefix, client, variable in _CALLERS:
        if case.path.startswith(prefix):
            headers = client_stack.basic(client, variable)
            break
    replaced = _substitute(case, mode, data, client_stack, client_agent_token, authenticated=True)
    response = case.call_and_validate(
        base_url=client_stack.broker.url, headers=headers if replaced is None else replaced
    )
    assert_protocol_answer(response)


# -- found by the fuzzing above ----------------------------------------------------------------
# A token signed with the broker's own key whose `provenance` claim was not a JSON object (a list,
# a string, a number, null) made every endpoint reading broker tokens answer 500 (AttributeError
# escaping the verifier). Every claim of any JSON type is now a refused token, never a 5xx.
_MALFORMED_CLAIMS = [
    {"provenance": []},
    {"provenance": "dev/alice"},
    {"provenance": 5},
    {"provenance": None},
    {"provenance": {"idp": [], "sub": {}, "token_type": [], "session_exp": []}},
    {"act": []},
    {"act": {"sub": "triage-agent", "act": "x"}},
    {"lineage": {}, "parent_jti": []},
    {"aud": {}},
    {"scope": []},
    {"iat": "now"},
    {"client_id": []},
    # Identifiers that are not strings were turned into strings ("{}") rather than refused.
    {"jti": {}},
    {"jti": 5},
    {"jti": ""},
    {"client_id": 7},
    {"policy_version": []},
    {"parent_jti": 7},
]


@pytest.mark.parametrize("broken", _MALFORMED_CLAIMS, ids=lambda b: ",".join(f"{k}" for k in b))
def test_malformed_claims_of_a_broker_signed_token_are_refused_not_a_server_error(
    broken: dict[str, Any], client_stack: Stack, client_agent_token: str
) -> None:
    stack = client_stack
    claims = {**jwt.decode(client_agent_token, options={"verify_signature": False}), **broken}
    token = stack.sign("broker", claims, {})
    url = stack.broker.url

    def post(path: str, variable: str, client: str, data: dict[str, str]) -> httpx.Response:
        return httpx.post(f"{url}{path}", data=data, headers=stack.basic(client, variable))

    introspected = post("/oauth2/introspect", "LLM_GATEWAY_SECRET", "llm-gateway", {"token": token})
    assert (introspected.status_code, introspected.json()) == (200, {"active": False})
    fetched = post(
        f"/v1/credentials/{CREDENTIAL}", "LLM_GATEWAY_SECRET", "llm-gateway", {"token": token}
    )
    assert (fetched.status_code, fetched.json()["error"]) == (401, "invalid_token")
    revoked = post("/oauth2/revoke", "TRIAGE_AGENT_SECRET", "triage-agent", {"token": token})
    assert (revoked.status_code, revoked.json()) == (200, {})
    exchanged = post(
        "/oauth2/token",
        "TRIAGE_AGENT_SECRET",
        "triage-agent",
        exchange_form(
            token, "urn:ietf:params:oauth:token-type:access_token", audience="llm-gateway"
        ),
    )
    assert (exchanged.status_code, exchanged.json()["error"]) == (400, "invalid_grant")

"""Client authentication cannot be used to probe or to starve the broker, and a client may hold
two authentication methods at once (issue 9, sections 4 and 7).

Timing is never measured here: that equal work is done is shown structurally, by counting the
secret checks an injected `SecretVerifier` is asked for and comparing their cost parameters.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from broker.client_auth import (
    CLIENT_ASSERTION_TYPE,
    ClientAuthenticator,
    FailedAuthThrottle,
    source_address,
)
from broker.client_secrets import (
    BoundedSecretVerifier,
    SecretVerifierBusy,
    hash_client_secret,
    verify_client_secret,
)
from broker.clock import FrozenClock
from broker.errors import InvalidClient, OAuthError, TemporarilyUnavailable, TooManyRequests
from broker.policy import load_policy
from broker.policy.model import Agent
from broker.state import InMemoryStateStore
from tests.support.jose import compact, public_jwk

pytestmark = pytest.mark.anyio

SECRET = "correct horse battery staple"
FAST_SECRET = "f" * 40
ISSUER = "https://broker.example"
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SCRYPT_HASH = hash_client_secret(SECRET)
SHA_HASH = hash_client_secret(FAST_SECRET, method="sha256")


def _basic(client_id: str, secret: str) -> dict[str, str]:
    raw = f"{client_id}:{secret}".encode()
    return {"authorization": "Basic " + base64.b64encode(raw).decode()}


def _assertion(client_id: str, key: rsa.RSAPrivateKey, kid: str = "k1", **claims: Any) -> dict:
    now = 1_800_000_000
    payload = {
        "iss": client_id,
        "sub": client_id,
        "aud": ISSUER,
        "iat": now,
        "exp": now + 60,
        "jti": uuid.uuid4().hex,
        **claims,
    }
    token = compact({"alg": "RS256", "typ": "JWT", "kid": kid}, payload, key)
    return {"client_assertion_type": CLIENT_ASSERTION_TYPE, "client_assertion": token}


def _jwt_method() -> dict:
    return {
        "method": "private_key_jwt",
        "jwks": {"keys": [public_jwk(KEY, "k1")]},
        "algorithms": ["RS256"],
    }


AGENTS: dict[str, Any] = {
    "scrypt-agent": {
        "authentication": {"method": "client_secret_basic", "secret_hash": SCRYPT_HASH}
    },
    "sha-agent": {"authentication": {"method": "client_secret_basic", "secret_hash": SHA_HASH}},
    "ref-agent": {
        "authentication": {"method": "client_secret_basic", "secret_ref": "env:HARDENING_SECRET"}
    },
    "jwt-agent": {"authentication": _jwt_method()},
    "both-agent": {
        "authentication": [
            {"method": "client_secret_basic", "secret_hash": SHA_HASH},
            _jwt_method(),
        ]
    },
}


class CountingVerifier:
    """A `SecretVerifier` that does the real check and records what it was asked to check."""

    def __init__(self) -> None:
        self.checked: list[str] = []

    async def verify(self, secret: str, stored: str, *, source: str = "") -> bool:
        self.checked.append(stored)
        return verify_client_secret(secret, stored)

    def costs(self) -> list[tuple[str, ...]]:
        """The cost-bearing part of every stored value checked: kind, n, r, p, digest size."""
        out = []
        for stored in self.checked:
            parts = stored.split("$")
            if parts[0] == "scrypt":
                digest = base64.urlsafe_b64decode(parts[5] + "=" * (-len(parts[5]) % 4))
                out.append((*parts[:4], str(len(digest))))
            else:
                out.append((parts[0],))
        return out


def _authenticator(
    tmp_path: Path,
    agents: dict[str, Any] | None = None,
    *,
    verifier: Any = None,
    throttle: FailedAuthThrottle | None = None,
    clock: FrozenClock | None = None,
) -> ClientAuthenticator:
    policy_dir = tmp_path / "policies"
    policy_dir.mkdir(exist_ok=True)
    (policy_dir / "agents.yaml").write_text(yaml.safe_dump({"agents": agents or AGENTS}))
    policy = load_policy(policy_dir).policy
    clock = clock or FrozenClock(start=1_800_000_010.0)
    return ClientAuthenticator(
        policy=lambda: policy,
        replay=InMemoryStateStore(clock),
        clock=clock,
        http=httpx.AsyncClient(),
        assertion_audiences=frozenset({ISSUER}),
        assertion_max_lifetime=300,
        leeway=5,
        secrets_verifier=verifier or CountingVerifier(),
        throttle=throttle,
    )


async def _refusal(
    auth: ClientAuthenticator, headers: dict, form: dict | None = None
) -> OAuthError:
    with pytest.raises(OAuthError) as caught:
        await auth.authenticate(headers, form or {}, source="192.0.2.1")
    return caught.value


def _public(err: OAuthError) -> tuple:
    return (err.status_code, err.to_body(), err.headers)


# -- equal work and equal answers --------------------------------------------------------------


async def test_unknown_id_does_the_same_scrypt_work_as_a_wrong_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARDENING_SECRET", "r" * 40)
    verifier = CountingVerifier()
    auth = _authenticator(tmp_path, verifier=verifier)
    real = CountingVerifier()
    real.checked.append(SCRYPT_HASH)

    wrong = await _refusal(auth, _basic("scrypt-agent", "wrong secret"))
    assert verifier.checked == [SCRYPT_HASH]
    verifier.checked.clear()
    unknown = await _refusal(auth, _basic("no-such-agent", "wrong secret"))
    assert verifier.costs() == real.costs()  # one scrypt check, same n, r, p and digest size
    assert verifier.checked[0] != SCRYPT_HASH  # against a dummy, never a real client's hash
    assert _public(unknown) == _public(wrong)
    assert isinstance(unknown, InvalidClient)

    # A client that exists but has no secret (private_key_jwt only) answers like an unknown id.
    verifier.checked.clear()
    jwt_only = await _refusal(auth, _basic("jwt-agent", "wrong secret"))
    assert verifier.costs() == real.costs()
    assert _public(jwt_only) == _public(wrong)


async def test_fast_clients_beside_scrypt_clients_do_the_same_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sha256 or secret_ref client in a policy with scrypt clients is padded with one
    scrypt-cost check: timing tells no id apart from another, or from an unknown one."""
    monkeypatch.setenv("HARDENING_SECRET", "r" * 40)
    verifier = CountingVerifier()
    auth = _authenticator(tmp_path, verifier=verifier)
    scrypt_cost = ("scrypt", *SCRYPT_HASH.split("$")[1:4], "32")
    for client_id, secret in (("sha-agent", FAST_SECRET), ("ref-agent", "r" * 40)):
        verifier.checked.clear()
        client = await auth.authenticate(_basic(client_id, secret), {}, source="192.0.2.1")
        assert client is not None and client.client_id == client_id
        assert scrypt_cost in verifier.costs()
        verifier.checked.clear()
        await _refusal(auth, _basic(client_id, "wrong"))
        assert scrypt_cost in verifier.costs()


async def test_sha256_only_policy_keeps_unknown_ids_cheap(tmp_path: Path) -> None:
    """The dummy is of the policy's kind: with only sha256 clients, an unknown id costs a
    sha256 check, not scrypt (which would tell unknown ids apart the other way)."""
    verifier = CountingVerifier()
    agents = {"sha-agent": AGENTS["sha-agent"]}
    auth = _authenticator(tmp_path, agents, verifier=verifier)
    await _refusal(auth, _basic("nobody", "wrong"))
    assert verifier.costs() == [("sha256",)]


async def test_unknown_assertion_issuer_answers_like_a_foreign_key(tmp_path: Path) -> None:
    auth = _authenticator(tmp_path)
    known = await _refusal(auth, {}, _assertion("jwt-agent", OTHER_KEY, kid="other"))
    unknown = await _refusal(auth, {}, _assertion("no-such-agent", OTHER_KEY, kid="other"))
    secret_only = await _refusal(auth, {}, _assertion("scrypt-agent", OTHER_KEY, kid="other"))
    assert _public(unknown) == _public(known) == _public(secret_only)
    assert "no-such-agent" not in str(unknown.to_body())


# -- a bounded pool of its own ------------------------------------------------------------------


async def test_bounded_verifier_runs_on_its_own_threads_and_refuses_when_full() -> None:
    release = threading.Event()
    threads: list[str] = []

    def slow_check(secret: str, stored: str) -> bool:
        threads.append(threading.current_thread().name)
        release.wait(10)
        return secret == "ok"

    verifier = BoundedSecretVerifier(workers=1, queue=1, check=slow_check)
    try:
        first = asyncio.ensure_future(verifier.verify("ok", "scrypt$x"))
        second = asyncio.ensure_future(verifier.verify("no", "scrypt$x"))
        await asyncio.sleep(0.05)
        with pytest.raises(SecretVerifierBusy):
            await verifier.verify("ok", "scrypt$x")
        release.set()
        assert await first and not await second
        assert threads and all(name.startswith("secret-hash") for name in threads)
        assert verifier.in_flight == 0
        assert await verifier.verify("ok", "scrypt$x")  # room again
    finally:
        release.set()
        verifier.close()


async def test_waiting_checks_are_served_round_robin_by_source() -> None:
    """One source's backlog of wrong secrets delays another source's check by one turn, not by
    the whole backlog (the issue: a legitimate client's exchange went from 61 ms to 1.5 s)."""
    gate = threading.Event()
    order: list[str] = []

    def check(secret: str, stored: str) -> bool:
        order.append(secret)
        if secret == "block":
            gate.wait(10)
        return False

    verifier = BoundedSecretVerifier(workers=1, queue=16, check=check)
    try:
        attacker = [asyncio.ensure_future(verifier.verify("block", "scrypt$x", source="a"))]
        await asyncio.sleep(0.05)  # the only thread is busy
        attacker += [
            asyncio.ensure_future(verifier.verify(f"a{i}", "scrypt$x", source="a"))
            for i in range(1, 6)
        ]
        legit = asyncio.ensure_future(verifier.verify("legit", "scrypt$x", source="b"))
        await asyncio.sleep(0.01)
        assert verifier.in_flight == 7
        gate.set()
        await asyncio.gather(*attacker, legit)
        assert order == ["block", "a1", "legit", "a2", "a3", "a4", "a5"]
        assert verifier.in_flight == 0
    finally:
        gate.set()
        verifier.close()


async def test_a_cancelled_waiter_gives_its_place_back() -> None:
    gate = threading.Event()

    def check(secret: str, stored: str) -> bool:
        gate.wait(10)
        return secret == "ok"

    verifier = BoundedSecretVerifier(workers=1, queue=1, check=check)
    try:
        running = asyncio.ensure_future(verifier.verify("ok", "scrypt$x", source="a"))
        await asyncio.sleep(0.05)
        waiting = asyncio.ensure_future(verifier.verify("ok", "scrypt$x", source="b"))
        await asyncio.sleep(0.01)
        waiting.cancel()
        await asyncio.sleep(0.01)
        assert verifier.in_flight == 1
        gate.set()
        assert await running
        assert await verifier.verify("ok", "scrypt$x", source="c")
        assert verifier.in_flight == 0
    finally:
        gate.set()
        verifier.close()


async def test_a_saturated_verifier_is_a_503_not_a_pile_up(tmp_path: Path) -> None:
    class Busy:
        async def verify(self, secret: str, stored: str, *, source: str = "") -> bool:
            raise SecretVerifierBusy("full")

    auth = _authenticator(tmp_path, verifier=Busy())
    err = await _refusal(auth, _basic("scrypt-agent", SECRET))
    assert isinstance(err, TemporarilyUnavailable)
    assert err.status_code == 503 and err.headers["Retry-After"] == "1"


# -- throttling failed authentication -----------------------------------------------------------


def _throttle(clock: FrozenClock, pair: int = 3, source: int = 5) -> FailedAuthThrottle:
    return FailedAuthThrottle(
        InMemoryStateStore(clock), per_client_and_source=pair, per_source=source, window_seconds=60
    )


async def test_failures_are_throttled_per_client_and_source(tmp_path: Path) -> None:
    clock = FrozenClock(start=1_800_000_010.0)
    verifier = CountingVerifier()
    auth = _authenticator(tmp_path, verifier=verifier, throttle=_throttle(clock), clock=clock)

    async def attempt(client_id: str, secret: str, source: str) -> OAuthError | None:
        try:
            await auth.authenticate(_basic(client_id, secret), {}, source=source)
        except OAuthError as err:
            return err
        return None

    attacker, legit = "203.0.113.9", "198.51.100.7"
    for _ in range(3):
        assert isinstance(await attempt("scrypt-agent", "guess", attacker), InvalidClient)
    verifier.checked.clear()
    throttled = await attempt("scrypt-agent", SECRET, attacker)  # even the right secret
    assert isinstance(throttled, TooManyRequests)
    assert throttled.status_code == 429 and throttled.reason == "client_auth_throttled"
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert verifier.checked == []  # refused before any secret is checked
    # The legitimate client, from its own address, is not locked out.
    assert await attempt("scrypt-agent", SECRET, legit) is None
    # An unknown id is throttled exactly like a known one (no existence oracle).
    for _ in range(3):
        assert isinstance(await attempt("ghost", "guess", "203.0.113.10"), InvalidClient)
    ghost = await attempt("ghost", "guess", "203.0.113.10")
    assert isinstance(ghost, TooManyRequests)
    assert ghost.to_body() == throttled.to_body()
    clock.advance(61)  # the window slides: the pair may try again
    assert await attempt("scrypt-agent", SECRET, attacker) is None


async def test_failures_are_throttled_per_source_across_client_ids(tmp_path: Path) -> None:
    clock = FrozenClock(start=1_800_000_010.0)
    auth = _authenticator(tmp_path, throttle=_throttle(clock, pair=100, source=4), clock=clock)
    for i in range(4):
        with pytest.raises(InvalidClient):
            await auth.authenticate(_basic(f"probe-{i}", "x"), {}, source="203.0.113.9")
    with pytest.raises(TooManyRequests):
        await auth.authenticate(_basic("probe-99", "x"), {}, source="203.0.113.9")
    with pytest.raises(TooManyRequests):  # assertions count and are refused alike
        await auth.authenticate({}, _assertion("jwt-agent", KEY), source="203.0.113.9")
    assert await auth.authenticate(_basic("scrypt-agent", SECRET), {}, source="192.0.2.50")


async def test_ipv6_sources_are_counted_per_64(tmp_path: Path) -> None:
    """One host commonly holds a whole IPv6 /64: rotating addresses inside it is one source."""
    clock = FrozenClock(start=1_800_000_010.0)
    auth = _authenticator(tmp_path, throttle=_throttle(clock, pair=100, source=3), clock=clock)
    for i in range(3):
        with pytest.raises(InvalidClient):
            await auth.authenticate(_basic("probe", "x"), {}, source=f"2001:db8:1:2::{i + 1}")
    with pytest.raises(TooManyRequests):
        await auth.authenticate(_basic("probe", "x"), {}, source="2001:db8:1:2:ffff::9")
    assert await auth.authenticate(_basic("scrypt-agent", SECRET), {}, source="2001:db8:1:3::1")


# -- source address -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "forwarded", "trusted", "expected"),
    [
        ("203.0.113.9", "198.51.100.1", [], "203.0.113.9"),  # XFF from anyone: ignored
        ("10.0.0.2", "198.51.100.1", ["10.0.0.0/8"], "198.51.100.1"),
        ("10.0.0.2", "6.6.6.6, 198.51.100.1", ["10.0.0.0/8"], "198.51.100.1"),  # spoofed left
        ("10.0.0.2", "198.51.100.1, 10.0.0.7", ["10.0.0.0/8"], "198.51.100.1"),  # two proxies
        ("10.0.0.2", "garbage", ["10.0.0.0/8"], "10.0.0.2"),
        ("10.0.0.2", None, ["10.0.0.0/8"], "10.0.0.2"),
        ("::1", "2001:db8::5", ["::1/128"], "2001:db8::5"),
        (None, "198.51.100.1", ["10.0.0.0/8"], "unknown"),
    ],
)
def test_source_address(
    peer: str | None, forwarded: str | None, trusted: list[str], expected: str
) -> None:
    import ipaddress

    networks = [ipaddress.ip_network(n) for n in trusted]
    assert source_address(peer, forwarded, networks) == expected


# -- two methods on one client ------------------------------------------------------------------


async def test_one_client_may_use_a_secret_and_private_key_jwt(tmp_path: Path) -> None:
    auth = _authenticator(tmp_path)
    by_secret = await auth.authenticate(_basic("both-agent", FAST_SECRET), {}, source="192.0.2.1")
    by_key = await auth.authenticate({}, _assertion("both-agent", KEY), source="192.0.2.1")
    assert by_secret is not None and by_secret.method == "client_secret_basic"
    assert by_key is not None and by_key.method == "private_key_jwt"
    # Each method is checked on its own: a wrong secret or a foreign key is still refused.
    with pytest.raises(InvalidClient):
        await auth.authenticate(_basic("both-agent", "wrong"), {}, source="192.0.2.1")
    with pytest.raises(InvalidClient):
        await auth.authenticate({}, _assertion("both-agent", OTHER_KEY), source="192.0.2.1")
    # A client listing one method only is refused the other.
    with pytest.raises(InvalidClient):
        await auth.authenticate({}, _assertion("sha-agent", KEY), source="192.0.2.1")
    with pytest.raises(InvalidClient):
        await auth.authenticate(_basic("jwt-agent", FAST_SECRET), {}, source="192.0.2.1")


async def test_migration_drops_the_secret_by_editing_the_list(tmp_path: Path) -> None:
    """After the migration the secret line is removed: the same client now refuses it."""
    agents = {"both-agent": {"authentication": [_jwt_method()]}}
    auth = _authenticator(tmp_path, agents)
    assert await auth.authenticate({}, _assertion("both-agent", KEY), source="192.0.2.1")
    with pytest.raises(InvalidClient):
        await auth.authenticate(_basic("both-agent", FAST_SECRET), {}, source="192.0.2.1")


@pytest.mark.parametrize(
    "authentication",
    [
        [],
        [
            {"method": "client_secret_basic", "secret_hash": SHA_HASH},
            {"method": "client_secret_basic", "secret_ref": "env:X"},
        ],
    ],
)
def test_authentication_lists_hold_each_method_at_most_once(authentication: list) -> None:
    with pytest.raises(ValidationError):
        Agent.model_validate({"authentication": authentication})


def test_a_single_method_is_still_accepted() -> None:
    agent = Agent.model_validate(AGENTS["scrypt-agent"])
    assert agent.authentication is not None


class _CountingState(InMemoryStateStore):
    """The real in-memory store, counting the throttle's reads."""

    def __init__(self, clock: FrozenClock) -> None:
        super().__init__(clock)
        self.status_reads = 0

    async def rate_limit_status(self, key: str, limit: int, window_seconds: float) -> Any:
        self.status_reads += 1
        return await super().rate_limit_status(key, limit, window_seconds)


async def test_a_clean_pair_is_remembered_briefly_and_any_local_failure_forgets_it() -> None:
    clock = FrozenClock(start=1_800_000_010.0)
    state = _CountingState(clock)
    here, there = (
        FailedAuthThrottle(
            state,
            per_client_and_source=2,
            per_source=100,
            window_seconds=60,
            clock=clock,
            recheck_after=0.5,
        )
        for _ in range(2)
    )
    await here.check("agent", "10.0.0.1")
    reads = state.status_reads
    assert reads == 2  # the pair and the source, nothing remembered yet
    here.succeeded("agent", "10.0.0.1")
    await here.check("agent", "10.0.0.1")
    assert state.status_reads == reads  # remembered: no state read on the hot path
    await here.check("agent", "10.0.0.2")
    assert state.status_reads == reads + 2  # another source is not covered
    # Two failures at another replica: this one sees them once `recheck_after` has passed.
    await there.failed("agent", "10.0.0.1")
    await there.failed("agent", "10.0.0.1")
    await here.check("agent", "10.0.0.1")
    clock.advance(0.51)
    with pytest.raises(TooManyRequests):
        await here.check("agent", "10.0.0.1")
    # A failure at this replica forgets every remembered pair at once.
    here.succeeded("other", "10.0.0.3")
    await here.failed("ghost", "10.0.0.9")
    before = state.status_reads
    await here.check("other", "10.0.0.3")
    assert state.status_reads == before + 2

"""In-process cost of client authentication: can timing tell which client ids exist, and does a
flood of wrong secrets starve a legitimate scrypt client?

``python -m bench.client_auth`` (or ``python -m bench --only client_auth``) prints two tables.
Everything runs in this process: a policy with one scrypt client (``hash_client_secret``'s
default parameters), one ``private_key_jwt``-only client, and `ClientAuthenticator` with the
production `BoundedSecretVerifier` (threads: the CPU count) and no failure throttle (so the pool
itself is measured, not the throttle that would stop the flood sooner).

Table 1, median milliseconds per ``authenticate`` over `SAMPLES` sequential calls:

* ``known scrypt client, right secret`` / ``..., wrong secret``
* ``unknown client id`` -- verified against a dummy hash of the same kind and cost
* ``private_key_jwt-only client over Basic`` -- answered like an unknown id
* the ratio unknown / wrong secret (1.00 means timing tells nothing)

Table 2, the legitimate client's median latency over `LEGIT_SAMPLES` sequential calls, alone and
while `FLOOD` concurrent tasks from another source send wrong secrets non-stop, with secret
checks on asyncio's default thread pool (as before: first come, first served, shared with
backend calls) and on the bounded pool served round-robin by source.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import yaml

from bench._report import table as render_table
from broker.client_auth import ClientAuthenticator
from broker.client_secrets import (
    BoundedSecretVerifier,
    SecretVerifier,
    hash_client_secret,
    verify_client_secret,
)
from broker.clock import SystemClock
from broker.errors import OAuthError
from broker.policy import load_policy
from broker.state import InMemoryStateStore

SAMPLES = 30
LEGIT_SAMPLES = 8
FLOOD = 60
SECRET = "bench-secret-for-client-auth"


class _DefaultPoolVerifier:
    """The old way: every check on asyncio's default thread pool, first come first served."""

    async def verify(self, secret: str, stored: str, *, source: str = "") -> bool:
        return await asyncio.to_thread(verify_client_secret, secret, stored)


def _basic(client_id: str, secret: str) -> dict[str, str]:
    return {"authorization": "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()}


def _authenticator(policy_dir: Path, verifier: SecretVerifier) -> ClientAuthenticator:
    policy = load_policy(policy_dir).policy
    clock = SystemClock()
    return ClientAuthenticator(
        policy=lambda: policy,
        replay=InMemoryStateStore(clock),
        clock=clock,
        http=httpx.AsyncClient(),
        assertion_audiences=frozenset({"https://broker.example"}),
        assertion_max_lifetime=300,
        leeway=5,
        secrets_verifier=verifier,
    )


async def _timed(call: Callable[[], Awaitable[object]]) -> float:
    started = time.perf_counter()
    with contextlib.suppress(OAuthError):
        await call()
    return (time.perf_counter() - started) * 1000


async def _median(call: Callable[[], Awaitable[object]], samples: int) -> float:
    return statistics.median([await _timed(call) for _ in range(samples)])


async def _probing(auth: ClientAuthenticator) -> list[tuple[str, float]]:
    async def attempt(client_id: str, secret: str) -> None:
        await auth.authenticate(_basic(client_id, secret), {}, source="192.0.2.1")

    right = await _median(lambda: attempt("scrypt-agent", SECRET), SAMPLES)
    wrong = await _median(lambda: attempt("scrypt-agent", "wrong"), SAMPLES)
    unknown = await _median(lambda: attempt("no-such-agent", "wrong"), SAMPLES)
    jwt_only = await _median(lambda: attempt("jwt-agent", "wrong"), SAMPLES)
    return [
        ("known scrypt client, right secret", right),
        ("known scrypt client, wrong secret", wrong),
        ("unknown client id", unknown),
        ("private_key_jwt-only client over Basic", jwt_only),
        ("ratio unknown / wrong secret", unknown / wrong),
    ]


async def _under_flood(auth: ClientAuthenticator, flood: int) -> float:
    stop = asyncio.Event()

    async def attacker() -> None:
        while not stop.is_set():
            try:
                await auth.authenticate(_basic("scrypt-agent", "guess"), {}, source="203.0.113.9")
            except OAuthError:
                await asyncio.sleep(0)

    tasks = [asyncio.create_task(attacker()) for _ in range(flood)]
    await asyncio.sleep(0.2 if flood else 0)  # let the backlog build
    try:
        return await _median(
            lambda: auth.authenticate(_basic("scrypt-agent", SECRET), {}, source="198.51.100.7"),
            LEGIT_SAMPLES,
        )
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _measure(policy_dir: Path) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    bounded = BoundedSecretVerifier(workers=_cores(), queue=64)
    try:
        probing = await _probing(_authenticator(policy_dir, bounded))
        flood = [
            ("alone", await _under_flood(_authenticator(policy_dir, bounded), 0)),
            (
                f"{FLOOD} wrong-secret tasks, default thread pool (before)",
                await _under_flood(_authenticator(policy_dir, _DefaultPoolVerifier()), FLOOD),
            ),
            (
                f"{FLOOD} wrong-secret tasks, bounded pool, round-robin by source",
                await _under_flood(_authenticator(policy_dir, bounded), FLOOD),
            ),
        ]
    finally:
        bounded.close()
    return probing, flood


def _cores() -> int:
    return os.cpu_count() or 1


def run() -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """Measure and return the rows of both tables."""
    with tempfile.TemporaryDirectory(prefix="bench-client-auth-") as tmp:
        policy_dir = Path(tmp)
        agents = {
            "scrypt-agent": {
                "authentication": {
                    "method": "client_secret_basic",
                    "secret_hash": hash_client_secret(SECRET),
                }
            },
            "jwt-agent": {
                "authentication": {
                    "method": "private_key_jwt",
                    "jwks_uri": "https://agents.example/jwks.json",
                }
            },
        }
        (policy_dir / "agents.yaml").write_text(yaml.safe_dump({"agents": agents}))
        return asyncio.run(_measure(policy_dir))


def main() -> None:
    probing, flood = run()
    print("Client authentication: can timing tell which client ids exist? (in process)")
    print(render_table(("case", "median ms"), probing))
    print("")
    print("A legitimate scrypt client while another source floods wrong secrets (in process)")
    print(render_table(("condition", "median ms"), flood))


if __name__ == "__main__":
    main()

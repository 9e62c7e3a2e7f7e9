"""What DPoP (RFC 9449) costs per request, in process, beside what a bearer token already costs.

``python -m bench.dpop`` (or ``python -m bench --only dpop``) prints microseconds per operation,
the best of several runs, one core, in this process:

* ``verify a broker access token`` -- the baseline every request pays already: the broker's own
  verifier on tokens it has not seen (signature, claims; no verdict cache)
* ``verify a DPoP proof`` -- what a bound token adds at the token endpoint, the credential fetch
  or a tool (`DPoPVerifier.verify`: parse, key checks, signature, claims, ``ath``, RFC 7638
  thumbprint, the single-use ``jti`` in a process-local guard)
* ``... with the jti in Redis`` -- the same, the ``jti`` recorded in a real ``redis-server`` on
  loopback (the broker's state store, as replicas share it)
* ``make a DPoP proof`` -- the agent's side (`DPoPKey.proof`, ES256)

The load generator of the HTTP sections replays one prepared request, which a single-use proof
cannot be; so DPoP is measured here, per operation, and its share of a request is read against
the HTTP sections' figures.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

from bench._report import table
from bench._servers import redis_server
from broker.clock import SystemClock
from broker.dpop import DPoPKey, DPoPVerifier, LocalReplayGuard, ReplayGuard
from broker.state_redis import RedisStateStore
from broker.tokens import BrokerTokenVerifier, Keyring, TokenIssuer
from broker.types import Provenance, TokenType

N = 2000
"""Operations per timed run."""
REPEATS = 5
URL = "https://broker.example/oauth2/token"


async def _best_us(run: Callable[[], Awaitable[None]]) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        started = time.perf_counter()
        await run()
        best = min(best, time.perf_counter() - started)
    return best / N * 1e6


def _tokens(directory: Path, count: int) -> tuple[BrokerTokenVerifier, list[str]]:
    clock = SystemClock()
    keyring = Keyring(directory, algorithm="ES256", clock=clock, publish_grace_seconds=3600)
    issuer = TokenIssuer(keyring, "https://broker.example", clock)
    provenance = Provenance(
        "dev", "alice", frozenset({"support"}), None, TokenType.ID_TOKEN, int(time.time()) + 3600
    )
    tokens = [
        issuer.issue(
            provenance=provenance,
            client_id="triage-agent",
            actor_chain=("triage-agent",),
            scopes=("tickets:read",),
            audiences=("llm-gateway",),
            lifetime_seconds=900,
            policy_version="bench",
            parent_jti=None,
        ).token
        for _ in range(count)
    ]
    verifier = BrokerTokenVerifier(
        keyring, "https://broker.example", clock, algorithms=("ES256",), verdict_cache_size=1
    )
    return verifier, tokens


def run(print_: Callable[[str], None] = print) -> list[tuple[str, float]]:
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp)) as redis:
        rows = asyncio.run(_measure(Path(tmp), redis.url))
    print_(f"DPoP per operation (one core, in process; best of {REPEATS} runs of {N})")
    base = rows[0][1]
    print_(
        table(
            ["operation", "us/op", "x baseline"],
            [(label, f"{us:,.0f}", f"{us / base:.2f}x") for label, us in rows],
        )
    )
    return rows


async def _measure(tmp: Path, redis_url: str) -> list[tuple[str, float]]:
    rows: list[tuple[str, float]] = []
    verifier, tokens = _tokens(tmp / "keys", N)

    async def verify_tokens() -> None:
        for token in tokens:
            await verifier.verify(token)

    rows.append(("verify a broker access token (baseline)", await _best_us(verify_tokens)))
    key = DPoPKey()
    token = tokens[0]

    def batches() -> Iterator[list[str]]:
        for _ in range(REPEATS):
            yield [key.proof("POST", URL, access_token=token) for _ in range(N)]

    def checking(guard: ReplayGuard) -> Callable[[], Awaitable[None]]:
        dpop = DPoPVerifier(replay=guard)
        pending = batches()

        async def check() -> None:
            for proof in next(pending):
                await dpop.verify(proof, method="POST", url=URL, access_token=token, jkt=key.jkt)

        return check

    rows.append(
        ("verify a DPoP proof (jti in process)", await _best_us(checking(LocalReplayGuard())))
    )
    store = RedisStateStore(redis_url, clock=SystemClock())
    try:
        rows.append(("verify a DPoP proof (jti in Redis)", await _best_us(checking(store))))
    finally:
        await store.close()

    async def make() -> None:
        for _ in range(N):
            key.proof("POST", URL, access_token=token)

    rows.append(("make a DPoP proof (agent side, ES256)", await _best_us(make)))
    return rows


def main() -> None:
    run()


if __name__ == "__main__":
    main()

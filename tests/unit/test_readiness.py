"""`Readiness`: which backend answers count, what is reported, and that probes are remembered
and shared (a probe storm is not a backend storm)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from broker.clock import SystemClock
from broker.policy.model import Credential
from broker.readiness import MAX_PROBES, Readiness
from broker.state import InMemoryStateStore
from secret_backends.base import (
    BackendUnavailable,
    SecretAccessDenied,
    SecretNotFound,
    SecretRef,
)


@dataclass
class _Policy:
    credentials: dict[str, Credential]
    version: str = "sha256:test"


@dataclass
class _Policies:
    policy: _Policy
    last_error: Any = None

    def current(self) -> _Policy:
        return self.policy


class _Keyring:
    def published_kids(self) -> list[str]:
        return ["k1"]


@dataclass
class _Backend:
    """current_version answers per path: a version, or raises what `errors` names."""

    errors: dict[str, Exception] = field(default_factory=dict)
    delay: float = 0.0
    calls: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    name: str = "vault"

    def current_version(self, ref: SecretRef) -> str | None:
        with self.lock:
            self.calls.append(ref.path)
        if self.delay:
            time.sleep(self.delay)
        if ref.path in self.errors:
            raise self.errors[ref.path]
        return "1"

    def read(self, ref: SecretRef) -> Any:
        raise AssertionError("readiness never reads values")

    def close(self) -> None:
        return None


def _credential(path: str, backend: str = "vault") -> Credential:
    return Credential(backend=backend, path=path, requires="llm:x")


def _readiness(
    credentials: dict[str, Credential], backends: dict[str, _Backend], **kwargs: float
) -> Readiness:
    return Readiness(
        policies=_Policies(_Policy(credentials)),  # type: ignore[arg-type]
        keyring=_Keyring(),  # type: ignore[arg-type]
        backends=backends,  # type: ignore[arg-type]
        state=InMemoryStateStore(SystemClock()),
        state_kind="memory",
        clock=SystemClock(),
        **kwargs,
    )


def _report(readiness: Readiness) -> tuple[bool, dict[str, Any]]:
    return asyncio.run(readiness.report())


def test_a_backend_is_ready_when_any_credential_answers_and_unreadable_ones_are_named() -> None:
    backend = _Backend(errors={"llm/b": SecretAccessDenied("denied"), "llm/c": SecretNotFound("x")})
    readiness = _readiness(
        {"a": _credential("llm/a"), "b": _credential("llm/b"), "c": _credential("llm/c")},
        {"vault": backend},
    )
    ready, checks = _report(readiness)
    assert ready is True
    assert checks["secret_backends"]["backends"]["vault"] == {
        "ok": True,
        "checked": True,
        "credentials": ["a", "c"],  # not found still means the store answered
        "unreadable": {"b": "denied"},
    }


def test_a_backend_nothing_answers_on_makes_the_replica_unready() -> None:
    down = _Backend(errors={"llm/a": BackendUnavailable("x"), "llm/b": BackendUnavailable("y")})
    denied = _Backend(errors={"aws/a": SecretAccessDenied("bad credentials")})
    readiness = _readiness(
        {
            "a": _credential("llm/a"),
            "b": _credential("llm/b"),
            "c": _credential("aws/a", "aws"),
            "dyn": _credential("dynamic:database/creds/ro"),  # never probed: every read leases
        },
        {"vault": down, "aws": denied, "unused": _Backend()},
    )
    ready, checks = _report(readiness)
    backends = checks["secret_backends"]["backends"]
    assert ready is False and checks["secret_backends"]["ok"] is False
    assert backends["vault"]["ok"] is False and backends["vault"]["error"] == "unavailable"
    assert backends["aws"] == {
        "ok": False,
        "checked": True,
        "credentials": [],
        "unreadable": {"c": "denied"},
        "error": "denied",
    }
    assert backends["unused"] == {"ok": True, "checked": False, "why": "no credential uses it"}
    assert "dynamic:database/creds/ro" not in down.calls
    assert checks["policy"]["ok"] and checks["signing_keys"]["ok"] and checks["state"]["ok"]


def test_a_slow_backend_times_out_instead_of_hanging_the_probe() -> None:
    readiness = _readiness(
        {"a": _credential("llm/a")}, {"vault": _Backend(delay=0.5)}, backend_timeout=0.05
    )

    async def timed() -> tuple[float, tuple[bool, dict[str, Any]]]:
        started = time.monotonic()
        result = await readiness.report()
        return time.monotonic() - started, result

    # (asyncio.run then waits for the abandoned worker thread; the probe itself did not.)
    elapsed, (ready, checks) = asyncio.run(timed())
    assert elapsed < 0.45
    assert ready is False
    assert checks["secret_backends"]["backends"]["vault"]["error"] == "timeout"


def test_answers_are_remembered_and_concurrent_probes_share_one_check() -> None:
    backend = _Backend(delay=0.05)
    credentials = {f"c{i}": _credential(f"llm/{i}") for i in range(MAX_PROBES + 3)}
    readiness = _readiness(credentials, {"vault": backend}, backend_check_interval=60.0)

    async def storm() -> list[tuple[bool, dict[str, Any]]]:
        return await asyncio.gather(*(readiness.report() for _ in range(50)))

    results = asyncio.run(storm())
    assert all(ready for ready, _ in results)
    assert len(backend.calls) == MAX_PROBES  # one round for 50 probes, at most MAX_PROBES refs
    _report(readiness)
    assert len(backend.calls) == MAX_PROBES  # remembered for the interval

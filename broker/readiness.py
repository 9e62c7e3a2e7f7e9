"""``GET /readyz``: can this replica serve? Policy, signing keys, secret backends, state store.

- policy: loaded (a broker never starts without one); ``last_error`` reports a rejected edit,
  which does not make the replica unready: the previous version keeps serving.
- signing keys: at least one published key.
- secret backends: each configured backend answers a metadata read (``current_version``) for the
  credentials of the current policy that use it (up to `MAX_PROBES`), with the broker's own
  permissions (no extra IAM or Vault policy needed). The backend is ready when any of them
  answers (a credential missing from the store counts: the store answered); those the broker may
  not read are listed under ``unreadable``. A backend no credential uses is reported as
  unchecked, not failed.
  Results are remembered for `backend_check_interval` seconds so that a probe storm never
  becomes a backend storm; calls run off the event loop with a timeout.
- state store: a ping.

Details carry backend names, credential names and fixed condition words; never a value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from broker.clock import Clock
from broker.credentials import secret_ref
from broker.policy.store import PolicyStore
from broker.state import StateStore, StateUnavailable
from broker.tokens import Keyring
from secret_backends.base import SecretBackend, SecretBackendError, SecretRef
from secret_backends.vault import DYNAMIC_PREFIX

MAX_PROBES = 5
"""Credentials checked per backend and interval."""


@dataclass(frozen=True, slots=True)
class _BackendResult:
    checked_at: float
    detail: dict[str, Any]


class Readiness:
    def __init__(
        self,
        *,
        policies: PolicyStore,
        keyring: Keyring,
        backends: Mapping[str, SecretBackend],
        state: StateStore,
        state_kind: str,
        clock: Clock,
        backend_check_interval: float = 5.0,
        backend_timeout: float = 2.0,
    ) -> None:
        self._policies = policies
        self._keyring = keyring
        self._backends = backends
        self._state = state
        self._state_kind = state_kind
        self._clock = clock
        self._interval = backend_check_interval
        self._timeout = backend_timeout
        self._results: dict[str, _BackendResult] = {}
        self._in_flight: dict[str, asyncio.Task[dict[str, Any]]] = {}

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """(ready, checks) for the response body."""
        last_policy_error = self._policies.last_error
        checks: dict[str, Any] = {
            "policy": {
                "ok": True,
                "version": self._policies.current().version,
                "last_error": last_policy_error.as_dict() if last_policy_error else None,
            },
            "signing_keys": {"ok": bool(self._keyring.published_kids())},
        }
        names = sorted(self._backends)
        details = await asyncio.gather(*(self._backend(name) for name in names))
        checks["secret_backends"] = {
            "ok": all(d["ok"] for d in details),
            "backends": dict(zip(names, details, strict=True)),
        }
        try:
            await self._state.ping()
            checks["state"] = {"ok": True, "kind": self._state_kind}
        except StateUnavailable:
            checks["state"] = {"ok": False, "kind": self._state_kind, "error": "unreachable"}
        return all(c["ok"] for c in checks.values()), checks

    async def _backend(self, name: str) -> dict[str, Any]:
        remembered = self._results.get(name)
        now = self._clock.monotonic()
        if remembered is not None and now - remembered.checked_at < self._interval:
            return remembered.detail
        task = self._in_flight.get(name)
        if task is None:  # one check per backend at a time, however many probes arrive
            task = self._in_flight[name] = asyncio.ensure_future(self._check(name))
            task.add_done_callback(lambda _: self._in_flight.pop(name, None))
        return await asyncio.shield(task)

    async def _check(self, name: str) -> dict[str, Any]:
        probes = self._probe_refs(name)
        if not probes:
            detail: dict[str, Any] = {"ok": True, "checked": False, "why": "no credential uses it"}
        else:
            outcomes = await asyncio.gather(*(self._probe(name, ref) for _, ref in probes))
            answered = [c for (c, _), error in zip(probes, outcomes, strict=True) if error is None]
            failed = {c: e for (c, _), e in zip(probes, outcomes, strict=True) if e is not None}
            # Reachable and authenticated when any credential answers (found or not found): a
            # credential the broker may not read is reported, but is the policy's problem.
            detail = {"ok": bool(answered), "checked": True, "credentials": answered}
            if failed:
                detail["unreadable"] = failed
            if not answered:
                detail["error"] = next(iter(failed.values()))
        self._results[name] = _BackendResult(self._clock.monotonic(), detail)
        return detail

    async def _probe(self, backend: str, ref: SecretRef) -> str | None:
        """None when the store answered for `ref` (found or not found), else a condition."""
        try:
            await asyncio.wait_for(
                asyncio.to_thread(self._backends[backend].current_version, ref), self._timeout
            )
        except TimeoutError:
            return "timeout"
        except SecretBackendError as exc:
            return None if exc.condition == "not_found" else exc.condition
        return None

    def _probe_refs(self, backend: str) -> list[tuple[str, SecretRef]]:
        """Up to `MAX_PROBES` credentials of the current policy on `backend` (by name)."""
        credentials = self._policies.current().credentials  # one policy version throughout
        names = sorted(
            name
            for name, credential in credentials.items()
            if credential.backend == backend and not credential.path.startswith(DYNAMIC_PREFIX)
        )[:MAX_PROBES]
        return [(name, secret_ref(credentials[name])) for name in names]

"""Holds the policy version currently in force. Readers take one immutable snapshot per request."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from broker.policy.engine import Policy
from broker.policy.loader import LoadedPolicy, load_policy

log = logging.getLogger("broker.policy")


class PolicyStore:
    def __init__(
        self,
        directory: Path,
        *,
        known_workload_issuers: Iterable[str] = (),
        known_secret_backends: Iterable[str] = (),
    ) -> None:
        self._directory = directory
        self._known_workload_issuers = tuple(known_workload_issuers)
        self._known_secret_backends = tuple(known_secret_backends)
        self._loaded: LoadedPolicy = self._load()  # raises PolicyError: no policy, no service

    def _load(self) -> LoadedPolicy:
        loaded = load_policy(
            self._directory,
            known_workload_issuers=self._known_workload_issuers,
            known_secret_backends=self._known_secret_backends,
        )
        for warning in loaded.warnings:
            log.warning("policy lint: %s", warning)
        return loaded

    def current(self) -> Policy:
        return self._loaded.policy

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._loaded.warnings

    def reload(self) -> Policy:
        """Load and validate the directory again; on error the current version stays in force."""
        self._loaded = self._load()
        return self._loaded.policy

"""Holds the policy version currently in force. Readers take one immutable snapshot per request.

`reload()` validates the policy directory again, runs the policy tests in ``<dir>/tests`` against
the *new* version and only then swaps it in with one attribute assignment, so a request either
sees the whole old version or the whole new one, and a request in flight keeps the snapshot it
took at its start. An invalid edit is refused: the previous version keeps serving, the refusal
is written as a ``policy.rejected`` decision record and kept as `last_error` for ``/readyz``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from broker.audit import DecisionLog
from broker.clock import Clock, SystemClock
from broker.policy.engine import Policy
from broker.policy.loader import (
    POLICY_SUFFIXES,
    TESTS_SUBDIR,
    LoadedPolicy,
    PolicyError,
    compute_version,
    load_policy,
    load_policy_tests,
    policy_files,
)
from broker.policy.testing import run_policy_tests

log = logging.getLogger("broker.policy")

#: Caps on what a rejection carries into records, logs and responses.
MAX_PROBLEMS = 50
MAX_PROBLEM_CHARS = 400
#: How often a reload re-reads the directory when it changed while being read.
_UNSTABLE_RETRIES = 3

# (name, inode, size, mtime_ns) of every policy and policy-test file.
Signature = tuple[tuple[str, int, int, int], ...]


class PolicyRejected(PolicyError):
    """A reload refused: `problems` as for `PolicyError`, plus the version that was attempted."""

    def __init__(self, problems: Iterable[str], attempted_version: str | None) -> None:
        super().__init__(problems)
        self.attempted_version = attempted_version


@dataclass(frozen=True, slots=True)
class ReloadError:
    """The last refused reload, as `/readyz` reports it (no secret can appear here)."""

    message: str
    problems: tuple[str, ...]
    time: str
    attempted_version: str | None
    serving_version: str
    trigger: str

    def as_dict(self) -> dict[str, object]:
        return {
            "message": self.message,
            "problems": list(self.problems),
            "time": self.time,
            "attempted_version": self.attempted_version,
            "serving_version": self.serving_version,
            "trigger": self.trigger,
        }


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of a successful reload."""

    version: str
    previous_version: str
    changed: bool
    warnings: tuple[str, ...]


def sanitize_problem(problem: str) -> str:
    """One line per problem, no quoted source lines (a YAML error's snippet could carry a value
    someone pasted into a policy file by mistake), capped in length."""
    kept = [
        line.strip()
        for line in problem.splitlines()
        if line.strip() and not line.startswith("    ") and line.strip() != "^"
    ]
    text = " ".join(kept)
    return text if len(text) <= MAX_PROBLEM_CHARS else text[: MAX_PROBLEM_CHARS - 1] + "…"


def _sanitize(problems: Iterable[str]) -> tuple[str, ...]:
    items = [sanitize_problem(p) for p in problems]
    if len(items) > MAX_PROBLEMS:
        items = [*items[:MAX_PROBLEMS], f"... and {len(items) - MAX_PROBLEMS} more problems"]
    return tuple(items)


class PolicyStore:
    """The policy in force, reloadable without a restart.

    `current()` is safe from any thread or task; `reload()` does blocking file I/O (call it
    through `asyncio.to_thread` from the event loop) and is serialised by a lock.
    """

    def __init__(
        self,
        directory: Path,
        *,
        known_workload_issuers: Iterable[str] | None = None,
        known_secret_backends: Iterable[str] | None = None,
        known_notification_channels: Iterable[str] | None = None,
        decisions: DecisionLog | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._directory = directory
        # None: the configuration is not known (no checks against it); else the names it has.
        self._known_workload_issuers = (
            None if known_workload_issuers is None else tuple(known_workload_issuers)
        )
        self._known_secret_backends = (
            None if known_secret_backends is None else tuple(known_secret_backends)
        )
        self._known_notification_channels = (
            None if known_notification_channels is None else tuple(known_notification_channels)
        )
        self._decisions = decisions
        self._clock = clock or SystemClock()
        self._lock = threading.Lock()
        self._last_error: ReloadError | None = None
        self.reloads = 0
        self.reload_failures = 0
        self._attempted_signature = self.signature()
        # raises PolicyError: no policy (or one whose own tests fail), no service
        self._loaded: LoadedPolicy = self._validate()
        self._log_warnings(self._loaded)
        self._record(
            "policy.loaded",
            outcome="loaded",
            trigger="startup",
            policy_version=self._loaded.policy.version,
            warnings=len(self._loaded.warnings),
        )

    @property
    def directory(self) -> Path:
        return self._directory

    def current(self) -> Policy:
        """The version in force: one attribute read of an immutable object."""
        return self._loaded.policy

    @property
    def warnings(self) -> tuple[str, ...]:
        return self._loaded.warnings

    @property
    def last_error(self) -> ReloadError | None:
        """The last refused reload, cleared by the next successful one."""
        return self._last_error

    def signature(self) -> Signature:
        """Names, inodes, sizes and modification times of ``*.yaml`` and ``tests/*.yaml``."""
        entries: list[tuple[str, int, int, int]] = []
        for folder, prefix in ((self._directory, ""), (self._directory / TESTS_SUBDIR, "tests/")):
            try:
                paths = list(folder.iterdir())
            except OSError:
                continue
            for path in paths:
                if path.suffix not in POLICY_SUFFIXES:
                    continue
                try:
                    st = path.stat()
                except OSError:
                    continue
                entries.append((prefix + path.name, st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(sorted(entries))

    def changed_since_last_attempt(self) -> bool:
        """Whether the directory differs from what the last load or reload attempt read."""
        return self.signature() != self._attempted_signature

    def reload(self, *, trigger: str = "manual", by: str | None = None) -> ReloadResult:
        """Validate the directory and its policy tests, then swap the new version in.

        Raises `PolicyRejected` (the previous version keeps serving) when the new version does
        not load or a policy test fails against it.
        """
        with self._lock:
            for _ in range(_UNSTABLE_RETRIES):
                before = self.signature()
                self._attempted_signature = before
                try:
                    loaded = self._validate()
                except PolicyError as exc:
                    if self.signature() != before:
                        continue  # an edit in progress; read it again
                    raise self._reject(exc.problems, trigger, by) from None
                if self.signature() != before:
                    continue
                return self._accept(loaded, trigger, by)
            raise self._reject(
                ["the policy directory kept changing while it was being read; try again"],
                trigger,
                by,
            )

    def _load(self) -> LoadedPolicy:
        return load_policy(
            self._directory,
            known_workload_issuers=self._known_workload_issuers,
            known_secret_backends=self._known_secret_backends,
            known_notification_channels=self._known_notification_channels,
        )

    def _validate(self) -> LoadedPolicy:
        loaded = self._load()
        cases = load_policy_tests(self._directory)
        failures = [r for r in run_policy_tests(loaded.policy, cases) if not r.passed]
        if failures:
            raise PolicyError(
                f"{TESTS_SUBDIR}/{r.file}: {r.case.name}: policy test failed: {r.detail}"
                for r in failures
            )
        return loaded

    def _accept(self, loaded: LoadedPolicy, trigger: str, by: str | None) -> ReloadResult:
        previous = self._loaded.policy.version
        new = loaded.policy.version
        changed = new != previous
        recovered = self._last_error is not None
        if changed:
            self._loaded = loaded  # the swap: one assignment of an immutable object
            self._log_warnings(loaded)
            log.info("policy reloaded: %s -> %s (%s)", previous, new, trigger)
        self._last_error = None
        self.reloads += 1
        if changed or recovered:
            self._record(
                "policy.loaded",
                outcome="loaded" if changed else "unchanged",
                trigger=trigger,
                by=by,
                previous_version=previous,
                policy_version=new,
                warnings=len(loaded.warnings),
            )
        return ReloadResult(new, previous, changed, loaded.warnings)

    def _reject(self, problems: Iterable[str], trigger: str, by: str | None) -> PolicyRejected:
        clean = _sanitize(problems)
        attempted = self._attempted_version()
        serving = self._loaded.policy.version
        count = len(clean)
        message = (
            f"policy edit rejected ({count} problem{'s' if count != 1 else ''}); "
            f"still serving {serving}"
        )
        self._last_error = ReloadError(
            message=message,
            problems=clean,
            time=self._now_iso(),
            attempted_version=attempted,
            serving_version=serving,
            trigger=trigger,
        )
        self.reload_failures += 1
        log.warning("%s: %s", message, "; ".join(clean))
        self._record(
            "policy.rejected",
            outcome="rejected",
            trigger=trigger,
            by=by,
            attempted_version=attempted,
            policy_version=serving,
            problems=list(clean),
        )
        return PolicyRejected(clean, attempted)

    def _attempted_version(self) -> str | None:
        """The content hash of what is on disk now, if the files can be read at all."""
        try:
            files = [(p.name, p.read_bytes()) for p in policy_files(self._directory)]
        except (OSError, PolicyError):
            return None
        return compute_version(files) if files else None

    def _record(self, event: str, **fields: object) -> None:
        if self._decisions is not None:
            self._decisions.record(event, **fields)

    def _now_iso(self) -> str:
        return datetime.fromtimestamp(self._clock.now(), UTC).isoformat(timespec="milliseconds")

    @staticmethod
    def _log_warnings(loaded: LoadedPolicy) -> None:
        for warning in loaded.warnings:
            log.warning("policy lint: %s", warning)

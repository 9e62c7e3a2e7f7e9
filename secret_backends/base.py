"""The plug-in point for secret stores: a backend resolves a `SecretRef` to a versioned `Secret`.

Backends are synchronous (hvac and boto3 are); the credential cache calls them from worker
threads, never on the event loop. Each backend translates its SDK's exceptions at its edge into
the errors below, whose messages never contain a secret value.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol, runtime_checkable

from broker.types import Sensitive


@dataclass(frozen=True, slots=True)
class SecretRef:
    """Where a credential lives. `backend` is the configured backend's name."""

    backend: str
    path: str
    """Vault: the KV v2 path under the mount (or a dynamic-secret path); AWS: name or ARN."""
    field: str | None = None
    """One field of a structured secret (KV v2 data key, or a key of an AWS JSON secret)."""
    version: str | None = None
    """Pin a specific version id; None means the current one."""
    stage: str | None = None
    """AWS staging label (AWSCURRENT, AWSPREVIOUS, AWSPENDING); None means the current one."""
    _hash: int = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The credential cache looks refs up on every fetch: hash once, not per lookup.
        object.__setattr__(
            self, "_hash", hash((self.backend, self.path, self.field, self.version, self.stage))
        )

    def __hash__(self) -> int:
        return self._hash


@dataclass(frozen=True, slots=True)
class Secret:
    """One immutable version of a secret. Its repr never shows a value."""

    ref: SecretRef
    version_id: str
    fields: Mapping[str, Sensitive]
    """The secret's named fields; a plain-string secret has the single field ``value``."""
    stage: str | None = None
    created_at: float | None = None
    """Wall-clock seconds, when the store says."""
    expires_at: float | None = None
    """Wall-clock seconds when a lease ends (dynamic secrets); never cache past it."""
    lease_id: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "fields", MappingProxyType(dict(self.fields)))

    @property
    def value(self) -> Sensitive:
        """The selected field (`ref.field`), or the single ``value`` field."""
        name = self.ref.field or "value"
        try:
            return self.fields[name]
        except KeyError:
            raise SecretNotFound(f"secret has no field {name!r}") from None


class SecretBackendError(Exception):
    """Base of backend errors. `condition` is a short, safe word for metrics and error bodies."""

    condition = "error"

    def __init__(self, message: str, *, debug: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.debug = debug


class SecretNotFound(SecretBackendError):
    condition = "not_found"


class SecretAccessDenied(SecretBackendError):
    condition = "denied"


class BackendUnavailable(SecretBackendError):
    condition = "unavailable"


class BackendThrottled(SecretBackendError):
    condition = "throttled"


@runtime_checkable
class SecretBackend(Protocol):
    @property
    def name(self) -> str: ...

    def read(self, ref: SecretRef) -> Secret:
        """Read the referenced version (blocking). Raises a `SecretBackendError`."""
        ...

    def current_version(self, ref: SecretRef) -> str | None:
        """The current version id, as cheaply as the store allows (a metadata read), or None
        when the store cannot tell without a full read (then callers re-read on refresh)."""
        ...

    def close(self) -> None: ...


def quiet_sdk_loggers(names: Iterable[str]) -> None:
    """Raise the named SDK loggers to WARNING (never lower them).

    SDKs log request and response bodies at DEBUG (botocore logs every response body, which for
    Secrets Manager holds the secret). Backends call this at construction so that turning on
    DEBUG for the root logger, or for these loggers before the backend exists, cannot put secret
    values into logs. Setting one of them back to DEBUG afterwards defeats this: don't.
    """
    for name in names:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:
            logger.setLevel(logging.WARNING)

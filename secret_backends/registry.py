"""Build the configured secret backends, by `kind`."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from broker.clock import Clock
from secret_backends.base import SecretBackend
from secret_backends.config import (
    AwsSecretsManagerConfig,
    FileBackendConfig,
    SecretBackendConfig,
    VaultBackendConfig,
)


def build_secret_backend(
    config: SecretBackendConfig, *, allow_development: bool, clock: Clock | None = None
) -> SecretBackend:
    """One backend for one configuration entry. SDK modules are imported only when used."""
    if isinstance(config, VaultBackendConfig):
        from secret_backends.vault import VaultBackend

        return VaultBackend(config, clock=clock)
    if isinstance(config, AwsSecretsManagerConfig):
        from secret_backends.aws import AwsSecretsManagerBackend

        return AwsSecretsManagerBackend(config)
    if isinstance(config, FileBackendConfig):
        if not allow_development:
            raise ValueError(
                f"secret backend {config.name!r}: kind 'file' keeps secrets in a plain file and "
                "is for development only; set allow_development_components: true to use it"
            )
        from secret_backends.file import FileBackend

        return FileBackend(config)
    raise ValueError(f"unknown secret backend kind {getattr(config, 'kind', None)!r}")


def build_secret_backends(
    configs: Iterable[SecretBackendConfig],
    *,
    allow_development: bool,
    clock: Clock | None = None,
) -> dict[str, SecretBackend]:
    """Name -> backend for every configuration entry.

    Raises `ValueError` on duplicate names, on a development-only backend (``kind: file``)
    without `allow_development`, or when a backend cannot be constructed; backends already
    built are closed first.
    """
    backends: dict[str, SecretBackend] = {}
    try:
        for config in configs:
            if config.name in backends:
                raise ValueError(f"secret backend name {config.name!r} is used twice")
            backends[config.name] = build_secret_backend(
                config, allow_development=allow_development, clock=clock
            )
    except BaseException:
        for backend in backends.values():
            with contextlib.suppress(Exception):
                backend.close()
        raise
    return backends

"""Secret stores: one module per store (Vault/OpenBao, AWS Secrets Manager, development file)."""

from secret_backends.base import (
    BackendThrottled,
    BackendUnavailable,
    Secret,
    SecretAccessDenied,
    SecretBackend,
    SecretBackendError,
    SecretNotFound,
    SecretRef,
)

__all__ = [
    "BackendThrottled",
    "BackendUnavailable",
    "Secret",
    "SecretAccessDenied",
    "SecretBackend",
    "SecretBackendError",
    "SecretNotFound",
    "SecretRef",
]

"""Configuration of the secret backends: one entry per configured store, discriminated by `kind`.

```yaml
secret_backends:
  - name: vault
    kind: vault
    address: https://vault.internal.example:8200
    mount: secret                 # a KV version 2 mount
    auth: {method: approle, role_id: 6f0c..., secret_id_ref: file:/run/secrets/vault-secret-id}
  - name: aws
    kind: aws_secrets_manager
    region: eu-west-1             # credentials: the standard AWS chain, never this file
  - name: local
    kind: file                    # development only (allow_development_components)
    path: var/dev/secrets.yaml
```

Credentials the broker itself needs (a Vault token, an AppRole secret id) never appear inline:
they are references, ``env:NAME`` or ``file:/absolute/path``, resolved each time they are used
(`resolve_secret_reference`), so a rotated file or variable is picked up without a restart.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from broker.types import Sensitive
from broker.urls import require_https_unless_loopback
from secret_backends.base import SecretAccessDenied

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
SECRET_REFERENCE_PATTERN = r"^(env:[A-Za-z_][A-Za-z0-9_]*|file:/.+)$"  # noqa: S105
_MOUNT_PATTERN = r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$"

SecretReference = Annotated[
    str,
    Field(pattern=SECRET_REFERENCE_PATTERN, description="env:VARIABLE or file:/absolute/path"),
]


def _require_https_unless_loopback(url: str) -> str:
    return require_https_unless_loopback(url).rstrip("/")


def resolve_secret_reference(reference: str) -> Sensitive:
    """Read an ``env:NAME`` / ``file:/path`` reference now (file content is stripped).

    Raises `SecretAccessDenied` (naming the reference, never a value) when it is unset or empty.
    """
    kind, _, target = reference.partition(":")
    if kind == "env":
        value = os.environ.get(target, "").strip()
    elif kind == "file":
        try:
            value = Path(target).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            raise SecretAccessDenied(
                f"cannot read the credential reference {reference!r}"
            ) from None
    else:
        raise ValueError(f"{reference!r} is not an env: or file: reference")
    if not value:
        raise SecretAccessDenied(f"the credential reference {reference!r} is unset or empty")
    return Sensitive(value)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class VaultTokenAuth(_Strict):
    """Authenticate with a Vault token (for example one a Vault Agent sink file keeps fresh)."""

    method: Literal["token"] = "token"
    token_ref: SecretReference


class VaultAppRoleAuth(_Strict):
    """Authenticate with AppRole; the broker logs in again whenever its token is lost."""

    method: Literal["approle"] = "approle"
    mount: str = Field("approle", pattern=_MOUNT_PATTERN, description="The AppRole auth mount.")
    role_id: str = Field(min_length=1, description="Not a secret by itself; the secret id is.")
    secret_id_ref: SecretReference


VaultAuth = Annotated[VaultTokenAuth | VaultAppRoleAuth, Field(discriminator="method")]


class VaultBackendConfig(_Strict):
    """HashiCorp Vault or OpenBao: KV version 2 secrets, and leased (dynamic) secrets."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["vault"] = "vault"
    address: str = Field(description="e.g. https://vault.internal.example:8200")
    mount: str = Field("secret", pattern=_MOUNT_PATTERN, description="The KV version 2 mount.")
    namespace: str | None = Field(None, description="Vault Enterprise / OpenBao namespace.")
    timeout_seconds: float = Field(5.0, gt=0.0, le=120.0)
    tls_ca_file: Path | None = Field(None, description="CA bundle for the server certificate.")
    auth: VaultAuth
    renew_before_seconds: float = Field(
        60.0,
        ge=0.0,
        description="Renew the broker's own token when less TTL than this is left "
        "(at most half of the token's TTL).",
    )

    @field_validator("address")
    @classmethod
    def _https(cls, value: str) -> str:
        return _require_https_unless_loopback(value)


class AwsSecretsManagerConfig(_Strict):
    """AWS Secrets Manager. Credentials come from the standard AWS chain (environment, profile,
    web identity, container or instance role), never from this configuration."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["aws_secrets_manager"] = "aws_secrets_manager"
    region: str | None = Field(
        None, pattern=r"^[a-z0-9-]+$", description="Defaults to the AWS chain's region."
    )
    endpoint_url: str | None = Field(
        None, description="Another endpoint (VPC endpoint, or moto/LocalStack on loopback)."
    )
    profile: str | None = Field(None, description="A named profile of the shared AWS config.")
    connect_timeout_seconds: float = Field(5.0, gt=0.0, le=120.0)
    read_timeout_seconds: float = Field(10.0, gt=0.0, le=300.0)
    max_attempts: int = Field(3, ge=1, le=10, description="botocore 'standard' retry attempts.")

    @field_validator("endpoint_url")
    @classmethod
    def _https(cls, value: str | None) -> str | None:
        return None if value is None else _require_https_unless_loopback(value)


class FileBackendConfig(_Strict):
    """DEVELOPMENT ONLY: secrets in a plain YAML/JSON file. See `secret_backends.file`."""

    name: str = Field(pattern=NAME_PATTERN)
    kind: Literal["file"] = "file"
    path: Path


SecretBackendConfig = Annotated[
    VaultBackendConfig | AwsSecretsManagerConfig | FileBackendConfig,
    Field(discriminator="kind"),
]

"""Secret backend configuration models, credential references, and the backend registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import TypeAdapter, ValidationError

from secret_backends import SecretAccessDenied, SecretBackend
from secret_backends.aws import AwsSecretsManagerBackend
from secret_backends.config import (
    AwsSecretsManagerConfig,
    FileBackendConfig,
    SecretBackendConfig,
    VaultAppRoleAuth,
    VaultBackendConfig,
    VaultTokenAuth,
    resolve_secret_reference,
)
from secret_backends.file import FileBackend
from secret_backends.registry import build_secret_backends
from secret_backends.vault import VaultBackend

ADAPTER: TypeAdapter[Any] = TypeAdapter(list[SecretBackendConfig])


def parse(*entries: dict[str, Any]) -> list[Any]:
    return ADAPTER.validate_python(list(entries))


VAULT = {
    "name": "vault",
    "kind": "vault",
    "address": "https://vault.internal.example:8200/",
    "auth": {"method": "token", "token_ref": "env:VAULT_TOKEN"},
}


def test_vault_token_config_defaults() -> None:
    (config,) = parse(VAULT)
    assert isinstance(config, VaultBackendConfig)
    assert config.address == "https://vault.internal.example:8200"
    assert config.mount == "secret"
    assert config.namespace is None
    assert config.renew_before_seconds == 60
    assert config.timeout_seconds > 0
    assert config.auth == VaultTokenAuth(token_ref="env:VAULT_TOKEN")


def test_vault_approle_config() -> None:
    (config,) = parse(
        {
            **VAULT,
            "namespace": "team-a",
            "mount": "kv/apps",
            "auth": {
                "method": "approle",
                "role_id": "6f0c1d2e",
                "secret_id_ref": "file:/run/secrets/secret-id",
            },
        }
    )
    assert isinstance(config.auth, VaultAppRoleAuth)
    assert config.auth.mount == "approle"
    assert config.auth.secret_id_ref == "file:/run/secrets/secret-id"
    assert config.mount == "kv/apps"


@pytest.mark.parametrize(
    "address", ["http://127.0.0.1:8200", "http://localhost:8200", "https://vault.example"]
)
def test_vault_address_https_or_loopback(address: str) -> None:
    (config,) = parse({**VAULT, "address": address})
    assert config.address == address


@pytest.mark.parametrize(
    "change",
    [
        {"address": "http://vault.internal.example:8200"},
        {"name": "Vault"},
        {"name": "-vault"},
        {"kind": "hashicorp"},
        {"mount": "/secret/"},
        {"unknown": 1},
        {"auth": {"method": "token", "token_ref": "hvs.inline-token-value"}},
        {"auth": {"method": "token", "token_ref": "file:relative/path"}},
        {"auth": {"method": "token", "token": "hvs.inline"}},
        {"auth": {"method": "userpass", "token_ref": "env:X"}},
        {"auth": {"method": "approle", "role_id": "r", "secret_id": "inline"}},
        {"timeout_seconds": 0},
        {"renew_before_seconds": -1},
    ],
)
def test_vault_config_rejects(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse({**VAULT, **change})


def test_configs_are_frozen() -> None:
    (config,) = parse(VAULT)
    with pytest.raises(ValidationError):
        config.mount = "other"


def test_aws_config() -> None:
    (config,) = parse(
        {"name": "aws", "kind": "aws_secrets_manager", "endpoint_url": "http://127.0.0.1:5000"}
    )
    assert isinstance(config, AwsSecretsManagerConfig)
    assert config.region is None and config.profile is None
    assert config.max_attempts == 3


@pytest.mark.parametrize(
    "change",
    [
        {"endpoint_url": "http://secretsmanager.example"},
        {"aws_access_key_id": "AKIA..."},
        {"aws_secret_access_key": "x"},
        {"region": "EU WEST"},
        {"max_attempts": 0},
    ],
)
def test_aws_config_rejects(change: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        parse({"name": "aws", "kind": "aws_secrets_manager", **change})


def test_file_config() -> None:
    (config,) = parse({"name": "local", "kind": "file", "path": "var/dev/secrets.yaml"})
    assert isinstance(config, FileBackendConfig)
    assert config.path == Path("var/dev/secrets.yaml")


def test_resolve_references(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEST_REF_TOKEN", "canary-env-value")
    assert resolve_secret_reference("env:TEST_REF_TOKEN").reveal() == "canary-env-value"
    path = tmp_path / "token"
    path.write_text("canary-file-value\n")
    assert resolve_secret_reference(f"file:{path}").reveal() == "canary-file-value"

    monkeypatch.delenv("TEST_REF_TOKEN")
    with pytest.raises(SecretAccessDenied, match="env:TEST_REF_TOKEN"):
        resolve_secret_reference("env:TEST_REF_TOKEN")
    with pytest.raises(SecretAccessDenied, match="cannot read"):
        resolve_secret_reference(f"file:{tmp_path / 'missing'}")
    path.write_text("  \n")
    with pytest.raises(SecretAccessDenied, match="empty"):
        resolve_secret_reference(f"file:{path}")


def test_registry_builds_each_kind(tmp_path: Path) -> None:
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text("a: b\n")
    configs = parse(
        {**VAULT, "address": "http://127.0.0.1:1"},
        {"name": "aws", "kind": "aws_secrets_manager", "region": "eu-west-1"},
        {"name": "local", "kind": "file", "path": str(secrets_file)},
    )
    backends = build_secret_backends(configs, allow_development=True)
    try:
        assert list(backends) == ["vault", "aws", "local"]
        assert isinstance(backends["vault"], VaultBackend)
        assert isinstance(backends["aws"], AwsSecretsManagerBackend)
        assert isinstance(backends["local"], FileBackend)
        for name, backend in backends.items():
            assert isinstance(backend, SecretBackend)
            assert backend.name == name
    finally:
        for backend in backends.values():
            backend.close()


def test_registry_refuses_file_backend_outside_development(tmp_path: Path) -> None:
    secrets_file = tmp_path / "secrets.yaml"
    secrets_file.write_text("a: b\n")
    configs = parse({"name": "local", "kind": "file", "path": str(secrets_file)})
    with pytest.raises(ValueError, match="development only"):
        build_secret_backends(configs, allow_development=False)


def test_registry_refuses_duplicate_names() -> None:
    configs = parse(
        {**VAULT, "address": "http://127.0.0.1:1"},
        {"name": "vault", "kind": "aws_secrets_manager", "region": "eu-west-1"},
    )
    with pytest.raises(ValueError, match="used twice"):
        build_secret_backends(configs, allow_development=False)


def test_registry_reports_unusable_backend(tmp_path: Path) -> None:
    configs = parse({"name": "local", "kind": "file", "path": str(tmp_path / "missing.yaml")})
    with pytest.raises(ValueError, match="cannot read"):
        build_secret_backends(configs, allow_development=True)

"""Client authentication pieces that need no server: Basic parsing and secret references."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from broker.client_auth import SecretReferenceResolver, _parse_basic
from broker.errors import InvalidClient


def _basic(raw: str) -> str:
    return "Basic " + base64.b64encode(raw.encode()).decode()


def test_basic_credentials_are_form_decoded() -> None:
    client_id, secret = _parse_basic(_basic("my%20agent:p%3Ass"))
    assert client_id == "my agent"
    assert secret.reveal() == "p:ss"
    assert "p:ss" not in repr(secret)


@pytest.mark.parametrize(
    "header", ["Bearer x", "Basic", "Basic !!!", _basic("no-colon"), _basic(":secret")]
)
def test_malformed_basic_is_invalid_client(header: str) -> None:
    with pytest.raises(InvalidClient):
        _parse_basic(header)


def test_secret_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    resolver = SecretReferenceResolver(ttl_seconds=0.01)
    monkeypatch.setenv("AGENT_SECRET", "from-env")
    assert resolver.resolve("env:AGENT_SECRET").reveal() == "from-env"  # type: ignore[union-attr]
    assert resolver.resolve("env:MISSING_SECRET") is None
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-file\n")
    assert resolver.resolve(f"file:{secret_file}").reveal() == "from-file"  # type: ignore[union-attr]
    assert resolver.resolve(f"file:{tmp_path / 'missing'}") is None

"""The development file backend: formats, versions, reloading, and errors free of values."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from secret_backends import BackendUnavailable, SecretBackend, SecretNotFound, SecretRef
from secret_backends.config import FileBackendConfig
from secret_backends.file import FileBackend

CANARY = "canary-file-9f3b2c"


def backend_for(path: Path, content: str) -> FileBackend:
    path.write_text(content)
    return FileBackend(FileBackendConfig(name="local", path=path))


def ref(path: str, **kwargs: str) -> SecretRef:
    return SecretRef(backend="local", path=path, **kwargs)


def rewrite(path: Path, content: str) -> None:
    """Replace the content and move the mtime forward, as an editor saving later would."""
    before = path.stat().st_mtime_ns
    path.write_text(content)
    os.utime(path, ns=(before + 5_000_000_000, before + 5_000_000_000))


def test_strings_and_field_mappings(tmp_path: Path) -> None:
    backend = backend_for(
        tmp_path / "secrets.yaml",
        f"openai/key: {CANARY}\n"
        "db:\n  username: app\n  password: pw-1\n  port: 5432\n  tls: true\n",
    )
    assert isinstance(backend, SecretBackend)
    secret = backend.read(ref("openai/key"))
    assert secret.value.reveal() == CANARY
    assert set(secret.fields) == {"value"}
    assert CANARY not in repr(secret)
    assert secret.version_id.startswith("sha256:")
    assert backend.current_version(ref("openai/key")) == secret.version_id

    db = backend.read(ref("db", field="password"))
    assert db.value.reveal() == "pw-1"
    assert {k: v.reveal() for k, v in db.fields.items()} == {
        "username": "app",
        "password": "pw-1",
        "port": "5432",
        "tls": "true",
    }


def test_json_file(tmp_path: Path) -> None:
    backend = backend_for(
        tmp_path / "secrets.json", json.dumps({"a": {"token": CANARY}, "b": "plain"})
    )
    assert backend.read(ref("a", field="token")).value.reveal() == CANARY
    assert backend.read(ref("b")).value.reveal() == "plain"


def test_not_found_cases(tmp_path: Path) -> None:
    backend = backend_for(tmp_path / "secrets.yaml", "db: {username: app}\n")
    with pytest.raises(SecretNotFound, match="not found"):
        backend.read(ref("missing"))
    with pytest.raises(SecretNotFound):
        backend.current_version(ref("missing"))
    with pytest.raises(SecretNotFound, match="no field 'password'"):
        backend.read(ref("db", field="password"))
    with pytest.raises(SecretNotFound, match="no version"):
        backend.read(ref("db", version="sha256:0000"))
    with pytest.raises(SecretNotFound, match="staging labels"):
        backend.read(ref("db", stage="AWSCURRENT"))


def test_versions_list_last_is_current_and_older_can_be_pinned(tmp_path: Path) -> None:
    backend = backend_for(
        tmp_path / "secrets.yaml",
        "token:\n  versions:\n    - old-token\n    - {value: new-token, note: rotated}\n",
    )
    current = backend.read(ref("token"))
    assert current.value.reveal() == "new-token"
    assert current.fields["note"].reveal() == "rotated"
    plain = backend_for(tmp_path / "plain.yaml", "token: old-token\n")
    old_id = plain.current_version(ref("token"))
    assert old_id is not None and old_id != current.version_id
    pinned = backend.read(ref("token", version=old_id))
    assert pinned.value.reveal() == "old-token"
    assert pinned.version_id == old_id
    assert backend.current_version(ref("token", version=old_id)) == old_id


def test_version_id_is_a_content_hash(tmp_path: Path) -> None:
    one = backend_for(tmp_path / "one.yaml", "a: {x: '1', y: '2'}\nb: same\n")
    two = backend_for(tmp_path / "two.yaml", "a: {y: '2', x: '1'}\nc: same\n")
    assert one.current_version(ref("a")) == two.current_version(ref("a"))
    assert one.current_version(ref("b")) == two.current_version(ref("c"))
    assert one.current_version(ref("a")) != one.current_version(ref("b"))


def test_reloads_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yaml"
    backend = backend_for(path, "a: one\nb: stays\n")
    first = backend.current_version(ref("a"))
    unchanged = backend.current_version(ref("b"))

    rewrite(path, "a: two\nb: stays\n")
    assert backend.read(ref("a")).value.reveal() == "two"
    assert backend.current_version(ref("a")) != first
    assert backend.current_version(ref("b")) == unchanged


def test_quick_same_size_rewrite_is_not_missed(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yaml"
    backend = backend_for(path, "a: one\n")
    stat = path.stat()
    path.write_text("a: two\n")  # same size, and force the very same mtime
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert backend.read(ref("a")).value.reveal() == "two"


def test_invalid_file_at_startup_is_a_value_error_without_content(tmp_path: Path) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(f"a: [{CANARY}\n")
    with pytest.raises(ValueError, match="invalid YAML at line") as caught:
        FileBackend(FileBackendConfig(name="local", path=path))
    assert CANARY not in str(caught.value)

    path.write_text(f"a: {{nested: {{deeper: {CANARY}}}}}\n")
    with pytest.raises(ValueError, match="field values must be") as caught:
        FileBackend(FileBackendConfig(name="local", path=path))
    assert CANARY not in str(caught.value)

    path.write_text(f"- {CANARY}\n")
    with pytest.raises(ValueError, match="mapping"):
        FileBackend(FileBackendConfig(name="local", path=path))

    path.write_text("a: null\n")
    with pytest.raises(ValueError, match="string or a mapping"):
        FileBackend(FileBackendConfig(name="local", path=path))

    with pytest.raises(ValueError, match="cannot read"):
        FileBackend(FileBackendConfig(name="local", path=tmp_path / "missing.yaml"))


def test_file_broken_later_is_unavailable_until_fixed(tmp_path: Path) -> None:
    path = tmp_path / "secrets.json"
    backend = backend_for(path, json.dumps({"a": "one"}))
    rewrite(path, '{"a": "' + CANARY + '"')
    with pytest.raises(BackendUnavailable) as caught:
        backend.read(ref("a"))
    assert CANARY not in str(caught.value)
    assert CANARY not in (caught.value.debug or "")
    assert "invalid JSON" in (caught.value.debug or "")

    rewrite(path, json.dumps({"a": "fixed"}))
    assert backend.read(ref("a")).value.reveal() == "fixed"

    path.unlink()
    with pytest.raises(BackendUnavailable):
        backend.current_version(ref("a"))


def test_empty_file_has_no_secrets(tmp_path: Path) -> None:
    backend = backend_for(tmp_path / "secrets.yaml", "")
    with pytest.raises(SecretNotFound):
        backend.read(ref("a"))

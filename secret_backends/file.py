"""DEVELOPMENT ONLY: secrets in a plain YAML or JSON file. NEVER USE THIS IN PRODUCTION.

The file holds secret values in clear text, with no access control, audit or rotation: it exists
so that `make dev` and tests work without a secret store. `build_secret_backends` refuses it
unless development components are allowed.

Format (JSON when the name ends in ``.json``, YAML otherwise), a mapping of secret path to:

```yaml
openai/api-key: sk-dev-123               # a string: the single field `value`
tickets/db:                              # a mapping: one field per key (scalars only)
  username: app
  password: dev-password
rotating/token:                          # versions, oldest first; the last one is current
  versions:
    - old-token
    - {value: new-token}
```

``version_id`` is ``sha256:`` + the first 32 hex digits of the SHA-256 of the version's fields
(canonical JSON), so it changes exactly when the value does and can be pinned with
`SecretRef.version`. (An unkeyed hash of a weak value can be guessed from the id; acceptable
for development data only.) `SecretRef.stage` is refused. Non-string scalars become their JSON
text (``true``, ``5432``); ``null`` is not allowed.

The file is re-read whenever its modification time, size or inode changes (and, while its
mtime is within the last two seconds, whenever its bytes change, so that quick same-size
rewrites are not missed). A file that becomes unreadable or invalid makes calls fail with
`BackendUnavailable` until it is fixed; parse errors are reported by position only, never with
the offending text.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from broker.types import Sensitive
from secret_backends.base import BackendUnavailable, Secret, SecretNotFound, SecretRef
from secret_backends.config import FileBackendConfig

_RACY_WINDOW_NS = 2_000_000_000


class InvalidSecretsFile(ValueError):
    """The file is not a valid secrets file. The message never quotes file content."""


@dataclass(frozen=True, slots=True)
class _Version:
    version_id: str
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class _Snapshot:
    signature: tuple[int, int, int]
    loaded_at_ns: int
    digest: str
    secrets: Mapping[str, tuple[_Version, ...]]


def _field_text(value: object, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    raise InvalidSecretsFile(f"{where}: field values must be strings, numbers or booleans")


def _version(value: object, where: str) -> _Version:
    if isinstance(value, str):
        fields = {"value": value}
    elif isinstance(value, Mapping):
        if not value:
            raise InvalidSecretsFile(f"{where}: a secret needs at least one field")
        fields = {str(k): _field_text(v, f"{where}.{k}") for k, v in value.items()}
    else:
        raise InvalidSecretsFile(f"{where}: a secret is a string or a mapping of fields")
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return _Version("sha256:" + hashlib.sha256(canonical).hexdigest()[:32], fields)


def _versions(path: str, value: object) -> tuple[_Version, ...]:
    if isinstance(value, Mapping) and isinstance(value.get("versions"), list | Mapping):
        if set(value) != {"versions"} or not isinstance(value["versions"], list):
            raise InvalidSecretsFile(f"{path!r}: 'versions' must be the only key, and a list")
        if not value["versions"]:
            raise InvalidSecretsFile(f"{path!r}: 'versions' is empty")
        return tuple(
            _version(v, f"{path!r} version {i + 1}") for i, v in enumerate(value["versions"])
        )
    return (_version(value, repr(path)),)


def parse_secrets_file(content: bytes, *, json_format: bool) -> dict[str, tuple[_Version, ...]]:
    """Parse the file's bytes. Raises `InvalidSecretsFile` with a message free of content."""
    try:
        text = content.decode("utf-8")
        document = json.loads(text) if json_format else yaml.safe_load(text)
    except UnicodeDecodeError:
        raise InvalidSecretsFile("the file is not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise InvalidSecretsFile(f"invalid JSON at line {exc.lineno} column {exc.colno}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise InvalidSecretsFile(f"invalid YAML{where}") from None
    if document is None:
        return {}
    if not isinstance(document, Mapping):
        raise InvalidSecretsFile("the file must be a mapping of secret path to secret")
    return {str(path): _versions(str(path), value) for path, value in document.items()}


class FileBackend:
    """DEVELOPMENT ONLY `SecretBackend` over a YAML/JSON file (see the module docstring)."""

    def __init__(self, config: FileBackendConfig) -> None:
        """Loads the file now: a missing or invalid file is a `ValueError` at startup."""
        self._config = config
        self._path = Path(config.path)
        self._json = self._path.suffix.lower() == ".json"
        self._lock = threading.Lock()
        try:
            self._snapshot = self._load()
        except (OSError, InvalidSecretsFile) as exc:
            raise ValueError(f"file backend {config.name!r}: {self._describe(exc)}") from None

    @property
    def name(self) -> str:
        return self._config.name

    def read(self, ref: SecretRef) -> Secret:
        version = self._select(ref)
        fields = {k: Sensitive(v) for k, v in version.fields.items()}
        if ref.field is not None and ref.field not in fields:
            raise SecretNotFound(f"{self._what(ref)}: the secret has no field {ref.field!r}")
        return Secret(ref=ref, version_id=version.version_id, fields=fields)

    def current_version(self, ref: SecretRef) -> str | None:
        return self._select(ref).version_id

    def close(self) -> None:
        return None

    def _select(self, ref: SecretRef) -> _Version:
        what = self._what(ref)
        if ref.stage is not None:
            raise SecretNotFound(f"{what}: staging labels are not supported")
        versions = self._current().secrets.get(ref.path)
        if versions is None:
            raise SecretNotFound(f"{what}: not found")
        if ref.version is None:
            return versions[-1]
        for version in versions:
            if version.version_id == ref.version:
                return version
        raise SecretNotFound(f"{what}: no version {ref.version!r}")

    def _what(self, ref: SecretRef) -> str:
        return f"file backend {self.name!r}: {ref.path!r}"

    def _describe(self, exc: Exception) -> str:
        if isinstance(exc, InvalidSecretsFile):
            return f"{self._path}: {exc}"
        if isinstance(exc, OSError):
            return f"cannot read {self._path} ({exc.strerror or type(exc).__name__})"
        return f"{self._path}: {type(exc).__name__}"

    def _current(self) -> _Snapshot:
        with self._lock:
            try:
                stat = os.stat(self._path)
                signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
                snapshot = self._snapshot
                if signature != snapshot.signature:
                    self._snapshot = self._load()
                elif stat.st_mtime_ns + _RACY_WINDOW_NS >= snapshot.loaded_at_ns:
                    content = self._path.read_bytes()
                    if hashlib.sha256(content).hexdigest() != snapshot.digest:
                        self._snapshot = self._load(content)
            except (OSError, InvalidSecretsFile) as exc:
                raise BackendUnavailable(
                    f"file backend {self.name!r}: the secrets file is unusable",
                    debug=self._describe(exc),
                ) from None
            return self._snapshot

    def _load(self, content: bytes | None = None) -> _Snapshot:
        loaded_at_ns = time.time_ns()
        stat = os.stat(self._path)
        if content is None:
            content = self._path.read_bytes()
        return _Snapshot(
            signature=(stat.st_mtime_ns, stat.st_size, stat.st_ino),
            loaded_at_ns=loaded_at_ns,
            digest=hashlib.sha256(content).hexdigest(),
            secrets=parse_secrets_file(content, json_format=self._json),
        )

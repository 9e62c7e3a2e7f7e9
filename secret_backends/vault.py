"""HashiCorp Vault / OpenBao backend (hvac): KV version 2 secrets and leased (dynamic) secrets.

`SecretRef` conventions
-----------------------
- **KV v2** (the default): ``path`` is the secret's path under the configured `mount` (no
  ``data/`` segment): ``SecretRef("vault", "apps/tickets", field="api_key")`` reads
  ``<mount>/data/apps/tickets``. ``version="3"`` pins KV version 3; ``version_id`` is the KV
  version number as a string and ``created_at`` its ``created_time``. `current_version` reads
  only the metadata (``<mount>/metadata/<path>``), never the data, so the broker's policy needs
  ``read`` on both ``<mount>/data/<path>`` and ``<mount>/metadata/<path>`` (without the latter,
  `current_version` is `SecretAccessDenied`). A soft-deleted or destroyed version is not found.
- **Leased / dynamic secrets**: ``path`` starts with ``dynamic:`` followed by the full API path
  from the root of Vault, e.g. ``SecretRef("vault", "dynamic:database/creds/readonly")``. It is
  read with a plain ``GET /v1/<path>`` (database, AWS, RabbitMQ, Consul… credential endpoints,
  or KV version 1 with a ``ttl``). ``fields`` are the response's ``data``; ``expires_at`` is now +
  ``lease_duration``; ``lease_id`` the lease; ``version_id`` Vault's request id, unique per
  read (not the lease id, which `Secret` keeps out of its repr; reads with a lease always come
  with a request id). Every read creates a new lease, so `current_version` returns None
  (callers re-read), and ``version`` cannot be pinned. Only GET endpoints are supported. The
  backend neither renews nor revokes these leases: a cache must drop the secret by
  ``expires_at``.
- ``stage`` (an AWS notion) is refused with `SecretNotFound`.
- Values that are not strings (numbers, booleans, nested objects) become their compact JSON;
  ``null`` values are left out.

The broker's own token
----------------------
With ``auth.method: token`` the token is read from its reference when first needed; with
``approle`` the backend logs in with the role id and the referenced secret id. The token's TTL
(from ``lookup-self`` or the login response) gives a monotonic deadline; on the first call after
``TTL - min(renew_before_seconds, TTL / 2)`` has passed, the token is renewed (``renew-self``).
If renewal fails (expired, revoked, not renewable) or no longer extends the token (its max TTL
is reached), an AppRole backend logs in again. A call answered 403 is retried once after
re-authentication, but only when the token itself is no longer valid (``lookup-self`` fails too);
a plain policy denial is `SecretAccessDenied` at once. A token-auth backend re-reads its
reference on such failures (a Vault Agent may have written a new token) and otherwise reports
`SecretAccessDenied`; a token it may not look up (no ``default`` policy) is used without
renewal. `close()` revokes a token the backend obtained by AppRole login.

Errors and logging
------------------
hvac and requests exceptions are translated here: not found -> `SecretNotFound`, 401/403 ->
`SecretAccessDenied`, 429 -> `BackendThrottled`, 5xx, connection errors and timeouts ->
`BackendUnavailable`. Messages name the backend and path, never a value or token (the server's
error strings go to ``debug``). At construction the ``hvac``, ``urllib3`` and ``requests``
loggers are raised to WARNING (`quiet_sdk_loggers`), so enabling DEBUG logging cannot print
request or response details; do not lower them again.

Calls are blocking and thread-safe: a lock serialises (re)authentication and renewal.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import hvac
import hvac.exceptions
import requests

from broker.clock import Clock, SystemClock
from broker.types import Sensitive
from secret_backends.base import (
    BackendThrottled,
    BackendUnavailable,
    Secret,
    SecretAccessDenied,
    SecretBackendError,
    SecretNotFound,
    SecretRef,
    quiet_sdk_loggers,
)
from secret_backends.config import (
    VaultAppRoleAuth,
    VaultBackendConfig,
    VaultTokenAuth,
    resolve_secret_reference,
)

DYNAMIC_PREFIX = "dynamic:"
SDK_LOGGERS = ("hvac", "urllib3", "requests")

_T = TypeVar("_T")
_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$")
_UNAVAILABLE = (
    hvac.exceptions.VaultDown,
    hvac.exceptions.InternalServerError,
    hvac.exceptions.BadGateway,
    hvac.exceptions.VaultNotInitialized,
    hvac.exceptions.UnexpectedError,
)
_TOKEN_REJECTED = (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)
_LOGIN_REJECTED = (*_TOKEN_REJECTED, hvac.exceptions.InvalidRequest, hvac.exceptions.InvalidPath)
_SDK_ERRORS = (hvac.exceptions.VaultError, requests.exceptions.RequestException, ValueError)


def _debug(exc: BaseException) -> str:
    if isinstance(exc, hvac.exceptions.VaultError):
        errors = "; ".join(str(e) for e in exc.errors or []) or "no detail"
        return f"{type(exc).__name__} ({errors}) on {exc.method} {exc.url}"
    return f"{type(exc).__name__}: {exc}"


def translate_error(exc: Exception, what: str) -> SecretBackendError:
    """Map an hvac/requests exception to a backend error whose message is `what` + a reason."""
    if isinstance(exc, SecretBackendError):
        return exc
    if isinstance(exc, hvac.exceptions.InvalidPath):
        return SecretNotFound(f"{what}: not found", debug=_debug(exc))
    if isinstance(exc, _TOKEN_REJECTED):
        return SecretAccessDenied(f"{what}: permission denied", debug=_debug(exc))
    if isinstance(exc, hvac.exceptions.RateLimitExceeded):
        return BackendThrottled(f"{what}: rate limited by Vault", debug=_debug(exc))
    if isinstance(exc, hvac.exceptions.InvalidRequest):
        return SecretNotFound(f"{what}: Vault rejected the request", debug=_debug(exc))
    if isinstance(exc, _UNAVAILABLE):
        return BackendUnavailable(f"{what}: Vault is unavailable", debug=_debug(exc))
    if isinstance(exc, requests.exceptions.Timeout):
        return BackendUnavailable(f"{what}: Vault timed out", debug=_debug(exc))
    if isinstance(exc, requests.exceptions.RequestException):
        return BackendUnavailable(f"{what}: cannot reach Vault", debug=_debug(exc))
    if isinstance(exc, hvac.exceptions.VaultError):
        return BackendUnavailable(f"{what}: unexpected Vault error", debug=_debug(exc))
    return BackendUnavailable(f"{what}: unexpected response from Vault", debug=_debug(exc))


def _parse_time(value: object) -> float | None:
    """RFC 3339 with up to nanoseconds (Vault's format) -> epoch seconds; None if absent."""
    if not isinstance(value, str):
        return None
    match = _RFC3339.match(value)
    if match is None:
        return None
    base, fraction, zone = match.groups()
    text = base + (fraction or "")[:7] + ("+00:00" if zone == "Z" else zone)
    timestamp = datetime.fromisoformat(text).timestamp()
    return timestamp if timestamp > 0 else None


def _fields(data: object) -> dict[str, Sensitive]:
    if not isinstance(data, Mapping):
        raise TypeError("secret data is not an object")
    fields: dict[str, Sensitive] = {}
    for key, value in data.items():
        if value is None:
            continue
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        fields[str(key)] = Sensitive(text)
    return fields


def _clean_path(path: str) -> str:
    cleaned = path.strip("/")
    segments = cleaned.split("/")
    if not cleaned or any(s in {"", ".", ".."} for s in segments) or any(c in path for c in "?#"):
        raise SecretNotFound(f"invalid Vault secret path {path!r}")
    return cleaned


class VaultBackend:
    """A `SecretBackend` over one Vault/OpenBao server (see the module docstring)."""

    def __init__(self, config: VaultBackendConfig, *, clock: Clock | None = None) -> None:
        quiet_sdk_loggers(SDK_LOGGERS)
        if config.tls_ca_file is not None and not Path(config.tls_ca_file).is_file():
            raise ValueError(f"vault backend {config.name!r}: tls_ca_file does not exist")
        self._config = config
        self._clock = clock or SystemClock()
        # token="" keeps hvac from picking up VAULT_TOKEN or ~/.vault-token.
        self._client = hvac.Client(
            url=config.address,
            token="",
            verify=str(config.tls_ca_file) if config.tls_ca_file else True,
            timeout=config.timeout_seconds,
            namespace=config.namespace,
        )
        self._lock = threading.Lock()
        self._token: Sensitive | None = None
        self._generation = 0
        self._renewable = False
        self._ttl = 0
        self._renew_at: float | None = None

    @property
    def name(self) -> str:
        return self._config.name

    # ------------------------------------------------------------------ the protocol

    def read(self, ref: SecretRef) -> Secret:
        """Read a KV v2 version or a leased secret (blocking). Raises a `SecretBackendError`."""
        dynamic, path = self._parse(ref)
        if dynamic:
            return self._read_dynamic(ref, path)
        version = self._kv_version(ref)
        what = self._what("read", ref)
        response = self._call(
            what,
            lambda: self._client.secrets.kv.v2.read_secret_version(
                path=path,
                version=version,
                mount_point=self._config.mount,
                raise_on_deleted_version=True,
            ),
        )
        try:
            data = response["data"]
            if data.get("data") is None:
                raise SecretNotFound(f"{what}: version deleted or destroyed")
            metadata = data.get("metadata") or {}
            secret = Secret(
                ref=ref,
                version_id=str(int(metadata["version"])),
                fields=_fields(data["data"]),
                created_at=_parse_time(metadata.get("created_time")),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise translate_error(exc, what) from None
        return self._with_field(secret, what)

    def current_version(self, ref: SecretRef) -> str | None:
        """KV v2: the current version number from the metadata (no data read); a pinned
        version as given; dynamic secrets: None (every read is a new lease)."""
        dynamic, path = self._parse(ref)
        if dynamic:
            return None
        pinned = self._kv_version(ref)
        if pinned is not None:
            return str(pinned)
        what = self._what("read metadata of", ref)
        response = self._call(
            what,
            lambda: self._client.secrets.kv.v2.read_secret_metadata(
                path=path, mount_point=self._config.mount
            ),
        )
        try:
            data = response["data"]
            current = int(data["current_version"])
            info = (data.get("versions") or {}).get(str(current)) or {}
            deleted_at = _parse_time(info.get("deletion_time"))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise translate_error(exc, what) from None
        if current <= 0 or info.get("destroyed"):
            raise SecretNotFound(f"{what}: no current version")
        if deleted_at is not None and deleted_at <= self._clock.now():
            raise SecretNotFound(f"{what}: the current version is deleted")
        return str(current)

    def close(self) -> None:
        """Revoke a token obtained by AppRole login (best effort) and close connections."""
        with self._lock:
            if isinstance(self._config.auth, VaultAppRoleAuth) and self._token is not None:
                with contextlib.suppress(Exception):
                    self._client.auth.token.revoke_self()
            self._token = None
            self._client.token = ""
            self._renew_at = None
            self._generation += 1
        self._client.adapter.close()

    # ------------------------------------------------------------------ reads

    def _read_dynamic(self, ref: SecretRef, path: str) -> Secret:
        what = self._what("read", ref)
        response = self._call(what, lambda: self._client.read(path))
        if response is None:
            raise SecretNotFound(f"{what}: not found")
        try:
            lease_duration = int(response.get("lease_duration") or 0)
            lease_id = response.get("lease_id") or None
            version_id = response.get("request_id")
            if not version_id and lease_id:
                version_id = "lease-sha256:" + hashlib.sha256(lease_id.encode()).hexdigest()[:32]
            if not version_id:
                raise ValueError("response has neither a request id nor a lease id")
            secret = Secret(
                ref=ref,
                version_id=str(version_id),
                fields=_fields(response.get("data")),
                created_at=self._clock.now(),
                expires_at=self._clock.now() + lease_duration if lease_duration > 0 else None,
                lease_id=lease_id,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise translate_error(exc, what) from None
        return self._with_field(secret, what)

    def _parse(self, ref: SecretRef) -> tuple[bool, str]:
        if ref.stage is not None:
            raise SecretNotFound(
                f"vault backend {self.name!r}: staging labels are not supported ({ref.path!r})"
            )
        if ref.path.startswith(DYNAMIC_PREFIX):
            if ref.version is not None:
                raise SecretNotFound(
                    f"vault backend {self.name!r}: a dynamic secret has no versions to pin"
                    f" ({ref.path!r})"
                )
            return True, _clean_path(ref.path[len(DYNAMIC_PREFIX) :])
        return False, _clean_path(ref.path)

    def _kv_version(self, ref: SecretRef) -> int | None:
        if ref.version is None:
            return None
        if not ref.version.isdigit() or int(ref.version) <= 0:
            raise SecretNotFound(
                f"vault backend {self.name!r}: version {ref.version!r} of {ref.path!r} is not a "
                "KV version number"
            )
        return int(ref.version)

    def _what(self, action: str, ref: SecretRef) -> str:
        return f"vault backend {self.name!r}: {action} {ref.path!r}"

    @staticmethod
    def _with_field(secret: Secret, what: str) -> Secret:
        if secret.ref.field is not None and secret.ref.field not in secret.fields:
            raise SecretNotFound(f"{what}: the secret has no field {secret.ref.field!r}")
        return secret

    # ------------------------------------------------------------------ the broker's token

    def _call(self, what: str, operation: Callable[[], _T]) -> _T:
        """Run `operation` with a fresh token; after a 403 caused by a lost token, re-authenticate
        and retry once. Every SDK exception is translated."""
        try:
            generation = self._ensure_token()
            try:
                return operation()
            except _TOKEN_REJECTED:
                if not self._recover(generation):
                    raise
            return operation()
        except _SDK_ERRORS as exc:
            raise translate_error(exc, what) from None

    def _ensure_token(self) -> int:
        with self._lock:
            if self._token is None:
                self._authenticate()
            elif self._renew_at is not None and self._clock.monotonic() >= self._renew_at:
                self._renew()
            return self._generation

    def _recover(self, generation: int) -> bool:
        """After a 403: True if the token was replaced (retry the call), False if the denial
        is genuine or nothing better is available."""
        with self._lock:
            if generation != self._generation:
                return True  # another thread re-authenticated meanwhile
            auth = self._config.auth
            if isinstance(auth, VaultTokenAuth):
                token = resolve_secret_reference(auth.token_ref)
                if token == self._token:
                    return False
                self._adopt_token(token)
                return True
            if self._token_still_valid():
                return False
            self._login()
            return True

    def _authenticate(self) -> None:
        auth = self._config.auth
        if isinstance(auth, VaultTokenAuth):
            self._adopt_token(resolve_secret_reference(auth.token_ref))
        else:
            self._login()

    def _adopt_token(self, token: Sensitive) -> None:
        """Use a token from the reference; learn its TTL when it may look itself up."""
        self._set_token(token)
        try:
            data = self._client.auth.token.lookup_self()["data"]
        except _TOKEN_REJECTED:
            # Invalid, or lacking the default policy's lookup-self: calls will tell.
            self._schedule(0, renewable=False)
            return
        except BaseException:
            self._token = None  # Vault unreachable: adopt it (and learn its TTL) next time
            raise
        self._schedule(int(data.get("ttl") or 0), renewable=bool(data.get("renewable")))

    def _login(self) -> None:
        assert isinstance(self._config.auth, VaultAppRoleAuth)
        auth = self._config.auth
        secret_id = resolve_secret_reference(auth.secret_id_ref)
        self._client.token = ""
        try:
            response = self._client.auth.approle.login(
                role_id=auth.role_id,
                secret_id=secret_id.reveal(),
                mount_point=auth.mount,
                use_token=False,
            )
        except _LOGIN_REJECTED as exc:
            self._token = None
            raise SecretAccessDenied(
                f"vault backend {self.name!r}: AppRole login failed", debug=_debug(exc)
            ) from None
        result = response["auth"]
        self._set_token(Sensitive(result["client_token"]))
        self._schedule(int(result.get("lease_duration") or 0), bool(result.get("renewable")))

    def _renew(self) -> None:
        if not self._renewable:
            self._replace_lost_token(renewal_failed=False)
            return
        try:
            result = self._client.auth.token.renew_self()["auth"]
        except (*_TOKEN_REJECTED, hvac.exceptions.InvalidRequest):
            self._replace_lost_token(renewal_failed=True)
            return
        granted = self._ttl
        ttl = int(result.get("lease_duration") or 0)
        if 0 < ttl < granted:
            # Capped by the token's max TTL: renewing again will not help.
            if isinstance(self._config.auth, VaultAppRoleAuth):
                self._login()
                return
            self._schedule(ttl, renewable=False)
            return
        self._schedule(ttl if ttl > 0 else granted, bool(result.get("renewable")))

    def _replace_lost_token(self, *, renewal_failed: bool) -> None:
        """The token cannot be (usefully) renewed: log in again, or take a rotated token."""
        auth = self._config.auth
        if isinstance(auth, VaultAppRoleAuth):
            self._login()
            return
        token = resolve_secret_reference(auth.token_ref)
        if token != self._token:
            self._adopt_token(token)
            return
        self._renew_at = None  # nothing more to do; it works until it expires
        if renewal_failed:
            raise SecretAccessDenied(
                f"vault backend {self.name!r}: the Vault token could not be renewed "
                "(expired or revoked)"
            )

    def _token_still_valid(self) -> bool:
        try:
            self._client.auth.token.lookup_self()
        except _TOKEN_REJECTED:
            return False
        return True

    def _set_token(self, token: Sensitive) -> None:
        self._token = token
        self._client.token = token.reveal()
        self._generation += 1

    def _schedule(self, ttl: int, renewable: bool) -> None:
        """Plan the next renewal: `ttl` seconds from now the token expires (0: never)."""
        self._renewable = renewable
        self._ttl = max(ttl, 0)
        if ttl <= 0:
            self._renew_at = None
            return
        margin = min(self._config.renew_before_seconds, ttl / 2)
        self._renew_at = self._clock.monotonic() + ttl - margin

"""VaultBackend against a real OpenBao dev server (and, for leased secrets, real PostgreSQL).

Request counts come from OpenBao's own audit log, so "current_version reads only metadata" is
what the server saw, not what a wrapper believes.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hvac
import pytest

from secret_backends import (
    BackendThrottled,
    BackendUnavailable,
    SecretAccessDenied,
    SecretBackend,
    SecretBackendError,
    SecretNotFound,
    SecretRef,
)
from secret_backends.config import VaultAppRoleAuth, VaultBackendConfig, VaultTokenAuth
from secret_backends.vault import VaultBackend
from tests.support.servers import (
    OpenBaoServer,
    PostgresServer,
    enable_postgres_database_engine,
    revoke_leases,
    run_openbao,
    run_postgres,
)

READER_POLICY = """
path "secret/data/app/*" { capabilities = ["read"] }
path "secret/metadata/app/*" { capabilities = ["read"] }
path "database/creds/*" { capabilities = ["read"] }
path "kv1/*" { capabilities = ["read"] }
"""
ROLE_ID = "broker-role-id"
SECRET_ID = "broker-secret-id-" + uuid.uuid4().hex
TOKEN_ENV = "TEST_VAULT_BACKEND_TOKEN"
LOGIN = "auth/approle/login"
RENEW = "auth/token/renew-self"
LOOKUP = "auth/token/lookup-self"


def seed_approle(bao: OpenBaoServer, *, role: str = "broker", **role_options: Any) -> None:
    """The reader policy and an AppRole role with a fixed role id and secret id."""
    client = bao.client()
    client.sys.create_or_update_policy("reader", READER_POLICY)
    if "approle/" not in client.sys.list_auth_methods()["data"]:
        client.sys.enable_auth_method("approle")
    options = {"token_policies": ["reader"], "token_ttl": "60s", **role_options}
    client.write(f"auth/approle/role/{role}", **options)
    client.write(f"auth/approle/role/{role}/role-id", role_id=f"{ROLE_ID}-{role}")
    client.write(f"auth/approle/role/{role}/custom-secret-id", secret_id=SECRET_ID)


@pytest.fixture(scope="module")
def bao() -> Iterator[OpenBaoServer]:
    with run_openbao() as server:
        server.add_seeder(seed_approle)
        yield server


class ShiftClock:
    """System time plus an offset the test moves (the server keeps real time)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def now(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset


def unique(prefix: str = "app") -> str:
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def token_config(bao: OpenBaoServer, **overrides: Any) -> VaultBackendConfig:
    values: dict[str, Any] = {
        "name": "vault",
        "address": bao.address,
        "auth": VaultTokenAuth(token_ref=f"env:{TOKEN_ENV}"),
        "timeout_seconds": 2.0,
    }
    values.update(overrides)
    return VaultBackendConfig(**values)


def approle_config(
    bao: OpenBaoServer, tmp_path: Path, *, role: str = "broker", **overrides: Any
) -> VaultBackendConfig:
    secret_file = tmp_path / f"secret-id-{role}"
    secret_file.write_text(SECRET_ID + "\n")
    auth = VaultAppRoleAuth(role_id=f"{ROLE_ID}-{role}", secret_id_ref=f"file:{secret_file}")
    return token_config(bao, auth=auth, **overrides)


def child_token(bao: OpenBaoServer, **options: Any) -> str:
    options.setdefault("policies", ["reader"])
    return str(bao.client().auth.token.create(**options)["auth"]["client_token"])


def count(bao: OpenBaoServer, path: str) -> int:
    return bao.request_paths().count(path)


@pytest.fixture
def backend_factory() -> Iterator[Any]:
    created: list[VaultBackend] = []

    def make(config: VaultBackendConfig, **kwargs: Any) -> VaultBackend:
        backend = VaultBackend(config, **kwargs)
        created.append(backend)
        return backend

    yield make
    for backend in created:
        backend.close()


def test_kv_read_fields_versions_and_created_at(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, child_token(bao))
    path = unique()
    root = bao.client()
    root.secrets.kv.v2.create_or_update_secret(path, {"username": "svc", "password": "canary-v1"})
    root.secrets.kv.v2.create_or_update_secret(
        path, {"username": "svc", "password": "canary-v2", "port": 5432, "nothing": None}
    )
    backend = backend_factory(token_config(bao))
    assert isinstance(backend, SecretBackend)

    secret = backend.read(SecretRef("vault", path, field="password"))
    assert secret.value.reveal() == "canary-v2"
    assert secret.version_id == "2"
    assert {k: v.reveal() for k, v in secret.fields.items()} == {
        "username": "svc",
        "password": "canary-v2",
        "port": "5432",
    }
    assert secret.created_at is not None and abs(secret.created_at - time.time()) < 30
    assert secret.expires_at is None and secret.lease_id is None and secret.stage is None
    assert "canary" not in repr(secret)

    pinned = backend.read(SecretRef("vault", path, field="password", version="1"))
    assert pinned.value.reveal() == "canary-v1"
    assert pinned.version_id == "1"
    assert backend.current_version(SecretRef("vault", path)) == "2"
    assert backend.current_version(SecretRef("vault", path, version="1")) == "1"


def test_current_version_reads_only_metadata(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, child_token(bao))
    path = unique()
    data_path, metadata_path = f"secret/data/{path}", f"secret/metadata/{path}"
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "one"})
    backend = backend_factory(token_config(bao))
    ref = SecretRef("vault", path)
    assert count(bao, data_path) == 1  # the seeding write

    assert backend.read(ref).value.reveal() == "one"
    for _ in range(3):
        assert backend.current_version(ref) == "1"
    assert count(bao, data_path) == 2
    assert count(bao, metadata_path) == 3

    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "two"})
    assert backend.current_version(ref) == "2"
    assert count(bao, data_path) == 3  # plus the second write, no read
    assert backend.read(ref).value.reveal() == "two"
    assert count(bao, data_path) == 4
    assert count(bao, metadata_path) == 4


def test_not_found_cases(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, child_token(bao))
    backend = backend_factory(token_config(bao))
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "x"})

    missing = SecretRef("vault", unique())
    with pytest.raises(SecretNotFound, match="not found"):
        backend.read(missing)
    with pytest.raises(SecretNotFound):
        backend.current_version(missing)
    with pytest.raises(SecretNotFound, match="no field 'password'"):
        backend.read(SecretRef("vault", path, field="password"))
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("vault", path, version="7"))
    for bad in (
        SecretRef("vault", path, version="latest"),
        SecretRef("vault", path, stage="AWSCURRENT"),
        SecretRef("vault", "app/../sys/mounts"),
        SecretRef("vault", ""),
        SecretRef("vault", "dynamic:database/creds/readonly", version="1"),
    ):
        with pytest.raises(SecretNotFound):
            backend.read(bad)

    bao.client().secrets.kv.v2.delete_latest_version_of_secret(path)
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("vault", path))
    with pytest.raises(SecretNotFound, match="deleted"):
        backend.current_version(SecretRef("vault", path))


def test_denied_by_policy_never_shows_the_token(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = child_token(bao)
    monkeypatch.setenv(TOKEN_ENV, token)
    backend = backend_factory(token_config(bao))
    forbidden = "other/" + uuid.uuid4().hex
    bao.client().secrets.kv.v2.create_or_update_secret(forbidden, {"value": "canary-denied"})

    with pytest.raises(SecretAccessDenied) as caught:
        backend.read(SecretRef("vault", forbidden))
    with pytest.raises(SecretAccessDenied):
        backend.current_version(SecretRef("vault", forbidden))
    for text in (str(caught.value), caught.value.debug or ""):
        assert token not in text and "canary" not in text
    assert caught.value.condition == "denied"


def test_rate_limit_is_throttled(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = bao.client()
    root.sys.enable_secrets_engine("kv", path="limited", options={"version": "2"})
    root.secrets.kv.v2.create_or_update_secret("x", {"value": "v"}, mount_point="limited")
    root.write_data(
        "sys/quotas/rate-limit/limited", data={"path": "limited/", "rate": 1, "interval": "60s"}
    )
    monkeypatch.setenv(TOKEN_ENV, bao.root_token)
    backend = backend_factory(token_config(bao, mount="limited"))
    with pytest.raises(BackendThrottled) as caught:
        for _ in range(3):
            backend.read(SecretRef("vault", "x"))
    assert caught.value.condition == "throttled"


def test_approle_login_and_reacquire_after_revocation(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "approle"})
    logins = count(bao, LOGIN)
    backend = backend_factory(approle_config(bao, tmp_path))
    ref = SecretRef("vault", path)

    assert backend.read(ref).value.reveal() == "approle"
    assert backend.current_version(ref) == "1"
    assert count(bao, LOGIN) == logins + 1

    bao.client().sys.revoke_prefix(LOGIN)  # every token AppRole issued, the backend's too
    assert backend.read(ref).value.reveal() == "approle"  # 403, lookup-self 403, login, retry
    assert count(bao, LOGIN) == logins + 2

    # A plain policy denial is reported at once: the token is still valid, no new login.
    lookups = count(bao, LOOKUP)
    with pytest.raises(SecretAccessDenied):
        backend.read(SecretRef("vault", "other/" + uuid.uuid4().hex))
    assert count(bao, LOGIN) == logins + 2
    assert count(bao, LOOKUP) == lookups + 1

    backend.close()
    assert bao.request_paths()[-1] == "auth/token/revoke-self"


def test_concurrent_calls_after_revocation_log_in_once(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "shared"})
    backend = backend_factory(approle_config(bao, tmp_path))
    ref = SecretRef("vault", path)
    assert backend.read(ref).value.reveal() == "shared"
    bao.client().sys.revoke_prefix(LOGIN)
    logins = count(bao, LOGIN)

    with ThreadPoolExecutor(max_workers=8) as pool:
        values = list(pool.map(lambda _: backend.read(ref).value.reveal(), range(16)))
    assert values == ["shared"] * 16
    assert count(bao, LOGIN) == logins + 1


def test_namespace(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    bao.client().write_data("sys/namespaces/team", data={})
    in_team = hvac.Client(url=bao.address, token=bao.root_token, namespace="team")
    in_team.sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
    in_team.secrets.kv.v2.create_or_update_secret("app/x", {"value": "in-namespace"})
    monkeypatch.setenv(TOKEN_ENV, bao.root_token)

    backend = backend_factory(token_config(bao, namespace="team"))
    assert backend.read(SecretRef("vault", "app/x")).value.reveal() == "in-namespace"
    assert backend.current_version(SecretRef("vault", "app/x")) == "1"
    outside = backend_factory(token_config(bao))
    with pytest.raises(SecretNotFound):
        outside.read(SecretRef("vault", "app/x"))


def test_approle_with_wrong_secret_id_is_denied(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    config = approle_config(bao, tmp_path)
    assert isinstance(config.auth, VaultAppRoleAuth)
    Path(config.auth.secret_id_ref.removeprefix("file:")).write_text("not-the-secret-id")
    backend = backend_factory(config)
    with pytest.raises(SecretAccessDenied, match="AppRole login failed") as caught:
        backend.read(SecretRef("vault", unique()))
    assert "not-the-secret-id" not in str(caught.value) + (caught.value.debug or "")


def test_token_is_renewed_before_it_expires(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = child_token(bao, ttl="3s", renewable=True)
    monkeypatch.setenv(TOKEN_ENV, token)
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "renewed"})
    backend = backend_factory(token_config(bao, renew_before_seconds=60))
    ref = SecretRef("vault", path)
    renewals = count(bao, RENEW)

    assert backend.read(ref).value.reveal() == "renewed"  # lookup-self: TTL 3 s
    time.sleep(1.6)  # past TTL - min(60, 3/2)
    assert backend.read(ref).value.reveal() == "renewed"
    assert count(bao, RENEW) == renewals + 1
    time.sleep(1.6)  # 3.2 s after creation: without the renewal it would have expired
    assert backend.read(ref).value.reveal() == "renewed"
    assert count(bao, RENEW) == renewals + 2
    ttl = bao.client().auth.token.lookup(token)["data"]["ttl"]
    assert ttl >= 2


def test_approle_logs_in_again_at_max_ttl(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    seed_approle(bao, role="short", token_ttl="3s", token_max_ttl="3s")
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "short"})
    backend = backend_factory(approle_config(bao, tmp_path, role="short"))
    ref = SecretRef("vault", path)
    logins, renewals = count(bao, LOGIN), count(bao, RENEW)

    assert backend.read(ref).value.reveal() == "short"
    time.sleep(1.6)  # renewal due; renewing is capped at the 3 s max TTL
    assert backend.read(ref).value.reveal() == "short"
    assert count(bao, RENEW) == renewals + 1
    assert count(bao, LOGIN) == logins + 2


def test_approle_logs_in_again_when_renewal_fails(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "again"})
    clock = ShiftClock()
    backend = backend_factory(approle_config(bao, tmp_path), clock=clock)
    ref = SecretRef("vault", path)
    logins, renewals = count(bao, LOGIN), count(bao, RENEW)

    assert backend.read(ref).value.reveal() == "again"
    bao.client().sys.revoke_prefix(LOGIN)
    clock.offset += 45  # TTL 60 s: renewal due after 30 s
    assert backend.read(ref).value.reveal() == "again"
    assert count(bao, RENEW) == renewals + 1
    assert count(bao, LOGIN) == logins + 2


def test_token_auth_that_cannot_renew_reports_denied(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = child_token(bao, ttl="60s", renewable=True)
    monkeypatch.setenv(TOKEN_ENV, token)
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "v"})
    clock = ShiftClock()
    backend = backend_factory(token_config(bao), clock=clock)
    ref = SecretRef("vault", path)
    assert backend.read(ref).value.reveal() == "v"

    bao.client().auth.token.revoke(token)
    clock.offset += 45
    with pytest.raises(SecretAccessDenied, match="could not be renewed") as caught:
        backend.read(ref)
    assert token not in str(caught.value)
    with pytest.raises(SecretAccessDenied):
        backend.read(ref)


def test_token_file_rotated_by_an_agent_is_picked_up(
    bao: OpenBaoServer, backend_factory: Any, tmp_path: Path
) -> None:
    token_file = tmp_path / "vault-token"
    old = child_token(bao)
    token_file.write_text(old)
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": "rotated"})
    backend = backend_factory(
        token_config(bao, auth=VaultTokenAuth(token_ref=f"file:{token_file}"))
    )
    ref = SecretRef("vault", path)
    assert backend.read(ref).value.reveal() == "rotated"

    bao.client().auth.token.revoke(old)
    token_file.write_text(child_token(bao))
    assert backend.read(ref).value.reveal() == "rotated"


def test_outage_is_unavailable_and_recovers_after_restart(tmp_path: Path) -> None:
    def seed(server: OpenBaoServer) -> None:
        seed_approle(server)
        server.client().secrets.kv.v2.create_or_update_secret("app/outage", {"value": "back"})

    with run_openbao() as bao:
        bao.add_seeder(seed)
        backend = VaultBackend(approle_config(bao, tmp_path))
        ref = SecretRef("vault", "app/outage")
        try:
            assert backend.read(ref).value.reveal() == "back"
            bao.stop()
            with pytest.raises(BackendUnavailable) as caught:
                backend.read(ref)
            assert caught.value.condition == "unavailable"
            with pytest.raises(BackendUnavailable):
                backend.current_version(ref)

            bao.start()  # a new in-memory server: reseeded, the old token is unknown to it
            assert backend.read(ref).value.reveal() == "back"
            assert backend.current_version(ref) == "1"
        finally:
            backend.close()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    with run_postgres() as server:
        yield server


@pytest.fixture
def database_creds(bao: OpenBaoServer, postgres: PostgresServer) -> Iterator[str]:
    root = bao.client()
    if "database/" not in root.sys.list_mounted_secrets_engines()["data"]:
        enable_postgres_database_engine(
            root, default_ttl="60s", connection_url=postgres.connection_url
        )
    try:
        yield "database/creds/readonly"
    finally:
        revoke_leases(root, "database/creds/")


def test_dynamic_database_credentials_are_leased(
    bao: OpenBaoServer,
    backend_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
    database_creds: str,
) -> None:
    monkeypatch.setenv(TOKEN_ENV, child_token(bao))
    backend = backend_factory(token_config(bao))
    ref = SecretRef("vault", f"dynamic:{database_creds}", field="password")

    before = time.time()
    secret = backend.read(ref)
    assert set(secret.fields) == {"username", "password"}
    assert secret.value.reveal()
    assert secret.lease_id is not None and secret.lease_id.startswith(f"{database_creds}/")
    assert secret.version_id and secret.version_id != secret.lease_id  # the request id
    assert secret.expires_at is not None
    assert before + 55 <= secret.expires_at <= time.time() + 60
    assert secret.lease_id not in repr(secret)
    assert backend.current_version(ref) is None

    lease = bao.client().sys.read_lease(secret.lease_id)["data"]
    assert 0 < lease["ttl"] <= 60

    again = backend.read(ref)
    assert again.lease_id != secret.lease_id
    assert again.fields["username"] != secret.fields["username"]


def test_kv_version_1_with_ttl_reads_as_a_leased_secret(
    bao: OpenBaoServer, backend_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = bao.client()
    if "kv1/" not in root.sys.list_mounted_secrets_engines()["data"]:
        root.sys.enable_secrets_engine("kv", path="kv1", options={"version": "1"})
    root.write("kv1/api", key="kv1-value", ttl="30s")
    monkeypatch.setenv(TOKEN_ENV, child_token(bao))
    backend = backend_factory(token_config(bao))

    secret = backend.read(SecretRef("vault", "dynamic:kv1/api", field="key"))
    assert secret.value.reveal() == "kv1-value"
    assert secret.lease_id is None and secret.version_id  # the request id
    assert secret.expires_at is not None and 25 <= secret.expires_at - time.time() <= 30
    with pytest.raises(SecretNotFound):
        backend.read(SecretRef("vault", "dynamic:kv1/missing"))


def test_debug_logging_never_shows_values_or_tokens(
    bao: OpenBaoServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    database_creds: str,
) -> None:
    canary = "canary-" + uuid.uuid4().hex
    path = unique()
    bao.client().secrets.kv.v2.create_or_update_secret(path, {"value": canary})
    sdk_loggers = [logging.getLogger(n) for n in ("hvac", "urllib3", "requests")]
    saved = [logger.level for logger in sdk_loggers]
    try:
        for logger in sdk_loggers:  # an application that turned DEBUG on before startup
            logger.setLevel(logging.DEBUG)
        caplog.set_level(logging.DEBUG)
        backend = VaultBackend(approle_config(bao, tmp_path))
        try:
            secret = backend.read(SecretRef("vault", path))
            dynamic = backend.read(SecretRef("vault", f"dynamic:{database_creds}"))
            with pytest.raises(SecretBackendError) as caught:
                backend.read(SecretRef("vault", "other/" + uuid.uuid4().hex))
            token = backend._client.token  # only to prove it never reaches a log
        finally:
            backend.close()
        assert all(logger.level == logging.WARNING for logger in sdk_loggers)
    finally:
        for logger, level in zip(sdk_loggers, saved, strict=True):
            logger.setLevel(level)

    forbidden = {
        canary,
        SECRET_ID,
        token,
        dynamic.fields["password"].reveal(),
        secret.value.reveal(),
    }
    logged = [r.getMessage() + repr(r.args) + str(r.exc_info) for r in caplog.records]
    logged.append(str(caught.value) + (caught.value.debug or ""))
    for text in logged:
        for value in forbidden:
            assert value not in text


def test_unreachable_address_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.support.servers import free_loopback_port

    monkeypatch.setenv(TOKEN_ENV, "some-token")
    config = VaultBackendConfig(
        name="vault",
        address=f"http://127.0.0.1:{free_loopback_port()}",
        auth=VaultTokenAuth(token_ref=f"env:{TOKEN_ENV}"),
        timeout_seconds=1.0,
    )
    backend = VaultBackend(config)
    with pytest.raises(BackendUnavailable) as caught:
        backend.read(SecretRef("vault", "app/x"))
    assert "some-token" not in str(caught.value) + (caught.value.debug or "")
    backend.close()

"""Real secret-store servers for tests: OpenBao in dev mode, and moto's Secrets Manager.

```python
with run_openbao() as bao:           # bao.address, bao.root_token, bao.client() (hvac)
    bao.add_seeder(seed)             # seed(bao) now, and again after every restart
    bao.stop(); bao.start()          # an outage; same port, same root token

with run_moto() as moto:             # moto.endpoint_url, moto.client() (boto3)
    monkeypatch_env(moto.credentials_env)  # dummy keys for the standard AWS chain
    ...
```

with run_postgres() as pg:          # pg.connection_url (OpenBao's database engine form)
    enable_postgres_database_engine(bao.client(), connection_url=pg.connection_url)

with run_redis() as redis_server:    # redis_server.url, .client(), stop()/start()/freeze()

Both servers keep their state **in memory only**: after `stop()` + `start()` everything written
is gone (OpenBao dev mode comes back with an empty ``secret/`` KV v2 mount and the same root
token; moto with no secrets). Register seeders with `add_seeder` so they are re-applied on
every start. Binaries are found next to `sys.executable` (the virtualenv's ``bin``); failing
to start raises `ServerStartError` with the end of the server's log, never skips.

OpenBao writes a file audit log (`OpenBaoServer.audit_log_path`); `request_paths()` lists the
API paths it served, so tests can count data reads against metadata reads. PostgreSQL-backed
dynamic secrets: `run_postgres` (a cluster of its own, initdb'd in a temporary directory, on a
free port) and `enable_postgres_database_engine`. Every `run_*` stops its server on every path,
a failure half-way through starting included; a fixture that starts several servers enters them
on one `contextlib.ExitStack`, so a failure after the first stops the ones already running.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import boto3
import botocore.config
import hvac
import redis

from broker.cli.dev_openbao import bao_binary

BIN_DIR = Path(sys.executable).parent
LOOPBACK = "127.0.0.1"


class ServerStartError(RuntimeError):
    """A test server could not be started (the message ends with its log)."""


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _binary(name: str) -> Path:
    path = BIN_DIR / name
    if not path.is_file():
        raise ServerStartError(f"{path} does not exist (is the virtualenv complete?)")
    return path


def _tail(path: Path, limit: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def _http_status(url: str, *, method: str = "GET", headers: dict[str, str] | None = None) -> int:
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=1.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, urllib.error.URLError):
        return 0


class _Process:
    """One server process: started in its own session, output to a log file."""

    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        *,
        user: str | None = None,
        cwd: Path | None = None,
    ) -> None:
        if self.running:
            raise ServerStartError(f"{self.name} is already running")
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=user,
                cwd=cwd,
            )

    def wait_until(self, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                self.terminate()
                raise ServerStartError(
                    f"{self.name} exited while starting; log:\n{_tail(self.log_path)}"
                )
            if ready():
                return
            if time.monotonic() > deadline:
                self.terminate()
                raise ServerStartError(
                    f"{self.name} not ready within {timeout}s; log:\n{_tail(self.log_path)}"
                )
            time.sleep(0.05)

    def terminate(self, sig: signal.Signals = signal.SIGTERM) -> None:
        process, self._process = self._process, None
        if process is not None:
            _stop(process, sig)

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM) -> None:
    """Signal a running process (SIGTERM); SIGKILL it if it has not exited 5 s later."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def _clean_env(**extra: str) -> dict[str, str]:
    prefixes = ("VAULT_", "BAO_", "AWS_", "MOTO_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


class _LoopbackServer:
    """A server process on a loopback port (a free one unless given), logging to `log_name`."""

    def __init__(self, workdir: Path, name: str, log_name: str, port: int | None) -> None:
        self.port = port or free_loopback_port()
        self._process = _Process(f"{name} on port {self.port}", workdir / log_name)

    @property
    def _url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process.running

    def start(self, timeout: float = 20.0) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the server (all its data is lost)."""
        self._process.terminate()


_Server = TypeVar("_Server", bound=_LoopbackServer)


@contextlib.contextmanager
def _running(
    server_class: Callable[..., _Server], prefix: str, port: int | None
) -> Iterator[_Server]:
    """A server in a temporary directory, started, for the duration of the block."""
    with tempfile.TemporaryDirectory(prefix=prefix) as workdir:
        server = server_class(Path(workdir), port=port)
        try:  # a seeder failing after the process started must stop it too
            server.start()
            yield server
        finally:
            server.stop()


class OpenBaoServer(_LoopbackServer):
    """``bao server -dev`` on a loopback port; see the module docstring."""

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir, "openbao", "server.log", port)
        self.workdir = workdir
        self.root_token = "root-" + secrets.token_hex(16)
        self.audit_log_path = workdir / "audit.log"
        self._config_path = workdir / "server.hcl"
        self._config_path.write_text(
            'audit "file" "file" {\n'
            f"  options {{\n    file_path = {json.dumps(str(self.audit_log_path))}\n  }}\n"
            "}\n"
        )
        (workdir / "home").mkdir(exist_ok=True)
        self._seeders: list[Callable[[OpenBaoServer], None]] = []

    @property
    def address(self) -> str:
        return self._url

    def client(self, token: str | None = None) -> hvac.Client:
        """An hvac client for this server (root token by default)."""
        return hvac.Client(url=self.address, token=token or self.root_token, timeout=5)

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart, on the same port) and re-apply the seeders."""
        argv = [
            str(bao_binary()),
            "server",
            "-dev",
            f"-dev-root-token-id={self.root_token}",
            f"-dev-listen-address={LOOPBACK}:{self.port}",
            f"-config={self._config_path}",
        ]
        self._process.spawn(argv, _clean_env(HOME=str(self.workdir / "home")))
        headers = {"X-Vault-Token": self.root_token}
        self._process.wait_until(
            lambda: (
                _http_status(f"{self.address}/v1/sys/health") == 200
                and _http_status(f"{self.address}/v1/secret/config", headers=headers) == 200
            ),
            timeout,
        )
        for seed in self._seeders:
            seed(self)

    def add_seeder(self, seed: Callable[[OpenBaoServer], None]) -> None:
        """Run `seed(self)` now (when running) and after every later `start()`."""
        self._seeders.append(seed)
        if self.running:
            seed(self)

    def audit_entries(self, entry_type: str = "request") -> list[dict[str, Any]]:
        """The audit log's entries of one type (``request`` or ``response``)."""
        try:
            lines = self.audit_log_path.read_text().splitlines()
        except FileNotFoundError:
            return []
        entries = [json.loads(line) for line in lines if line.strip()]
        return [e for e in entries if e.get("type") == entry_type]

    def request_paths(self) -> list[str]:
        """API paths of every request served so far, in order (e.g. ``secret/data/app``)."""
        return [e["request"]["path"] for e in self.audit_entries("request")]


def run_openbao(*, port: int | None = None) -> contextlib.AbstractContextManager[OpenBaoServer]:
    """An OpenBao dev server for the duration of the block (raises if it cannot start)."""
    return _running(OpenBaoServer, "openbao-", port)


def enable_postgres_database_engine(
    client: hvac.Client,
    *,
    mount: str = "database",
    role: str = "readonly",
    default_ttl: str = "60s",
    max_ttl: str = "300s",
    connection_url: str,
) -> str:
    """Configure the database engine against a PostgreSQL (`PostgresServer.connection_url`:
    user postgres, trust auth); return the credentials path (``<mount>/creds/<role>``).

    Raises (never skips) when PostgreSQL cannot be reached: ``verify_connection`` is on.
    Revoke the leases afterwards (`revoke_leases(client, f"{mount}/creds/")`) so the generated
    roles are dropped from PostgreSQL.
    """
    client.sys.enable_secrets_engine("database", path=mount)
    client.write(
        f"{mount}/config/postgres",
        plugin_name="postgresql-database-plugin",
        connection_url=connection_url,
        username="postgres",
        password="unused-with-trust-auth",
        allowed_roles=role,
        verify_connection=True,
    )
    client.write(
        f"{mount}/roles/{role}",
        db_name="postgres",
        creation_statements=[
            "CREATE ROLE \"{{name}}\" WITH LOGIN PASSWORD '{{password}}' "
            "VALID UNTIL '{{expiration}}';"
        ],
        default_ttl=default_ttl,
        max_ttl=max_ttl,
    )
    return f"{mount}/creds/{role}"


def revoke_leases(client: hvac.Client, prefix: str) -> None:
    """Revoke every lease under `prefix` now (drops generated database roles)."""
    client.sys.revoke_prefix(prefix)


class MotoServer(_LoopbackServer):
    """``moto_server`` on a loopback port; see the module docstring."""

    region = "us-east-1"
    access_key_id = "testing"
    secret_access_key = "testing"

    def __init__(self, workdir: Path, *, port: int | None = None) -> None:
        super().__init__(workdir, "moto", "moto.log", port)

    @property
    def endpoint_url(self) -> str:
        return self._url

    @property
    def credentials_env(self) -> dict[str, str]:
        """Environment for the standard AWS chain: dummy keys, region, and no shared files or
        instance metadata lookups (apply with ``monkeypatch.setenv``)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def client(self) -> Any:
        """A boto3 ``secretsmanager`` client with explicit dummy credentials (for seeding)."""
        return boto3.session.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            region_name=self.region,
        ).client(
            "secretsmanager",
            endpoint_url=self.endpoint_url,
            config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 1}),
        )

    def start(self, timeout: float = 20.0) -> None:
        """Start (or restart, on the same port, with no state)."""
        argv = [str(_binary("moto_server")), "-H", LOOPBACK, "-p", str(self.port)]
        self._process.spawn(argv, _clean_env())
        self._process.wait_until(
            lambda: _http_status(f"{self.endpoint_url}/moto-api/") == 200, timeout
        )

    def reset(self) -> None:
        """Forget every resource (moto's reset API)."""
        status = _http_status(f"{self.endpoint_url}/moto-api/reset", method="POST")
        if status != 200:
            raise RuntimeError(f"moto reset answered {status}")


def run_moto(*, port: int | None = None) -> contextlib.AbstractContextManager[MotoServer]:
    """A moto server for the duration of the block (raises if it cannot start)."""
    return _running(MotoServer, "moto-", port)


class RedisServer:
    """One ``redis-server`` process without persistence; `stop()` / `start()` keep the port."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server is not on PATH")
        self.port = free_loopback_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = workdir / f"redis-{self.port}.log"
        self._argv = [
            binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--logfile",
            str(self.log_path),
            *extra_args,
        ]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        self._process = subprocess.Popen(
            self._argv, stdin=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = (
                    self.log_path.read_text(errors="replace")[-3000:]
                    if self.log_path.exists()
                    else ""
                )
                raise ServerStartError(f"redis-server did not start on {self.port}; log:\n{log}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                reply = sock.recv(64)
        except OSError:
            return False
        return reply.startswith((b"+PONG", b"-NOAUTH"))

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGCONT)  # in case a test left it frozen
            _stop(process)

    def freeze(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers (a hung server)."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **options)


@contextlib.contextmanager
def run_redis(workdir: Path, *extra_args: str) -> Iterator[RedisServer]:
    """A redis-server for the duration of the block, stopped on every path."""
    server = RedisServer(workdir, *extra_args)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def postgres_bindir() -> Path:
    """The directory of PostgreSQL's ``initdb`` and ``postgres``: PATH, or Debian's
    /usr/lib/postgresql/<version>/bin (newest first). `make test` installs the package."""
    found = shutil.which("initdb")
    candidates = [Path(found).resolve().parent] if found else []
    candidates += sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ServerStartError(
        "PostgreSQL's initdb/postgres not found on PATH nor under /usr/lib/postgresql/*/bin: "
        "run `make test`, or `apt-get install postgresql`"
    )


class PostgresServer:
    """A PostgreSQL cluster of its own: initdb (superuser postgres, trust authentication on
    loopback) into a temporary directory, served on a free loopback port, TCP only.

    PostgreSQL refuses to run as root; as root, it runs as the ``postgres`` user (created by the
    Debian package) or ``nobody``.
    """

    def __init__(self, workdir: Path) -> None:
        self.port = free_loopback_port()
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.log_path = workdir / "postgres.log"
        self._bindir = postgres_bindir()
        self._user: str | None = None
        if os.geteuid() == 0:
            import pwd

            for name in ("postgres", "nobody"):
                try:
                    entry = pwd.getpwnam(name)
                except KeyError:
                    continue
                self._user = name
                os.chown(workdir, entry.pw_uid, entry.pw_gid)
                break
        self._process = _Process(f"postgres on port {self.port}", self.log_path)

    @property
    def connection_url(self) -> str:
        """The ``connection_url`` form of OpenBao's PostgreSQL database plugin."""
        return (
            "postgresql://{{username}}:{{password}}"
            f"@{LOOPBACK}:{self.port}/postgres?sslmode=disable"
        )

    def start(self, timeout: float = 30.0) -> None:
        if not self.data_dir.exists():
            result = subprocess.run(
                [
                    str(self._bindir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "--encoding=UTF8",
                    "--locale=C",
                ],
                user=self._user,
                cwd=self.workdir,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                raise ServerStartError(f"initdb failed:\n{result.stdout}{result.stderr}")
        argv = [
            str(self._bindir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            LOOPBACK,
            "-p",
            str(self.port),
            "-k",
            "",  # no Unix socket: nothing outside the temporary directory
            "-c",
            "fsync=off",
        ]
        self._process.spawn(argv, dict(os.environ), user=self._user, cwd=self.workdir)
        self._process.wait_until(self._answers, timeout)

    def _answers(self) -> bool:
        """A startup packet gets an authentication request ('R') once the server accepts."""
        packet = (196608).to_bytes(4, "big") + b"user\0postgres\0database\0postgres\0\0"
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as sock:
                sock.sendall((len(packet) + 4).to_bytes(4, "big") + packet)
                reply = sock.recv(1)
        except OSError:
            return False
        return reply == b"R"

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open connections are cut, not waited for)."""
        self._process.terminate(signal.SIGINT)


@contextlib.contextmanager
def run_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL of its own for the duration of the block, stopped on every path."""
    with tempfile.TemporaryDirectory(prefix="postgres-") as workdir:
        server = PostgresServer(Path(workdir))
        try:
            server.start()
            yield server
        finally:
            server.stop()


@dataclass
class SentinelSet:
    """A Redis primary, two replicas of it and three sentinels watching it, on loopback."""

    service: str
    primary: RedisServer
    replicas: list[RedisServer]
    sentinels: list[subprocess.Popen[bytes]]
    sentinel_ports: list[int]

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.sentinel_ports]

    def kill_primary(self) -> None:
        """SIGKILL: the primary dies as a crashed host would (no goodbye to anyone)."""
        process = self.primary._process
        assert process is not None
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=5)
        self.primary._process = None

    def current_primary_port(self) -> int | None:
        for port in self.sentinel_ports:
            try:
                with redis.Redis(host="127.0.0.1", port=port, socket_timeout=1) as client:
                    host_port = client.sentinel_get_master_addr_by_name(self.service)
                if host_port:
                    return int(host_port[1])
            except redis.RedisError:
                continue
        return None


@contextlib.contextmanager
def run_sentinel_set(workdir: Path, service: str = "broker") -> Iterator[SentinelSet]:
    """Primary, two replicas and three sentinels (quorum 2; a primary silent for 1 s is down);
    all stopped on every path."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise ServerStartError("redis-server is not on PATH")
    with contextlib.ExitStack() as stack:
        primary = stack.enter_context(run_redis(workdir))
        replicas = [
            stack.enter_context(run_redis(workdir, "--replicaof", "127.0.0.1", str(primary.port)))
            for _ in range(2)
        ]
        deadline = time.monotonic() + 15
        for replica in replicas:
            while replica.client().info("replication").get("master_link_status") != "up":
                if time.monotonic() > deadline:
                    raise ServerStartError("a replica did not sync with the primary")
                time.sleep(0.05)
        sentinels: list[subprocess.Popen[bytes]] = []
        ports: list[int] = []
        for _ in range(3):
            port = free_loopback_port()
            conf = workdir / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
                f"logfile {workdir / f'sentinel-{port}.log'}\n"
                f"sentinel monitor {service} 127.0.0.1 {primary.port} 2\n"
                f"sentinel down-after-milliseconds {service} 1000\n"
                f"sentinel failover-timeout {service} 5000\n"
                f"sentinel parallel-syncs {service} 1\n"
            )
            process = subprocess.Popen(
                [binary, str(conf), "--sentinel"],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            stack.callback(_stop, process)
            sentinels.append(process)
            ports.append(port)
        found = SentinelSet(service, primary, replicas, sentinels, ports)
        deadline = time.monotonic() + 15
        while True:
            try:
                with redis.Redis(host="127.0.0.1", port=ports[0], socket_timeout=1) as client:
                    known = client.sentinel_sentinels(service)
                if len(known) >= 2 and found.current_primary_port() == primary.port:
                    break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise ServerStartError("the sentinels did not find each other")
            time.sleep(0.1)
        yield found

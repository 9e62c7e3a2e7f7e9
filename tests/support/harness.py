"""Run a real broker over loopback HTTP for integration tests.

The broker is the production app (`broker.app.create_app`) served by uvicorn in a thread, with a
test identity provider (a `DevIdentityProvider` served over HTTP, configured as `kind: oidc`), the
example policies plus test-only agents, and decision records captured in memory.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from broker.app import create_app
from broker.audit import MemorySink
from broker.client_secrets import generate_client_secret
from broker.clock import Clock
from broker.services import BrokerServices, build_services
from broker.settings import BrokerSettings
from broker.state import StateStore
from idp_adapters._loopback import RunningServer, reserve_loopback_socket, serve_in_thread
from idp_adapters.dev import DevIdentityProvider, DevPerson

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICIES = REPO / "policies"
TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"
JWT_TYPE = "urn:ietf:params:oauth:token-type:jwt"
TICKETS = "https://tickets.internal.example"

# The environment variables the example policy's clients reference (secret_ref: env:...).
EXAMPLE_SECRET_VARIABLES = (
    "TRIAGE_AGENT_SECRET",
    "SUMMARISER_AGENT_SECRET",
    "CODING_AGENT_SECRET",
    "LLM_GATEWAY_SECRET",
    "ROTATION_HOOK_SECRET",
    "TICKETS_API_SECRET",
)


def example_client_secrets() -> dict[str, str]:
    """A fresh secret for every client of the example policy, keyed by its variable."""
    return {name: generate_client_secret() for name in EXAMPLE_SECRET_VARIABLES}


# The example organisation's people, as the test IdP signs them in (match policies/bindings.yaml).
EXAMPLE_PEOPLE = {
    "alice": DevPerson("alice", ("support",), "alice@example.com", "Alice Support"),
    "dave": DevPerson("dave", ("support-leads",), "dave@example.com", "Dave Lead"),
    "bob": DevPerson("bob", ("engineering",), "bob@example.com", "Bob Engineer"),
    "carol": DevPerson("carol", ("finance",), "carol@example.com", "Carol Finance"),
    "erin": DevPerson("erin", (), "erin@example.com", "Erin Contractor"),
}


@contextmanager
def serve_idp(
    people: dict[str, DevPerson] | None = None, **kwargs: Any
) -> Iterator[tuple[DevIdentityProvider, RunningServer]]:
    """A loopback OIDC issuer with keys generated for this test."""
    sock = reserve_loopback_socket()
    issuer = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        provider = DevIdentityProvider(issuer, people or EXAMPLE_PEOPLE, **kwargs)
        server = serve_in_thread(provider.asgi_app(), sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield provider, server
    finally:
        server.stop()


@dataclass
class RunningBroker:
    url: str
    settings: BrokerSettings
    services: BrokerServices
    decisions: MemorySink
    server: RunningServer
    policy_dir: Path

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/oauth2/token"


def write_policy_dir(tmp_path: Path, extra: dict[str, Any] | None = None) -> Path:
    """A copy of the example policies, plus `extra` as one more policy file."""
    policy_dir = tmp_path / "policies"
    shutil.copytree(EXAMPLE_POLICIES, policy_dir)
    if extra:
        (policy_dir / "zz-test-extra.yaml").write_text(yaml.safe_dump(extra))
    return policy_dir


@contextmanager
def run_broker(
    tmp_path: Path,
    identity_providers: list[dict[str, Any]],
    *,
    policy_extra: dict[str, Any] | None = None,
    workload_issuers: list[dict[str, Any]] | None = None,
    lifespan: bool = False,
    clock: Clock | None = None,
    state_store: StateStore | None = None,
    **overrides: Any,
) -> Iterator[RunningBroker]:
    """Serve the broker; `lifespan=True` also runs its startup/shutdown (policy watcher).
    `clock` (one tests move) and `state_store` replace the defaults."""
    sock = reserve_loopback_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    policy_dir = write_policy_dir(tmp_path, policy_extra)
    if "secret_backends" not in overrides:
        # The example credentials name the backend `vault`; a broker refuses a policy whose
        # credentials name no configured backend. Tests that fetch nothing get an empty one.
        placeholder = placeholder_vault(tmp_path)
        overrides["secret_backends"] = placeholder["secret_backends"]
        overrides.setdefault("allow_development_components", True)
    settings = BrokerSettings(
        issuer=url,
        policy_dir=policy_dir,
        signing_keys={"directory": tmp_path / "keys"},
        identity_providers=identity_providers,
        workload_issuers=workload_issuers or [],
        **overrides,
    )
    sink = MemorySink()
    try:  # the reserved socket is closed when building or starting fails
        services = build_services(settings, decision_sinks=[sink], clock=clock, state=state_store)
        server = serve_in_thread(
            create_app(settings, services=services),
            sock=sock,
            lifespan="on" if lifespan else "off",
        )
    except BaseException:
        sock.close()
        raise
    try:
        yield RunningBroker(url, settings, services, sink, server, policy_dir)
    finally:
        server.stop()


def placeholder_vault(directory: Path) -> dict[str, Any]:
    """Settings for an empty development secret backend named ``vault`` (the example policy's
    credentials name it): for brokers and configurations whose tests fetch no credential."""
    secrets_file = directory / "no-secrets.yaml"
    secrets_file.write_text("{}\n")
    return {
        "secret_backends": [{"name": "vault", "kind": "file", "path": str(secrets_file)}],
        "allow_development_components": True,
    }


def oidc_provider_config(provider: DevIdentityProvider, name: str = "dev") -> dict[str, Any]:
    return {
        "name": name,
        "kind": "oidc",
        "issuer": provider.issuer,
        "client_ids": [provider.client_id],
        "audiences": [provider.audience],
        "algorithms": [provider.algorithm],
        "jwks_min_refresh_interval_seconds": 1.0,
    }


def exchange_form(subject_token: str, subject_token_type: str = ID_TOKEN, **extra: str) -> dict:
    return {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": subject_token_type,
        **extra,
    }


BROKER_COMMAND = str(Path(sys.executable).with_name("broker"))


@contextmanager
def broker_process(
    args: list[str], log: Path, env: dict[str, str], cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """`broker <args>` in a subprocess writing to `log`; terminated and waited for at exit."""
    with log.open("wb") as out:
        process = subprocess.Popen(
            [BROKER_COMMAND, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,  # its workers and servers form one group: see stop_process
        )
    try:
        yield process
    finally:
        stop_process(process)


def stop_process(process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """SIGTERM (a broker stops what it started), and SIGKILL if it has not exited within
    `timeout`: then to its whole process group when it leads one (started with
    ``start_new_session=True``), so no worker or child server outlives the test."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # only ever our own child's group
            except (ProcessLookupError, PermissionError):
                process.kill()
            process.wait(timeout=5)


def wait_until_serving(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    """Wait for a `broker` process to answer /healthz; fail with its log if it exits or stalls."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"broker exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"broker did not start:\n{log.read_text()}")


def write_provider_keys(path: Path, openai_key: str) -> None:
    """The development secrets file the example credentials read: `openai_key` as the current
    OpenAI key (rewrite it to rotate), a placeholder for Anthropic."""
    path.write_text(
        yaml.safe_dump(
            {"llm/openai": {"api_key": openai_key}, "llm/anthropic": {"api_key": "sk-unused"}}
        )
    )


@contextmanager
def run_example_stack_with_key(
    tmp_path: Path, client_secrets: dict[str, str], openai_key: str
) -> Iterator[tuple[RunningBroker, DevIdentityProvider, Path]]:
    """`run_example_stack` over a secrets file holding `openai_key`; yields the file too."""
    secrets_file = tmp_path / "dev-secrets.yaml"
    write_provider_keys(secrets_file, openai_key)
    with run_example_stack(tmp_path, client_secrets, secrets_file) as (running, idp):
        yield running, idp, secrets_file


@contextmanager
def run_example_stack(
    tmp_path: Path, client_secrets: dict[str, str], secrets_file: Path, **overrides: Any
) -> Iterator[tuple[RunningBroker, DevIdentityProvider]]:
    """The example policy's broker with its client secrets in the environment, a test IdP, and
    a development `file` secret backend named ``vault`` (as the example credentials expect);
    `overrides` go to `run_broker`."""
    import pytest  # test support only

    patch = pytest.MonkeyPatch()
    for key, value in client_secrets.items():
        patch.setenv(key, value)
    try:
        with (
            serve_idp() as (idp, _),
            run_broker(
                tmp_path,
                [oidc_provider_config(idp)],
                secret_backends=[{"name": "vault", "kind": "file", "path": str(secrets_file)}],
                allow_development_components=True,
                **overrides,
            ) as running,
        ):
            yield running, idp
    finally:
        patch.undo()

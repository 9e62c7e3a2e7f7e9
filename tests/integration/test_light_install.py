"""The light install: the project without extras, in a fresh virtual environment, gives a tool the
agent client, DPoP and the resource-server kit, and none of the broker server's dependencies.

One venv for the bare project (shared by its tests) and one each for the `kit` and `mcp` extras:
`python -m venv`, then its own pip installs a copy of the project's sources
(the packages pyproject.toml lists, copied to tmp so no build output lands in the repository),
dependencies from the package index or pip's cache. Everything then runs in that venv with a
working directory outside the repository and no PYTHONPATH, so only the installed copy imports.
The `broker` command's own rule (a missing server dependency is one line and exit 2; a missing
module of the project still a traceback) is also checked in this environment, one module hidden.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from broker.cli import SERVER_EXTRA_HINT

ROOT = Path(__file__).resolve().parents[2]

# What a tool imports from the light install: the client, DPoP and the resource-server kit.
LIGHT_MODULES = (
    "broker",
    "broker.client",
    "broker.dpop",
    "broker.kit",
    "broker.clock",
    "broker.types",
    "broker.tokens",
    "idp_adapters.jwks",
    "idp_adapters.jwt_verify",
)

# What the `kit` extra adds for the kit's Starlette/FastAPI adapter, and the `mcp` extra for its
# MCP SDK token verifier.
KIT_EXTRA_MODULES = ("starlette", "broker.kit.starlette")
MCP_EXTRA_MODULES = ("mcp", "mcp.server.auth.provider", "broker.kit.mcp")

# The server's dependencies that must not come with the light install (import names).
SERVER_ONLY_MODULES = ("hvac", "boto3", "onelogin", "fastapi", "redis", "typer", "pydantic")
# The MCP SDK itself brings pydantic (and typer only with its `cli` extra).
NOT_WITH_MCP_MODULES = tuple(m for m in SERVER_ONLY_MODULES if m != "pydantic")

PIP_TIMEOUT_SECONDS = 300  # an upper bound for a cold pip cache; a warm one takes seconds
RUN_TIMEOUT_SECONDS = 60


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME"}}
    env.pop("VIRTUAL_ENV", None)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _copy_project(dest: Path) -> Path:
    """The sources `pip install .` reads: pyproject.toml, README.md and the listed packages."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    dest.mkdir()
    shutil.copy2(ROOT / "pyproject.toml", dest / "pyproject.toml")
    shutil.copy2(ROOT / "README.md", dest / "README.md")
    for pattern in includes:
        package = pattern.rstrip("*").rstrip(".")
        shutil.copytree(
            ROOT / package,
            dest / package,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    return dest


class LightVenv:
    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.bin = root / "bin"
        self.python = self.bin / "python"

    def run(self, *args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.workdir,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT_SECONDS,
            check=False,
        )


def _install(base: Path, extras: str = "") -> LightVenv:
    """A fresh venv under `base` holding the project (with `extras`, e.g. "[kit]")."""
    source = _copy_project(base / "src")
    workdir = base / "work"
    workdir.mkdir()
    venv = LightVenv(base / "venv", workdir)
    env = _clean_env()
    subprocess.run(
        [sys.executable, "-m", "venv", str(venv.root)],
        cwd=workdir, env=env, check=True, timeout=RUN_TIMEOUT_SECONDS,
    )
    installed = subprocess.run(
        [str(venv.python), "-m", "pip", "install", "--quiet", f"{source}{extras}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=PIP_TIMEOUT_SECONDS,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr[-4000:]
    return venv


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> LightVenv:
    return _install(tmp_path_factory.mktemp("light-install"))


CHECK = textwrap.dedent(
    """
    import asyncio, importlib, importlib.util, json, sys

    modules = json.loads(sys.argv[1])
    server_only = json.loads(sys.argv[2])
    for name in modules:
        importlib.import_module(name)

    from broker.dpop import DPoPKey, DPoPVerifier, InvalidDPoPProof

    async def proofs():
        key = DPoPKey()
        verifier = DPoPVerifier()
        url = "https://tool.example/mcp"
        proof = key.proof("POST", url, access_token="an-access-token")
        checked = await verifier.verify(
            proof, method="POST", url=url, access_token="an-access-token", jkt=key.jkt
        )
        refusals = []
        for method, other_url, sent, token in (
            ("POST", url, proof, "an-access-token"),  # the same proof again: a replay
            ("POST", "https://tool.example/other", key.proof("POST", url), None),
            ("GET", url, key.proof("POST", url), None),
        ):
            try:
                await verifier.verify(sent, method=method, url=other_url, access_token=token)
            except InvalidDPoPProof as refused:
                refusals.append(refused.reason)
        return {"jkt": checked.jkt, "key_jkt": key.jkt, "htu": checked.htu, "refusals": refusals}

    print(json.dumps({
        "files": {name: sys.modules[name].__file__ for name in modules},
        "dpop": asyncio.run(proofs()),
        "server_only_found": [n for n in server_only if importlib.util.find_spec(n)],
        "server_only_loaded": sorted(set(server_only) & set(sys.modules)),
    }))
    """
)


def test_light_install_imports_client_dpop_and_kit_modules_without_server_dependencies(
    light_venv: LightVenv,
) -> None:
    result = light_venv.run(
        light_venv.python, "-c", CHECK, json.dumps(LIGHT_MODULES), json.dumps(SERVER_ONLY_MODULES)
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)

    # The installed copy in the venv was imported, not the repository's sources.
    for name, file in report["files"].items():
        assert Path(file).is_relative_to(light_venv.root), (name, file)

    dpop = report["dpop"]
    assert dpop["jkt"] == dpop["key_jkt"]
    assert dpop["htu"] == "https://tool.example/mcp"
    assert dpop["refusals"] == [
        "DPoP proof jti has been used before",
        "DPoP proof htu does not match the request URL",
        "DPoP proof htm does not match the request method GET",
    ]

    assert report["server_only_found"] == []
    assert report["server_only_loaded"] == []


def test_broker_command_without_the_server_extra_says_what_to_install(
    light_venv: LightVenv,
) -> None:
    broker = light_venv.bin / "broker"
    assert broker.exists()  # the console script is installed with the light package too
    for args in (["--help"], ["serve", "--config", "broker.yaml"], ["policy", "check"]):
        result = light_venv.run(broker, *args)
        assert result.returncode == 2, (args, result.stderr[-2000:])
        assert result.stdout == ""
        (line,) = result.stderr.splitlines()  # one line, no traceback
        assert line.startswith(SERVER_EXTRA_HINT), line
        assert "missing module:" in line


def _broker_main_hiding(module: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`broker ARGS` in this environment (the server installed) with `module` unimportable."""
    code = (
        "import sys\n"
        f"sys.modules[{module!r}] = None  # import {module} now raises ModuleNotFoundError\n"
        f"sys.argv = ['broker', *{list(args)!r}]\n"
        "from broker.cli import main\n"
        "main()\n"
    )
    env = _clean_env()
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_SECONDS,
        check=False,
    )


def test_broker_command_names_the_server_extra_when_one_server_dependency_is_missing() -> None:
    result = _broker_main_hiding("yaml", "--help")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.splitlines() == [f"{SERVER_EXTRA_HINT} (missing module: yaml)"]


def test_broker_command_still_fails_loudly_when_a_module_of_its_own_is_missing() -> None:
    # A missing module of the project is a bug, not a missing extra: the traceback stays.
    result = _broker_main_hiding("broker.cli.keys", "--help")
    assert result.returncode == 1
    assert "Traceback" in result.stderr and "ModuleNotFoundError" in result.stderr
    assert SERVER_EXTRA_HINT not in result.stderr


@pytest.mark.parametrize(
    ("extra", "extra_modules", "absent"),
    [
        ("[kit]", KIT_EXTRA_MODULES, SERVER_ONLY_MODULES),
        ("[mcp]", MCP_EXTRA_MODULES, NOT_WITH_MCP_MODULES),
    ],
    ids=["kit", "mcp"],
)
def test_kit_and_mcp_extras_add_their_framework_and_still_none_of_the_server(
    tmp_path_factory: pytest.TempPathFactory,
    extra: str,
    extra_modules: tuple[str, ...],
    absent: tuple[str, ...],
) -> None:
    venv = _install(tmp_path_factory.mktemp(f"install-{extra.strip('[]')}"), extra)
    modules = LIGHT_MODULES + extra_modules
    result = venv.run(venv.python, "-c", CHECK, json.dumps(modules), json.dumps(absent))
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert set(report["files"]) == set(modules)
    for name, file in report["files"].items():
        assert Path(file).is_relative_to(venv.root), (name, file)
    assert report["server_only_found"] == []
    assert report["server_only_loaded"] == []

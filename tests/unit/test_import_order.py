"""Every top-level package imports on its own, in a fresh interpreter, whatever is imported
first (a circular import through the package's re-exports once broke `import idp_adapters`)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "module",
    ["idp_adapters", "idp_adapters.jwks", "broker", "broker.dpop", "broker.kit", "secret_backends"],
)
def test_a_package_imports_first_in_a_fresh_interpreter(module: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr

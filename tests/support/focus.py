"""The FinOps Foundation's FOCUS validator (``focus-validator`` from PyPI) in a venv of its own:
it pins numpy<2, pandas<3 and pandera 0.17, which the project's venv must not be bent to."""

from __future__ import annotations

import subprocess
import venv
from pathlib import Path

import yaml

from broker.focus import VALIDATOR_OVERRIDES

VALIDATOR = "focus-validator==1.0.0"
PINS = ("multimethod<1.11",)
"""pandera 0.17 imports `multimethod.overload`, gone from multimethod 1.11."""
LOCATE = "import focus_validator as f, os; print(os.path.dirname(os.path.dirname(f.__file__)))"


class FocusValidator:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        venv.EnvBuilder(with_pip=True).create(directory)
        python = directory / "bin" / "python"
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", VALIDATOR, *PINS],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if done.returncode != 0:
            raise RuntimeError(f"cannot install {VALIDATOR}:\n{done.stdout}\n{done.stderr}")
        self.python = python
        site = subprocess.run(
            [
                str(python),
                "-c",
                LOCATE,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        # It reads its currency list from a path relative to the working directory.
        self.cwd = Path(site.stdout.strip())

    def validate(self, csv_file: Path, version: str = "1.0") -> subprocess.CompletedProcess[str]:
        """Validate `csv_file`, skipping only the validator's rules on FOCUS 1.0's pre-release
        column names (`broker.focus.VALIDATOR_OVERRIDES`: the export has their 1.0 names)."""
        overrides = self.directory / "overrides.yaml"
        overrides.write_text(yaml.safe_dump({"overrides": list(VALIDATOR_OVERRIDES)}))
        return subprocess.run(
            [
                str(self.directory / "bin" / "focus-validator"),
                "--data-file",
                str(csv_file),
                "--validate-version",
                version,
                "--override-file",
                str(overrides),
                "--output-type",
                "console",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            cwd=self.cwd,
            check=False,
        )

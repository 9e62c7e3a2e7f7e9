"""`make system-packages` (a prerequisite of `make test`): the programs the suite runs that pip
cannot install are installed with apt-get where missing when root, and otherwise make stops at
once with one line naming the packages and the command.

The Makefile runs for real under a PATH holding only the fake programs each case gives it; apt-get
is a recording script (nothing is installed on this machine), and "not root" is the Makefile's
own SYSTEM_PACKAGES_UID variable.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.support.harness import REPO

MAKE = shutil.which("make") or "/usr/bin/make"
ALL_MISSING = "xmlsec1 redis-server postgresql chromium curl xz-utils"


def _fake_bin(tmp_path: Path, *programs: str) -> Path:
    directory = tmp_path / "bin"
    directory.mkdir(exist_ok=True)
    for name in programs:
        path = directory / name
        path.write_text("#!/bin/sh\nexit 0\n")
        path.chmod(0o755)
    return directory


def _fake_apt_get(tmp_path: Path, *, needs_update: bool = False) -> Path:
    """An apt-get that records its arguments; `install` fails until `update` ran when asked."""
    log = tmp_path / "apt.log"
    script = tmp_path / "apt-get"
    failing = (
        f'[ "$1" = install ] && ! grep -q "^update" {log} 2>/dev/null && exit 100\n'
        if needs_update
        else ""
    )
    script.write_text(f'#!/bin/sh\necho "$*" >> {log}\n{failing}exit 0\n')
    script.chmod(0o755)
    return script


def _make(
    tmp_path: Path, path: Path, *targets: str, **variables: str
) -> subprocess.CompletedProcess[str]:
    settings = {
        "VENV": str(tmp_path / "venv"),  # no docker compose there: curl and xz are needed too
        "POSTGRES_BINDIRS": str(tmp_path / "no-postgres"),
        **variables,
    }
    return subprocess.run(
        [MAKE, "--no-print-directory", "-C", str(REPO), *targets]
        + [f"{key}={value}" for key, value in settings.items()],
        env={"PATH": str(path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_not_root_stops_at_once_with_one_line_naming_packages_and_command(
    tmp_path: Path,
) -> None:
    apt = _fake_apt_get(tmp_path)
    fake = _fake_bin(tmp_path)
    result = _make(tmp_path, fake, "system-packages", SYSTEM_PACKAGES_UID="1000", APT_GET=str(apt))
    assert result.returncode != 0
    (line,) = result.stderr.splitlines()  # one line, and make stops
    assert (
        f"make system-packages: missing {ALL_MISSING}; "
        f"run: sudo apt-get install -y --no-install-recommends {ALL_MISSING}"
    ) in line
    assert result.stdout == ""
    assert not (tmp_path / "apt.log").exists()


def test_make_test_stops_before_anything_else_when_a_package_is_missing(tmp_path: Path) -> None:
    fake = _fake_bin(tmp_path, "redis-server", "initdb", "chromium", "curl", "xz")  # no xmlsec1
    result = _make(tmp_path, fake, "test", SYSTEM_PACKAGES_UID="1000")
    assert result.returncode != 0
    (line,) = result.stderr.splitlines()
    assert (
        "make system-packages: missing xmlsec1; "
        "run: sudo apt-get install -y --no-install-recommends xmlsec1."
    ) in line
    assert "venv" not in result.stdout + result.stderr.replace(str(tmp_path / "venv"), "")
    assert not (tmp_path / "venv").exists()  # nothing after the check ran


def test_root_installs_only_what_is_missing(tmp_path: Path) -> None:
    fake = _fake_bin(tmp_path, "xmlsec1", "initdb", "chromium", "curl", "xz")
    apt = _fake_apt_get(tmp_path)
    result = _make(tmp_path, fake, "system-packages", SYSTEM_PACKAGES_UID="0", APT_GET=str(apt))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "install -y --no-install-recommends redis-server"
    ]


def test_root_updates_the_package_lists_only_when_the_install_fails_without(
    tmp_path: Path,
) -> None:
    apt = _fake_apt_get(tmp_path, needs_update=True)
    fake = _fake_bin(tmp_path, "redis-server", "initdb", "chromium", "curl", "xz")
    for tool in ("grep",):  # the fake apt-get's own needs
        os.symlink(shutil.which(tool) or f"/usr/bin/{tool}", fake / tool)
    result = _make(tmp_path, fake, "system-packages", SYSTEM_PACKAGES_UID="0", APT_GET=str(apt))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "apt.log").read_text().splitlines() == [
        "install -y --no-install-recommends xmlsec1",
        "update",
        "install -y --no-install-recommends xmlsec1",
    ]


def test_nothing_happens_when_everything_is_there(tmp_path: Path) -> None:
    fake = _fake_bin(tmp_path, "xmlsec1", "redis-server", "initdb", "chromium", "curl", "xz")
    apt = _fake_apt_get(tmp_path)
    result = _make(tmp_path, fake, "system-packages", SYSTEM_PACKAGES_UID="1000", APT_GET=str(apt))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not (tmp_path / "apt.log").exists()


def test_postgresql_is_found_where_debian_puts_it(tmp_path: Path) -> None:
    """Debian's initdb is not on PATH but under /usr/lib/postgresql/<version>/bin."""
    fake = _fake_bin(tmp_path, "xmlsec1", "redis-server", "chromium", "curl", "xz")
    versioned = tmp_path / "postgresql" / "17" / "bin"
    versioned.mkdir(parents=True)
    shutil.copy(fake / "xmlsec1", versioned / "initdb")
    result = _make(
        tmp_path,
        fake,
        "system-packages",
        SYSTEM_PACKAGES_UID="1000",
        POSTGRES_BINDIRS=str(tmp_path / "postgresql" / "*" / "bin"),
    )
    assert (result.returncode, result.stderr) == (0, "")

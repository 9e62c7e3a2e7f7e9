"""`scripts/debian-binary` and `make kubectl`: a program the suite needs (kubectl >= 1.27 for
`kubectl kustomize`, docker compose) is taken out of a Debian package when the machine has none
new enough, and only if the package matches the SHA-256 the mirror's index gives for it.

The mirror is a real HTTP server on loopback serving a real package index (Packages.xz) and real
.deb files built here with dpkg-deb; nothing is fetched from the internet.
"""

from __future__ import annotations

import hashlib
import lzma
import shutil
import subprocess
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.support.harness import REPO

SCRIPT = REPO / "scripts" / "debian-binary"
MAKE = shutil.which("make") or "/usr/bin/make"
ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(
    subprocess.run(["uname", "-m"], capture_output=True, text=True, check=True).stdout.strip()
)


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """(URL, root) of a Debian mirror on loopback; `publish` below fills it."""
    root = tmp_path / "mirror"
    root.mkdir()
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/debian", root / "debian"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def publish(root: Path, package: str, files: dict[str, str], *, sha256: str | None = None) -> None:
    """Build `package` holding `files` (path -> shell script) and list it in trixie's index."""
    build = root.parent / f"build-{package}"
    (build / "DEBIAN").mkdir(parents=True)
    (build / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1.32.3\nArchitecture: {ARCH}\n"
        "Maintainer: test <test@example.invalid>\nDescription: test package\n"
    )
    for path, text in files.items():
        target = build / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(0o755)
    filename = f"pool/main/{package[0]}/{package}/{package}_1.32.3_{ARCH}.deb"
    deb = root / filename
    deb.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-b", str(build), str(deb)],
        check=True,
        capture_output=True,
    )
    digest = sha256 or hashlib.sha256(deb.read_bytes()).hexdigest()
    index = root / "dists" / "trixie" / "main" / f"binary-{ARCH}" / "Packages.xz"
    index.parent.mkdir(parents=True, exist_ok=True)
    previous = lzma.decompress(index.read_bytes()).decode() if index.exists() else ""
    entry = f"Package: {package}\nVersion: 1.32.3\nFilename: {filename}\nSHA256: {digest}\n\n"
    index.write_bytes(lzma.compress((previous + entry).encode()))


KUBECTL = '#!/bin/sh\necho "Client Version: v1.32.3"\n'


def run_script(mirror_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPT), *args],
        env={"PATH": "/usr/bin:/bin", "DEBIAN_MIRROR": mirror_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_program_is_unpacked_from_the_package_the_index_names(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    publish(root, "docker-compose", {"usr/bin/other": "#!/bin/sh\n"})  # other packages listed too
    publish(root, "kubectl", {"usr/bin/kubectl": KUBECTL})
    dest = tmp_path / "venv" / "bin" / "kubectl"
    done = run_script(url, "kubectl", "usr/bin/kubectl", str(dest))
    assert done.returncode == 0, done.stderr
    assert f"{url}/pool/main/k/kubectl/kubectl_1.32.3_{ARCH}.deb" in done.stdout
    ran = subprocess.run([str(dest)], capture_output=True, text=True, check=True)
    assert ran.stdout == "Client Version: v1.32.3\n"


def test_a_package_that_does_not_match_the_index_checksum_is_refused(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    publish(root, "kubectl", {"usr/bin/kubectl": KUBECTL}, sha256="0" * 64)
    dest = tmp_path / "kubectl"
    done = run_script(url, "kubectl", "usr/bin/kubectl", str(dest))
    assert done.returncode != 0
    assert not dest.exists()


def test_a_package_the_index_does_not_list_is_one_clear_line(
    mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    publish(root, "docker-compose", {"usr/bin/other": "#!/bin/sh\n"})
    done = run_script(url, "kubectl", "usr/bin/kubectl", str(tmp_path / "kubectl"))
    assert done.returncode != 0
    assert done.stderr.strip() == (
        f"debian-binary: kubectl not in {url}/dists/trixie/main/binary-{ARCH}/Packages.xz"
    )


def _path_with(tmp_path: Path, kubectl_minor: str | None) -> Path:
    """A PATH holding what the script needs and, if given, a kubectl of that minor release."""
    directory = tmp_path / "path"
    directory.mkdir(parents=True)
    for tool in (
        "sh", "curl", "xz", "awk", "mktemp", "rm", "dpkg-deb", "tar", "mkdir", "install",
        "sha256sum", "uname", "dirname", "sed", "head", "cat",
    ):  # fmt: skip
        found = shutil.which(tool)
        assert found, tool
        (directory / tool).symlink_to(found)
    if kubectl_minor is not None:
        fake = directory / "kubectl"
        fake.write_text(
            '#!/bin/sh\necho \'{"clientVersion": {"major": "1", '
            f'"minor": "{kubectl_minor}", "gitVersion": "v1.{kubectl_minor}.0"}}}}\'\n'
        )
        fake.chmod(0o755)
    return directory


def make_kubectl(tmp_path: Path, path: Path, mirror_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MAKE, "--no-print-directory", "-C", str(REPO), "kubectl", f"VENV={tmp_path / 'venv'}"],
        env={"PATH": str(path), "HOME": str(tmp_path), "DEBIAN_MIRROR": mirror_url},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_make_kubectl_keeps_a_new_enough_kubectl(mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, root = mirror
    publish(root, "kubectl", {"usr/bin/kubectl": KUBECTL})
    done = make_kubectl(tmp_path, _path_with(tmp_path, "29"), url)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")
    assert not (tmp_path / "venv" / "bin" / "kubectl").exists()


@pytest.mark.parametrize("minor", [None, "20"], ids=["missing", "too-old"])
def test_make_kubectl_installs_debians_where_missing_or_too_old(
    mirror: tuple[str, Path], tmp_path: Path, minor: str | None
) -> None:
    url, root = mirror
    publish(root, "kubectl", {"usr/bin/kubectl": KUBECTL})
    done = make_kubectl(tmp_path, _path_with(tmp_path, minor), url)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "Client Version: v1.32.3"
    assert (tmp_path / "venv" / "bin" / "kubectl").exists()
    again = make_kubectl(tmp_path, _path_with(tmp_path / "again", minor), url)
    assert (again.returncode, again.stdout) == (0, "")  # installed once, then kept

"""The suite's own support code stops what it starts, on every path."""

from __future__ import annotations

import subprocess
import time

from tests.support.harness import stop_process


def test_a_process_that_ignores_sigterm_is_killed_with_its_whole_group() -> None:
    """A broker whose shutdown hangs is killed together with its workers and child servers."""
    process = subprocess.Popen(
        ["bash", "-c", 'trap "" TERM; sleep 60 & echo $!; wait'],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    assert process.stdout is not None
    grandchild = int(process.stdout.readline())
    started = time.monotonic()
    stop_process(process, timeout=0.5)
    assert process.poll() is not None
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while _alive(grandchild):  # reparented and reaped by init once killed
        assert time.monotonic() < deadline, "the group's other process survived"
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False

"""Policy hot reload: `PolicyStore.reload` validates, runs the policy tests, swaps atomically or
refuses the edit (previous version kept, `last_error` set, decision record written), and the
`PolicyWatcher` polls the directory and answers SIGHUP."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading
from pathlib import Path

import pytest

from broker.audit import DecisionLog, MemorySink
from broker.clock import FrozenClock
from broker.policy.loader import compute_version, policy_files
from broker.policy.store import PolicyRejected, PolicyStore, sanitize_problem
from broker.policy.watch import PolicyWatcher

REPO = Path(__file__).resolve().parents[2]
CANARY = "canary-Zq8vW3kPq1LmN0tT"


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "policies"
    shutil.copytree(REPO / "policies", target)
    return target


@pytest.fixture
def sink() -> MemorySink:
    return MemorySink()


@pytest.fixture
def store(policy_dir: Path, sink: MemorySink) -> PolicyStore:
    return PolicyStore(
        policy_dir,
        known_secret_backends=["vault"],
        decisions=DecisionLog([sink], FrozenClock()),
        clock=FrozenClock(),
    )


def _events(sink: MemorySink, event: str) -> list[dict]:
    return [r for r in sink.records if r["event"] == event]


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path.name}"
    path.write_text(text.replace(old, new, 1))


def _disk_version(directory: Path) -> str:
    return compute_version([(p.name, p.read_bytes()) for p in policy_files(directory)])


def test_startup_load_is_recorded(store: PolicyStore, sink: MemorySink) -> None:
    [record] = _events(sink, "policy.loaded")
    assert record["trigger"] == "startup"
    assert record["policy_version"] == store.current().version
    assert store.last_error is None


def test_valid_edit_swaps_and_in_flight_snapshot_is_unchanged(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    in_flight = store.current()  # what a request that started before the reload holds
    _edit(
        policy_dir / "roles.yaml",
        "permissions: [ledger:read, reports:read,",
        "permissions: [ledger:read, ledger:export, reports:read,",
    )
    result = store.reload(trigger="test")

    assert result.changed and result.previous_version == in_flight.version
    assert store.current().version == result.version == _disk_version(policy_dir)
    assert store.current().version != in_flight.version
    assert "ledger:export" not in str(in_flight.roles["finance-analyst"])
    assert store.current().roles["finance-analyst"].covers("ledger:export")
    assert store.last_error is None
    record = _events(sink, "policy.loaded")[-1]
    assert record["outcome"] == "loaded"
    assert record["trigger"] == "test"
    assert record["previous_version"] == in_flight.version
    assert record["policy_version"] == result.version
    assert record["warnings"] == len(result.warnings)


def test_reload_without_changes_records_nothing(store: PolicyStore, sink: MemorySink) -> None:
    before = len(sink.records)
    result = store.reload()
    assert not result.changed and result.version == result.previous_version
    assert len(sink.records) == before


@pytest.mark.parametrize(
    ("file", "old", "new", "expected"),
    [
        pytest.param(
            "roles.yaml",
            "roles:\n",
            "roles: [unclosed\n",
            "roles.yaml: cannot parse",
            id="invalid-yaml",
        ),
        pytest.param(
            "roles.yaml",
            "permissions: [ledger:read,",
            "permisions: [ledger:read,",
            "roles.yaml: roles.finance-analyst",
            id="schema-error",
        ),
        pytest.param(
            "bindings.yaml",
            "roles: [finance-analyst]",
            "roles: [finance-wizard]",
            "unknown role 'finance-wizard'",
            id="unknown-role",
        ),
        pytest.param(
            "roles.yaml",
            "permissions: [tickets:read, tickets:comment, kb:read, llm:openai:chat]",
            "permissions: [tickets:read, tickets:comment, tickets:write, kb:read, llm:openai:chat]",
            "policy test failed",
            id="failing-policy-test",
        ),
    ],
)
def test_invalid_edit_is_rejected_and_previous_version_keeps_serving(
    store: PolicyStore,
    policy_dir: Path,
    sink: MemorySink,
    file: str,
    old: str,
    new: str,
    expected: str,
) -> None:
    serving = store.current()
    _edit(policy_dir / file, old, new)

    with pytest.raises(PolicyRejected) as caught:
        store.reload(trigger="test")

    assert store.current() is serving
    assert any(expected in p for p in caught.value.problems), caught.value.problems
    error = store.last_error
    assert error is not None
    assert error.serving_version == serving.version
    assert error.attempted_version == _disk_version(policy_dir) != serving.version
    assert error.trigger == "test"
    assert error.time.startswith("2027-")  # the injected clock
    assert "rejected" in error.message and serving.version in error.message
    assert any(expected in p for p in error.problems)
    [record] = _events(sink, "policy.rejected")
    assert record["policy_version"] == serving.version
    assert record["attempted_version"] == error.attempted_version
    assert record["problems"] == list(error.problems)
    assert store.reload_failures == 1


def test_failing_policy_test_names_the_test(store: PolicyStore, policy_dir: Path) -> None:
    _edit(policy_dir / "bindings.yaml", "  - {idp: dev, subject: bob, roles: [support]}\n", "")
    with pytest.raises(PolicyRejected) as caught:
        store.reload()
    assert any(
        p.startswith("tests/example.yaml: bob is bound individually to support")
        for p in caught.value.problems
    ), caught.value.problems


def test_broken_policy_test_file_is_rejected(store: PolicyStore, policy_dir: Path) -> None:
    (policy_dir / "tests" / "broken.yaml").write_text("tests:\n  - name: x\n    nonsense: 1\n")
    with pytest.raises(PolicyRejected) as caught:
        store.reload()
    assert any(p.startswith("tests/broken.yaml:") for p in caught.value.problems)


def test_fixing_the_edit_resumes_and_clears_last_error(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    original = (policy_dir / "roles.yaml").read_text()
    (policy_dir / "roles.yaml").write_text("roles: [unclosed\n")
    with pytest.raises(PolicyRejected):
        store.reload()
    assert store.last_error is not None

    # Reverting to the serving content: nothing to swap, but the error is resolved (and said so).
    (policy_dir / "roles.yaml").write_text(original)
    result = store.reload()
    assert not result.changed and store.last_error is None
    assert _events(sink, "policy.loaded")[-1]["outcome"] == "unchanged"

    (policy_dir / "roles.yaml").write_text(original.replace("ledger:read,", "ledger:read, x:y,"))
    result = store.reload()
    assert result.changed and store.current().version == _disk_version(policy_dir)


def test_rejection_never_carries_file_content(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    # A secret pasted into a broken file: YAML errors quote the offending line; records must not.
    (policy_dir / "zz-oops.yaml").write_text(f"admins:\n  x:\n    secret: {CANARY}\n  - y: [\n")
    with pytest.raises(PolicyRejected) as caught:
        store.reload()
    assert CANARY not in str(caught.value)
    assert store.last_error is not None
    assert CANARY not in repr(store.last_error.as_dict())
    assert CANARY not in repr(sink.records)
    assert all("\n" not in p for p in store.last_error.problems)


def test_sanitize_problem_drops_snippets_and_caps_length() -> None:
    problem = (
        'a.yaml: cannot parse: bad\n  in "<byte string>", line 2, column 3:\n    key: val\n    ^'
    )
    assert (
        sanitize_problem(problem)
        == 'a.yaml: cannot parse: bad in "<byte string>", line 2, column 3:'
    )
    assert len(sanitize_problem("x" * 5000)) == 400


def test_missing_directory_is_rejected_without_version(
    store: PolicyStore, policy_dir: Path
) -> None:
    serving = store.current()
    shutil.rmtree(policy_dir)
    with pytest.raises(PolicyRejected):
        store.reload()
    assert store.current() is serving
    assert store.last_error is not None and store.last_error.attempted_version is None


def test_concurrent_reloads_are_serialised(store: PolicyStore, policy_dir: Path) -> None:
    _edit(policy_dir / "roles.yaml", "ledger:read,", "ledger:read, x:y,")
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(store.reload().changed)) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == [False] * 7 + [True]


# -------------------------------------------------------------------------------------------
# the watcher
# -------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_watcher_reloads_a_changed_directory_once(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    watcher = PolicyWatcher(store, interval=0.05)
    assert await watcher.check_once() is None  # nothing changed
    _edit(policy_dir / "roles.yaml", "ledger:read,", "ledger:read, x:y,")
    result = await watcher.check_once()
    assert result is not None and result.changed
    assert await watcher.check_once() is None


@pytest.mark.anyio
async def test_watcher_does_not_retry_a_rejected_edit_until_it_changes(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    watcher = PolicyWatcher(store, interval=0.05)
    (policy_dir / "roles.yaml").write_text("roles: [unclosed\n")
    assert await watcher.check_once() is None
    assert await watcher.check_once() is None
    assert len(_events(sink, "policy.rejected")) == 1
    (policy_dir / "roles.yaml").write_text(
        (REPO / "policies" / "roles.yaml").read_text().replace("ledger:read,", "ledger:read, x:y,")
    )
    result = await watcher.check_once()
    assert result is not None and result.changed and store.last_error is None


@pytest.mark.anyio
async def test_watcher_task_picks_up_edits_and_stops(store: PolicyStore, policy_dir: Path) -> None:
    watcher = PolicyWatcher(store, interval=0.05)
    watcher.start()
    assert watcher.running
    before = store.current().version
    _edit(policy_dir / "roles.yaml", "ledger:read,", "ledger:read, x:y,")
    for _ in range(100):
        if store.current().version != before:
            break
        await asyncio.sleep(0.05)
    assert store.current().version == _disk_version(policy_dir) != before
    await watcher.stop()
    assert not watcher.running


@pytest.mark.anyio
async def test_zero_interval_disables_polling(store: PolicyStore) -> None:
    watcher = PolicyWatcher(store, interval=0)
    watcher.start()
    assert not watcher.running
    await watcher.stop()


@pytest.mark.anyio
async def test_sighup_handler_function_schedules_a_reload(
    store: PolicyStore, policy_dir: Path, sink: MemorySink
) -> None:
    watcher = PolicyWatcher(store, interval=0)
    _edit(policy_dir / "roles.yaml", "ledger:read,", "ledger:read, x:y,")
    watcher.request_reload()  # what the signal handler calls
    await watcher.stop()  # waits for the scheduled reload
    assert store.current().version == _disk_version(policy_dir)
    assert _events(sink, "policy.loaded")[-1]["trigger"] == "sighup"

    (policy_dir / "roles.yaml").write_text("roles: [unclosed\n")
    watcher.request_reload()
    await watcher.stop()  # a rejection is recorded, never raised into the loop
    assert store.last_error is not None and store.last_error.trigger == "sighup"


@pytest.mark.anyio
async def test_real_sighup_in_the_main_thread(store: PolicyStore, policy_dir: Path) -> None:
    watcher = PolicyWatcher(store, interval=0)
    assert threading.current_thread() is threading.main_thread()
    assert watcher.install_sighup_handler()
    try:
        _edit(policy_dir / "roles.yaml", "ledger:read,", "ledger:read, x:y,")
        os.kill(os.getpid(), signal.SIGHUP)
        for _ in range(100):
            if store.current().version == _disk_version(policy_dir):
                break
            await asyncio.sleep(0.02)
        assert store.current().version == _disk_version(policy_dir)
    finally:
        await watcher.stop()  # also removes the handler


def test_sighup_handler_is_not_installed_off_the_main_thread(store: PolicyStore) -> None:
    installed: list[bool] = []

    def run() -> None:
        async def main() -> None:
            installed.append(PolicyWatcher(store, interval=0).install_sighup_handler())

        asyncio.run(main())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    assert installed == [False]

"""Audit sinks for real: the file sink is on disk (fdatasync'd) before `record` returns, and the
S3 sink writes batches as Object Lock objects to a moto server over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import boto3
import botocore.exceptions
import pytest

from broker.audit import (
    AuditUnavailable,
    DecisionLog,
    S3ObjectLockSink,
    build_sinks,
    verify_trail,
)
from broker.clock import SystemClock
from broker.settings import AuditConfig, AuditS3Config
from tests.support.servers import MotoServer, run_moto


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with run_moto() as server:
        yield server


@pytest.fixture(autouse=True)
def aws_env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in moto.credentials_env.items():
        monkeypatch.setenv(name, value)


def _s3(moto: MotoServer) -> Any:
    return boto3.session.Session(region_name=moto.region).client(
        "s3", endpoint_url=moto.endpoint_url
    )


def _locked_bucket(moto: MotoServer) -> str:
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    _s3(moto).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    return bucket


def _wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _record_fetches(log: DecisionLog, count: int) -> None:
    for i in range(count):
        log.record(
            "credential.fetch",
            outcome="granted",
            person="dev/alice",
            agent_chain=["triage-agent"],
            credential="openai",
            request_id=f"req-{i}",
        )


def test_each_record_is_on_disk_and_readable_before_record_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    syncs: list[int] = []
    real_sync = os.fdatasync

    def counting_sync(fd: int) -> None:
        syncs.append(fd)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    path = tmp_path / "audit" / "trail.jsonl"
    log = DecisionLog(
        build_sinks(AuditConfig(stdout=False, file=path, group_commit=False)), SystemClock()
    )  # the settings wiring
    assert len(syncs) == 1  # the chain start record
    for i in range(5):
        returned = log.record("token.exchange", outcome="granted", request_id=f"r{i}")
        with path.open() as reader:  # a separate reader, while the writer is still open
            lines = reader.read().splitlines()
        assert json.loads(lines[-1]) == returned
        assert len(lines) == i + 2
        assert len(syncs) == i + 2  # synced once per record, before record returned
    assert verify_trail([path]).ok
    log.close()


def test_group_commit_makes_every_awaited_record_durable_with_few_syncs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    covered: list[int] = []  # file size each completed sync is known to cover
    real_sync = os.fdatasync

    def slow_counting_sync(fd: int) -> None:
        size = os.fstat(fd).st_size  # bytes appended before the sync starts are covered by it
        time.sleep(0.005)  # a slow disk: many records arrive during one sync
        real_sync(fd)
        covered.append(size)

    monkeypatch.setattr(os, "fdatasync", slow_counting_sync)
    path = tmp_path / "audit" / "trail.jsonl"
    log = DecisionLog(build_sinks(AuditConfig(stdout=False, file=path)), SystemClock())
    assert covered == []  # appending does not sync: the committer does, when asked

    async def request(i: int) -> int:
        log.record("credential.fetch", outcome="granted", request_id=f"r{i}")
        await log.wait_durable()
        return covered[-1]  # what was durable when this request could be answered

    async def many() -> list[int]:
        return await asyncio.gather(*(request(i) for i in range(200)))

    durable_at_answer = asyncio.run(many())
    lines = path.read_text().splitlines()
    assert len(lines) == 201
    line_end: dict[str, int] = {}
    position = len(lines[0]) + 1
    for line in lines[1:]:
        position += len(line) + 1
        line_end[json.loads(line)["request_id"]] = position
    # Each request's own line was inside a completed sync before it was answered.
    for i, durable in enumerate(durable_at_answer):
        assert line_end[f"r{i}"] <= durable, f"r{i} answered before its record was synced"
    assert 1 <= log.group_commits < 50  # far fewer syncs than records
    log.close()
    assert verify_trail([path]).ok


def _concurrent_requests(log: DecisionLog, count: int, *, event: str = "token.exchange") -> None:
    async def request(i: int) -> None:
        log.record(event, outcome="granted", request_id=f"r{i}")
        await log.wait_durable()

    async def many() -> None:
        await asyncio.gather(*(request(i) for i in range(count)))

    asyncio.run(many())


def test_on_a_fast_disk_group_commit_runs_on_the_event_loop_with_no_thread_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A local disk syncs in well under a millisecond: rounds run on the waiting loop (no GIL
    hand-off with the committer thread), each covering many records, none answered early."""
    synced_size: list[int] = []
    real_sync = os.fdatasync

    def counting_sync(fd: int) -> None:
        size = os.fstat(fd).st_size
        real_sync(fd)
        synced_size.append(size)

    monkeypatch.setattr(os, "fdatasync", counting_sync)
    path = tmp_path / "trail.jsonl"
    log = DecisionLog(build_sinks(AuditConfig(stdout=False, file=path)), SystemClock())
    committer = log._committer
    assert committer is not None and committer.inline
    answered: list[str] = []

    async def request(i: int) -> None:
        log.record("token.exchange", outcome="granted", request_id=f"r{i}")
        await log.wait_durable()
        # its own line was inside a completed sync before it could be answered
        assert synced_size and synced_size[-1] >= _offset_after(path, f"r{i}")
        answered.append(f"r{i}")

    async def many() -> None:
        await asyncio.gather(*(request(i) for i in range(300)))

    asyncio.run(many())
    assert len(answered) == 300
    assert committer.inline_syncs == committer.syncs  # every round ran on the loop
    assert 1 <= committer.syncs < 30
    log.close()
    assert verify_trail([path]).ok


def _offset_after(path: Path, request_id: str) -> int:
    """The file offset just past the line of `request_id`."""
    position = 0
    with path.open("rb") as lines:
        for line in lines:
            position += len(line)
            if json.loads(line).get("request_id") == request_id:
                return position
    raise AssertionError(f"{request_id} is not in the trail")


def test_a_slow_disk_moves_group_commit_to_its_thread_and_back_when_the_disk_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Syncs of several milliseconds would stall the event loop: rounds move to the committer
    thread; the disk is probed again from the loop and, once fast, rounds come back to it."""
    import broker.audit as audit

    monkeypatch.setattr(audit, "_DISK_PROBE_SECONDS", 0.05)
    real_sync = os.fdatasync
    slow = {"on": True}

    def maybe_slow_sync(fd: int) -> None:
        if slow["on"]:
            time.sleep(0.008)
        real_sync(fd)

    monkeypatch.setattr(os, "fdatasync", maybe_slow_sync)
    path = tmp_path / "trail.jsonl"
    log = DecisionLog(build_sinks(AuditConfig(stdout=False, file=path)), SystemClock())
    committer = log._committer
    assert committer is not None
    for _ in range(5):
        _concurrent_requests(log, 20)
    assert not committer.inline
    thread_rounds = committer.syncs - committer.inline_syncs
    assert thread_rounds > 0

    slow["on"] = False
    deadline = time.monotonic() + 10
    while not committer.inline and time.monotonic() < deadline:
        time.sleep(0.06)  # past the probe interval: the next wait measures on the loop
        _concurrent_requests(log, 5)
    assert committer.inline, "the recovered disk was never measured again"
    thread_before, inline_before = committer.syncs - committer.inline_syncs, committer.inline_syncs
    for _ in range(10):  # ten rounds at least: one group commit each
        _concurrent_requests(log, 5)
    on_thread = committer.syncs - committer.inline_syncs - thread_before
    on_loop = committer.inline_syncs - inline_before
    # back on the loop: a real sync slowed by a busy machine may still send one round to the
    # thread (the typical round is a median over recent rounds), never most of them
    assert on_loop > on_thread, (on_loop, on_thread)
    log.close()
    assert verify_trail([path]).ok


def test_with_inline_syncs_off_every_round_runs_on_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    log = DecisionLog(
        build_sinks(AuditConfig(stdout=False, file=path)), SystemClock(), inline_sync_max=0.0
    )
    committer = log._committer
    assert committer is not None
    _concurrent_requests(log, 100)
    assert committer.syncs >= 1
    assert committer.inline_syncs == 0
    log.close()
    assert verify_trail([path]).ok


def test_a_failing_group_sync_fails_the_waiting_requests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "trail.jsonl"
    log = DecisionLog(build_sinks(AuditConfig(stdout=False, file=path)), SystemClock())

    def broken_sync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", broken_sync)

    async def request() -> None:
        log.record("token.exchange", outcome="granted", request_id="r1")
        await log.wait_durable()

    with pytest.raises(AuditUnavailable):
        asyncio.run(request())
    monkeypatch.undo()  # the disk recovers: the next request is answered
    asyncio.run(request())
    log.close()


def test_the_s3_sink_writes_locked_batches_and_flushes_on_close(
    moto: MotoServer, tmp_path: Path
) -> None:
    bucket = _locked_bucket(moto)
    config = AuditConfig(
        stdout=False,
        file=tmp_path / "trail.jsonl",
        s3=AuditS3Config(
            bucket=bucket,
            prefix="broker/",
            region=moto.region,
            endpoint_url=moto.endpoint_url,
            object_lock_mode="COMPLIANCE",
            retention_days=30,
            batch_size=5,
            batch_age_seconds=3600,
        ),
    )
    log = DecisionLog(build_sinks(config), SystemClock())
    _record_fetches(log, 11)  # 12 records with the chain start: two full batches, 2 left
    _wait_for(lambda: log.sink_lag()["S3ObjectLockSink"] == 2)
    s3 = _s3(moto)
    assert len(s3.list_objects_v2(Bucket=bucket).get("Contents", [])) == 2
    log.close()  # closes the chain (one more record) and flushes the partial batch
    assert log.sink_lag()["S3ObjectLockSink"] == 0

    lock = s3.get_object_lock_configuration(Bucket=bucket)["ObjectLockConfiguration"]
    assert lock["ObjectLockEnabled"] == "Enabled"
    keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == [
        f"broker/{log.chain}/000000000000-000000000004.jsonl",
        f"broker/{log.chain}/000000000005-000000000009.jsonl",
        f"broker/{log.chain}/000000000010-000000000012.jsonl",
    ]
    downloaded = tmp_path / "from-s3.jsonl"
    with downloaded.open("wb") as out:
        for key in keys:
            # the object's retention, as S3 reports it (moto 5 has no GetObjectRetention; HEAD
            # returns the same ObjectLockMode / ObjectLockRetainUntilDate)
            head = s3.head_object(Bucket=bucket, Key=key)
            assert head["ObjectLockMode"] == "COMPLIANCE"
            assert head["ObjectLockRetainUntilDate"] > datetime.now(UTC) + timedelta(days=29)
            assert head["ObjectLockRetainUntilDate"] < datetime.now(UTC) + timedelta(days=31)
            out.write(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    # the S3 copy is the same trail, byte for byte, as the local file, and verifies on its own
    assert downloaded.read_bytes() == (tmp_path / "trail.jsonl").read_bytes()
    assert verify_trail([downloaded]).ok

    version = s3.head_object(Bucket=bucket, Key=keys[0])["VersionId"]
    with pytest.raises(botocore.exceptions.ClientError):
        s3.delete_object(Bucket=bucket, Key=keys[0], VersionId=version)


def test_a_batch_is_uploaded_when_it_is_old_enough(moto: MotoServer) -> None:
    bucket = _locked_bucket(moto)
    sink = S3ObjectLockSink(
        _s3(moto),
        bucket,
        mode="GOVERNANCE",
        retention_days=1,
        batch_size=1000,
        batch_age_seconds=0.3,
    )
    log = DecisionLog([sink], SystemClock())
    _record_fetches(log, 3)
    assert sink.lag() > 0
    _wait_for(lambda: sink.lag() == 0)
    [obj] = _s3(moto).list_objects_v2(Bucket=bucket)["Contents"]
    assert _s3(moto).head_object(Bucket=bucket, Key=obj["Key"])["ObjectLockMode"] == "GOVERNANCE"
    sink.close()


def test_failed_uploads_are_retried_and_counted_as_lag(moto: MotoServer) -> None:
    bucket = f"audit-later-{uuid.uuid4().hex[:8]}"  # does not exist yet: uploads fail
    sink = S3ObjectLockSink(_s3(moto), bucket, batch_size=2, retry_seconds=0.1, check_bucket=False)
    log = DecisionLog([sink], SystemClock())
    _record_fetches(log, 3)
    _wait_for(lambda: sink.last_error is not None)
    assert sink.lag() == 4
    _s3(moto).create_bucket(Bucket=bucket, ObjectLockEnabledForBucket=True)
    _wait_for(lambda: sink.lag() == 0)
    assert sink.last_error is None and len(sink.uploaded_keys) == 2
    sink.close()


def test_a_bucket_without_object_lock_is_refused(moto: MotoServer) -> None:
    bucket = f"plain-{uuid.uuid4().hex[:8]}"
    _s3(moto).create_bucket(Bucket=bucket)
    config = AuditConfig(
        stdout=False,
        s3=AuditS3Config(bucket=bucket, region=moto.region, endpoint_url=moto.endpoint_url),
    )
    with pytest.raises((RuntimeError, botocore.exceptions.ClientError)):
        build_sinks(config)


def test_round_timing_reads_each_threads_schedstat_and_closes_it_with_the_thread() -> None:
    """Rounds on the loop are timed without the thread's waits for a CPU (a busy machine says
    nothing about the disk); the per-thread schedstat descriptor must not outlive its thread."""
    import threading

    from broker.audit import _run_queue_wait

    def open_descriptors() -> int:
        return len(os.listdir("/proc/self/fd"))

    assert _run_queue_wait() >= 0.0
    before = open_descriptors()
    seen: list[float] = []
    for _ in range(20):
        worker = threading.Thread(target=lambda: seen.append(_run_queue_wait()))
        worker.start()
        worker.join()
    import gc

    gc.collect()
    assert len(seen) == 20 and all(value >= 0.0 for value in seen)
    assert open_descriptors() <= before + 1

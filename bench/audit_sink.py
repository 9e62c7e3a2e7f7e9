"""The audit file sink's cost per decision: per-record ``fdatasync`` beside group commit.

``python -m bench.audit_sink`` (or ``python -m bench --only audit``). In process, one asyncio
loop, 64 concurrent "requests" (closed loop), each doing what a request handler and the HTTP edge
do: ``DecisionLog.record`` (hash-chained JSON, appended to the file), then ``await
DecisionLog.wait_durable()`` before "answering". Rows, measured one after the other in this run:

* ``no sink`` -- the chain and hashing alone (the floor);
* ``file, no sync`` -- appended, never synced (``audit.fsync: false``: durability given up);
* ``file, fdatasync per record`` -- ``audit.group_commit: false``: every record synced inside
  ``record``, on the event loop;
* ``file, group commit`` -- the default: one background ``fdatasync`` covers every record
  appended while the previous one ran.

Columns: decisions/s, latency p50/p99 from ``record`` to durable (ms), syncs per 1,000 decisions.
With per-record sync the latency column understates what callers feel: while one record syncs,
the event loop is blocked and every other request waits before its ``record`` even starts, which
shows in decisions/s instead. The file lives in a temporary directory under the system's
``/tmp``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench._report import table as render_table
from broker.audit import DecisionLog, FileSink
from broker.clock import SystemClock

CONCURRENCY = 64
SECONDS = 3.0

NO_SINK = "no sink (hash chain only)"
NO_SYNC = "file, no sync (fsync: false)"
PER_RECORD = "file, fdatasync per record (group_commit: false)"
GROUP = "file, group commit (default)"


def _counting_syncs() -> tuple[list[int], object]:
    counter = [0]
    real = os.fdatasync

    def counted(fd: int) -> None:
        counter[0] += 1
        real(fd)

    os.fdatasync = counted  # type: ignore[assignment]
    return counter, real


async def _drive(log: DecisionLog, seconds: float) -> tuple[int, list[float]]:
    deadline = time.perf_counter() + seconds
    latencies: list[float] = []
    done = 0

    async def client(n: int) -> None:
        nonlocal done
        i = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            log.record(
                "credential.fetch",
                outcome="granted",
                reason="granted",
                person="okta/00u1bench",
                agent_chain=["triage-agent"],
                gateway="llm-gateway",
                credential="openai-api-key",
                version="7",
                request_id=f"bench-{n}-{i}",
                policy_version="sha256:bench",
            )
            await log.wait_durable()
            latencies.append(time.perf_counter() - started)
            done += 1
            i += 1
            await asyncio.sleep(0)  # a request yields at least once (network I/O)

    await asyncio.gather(*(client(n) for n in range(CONCURRENCY)))
    return done, latencies


def _measure(label: str, directory: Path, seconds: float) -> list[object]:
    counter, real = _counting_syncs()
    try:
        if label == NO_SINK:
            sinks: list[FileSink] = []
        else:
            sinks = [
                FileSink(
                    directory / f"{abs(hash(label))}.jsonl",
                    fsync=label != NO_SYNC,
                    group_commit=label == GROUP,
                )
            ]
        log = DecisionLog(sinks, SystemClock())  # type: ignore[arg-type]
        counter[0] = 0
        started = time.perf_counter()
        done, latencies = asyncio.run(_drive(log, seconds))
        elapsed = time.perf_counter() - started
        syncs = counter[0]
        log.close()
    finally:
        os.fdatasync = real  # type: ignore[assignment]
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return [
        label,
        f"{done / elapsed:,.0f}",
        f"{statistics.median(latencies) * 1000:.2f}",
        f"{p99 * 1000:.2f}",
        f"{syncs * 1000 / max(done, 1):,.1f}",
    ]


def run(seconds: float = SECONDS) -> list[list[object]]:
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as tmp:
        directory = Path(tmp)
        labels = (NO_SINK, NO_SYNC, PER_RECORD, GROUP)
        return [_measure(label, directory, seconds) for label in labels]


def main(seconds: float = SECONDS) -> None:
    rows = run(seconds)
    print(f"Audit file sink, in process: {CONCURRENCY} concurrent record + wait_durable loops")
    print(
        render_table(
            ["sink", "decisions/s", "p50 ms", "p99 ms", "fdatasync per 1k decisions"], rows
        )
    )
    per_record = float(str(rows[2][1]).replace(",", ""))
    group = float(str(rows[3][1]).replace(",", ""))
    print(
        f"group commit vs per-record fdatasync: {group / max(per_record, 1):.1f}x decisions/s, "
        "same guarantee (no answer before its record is on disk)"
    )


if __name__ == "__main__":
    main()

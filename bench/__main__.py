"""``python -m bench``: run the benchmarks and print their tables (see bench/README.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from bench import exchange

_NUMBERS: list[tuple[str, type, str | None, str]] = [
    # (option = exchange.Options field, type, environment variable or None, help)
    ("seconds", float, "BENCH_SECONDS", "measured seconds per target"),
    ("warmup", float, "BENCH_WARMUP", "warm-up seconds per target, not measured"),
    ("concurrency", int, None, "concurrent clients"),
    ("processes", int, None, "load generator processes"),
    ("workers", int, None, "broker uvicorn workers"),
    ("rounds", int, None, "measure every target this many times"),
]


def _parse(argv: list[str] | None) -> exchange.Options:
    defaults = exchange.Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Token exchange throughput/latency beside same-run baselines "
        "(broker /healthz, OpenBao JWT login).",
    )
    for name, kind, env, text in _NUMBERS:
        default = getattr(defaults, name)
        if env and os.environ.get(env):
            default = kind(os.environ[env])
        where = f"env {env}; " if env else ""
        parser.add_argument(
            f"--{name}", type=kind, default=default, help=f"{text} ({where}default %(default)s)"
        )
    parser.add_argument(
        "--no-bao-audit", action="store_true", help="skip the OpenBao row with a file audit device"
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configs, logs) for inspection",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.processes < 1:
        parser.error("seconds must be > 0, warmup >= 0, concurrency and processes >= 1")
    return exchange.Options(
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        processes=args.processes,
        workers=args.workers,
        rounds=max(1, args.rounds),
        bao_audit=not args.no_bao_audit,
        keep=args.keep,
    )


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)  # stop everything as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        exchange.run(options)
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: run the benchmarks and print their tables (see bench/README.md)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from types import FrameType

from bench import exchange


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name)
    return float(value) if value else default


def _parse(argv: list[str] | None) -> exchange.Options:
    defaults = exchange.Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Token exchange throughput/latency beside same-run baselines "
        "(broker /healthz, OpenBao JWT login).",
    )
    parser.add_argument(
        "--seconds",
        type=float,
        default=_env_float("BENCH_SECONDS", defaults.seconds),
        help="measured seconds per target (env BENCH_SECONDS; default %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=_env_float("BENCH_WARMUP", defaults.warmup),
        help="warm-up seconds per target, not measured (env BENCH_WARMUP; default %(default)s)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=defaults.concurrency,
        help="concurrent clients (default %(default)s)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=defaults.processes,
        help="load generator processes (default %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=defaults.workers,
        help="broker uvicorn workers (default %(default)s)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=defaults.rounds,
        help="measure every target this many times (default %(default)s)",
    )
    parser.add_argument(
        "--no-bao-audit", action="store_true", help="skip the OpenBao row with a file audit device"
    )
    parser.add_argument(
        "--fixed-launch",
        choices=["auto", "always", "never"],
        default=defaults.fixed_launch,
        help="also measure the broker started with TCP_NODELAY on accepted connections: "
        "auto = when `broker serve` shows the delayed-ACK stall (default %(default)s)",
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
        fixed_launch=args.fixed_launch,
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

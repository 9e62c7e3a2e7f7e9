"""``python -m bench``: run the benchmarks and print their tables (see bench/README.md)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import sys
from types import FrameType

from bench import audit_sink, cache_hit, client_auth, credentials, dpop, exchange, state

SECTIONS = (
    "production",
    "exchange",
    "credentials",
    "cache",
    "state",
    "audit",
    "client_auth",
    "dpop",
)
"""What ``--only`` may name, in the order a full run measures them."""

_NUMBERS: list[tuple[str, type, str | None, str]] = [
    # (option = exchange.Options field, type, environment variable or None, help)
    ("seconds", float, "BENCH_SECONDS", "measured seconds per target"),
    ("warmup", float, "BENCH_WARMUP", "warm-up seconds per target, not measured"),
    ("concurrency", int, None, "concurrent clients"),
    ("processes", int, None, "load generator processes"),
    ("workers", int, None, "broker uvicorn workers"),
    ("rounds", int, None, "measure every target this many times"),
]


def _sections(text: str) -> tuple[str, ...]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {', '.join(SECTIONS)}; got {text!r}"
        )
    return tuple(name for name in SECTIONS if name in names)


def _parse(argv: list[str] | None) -> tuple[exchange.Options, tuple[str, ...]]:
    defaults = exchange.Options()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Token exchange and credential fetch throughput/latency beside same-run "
        "baselines (broker /healthz, OpenBao JWT login, OpenBao KV read), and the in-process "
        "cost of a credential cache hit (beside a dict lookup and AWS's SecretCache), and the "
        "Redis state store beside the in-memory one (fetch, exchange, re-exchange), and the audit "
        "file sink's group commit beside per-record fdatasync, and client authentication: unknown "
        "ids beside known ones, a legitimate client under a flood of wrong secrets.",
    )
    parser.add_argument(
        "--only",
        type=_sections,
        default=SECTIONS,
        metavar="|".join(SECTIONS),
        help="run only these sections, comma-separated (default: all)",
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
        "--no-bao-audit",
        action="store_true",
        help="skip the OpenBao rows with a file audit device (the broker's store keeps one)",
    )
    parser.add_argument(
        "--no-open-loop",
        action="store_true",
        help="skip the open loop measurements at half each target's measured maximum rate "
        "(exchange, credentials and production sections)",
    )
    parser.add_argument(
        "--keep",
        action="store_true",
        help="keep the temporary directory (configs, logs) for inspection",
    )
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 0 or args.concurrency < 1 or args.processes < 1:
        parser.error("seconds must be > 0, warmup >= 0, concurrency and processes >= 1")
    options = exchange.Options(
        seconds=args.seconds,
        warmup=args.warmup,
        concurrency=args.concurrency,
        processes=args.processes,
        workers=args.workers,
        rounds=max(1, args.rounds),
        bao_audit=not args.no_bao_audit,
        open_loop=not args.no_open_loop,
        keep=args.keep,
    )
    return options, args.only


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    options, sections = _parse(argv)
    signal.signal(signal.SIGTERM, _terminate)  # stop everything as on Ctrl-C
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    try:
        for section in sections:
            if section == "production":
                print(
                    "== Production shape: Redis state, durable audit file (fsync'ed group "
                    "commit), workers per core =="
                )
                shaped = dataclasses.replace(options, production=True)
                exchange.run(shaped)
                credentials.run(shaped)
            elif section == "exchange":
                exchange.run(options)
            elif section == "credentials":
                credentials.run(options)
            elif section == "state":
                state.run(options)
            elif section == "audit":
                audit_sink.main(min(options.seconds, 3.0))
            elif section == "client_auth":
                client_auth.main()
            elif section == "dpop":
                dpop.main()
            else:
                cache_hit.main()
            print("")
    except KeyboardInterrupt:
        print("interrupted; everything started has been stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Token exchanges per second and latency at N concurrent clients, beside same-run baselines:

* ``GET /healthz`` on the same broker server: what HTTP + uvicorn + FastAPI alone cost;
* OpenBao's JWT auth login (batch tokens) given the same people's ID tokens: what an established
  secrets broker charges to verify the same JWTs and hand back a token (with and without a file
  audit device, since the broker is meant to write a decision record per exchange).

The exchange and the logins cycle `PEOPLE` distinct person tokens (distinct ``sub``, each in
Alice's group), so that no server answers from what it remembers of one token. After the closed
loop rounds, each of them is measured again open loop at half its own measured maximum rate:
tail latency without saturation.

The broker runs as ``broker serve`` as shipped. Before measuring, a keep-alive probe guards
against the return of uvicorn #3149 (a multi-worker listening socket without ``IPPROTO_TCP``, so
no TCP_NODELAY and a ~40 ms delayed-ACK stall per keep-alive response), which ``broker serve``
avoids by creating its listening socket itself.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import platform
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from bench._loadgen import (
    OPEN_LOOP_DRAIN_SECONDS,
    LoadResult,
    LoadSpec,
    build_request,
    cpu_count,
    run_load,
)
from bench._report import table
from bench._servers import (
    LOOPBACK,
    Broker,
    Issuer,
    OpenBao,
    broker_server,
    cpu_seconds_by_pid,
    dev_issuer,
    machine_busy_seconds,
    openbao_server,
    process_tree,
    production_shape,
    work_directory,
)

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:id_token"
PERSON = "alice"
PEOPLE = 256
"""How many distinct person tokens the exchange and OpenBao login targets cycle through."""
PERSON_PREFIX = "bench-person-"
SCOPE = "tickets:read kb:read"
AUDIENCE = "https://tickets.internal.example"
TARGET_P99_MS = 25.0
PRODUCTION_TARGET_P99_MS = 40.0
"""Issue 13's exchange target in the production shape: at least the audited login's rate, p99
at 64 connections at most this."""
STALL_MS = 20.0
"""A sequential keep-alive /healthz slower than this means responses wait on delayed ACKs."""


@dataclass(frozen=True)
class Options:
    seconds: float = 8.0
    warmup: float = 2.0
    concurrency: int = 64
    processes: int = 2
    workers: int = 2
    rounds: int = 1
    bao_audit: bool = True
    keep: bool = False
    production: bool = False
    """The broker in the production shape: Redis state and the durable audit file."""
    open_loop: bool = True
    """After the closed loop rounds, measure the main targets open loop at half their maximum."""


@dataclass
class Row:
    label: str
    group: str
    result: LoadResult
    server_cpu_seconds: float
    machine_cpu_seconds: float
    process_cpu_seconds: list[float]
    """The server's processes that used CPU in the window, busiest first (worker balance)."""


SERVE = "broker serve"
BAO_LOGIN = "OpenBao JWT login"
BAO_LOGIN_AUDIT = "OpenBao JWT login + audit"


def exchange_request(
    client_id: str,
    client_secret: str,
    person_token: str,
    *,
    scope: str = SCOPE,
    audience: str = AUDIENCE,
) -> tuple[dict[str, str], bytes]:
    """Headers and form body of the benchmarked RFC 8693 exchange (HTTP Basic client auth)."""
    basic = base64.b64encode(f"{client_id}:{client_secret}".encode()).decode()
    headers = {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    body = urlencode(
        {
            "grant_type": GRANT_TYPE,
            "subject_token": person_token,
            "subject_token_type": ID_TOKEN_TYPE,
            "scope": scope,
            "audience": audience,
        }
    ).encode()
    return headers, body


def person_tokens(issuer: Issuer, count: int = PEOPLE) -> tuple[str, ...]:
    """`count` development-issuer RS256 ID tokens (24 h) of distinct people: ``sub``, ``email``
    and ``name`` ``bench-person-000``... in place of `PERSON`'s, the rest of `PERSON`'s claims
    kept, her ``groups`` (support) among them. The broker trusts the issuer as ``kind: oidc``
    and grants by group, so each gets Alice's rights; OpenBao's role checks the audience and
    takes ``sub`` and ``groups`` as they come."""
    tokens = []
    for index in range(count):
        subject = f"{PERSON_PREFIX}{index:03d}"
        claims = {"sub": subject, "email": f"{subject}@example.com", "name": f"Bench {subject}"}
        tokens.append(
            issuer.provider.mint(
                PERSON, token_type="id_token", lifetime=24 * 3600, extra_claims=claims
            )
        )
    return tuple(tokens)


def _bao_request(bao: OpenBao, person_token: str) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"role": bao.role, "jwt": person_token}).encode()
    return {"Content-Type": "application/json"}, body


def _preflight_all(
    what: str, url: str, requests: Sequence[tuple[dict[str, str], bytes]], ok: Callable[[Any], bool]
) -> None:
    """POST every request variant to `url` once; the first one `ok` refuses fails the run."""
    with httpx.Client(timeout=30) as client:
        for index, (headers, body) in enumerate(requests):
            response = client.post(url, headers=headers, content=body)
            answer = response.json() if response.status_code == 200 else None
            if not ok(answer):
                raise RuntimeError(
                    f"{what} preflight failed for variant {index + 1} of {len(requests)}: "
                    f"HTTP {response.status_code} {response.text}"
                )


def _exchange_ok(answer: Any) -> bool:
    return isinstance(answer, dict) and bool(answer.get("access_token"))


def _bao_login_ok(answer: Any) -> bool:
    auth = answer.get("auth") if isinstance(answer, dict) else None
    return bool(auth and auth.get("client_token") and auth.get("token_type") == "batch")


def keepalive_probe_ms(port: int, requests: int = 9) -> float:
    """Median latency of sequential ``GET /healthz`` on one keep-alive connection (a plain
    blocking socket, default options, like most HTTP clients)."""
    request = build_request("GET", LOOPBACK, port, "/healthz")
    timings = []
    with socket.create_connection((LOOPBACK, port), timeout=5.0) as sock:
        for _ in range(requests):
            start = time.perf_counter()
            sock.sendall(request)
            data = b""
            while b"\r\n\r\n" not in data or not data.endswith(b"}"):
                chunk = sock.recv(65536)
                if not chunk:
                    raise RuntimeError("the broker closed the keep-alive connection")
                data += chunk
            timings.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(timings[1:])


def warn_if_busy(print_: Callable[[str], None]) -> None:
    """Watch the machine for a second; warn when something else keeps a core busy."""
    busy_before = machine_busy_seconds()
    time.sleep(1.0)
    idle_load = machine_busy_seconds() - busy_before
    if idle_load > 0.25:
        print_(
            f"WARNING: before measuring, other processes kept {100 * idle_load:.0f}% of a core "
            "busy; the figures below will be low and noisy (see 'other CPU %')"
        )


def _measure(
    spec: LoadSpec,
    group: str,
    server_pid: int,
    options: Options,
    on_edge: Callable[[str], None] | None = None,
    rate: float | None = None,
) -> Row:
    """Drive `spec` (closed loop, or with `rate` open loop at that many requests/s) and sample
    the server's CPU at the measured window's edges (`on_edge`, if given, is called there too,
    after the samples)."""
    samples: dict[str, dict[int, float]] = {}
    machine: dict[str, float] = {}
    pids: list[int] = []

    def on_window(edge: str) -> None:
        if edge == "start":
            pids.extend(process_tree(server_pid))
        samples[edge] = cpu_seconds_by_pid(pids)
        machine[edge] = machine_busy_seconds()
        if on_edge is not None:
            on_edge(edge)

    result = run_load(
        spec,
        concurrency=options.concurrency,
        processes=options.processes,
        warmup=options.warmup,
        seconds=options.seconds,
        on_window=on_window,
        rate=rate,
    )
    start, end = samples.get("start", {}), samples.get("end", {})
    per_process = sorted((end[pid] - start[pid] for pid in end if pid in start), reverse=True)
    return Row(
        spec.label,
        group,
        result,
        sum(per_process),
        machine.get("end", 0.0) - machine.get("start", 0.0),
        [used for used in per_process if used >= 0.01 * options.seconds],
    )


def _uvicorn_stack() -> str:
    http = "httptools" if importlib.util.find_spec("httptools") else "h11 (pure Python)"
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    return f"uvicorn with {http} and {loop}"


def machine_line(servers: str) -> str:
    """A section header's machine line: cores, Python, the uvicorn stack, then `servers`."""
    return (
        f"machine: {cpu_count()} cores, Python {platform.python_version()} "
        f"({_interpreter()}), {_uvicorn_stack()}, {servers}"
    )


def _interpreter() -> str:
    """The interpreter the servers run on (the venv's base), which matters: an optimised build
    (profile-guided and link-time, as python:3.11-slim's and Debian's) runs the broker 7-18 %
    faster than pyenv's default build (see `make bench`)."""
    return str(Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}")


def bao_version(bao: OpenBao) -> str:
    """OpenBao's version without its build details."""
    return bao.version.split(" (")[0] if bao.version else "OpenBao"


def _count_decision_records(log: Path) -> int:
    try:
        with log.open("rb") as handle:
            return sum(1 for line in handle if b'"event":"token.exchange"' in line)
    except OSError:
        return 0


def _broker_targets(
    broker: Broker, group: str, tokens: Sequence[str]
) -> list[tuple[LoadSpec, str]]:
    """``GET /healthz`` and the exchange, one request per person token (each preflighted)."""
    variants = [exchange_request(broker.client_id, broker.client_secret, t) for t in tokens]
    _preflight_all("token exchange", f"{broker.url}/oauth2/token", variants, _exchange_ok)
    path = "/oauth2/token"
    requests = tuple(
        build_request("POST", LOOPBACK, broker.port, path, headers=headers, body=body)
        for headers, body in variants
    )
    healthz = build_request("GET", LOOPBACK, broker.port, "/healthz")
    return [
        (LoadSpec.one(f"{group}: GET /healthz", LOOPBACK, broker.port, healthz), group),
        (LoadSpec(f"{group}: token exchange", LOOPBACK, broker.port, requests), group),
    ]


def _bao_target(bao: OpenBao, label: str, tokens: Sequence[str]) -> tuple[LoadSpec, str]:
    """OpenBao's JWT login, one request per person token (each preflighted)."""
    variants = [_bao_request(bao, token) for token in tokens]
    _preflight_all("OpenBao login", f"{bao.url}/v1/auth/jwt/login", variants, _bao_login_ok)
    path = "/v1/auth/jwt/login"
    requests = tuple(
        build_request("POST", LOOPBACK, bao.port, path, headers=headers, body=body)
        for headers, body in variants
    )
    return LoadSpec(label, LOOPBACK, bao.port, requests), label


def run(options: Options, print_: Callable[[str], None] = print) -> list[Row]:
    """Start everything, measure every target, print the tables, stop everything."""
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = work_directory(stack, keep=options.keep, name="exchange")
        print_("starting the development issuer, the broker and OpenBao ...")
        issuer = stack.enter_context(dev_issuer())
        tokens = person_tokens(issuer)
        servers: dict[str, int] = {}
        logs: dict[str, Path] = {}

        extra, audit = production_shape(stack, workdir) if options.production else ({}, None)
        broker = stack.enter_context(
            broker_server(issuer, workdir, workers=options.workers, extra_config=extra)
        )
        targets = _broker_targets(broker, SERVE, tokens)
        servers[SERVE], logs[SERVE] = broker.pid, audit or broker.log
        probe_ms = keepalive_probe_ms(broker.port)

        bao = stack.enter_context(openbao_server(issuer, workdir))
        targets.append(_bao_target(bao, BAO_LOGIN, tokens))
        servers[BAO_LOGIN] = bao.pid
        if options.bao_audit:
            audited = stack.enter_context(openbao_server(issuer, workdir, audit=True))
            targets.append(_bao_target(audited, BAO_LOGIN_AUDIT, tokens))
            servers[BAO_LOGIN_AUDIT] = audited.pid

        print_(_header(options, bao, probe_ms))
        warn_if_busy(print_)
        records_before = {group: _count_decision_records(log) for group, log in logs.items()}
        for round_no in range(1, options.rounds + 1):
            for spec, group in targets:
                label = spec.label if options.rounds == 1 else f"{spec.label} #{round_no}"
                print_(f"  measuring {label} ...")
                row = _measure(spec, group, servers[group], options)
                row.label = label
                rows.append(row)
        records = {
            group: _count_decision_records(log) - records_before[group]
            for group, log in logs.items()
        }
        open_rows: list[Row] = []
        if options.open_loop:
            open_loop_targets = [
                OpenLoopTarget(spec.label, group, servers[group], lambda spec=spec: spec)
                for spec, group in targets
                if spec.label in {f"{SERVE}: token exchange", BAO_LOGIN, BAO_LOGIN_AUDIT}
            ]
            open_rows = measure_open_loop(open_loop_targets, rows, options, print_)
        print_("")
        print_(_results_table(rows, options))
        print_("")
        if open_rows:
            print_(open_loop_table(open_rows, options))
            print_("")
        print_(_comparison(rows, [SERVE], open_rows, production=options.production))
        print_("")
        print_(_notes(rows, records, options, workdir if options.keep else None))
        if probe_ms > STALL_MS:
            print_("")
            print_(_stall_warning(probe_ms))
    return rows


def _header(options: Options, bao: OpenBao, probe_ms: float) -> str:
    cores = cpu_count()
    lines = [
        "",
        "== Token exchange: throughput and latency beside same-run baselines ==",
        machine_line(bao_version(bao)),
        f"broker: {options.workers} uvicorn workers, ES256 signing key, the example policies; "
        f"subject tokens: {PEOPLE} distinct person tokens cycled (development-issuer RS256 ID "
        f"tokens, sub {PERSON_PREFIX}000..{PEOPLE - 1:03d}, each with {PERSON}'s group support; "
        f"every one preflighted), "
        f'scope "{SCOPE}", audience {AUDIENCE}, client triage-agent (HTTP Basic)',
        "OpenBao: `bao server -dev` (in memory), JWT auth with jwks_url (the same development "
        "issuer's JWKS), role_type jwt, token_type batch, bound_audiences, user_claim sub, "
        f"groups_claim groups; login with the same {PEOPLE} ID tokens, cycled",
        f"load: closed loop, {options.concurrency} keep-alive connections spread over "
        f"{options.processes} generator processes (asyncio protocols writing pre-built HTTP/1.1 "
        f"requests, each connection cycling the {PEOPLE} requests from its own offset), "
        f"{options.warmup:g} s warm-up + {options.seconds:g} s measured per target; "
        f"the generator shares the {cores} cores with the server under test (CPU shown below)",
    ]
    if options.open_loop:
        lines.append(open_loop_line(options))
    lines.append(
        f"keep-alive probe, {SERVE}: sequential GET /healthz on one connection takes "
        f"{probe_ms:.1f} ms (median; a stall shows above {STALL_MS:g} ms)"
    )
    if probe_ms > STALL_MS:
        lines.append(_stall_warning(probe_ms))
    return "\n".join(lines)


def _stall_warning(probe_ms: float) -> str:
    return (
        f"WARNING: TCP_NODELAY REGRESSION IS BACK: a keep-alive GET /healthz on `{SERVE}` takes "
        f"{probe_ms:.1f} ms (> {STALL_MS:g} ms): responses wait ~40 ms for the client's delayed "
        "ACK (uvicorn #3149: accepted connections without TCP_NODELAY; see _listening_socket in "
        "broker/cli/serve.py). The broker's figures in this run are not its real ones."
    )


def _results_table(rows: list[Row], options: Options) -> str:
    headers = [
        "target",
        "req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "ok",
        "errors",
        "srv CPU ms/req",
        "srv CPU %",
        "by process",
        "gen CPU %",
        "other CPU %",
    ]
    body = []
    for row in rows:
        r = row.result
        body.append(
            [
                row.label,
                r.rps,
                r.percentile_ms(50),
                r.percentile_ms(90),
                r.percentile_ms(99),
                r.max_ms,
                r.ok,
                r.errors,
                1000.0 * row.server_cpu_seconds / r.ok if r.ok else float("nan"),
                100.0 * row.server_cpu_seconds / options.seconds,
                "+".join(f"{100 * used / options.seconds:.0f}" for used in row.process_cpu_seconds)
                or "-",
                100.0 * r.generator_cpu_seconds / options.seconds,
                100.0
                * max(
                    0.0,
                    row.machine_cpu_seconds - row.server_cpu_seconds - r.generator_cpu_seconds,
                )
                / options.seconds,
            ]
        )
    return f"Results at {options.concurrency} concurrent clients:\n" + table(headers, body)


def _median_row(rows: list[Row], label: str) -> Row | None:
    matching = [r for r in rows if r.label == label or r.label.startswith(label + " #")]
    if not matching:
        return None
    return sorted(matching, key=lambda r: r.result.rps)[len(matching) // 2]


def round_by_round(rows: Sequence[Row], label: str, baseline: str) -> list[list[object]]:
    """A row of `label`'s req/s over `baseline`'s in each round (rounds alternate, so each
    pair ran minutes apart on the same machine): how much of a median ratio is the machine's
    drift. No row with fewer than two rounds."""
    rates = {r.label: r.result.rps for r in rows}
    ratios = []
    for round_no in range(1, len(rows) + 1):
        ours, theirs = rates.get(f"{label} #{round_no}"), rates.get(f"{baseline} #{round_no}")
        if ours is None or theirs is None:
            break
        ratios.append(f"{ours / theirs:.2f}x" if theirs else "-")
    if len(ratios) < 2:
        return []
    return [[f"{label} vs {baseline}, round by round", ", ".join(ratios), "", "", ""]]


def _cpu_ms(row: Row) -> float:
    return 1000.0 * row.server_cpu_seconds / row.result.ok if row.result.ok else float("nan")


# -- open loop at half the measured maximum ------------------------------------------------------


@dataclass(frozen=True)
class OpenLoopTarget:
    """A target to measure open loop after the closed loop rounds: `label` names its closed
    loop row (the rate is half that row's median req/s); `spec` builds its requests."""

    label: str
    group: str
    pid: int
    spec: Callable[[], LoadSpec]


def measure_open_loop(
    targets: Sequence[OpenLoopTarget],
    rows: Sequence[Row],
    options: Options,
    print_: Callable[[str], None] = print,
) -> list[Row]:
    """Each target open loop at half its own measured closed loop maximum (its median row's
    req/s); targets without a closed loop figure are left out."""
    measured: list[Row] = []
    for target in targets:
        closed = _median_row(list(rows), target.label)
        if closed is None or closed.result.rps <= 0:
            print_(f"  {target.label}: no closed loop rate, left out of the open loop table")
            continue
        rate = closed.result.rps / 2.0
        print_(f"  measuring {target.label} open loop at {rate:,.0f} req/s ...")
        row = _measure(target.spec(), target.group, target.pid, options, rate=rate)
        row.label = target.label
        measured.append(row)
    return measured


def open_loop_line(options: Options) -> str:
    """A section header's line on how the open loop figures are measured."""
    return (
        "open loop, after the closed loop rounds: each main target again at half its own "
        "measured maximum (its closed loop req/s), requests due at fixed intervals spread over "
        f"the {options.processes} generator processes, the same {options.concurrency} "
        "connections as the pool (a due request finding none free queues in the generator), "
        "latency from the due time (no coordinated omission); "
        f"{options.warmup:g} s warm-up + {options.seconds:g} s, answers to the window's requests "
        f"awaited up to {OPEN_LOOP_DRAIN_SECONDS:g} s after it"
    )


def open_loop_table(open_rows: Sequence[Row], options: Options) -> str:
    """The table "Open loop at half the measured maximum"."""
    headers = [
        "target",
        "offered req/s",
        "achieved req/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "max ms",
        "ok",
        "errors",
    ]
    body = [
        [
            row.label,
            row.result.offered_rps or float("nan"),
            row.result.rps,
            row.result.percentile_ms(50),
            row.result.percentile_ms(90),
            row.result.percentile_ms(99),
            row.result.max_ms,
            row.result.ok,
            row.result.errors,
        ]
        for row in open_rows
    ]
    return (
        f"Open loop at half the measured maximum ({options.concurrency} connections as the "
        "pool, latency from each request's due time):\n" + table(headers, body)
    )


def open_loop_rows(
    open_rows: Sequence[Row],
    main: tuple[str, str],
    baselines: Sequence[tuple[str, str]],
    max_p99_ms: float,
) -> list[list[object]]:
    """Comparison rows for the open loop figures: the `main` target's (label, short name) p50
    and p99 against `max_p99_ms`, then each baseline's beside it (ratio: main p99 / its p99)."""
    by_label = {row.label: row.result for row in open_rows}
    measured = by_label.get(main[0])
    if measured is None:
        return []
    p99 = measured.percentile_ms(99)
    errors = f", {measured.errors:,} errors" if measured.errors else ""
    body: list[list[object]] = [
        [
            f"{main[1]} p50 / p99 open loop at half its max ({measured.offered_rps or 0:,.0f}/s)",
            f"{measured.percentile_ms(50):.1f} / {p99:.1f} ms{errors}",
            "",
            f"< {max_p99_ms:g} ms",
            "met" if p99 < max_p99_ms and not measured.errors else "NOT met",
        ]
    ]
    for label, short in baselines:
        baseline = by_label.get(label)
        if baseline is None:
            continue
        base_p99 = baseline.percentile_ms(99)
        body.append(
            [
                f"  {short} p50 / p99 open loop at half its max "
                f"({baseline.offered_rps or 0:,.0f}/s)",
                f"{baseline.percentile_ms(50):.1f} / {base_p99:.1f} ms",
                f"{p99 / base_p99:.2f}x" if base_p99 > 0 else "-",
                "",
                "",
            ]
        )
    return body


COMPARISON_HEADERS = ["comparison", "measured", "ratio", "target", "verdict"]
"""The columns of a section's table against the issue's targets."""


def target_rows(
    throughput: tuple[str, str],
    ratio: float,
    min_ratio: float,
    latency: tuple[str, str],
    p99: float,
    max_p99_ms: float,
) -> list[list[object]]:
    """The two target rows of a comparison table, each (label, measured): a throughput `ratio`
    of at least `min_ratio`, a `p99` under `max_p99_ms`."""
    return [
        [
            *throughput,
            f"{ratio:.2f}x",
            f">= {min_ratio:.2f}x",
            "met" if ratio >= min_ratio else "NOT met",
        ],
        [*latency, "", f"< {max_p99_ms:g} ms", "met" if p99 < max_p99_ms else "NOT met"],
    ]


def _comparison(
    rows: list[Row], groups: list[str], open_rows: Sequence[Row] = (), *, production: bool = False
) -> str:
    """Against the targets: in the production shape the audited login (the broker keeps a
    durable trail too) and p99 at most `PRODUCTION_TARGET_P99_MS`; else the plain login and
    `TARGET_P99_MS`."""
    baseline = BAO_LOGIN_AUDIT if production else BAO_LOGIN
    max_p99 = PRODUCTION_TARGET_P99_MS if production else TARGET_P99_MS
    bao = _median_row(rows, baseline)
    if bao is None:
        return ""
    body: list[list[object]] = []
    for group in groups:
        exchange = _median_row(rows, f"{group}: token exchange")
        healthz = _median_row(rows, f"{group}: GET /healthz")
        if exchange is None or healthz is None:
            continue
        ex, hz, bl = exchange.result, healthz.result, bao.result
        ratio = ex.rps / bl.rps if bl.rps else float("nan")
        p99 = ex.percentile_ms(99)
        body += target_rows(
            (f"{group}: exchanges/s vs {baseline} req/s", f"{ex.rps:,.0f} vs {bl.rps:,.0f}"),
            ratio,
            1.0,
            (f"{group}: exchange p99", f"{p99:.1f} ms"),
            p99,
            max_p99,
        )
        body += round_by_round(rows, f"{group}: token exchange", baseline)
        body += [
            [
                f"{group}: exchanges/s vs its /healthz req/s",
                f"{ex.rps:,.0f} vs {hz.rps:,.0f}",
                f"{ex.rps / hz.rps:.2f}x" if hz.rps else "-",
                "",
                "",
            ],
            [
                f"{group}: server CPU per exchange vs login",
                f"{_cpu_ms(exchange):.2f} vs {_cpu_ms(bao):.2f} ms",
                f"{_cpu_ms(exchange) / _cpu_ms(bao):.1f}x" if bao.result.ok else "-",
                "",
                "",
            ],
        ]
        body += open_loop_rows(
            open_rows,
            (f"{group}: token exchange", "exchange"),
            [(BAO_LOGIN_AUDIT, "OpenBao login + audit"), (BAO_LOGIN, "OpenBao login")],
            max_p99,
        )
    return (
        f"Against the issue's target (at least the {baseline} req/s, p99 under {max_p99:g} ms; "
        "open loop: p50/p99 at half the measured maximum rate, without saturation):\n"
        + table(COMPARISON_HEADERS, body)
    )


def _notes(rows: list[Row], records: dict[str, int], options: Options, kept: Path | None) -> str:
    notes = [
        "Notes:",
        "- req/s counts 2xx responses completed inside the measured window; errors = non-2xx "
        "responses + dropped connections in the window; latency is per request, write to last "
        "byte.",
        "- srv CPU = user+system CPU of the server's whole process tree during the window "
        "(100% = one core), 'by process' split over its busy processes (uvicorn workers "
        "share one listening socket, so the 64 connections may not split evenly); gen CPU = "
        "the load generator's; other CPU = everything else on "
        "the machine (kernel softirq work for loopback traffic included). A large 'other' means "
        "something else was running: the figures are then not comparable.",
    ]
    for group, count in records.items():
        exchanges = sum(r.result.ok for r in rows if r.label.startswith(f"{group}: token exch"))
        notes.append(
            f"- {group}: {count:,} decision records (token.exchange) written to its log during "
            f"the run, for {exchanges:,} exchanges in the measured windows (warm-up adds more)"
        )
    notes.append(
        f"- the exchange and the OpenBao logins cycle {PEOPLE} requests, one per person token; "
        "each connection starts at its own offset, so different people's tokens are in flight."
    )
    if options.open_loop:
        notes.append(
            "- open loop: offered = the rate requests were due at (half the target's closed loop "
            "req/s); achieved = 2xx answers to the requests due in the window over the time from "
            "the window's start to the last of them; errors include requests never answered. "
            "Latency runs from the due time, so waiting for a free connection counts."
        )
    if options.bao_audit:
        notes.append(
            "- 'OpenBao JWT login + audit' adds a declared file audit device (a JSON line per "
            "request and per response); the plain OpenBao row writes no audit trail."
        )
    if kept is not None:
        notes.append(f"- configurations and logs kept in {kept}")
    return "\n".join(notes)

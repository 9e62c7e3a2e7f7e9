"""Token exchanges per second and latency at N concurrent clients, beside same-run baselines:

* ``GET /healthz`` on the same broker server: what HTTP + uvicorn + FastAPI alone cost;
* OpenBao's JWT auth login (batch tokens) given the same person's ID token: what an established
  secrets broker charges to verify the same JWT and hand back a token (with and without a file
  audit device, since the broker is meant to write a decision record per exchange).

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

import httpx

from bench._loadgen import LoadResult, LoadSpec, build_request, cpu_count, run_load
from bench._report import table
from bench._servers import (
    LOOPBACK,
    Broker,
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
SCOPE = "tickets:read kb:read"
AUDIENCE = "https://tickets.internal.example"
TARGET_P99_MS = 25.0
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


def _bao_request(bao: OpenBao, person_token: str) -> tuple[dict[str, str], bytes]:
    body = json.dumps({"role": bao.role, "jwt": person_token}).encode()
    return {"Content-Type": "application/json"}, body


def _preflight_exchange(broker: Broker, headers: dict[str, str], body: bytes) -> None:
    response = httpx.post(f"{broker.url}/oauth2/token", headers=headers, content=body, timeout=30)
    if response.status_code != 200 or "access_token" not in response.json():
        raise RuntimeError(
            f"token exchange preflight failed: HTTP {response.status_code} {response.text}"
        )


def _preflight_bao(bao: OpenBao, headers: dict[str, str], body: bytes) -> None:
    response = httpx.post(f"{bao.url}/v1/auth/jwt/login", headers=headers, content=body, timeout=30)
    auth = response.json().get("auth") if response.status_code == 200 else None
    if not auth or not auth.get("client_token") or auth.get("token_type") != "batch":
        raise RuntimeError(
            f"OpenBao login preflight failed: HTTP {response.status_code} {response.text}"
        )


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
) -> Row:
    """Drive `spec` and sample the server's CPU at the measured window's edges (`on_edge`, if
    given, is called there too, after the samples)."""
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
        f"machine: {cpu_count()} cores, Python {platform.python_version()}, {_uvicorn_stack()}, "
        f"{servers}"
    )


def bao_version(bao: OpenBao) -> str:
    """OpenBao's version without its build details."""
    return bao.version.split(" (")[0] if bao.version else "OpenBao"


def _count_decision_records(log: Path) -> int:
    try:
        with log.open("rb") as handle:
            return sum(1 for line in handle if b'"event":"token.exchange"' in line)
    except OSError:
        return 0


def _broker_targets(broker: Broker, group: str, person_token: str) -> list[tuple[LoadSpec, str]]:
    headers, body = exchange_request(broker.client_id, broker.client_secret, person_token)
    _preflight_exchange(broker, headers, body)
    return [
        (
            LoadSpec.one(
                f"{group}: GET /healthz",
                LOOPBACK,
                broker.port,
                build_request("GET", LOOPBACK, broker.port, "/healthz"),
            ),
            group,
        ),
        (
            LoadSpec.one(
                f"{group}: token exchange",
                LOOPBACK,
                broker.port,
                build_request(
                    "POST", LOOPBACK, broker.port, "/oauth2/token", headers=headers, body=body
                ),
            ),
            group,
        ),
    ]


def _bao_target(bao: OpenBao, label: str, person_token: str) -> tuple[LoadSpec, str]:
    headers, body = _bao_request(bao, person_token)
    _preflight_bao(bao, headers, body)
    request = build_request(
        "POST", LOOPBACK, bao.port, "/v1/auth/jwt/login", headers=headers, body=body
    )
    return LoadSpec.one(label, LOOPBACK, bao.port, request), label


def run(options: Options, print_: Callable[[str], None] = print) -> list[Row]:
    """Start everything, measure every target, print the tables, stop everything."""
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = work_directory(stack, keep=options.keep, name="exchange")
        print_("starting the development issuer, the broker and OpenBao ...")
        issuer = stack.enter_context(dev_issuer())
        person_token = issuer.provider.mint(PERSON, token_type="id_token", lifetime=24 * 3600)
        servers: dict[str, int] = {}
        logs: dict[str, Path] = {}

        extra, audit = production_shape(stack, workdir) if options.production else ({}, None)
        broker = stack.enter_context(
            broker_server(issuer, workdir, workers=options.workers, extra_config=extra)
        )
        targets = _broker_targets(broker, SERVE, person_token)
        servers[SERVE], logs[SERVE] = broker.pid, audit or broker.log
        probe_ms = keepalive_probe_ms(broker.port)

        bao = stack.enter_context(openbao_server(issuer, workdir))
        targets.append(_bao_target(bao, "OpenBao JWT login", person_token))
        servers["OpenBao JWT login"] = bao.pid
        if options.bao_audit:
            audited = stack.enter_context(openbao_server(issuer, workdir, audit=True))
            targets.append(_bao_target(audited, "OpenBao JWT login + audit", person_token))
            servers["OpenBao JWT login + audit"] = audited.pid

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
        print_("")
        print_(_results_table(rows, options))
        print_("")
        print_(_comparison(rows, [SERVE]))
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
        f"subject token: a development-issuer RS256 ID token for {PERSON} (group support), "
        f'scope "{SCOPE}", audience {AUDIENCE}, client triage-agent (HTTP Basic)',
        "OpenBao: `bao server -dev` (in memory), JWT auth with jwks_url (the same development "
        "issuer's JWKS), role_type jwt, token_type batch, bound_audiences, user_claim sub, "
        "groups_claim groups; login with the same ID token",
        f"load: closed loop, {options.concurrency} keep-alive connections spread over "
        f"{options.processes} generator processes (asyncio protocols writing pre-built HTTP/1.1 "
        f"requests), {options.warmup:g} s warm-up + {options.seconds:g} s measured per target; "
        f"the generator shares the {cores} cores with the server under test (CPU shown below)",
    ]
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


def _cpu_ms(row: Row) -> float:
    return 1000.0 * row.server_cpu_seconds / row.result.ok if row.result.ok else float("nan")


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


def _comparison(rows: list[Row], groups: list[str]) -> str:
    bao = _median_row(rows, "OpenBao JWT login")
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
            (f"{group}: exchanges/s vs OpenBao logins/s", f"{ex.rps:,.0f} vs {bl.rps:,.0f}"),
            ratio,
            1.0,
            (f"{group}: exchange p99", f"{p99:.1f} ms"),
            p99,
            TARGET_P99_MS,
        )
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
    return "Against the issue's target (at least OpenBao's logins/s, p99 under 25 ms):\n" + table(
        COMPARISON_HEADERS, body
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
    if options.bao_audit:
        notes.append(
            "- 'OpenBao JWT login + audit' adds a declared file audit device (a JSON line per "
            "request and per response); the plain OpenBao row writes no audit trail."
        )
    if kept is not None:
        notes.append(f"- configurations and logs kept in {kept}")
    return "\n".join(notes)

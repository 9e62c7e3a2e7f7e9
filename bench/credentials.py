"""Credential fetches per second and latency at N concurrent clients, beside same-run baselines:

* ``GET /healthz`` on the same broker server: what HTTP + uvicorn + Starlette alone cost;
* a direct KV v2 read of the same secret from OpenBao (``GET /v1/secret/data/llm/openai`` with a
  token whose policy allows just that secret), with and without a file audit device: what a
  gateway would pay reading the store itself.

The broker runs as ``broker serve`` as shipped, with a ``vault`` secret backend pointing at an
OpenBao dev server that has a file audit device: after the load, the audit trail tells how many
data reads and version checks (KV metadata reads) the broker's cache made per 100,000 fetches.
Every fetch is a cache hit after each worker's first load: the bench checks that too.

After the closed loop rounds, the fetch and the KV reads are measured again open loop at half
their own measured maximum rate: tail latency without saturation.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import yaml

from bench._loadgen import LoadSpec, build_request, cpu_count
from bench._report import table
from bench._servers import (
    LOOPBACK,
    REPO,
    Broker,
    Issuer,
    OpenBao,
    broker_server,
    dev_issuer,
    openbao_server,
    production_shape,
    wait_until_idle,
    work_directory,
)
from bench.exchange import (
    COMPARISON_HEADERS,
    PERSON,
    STALL_MS,
    OpenLoopTarget,
    Options,
    Row,
    _cpu_ms,
    _measure,
    _median_row,
    _results_table,
    _stall_warning,
    bao_version,
    exchange_request,
    keepalive_probe_ms,
    machine_line,
    measure_open_loop,
    open_loop_line,
    open_loop_rows,
    open_loop_table,
    round_by_round,
    target_rows,
    warn_if_busy,
)
from broker.credentials import cache_policy
from broker.policy.model import Credential

CREDENTIAL = "openai-api-key"
GATEWAY = "llm-gateway"
AGENT_SCOPE = "llm:openai:chat"
AGENT_AUDIENCE = "llm-gateway"
BACKEND = "vault"
KV_MOUNT = "secret"
TARGET_RATIO = 2.0
TARGET_P99_MS = 20.0
PRODUCTION_TARGET_RATIO = 2.5
PRODUCTION_TARGET_P99_MS = 25.0
"""Issue 13's fetch targets in the production shape: against the audited scoped read."""
BROKER_TOKEN_NAME = "bench-broker"
"""Display name of the broker's OpenBao token: its audit entries read ``token-bench-broker``."""
DIRECT_TOKEN_NAME = "bench-direct"
VAULT_TOKEN_ENV = "BENCH_VAULT_TOKEN"
GATEWAY_SECRET_ENV = "LLM_GATEWAY_SECRET"

SERVE = "broker serve"
FETCH = f"{SERVE}: credential fetch"
FETCH_BUDGET = f"{SERVE}: credential fetch, deny budget"
BUDGET_PERSON = "bob"
"""The person of the fetches a deny budget governs (alice's fetches meet only alert budgets)."""
BENCH_BUDGET = {
    "budgets": {
        "bench-deny": {
            "description": "Never reached: every fetch reserves, and the ledger is measured",
            "scope": {"person": f"dev/{BUDGET_PERSON}"},
            "period": "month",
            "amount": "1000000000",
            "currency": "USD",
            "action": "deny",
            "reserve_per_call": "0.000001",
        }
    }
}
HEALTHZ = f"{SERVE}: GET /healthz"
BAO_READ = "OpenBao KV read"
BAO_READ_AUDIT = "OpenBao KV read + audit"


def _credential() -> Credential:
    """The example policy's declaration of `CREDENTIAL` (path, field, refresh interval)."""
    document = yaml.safe_load((REPO / "policies" / "credentials.yaml").read_text())
    return Credential.model_validate(document["credentials"][CREDENTIAL])


def _reader_policy(path: str) -> str:
    """An OpenBao ACL policy reading one KV v2 secret: data and metadata (the version check)."""
    return (
        f'path "{KV_MOUNT}/data/{path}" {{ capabilities = ["read"] }}\n'
        f'path "{KV_MOUNT}/metadata/{path}" {{ capabilities = ["read"] }}\n'
    )


def _seed(bao: OpenBao, path: str, data: dict[str, str]) -> dict[str, str]:
    """Write the secret, a reader policy and two tokens holding it (service tokens, 24 h): one
    for the broker, one for direct reads. Returns {display name: token}."""
    bao.api("POST", f"/v1/{KV_MOUNT}/data/{path}", {"data": data})
    bao.api("PUT", "/v1/sys/policies/acl/bench-reader", {"policy": _reader_policy(path)})
    tokens = {}
    for name in (BROKER_TOKEN_NAME, DIRECT_TOKEN_NAME):
        answer = bao.api(
            "POST",
            "/v1/auth/token/create",
            {"policies": ["bench-reader"], "display_name": name, "ttl": "24h"},
        )
        tokens[name] = answer["auth"]["client_token"]
    return tokens


def _agent_token(broker: Broker, person_token: str) -> str:
    """One exchange: triage-agent for the person, scope `AGENT_SCOPE`, audience the gateway."""
    headers, body = exchange_request(
        broker.client_id,
        broker.client_secret,
        person_token,
        scope=AGENT_SCOPE,
        audience=AGENT_AUDIENCE,
    )
    response = httpx.post(f"{broker.url}/oauth2/token", headers=headers, content=body, timeout=30)
    token = response.json().get("access_token") if response.status_code == 200 else None
    if not token:
        raise RuntimeError(
            f"agent token exchange failed: HTTP {response.status_code} {response.text}"
        )
    return str(token)


def fetch_request(gateway_secret: str, agent_token: str) -> tuple[dict[str, str], bytes]:
    """Headers and form body of the benchmarked fetch (gateway HTTP Basic, the agent token)."""
    basic = base64.b64encode(f"{GATEWAY}:{gateway_secret}".encode()).decode()
    headers = {
        "Authorization": f"Basic {basic}",
        "Content-Type": "application/x-www-form-urlencoded",
    }
    return headers, urlencode({"token": agent_token}).encode()


def vault_backends(address: str) -> list[dict[str, Any]]:
    """The broker's ``secret_backends``: one ``vault`` backend at `address`, token auth with the
    token in ``$VAULT_TOKEN_ENV``."""
    return [
        {
            "name": BACKEND,
            "kind": "vault",
            "address": address,
            "mount": KV_MOUNT,
            "auth": {"method": "token", "token_ref": f"env:{VAULT_TOKEN_ENV}"},
        }
    ]


def _preflight_fetch(
    broker: Broker, headers: dict[str, str], body: bytes, expected: str
) -> dict[str, Any]:
    response = httpx.post(
        f"{broker.url}/v1/credentials/{CREDENTIAL}", headers=headers, content=body, timeout=30
    )
    answer = response.json() if response.status_code == 200 else {}
    if answer.get("value") != expected:
        raise RuntimeError(
            f"credential fetch preflight failed: HTTP {response.status_code} "
            f"{response.text if response.status_code != 200 else '(200 but not the seeded value)'}"
        )
    return dict(answer)


def _preflight_read(bao: OpenBao, path: str, token: str, field_name: str, expected: str) -> None:
    response = httpx.get(
        f"{bao.url}/v1/{KV_MOUNT}/data/{path}", headers={"X-Vault-Token": token}, timeout=30
    )
    data = response.json().get("data", {}).get("data", {}) if response.status_code == 200 else {}
    if data.get(field_name) != expected:
        raise RuntimeError(f"OpenBao read preflight failed: HTTP {response.status_code}")


def _count_fetch_records(log: Path) -> int:
    """Granted ``credential.fetch`` decision records in the broker's log."""
    try:
        with log.open("rb") as handle:
            return sum(
                1
                for line in handle
                if b'"event":"credential.fetch"' in line and b'"outcome":"granted"' in line
            )
    except OSError:
        return 0


@dataclass
class BackendCalls:
    """The broker token's requests in OpenBao's audit trail, in a period."""

    data_reads: int = 0
    version_checks: int = 0
    other: dict[str, int] = field(default_factory=dict)


def _audit_times(audit_log: Path, display_name: str) -> list[tuple[float, str]]:
    """(wall-clock time, API path) of every request the token named `display_name` made."""
    needle = f'"display_name":"token-{display_name}"'.encode()
    entries = []
    with audit_log.open("rb") as handle:
        for line in handle:
            if needle not in line or b'"type":"request"' not in line:
                continue
            entry = json.loads(line)
            stamp = datetime.fromisoformat(entry["time"]).timestamp()
            entries.append((stamp, str(entry["request"]["path"])))
    return entries


def _calls_between(
    entries: list[tuple[float, str]], path: str, start: float, end: float
) -> BackendCalls:
    calls = BackendCalls()
    for stamp, api_path in entries:
        if not start <= stamp < end:
            continue
        if api_path == f"{KV_MOUNT}/data/{path}":
            calls.data_reads += 1
        elif api_path == f"{KV_MOUNT}/metadata/{path}":
            calls.version_checks += 1
        else:
            calls.other[api_path] = calls.other.get(api_path, 0) + 1
    return calls


@dataclass
class _Target:
    label: str
    pid: int
    spec: Callable[[], LoadSpec]
    """Built right before each measurement (the fetch mints a fresh agent token)."""


@dataclass
class _Windows:
    """Wall-clock edges of the fetch target's measured windows."""

    edges: list[tuple[float, float]] = field(default_factory=list)
    _start: float = 0.0

    def on_edge(self, edge: str) -> None:
        if edge == "start":
            self._start = time.time()
        else:
            self.edges.append((self._start, time.time()))


def run(options: Options, print_: Callable[[str], None] = print) -> list[Row]:
    """Start everything, measure every target, print the tables, stop everything."""
    credential = _credential()
    policy = cache_policy(credential)
    field_name = credential.field or "value"
    api_key = "sk-bench-" + secrets.token_urlsafe(32)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = work_directory(stack, keep=options.keep, name="credentials")
        print_("starting the development issuer, OpenBao (x2) and the broker ...")
        issuer: Issuer = stack.enter_context(dev_issuer())
        person_token = issuer.provider.mint(PERSON, token_type="id_token", lifetime=24 * 3600)

        (workdir / "bao-store").mkdir()
        store = stack.enter_context(openbao_server(None, workdir / "bao-store", audit=True))
        store_tokens = _seed(store, credential.path, {field_name: api_key})
        assert store.audit_log is not None
        (workdir / "bao-plain").mkdir()
        plain = stack.enter_context(openbao_server(None, workdir / "bao-plain"))
        plain_tokens = _seed(plain, credential.path, {field_name: api_key})

        gateway_secret = secrets.token_urlsafe(32)
        backends = vault_backends(store.url)
        policy_dir = workdir / "policies"
        shutil.copytree(REPO / "policies", policy_dir)
        (policy_dir / "zz-bench-budget.yaml").write_text(yaml.safe_dump(BENCH_BUDGET))
        budget_person_token = issuer.provider.mint(
            BUDGET_PERSON, token_type="id_token", lifetime=24 * 3600
        )
        production, audit = production_shape(stack, workdir) if options.production else ({}, None)
        broker_started = time.time()
        broker = stack.enter_context(
            broker_server(
                issuer,
                workdir,
                workers=options.workers,
                name="broker-credentials",
                extra_config={
                    "secret_backends": backends,
                    "policy_dir": str(policy_dir),
                    **production,
                },
                extra_env={
                    VAULT_TOKEN_ENV: store_tokens[BROKER_TOKEN_NAME],
                    GATEWAY_SECRET_ENV: gateway_secret,
                },
            )
        )
        wait_until_idle(broker.pid)  # every worker up before anything is measured
        first = _preflight_fetch(
            broker, *fetch_request(gateway_secret, _agent_token(broker, person_token)), api_key
        )
        probe_ms = keepalive_probe_ms(broker.port)

        def fetch_spec(label: str = FETCH, token_of: str = person_token) -> LoadSpec:
            headers, body = fetch_request(gateway_secret, _agent_token(broker, token_of))
            _preflight_fetch(broker, headers, body, api_key)
            path = f"/v1/credentials/{CREDENTIAL}"
            request = build_request("POST", LOOPBACK, broker.port, path, headers=headers, body=body)
            return LoadSpec.one(label, LOOPBACK, broker.port, request)

        def read_spec(label: str, bao: OpenBao, token: str) -> Callable[[], LoadSpec]:
            _preflight_read(bao, credential.path, token, field_name, api_key)
            request = build_request(
                "GET",
                LOOPBACK,
                bao.port,
                f"/v1/{KV_MOUNT}/data/{credential.path}",
                headers={"X-Vault-Token": token},
            )
            spec = LoadSpec.one(label, LOOPBACK, bao.port, request)
            return lambda: spec

        healthz = LoadSpec.one(
            HEALTHZ, LOOPBACK, broker.port, build_request("GET", LOOPBACK, broker.port, "/healthz")
        )
        targets = [
            _Target(HEALTHZ, broker.pid, lambda: healthz),
            _Target(FETCH, broker.pid, fetch_spec),
            _Target(
                FETCH_BUDGET,
                broker.pid,
                lambda: fetch_spec(FETCH_BUDGET, budget_person_token),
            ),
            _Target(
                BAO_READ, plain.pid, read_spec(BAO_READ, plain, plain_tokens[DIRECT_TOKEN_NAME])
            ),
        ]
        if options.bao_audit:
            direct = store_tokens[DIRECT_TOKEN_NAME]
            targets.append(
                _Target(BAO_READ_AUDIT, store.pid, read_spec(BAO_READ_AUDIT, store, direct))
            )

        print_(_header(options, store, probe_ms, credential, policy.jitter, first))
        warn_if_busy(print_)
        windows = _Windows()
        for round_no in range(1, options.rounds + 1):
            for target in targets:
                label = target.label if options.rounds == 1 else f"{target.label} #{round_no}"
                print_(f"  measuring {label} ...")
                on_edge = windows.on_edge if target.label == FETCH else None
                row = _measure(target.spec(), SERVE, target.pid, options, on_edge)
                row.label = label
                rows.append(row)
        measured_until = windows.edges[-1][1]
        fetched_total = _count_fetch_records(audit or broker.log)
        entries = _audit_times(store.audit_log, BROKER_TOKEN_NAME)
        open_rows: list[Row] = []
        if options.open_loop:
            open_loop_targets = [
                OpenLoopTarget(target.label, SERVE, target.pid, target.spec)
                for target in targets
                if target.label in {FETCH, BAO_READ, BAO_READ_AUDIT}
            ]
            open_rows = measure_open_loop(open_loop_targets, rows, options, print_)

        print_("")
        print_(_results_table(rows, options))
        print_("")
        if open_rows:
            print_(open_loop_table(open_rows, options))
            print_("")
        print_(_comparison(rows, open_rows, production=options.production))
        print_("")
        window_calls = [_calls_between(entries, credential.path, a, b) for a, b in windows.edges]
        whole = _calls_between(entries, credential.path, broker_started, measured_until)
        print_(
            _backend_table(
                rows,
                options,
                credential.refresh_interval_seconds,
                policy.jitter,
                window_calls,
                [b - a for a, b in windows.edges],
                whole,
                measured_until - broker_started,
                fetched_total,
            )
        )
        print_("")
        print_(_notes(options, whole, workdir if options.keep else None))
        if probe_ms > STALL_MS:
            print_("")
            print_(_stall_warning(probe_ms))
    return rows


def _header(
    options: Options,
    store: OpenBao,
    probe_ms: float,
    credential: Credential,
    jitter: float,
    first: dict[str, Any],
) -> str:
    cores = cpu_count()
    lines = [
        "",
        "== Credential fetch: throughput and latency beside same-run baselines ==",
        machine_line(bao_version(store)),
        f"broker: {options.workers} uvicorn workers (each with its own credential cache), the "
        f"example policies; POST /v1/credentials/{CREDENTIAL} as gateway {GATEWAY} (HTTP "
        f"Basic), form body token=<agent token> (ES256, from one exchange by triage-agent for "
        f'{PERSON}, scope "{AGENT_SCOPE}", audience {AGENT_AUDIENCE}); every fetch verifies the '
        "agent token, checks audience, scope and gateway, serves from the cache and writes a "
        "decision record",
        f"backend: kind vault -> OpenBao dev server with a file audit device, token auth (a "
        f"token whose policy reads only {KV_MOUNT}/data|metadata/{credential.path}); "
        f"refresh_interval_seconds {credential.refresh_interval_seconds:g} "
        f"(+/- {100 * jitter:.0f}% jitter); preflight: HTTP 200, version {first.get('version')}, "
        "the seeded value",
        f"baseline: GET /v1/{KV_MOUNT}/data/{credential.path} with X-Vault-Token (a token with "
        "the same policy) on OpenBao dev (in memory), without and with a file audit device",
        f"load: closed loop, {options.concurrency} keep-alive connections spread over "
        f"{options.processes} generator processes, {options.warmup:g} s warm-up + "
        f"{options.seconds:g} s measured per target; the generator shares the {cores} cores "
        "with the server under test (CPU shown below)",
        *([open_loop_line(options)] if options.open_loop else []),
        f"keep-alive probe, {SERVE}: sequential GET /healthz on one connection takes "
        f"{probe_ms:.1f} ms (median; a stall shows above {STALL_MS:g} ms)",
    ]
    if probe_ms > STALL_MS:
        lines.append(_stall_warning(probe_ms))
    return "\n".join(lines)


def _comparison(rows: list[Row], open_rows: Sequence[Row] = (), *, production: bool = False) -> str:
    """Against the targets: in the production shape the audited scoped read (the broker keeps
    a durable trail too), else the plain read."""
    baseline = BAO_READ_AUDIT if production else BAO_READ
    min_ratio = PRODUCTION_TARGET_RATIO if production else TARGET_RATIO
    max_p99 = PRODUCTION_TARGET_P99_MS if production else TARGET_P99_MS
    fetch = _median_row(rows, FETCH)
    bao = _median_row(rows, baseline)
    healthz = _median_row(rows, HEALTHZ)
    audited = _median_row(rows, BAO_READ_AUDIT)
    if fetch is None or bao is None:
        return ""
    fx, bl = fetch.result, bao.result
    ratio = fx.rps / bl.rps if bl.rps else float("nan")
    p99 = fx.percentile_ms(99)
    body = target_rows(
        (f"fetches/s vs {baseline} req/s", f"{fx.rps:,.0f} vs {bl.rps:,.0f}"),
        ratio,
        min_ratio,
        ("fetch p99", f"{p99:.1f} ms"),
        p99,
        max_p99,
    )
    body += round_by_round(rows, FETCH, baseline)
    body += [
        [
            "fetch p50 vs OpenBao KV read p50",
            f"{fx.percentile_ms(50):.1f} vs {bl.percentile_ms(50):.1f} ms",
            "",
            "",
            "",
        ],
    ]
    if audited is not None and audited.result.rps and not production:
        body.append(
            [
                "fetches/s vs OpenBao KV reads + audit/s",
                f"{fx.rps:,.0f} vs {audited.result.rps:,.0f}",
                f"{fx.rps / audited.result.rps:.2f}x",
                "",
                "",
            ]
        )
    budgeted = _median_row(rows, FETCH_BUDGET)
    if budgeted is not None and budgeted.result.rps:
        bx = budgeted.result
        body.append(
            [
                "fetches/s with a deny budget vs without",
                f"{bx.rps:,.0f} vs {fx.rps:,.0f} (p99 {bx.percentile_ms(99):.1f} vs {p99:.1f} ms)",
                f"{bx.rps / fx.rps:.2f}x",
                "",
                "",
            ]
        )
    if healthz is not None and healthz.result.rps:
        body.append(
            [
                "fetches/s vs its /healthz req/s",
                f"{fx.rps:,.0f} vs {healthz.result.rps:,.0f}",
                f"{fx.rps / healthz.result.rps:.2f}x",
                "",
                "",
            ]
        )
    body.append(
        [
            "server CPU per fetch vs per KV read",
            f"{_cpu_ms(fetch):.3f} vs {_cpu_ms(bao):.3f} ms",
            f"{_cpu_ms(fetch) / _cpu_ms(bao):.1f}x" if bl.ok else "-",
            "",
            "",
        ]
    )
    if healthz is not None and healthz.result.ok:
        body.append(
            [
                "server CPU per fetch vs per /healthz",
                f"{_cpu_ms(fetch):.3f} vs {_cpu_ms(healthz):.3f} ms",
                f"{_cpu_ms(fetch) / _cpu_ms(healthz):.1f}x",
                "",
                "",
            ]
        )
    body += open_loop_rows(
        open_rows,
        (FETCH, "fetch"),
        [(BAO_READ_AUDIT, "OpenBao KV read + audit"), (BAO_READ, "OpenBao KV read")],
        max_p99,
    )
    return (
        f"Against the issue's targets (at least {min_ratio:g}x the {baseline} req/s, p99 under "
        f"{max_p99:g} ms; open loop: p50/p99 at half the measured maximum rate, without "
        "saturation):\n" + table(COMPARISON_HEADERS, body)
    )


def _round_bound(workers: int, seconds: float, interval: float, jitter: float) -> int:
    """Most backend rounds (a version check, or a read) the workers' caches may make in a period
    of `seconds`: rounds of one cache start at least ``interval x (1 - jitter)`` apart."""
    return workers * (int(seconds // (interval * (1.0 - jitter))) + 1)


def _backend_table(
    rows: list[Row],
    options: Options,
    interval: float,
    jitter: float,
    windows: list[BackendCalls],
    window_seconds: list[float],
    whole: BackendCalls,
    whole_seconds: float,
    whole_fetches: int,
) -> str:
    fetch_rows = [r for r in rows if r.label == FETCH or r.label.startswith(FETCH + " #")]
    workers = options.workers

    def per_100k(count: int, fetches: int) -> str:
        return f"{1e5 * count / fetches:.3f}" if fetches else "-"

    body: list[list[object]] = []
    for index, (calls, seconds, row) in enumerate(
        zip(windows, window_seconds, fetch_rows, strict=False)
    ):
        bound = _round_bound(workers, seconds, interval, jitter)
        rounds = calls.data_reads + calls.version_checks
        name = "measured window" if len(windows) == 1 else f"measured window #{index + 1}"
        body.append(
            [
                name,
                f"{seconds:.1f}",
                f"{row.result.ok:,}",
                calls.data_reads,
                calls.version_checks,
                per_100k(calls.data_reads, row.result.ok),
                per_100k(calls.version_checks, row.result.ok),
                bound,
                "met" if rounds <= bound else "NOT met",
            ]
        )
    bound = _round_bound(workers, whole_seconds, interval, jitter)
    rounds = whole.data_reads + whole.version_checks
    body.append(
        [
            "broker start to end of last window",
            f"{whole_seconds:.1f}",
            f"{whole_fetches:,}",
            whole.data_reads,
            whole.version_checks,
            per_100k(whole.data_reads, whole_fetches),
            per_100k(whole.version_checks, whole_fetches),
            bound,
            "met" if rounds <= bound else "NOT met",
        ]
    )
    fetch = _median_row(rows, FETCH)
    rate = fetch.result.rps if fetch is not None else 0.0
    steady = 1e5 * workers / (interval * rate) if rate else float("nan")
    return (
        "Backend calls by the broker's cache (OpenBao audit trail, requests by the broker's "
        "token):\n"
        + table(
            [
                "period",
                "s",
                "fetches",
                "data reads",
                "version checks",
                "reads/100k",
                "checks/100k",
                "bound (calls)",
                "verdict",
            ],
            body,
        )
        + f"\nbound: one backend round (a version check, or a data read on the first load or "
        f"after a change) per refresh interval per worker: {workers} x "
        f"(floor(s / ({interval:g} s x {1 - jitter:g})) + 1); in steady state "
        f"{workers} per {interval:g} s, i.e. {steady:.2f} per 100,000 fetches at the measured "
        f"{rate:,.0f} fetches/s"
    )


def _notes(options: Options, whole: BackendCalls, kept: Path | None) -> str:
    notes = [
        "Notes:",
        "- req/s, latency, errors and CPU columns as in the token exchange table; the fetch "
        "requests all present the same agent token (one exchange per measured round).",
        "- 'fetches' in the backend table: 2xx responses in the measured window, and for the "
        "whole run the granted credential.fetch decision records in the broker's log (preflights "
        "and warm-up included).",
        "- data reads = requests to secret/data/<path>, version checks = secret/metadata/<path> "
        "(the cache's cheap 'has it changed?' call) made with the broker's token.",
    ]
    if whole.other:
        other = ", ".join(f"{path} x{count}" for path, count in sorted(whole.other.items()))
        notes.append(f"- other requests by the broker's token: {other} (token adoption)")
    if options.bao_audit:
        notes.append(
            f"- '{BAO_READ_AUDIT}' reads from the broker's own store (the one with the audit "
            f"device); '{BAO_READ}' from a second dev server without one."
        )
    if kept is not None:
        notes.append(f"- configurations and logs kept in {kept}")
    return "\n".join(notes)

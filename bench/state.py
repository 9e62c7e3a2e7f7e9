"""What the shared state store costs: the in-memory store beside the Redis one, in the same run.

Over HTTP (``broker serve``, 2 workers, the same load generator as the other sections), two
brokers side by side, identical but for ``state:`` (``kind: memory`` vs ``kind: redis`` on a
``redis-server`` this bench starts on a free loopback port):

* the credential fetch (a ``revocation_status`` round trip to the store whenever the token's
  "not revoked" answer, remembered for 0.5 s per token by `broker.revocation.Revocations`, is
  older than that);
* the plain token exchange (client_secret_basic, no rate limit): the person's and the agent's
  revocation check, one ``revocation_status`` round trip whenever the "nothing revoked" answer
  for that (person, agent), remembered for 0.5 s, is older than that;
* a re-exchange by summariser-agent of a triage-agent token (the parent's, the person's and the
  agents' revocation check: one ``revocation_status`` round trip, remembered the same way).

In process (no sockets, no uvicorn: the bare ASGI driver of ``bench._inprocess``), the
fetch with the store's ``revocation_status`` replaced by a no-op stub (in this process only; the
broker's code is not changed), with the memory store and with the Redis store: the cost of the
check itself, per fetch.

The Redis server's ``INFO commandstats`` is read at each measured window's edges, so the tables
show how many Redis commands each request made (the memory broker's rows must show none).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx

from bench._inprocess import as_asgi, asgi_call, decision_records_to, environment
from bench._loadgen import LoadSpec, build_request
from bench._report import table
from bench._servers import (
    LOOPBACK,
    Broker,
    Issuer,
    RedisProcess,
    broker_config,
    broker_server,
    cpu_seconds_by_pid,
    dev_issuer,
    openbao_server,
    redis_server,
    wait_until_idle,
    work_directory,
)
from bench.credentials import (
    BROKER_TOKEN_NAME,
    CREDENTIAL,
    GATEWAY_SECRET_ENV,
    TARGET_P99_MS,
    VAULT_TOKEN_ENV,
    _agent_token,
    _credential,
    _preflight_fetch,
    _seed,
    fetch_request,
    vault_backends,
)
from bench.exchange import (
    AUDIENCE,
    COMPARISON_HEADERS,
    GRANT_TYPE,
    PERSON,
    STALL_MS,
    Options,
    Row,
    _cpu_ms,
    _measure,
    _median_row,
    _results_table,
    _stall_warning,
    exchange_request,
    keepalive_probe_ms,
    machine_line,
    target_rows,
    warn_if_busy,
)
from broker.state import RevocationStatus

TARGET_RATIO = 0.80
"""The issue's target: the Redis state store costs under 20% of fetch throughput."""
ACCESS_TOKEN_TYPE = "urn:ietf:params:oauth:token-type:access_token"
SUB_AGENT = "summariser-agent"
SUB_AGENT_SECRET_ENV = "SUMMARISER_AGENT_SECRET"
PARENT_SCOPE = "tickets:read"
STORES = ("memory", "redis")
FETCH = "credential fetch"
EXCHANGE = "token exchange"
REEXCHANGE = "re-exchange by summariser"
OPERATIONS = (FETCH, EXCHANGE, REEXCHANGE)
IN_PROCESS_REQUESTS = 2000
IN_PROCESS_ROUNDS = 5


def _label(store: str, operation: str) -> str:
    return f"state {store}: {operation}"


def _basic(client_id: str, secret: str) -> str:
    return "Basic " + base64.b64encode(f"{client_id}:{secret}".encode()).decode()


def reexchange_request(sub_agent_secret: str, parent_token: str) -> tuple[dict[str, str], bytes]:
    """summariser-agent (HTTP Basic) exchanging a triage-agent token for ``tickets:read``."""
    headers = {
        "Authorization": _basic(SUB_AGENT, sub_agent_secret),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    body = urlencode(
        {
            "grant_type": GRANT_TYPE,
            "subject_token": parent_token,
            "subject_token_type": ACCESS_TOKEN_TYPE,
            "scope": PARENT_SCOPE,
            "audience": AUDIENCE,
        }
    ).encode()
    return headers, body


def _token_call(broker: Broker, headers: dict[str, str], body: bytes, what: str) -> str:
    response = httpx.post(f"{broker.url}/oauth2/token", headers=headers, content=body, timeout=30)
    token = response.json().get("access_token") if response.status_code == 200 else None
    if not token:
        raise RuntimeError(f"{what} failed: HTTP {response.status_code} {response.text}")
    return str(token)


def _parent_token(broker: Broker, person_token: str) -> str:
    """An agent token of triage-agent for the person, ``tickets:read`` (the re-exchange's
    subject; the same one is re-exchanged over and over)."""
    headers, body = exchange_request(
        broker.client_id, broker.client_secret, person_token, scope=PARENT_SCOPE
    )
    return _token_call(broker, headers, body, "parent token exchange")


@dataclass
class _Commands:
    """Redis commands counted in each measured window, by row label."""

    redis: RedisProcess
    by_label: dict[str, dict[str, int]]
    cpu_seconds: dict[str, float]
    """redis-server's CPU in each measured window, by row label."""

    def edge_recorder(self, label: str) -> Callable[[str], None]:
        before: dict[str, int] = {}
        cpu_before: list[float] = []

        def on_edge(edge: str) -> None:
            cpu = cpu_seconds_by_pid([self.redis.pid]).get(self.redis.pid, 0.0)
            calls = self.redis.command_calls()
            if edge == "start":
                before.clear()
                before.update(calls)
                cpu_before[:] = [cpu]
            else:
                self.by_label[label] = {
                    name: count - before.get(name, 0)
                    for name, count in calls.items()
                    if count - before.get(name, 0) > 0
                }
                self.cpu_seconds[label] = cpu - (cpu_before[0] if cpu_before else cpu)

        return on_edge


@dataclass(frozen=True)
class _Target:
    store: str
    operation: str
    pid: int
    spec: Callable[[], LoadSpec]


@dataclass(frozen=True)
class InProcess:
    """µs per fetch (median and best of the rounds) by variant, and the stub's call count."""

    per_fetch_us: dict[str, tuple[float, float]]
    per_status_us: dict[str, tuple[float, float]]
    requests: int
    rounds: int
    stub_calls: int


def run(options: Options, print_: Callable[[str], None] = print) -> list[Row]:
    """Start everything, measure every target, print the tables, stop everything."""
    credential = _credential()
    field_name = credential.field or "value"
    api_key = "sk-bench-" + secrets.token_urlsafe(32)
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        workdir = work_directory(stack, keep=options.keep, name="state")
        print_("starting redis-server, the development issuer, OpenBao ...")
        (workdir / "redis").mkdir()
        redis = stack.enter_context(redis_server(workdir / "redis"))
        issuer: Issuer = stack.enter_context(dev_issuer())
        person_token = issuer.provider.mint(PERSON, token_type="id_token", lifetime=24 * 3600)
        (workdir / "bao").mkdir()
        bao = stack.enter_context(openbao_server(None, workdir / "bao"))
        bao_tokens = _seed(bao, credential.path, {field_name: api_key})
        backends = vault_backends(bao.url)
        gateway_secret = secrets.token_urlsafe(32)
        sub_agent_secret = secrets.token_urlsafe(32)
        env = {
            VAULT_TOKEN_ENV: bao_tokens[BROKER_TOKEN_NAME],
            GATEWAY_SECRET_ENV: gateway_secret,
            SUB_AGENT_SECRET_ENV: sub_agent_secret,
        }

        print_("in process: the fetch with a no-op revocation check, memory and Redis ...")
        in_process = _in_process(
            issuer, workdir, backends, env, redis, person_token, api_key, gateway_secret
        )

        print_("starting two brokers (state memory, state redis) ...")
        brokers: dict[str, Broker] = {}
        for store in STORES:
            config: dict[str, Any] = {"secret_backends": backends}
            if store == "redis":
                config["state"] = {"kind": "redis", "url": redis.url}
            brokers[store] = stack.enter_context(
                broker_server(
                    issuer,
                    workdir,
                    workers=options.workers,
                    name=f"broker-{store}",
                    extra_config=config,
                    extra_env=env,
                )
            )
        for broker in brokers.values():
            wait_until_idle(broker.pid)
        probes = {store: keepalive_probe_ms(broker.port) for store, broker in brokers.items()}

        def spec_factory(store: str, operation: str) -> Callable[[], LoadSpec]:
            broker = brokers[store]

            def build() -> LoadSpec:
                if operation == FETCH:
                    token = _agent_token(broker, person_token)
                    headers, body = fetch_request(gateway_secret, token)
                    _preflight_fetch(broker, headers, body, api_key)
                    path = f"/v1/credentials/{CREDENTIAL}"
                elif operation == EXCHANGE:
                    headers, body = exchange_request(
                        broker.client_id, broker.client_secret, person_token
                    )
                    _token_call(broker, headers, body, "token exchange preflight")
                    path = "/oauth2/token"
                else:
                    parent = _parent_token(broker, person_token)
                    headers, body = reexchange_request(sub_agent_secret, parent)
                    _token_call(broker, headers, body, "re-exchange preflight")
                    path = "/oauth2/token"
                request = build_request(
                    "POST", LOOPBACK, broker.port, path, headers=headers, body=body
                )
                return LoadSpec.one(_label(store, operation), LOOPBACK, broker.port, request)

            return build

        targets = [
            _Target(store, operation, brokers[store].pid, spec_factory(store, operation))
            for operation in OPERATIONS
            for store in STORES
        ]
        for target in targets:  # every preflight before anything is measured
            target.spec()

        print_(_header(options, redis, probes))
        warn_if_busy(print_)
        commands = _Commands(redis, {}, {})
        for round_no in range(1, options.rounds + 1):
            for target in targets:
                base = _label(target.store, target.operation)
                label = base if options.rounds == 1 else f"{base} #{round_no}"
                print_(f"  measuring {label} ...")
                row = _measure(
                    target.spec(), target.store, target.pid, options, commands.edge_recorder(label)
                )
                row.label = label
                rows.append(row)

        print_("")
        print_(_in_process_table(in_process))
        print_("")
        print_("OVER HTTP (`broker serve`, the load generator). " + _results_table(rows, options))
        print_("")
        print_(_store_table(rows, commands, options))
        print_("")
        print_(_verdict(rows, in_process))
        print_("")
        print_(_notes(options, workdir if options.keep else None))
        stalled = {store: ms for store, ms in probes.items() if ms > STALL_MS}
        for ms in stalled.values():
            print_("")
            print_(_stall_warning(ms))
    return rows


# -- in process ---------------------------------------------------------------------------------


_NOTHING_REVOKED = RevocationStatus()


def _in_process(
    issuer: Issuer,
    workdir: Path,
    backends: list[dict[str, Any]],
    env: dict[str, str],
    redis: RedisProcess,
    person_token: str,
    api_key: str,
    gateway_secret: str,
) -> InProcess:
    """Sequential fetches straight into two apps (memory, Redis), one event loop; the memory
    app also with its store's ``revocation_status`` replaced by a no-op (this process only)."""
    from broker.app import create_app
    from broker.settings import load_settings

    agent_secret = secrets.token_urlsafe(32)
    with contextlib.ExitStack() as stack:
        stack.enter_context(environment({**env, "TRIAGE_AGENT_SECRET": agent_secret}))
        records = stack.enter_context(decision_records_to(workdir / "in-process-decisions.jsonl"))
        apps: dict[str, Any] = {}
        for store in STORES:
            (workdir / f"in-process-{store}").mkdir()
            config = broker_config(issuer, "http://127.0.0.1:8080", workdir / f"in-process-{store}")
            config["secret_backends"] = backends
            if store == "redis":
                config["state"] = {"kind": "redis", "url": redis.url}
            with contextlib.redirect_stdout(records):
                apps[store] = create_app(load_settings(None, **config))

        path = f"/v1/credentials/{CREDENTIAL}"
        stub_calls = 0

        def fetcher(
            app: Any, headers: list[tuple[bytes, bytes]], body: bytes
        ) -> Callable[[], Awaitable[None]]:
            async def fetch() -> None:
                status, payload = await asgi_call(app, "POST", path, headers, body)
                if status != 200 or api_key.encode() not in payload:
                    raise RuntimeError(f"in-process fetch failed: {status} {payload[:300]!r}")

            return fetch

        async def no_check(token_ids: Iterable[str], subjects: Iterable[str]) -> RevocationStatus:
            nonlocal stub_calls
            stub_calls += 1
            return _NOTHING_REVOKED

        async def measure() -> InProcess:
            fetch_calls: dict[str, Callable[[], Awaitable[None]]] = {}
            for store, app in apps.items():
                headers, body = exchange_request(
                    "triage-agent",
                    agent_secret,
                    person_token,
                    scope="llm:openai:chat",
                    audience="llm-gateway",
                )
                status, payload = await asgi_call(
                    app, "POST", "/oauth2/token", as_asgi(headers), body
                )
                if status != 200:
                    raise RuntimeError(f"in-process exchange failed: {status} {payload[:300]!r}")
                fetch_headers, fetch_body = fetch_request(
                    gateway_secret, json.loads(payload)["access_token"]
                )

                fetch_calls[store] = fetcher(app, as_asgi(fetch_headers), fetch_body)
            memory_state = apps["memory"].state.services.state
            redis_state = apps["redis"].state.services.state
            variants = {
                "no-op stub": ("memory", True),
                "memory": ("memory", False),
                "redis": ("redis", False),
            }
            n = IN_PROCESS_REQUESTS
            per_fetch: dict[str, list[float]] = {name: [] for name in variants}
            per_status: dict[str, list[float]] = {store: [] for store in STORES}
            ids = ("0" * 32, "1" * 32)
            subjects = (f"person:dev/{PERSON}", "agent:triage-agent")
            for _ in range(50):  # warm: the first backend load, the verdict cache, the pool
                for call in fetch_calls.values():
                    await call()
            for _ in range(IN_PROCESS_ROUNDS):
                for name, (store, stubbed) in variants.items():
                    if stubbed:
                        memory_state.revocation_status = no_check
                    try:
                        start = time.perf_counter()
                        for _ in range(n):
                            await fetch_calls[store]()
                        per_fetch[name].append((time.perf_counter() - start) / n * 1e6)
                    finally:
                        if stubbed:
                            del memory_state.revocation_status
                for store, state in (("memory", memory_state), ("redis", redis_state)):
                    start = time.perf_counter()
                    for _ in range(n):
                        await state.revocation_status(ids, subjects)
                    per_status[store].append((time.perf_counter() - start) / n * 1e6)
            await redis_state.close()
            return InProcess(
                {k: (statistics.median(v), min(v)) for k, v in per_fetch.items()},
                {k: (statistics.median(v), min(v)) for k, v in per_status.items()},
                n,
                IN_PROCESS_ROUNDS,
                stub_calls,
            )

        return asyncio.run(measure())


# -- tables ---------------------------------------------------------------------------------------


def _header(options: Options, redis: RedisProcess, probes: dict[str, float]) -> str:
    version = redis.version.split(" sha=")[0]
    probe = ", ".join(f"state {store} {ms:.1f} ms" for store, ms in probes.items())
    return "\n".join(
        [
            "",
            "== State store: in-memory vs Redis, beside same-run baselines ==",
            machine_line(f"{version} (redis-server on loopback, --save '' --appendonly no)"),
            f"brokers: two `broker serve`, {options.workers} uvicorn workers each, the example "
            "policies, a vault backend (OpenBao dev); identical but for `state:` "
            f"(kind memory | kind redis, url {redis.url}, default timeouts and pool)",
            f"operations: {FETCH} (POST /v1/credentials/{CREDENTIAL}, gateway llm-gateway, an "
            "agent token of triage-agent: a revocation_status round trip at most every 0.5 s "
            "per token and worker); "
            f"{EXCHANGE} (triage-agent, client_secret_basic, an ID token of {PERSON}: no state "
            f"store call); {REEXCHANGE} ({SUB_AGENT}, client_secret_basic, subject = one "
            f'triage-agent agent token, scope "{PARENT_SCOPE}", re-exchanged over and over: '
            "the parent's revocation check, one round trip)",
            f"load: closed loop, {options.concurrency} keep-alive connections over "
            f"{options.processes} generator processes, {options.warmup:g} s warm-up + "
            f"{options.seconds:g} s measured per target, memory and redis interleaved",
            f"keep-alive probe (sequential GET /healthz, median): {probe}",
        ]
    )


def _in_process_table(result: InProcess) -> str:
    stub = result.per_fetch_us["no-op stub"][0]
    labels = {
        "no-op stub": "fetch, revocation_status stubbed (no-op, in this process only)",
        "memory": "fetch, state memory (InMemoryStateStore)",
        "redis": "fetch, state redis (RedisStateStore, MGET on loopback)",
    }
    body: list[list[object]] = []
    for name, (median, best) in result.per_fetch_us.items():
        body.append([labels[name], median, best, median - stub if name != "no-op stub" else ""])
    for store, (median, best) in result.per_status_us.items():
        body.append([f"revocation_status alone, state {store}", median, best, ""])
    return (
        f"IN PROCESS (no sockets, no uvicorn; the bare ASGI driver; sequential, one request at a "
        f"time; {result.requests} per round, {result.rounds} rounds interleaved):\n"
        + table(["variant", "us/fetch (median)", "us (best)", "+us vs no-op"], body)
        + f"\n(the stub answered {result.stub_calls:,} calls for "
        f"{result.requests * result.rounds:,} stubbed fetches; Redis rows include the loopback "
        "round trip, which the process waits out idle here, while under concurrent load other "
        "requests run meanwhile)"
    )


def _commands_per_request(calls: dict[str, int] | None, ok: int) -> tuple[str, str]:
    if calls is None or not ok:
        return "-", "-"
    return f"{calls.get('mget', 0) / ok:.2f}", f"{sum(calls.values()) / ok:.2f}"


def _store_table(rows: list[Row], commands: _Commands, options: Options) -> str:
    body: list[list[object]] = []
    for operation in OPERATIONS:
        memory = _median_row(rows, _label("memory", operation))
        redis = _median_row(rows, _label("redis", operation))
        if memory is None or redis is None:
            continue
        m, r = memory.result, redis.result
        for row, store in ((memory, "memory"), (redis, "redis")):
            mget, total = _commands_per_request(commands.by_label.get(row.label), row.result.ok)
            redis_cpu = commands.cpu_seconds.get(row.label, float("nan"))
            body.append(
                [
                    _label(store, operation),
                    row.result.rps,
                    f"{r.rps / m.rps:.2f}x" if store == "redis" and m.rps else "(baseline)",
                    row.result.percentile_ms(50),
                    row.result.percentile_ms(99),
                    _cpu_ms(row),
                    mget,
                    total,
                    100.0 * redis_cpu / options.seconds,
                    1000.0 * redis_cpu / row.result.ok if row.result.ok else float("nan"),
                ]
            )
    return (
        f"OVER HTTP, Redis beside memory ({options.concurrency} concurrent clients; median round; "
        "Redis commands and redis-server CPU counted in the measured window; srv CPU is the "
        "broker's alone):\n"
        + table(
            [
                "target",
                "req/s",
                "vs memory",
                "p50 ms",
                "p99 ms",
                "srv CPU ms/req",
                "MGET/req",
                "redis cmds/req",
                "redis CPU %",
                "redis CPU ms/req",
            ],
            body,
        )
    )


def _verdict(rows: list[Row], in_process: InProcess) -> str:
    memory = _median_row(rows, _label("memory", FETCH))
    redis = _median_row(rows, _label("redis", FETCH))
    if memory is None or redis is None:
        return ""
    m, r = memory.result, redis.result
    ratio = r.rps / m.rps if m.rps else float("nan")
    p99 = r.percentile_ms(99)
    stub, _ = in_process.per_fetch_us["no-op stub"]
    in_memory, _ = in_process.per_fetch_us["memory"]
    in_redis, _ = in_process.per_fetch_us["redis"]
    body = target_rows(
        ("fetches/s, state redis vs memory (over HTTP)", f"{r.rps:,.0f} vs {m.rps:,.0f}"),
        ratio,
        TARGET_RATIO,
        (
            "fetch p99, state redis (over HTTP)",
            f"{p99:.1f} ms (memory {m.percentile_ms(99):.1f})",
        ),
        p99,
        TARGET_P99_MS,
    )
    body += [
        [
            "us/fetch, no-op / memory / redis (in process)",
            f"{stub:.0f} / {in_memory:.0f} / {in_redis:.0f}",
            f"{stub / in_redis:.2f}x" if in_redis else "-",
            "",
            "",
        ],
    ]
    return (
        "Against the issue's target (the Redis state store costs under 20% of fetch "
        "throughput):\n" + table(COMPARISON_HEADERS, body)
    )


def _notes(options: Options, kept: Path | None) -> str:
    notes = [
        "Notes:",
        "- IN PROCESS figures are sequential requests into the ASGI app in this process (no "
        "HTTP); OVER HTTP figures are `broker serve` under the load generator. The 'no-op "
        "stub' exists only in process: over HTTP the brokers run unchanged.",
        "- the in-process ratio (no-op / redis) is a latency ratio of one request at a time and "
        "includes the Redis round trip the process waits for; the over-HTTP ratio is the "
        "throughput the target is about.",
        "- every exchange checks the person, the agents (and on a re-exchange the parent "
        "token) against revocations: one MGET, whose 'nothing revoked' answer is remembered "
        "for 0.5 s per (person, agent chain) and worker, so a few MGETs per second here.",
        "- redis-server's CPU is not in 'srv CPU' (the broker's process tree) but in 'other "
        "CPU %' of the results table; the second table shows it on its own.",
        "- req/s, latency and CPU columns as in the token exchange section; the fetch and the "
        "re-exchange present the same token on every request (a fresh one per measured round).",
    ]
    if kept is not None:
        notes.append(f"- configurations and logs kept in {kept}")
    return "\n".join(notes)

"""Where one credential fetch's CPU time goes, in process (no HTTP server, no load generator).

``python -m bench.profile_fetch [--requests N]`` starts an OpenBao dev server seeded as the
credentials benchmark seeds it, builds the broker app as ``broker serve`` does (the benchmark's
settings with the ``vault`` secret backend, the example policies), gets an agent token through the
app's own token endpoint (triage-agent for alice, ``llm:openai:chat``, audience ``llm-gateway``),
then:

1. times N sequential ``POST /v1/credentials/openai-api-key`` (gateway llm-gateway, HTTP Basic,
   the same agent token: cache hits) and N ``GET /healthz`` made straight into the ASGI app (a
   minimal ASGI driver, ``bench._inprocess``), so the difference is the fetch's cost;
2. runs the N fetches under cProfile: the cumulative time of the fetch's steps and the functions
   with the most own time, per fetch;
3. times the primitives a fetch is made of, with no profiler.

cProfile's overhead inflates pure-Python code, so read (1) and (3) for absolute costs and (2) for
the shape.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import hashlib
import json
import pstats
import secrets
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from bench._inprocess import (
    as_asgi,
    asgi_call,
    decision_records_to,
    environment,
    micro,
    profile_tables,
    time_beside_healthz,
)
from bench._report import table
from bench._servers import broker_config, dev_issuer, openbao_server
from bench.credentials import (
    AGENT_AUDIENCE,
    AGENT_SCOPE,
    BROKER_TOKEN_NAME,
    CREDENTIAL,
    GATEWAY_SECRET_ENV,
    VAULT_TOKEN_ENV,
    _credential,
    _seed,
    fetch_request,
    vault_backends,
)
from bench.exchange import PERSON, exchange_request

STEPS: list[tuple[str, str, str]] = [
    # (label, file suffix, function name) for the per-fetch cumulative table
    ("whole ASGI app (BrokerApp: straight to the endpoint)", "broker/app.py", "__call__"),
    ("  fetch endpoint body", "broker/endpoints/credentials.py", "fetch_credential"),
    ("    request id (logs.py new_request_id)", "broker/logs.py", "new_request_id"),
    ("    read_form_or_json (body, parse_qsl)", "broker/oauth_request.py", "read_form_or_json"),
    ("    gateway authentication (Basic)", "broker/client_auth.py", "authenticate"),
    ("    CredentialService.fetch", "broker/credentials.py", "fetch"),
    ("      agent token verify (verdict cache)", "broker/tokens.py", "verify"),
    ("      cache get_version (hit)", "broker/cache.py", "get_version"),
    ("      DecisionLog.record", "broker/audit.py", "record"),
    ("        json.dumps of the record", "json/__init__.py", "dumps"),
    ("  JSONResponse render", "starlette/responses.py", "render"),
    ("  response send path (Response.__call__)", "starlette/responses.py", "__call__"),
]


def _primitives(app: Any, agent_token: str, form_body: bytes, record: dict[str, Any]) -> str:
    from starlette.responses import JSONResponse

    from broker.client_auth import _parse_basic
    from broker.endpoints.edge import NO_STORE as _NO_STORE
    from broker.logs import new_request_id
    from broker.oauth_request import MAX_FIELDS

    services = app.state.services
    basic = fetch_request("secret", agent_token)[0]["Authorization"]
    body = {
        "credential": CREDENTIAL,
        "value": "sk-" + "x" * 48,
        "version": "1",
        "stage": None,
        "refresh_in": 42.0,
        "stale": False,
        "served_for": {"sub": "dev/alice", "act": {"sub": "triage-agent"}, "client_id": "x"},
    }
    headers = {**_NO_STORE, "X-Request-Id": secrets.token_hex(16)}
    text = form_body.decode()
    rows = [
        micro("new_request_id() (secrets.token_hex(16))", new_request_id, 20000),
        micro(
            "parse_qsl of the fetch form",
            lambda: parse_qsl(
                text, keep_blank_values=True, strict_parsing=True, max_num_fields=MAX_FIELDS
            ),
            20000,
        ),
        micro("HTTP Basic parse (client_auth._parse_basic)", lambda: _parse_basic(basic), 20000),
        micro(
            "sha256 of the agent token (verdict cache key)",
            lambda: hashlib.sha256(agent_token.encode()).digest(),
            20000,
        ),
        micro(
            "decision record (the app's DecisionLog.record, to its file)",
            lambda: services.decisions.record("credential.fetch", **record),
            20000,
        ),
        micro(
            "JSONResponse(body, headers) construction",
            lambda: JSONResponse(body, headers=headers),
            20000,
        ),
    ]
    return "Primitives (best of 5, no profiler):\n" + table(["primitive", "us/call"], rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile_fetch")
    parser.add_argument("--requests", type=int, default=5000, help="fetches per measurement")
    parser.add_argument("--top", type=int, default=25, help="rows of the own-time table")
    args = parser.parse_args(argv)

    from broker.app import create_app
    from broker.settings import load_settings

    credential = _credential()
    field_name = credential.field or "value"
    api_key = "sk-bench-" + secrets.token_urlsafe(32)
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-prof-")))
        issuer = stack.enter_context(dev_issuer())
        store = stack.enter_context(openbao_server(None, workdir))
        tokens = _seed(store, credential.path, {field_name: api_key})
        agent_secret, gateway_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        env = {
            "TRIAGE_AGENT_SECRET": agent_secret,
            GATEWAY_SECRET_ENV: gateway_secret,
            VAULT_TOKEN_ENV: tokens[BROKER_TOKEN_NAME],
        }
        stack.enter_context(environment(env))
        config = broker_config(issuer, "http://127.0.0.1:8080", workdir)
        config["secret_backends"] = vault_backends(store.url)
        settings = load_settings(None, **config)
        # Decision records go to a file, flushed per record, as under `broker serve`.
        records = stack.enter_context(decision_records_to(workdir / "decisions.jsonl"))
        with contextlib.redirect_stdout(records):
            app = create_app(settings)
        person_token = issuer.provider.mint(PERSON, token_type="id_token", lifetime=24 * 3600)
        n = args.requests

        async def agent_token() -> str:
            headers, body = exchange_request(
                "triage-agent",
                agent_secret,
                person_token,
                scope=AGENT_SCOPE,
                audience=AGENT_AUDIENCE,
            )
            status, payload = await asgi_call(app, "POST", "/oauth2/token", as_asgi(headers), body)
            if status != 200:
                raise RuntimeError(f"exchange failed: {status} {payload[:300]!r}")
            return str(json.loads(payload)["access_token"])

        token = asyncio.run(agent_token())
        fetch_headers, fetch_body = fetch_request(gateway_secret, token)
        headers = as_asgi(fetch_headers)
        path = f"/v1/credentials/{CREDENTIAL}"

        async def fetches(count: int) -> None:
            for _ in range(count):
                status, payload = await asgi_call(app, "POST", path, headers, fetch_body)
                if status != 200 or api_key.encode() not in payload:
                    raise RuntimeError(f"fetch failed: {status} {payload[:300]!r}")

        # warm: the first load from OpenBao, the verdict cache filled
        fx_s, hz_s = asyncio.run(time_beside_healthz(app, fetches, n))
        print(
            f"In-process, sequential, {n} requests each (no sockets, no uvicorn/httptools):\n"
            + table(
                ["request", "us/request"],
                [
                    [f"POST {path} (cache hit)", fx_s * 1e6],
                    ["GET /healthz", hz_s * 1e6],
                    ["fetch minus healthz", (fx_s - hz_s) * 1e6],
                ],
            )
        )

        async def profiled() -> None:
            # One event loop, like a worker's: the cache lives on the loop that loaded it.
            await fetches(50)
            profiler = cProfile.Profile()
            profiler.enable()
            await fetches(n)
            profiler.disable()
            stats_holder.append(pstats.Stats(profiler))

        stats_holder: list[pstats.Stats] = []
        asyncio.run(profiled())
        print(profile_tables(stats_holder[0], STEPS, n, args.top, "fetch"))
        record = {
            "request_id": secrets.token_hex(16),
            "credential": CREDENTIAL,
            "policy_version": "sha256:" + "x" * 32,
            "gateway": "llm-gateway",
            "person": "dev/alice",
            "agent_chain": ["triage-agent"],
            "jti": secrets.token_urlsafe(18),
            "token_policy_version": "sha256:" + "x" * 32,
            "version": "1",
            "outcome": "granted",
            "reason": "granted",
        }
        print("\n" + _primitives(app, token, fetch_body, record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

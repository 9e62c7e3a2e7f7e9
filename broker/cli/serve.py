"""`broker serve` (production) and `broker dev` (everything embedded, development only)."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from broker.policy import PolicyError
from broker.settings import BrokerSettings, load_settings

UVICORN_OPTIONS: dict[str, Any] = {
    "log_level": "warning",
    "log_config": None,  # the app configures logging (JSON lines with request ids)
    "access_log": False,
    "server_header": False,
    # The broker alone decides whom to believe about the caller's address
    # (http.trusted_proxies): uvicorn's own proxy-headers middleware would take
    # X-Forwarded-For from any local peer before the broker saw the request.
    "proxy_headers": False,
}
"""What `broker serve` and `broker dev` both tell uvicorn."""

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML configuration file.", exists=False)
]


def _load(config: Path | None, **overrides: object) -> BrokerSettings:
    try:
        return load_settings(config, **overrides)
    except FileNotFoundError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValidationError as exc:
        # Never echo the input back: a mistaken inline secret must not reach the terminal.
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in e['loc']) or '(top level)'}: {e['msg']}"
            for e in exc.errors(include_input=False, include_url=False)
        )
        typer.echo(f"error: invalid configuration:\n{problems}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: invalid configuration: {exc}", err=True)
        raise typer.Exit(1) from None


def _check_buildable(settings: BrokerSettings) -> None:
    """Build the services once in this process: bad policy, keys or IdPs fail here, loudly."""
    from broker.services import build_services

    try:
        build_services(settings, decision_sinks=[])  # a dry build starts no audit chain
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    from broker.audit import build_sinks

    try:  # the audit file is writable and the audit bucket has Object Lock
        for sink in build_sinks(settings.audit):
            close = getattr(sink, "close", None)
            if callable(close):
                close()
    except Exception as exc:  # OSError, botocore errors, a bucket without Object Lock
        typer.echo(f"error: audit sink: {exc}", err=True)
        raise typer.Exit(1) from None


def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="Overrides http.host.")] = None,
    port: Annotated[int | None, typer.Option(help="Overrides http.port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Overrides http.workers.")] = None,
) -> None:
    """Run the broker. Refuses development components unless explicitly allowed."""
    settings = _load(config)
    if settings.uses_development_components and not settings.allow_development_components:
        typer.echo(
            "error: a development component is configured (an identity provider of kind dev or "
            "a secret backend of kind file); `broker serve` refuses it unless "
            "allow_development_components is true. Use `broker dev` locally.",
            err=True,
        )
        raise typer.Exit(1)
    problem = settings.per_worker_state_problem(workers)
    if problem is not None:  # --workers; http.workers is refused by the settings themselves
        typer.echo(f"error: {problem}", err=True)
        raise typer.Exit(1)
    _check_buildable(settings)
    if config is not None:
        os.environ["BROKER_CONFIG_FILE"] = str(config.resolve())
    tls = _tls_files(settings)
    server_config = uvicorn.Config(
        "broker.app:create_app_from_environment",
        factory=True,
        workers=workers or settings.http.workers,
        **UVICORN_OPTIONS,
        ssl_certfile=tls[0] if tls else None,
        ssl_keyfile=tls[1] if tls else None,
    )
    sock = _listening_socket(host or settings.http.host, port or settings.http.port)
    if server_config.workers > 1:
        _Supervisor(server_config, sockets=[sock]).run()
    else:
        uvicorn.Server(server_config).run(sockets=[sock])


class _Supervisor(Multiprocess):
    """uvicorn's worker supervisor, but SIGHUP means "reload the policy", as with one worker.

    uvicorn restarts every worker on SIGHUP: new processes, new audit chains, cold credential
    caches and verdict caches, for what is only a policy change. Here SIGHUP is passed on to each
    worker, whose policy watcher validates, tests and swaps the new version in place (or keeps
    the old one). Restart the service to restart workers.
    """

    def handle_hup(self) -> None:
        for worker in self.processes:
            pid = worker.process.pid
            if pid is not None and worker.process.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGHUP)


def _tls_files(settings: BrokerSettings) -> tuple[str, str] | None:
    """The HTTPS certificate and key, checked loadable now (a clear error, not a worker crash)."""
    cert, key = settings.http.tls_cert_file, settings.http.tls_key_file
    if cert is None or key is None:
        return None
    import ssl

    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        # Name the files and the failure, never their content.
        reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or "unreadable"
        typer.echo(f"error: http.tls_cert_file/tls_key_file ({cert}, {key}): {reason}", err=True)
        raise typer.Exit(1) from None
    return str(cert), str(key)


def _listening_socket(host: str, port: int) -> socket.socket:
    """The listening socket, created with an explicit IPPROTO_TCP.

    uvicorn's own multi-worker socket has proto 0, so asyncio never sets TCP_NODELAY on accepted
    connections and every keep-alive response waits ~40 ms for a delayed ACK (uvicorn #3149).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        typer.echo(f"error: cannot listen on {host}:{port}: {exc.strerror}", err=True)
        raise typer.Exit(1) from None
    sock.set_inheritable(True)
    return sock


def _dev_client_secrets(policy_dir: Path, store: Path) -> dict[str, str]:
    """Generate (once) a secret for every `env:` reference in the policy, kept in var/dev."""
    from broker.policy import load_policy
    from broker.policy.model import authentication_methods

    policy = load_policy(policy_dir).policy
    refs = set()
    clients = [
        *(a.spec.authentication for a in policy.agents.values()),
        *(r.authentication for r in policy.resource_servers.values()),
        *(g.authentication for g in policy.gateways.values()),
        *(a.authentication for a in policy.admins.values()),
    ]
    for auth in (method for spec in clients for method in authentication_methods(spec)):
        ref = getattr(auth, "secret_ref", None)
        if ref and ref.startswith("env:"):
            refs.add(ref[4:])
    known: dict[str, str] = json.loads(store.read_text()) if store.exists() else {}
    for name in sorted(refs):
        known.setdefault(name, os.environ.get(name) or secrets.token_urlsafe(24))
    store.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(known, handle, indent=2)
    return known


DEV_APPROVALS_AUDIENCE = "broker-approvals"
"""The audience of dev IdP access tokens for the approvers' JSON API (``POST /token`` with
``person``, ``token_type=access_token`` and ``audience=broker-approvals``)."""

WALKTHROUGH = """
==============================================================================
 Agent identity broker: DEVELOPMENT MODE (built-in IdP, generated keys)
==============================================================================
 broker:          {issuer}       (metadata: {issuer}/.well-known/oauth-authorization-server)
 dev IdP:         {idp}   (DEVELOPMENT ONLY; people: {people})
 dev OpenBao:     {bao}   (DEVELOPMENT ONLY; in memory, seeded with demo provider keys)
 policies:        {policy_dir}  (version {version})
 client secrets:  {secrets_file}
 signing keys:    {keys_dir}
 audit trail:     {audit_file}  (and below, as JSON lines)

 1. Sign Alice (support) in at the development IdP and keep her ID token:

    PERSON_TOKEN=$(curl -s -X POST {idp}/token -d person=alice \\
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["id_token"])')

 2. Exchange it as the triage agent for a down-scoped agent token (RFC 8693):

    curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \\
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
      -d subject_token="$PERSON_TOKEN" \\
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \\
      -d scope="tickets:read kb:read" -d audience=https://tickets.internal.example

 3. Decode the agent token (person in sub, agent in act, policy version, provenance):

    AGENT_TOKEN=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \\
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
      -d subject_token="$PERSON_TOKEN" \\
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \\
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    {broker_cmd} token decode "$AGENT_TOKEN"

 4. A sub-agent narrows it further; act nests (summariser acting for triage for Alice):

    curl -s -u summariser-agent:{summariser_secret} {issuer}/oauth2/token \\
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
      -d subject_token="$AGENT_TOKEN" \\
      -d subject_token_type=urn:ietf:params:oauth:token-type:access_token -d scope=tickets:read

 5. Ask for more than Alice holds and read why it is refused:

    curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \\
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
      -d subject_token="$PERSON_TOKEN" \\
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token -d scope=tickets:write
    {broker_cmd} policy explain --person dev/alice --group support \\
      --agent triage-agent --scope tickets:write

 6. The LLM gateway fetches the provider key for one call of the agent (the agent never sees it):

    LLM_TOKEN=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \\
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \\
      -d subject_token="$PERSON_TOKEN" \\
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \\
      -d scope=llm:openai:chat -d audience=llm-gateway \\
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    curl -s -u llm-gateway:{gateway_secret} -X POST {issuer}/v1/credentials/openai-api-key \\
      -d token="$LLM_TOKEN"

 7. Rotate the key in OpenBao ({bao}) and push a refresh, as a rotation hook would;
    fetch again (step 6's curl) and see version 2. Without the push it arrives within 60 s.

    BAO_ADDR={bao} BAO_TOKEN={bao_token} {bao_cmd} kv put secret/llm/openai api_key=sk-rotated-demo
    curl -s -u rotation-hook:{hook_secret} -X POST \\
      {issuer}/v1/admin/credentials/openai-api-key/refresh

 8. Read the audit trail: verify the chain (exit 3 while the broker runs: the chain is still
    open, and it says up to which record it vouches), query it, and the fetches per credential:

    {broker_cmd} audit verify {audit_file} --keys {keys_dir}
    {broker_cmd} audit query {audit_file} --person dev/alice --agent triage-agent
    {broker_cmd} usage report {audit_file} --by agent --policy-dir {policy_dir}
    {broker_cmd} keys list --keys-dir {keys_dir}

 9. Escalation to a human: a refund needs a finance approver. Dave (support lead) asks the
    triage agent for one; the exchange is refused and names where to ask; the agent asks
    (OpenID CIBA) and keeps the auth_req_id:

    DAVE_TOKEN=$(curl -s -X POST {idp}/token -d person=dave \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["id_token"])')
    curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
      -d subject_token="$DAVE_TOKEN" \
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
      -d scope="tickets:read tickets:refund" -d audience=https://tickets.internal.example
    AUTH_REQ_ID=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/bc-authorize \
      -d subject_token="$DAVE_TOKEN" \
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
      -d scope="tickets:read tickets:refund" -d audience=https://tickets.internal.example \
      -d binding_message="Refund 120 EUR on order 4711" \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["auth_req_id"])')
    curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:openid:params:grant-type:ciba -d auth_req_id="$AUTH_REQ_ID"

10. Carol (finance) approves: open {issuer}/approvals in a browser and sign in as carol at
    the dev IdP's page, or, as a chat bot would, with her own token through the JSON API:

    CAROL_TOKEN=$(curl -s -X POST {idp}/token -d person=carol -d token_type=access_token \
      -d audience=broker-approvals \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    APPROVAL=$(curl -s -H "Authorization: Bearer $CAROL_TOKEN" {issuer}/v1/approvals \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["approvals"][0]["id"])')
    curl -s -H "Authorization: Bearer $CAROL_TOKEN" -H "Content-Type: application/json" \
      -X POST {issuer}/v1/approvals/$APPROVAL/decision -d '{{"decision": "approve"}}'

11. The agent polls again (at the interval it was given) and receives the token, with an
    approval claim naming who approved what:

    sleep 5
    APPROVED_TOKEN=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:openid:params:grant-type:ciba -d auth_req_id="$AUTH_REQ_ID" \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    {broker_cmd} token decode "$APPROVED_TOKEN"

12. Enterprise-managed MCP authorization (ID-JAG): the triage agent asks the broker, as the
    enterprise's token service, for an identity assertion grant for the tickets MCP server
    (token_type N_A), then redeems it at the broker, that server's authorization server, for an
    MCP access token (grant jwt-bearer; the audience is the MCP server):

    ID_JAG=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
      -d requested_token_type=urn:ietf:params:oauth:token-type:id-jag \
      -d subject_token="$PERSON_TOKEN" \
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
      -d audience={issuer} -d resource=https://tickets-mcp.internal.example/mcp \
      -d scope="tickets:read tickets:comment" \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    {broker_cmd} token decode "$ID_JAG"
    curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:ietf:params:oauth:grant-type:jwt-bearer -d assertion="$ID_JAG"

13. Tokens bound to the agent's key (DPoP, RFC 9449): the agent client keeps a key and binds
    its token; the gateway forwards the agent's proof and is served the key; the token alone,
    or the proof replayed, unlocks nothing:

    {python_cmd} -m broker.examples.dpop_demo --broker {issuer} \
      --person-token "$PERSON_TOKEN" --agent-secret {triage_secret} \
      --gateway-secret {gateway_secret}

14. Spend: the gateway reports step 6's call (POST /v1/usage); the broker prices it with the
    policy's price table (policies/usage.yaml) and attributes it to Alice and the triage agent;
    then the month's spend, and the FOCUS export finance imports:

    curl -s -u llm-gateway:{gateway_secret} {issuer}/v1/usage -H 'Content-Type: application/json' \
      -d '{{"records": [{{"call_id": "demo-call-1", "token": "'"$LLM_TOKEN"'", "credential": "openai-api-key", "provider": "openai", "model": "gpt-4o-mini", "units": {{"input_tokens": 1200, "output_tokens": 300}}}}]}}'
    {broker_cmd} usage report {audit_file} --measure spend --by agent --period month
    {broker_cmd} usage report {audit_file} --format focus | python3 -c 'import csv, sys; [print(r["ChargePeriodStart"], r["BilledCost"], r["BillingCurrency"], r["ServiceCategory"], r["SkuId"], r["x_Person"], r["x_AgentChain"], sep=" | ") for r in csv.DictReader(sys.stdin)]'

15. A budget: Dave's agents may spend 0.03 USD a day, each fetch reserving 0.01 until its call
    is reported; the fourth unreported fetch is refused, naming the budget and its reset:

    DAVE_LLM=$(curl -s -u triage-agent:{triage_secret} {issuer}/oauth2/token \
      -d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
      -d subject_token="$DAVE_TOKEN" \
      -d subject_token_type=urn:ietf:params:oauth:token-type:id_token \
      -d scope=llm:openai:chat -d audience=llm-gateway \
      | python3 -c 'import sys, json; print(json.load(sys.stdin)["access_token"])')
    for call in 1 2 3 4; do curl -s -u llm-gateway:{gateway_secret} -X POST \
      {issuer}/v1/credentials/openai-api-key -d token="$DAVE_LLM" | python3 -c \
      'import sys, json; a = json.load(sys.stdin); print(a.get("error_description") or "served")'; done
    {broker_cmd} policy explain --gateway llm-gateway --credential openai-api-key \
      --person dev/dave --group support-leads --agent triage-agent --scope llm:openai:chat \
      --audience llm-gateway --spent dave-daily=0.03

 Decision records are printed below as JSON lines. Ctrl-C stops everything.
==============================================================================
"""


def _port_in_use(host: str, port: int, what: str, setting: str) -> socket.socket:
    """Bind `host`:`port` now, or stop with one line naming what wanted it and the setting."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        variable = "BROKER_" + setting.upper().replace(".", "__")
        typer.echo(
            f"error: cannot listen on {host}:{port} for {what}: {exc.strerror} (another "
            f"`broker dev`?); stop what uses it, or set {setting} (or {variable})",
            err=True,
        )
        raise typer.Exit(1) from None
    return sock


def dev_settings(config: Path | None, state_dir: Path = Path("var/dev")) -> BrokerSettings:
    """The settings `broker dev` runs with: the configuration file (if any) plus the built-in
    IdP, the OpenBao dev server as secret backend ``vault`` and keys under `state_dir`.
    `broker policy check --dev` checks the policy against exactly these. The file and every
    BROKER_* override apply (a configured signing key directory or audit file wins)."""
    from broker.cli.keys import dev_key_directory

    base = _load(config)
    idp_url = f"http://{base.dev_idp.host}:{base.dev_idp.port}"
    dev_idp_config = {
        "name": "dev",
        "kind": "dev",
        "issuer": idp_url,
        "client_ids": ["broker-dev"],
        "audiences": ["broker", DEV_APPROVALS_AUDIENCE],
        "algorithms": ["RS256"],
    }
    # Approvers sign in at <issuer>/approvals through the dev IdP's page (the configured
    # approvals: section wins); the JSON API takes dev IdP tokens minted for its own audience.
    approvals = base.approvals.model_dump()
    if not approvals["sign_in"]:
        approvals["sign_in"] = [{"idp": "dev", "client_id": "broker-dev", "label": "the dev IdP"}]
    if not approvals["api_audiences"]:
        approvals["api_audiences"] = [DEV_APPROVALS_AUDIENCE]
    bao_url = f"http://{base.dev_openbao.host}:{base.dev_openbao.port}"
    dev_vault_config = {
        "name": "vault",
        "kind": "vault",
        "address": bao_url,
        "auth": {"method": "token", "token_ref": "env:BROKER_DEV_OPENBAO_TOKEN"},
    }
    return _load(
        config,
        identity_providers=[dev_idp_config, *[p.model_dump() for p in base.identity_providers]],
        secret_backends=[dev_vault_config, *[b.model_dump() for b in base.secret_backends]],
        allow_development_components=True,
        approvals=approvals,
        # configured values (file or BROKER_SIGNING_KEYS__DIRECTORY, BROKER_AUDIT__FILE) win
        signing_keys={
            **base.signing_keys.model_dump(),
            "directory": dev_key_directory(base, state_dir),
        },
        audit={**base.audit.model_dump(), "file": base.audit.file or state_dir / "audit.jsonl"},
    )


def dev(
    config: ConfigOption = None,
    state_dir: Annotated[Path, typer.Option(help="Where dev keys and secrets live.")] = Path(
        "var/dev"
    ),
) -> None:
    """Run the broker with embedded development defaults (a built-in IdP, an OpenBao dev server
    with demo provider keys, generated signing keys, the example policies). DEVELOPMENT ONLY."""
    from broker.cli.dev_openbao import start_dev_openbao
    from idp_adapters._loopback import serve_in_thread
    from idp_adapters.dev import DevIdentityProvider, load_dev_people

    settings = dev_settings(config, state_dir)
    idp_url = f"http://{settings.dev_idp.host}:{settings.dev_idp.port}"
    bao_url = f"http://{settings.dev_openbao.host}:{settings.dev_openbao.port}"
    secrets_file = state_dir / "client-secrets.json"
    try:
        client_secrets = _dev_client_secrets(settings.policy_dir, secrets_file)
    except PolicyError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    os.environ.update(client_secrets)

    people = load_dev_people(settings.dev_idp.people_file)
    provider = DevIdentityProvider(
        idp_url,
        people,
        redirect_uris=settings.dev_idp.redirect_uris or [f"{settings.issuer}/approvals/callback"],
    )
    # Every port first: a busy one is one line naming it, before anything has started.
    broker_sock = _port_in_use(settings.http.host, settings.http.port, "the broker", "http.port")
    idp_sock = _port_in_use(
        settings.dev_idp.host, settings.dev_idp.port, "the dev IdP", "dev_idp.port"
    )
    _port_in_use(
        settings.dev_openbao.host, settings.dev_openbao.port, "the dev OpenBao", "dev_openbao.port"
    ).close()
    # uvicorn re-raises SIGTERM after its graceful shutdown; make that an exception rather than
    # the default instant exit, so the exit stack below still stops what `broker dev` started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.ExitStack() as started:  # Ctrl-C or any failure stops everything started
        started.callback(broker_sock.close)
        try:
            openbao = start_dev_openbao(settings.dev_openbao.host, settings.dev_openbao.port)
        except RuntimeError as exc:
            idp_sock.close()
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(1) from None
        started.callback(openbao.stop)
        os.environ["BROKER_DEV_OPENBAO_TOKEN"] = openbao.root_token
        token_file = state_dir / "openbao-token"  # for a shell: BAO_TOKEN=$(cat var/dev/...)
        fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(openbao.root_token + "\n")
        started.callback(token_file.unlink, missing_ok=True)
        openbao.kv_put("llm/openai", {"api_key": "sk-demo-openai-" + secrets.token_hex(8)})
        openbao.kv_put("llm/anthropic", {"api_key": "sk-ant-demo-" + secrets.token_hex(8)})
        idp_server = serve_in_thread(provider.asgi_app(), sock=idp_sock)
        started.callback(idp_server.stop)
        _run_dev_broker(
            settings,
            people,
            idp_url,
            bao_url,
            openbao.root_token,
            client_secrets,
            state_dir,
            broker_sock,
        )


def _run_dev_broker(
    settings: BrokerSettings,
    people: dict[str, object],
    idp_url: str,
    bao_url: str,
    bao_token: str,
    client_secrets: dict[str, str],
    state_dir: Path,
    sock: socket.socket,
) -> None:
    from broker.app import create_app
    from broker.logs import configure_logging
    from broker.services import build_services

    configure_logging(settings.log_level, settings.log_format)
    try:
        services = build_services(settings)  # the audit: section: the file, and stdout
    except (PolicyError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(
        WALKTHROUGH.format(
            issuer=settings.issuer,
            idp=idp_url,
            people=", ".join(sorted(people)),
            policy_dir=settings.policy_dir,
            version=services.policies.current().version,
            secrets_file=state_dir / "client-secrets.json",
            keys_dir=settings.signing_keys.directory,
            audit_file=settings.audit.file,
            triage_secret=client_secrets.get("TRIAGE_AGENT_SECRET", "<secret>"),
            summariser_secret=client_secrets.get("SUMMARISER_AGENT_SECRET", "<secret>"),
            gateway_secret=client_secrets.get("LLM_GATEWAY_SECRET", "<secret>"),
            hook_secret=client_secrets.get("ROTATION_HOOK_SECRET", "<secret>"),
            bao=bao_url,
            bao_token=bao_token,
            bao_cmd=".venv/bin/bao",
            broker_cmd=".venv/bin/broker",
            python_cmd=".venv/bin/python",
        )
    )
    server_config = uvicorn.Config(
        create_app(settings, services=services),
        **UVICORN_OPTIONS,
    )
    uvicorn.Server(server_config).run(sockets=[sock])

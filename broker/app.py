"""The HTTP edge: `create_app(settings, services=...)` -> FastAPI.

Routes translate HTTP to domain calls and domain errors to RFC 6749 §5.2 responses, nothing more.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from broker.audit import (
    AuditUnavailable,
    DecisionLog,
    DecisionSink,
    KeyringCheckpointSigner,
    NonFiniteValue,
    build_sinks,
    keeps_trail,
    recorded_request_var,
)
from broker.cache import CredentialCache
from broker.client_auth import (
    AuthenticatedClient,
    ClientAuthenticator,
    FailedAuthThrottle,
    WorkloadActorResolver,
    source_address,
)
from broker.client_secrets import BoundedSecretVerifier
from broker.clock import Clock, SystemClock
from broker.credentials import CredentialService, record_cache_event
from broker.errors import (
    InvalidClient,
    InvalidPolicy,
    InvalidRequest,
    OAuthError,
    ServerError,
    UnsupportedGrantType,
    render_error,
)
from broker.exchange import (
    GRANT_TYPE,
    REPEATABLE_PARAMETERS,
    SubjectTokenVerifier,
    TokenExchangeGrant,
)
from broker.introspection import Introspection
from broker.logs import (
    client_request_id,
    client_request_id_var,
    configure_logging,
    new_request_id,
    request_id_var,
)
from broker.metrics import BrokerMetrics
from broker.oauth_request import OAuthForm, read_form, read_form_or_json
from broker.openapi import OPENAPI_PATH, openapi_document
from broker.policy.access import require_admin
from broker.policy.loader import configured_names
from broker.policy.store import PolicyRejected, PolicyStore
from broker.policy.watch import PolicyWatcher
from broker.readiness import Readiness
from broker.revocation import RevocationEndpoints, Revocations
from broker.settings import SUPPORTED_JWS_ALGORITHMS, BrokerSettings
from broker.state import StateStore
from broker.state_factory import build_state_store
from broker.tokens import BrokerTokenVerifier, Keyring, TokenIssuer
from broker.tracing import SpanKind, StatusCode, Tracing, build_tracing, incoming_context
from idp_adapters.registry import build_identity_adapters, build_workload_verifiers
from secret_backends.registry import build_secret_backends

log = logging.getLogger("broker.http")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


@dataclass
class BrokerServices:
    """Everything the routes need, built once per process and passed in (no globals)."""

    settings: BrokerSettings
    clock: Clock
    http: httpx.AsyncClient
    keyring: Keyring
    policies: PolicyStore
    clients: ClientAuthenticator
    exchange: TokenExchangeGrant
    introspection: Introspection
    decisions: DecisionLog
    credentials: CredentialService
    cache: CredentialCache
    revocations: Revocations
    broker_tokens: BrokerTokenVerifier
    state: StateStore
    metrics: BrokerMetrics
    tracing: Tracing
    readiness: Readiness


SSO_HORIZON_SECONDS = 86400
"""How long after a person's revocation an SSO token or session from before it is still refused.
The broker does not bound SSO token lifetimes (IdPs issue them for minutes to an hour, sessions
last longer); a day covers them."""


def acceptance_window(settings: BrokerSettings) -> int:
    """How long after a time T something issued before T can still be accepted: a broker
    token, a client assertion or (`SSO_HORIZON_SECONDS`) an SSO token issued just before T, plus
    the largest clock leeway the broker grants anyone (person and agent revocation entries live
    this long after their not-before)."""
    tokens = settings.tokens
    leeways = [
        tokens.leeway_seconds,
        *(p.leeway_seconds for p in settings.identity_providers),
        *(w.leeway_seconds for w in settings.workload_issuers),
    ]
    lifetime = max(
        tokens.max_lifetime_seconds,
        tokens.client_assertion_max_lifetime_seconds,
        SSO_HORIZON_SECONDS,
    )
    return lifetime + max(leeways)


def build_services(
    settings: BrokerSettings,
    *,
    clock: Clock | None = None,
    decision_sinks: list[DecisionSink] | None = None,
    state: StateStore | None = None,
    http: httpx.AsyncClient | None = None,
    tracing: Tracing | None = None,
) -> BrokerServices:
    clock = clock or SystemClock()
    if settings.uses_development_components and not settings.allow_development_components:
        raise ValueError(
            "a development component (an identity provider of kind dev or a secret backend of "
            "kind file) is configured but allow_development_components is false; development "
            "components must never run in production"
        )
    http = http or httpx.AsyncClient(timeout=5.0, follow_redirects=False)
    tokens = settings.tokens
    keyring = Keyring(
        settings.signing_keys.directory,
        algorithm=settings.signing_keys.algorithm,
        clock=clock,
        publish_grace_seconds=tokens.max_lifetime_seconds + tokens.leeway_seconds,
        generate_if_missing=settings.signing_keys.generate_if_missing,
    )
    state = state or build_state_store(settings.state, clock)
    tracing = tracing or build_tracing(settings.tracing)
    metrics = BrokerMetrics()
    sinks = decision_sinks if decision_sinks is not None else build_sinks(settings.audit)
    decisions = DecisionLog(
        [*sinks, metrics],
        clock,
        signer=KeyringCheckpointSigner(keyring) if keeps_trail(sinks) else None,
        checkpoint_every=settings.audit.checkpoint_every_records,
        checkpoint_interval=settings.audit.checkpoint_interval_seconds,
    )
    policies = PolicyStore(
        settings.policy_dir,
        **configured_names(settings),
        decisions=decisions,
        clock=clock,
    )
    clients = ClientAuthenticator(
        policy=policies.current,
        replay=state,
        clock=clock,
        http=http,
        assertion_audiences=frozenset({settings.issuer, settings.token_endpoint}),
        assertion_max_lifetime=tokens.client_assertion_max_lifetime_seconds,
        leeway=tokens.leeway_seconds,
        secrets_verifier=BoundedSecretVerifier(
            workers=settings.client_authentication.secret_hash_workers or os.cpu_count() or 1,
            queue=settings.client_authentication.secret_hash_queue,
        ),
        throttle=FailedAuthThrottle(
            state,
            per_client_and_source=settings.client_authentication.failures_per_client_and_source,
            per_source=settings.client_authentication.failures_per_source,
            window_seconds=settings.client_authentication.failure_window_seconds,
            clock=clock,
        ),
    )
    revocations = Revocations(
        state,
        clock,
        decisions,
        max_token_lifetime=tokens.max_lifetime_seconds,
        acceptance_window=acceptance_window(settings),
    )
    broker_tokens = BrokerTokenVerifier(  # no leeway on expiry: its own tokens, its own clock
        keyring,
        settings.issuer,
        clock,
        skew=tokens.leeway_seconds,
        algorithms=tuple(sorted(SUPPORTED_JWS_ALGORITHMS)),
    )
    adapters = build_identity_adapters(
        settings.identity_providers,
        http,
        clock,
        allow_development=settings.allow_development_components,
        state=state,
    )
    workloads = build_workload_verifiers(settings.workload_issuers, http, clock)
    exchange = TokenExchangeGrant(
        subjects=SubjectTokenVerifier(
            adapters,
            broker_tokens,
            settings.issuer,
            max_bytes=max([p.max_token_bytes for p in settings.identity_providers], default=16384),
        ),
        workload_actors=WorkloadActorResolver(workloads, policies.current),
        policy=policies.current,
        issuer=TokenIssuer(keyring, settings.issuer, clock, max_bytes=broker_tokens.max_bytes),
        decisions=decisions,
        clock=clock,
        max_lifetime_seconds=tokens.max_lifetime_seconds,
        revocations=revocations,
        state=state,
        tracer=tracing.tracer,
    )
    introspection = Introspection(
        verifier=broker_tokens,
        policy=policies.current,
        decisions=decisions,
        revocations=revocations,
    )
    backends = build_secret_backends(
        settings.secret_backends, allow_development=settings.allow_development_components
    )
    cache = CredentialCache(
        backends,
        clock,
        max_entries=settings.credential_cache_max_entries,
        on_event=lambda event: record_cache_event(decisions, event, policies.current()),
    )
    credentials = CredentialService(
        verifier=broker_tokens,
        policy=policies.current,
        cache=cache,
        decisions=decisions,
        clock=clock,
        revocations=revocations,
        state=state,
    )
    metrics.bind(policies=policies, cache=cache, decisions=decisions)
    keyring.on_active_key_change(
        lambda previous, active, published: decisions.record(
            "signing_key.rotated",
            outcome="observed",
            previous_kid=previous,
            kid=active,
            published_kids=published,
        )
    )
    return BrokerServices(
        settings=settings,
        clock=clock,
        http=http,
        keyring=keyring,
        policies=policies,
        clients=clients,
        exchange=exchange,
        introspection=introspection,
        decisions=decisions,
        credentials=credentials,
        cache=cache,
        revocations=revocations,
        broker_tokens=broker_tokens,
        state=state,
        metrics=metrics,
        tracing=tracing,
        readiness=Readiness(
            policies=policies,
            keyring=keyring,
            backends=backends,
            state=state,
            state_kind=settings.state.kind,
            clock=clock,
            backend_check_interval=settings.readyz_backend_check_interval_seconds,
        ),
    )


def _error_response(
    err: OAuthError, settings: BrokerSettings, request_id: str | None = None
) -> JSONResponse:
    status, body, headers = render_error(err, expose_debug=settings.expose_error_debug)
    if request_id:
        headers["X-Request-Id"] = request_id
    if err.debug:
        log.info("request refused: %s (%s) debug=%s", err.error, err.reason, err.debug)
    return JSONResponse(body, status_code=status, headers=headers)


CLAIMED_CLIENT_ID_CHARS = 64


def claimed_client_id(headers: Mapping[str, str], form: Mapping[str, str] | None) -> str | None:
    """The client id an unauthenticated caller claimed (form ``client_id``, else the user part
    of HTTP Basic), cut to 64 characters; never the secret. Unverified: for the record only."""
    claimed = form.get("client_id") if form is not None else None
    if claimed is None:
        scheme, _, encoded = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and encoded:
            try:
                decoded = base64.b64decode(encoded.strip()[:512], validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError, ValueError):
                decoded = ""
            claimed = unquote(decoded.partition(":")[0]) or None
    return claimed[:CLAIMED_CLIENT_ID_CHARS] if claimed else None


def authorization_server_metadata(settings: BrokerSettings) -> dict[str, Any]:
    """RFC 8414 metadata."""
    issuer = settings.issuer
    return {
        "issuer": issuer,
        "token_endpoint": settings.token_endpoint,
        "jwks_uri": f"{issuer}/.well-known/jwks.json",
        "introspection_endpoint": f"{issuer}/oauth2/introspect",
        "revocation_endpoint": f"{issuer}/oauth2/revoke",
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "grant_types_supported": [GRANT_TYPE],
        "response_types_supported": [],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["ES256", "RS256", "PS256", "EdDSA"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "private_key_jwt"],
        "introspection_endpoint_auth_signing_alg_values_supported": [
            "ES256",
            "RS256",
            "PS256",
            "EdDSA",
        ],
        "service_documentation": "https://github.com/example/agent-identity-broker#readme",
        "openapi_uri": f"{issuer}{OPENAPI_PATH}",  # extension: the OpenAPI 3.1 description
    }


def create_app(settings: BrokerSettings, *, services: BrokerServices | None = None) -> FastAPI:
    services = services or build_services(settings)
    policy_watcher = PolicyWatcher(
        services.policies, interval=settings.policy_reload_interval_seconds
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        policy_watcher.start()
        policy_watcher.install_sighup_handler()
        yield
        await policy_watcher.stop()
        await services.cache.close()
        await services.http.aclose()
        await asyncio.to_thread(services.decisions.close)  # flush audit sinks (S3 batches)
        await asyncio.to_thread(services.tracing.shutdown)  # export buffered spans
        services.clients.close()

    app = FastAPI(
        title="Agent identity broker",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    app.state.policy_watcher = policy_watcher
    max_body = settings.http.max_body_bytes
    tracer = services.tracing.tracer
    traced = services.tracing.enabled

    @app.exception_handler(OAuthError)
    async def _oauth_error(request: Request, err: OAuthError) -> JSONResponse:
        return _error_response(err, settings, request_id_var.get())

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, __: RequestValidationError) -> JSONResponse:
        # Never echo the input back: it may hold a token.
        return _error_response(InvalidRequest("the request is malformed"), settings)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        body = {
            "error": "not_found" if exc.status_code == 404 else "invalid_request",
            "error_description": str(exc.detail),
        }
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error: %s", type(exc).__name__)  # no message: it may hold data
        # The POST endpoints record their own failures; what reaches here is a fixed GET path
        # (cut short all the same: the path is the caller's).
        route = getattr(request.scope.get("route"), "path", None) or request.url.path[:128]
        record_failure(route, exc, None, None, request)
        return _error_response(ServerError("internal error"), settings)


    trusted_proxies = [ipaddress.ip_network(p, strict=False) for p in settings.http.trusted_proxies]

    def _source(request: Request) -> str:
        """The caller's address (X-Forwarded-For only through `http.trusted_proxies`)."""
        peer = request.client.host if request.client else None
        return source_address(peer, request.headers.get("x-forwarded-for"), trusted_proxies)

    def _caller(
        request: Request, client: AuthenticatedClient | None, form: OAuthForm | None
    ) -> dict[str, Any]:
        """Who asked: the authenticated client, else only the client id it claimed (bounded,
        unverified) and the source address. Nothing else an unauthenticated caller sent is
        recorded."""
        if client is not None:
            return {"client_id": client.client_id, "client_kind": client.kind}
        return {
            "claimed_client_id": claimed_client_id(request.headers, form),
            "source": _source(request),
        }

    def record_refusal(
        route: str,
        err: OAuthError,
        client: AuthenticatedClient | None,
        request_id: str,
        request: Request,
        form: OAuthForm | None,
    ) -> None:
        """A refusal no domain handler recorded (failed client authentication, a malformed
        body, an admin call by a non-admin...): one ``request.denied`` record. Before the caller
        is authenticated it names the route template, the error and the claimed client id only
        (the description is the broker's own words, bounded like every record field)."""
        services.decisions.record(
            "request.denied",
            outcome="denied",
            route=route,
            **_caller(request, client, form),
            error=err.error,
            reason=err.reason,
            description=err.description,
            request_id=request_id,
            policy_version=services.policies.current().version,
        )

    def record_failure(
        route: str,
        exc: BaseException,
        client: AuthenticatedClient | None,
        request_id: str | None,
        request: Request,
        form: OAuthForm | None = None,
    ) -> None:
        """An unexpected failure (a 500): one ``request.failed`` record naming the route and the
        exception's type (never its message: it may hold data). When the trail itself cannot be
        written there is nothing more to do than log it."""
        try:
            services.decisions.record(
                "request.failed",
                outcome="failed",
                route=route,
                **_caller(request, client, form),
                error="server_error",
                reason="non_finite_value" if isinstance(exc, NonFiniteValue) else "unexpected",
                exception=type(exc).__name__,
                request_id=request_id,
            )
        except Exception as record_exc:
            log.error("a failed request could not be recorded: %s", type(record_exc).__name__)

    Handler = Callable[[Request, OAuthForm, AuthenticatedClient | None, str], Awaitable[dict]]

    def oauth_endpoint(
        handler: Handler,
        *,
        route: str,
        json_body: bool = False,
        repeatable: frozenset[str] = frozenset(),
    ) -> Callable[[Request], Awaitable[JSONResponse]]:
        """One shape for every authenticated POST: read the body (capped), authenticate the
        caller, run the domain handler, render an error in one place, never cache. Timed per
        route template (`route`, never the filled path) and status class."""

        span_name = f"POST {route}"

        async def endpoint(request: Request) -> JSONResponse:
            started = time.perf_counter()
            status = 500  # an unexpected exception is rendered as 500 by the app handler
            # Always the broker's own id; a caller's own X-Request-Id is recorded apart.
            request_id = new_request_id()
            request_id_token = request_id_var.set(request_id)  # every log line names it
            client_id_token = client_request_id_var.set(
                client_request_id(request.headers.get("x-request-id"))
            )
            with tracer.start_as_current_span(
                span_name,
                context=incoming_context(request.headers) if traced else None,
                kind=SpanKind.SERVER,
                attributes={"http.route": route, "broker.request_id": request_id},
            ) as span:
                try:
                    response = await handle(request, request_id)
                    try:  # answer nothing whose record is not yet durable (group commit)
                        await services.decisions.wait_durable()
                    except AuditUnavailable:
                        response = _error_response(
                            ServerError("the audit trail cannot be written; refusing"),
                            settings,
                            request_id,
                        )
                    status = response.status_code
                    return response
                finally:
                    services.metrics.observe_request(route, status, time.perf_counter() - started)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(StatusCode.ERROR)
                    request_id_var.reset(request_id_token)
                    client_request_id_var.reset(client_id_token)

        async def handle(request: Request, request_id: str) -> JSONResponse:
            client: AuthenticatedClient | None = None
            form: OAuthForm | None = None
            try:
                if json_body:
                    form = await read_form_or_json(request, max_bytes=max_body)
                else:
                    form = await read_form(request, max_bytes=max_body, repeatable=repeatable)
                with tracer.start_as_current_span("client authentication"):
                    client = await services.clients.authenticate(
                        request.headers, form, source=_source(request)
                    )
                body = await handler(request, form, client, request_id)
            except OAuthError as err:
                if recorded_request_var.get() != request_id:
                    record_refusal(route, err, client, request_id, request, form)
                return _error_response(err, settings, request_id)
            except AuditUnavailable:
                raise  # the trail cannot be written: nothing to record it in (the edge answers)
            except Exception as exc:  # every failed request leaves a record, then a plain 500
                log.error("unexpected error: %s", type(exc).__name__)
                record_failure(route, exc, client, request_id, request, form)
                message = (
                    "the decision could not be recorded faithfully (a non-finite number); refused"
                    if isinstance(exc, NonFiniteValue)
                    else "internal error"
                )
                return _error_response(ServerError(message), settings, request_id)
            return JSONResponse(body, headers={**_NO_STORE, "X-Request-Id": request_id})

        return endpoint

    # Endpoints are plain Starlette routes (Request -> Response): FastAPI's dependency solving
    # is not needed here and costs measurable time per request on the hot path.
    async def token(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        grant_type = form.non_empty("grant_type")
        if grant_type is None:
            raise InvalidRequest("grant_type is required")
        if grant_type != GRANT_TYPE:
            raise UnsupportedGrantType(f"only {GRANT_TYPE} is supported")
        return await services.exchange.handle(form, client, request_id=request_id)

    async def introspect(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        if client is None:
            raise InvalidClient("client authentication is required")
        return await services.introspection.handle(form, client, request_id=request_id)

    async def revoke(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await revocation.revoke_presented(form, client, request_id=request_id)

    async def admin_revoke(
        _: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await revocation.revoke_by_admin(form, client, request_id=request_id)

    async def fetch_credential(
        request: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        if client is None:  # record little before the caller is known: not the name it asked
            raise InvalidClient("gateway authentication is required")
        return await services.credentials.fetch(
            request.path_params["name"],
            form,
            client,
            version=request.query_params.get("version"),
            request_id=request_id,
        )

    async def refresh_credential(
        request: Request, form: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        return await services.credentials.refresh(
            request.path_params["name"], client, request_id=request_id
        )

    async def admin_policy_reload(
        _: Request, __: OAuthForm, client: AuthenticatedClient | None, request_id: str
    ) -> dict:
        admin = require_admin(services.policies.current(), client, "policy:reload")
        try:
            result = await policy_watcher.reload(trigger="admin", by=admin)
        except PolicyRejected as exc:
            raise InvalidPolicy(
                "policy rejected, previous version still serving: " + "; ".join(exc.problems),
                reason="policy_rejected",
            ) from None
        return {
            "version": result.version,
            "previous_version": result.previous_version,
            "changed": result.changed,
            "warnings": len(result.warnings),
        }

    revocation = RevocationEndpoints(
        services.revocations, services.broker_tokens, services.policies.current
    )
    metadata = authorization_server_metadata(settings)

    async def server_metadata(_: Request) -> JSONResponse:
        return JSONResponse(metadata)

    api_description = openapi_document(settings.issuer)

    async def openapi(_: Request) -> JSONResponse:
        return JSONResponse(api_description, headers={"Cache-Control": "max-age=300"})

    async def jwks(_: Request) -> JSONResponse:
        return JSONResponse(services.keyring.jwks(), headers={"Cache-Control": "max-age=300"})

    async def healthz(_: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_: Request) -> JSONResponse:
        ready, checks = await services.readiness.report()
        return JSONResponse(
            {"ready": ready, "checks": checks},
            status_code=200 if ready else 503,
            headers={"Cache-Control": "no-store"},
        )

    async def metrics(_: Request) -> Response:
        # Unauthenticated, like /healthz: serve it on an internal network only (see README).
        # Labels carry fixed codes, route templates and credential names; no tokens or people.
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    routes: list[tuple[str, Handler, dict[str, Any]]] = [
        ("/oauth2/token", token, {"repeatable": REPEATABLE_PARAMETERS}),
        ("/oauth2/introspect", introspect, {}),
        ("/oauth2/revoke", revoke, {}),
        ("/v1/admin/revocations", admin_revoke, {"json_body": True}),
        ("/v1/admin/policy/reload", admin_policy_reload, {"json_body": True}),
        ("/v1/credentials/{name}", fetch_credential, {"json_body": True}),
        ("/v1/admin/credentials/{name}/refresh", refresh_credential, {"json_body": True}),
    ]
    for path, handler, options in routes:
        app.add_route(path, oauth_endpoint(handler, route=path, **options), methods=["POST"])
    app.add_route("/.well-known/oauth-authorization-server", server_metadata, methods=["GET"])
    app.add_route("/.well-known/jwks.json", jwks, methods=["GET"])
    app.add_route(OPENAPI_PATH, openapi, methods=["GET"])
    app.add_route("/healthz", healthz, methods=["GET"])
    app.add_route("/readyz", readyz, methods=["GET"])
    app.add_route("/metrics", metrics, methods=["GET"])
    return app


def create_app_from_environment() -> FastAPI:
    """Factory for `uvicorn --factory` (several workers): config file from BROKER_CONFIG_FILE."""
    import os
    from pathlib import Path

    from broker.settings import load_settings

    config = os.environ.get("BROKER_CONFIG_FILE")
    settings = load_settings(Path(config) if config else None)
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings)

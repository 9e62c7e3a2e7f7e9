"""What every endpoint shares: one error renderer, one record of refusals and failures, and one
shape for authenticated POST endpoints (`Edge.oauth_endpoint`).

Endpoint families (`broker.endpoints.oauth`, `.credentials`, `.admin`, `.ops`, and the
approvals package) each build their routes from an `Edge`; `broker.app.create_app` only mounts
them.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from broker.audit import AuditUnavailable, NonFiniteValue, recorded_request_var
from broker.client_auth import AuthenticatedClient, source_address
from broker.errors import OAuthError, ServerError, render_error
from broker.logs import client_request_id, client_request_id_var, new_request_id, request_id_var
from broker.oauth_request import OAuthForm, read_form, read_form_or_json, read_json_document
from broker.services import BrokerServices
from broker.tracing import SpanKind, StatusCode, incoming_context

log = logging.getLogger("broker.http")

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
CLAIMED_CLIENT_ID_CHARS = 64

_JSON_ENCODER = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, indent=None, separators=(",", ":")
)


class CompactJSONResponse(JSONResponse):
    """Starlette's JSONResponse, rendered by one encoder built once (``json.dumps`` with these
    arguments builds a new one for every response)."""

    def render(self, content: Any) -> bytes:
        return _JSON_ENCODER.encode(content).encode("utf-8")


Handler = Callable[[Request, OAuthForm, AuthenticatedClient | None, str], Awaitable[dict]]
"""A domain handler behind `Edge.oauth_endpoint`: (request, form, authenticated client or None,
request id) -> the JSON body, or raise an `OAuthError`."""


@dataclass(frozen=True, slots=True)
class PostRoute:
    """An authenticated POST endpoint: `handler` behind `Edge.oauth_endpoint`."""

    path: str
    handler: Handler
    json_body: bool = False
    """Accept a JSON object as well as a form (the broker's own APIs; OAuth endpoints: forms)."""
    json_document: bool = False
    """Take a JSON object of any shape (a `JsonDocument`; usage reports), and nothing else."""
    repeatable: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True, slots=True)
class GetRoute:
    """A plain GET endpoint (metadata, keys, probes): no body, no client authentication."""

    path: str
    endpoint: Callable[[Request], Awaitable[Response]]


Routes = list[PostRoute | GetRoute]


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


class Edge:
    """The HTTP edge's shared behaviour, bound to one process's services."""

    def __init__(self, services: BrokerServices) -> None:
        self.services = services
        self.settings = services.settings
        self._trusted_proxies = [
            ipaddress.ip_network(p, strict=False) for p in self.settings.http.trusted_proxies
        ]
        self._max_body = self.settings.http.max_body_bytes
        self._tracer = services.tracing.tracer
        self._traced = services.tracing.enabled

    def error_response(self, err: OAuthError, request_id: str | None = None) -> JSONResponse:
        """The one rendering of an `OAuthError` (RFC 6749 §5.2 body, its status and headers)."""
        status, body, headers = render_error(err, expose_debug=self.settings.expose_error_debug)
        if request_id:
            headers["X-Request-Id"] = request_id
        if err.debug:
            log.info("request refused: %s (%s) debug=%s", err.error, err.reason, err.debug)
        return CompactJSONResponse(body, status_code=status, headers=headers)

    def source(self, request: Request) -> str:
        """The caller's address (X-Forwarded-For only through `http.trusted_proxies`)."""
        peer = request.client.host if request.client else None
        return source_address(peer, request.headers.get("x-forwarded-for"), self._trusted_proxies)

    def caller(
        self, request: Request, client: AuthenticatedClient | None, form: OAuthForm | None
    ) -> dict[str, Any]:
        """Who asked: the authenticated client, else only the client id it claimed (bounded,
        unverified) and the source address. Nothing else an unauthenticated caller sent is
        recorded."""
        if client is not None:
            return {"client_id": client.client_id, "client_kind": client.kind}
        return {
            "claimed_client_id": claimed_client_id(request.headers, form),
            "source": self.source(request),
        }

    def record_refusal(
        self,
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
        self.services.decisions.record(
            "request.denied",
            outcome="denied",
            route=route,
            **self.caller(request, client, form),
            error=err.error,
            reason=err.reason,
            description=err.description,
            request_id=request_id,
            policy_version=self.services.policies.current().version,
        )

    def record_failure(
        self,
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
            self.services.decisions.record(
                "request.failed",
                outcome="failed",
                route=route,
                **self.caller(request, client, form),
                error="server_error",
                reason="non_finite_value" if isinstance(exc, NonFiniteValue) else "unexpected",
                exception=type(exc).__name__,
                request_id=request_id,
            )
        except Exception as record_exc:
            log.error("a failed request could not be recorded: %s", type(record_exc).__name__)

    def unexpected(self, route: str, exc: BaseException, request: Request) -> JSONResponse:
        """What an exception no endpoint handled becomes: a log line naming its type (never its
        message: it may hold data), a ``request.failed`` record, a plain 500."""
        log.error("unexpected error: %s", type(exc).__name__)
        self.record_failure(route, exc, None, None, request)
        return self.error_response(ServerError("internal error"))

    def oauth_endpoint(self, route: PostRoute) -> Callable[[Request], Awaitable[JSONResponse]]:
        """One shape for every authenticated POST: read the body (capped), authenticate the
        caller, run the domain handler, render an error in one place, never cache, answer
        nothing whose record is not yet durable. Timed per route template (never the filled
        path) and status class."""
        services = self.services
        tracer = self._tracer
        traced = self._traced
        path = route.path
        handler = route.handler
        span_name = f"POST {path}"
        max_body = self._max_body

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
                attributes={"http.route": path, "broker.request_id": request_id},
            ) as span:
                try:
                    response = await handle(request, request_id)
                    try:  # answer nothing whose record is not yet durable (group commit)
                        await services.decisions.wait_durable()
                    except AuditUnavailable:
                        response = self.error_response(
                            ServerError("the audit trail cannot be written; refusing"),
                            request_id,
                        )
                    status = response.status_code
                    return response
                finally:
                    services.metrics.observe_request(path, status, time.perf_counter() - started)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(StatusCode.ERROR)
                    request_id_var.reset(request_id_token)
                    client_request_id_var.reset(client_id_token)

        async def handle(request: Request, request_id: str) -> JSONResponse:
            client: AuthenticatedClient | None = None
            form: OAuthForm | None = None
            try:
                if route.json_document:
                    form = await read_json_document(request, max_bytes=max_body)
                elif route.json_body:
                    form = await read_form_or_json(request, max_bytes=max_body)
                else:
                    form = await read_form(request, max_bytes=max_body, repeatable=route.repeatable)
                with tracer.start_as_current_span("client authentication"):
                    client = await services.clients.authenticate(
                        request.headers, form, source=self.source(request)
                    )
                body = await handler(request, form, client, request_id)
            except OAuthError as err:
                if recorded_request_var.get() != request_id:
                    self.record_refusal(path, err, client, request_id, request, form)
                return self.error_response(err, request_id)
            except AuditUnavailable:
                raise  # the trail cannot be written: nothing to record it in (the edge answers)
            except Exception as exc:  # every failed request leaves a record, then a plain 500
                log.error("unexpected error: %s", type(exc).__name__)
                self.record_failure(path, exc, client, request_id, request, form)
                message = (
                    "the decision could not be recorded faithfully (a non-finite number); refused"
                    if isinstance(exc, NonFiniteValue)
                    else "internal error"
                )
                return self.error_response(ServerError(message), request_id)
            return CompactJSONResponse(body, headers={**NO_STORE, "X-Request-Id": request_id})

        return endpoint

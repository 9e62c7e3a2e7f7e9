"""An example LLM gateway: agents call it with their broker-issued token, it calls the provider
with the organisation's key, fetched per call from the broker. The agent never sees the key.

```python
broker = GatewayClient(BROKER_URL, "llm-gateway", GATEWAY_SECRET)
provider = httpx.Client(base_url="https://api.openai.com", timeout=30)
app = create_gateway_app(GatewayConfig(credential="openai-api-key"), broker, provider)
```

Per call (``POST /v1/chat/completions``): the agent token comes from ``Authorization: Bearer``
(RFC 6750 §2.1); the provider request is sent with `GatewayClient.auth`, whose `httpx.Auth`
fetches the credential that token unlocks and sets the key. If the provider refuses the key
(401: it was just rotated and revoked), the auth reports the rejected version to the broker and
retries once with the newer one, so a rotation costs no failed call.

The agent gets the provider's answer, or an RFC 6750 style error (JSON ``error`` and
``error_description``, and ``WWW-Authenticate: Bearer`` on 401/403):

| broker or provider says | agent gets |
|---|---|
| no or malformed ``Authorization`` | 401 (no error code in the challenge, RFC 6750 §3.1) |
| ``invalid_token`` (bad, expired, revoked, not for this gateway) | 401 ``invalid_token`` |
| ``insufficient_scope`` | 403 ``insufficient_scope`` |
| ``access_denied`` (this gateway may not serve that credential) | 403 ``access_denied`` |
| ``too_many_requests`` | 429, ``Retry-After`` |
| ``temporarily_unavailable``, broker unreachable, credential missing | 503, ``Retry-After`` |
| ``invalid_client`` (the gateway's own secret is wrong) | 500 ``server_error`` |
| provider unreachable, or it still refuses the key after the retry | 502 ``bad_gateway`` |

Neither the key nor the agent token is ever logged or returned; logs carry the outcome, the
credential version and whether the call was retried.

The broker client is synchronous, so each call runs in Starlette's thread pool, never on the
event loop.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from broker.client import (
    BrokerClientError,
    CredentialAuth,
    GatewayClient,
    UsageRecord,
    UsageReporter,
)

__all__ = ["GatewayConfig", "create_gateway_app", "refusal_for"]

_UNSAFE_IN_HEADER = re.compile(r"[^\x20-\x21\x23-\x5b\x5d-\x7e]")
"""Characters RFC 6750 §3 does not allow in ``error_description`` (and ``"`` and ``\\``)."""
FORWARDED_RESPONSE_HEADERS = ("content-type", "x-request-id", "retry-after")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """What the gateway serves: one provider credential for a few provider paths."""

    credential: str = "openai-api-key"
    """The broker's name of the provider credential (policies/credentials.yaml)."""
    paths: tuple[str, ...] = ("/v1/chat/completions",)
    """Provider paths agents may call (``POST``); anything else is 404: not an open proxy."""
    realm: str = "llm-gateway"
    """The ``realm`` of the ``WWW-Authenticate`` challenge."""
    header: str = "Authorization"
    """The provider's API key header, and its `scheme` (None for a bare key)."""
    scheme: str | None = "Bearer"
    provider_name: str = "openai"
    """The provider as the broker's price table names it (usage reports)."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """An error answer for the agent (what it may see: no key, no token)."""

    status: int
    error: str
    description: str
    retry_after: float | None = None

    def response(self, realm: str, request_id: str) -> JSONResponse:
        headers = {"Cache-Control": "no-store", "X-Request-Id": request_id}
        if self.status in (401, 403):
            challenge = f'Bearer realm="{realm}"'
            if self.error in ("invalid_token", "insufficient_scope", "invalid_dpop_proof"):
                safe = _UNSAFE_IN_HEADER.sub(" ", self.description)[:200]
                challenge += f', error="{self.error}", error_description="{safe}"'
            headers["WWW-Authenticate"] = challenge
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, round(self.retry_after)))
        return JSONResponse(
            {"error": self.error, "error_description": self.description},
            status_code=self.status,
            headers=headers,
        )


def refusal_for(err: BrokerClientError) -> Refusal:
    """What the agent should get when the broker refused (or could not serve) the credential.

    A revoked or expired agent token is ``invalid_token`` (401), as RFC 6750 §3.1 defines it;
    only a token that is valid but lacks the permission (or is for a credential this gateway
    may not serve) is 403. Failures that are the gateway's or the store's, not the agent's, are
    5xx so the agent does not drop a token that is fine.
    """
    described = err.description or err.error
    if err.error in ("invalid_token", "invalid_dpop_proof"):
        return Refusal(401, err.error, described)
    if err.error == "insufficient_scope":
        return Refusal(403, "insufficient_scope", described)
    if err.error == "access_denied":
        return Refusal(403, "access_denied", described)
    if err.error == "too_many_requests" or err.status == 429:
        return Refusal(429, "too_many_requests", described, err.retry_after or 1.0)
    if err.error == "invalid_client":
        return Refusal(500, "server_error", "the gateway could not authenticate to the broker")
    if err.error in ("temporarily_unavailable", "not_found") or err.status >= 500:
        return Refusal(
            503,
            "temporarily_unavailable",
            "the provider credential cannot be served right now",
            err.retry_after or 1.0,
        )
    return Refusal(500, "server_error", "the gateway could not obtain the provider credential")


def _agent_token(request: Request) -> tuple[str, str | None] | None:
    """The token of ``Authorization: Bearer <token>`` (RFC 6750 §2.1), or of ``DPoP <token>``
    with the agent's ``DPoP`` proof (RFC 9449 §7.1: the broker checks it, made for this
    gateway, when it serves the credential); None when there is neither."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if not token or " " in token:
        return None
    if scheme.lower() == "bearer":
        return token, None
    proofs = request.headers.getlist("dpop")
    if scheme.lower() == "dpop" and len(proofs) == 1:
        return token, proofs[0]
    return None


def usage_of(
    config: GatewayConfig, token: str, auth: CredentialAuth, body: bytes, answer: bytes
) -> UsageRecord | None:
    """The usage record of a provider answer carrying OpenAI's ``usage`` (None without one)."""
    try:
        sent = json.loads(body) if body else {}
        received = json.loads(answer)
    except ValueError:
        return None
    usage = received.get("usage") if isinstance(received, dict) else None
    if not isinstance(usage, dict):
        return None
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    if not all(isinstance(n, int) and n >= 0 for n in (prompt, completion, cached)):
        return None
    model = received.get("model") or (sent.get("model") if isinstance(sent, dict) else None)
    return UsageRecord(
        call_id=uuid.uuid4().hex,
        agent_token=token,
        credential=config.credential,
        provider=config.provider_name,
        model=str(model or "unknown"),
        units={
            "input_tokens": max(prompt - cached, 0),
            "output_tokens": completion,
            "cached_tokens": cached,
        },
        usage_ref=auth.last_usage_ref,
    )


def create_gateway_app(
    config: GatewayConfig,
    broker: GatewayClient,
    provider: httpx.Client,
    *,
    logger: logging.Logger | None = None,
    usage: UsageReporter | None = None,
) -> FastAPI:
    """The gateway's ASGI app. `broker` fetches credentials (the gateway's own client
    credentials); `provider` is an `httpx.Client` with the provider's ``base_url`` (and its
    timeouts). Both stay open, owned by the caller. With `usage`, each answered call is
    reported to the broker (queued: the agent never waits for it)."""
    log = logger or logging.getLogger("broker.examples.gateway")
    app = FastAPI(title="Example LLM gateway", docs_url=None, redoc_url=None, openapi_url=None)

    def forward(
        path: str, token: str, proof: str | None, body: bytes, content_type: str | None
    ) -> tuple[httpx.Response, CredentialAuth]:
        auth = broker.auth(
            config.credential,
            token,
            header=config.header,
            scheme=config.scheme,
            dpop_proof=proof,  # the agent's, for this call: the broker checks it
        )
        headers = {"content-type": content_type} if content_type else {}
        response = provider.post(path, content=body, headers=headers, auth=auth)
        response.read()
        return response, auth

    async def call_provider(request: Request) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", request_id):
            request_id = uuid.uuid4().hex
        path = request.url.path
        presented = _agent_token(request)
        if presented is None:
            log.info("refused request_id=%s path=%s reason=no_agent_token", request_id, path)
            return Refusal(
                401,
                "invalid_request",
                "an agent token is required (Authorization: Bearer, or DPoP with its proof)",
            ).response(config.realm, request_id)
        token, proof = presented
        body = await request.body()
        started = time.perf_counter()
        try:
            upstream, auth = await run_in_threadpool(
                forward, path, token, proof, body, request.headers.get("content-type")
            )
        except BrokerClientError as err:
            refusal = refusal_for(err)
            level = logging.ERROR if refusal.status == 500 else logging.INFO
            log.log(
                level,
                "refused request_id=%s path=%s broker_status=%s broker_error=%s status=%s",
                request_id,
                path,
                err.status,
                err.error,
                refusal.status,
            )
            return refusal.response(config.realm, request_id)
        except httpx.TransportError as exc:
            log.warning(
                "provider unreachable request_id=%s path=%s error=%s",
                request_id,
                path,
                type(exc).__name__,
            )
            return Refusal(502, "bad_gateway", "the provider could not be reached").response(
                config.realm, request_id
            )
        elapsed_ms = (time.perf_counter() - started) * 1000
        fields = (request_id, path, upstream.status_code, auth.last_version, auth.retries)
        if upstream.status_code in (401, 403):
            # The provider refused the key the broker serves even after one retry: not the
            # agent's fault, and not something to pass on as "your token is bad".
            log.warning(
                "provider refused the credential request_id=%s path=%s provider_status=%s "
                "version=%s retried=%s",
                *fields,
            )
            return Refusal(
                502, "bad_gateway", "the provider refused the organisation's credential"
            ).response(config.realm, request_id)
        log.info(
            "called request_id=%s path=%s provider_status=%s version=%s retried=%s ms=%.1f",
            *fields,
            elapsed_ms,
        )
        headers = {
            name: upstream.headers[name]
            for name in FORWARDED_RESPONSE_HEADERS
            if name in upstream.headers
        }
        headers.setdefault("X-Request-Id", request_id)
        if usage is not None and upstream.status_code == 200:
            record = usage_of(config, token, auth, body, upstream.content)
            if record is not None:
                usage.submit(record)
        return Response(upstream.content, status_code=upstream.status_code, headers=headers)

    for path in _unique(config.paths):
        app.add_api_route(path, call_provider, methods=["POST"], include_in_schema=False)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def _unique(paths: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(paths))

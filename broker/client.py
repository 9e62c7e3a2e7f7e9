"""A small client for the broker's two kinds of callers (httpx only), synchronous and asyncio.

- `AgentClient` / `AsyncAgentClient`: an agent exchanges a person's token (or a broker token it
  holds) for a down-scoped agent token at ``POST /oauth2/token`` (RFC 8693), keeps it until
  shortly before it expires, and re-exchanges it for a sub-agent (`delegate`, run as the
  sub-agent).
- `GatewayClient` / `AsyncGatewayClient`: a gateway fetches a provider credential per call at
  ``POST /v1/credentials/{name}``, unlocked by the agent token it received, and can hand httpx
  an `httpx.Auth` that sets the current provider key on each outgoing provider request
  (`CredentialAuth` for an `httpx.Client`, `AsyncCredentialAuth` for an `httpx.AsyncClient`).

The sync and async classes share every request they build and every response they parse; they
differ only in how the bytes travel.

Rotation with a provider that revokes the old key at once: when the provider answers 401 to a
key, `CredentialAuth` fetches again telling the broker which version was rejected
(``rejected_version``), and if the broker now serves a newer version it retries the provider
call once with it (as AWS SDKs refresh expired credentials and retry). The broker re-reads its
store for such a hint only when it names the version it holds, at most once a second per
credential, so the retry never turns into a storm against the store.

Errors are `BrokerClientError`, built from the broker's RFC 6749 JSON error body. No message or
``repr`` ever contains a token, a client secret or a credential value. Transport failures
(`httpx.TransportError`) propagate unchanged, except inside `CredentialAuth`: there the caller
of a provider request could not tell the broker's failure from the provider's, so a broker that
cannot be reached raises `BrokerUnavailable`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import threading
import time
from collections.abc import (
    AsyncGenerator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import Any, Self

import httpx

from broker.client_usage import (
    AsyncUsageReporter,
    UsageRecord,
    UsageReporter,
    UsageResult,
    usage_body,
    usage_results,
)
from broker.dpop import DPoPKey

__all__ = [
    "ACCESS_TOKEN",
    "ID_TOKEN",
    "JWT",
    "AgentClient",
    "AgentToken",
    "ApprovalDenied",
    "ApprovalExpired",
    "ApprovalRequest",
    "ApprovalTimeout",
    "AsyncAgentClient",
    "AsyncCredentialAuth",
    "AsyncGatewayClient",
    "AsyncUsageReporter",
    "BrokerClientError",
    "BrokerUnavailable",
    "Credential",
    "CredentialAuth",
    "GatewayClient",
    "UsageRecord",
    "UsageReporter",
    "UsageResult",
]

TOKEN_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"  # noqa: S105
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105
ACCESS_TOKEN = "urn:ietf:params:oauth:token-type:access_token"  # noqa: S105
JWT = "urn:ietf:params:oauth:token-type:jwt"
CIBA = "urn:openid:params:grant-type:ciba"
DEFAULT_TIMEOUT = 10.0


class BrokerClientError(Exception):
    """The broker refused a request: `error` is the RFC 6749 / RFC 6750 error code.

    `retry_after` is the broker's ``Retry-After`` in seconds (429 and 503 answers), if any.
    """

    def __init__(
        self,
        error: str,
        description: str | None,
        status: int,
        *,
        retry_after: float | None = None,
    ) -> None:
        self.error = error
        self.description = description
        self.status = status
        self.retry_after = retry_after
        super().__init__(f"{status} {error}" + (f": {description}" if description else ""))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(error={self.error!r}, description={self.description!r}, "
            f"status={self.status})"
        )


class BrokerUnavailable(BrokerClientError):
    """`CredentialAuth` could not reach the broker (connection refused, timeout, ...).

    Its ``error`` is ``temporarily_unavailable`` and its ``status`` 503, as if the broker had
    said so; ``__cause__`` is the `httpx.TransportError`.
    """

    def __init__(self, description: str) -> None:
        super().__init__("temporarily_unavailable", description, 503, retry_after=1.0)


class ApprovalDenied(BrokerClientError):
    """An approver denied the request (CIBA ``access_denied``)."""


class ApprovalExpired(BrokerClientError):
    """Nobody decided before the request expired (CIBA ``expired_token``); ask again."""


class ApprovalTimeout(BrokerClientError):
    """`request_approval` stopped waiting (its own `timeout`) before anyone decided. The
    request still stands at the broker until it expires: `wait_for_approval` can resume."""

    def __init__(self, description: str) -> None:
        super().__init__("timeout", description, 0)


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """An approval request the broker accepted (OpenID CIBA): poll it with
    `wait_for_approval`. `auth_req_id` redeems the approval once: keep it like a secret."""

    auth_req_id: str = field(repr=False)
    expires_at: float
    """Seconds since the epoch, after which the broker answers ``expired_token``."""
    interval: float
    """Seconds between polls (grows by 5 on every ``slow_down``)."""


@dataclass(frozen=True, slots=True)
class AgentToken:
    """An issued agent token. `expires_at` is seconds since the epoch (conservative)."""

    access_token: str = field(repr=False)
    scope: str
    expires_at: float
    issued_token_type: str
    token_type: str = "Bearer"  # noqa: S105 - a token type, not a secret
    """``DPoP`` when the token is bound to the agent's key: present it with a proof
    (`AgentClient.headers_for`)."""

    @property
    def scopes(self) -> tuple[str, ...]:
        return tuple(self.scope.split())


@dataclass(frozen=True, slots=True)
class Credential:
    """A provider credential as served to a gateway. `value` is None for a structured secret
    (then `fields` holds it); neither appears in the ``repr``."""

    name: str
    value: str | None = field(repr=False)
    version: str
    refresh_in: float | None
    served_for: Mapping[str, Any]
    stage: str | None = None
    stale: bool = False
    fields: Mapping[str, str] | None = field(default=None, repr=False)
    usage_ref: str | None = None
    """The budget reservation this fetch holds: name it in the call's usage report."""


def _space_list(value: str | Iterable[str] | None) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return " ".join(value.split()) or None
    return " ".join(value) or None


def _audiences(value: str | Iterable[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    error, description = "server_error", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        error = body["error"]
        if isinstance(body.get("error_description"), str):
            description = body["error_description"]
    else:
        description = f"unexpected response from the broker (HTTP {response.status_code})"
    raise BrokerClientError(
        error, description, response.status_code, retry_after=_retry_after(response)
    )


def _retry_after(response: httpx.Response) -> float | None:
    """``Retry-After`` as delta-seconds (the broker sends no HTTP dates)."""
    value = response.headers.get("retry-after", "").strip()
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


def _json_object(response: httpx.Response) -> dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise BrokerClientError(
            "invalid_response", "the broker's response is not a JSON object", response.status_code
        )
    return body


# ------------------------------------------------------------------ requests and responses
# Shared by the sync and async clients: what is sent and how an answer is read.

CacheKey = tuple[str, str, str | None, tuple[str, ...]]


def _exchange_form(
    subject_token: str, subject_token_type: str, scope: str | None, audiences: tuple[str, ...]
) -> dict[str, str | list[str]]:
    form: dict[str, str | list[str]] = {
        "grant_type": TOKEN_EXCHANGE,
        "subject_token": subject_token,
        "subject_token_type": subject_token_type,
    }
    if scope is not None:
        form["scope"] = scope
    if audiences:
        form["audience"] = list(audiences)  # repeated parameter
    return form


def _agent_token(response: httpx.Response, started: float, scope: str | None) -> AgentToken:
    _raise_for_error(response)
    body = _json_object(response)
    try:
        return AgentToken(
            access_token=str(body["access_token"]),
            scope=str(body.get("scope") or scope or ""),
            expires_at=started + float(body["expires_in"]),
            issued_token_type=str(body.get("issued_token_type") or ACCESS_TOKEN),
            token_type=str(body.get("token_type") or "Bearer"),
        )
    except (KeyError, TypeError, ValueError):
        raise BrokerClientError(
            "invalid_response", "the token response lacks access_token or expires_in", 200
        ) from None


def _token_text(agent_token: AgentToken | str) -> str:
    return agent_token.access_token if isinstance(agent_token, AgentToken) else agent_token


def _approval_form(
    subject_token: str,
    subject_token_type: str,
    scope: str | None,
    audiences: tuple[str, ...],
    binding_message: str | None,
    authorization_details: list[dict[str, Any]] | None,
    requested_expiry: int | None,
) -> dict[str, str | list[str]]:
    form = _exchange_form(subject_token, subject_token_type, scope, audiences)
    del form["grant_type"]
    if binding_message is not None:
        form["binding_message"] = binding_message
    if authorization_details is not None:
        form["authorization_details"] = json.dumps(authorization_details, separators=(",", ":"))
    if requested_expiry is not None:
        form["requested_expiry"] = str(int(requested_expiry))
    return form


def _approval_request(response: httpx.Response, started: float) -> ApprovalRequest:
    _raise_for_error(response)
    body = _json_object(response)
    try:
        return ApprovalRequest(
            auth_req_id=str(body["auth_req_id"]),
            expires_at=started + float(body["expires_in"]),
            interval=max(1.0, float(body.get("interval") or 5)),
        )
    except (KeyError, TypeError, ValueError):
        raise BrokerClientError(
            "invalid_response", "the answer lacks auth_req_id or expires_in", 200
        ) from None


def _poll_form(request: ApprovalRequest) -> dict[str, str]:
    return {"grant_type": CIBA, "auth_req_id": request.auth_req_id}


def _poll_outcome(response: httpx.Response, started: float, interval: float) -> AgentToken | float:
    """The token once approved; otherwise the interval to wait before the next poll
    (``slow_down`` adds 5 seconds, as CIBA says); raises on a final refusal."""
    if response.is_success:
        return _agent_token(response, started, None)
    try:
        _raise_for_error(response)
    except BrokerClientError as refused:
        if refused.error == "authorization_pending":
            return interval
        if refused.error == "slow_down":
            return interval + 5
        if refused.error == "access_denied":
            raise ApprovalDenied(refused.error, refused.description, refused.status) from None
        if refused.error == "expired_token":
            raise ApprovalExpired(refused.error, refused.description, refused.status) from None
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def _next_poll_at(now: float, wait: float, request: ApprovalRequest, deadline: float) -> float:
    """When to poll next; raises `ApprovalTimeout` past our own deadline (the broker's
    expiry is left to the broker to say)."""
    at = now + wait
    if at > deadline:
        raise ApprovalTimeout("stopped waiting for the approval (timeout)")
    return at


def _credential_form(
    agent_token: AgentToken | str, rejected_version: str | None, dpop_method: str | None = None
) -> dict:
    form = {"token": _token_text(agent_token)}
    if rejected_version is not None:
        form["rejected_version"] = rejected_version
    if dpop_method is not None:
        form["dpop_method"] = dpop_method
    return form


def _subject_proof_form(subject_proof: str | None) -> dict[str, str] | None:
    """The parent agent's proof for a bound parent token (RFC 9449, re-exchange)."""
    return {"subject_token_dpop": subject_proof} if subject_proof is not None else None


def _forwarded_proof(dpop_proof: str | None) -> dict[str, str] | None:
    """The agent's DPoP proof, forwarded by the gateway for a bound agent token."""
    return {"DPoP": dpop_proof} if dpop_proof is not None else None


def _asks_for_nonce(response: httpx.Response) -> bool:
    """RFC 9449 §8: the server wants its nonce in the proof (a retry with it follows)."""
    if response.status_code not in (400, 401) or "dpop-nonce" not in response.headers:
        return False
    try:
        return response.json().get("error") == "use_dpop_nonce"
    except ValueError:
        return False


def _credential(response: httpx.Response, credential: str) -> Credential:
    _raise_for_error(response)
    body = _json_object(response)
    try:
        refresh_in = body.get("refresh_in")
        fields = body.get("fields")
        return Credential(
            name=str(body.get("credential") or credential),
            value=body.get("value"),
            version=str(body["version"]),
            refresh_in=float(refresh_in) if refresh_in is not None else None,
            served_for=dict(body.get("served_for") or {}),
            stage=body.get("stage"),
            stale=bool(body.get("stale")),
            fields=dict(fields) if isinstance(fields, dict) else None,
            usage_ref=body.get("usage_ref") if isinstance(body.get("usage_ref"), str) else None,
        )
    except (KeyError, TypeError, ValueError):
        raise BrokerClientError(
            "invalid_response", "the credential response lacks a version", 200
        ) from None


class _TokenCache:
    """Agent tokens by (SHA-256 of the subject token, its type, scope, audiences), served while
    they have more than `margin` seconds left. Thread-safe; no I/O under the lock."""

    def __init__(self, margin: float, clock: Callable[[], float]) -> None:
        self.margin = margin
        self._clock = clock
        self._tokens: dict[CacheKey, AgentToken] = {}
        self._lock = threading.Lock()

    @staticmethod
    def key(
        subject_token: str, subject_token_type: str, scope: str | None, audiences: tuple[str, ...]
    ) -> CacheKey:
        digest = hashlib.sha256(subject_token.encode()).hexdigest()
        return (digest, subject_token_type, scope, audiences)

    def fresh(self, key: CacheKey) -> AgentToken | None:
        with self._lock:
            cached = self._tokens.get(key)
        if cached is not None and cached.expires_at - self.margin > self._clock():
            return cached
        return None

    def put(self, key: CacheKey, token: AgentToken) -> None:
        with self._lock:
            now = self._clock()
            for stale_key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
                del self._tokens[stale_key]
            self._tokens[key] = token

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


class _ProviderHeader:
    """What both `httpx.Auth` flavours do besides I/O: set the header, count, refuse
    structured secrets, translate an unreachable broker."""

    def __init__(
        self,
        credential: str,
        agent_token: AgentToken | str,
        header: str,
        scheme: str | None,
        retry_statuses: Collection[int],
    ) -> None:
        self._credential = credential
        self._agent_token = agent_token
        self._header = header
        self._scheme = scheme
        self._retry_statuses = frozenset(retry_statuses)
        self._lock = threading.Lock()
        self.retries = 0
        self.last_version: str | None = None
        self.last_usage_ref: str | None = None
        """The ``usage_ref`` of the credential last set (report it with the call's usage)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(credential={self._credential!r}, header={self._header!r})"

    def _usable(self, fetched: Credential) -> Credential:
        if fetched.value is None:
            raise BrokerClientError(
                "invalid_request",
                f"credential {self._credential!r} is structured; it has no single value",
                200,
            )
        return fetched

    @staticmethod
    def _unreachable(exc: httpx.TransportError) -> BrokerUnavailable:
        return BrokerUnavailable(f"the broker could not be reached ({type(exc).__name__})")

    def _should_retry(self, response: httpx.Response) -> bool:
        return response.status_code in self._retry_statuses

    def _count_retry(self) -> None:
        with self._lock:
            self.retries += 1

    def _set(self, request: httpx.Request, fetched: Credential) -> None:
        assert fetched.value is not None
        request.headers[self._header] = (
            f"{self._scheme} {fetched.value}" if self._scheme else fetched.value
        )
        self.last_version = fetched.version
        self.last_usage_ref = fetched.usage_ref


class _AgentIdentity:
    """What both agent clients hold besides their HTTP client: who the agent is, its cache."""

    broker_url: str

    def _init_agent(
        self,
        client_id: str,
        client_secret: str,
        refresh_margin_seconds: float,
        clock: Callable[[], float],
        dpop: DPoPKey | bool,
    ) -> None:
        self.client_id = client_id
        self._auth = httpx.BasicAuth(client_id, client_secret)
        self._clock = clock
        self._tokens = _TokenCache(refresh_margin_seconds, clock)
        self.dpop_key: DPoPKey | None = DPoPKey() if dpop is True else (dpop or None)
        """The agent's DPoP key (RFC 9449): tokens are bound to it. None: bearer tokens."""
        self._dpop_nonce: str | None = None

    @property
    def token_endpoint(self) -> str:
        return f"{self.broker_url}/oauth2/token"

    def _token_headers(self) -> dict[str, str]:
        """A fresh DPoP proof for a token request, with the broker's latest nonce."""
        if self.dpop_key is None:
            return {}
        return {"DPoP": self.dpop_key.proof("POST", self.token_endpoint, nonce=self._dpop_nonce)}

    def _retry_with_nonce(self, response: httpx.Response) -> bool:
        """Remember the broker's DPoP nonce; True when the request should be sent again."""
        nonce = response.headers.get("dpop-nonce")
        if nonce:
            self._dpop_nonce = nonce
        return self.dpop_key is not None and _asks_for_nonce(response)

    def delegation_proof(self, agent_token: AgentToken | str) -> str:
        """A proof by this agent's key that lets a sub-agent re-exchange `agent_token` (bound
        to this key): hand it over with the token (``subject_token_dpop``; one use, fresh for
        a minute)."""
        if self.dpop_key is None:
            raise ValueError("this client has no DPoP key; its tokens are bearer tokens")
        return self.dpop_key.proof(
            "POST", self.token_endpoint, access_token=_token_text(agent_token)
        )

    def headers_for(self, method: str, url: str, agent_token: AgentToken | str) -> dict[str, str]:
        """The headers that present `agent_token` on a call to a tool or gateway: ``Bearer``,
        or for a bound token ``DPoP`` with a fresh proof for this method and URL."""
        token = _token_text(agent_token)
        bound = isinstance(agent_token, AgentToken) and agent_token.token_type == "DPoP"  # noqa: S105
        if self.dpop_key is None or (isinstance(agent_token, AgentToken) and not bound):
            return {"Authorization": f"Bearer {token}"}
        return {
            "Authorization": f"DPoP {token}",
            "DPoP": self.dpop_key.proof(method, url, access_token=token),
        }

    @property
    def refresh_margin_seconds(self) -> float:
        return self._tokens.margin

    def forget(self) -> None:
        """Drop every cached token (for example after a revocation)."""
        self._tokens.clear()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(broker_url={self.broker_url!r}, client_id={self.client_id!r})"
        )


class _GatewayIdentity:
    """What both gateway clients hold besides their HTTP client: who the gateway is."""

    broker_url: str

    def _init_gateway(self, gateway_id: str, gateway_secret: str) -> None:
        self.gateway_id = gateway_id
        self._auth = httpx.BasicAuth(gateway_id, gateway_secret)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(broker_url={self.broker_url!r}, gateway_id={self.gateway_id!r})"
        )


# ------------------------------------------------------------------------------- sync clients


class _HttpOwner:
    """Holds an `httpx.Client`: the caller's (left open) or our own (closed by `close`)."""

    def __init__(self, broker_url: str, http: httpx.Client | None) -> None:
        self.broker_url = broker_url.rstrip("/")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.Client(timeout=DEFAULT_TIMEOUT)

    def close(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AgentClient(_AgentIdentity, _HttpOwner):
    """Token exchange for one agent (an OAuth client with ``client_secret_basic``).

    Tokens are cached per (subject token, scope, audience) and reused until
    `refresh_margin_seconds` before they expire; the cache keys on a SHA-256 of the subject
    token, never the token itself. Thread-safe. Pass `http` to share a configured
    `httpx.Client` (TLS, proxies, event hooks); it is then left open by `close`.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        client_secret: str,
        *,
        http: httpx.Client | None = None,
        refresh_margin_seconds: float = 30,
        clock: Callable[[], float] = time.time,
        dpop: DPoPKey | bool = False,
    ) -> None:
        super().__init__(broker_url, http)
        self._init_agent(client_id, client_secret, refresh_margin_seconds, clock, dpop)

    def exchange(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        extra: Mapping[str, str] | None = None,
    ) -> AgentToken:
        """An agent token for `subject_token`, from the cache while it has more than
        `refresh_margin_seconds` left, otherwise from the broker."""
        scope_text, audiences = _space_list(scope), _audiences(audience)
        key = _TokenCache.key(subject_token, subject_token_type, scope_text, audiences)
        cached = self._tokens.fresh(key)
        if cached is not None:
            return cached
        started = self._clock()
        form = _exchange_form(subject_token, subject_token_type, scope_text, audiences)
        response = self._post_token({**form, **(extra or {})})
        token = _agent_token(response, started, scope_text)
        self._tokens.put(key, token)
        return token

    def _post_token(self, form: Mapping[str, Any]) -> httpx.Response:
        """POST to the token endpoint, with a DPoP proof when the agent has a key (and once
        more with the broker's nonce when it asks for one)."""
        for _ in range(2):
            response = self._http.post(
                self.token_endpoint, data=form, auth=self._auth, headers=self._token_headers()
            )
            if not self._retry_with_nonce(response):
                break
        return response

    def delegate(
        self,
        agent_token: AgentToken | str,
        *,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        subject_proof: str | None = None,
    ) -> AgentToken:
        """Re-exchange a parent agent's token as this (sub-)agent: the result carries a nested
        ``act`` and can only narrow the parent's scope and audience. A parent token bound to
        the parent's key (DPoP) needs `subject_proof` (the parent's `delegation_proof`), and
        this client's own key binds the result."""
        return self.exchange(
            _token_text(agent_token),
            ACCESS_TOKEN,
            scope=scope,
            audience=audience,
            extra=_subject_proof_form(subject_proof),
        )

    def ask_approval(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        binding_message: str | None = None,
        authorization_details: list[dict[str, Any]] | None = None,
        requested_expiry: int | None = None,
    ) -> ApprovalRequest:
        """Ask for what the policy grants only with a person's approval (OpenID CIBA
        backchannel authentication). The subject is presented as for `exchange`."""
        started = self._clock()
        response = self._http.post(
            f"{self.broker_url}/oauth2/bc-authorize",
            data=_approval_form(
                subject_token,
                subject_token_type,
                _space_list(scope),
                _audiences(audience),
                binding_message,
                authorization_details,
                requested_expiry,
            ),
            auth=self._auth,
        )
        return _approval_request(response, started)

    def wait_for_approval(
        self,
        request: ApprovalRequest,
        *,
        timeout: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> AgentToken:
        """Poll at the interval the broker asks (slowing down when told) until the request is
        approved (the token), denied (`ApprovalDenied`), expired (`ApprovalExpired`), or
        `timeout` seconds pass (`ApprovalTimeout`)."""
        deadline = self._clock() + timeout if timeout is not None else math.inf
        interval = request.interval
        next_at = _next_poll_at(self._clock(), interval, request, deadline)
        while True:
            sleep(max(0.0, next_at - self._clock()))
            started = self._clock()
            response = self._post_token(_poll_form(request))
            outcome = _poll_outcome(response, started, interval)
            if isinstance(outcome, AgentToken):
                return outcome
            interval = outcome
            next_at = _next_poll_at(self._clock(), interval, request, deadline)

    def request_approval(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        binding_message: str | None = None,
        authorization_details: list[dict[str, Any]] | None = None,
        requested_expiry: int | None = None,
        timeout: float | None = None,
    ) -> AgentToken:
        """`ask_approval`, then `wait_for_approval`: the token once someone approves."""
        request = self.ask_approval(
            subject_token,
            subject_token_type,
            scope,
            audience,
            binding_message=binding_message,
            authorization_details=authorization_details,
            requested_expiry=requested_expiry,
        )
        return self.wait_for_approval(request, timeout=timeout)


class GatewayClient(_GatewayIdentity, _HttpOwner):
    """Credential fetches for one gateway (``client_secret_basic``). Fetch on every provider
    call: the broker serves from its in-memory cache and picks up rotations for you."""

    def __init__(
        self,
        broker_url: str,
        gateway_id: str,
        gateway_secret: str,
        *,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(broker_url, http)
        self._init_gateway(gateway_id, gateway_secret)

    def fetch(
        self,
        credential: str,
        agent_token: AgentToken | str,
        *,
        version: str | None = None,
        rejected_version: str | None = None,
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> Credential:
        """The credential `credential` for the agent call authorised by `agent_token`;
        `version="previous"` asks for the version before the last rotation (grace period).

        A DPoP-bound agent token (``Authorization: DPoP``) unlocks a credential only with the
        agent's own proof for the call it made to this gateway: forward its ``DPoP`` header as
        `dpop_proof`, and the call's method as `dpop_method` when it is not POST.

        `rejected_version`: the version the provider just refused. The broker then checks its
        store for a newer one (only if that is the version it holds, at most once a second per
        credential) and answers with whatever is current; a result with the same version means
        there is nothing newer, so the refusal is not a rotation.
        """
        response = self._http.post(
            f"{self.broker_url}/v1/credentials/{credential}",
            params={"version": version} if version else None,
            data=_credential_form(agent_token, rejected_version, dpop_method),
            auth=self._auth,
            headers=_forwarded_proof(dpop_proof),
        )
        return _credential(response, credential)

    def report_usage(self, records: Sequence[UsageRecord]) -> list[UsageResult]:
        """Report provider calls (``POST /v1/usage``, at most 100): one result per record. For
        reporting that never holds up the provider call, use a `UsageReporter`."""
        response = self._http.post(
            f"{self.broker_url}/v1/usage", json=usage_body(records), auth=self._auth
        )
        _raise_for_error(response)
        return usage_results(_json_object(response))

    def auth(
        self,
        credential: str,
        agent_token: AgentToken | str,
        *,
        header: str = "Authorization",
        scheme: str | None = "Bearer",
        retry_statuses: Collection[int] = (401,),
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> CredentialAuth:
        """An `httpx.Auth` for provider requests made with an `httpx.Client`: each request
        fetches `credential` (per call) and carries it as ``header: scheme value``; a provider
        answer in `retry_statuses` is reported to the broker and retried once with a newer
        version, if there is one (pass ``()`` to turn that off)."""
        return CredentialAuth(
            self,
            credential,
            agent_token,
            header=header,
            scheme=scheme,
            retry_statuses=retry_statuses,
            dpop_proof=dpop_proof,
            dpop_method=dpop_method,
        )


class CredentialAuth(_ProviderHeader, httpx.Auth):
    """Sets a freshly fetched provider credential on each outgoing request (sync clients).

    When the provider answers with a status in `retry_statuses` (401: the key was refused, as a
    provider does at once for a revoked key), the broker is asked again with
    ``rejected_version`` set to the version just used; if it serves a newer version, the
    request is sent once more with it, otherwise the provider's answer is returned as it is.
    The request body is buffered so it can be sent twice. `retries` counts the retried
    requests and `last_version` is the version carried by the latest request (both for logs
    and metrics; neither is secret).
    """

    requires_request_body = True

    def __init__(
        self,
        gateway: GatewayClient,
        credential: str,
        agent_token: AgentToken | str,
        *,
        header: str = "Authorization",
        scheme: str | None = "Bearer",
        retry_statuses: Collection[int] = (401,),
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> None:
        super().__init__(credential, agent_token, header, scheme, retry_statuses)
        self._gateway = gateway
        self._dpop = {"dpop_proof": dpop_proof, "dpop_method": dpop_method}

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        fetched = self._fetch(None)
        self._set(request, fetched)
        response = yield request
        if not self._should_retry(response):
            return
        newer = self._fetch(fetched.version)
        if newer.version == fetched.version:
            return  # nothing newer: the refusal is not a rotation, the caller gets it as is
        self._count_retry()
        self._set(request, newer)
        yield request

    def _fetch(self, rejected_version: str | None) -> Credential:
        try:
            fetched = self._gateway.fetch(
                self._credential, self._agent_token, rejected_version=rejected_version, **self._dpop
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._usable(fetched)


# ------------------------------------------------------------------------------ async clients


class _AsyncHttpOwner:
    """Holds an `httpx.AsyncClient`: the caller's (left open) or our own (closed by `aclose`)."""

    def __init__(self, broker_url: str, http: httpx.AsyncClient | None) -> None:
        self.broker_url = broker_url.rstrip("/")
        self._owns_http = http is None
        self._http = http if http is not None else httpx.AsyncClient(timeout=DEFAULT_TIMEOUT)

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class AsyncAgentClient(_AgentIdentity, _AsyncHttpOwner):
    """`AgentClient` for asyncio agents: the same cache, requests and errors, awaited.

    Concurrent `exchange` calls for the same (subject token, scope, audience) share one request
    to the broker.
    """

    def __init__(
        self,
        broker_url: str,
        client_id: str,
        client_secret: str,
        *,
        http: httpx.AsyncClient | None = None,
        refresh_margin_seconds: float = 30,
        clock: Callable[[], float] = time.time,
        dpop: DPoPKey | bool = False,
    ) -> None:
        super().__init__(broker_url, http)
        self._init_agent(client_id, client_secret, refresh_margin_seconds, clock, dpop)
        self._in_flight: dict[CacheKey, asyncio.Future[AgentToken]] = {}

    async def exchange(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        extra: Mapping[str, str] | None = None,
    ) -> AgentToken:
        """An agent token for `subject_token` (see `AgentClient.exchange`)."""
        scope_text, audiences = _space_list(scope), _audiences(audience)
        key = _TokenCache.key(subject_token, subject_token_type, scope_text, audiences)
        cached = self._tokens.fresh(key)
        if cached is not None:
            return cached
        pending = self._in_flight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AgentToken] = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            started = self._clock()
            form = _exchange_form(subject_token, subject_token_type, scope_text, audiences)
            response = await self._post_token({**form, **(extra or {})})
            token = _agent_token(response, started, scope_text)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning if nobody waited
            raise
        finally:
            del self._in_flight[key]
        self._tokens.put(key, token)
        future.set_result(token)
        return token

    async def delegate(
        self,
        agent_token: AgentToken | str,
        *,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        subject_proof: str | None = None,
    ) -> AgentToken:
        """Re-exchange a parent agent's token as this (sub-)agent (see `AgentClient.delegate`)."""
        return await self.exchange(
            _token_text(agent_token),
            ACCESS_TOKEN,
            scope=scope,
            audience=audience,
            extra=_subject_proof_form(subject_proof),
        )

    async def _post_token(self, form: Mapping[str, Any]) -> httpx.Response:
        """See `AgentClient._post_token`."""
        for _ in range(2):
            response = await self._http.post(
                self.token_endpoint, data=form, auth=self._auth, headers=self._token_headers()
            )
            if not self._retry_with_nonce(response):
                break
        return response

    async def ask_approval(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        binding_message: str | None = None,
        authorization_details: list[dict[str, Any]] | None = None,
        requested_expiry: int | None = None,
    ) -> ApprovalRequest:
        """See `AgentClient.ask_approval`."""
        started = self._clock()
        response = await self._http.post(
            f"{self.broker_url}/oauth2/bc-authorize",
            data=_approval_form(
                subject_token,
                subject_token_type,
                _space_list(scope),
                _audiences(audience),
                binding_message,
                authorization_details,
                requested_expiry,
            ),
            auth=self._auth,
        )
        return _approval_request(response, started)

    async def wait_for_approval(
        self,
        request: ApprovalRequest,
        *,
        timeout: float | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> AgentToken:
        """See `AgentClient.wait_for_approval`."""
        deadline = self._clock() + timeout if timeout is not None else math.inf
        interval = request.interval
        next_at = _next_poll_at(self._clock(), interval, request, deadline)
        while True:
            await sleep(max(0.0, next_at - self._clock()))
            started = self._clock()
            response = await self._post_token(_poll_form(request))
            outcome = _poll_outcome(response, started, interval)
            if isinstance(outcome, AgentToken):
                return outcome
            interval = outcome
            next_at = _next_poll_at(self._clock(), interval, request, deadline)

    async def request_approval(
        self,
        subject_token: str,
        subject_token_type: str = ID_TOKEN,
        scope: str | Iterable[str] | None = None,
        audience: str | Iterable[str] | None = None,
        *,
        binding_message: str | None = None,
        authorization_details: list[dict[str, Any]] | None = None,
        requested_expiry: int | None = None,
        timeout: float | None = None,
    ) -> AgentToken:
        """See `AgentClient.request_approval`."""
        request = await self.ask_approval(
            subject_token,
            subject_token_type,
            scope,
            audience,
            binding_message=binding_message,
            authorization_details=authorization_details,
            requested_expiry=requested_expiry,
        )
        return await self.wait_for_approval(request, timeout=timeout)


class AsyncGatewayClient(_GatewayIdentity, _AsyncHttpOwner):
    """`GatewayClient` for asyncio gateways (FastAPI, aiohttp): the same requests, awaited."""

    def __init__(
        self,
        broker_url: str,
        gateway_id: str,
        gateway_secret: str,
        *,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(broker_url, http)
        self._init_gateway(gateway_id, gateway_secret)

    async def fetch(
        self,
        credential: str,
        agent_token: AgentToken | str,
        *,
        version: str | None = None,
        rejected_version: str | None = None,
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> Credential:
        """The credential for the agent call authorised by `agent_token` (see
        `GatewayClient.fetch`)."""
        response = await self._http.post(
            f"{self.broker_url}/v1/credentials/{credential}",
            params={"version": version} if version else None,
            data=_credential_form(agent_token, rejected_version, dpop_method),
            auth=self._auth,
            headers=_forwarded_proof(dpop_proof),
        )
        return _credential(response, credential)

    async def report_usage(self, records: Sequence[UsageRecord]) -> list[UsageResult]:
        """Report provider calls (see `GatewayClient.report_usage`; `AsyncUsageReporter`
        batches them in the background)."""
        response = await self._http.post(
            f"{self.broker_url}/v1/usage", json=usage_body(records), auth=self._auth
        )
        _raise_for_error(response)
        return usage_results(_json_object(response))

    def auth(
        self,
        credential: str,
        agent_token: AgentToken | str,
        *,
        header: str = "Authorization",
        scheme: str | None = "Bearer",
        retry_statuses: Collection[int] = (401,),
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> AsyncCredentialAuth:
        """An `httpx.Auth` for provider requests made with an `httpx.AsyncClient` (see
        `GatewayClient.auth`)."""
        return AsyncCredentialAuth(
            self,
            credential,
            agent_token,
            header=header,
            scheme=scheme,
            retry_statuses=retry_statuses,
            dpop_proof=dpop_proof,
            dpop_method=dpop_method,
        )


class AsyncCredentialAuth(_ProviderHeader, httpx.Auth):
    """`CredentialAuth` for an `httpx.AsyncClient`: the same fetch per request and the same
    single retry after a refused key, awaited. Not usable with a sync `httpx.Client`."""

    requires_request_body = True

    def __init__(
        self,
        gateway: AsyncGatewayClient,
        credential: str,
        agent_token: AgentToken | str,
        *,
        header: str = "Authorization",
        scheme: str | None = "Bearer",
        retry_statuses: Collection[int] = (401,),
        dpop_proof: str | None = None,
        dpop_method: str | None = None,
    ) -> None:
        super().__init__(credential, agent_token, header, scheme, retry_statuses)
        self._gateway = gateway
        self._dpop = {"dpop_proof": dpop_proof, "dpop_method": dpop_method}

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        raise RuntimeError("AsyncCredentialAuth needs an httpx.AsyncClient; use CredentialAuth")

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        if self.requires_request_body:
            await request.aread()
        fetched = await self._fetch(None)
        self._set(request, fetched)
        response = yield request
        if not self._should_retry(response):
            return
        await response.aread()
        newer = await self._fetch(fetched.version)
        if newer.version == fetched.version:
            return
        self._count_retry()
        self._set(request, newer)
        yield request

    async def _fetch(self, rejected_version: str | None) -> Credential:
        try:
            fetched = await self._gateway.fetch(
                self._credential, self._agent_token, rejected_version=rejected_version, **self._dpop
            )
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._usable(fetched)

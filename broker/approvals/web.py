"""The approver's web page (``/approvals``): sign in with the company's SSO, see the requests one
may decide, approve or deny them.

Sign-in is OpenID Connect authorization code + PKCE (S256) with authlib's Starlette client, the
broker acting as a relying party of each identity provider in ``approvals.sign_in``. The ID token
the code yields is verified once more by the broker's own adapter for that provider (exact
issuer, its ``client_ids`` as audiences, its claim mapping for groups and IdP roles), so an
approver is the same `Person` the policy sees anywhere else.

The session is a signed cookie (Starlette's `SessionMiddleware`, itsdangerous), scoped to
``/approvals``, ``SameSite=Lax``, ``Secure`` unless the broker is a loopback ``http`` issuer, and
kept at most ``approvals.session_max_age_seconds``. At sign-in it is cleared and rebuilt
(fixation): it then holds only the approver's person id, groups, IdP roles, display name, the
sign-in time, a session id and a CSRF secret, never a token. A person revoked after that
sign-in (``/v1/admin/revocations``) is signed out. Signing out ends the session id in the shared
state, so an old cookie is refused at every replica. The cookie key comes from
``approvals.session_secret_ref``; without one it is generated per process (logged): sessions then
end at a restart and do not span replicas.

Every form carries a CSRF token (HMAC of the session's CSRF secret, the request id and the
action); a POST is also refused when its ``Origin`` is not the broker's (``null``, which
browsers send under ``no-referrer``, only with ``Sec-Fetch-Site: same-origin``) or its
``Sec-Fetch-Site`` is anything but ``same-origin``. ``next`` is only ever a relative path
under ``/approvals``. Pages are jinja2 templates (autoescaped) under
``broker/approvals/templates``; every answer is ``no-store``, unframeable, scriptless (CSP) and
sends no referrer.

The pages are a small Starlette application mounted at ``/approvals`` (its own middleware, its
own cookie path); they are for browsers and not part of the OpenAPI description. The JSON API
for the same decisions is `broker.approvals.api`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import re
import secrets
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jinja2
from authlib.integrations.base_client import OAuthError as AuthlibError

try:  # Authlib's HTTP client is httpx2 where that is installed (the MCP SDK brings it)
    import httpx2

    HTTP_ERRORS: tuple[type[Exception], ...] = (httpx.HTTPError, httpx2.HTTPError)
except ImportError:  # pragma: no cover - depends on what else is installed
    HTTP_ERRORS = (httpx.HTTPError,)
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from broker.approvals.api import install_approval_api
from broker.approvals.errors import AlreadyDecided, ApprovalNotFound, NotEligible
from broker.approvals.model import ApprovalRecord, ApprovalState
from broker.audit import AuditUnavailable
from broker.endpoints.edge import Edge
from broker.errors import OAuthError
from broker.oauth_request import read_form
from broker.policy import Person
from broker.revocation import person_key
from broker.services import BrokerServices
from broker.settings import ApprovalSignInConfig, BrokerSettings, IdentityProviderConfig
from broker.state import StateUnavailable
from broker.types import TokenType
from idp_adapters.base import IdentityError, IdentityProviderUnavailable
from secret_backends.config import resolve_secret_reference

with warnings.catch_warnings():  # authlib announces a future httpx2 move at import
    warnings.simplefilter("ignore", DeprecationWarning)
    from authlib.integrations.starlette_client import OAuth

log = logging.getLogger("broker.approvals.web")

PREFIX = "/approvals"
SESSION_COOKIE = "broker_approvals"
MAX_NEXT_CHARS = 512
MAX_COMMENT_CHARS = 500
MAX_FORM_BYTES = 8192
_TEMPLATES = Path(__file__).resolve().parent / "templates"
_NEXT = re.compile(r"^/approvals(?:[/?][A-Za-z0-9_\-/?=&.]*)?$")
_SOURCE = re.compile(r"https?://[A-Za-z0-9.\-]+(?::[0-9]{1,5})?")  # a CSP host-source
_APPROVAL_ID = re.compile(r"^apr_[0-9a-f]{32}$")
_ENDED = "approvals-session:"
REFUSALS = {
    "not_eligible": "You are not among the approvers of this request.",
    "self_approval": "This request is made on your behalf and its rule is not a consent rule: "
    "someone else must approve it.",
    "in_agent_chain": "You are in the chain of agents making this request: you may not approve it.",
}


def safe_next(value: object) -> str:
    """`value` when it is a relative path under ``/approvals`` (no scheme, no host, no ``//``,
    no backslash, no percent-encoding, no dot segments), else ``/approvals/``."""
    default = f"{PREFIX}/"
    if not isinstance(value, str) or len(value) > MAX_NEXT_CHARS or not _NEXT.fullmatch(value):
        return default
    path = value.partition("?")[0]
    segments = path.split("/")
    if "//" in value or any(s in {".", ".."} for s in segments):
        return default
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return default
    return value


def csrf_token(secret: str, request_id: str, action: str) -> str:
    """The form token for `action` on `request_id` (``""`` for sign-out) in one session."""
    message = f"{request_id}\x00{action}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def session_secret(settings: BrokerSettings) -> str:
    """The cookie-signing key: ``approvals.session_secret_ref``, else one per process."""
    reference = settings.approvals.session_secret_ref
    if reference:
        return resolve_secret_reference(reference).reveal()
    if settings.approvals.sign_in:
        log.warning(
            "approvals.session_secret_ref is not set: approver sessions are signed with a key "
            "generated for this process (they end at a restart and do not span replicas)"
        )
    return secrets.token_urlsafe(32)


@dataclass(frozen=True, slots=True)
class Approver:
    """Who is signed in, as kept in the session."""

    person: Person
    name: str
    sid: str
    csrf: str


class ApprovalPages:
    """The page handlers, bound to one process's services."""

    def __init__(self, services: BrokerServices) -> None:
        self._services = services
        self._settings = services.settings
        self._config = services.settings.approvals
        self._origin = _origin(services.settings.issuer)
        self._callback = f"{services.settings.issuer}{PREFIX}/callback"
        self._idps: dict[str, IdentityProviderConfig] = {
            p.name: p for p in services.settings.identity_providers
        }
        self._sign_in: dict[str, ApprovalSignInConfig] = {s.idp: s for s in self._config.sign_in}
        self._oauth = OAuth()
        for entry in self._config.sign_in:
            idp = self._idps[entry.idp]
            secret = (
                resolve_secret_reference(entry.client_secret_ref).reveal()
                if entry.client_secret_ref
                else None
            )
            client_kwargs: dict[str, Any] = {
                "scope": " ".join(entry.scopes),
                "code_challenge_method": "S256",
                "timeout": idp.http_timeout_seconds,
            }
            if secret is None:
                client_kwargs["token_endpoint_auth_method"] = "none"  # noqa: S105 (public)
            self._oauth.register(
                name=entry.idp,
                client_id=entry.client_id,
                client_secret=secret,
                server_metadata_url=idp.discovery_url
                or f"{idp.issuer.rstrip('/')}/.well-known/openid-configuration",
                client_kwargs=client_kwargs,
            )
        self._templates = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_TEMPLATES),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )

    def _form_origins(self) -> str:
        """Where a form's submission may lead (CSP ``form-action``, which browsers also apply
        to the redirects that follow): each sign-in IdP's authorization endpoint, known once
        its discovery document is loaded, and its issuer's origin until then."""
        origins: set[str] = set()
        for name in self._sign_in:
            client = self._oauth.create_client(name)
            metadata = getattr(client, "server_metadata", None) or {}
            endpoint = metadata.get("authorization_endpoint")
            for url in (self._idps[name].issuer, endpoint):
                if isinstance(url, str) and _SOURCE.fullmatch(_origin(url)):
                    origins.add(_origin(url))
        return " ".join(sorted(origins))

    # --- rendering ------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        form_action = " ".join(filter(None, ["'self'", self._form_origins()]))
        return {
            "Cache-Control": "no-store",
            "Pragma": "no-cache",
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
            f"form-action {form_action}; frame-ancestors 'none'",
        }

    def render(
        self, template: str, *, status: int = 200, approver: Approver | None = None, **values: Any
    ) -> HTMLResponse:
        html = self._templates.get_template(template).render(
            approver=approver,
            sign_out_token=csrf_token(approver.csrf, "", "sign-out") if approver else "",
            **values,
        )
        return HTMLResponse(html, status_code=status, headers=self._headers())

    def message(
        self, status: int, title: str, text: str, approver: Approver | None = None
    ) -> HTMLResponse:
        return self.render("message.html", status=status, approver=approver, title=title, text=text)

    def redirect(self, location: str) -> RedirectResponse:
        return RedirectResponse(location, status_code=303, headers=self._headers())

    def not_found(self, approver: Approver | None) -> HTMLResponse:
        return self.message(
            404,
            "No such open request",
            "This request does not exist, has expired, or has already been decided.",
            approver,
        )

    # --- the session --------------------------------------------------------------------------

    async def approver(self, request: Request) -> Approver | None:
        """The signed-in approver, or None (also for a session ended at sign-out)."""
        data = request.session.get("approver")
        if not isinstance(data, dict):
            return None
        try:
            person = Person(
                str(data["idp"]),
                str(data["subject"]),
                frozenset(map(str, data["groups"])),
                frozenset(map(str, data["roles"])),
            )
            approver = Approver(person, str(data["name"]), str(data["sid"]), str(data["csrf"]))
        except (KeyError, TypeError):
            request.session.clear()
            return None
        if approver.person.idp not in self._sign_in:
            request.session.clear()
            return None
        revoked = person_key(approver.person.person_id)
        status = await self._services.state.revocation_status([_ENDED + approver.sid], [revoked])
        signed_in_at = data.get("at")
        if status.revoked_ids or (
            revoked in status.not_before
            and not (
                isinstance(signed_in_at, int | float) and signed_in_at >= status.not_before[revoked]
            )
        ):  # signed out, or the person was revoked after (or without a time for) this sign-in
            request.session.clear()
            return None
        return approver

    def _to_sign_in(self, request: Request, target: str | None = None) -> RedirectResponse:
        if target is None:
            target = request.url.path
            if request.url.query:
                target += "?" + request.url.query
        return self.redirect(f"{PREFIX}/sign-in?next={quote(safe_next(target), safe='/')}")

    def _cross_site(self, request: Request) -> bool:
        """Whether a POST did not come from the broker's own pages (on top of the CSRF token).
        The pages send ``Referrer-Policy: no-referrer``, under which browsers send
        ``Origin: null`` on a form POST (Fetch: the request's origin is serialised as null): so
        ``null`` passes only with ``Sec-Fetch-Site: same-origin``, which only the browser can
        set. Any other foreign ``Origin``, and any ``Sec-Fetch-Site`` but ``same-origin``
        (``cross-site``, or ``same-site``: another port or subdomain), is refused."""
        origin = request.headers.get("origin")
        fetch_site = request.headers.get("sec-fetch-site")
        if fetch_site is not None and fetch_site.lower() != "same-origin":
            return True
        if origin is None or origin == self._origin:
            return False
        return not (origin == "null" and fetch_site is not None)

    # --- handlers -------------------------------------------------------------------------

    async def sign_in(self, request: Request) -> Response:
        """Start the authorization code flow (one IdP), or let the approver pick one."""
        target = safe_next(request.query_params.get("next"))
        choice = request.query_params.get("idp")
        if choice is None and len(self._sign_in) == 1:
            choice = next(iter(self._sign_in))
        if choice not in self._sign_in:
            choices = [
                (
                    name,
                    entry.label or name,
                    f"{PREFIX}/sign-in?idp={quote(name)}&next=" + quote(target, safe="/"),
                )
                for name, entry in self._sign_in.items()
            ]
            return self.render("sign_in.html", choices=choices)
        client = self._oauth.create_client(choice)
        # Nothing of an earlier session survives a new sign-in attempt.
        request.session.clear()
        request.session["sign_in"] = {"idp": choice, "next": target}
        try:
            redirect = await client.authorize_redirect(request, self._callback)
            redirect.headers.update(self._headers())
            return redirect
        except (*HTTP_ERRORS, AuthlibError, ValueError, KeyError) as exc:
            log.warning("approvals sign-in: %s unreachable: %s", choice, type(exc).__name__)
            return self.message(
                503,
                "Sign-in unavailable",
                "The identity provider cannot be reached right now. Try again shortly.",
            )

    async def callback(self, request: Request) -> Response:
        """The IdP's answer: exchange the code (PKCE), verify the ID token with the broker's
        adapter, then start a fresh session for the approver."""
        pending = request.session.get("sign_in")
        if not isinstance(pending, dict) or pending.get("idp") not in self._sign_in:
            request.session.clear()
            return self.message(
                400,
                "Sign-in failed",
                "This sign-in was not started here, or it took too long. Sign in again.",
            )
        idp_name = str(pending["idp"])
        target = safe_next(pending.get("next"))
        client = self._oauth.create_client(idp_name)
        try:
            token = await client.authorize_access_token(request)
        except AuthlibError as exc:
            request.session.clear()
            self._refused(idp_name, str(getattr(exc, "error", "") or "oauth_error")[:64])
            return self.message(
                400,
                "Sign-in failed",
                "The identity provider did not sign you in (or the answer was not for this "
                "sign-in). Sign in again.",
            )
        except (*HTTP_ERRORS, ValueError, KeyError) as exc:
            request.session.clear()
            log.warning("approvals sign-in: %s failed: %s", idp_name, type(exc).__name__)
            return self.message(
                503, "Sign-in unavailable", "The identity provider cannot be reached right now."
            )
        id_token = token.get("id_token") if isinstance(token, dict) else None
        idp = self._idps[idp_name]
        adapter = self._services.identities.jwt.get(idp.issuer)
        if not isinstance(id_token, str) or adapter is None:
            request.session.clear()
            self._refused(idp_name, "no_id_token")
            return self.message(400, "Sign-in failed", "The identity provider sent no ID token.")
        try:
            principal = await adapter.authenticate(id_token, TokenType.ID_TOKEN)
        except IdentityProviderUnavailable:
            request.session.clear()
            return self.message(
                503, "Sign-in unavailable", "The identity provider's keys cannot be fetched now."
            )
        except IdentityError as exc:
            request.session.clear()
            self._refused(idp_name, exc.reason)
            return self.message(
                403, "Sign-in refused", f"The identity token was refused: {exc.reason}."
            )
        signed_in_at = principal.earliest_time
        revoked = person_key(principal.person_id)
        status = await self._services.state.revocation_status([], [revoked])
        if revoked in status.not_before and (
            signed_in_at is None or signed_in_at < status.not_before[revoked]
        ):
            request.session.clear()
            self._refused(idp_name, "subject_revoked")
            return self.message(
                403,
                "Sign-in refused",
                "Your access was revoked; sign in at your identity provider again.",
            )
        name = principal.attributes.get("name") or principal.attributes.get("email") or ""
        request.session.clear()  # fixation: nothing from before the sign-in is kept
        sid = secrets.token_urlsafe(18)
        request.session["approver"] = {
            "idp": principal.idp,
            "subject": principal.subject,
            "groups": sorted(principal.groups),
            "roles": sorted(principal.idp_roles),
            "name": str(name)[:128] or principal.person_id,
            "sid": sid,
            "csrf": secrets.token_urlsafe(32),
            "at": signed_in_at,
        }
        self._services.decisions.record(
            "approver.signed_in",
            outcome="granted",
            approver=principal.person_id,
            idp=idp_name,
            session=hashlib.sha256(sid.encode()).hexdigest()[:16],
        )
        return self.redirect(target)

    def _refused(self, idp: str, reason: str) -> None:
        self._services.decisions.record(
            "approver.sign_in_refused", outcome="denied", idp=idp, reason=reason
        )

    async def sign_out(self, request: Request) -> Response:
        approver = await self.approver(request)
        if approver is None:
            request.session.clear()
            return self.redirect(f"{PREFIX}/sign-in")
        form = await _form(request)
        if self._cross_site(request) or not _token_ok(
            form.get("csrf"), csrf_token(approver.csrf, "", "sign-out")
        ):
            return self.message(
                403, "Refused", "The form was not sent from this page (CSRF check).", approver
            )
        expires = self._services.clock.now() + self._config.session_max_age_seconds + 60
        await self._services.state.revoke_tokens({_ENDED + approver.sid: expires})
        request.session.clear()
        self._services.decisions.record(
            "approver.signed_out", outcome="observed", approver=approver.person.person_id
        )
        return self.message(200, "Signed out", "You are signed out.")

    async def index(self, request: Request) -> Response:
        approver = await self.approver(request)
        if approver is None:
            return self._to_sign_in(request)
        records = await self._services.approvals.pending_for(approver.person)
        now = self._services.clock.now()
        return self.render(
            "list.html",
            approver=approver,
            requests=[self._view(r, now) for r in sorted(records, key=lambda r: r.expires_at)],
        )

    async def detail(self, request: Request) -> Response:
        approver = await self.approver(request)
        if approver is None:
            return self._to_sign_in(request)
        approval_id = request.path_params["approval_id"]
        if not _APPROVAL_ID.fullmatch(approval_id):
            return self.not_found(approver)
        try:
            record = await self._services.approvals.get_for(approval_id, approver.person)
        except ApprovalNotFound:
            return self.not_found(approver)
        except NotEligible as refused:
            return self._not_eligible(refused.reason, approver)
        now = self._services.clock.now()
        return self.render(
            "detail.html",
            approver=approver,
            request=self._view(record, now),
            approve_token=csrf_token(approver.csrf, record.id, "approve"),
            deny_token=csrf_token(approver.csrf, record.id, "deny"),
        )

    async def decision(self, request: Request) -> Response:
        approver = await self.approver(request)
        approval_id = request.path_params["approval_id"]
        if approver is None:
            return self._to_sign_in(request, f"{PREFIX}/{approval_id}")
        form = await _form(request)
        action = form.get("decision")
        if action not in {"approve", "deny"}:
            return self.message(400, "Refused", "Choose approve or deny.", approver)
        if self._cross_site(request) or not _token_ok(
            form.get("csrf"), csrf_token(approver.csrf, approval_id, action)
        ):
            self._services.decisions.record(
                "approval.refused",
                outcome="denied",
                reason="csrf",
                approval_id=approval_id[:64],
                approver=approver.person.person_id,
                via="web",
            )
            return self.message(
                403, "Refused", "The form was not sent from this page (CSRF check).", approver
            )
        if not _APPROVAL_ID.fullmatch(approval_id):
            return self.not_found(approver)
        comment = (form.get("comment") or "").strip()[:MAX_COMMENT_CHARS] or None
        try:
            record = await self._services.approvals.decide(
                approval_id,
                approver.person,
                approve=action == "approve",
                comment=comment,
                via="web",
            )
        except ApprovalNotFound:
            return self.not_found(approver)
        except NotEligible as refused:
            return self._not_eligible(refused.reason, approver)
        except AlreadyDecided:
            return self.message(
                409, "Already decided", "You have already decided this request.", approver
            )
        return self.render(
            "decided.html",
            approver=approver,
            action=action,
            state=str(record.state),
            outstanding=sum(record.outstanding().values())
            if record.state is ApprovalState.PENDING
            else 0,
        )

    def _not_eligible(self, reason: str, approver: Approver) -> HTMLResponse:
        return self.render(
            "message.html",
            status=403,
            approver=approver,
            title="You may not decide this request",
            text=f"{REFUSALS.get(reason, 'You may not decide this request.')} ({reason})",
        )

    @staticmethod
    def _view(record: ApprovalRecord, now: float) -> dict[str, Any]:
        left = record.time_left(now)
        details = (
            json.dumps(record.authorization_details, indent=2, sort_keys=True, ensure_ascii=False)
            if record.authorization_details is not None
            else None
        )
        return {
            "id": record.id,
            "person": record.person.person_id,
            "agent_chain": list(record.agent_chain),
            "approval_permissions": list(record.approval_permissions),
            "scopes": list(record.scopes),
            "audiences": list(record.audiences),
            "binding_message": record.binding_message,
            "authorization_details": details,
            "time_left": f"{left // 60} min {left % 60:02d} s",
            "rules": [
                {"rule": r.rule, "quorum": r.quorum, "consent": r.consent}
                for r in record.requirements
            ],
            "approvals_so_far": len(record.approvers),
        }

    def not_configured(self) -> HTMLResponse:
        return self.message(
            503,
            "Approvals sign-in is not configured",
            "This broker has no approvals.sign_in entry: approvers cannot sign in here. "
            "Decisions can still be made through the JSON API (/v1/approvals) where "
            "approvals.api_audiences is set.",
        )

    def asgi(self) -> Starlette:
        """The pages as one application (mounted at ``/approvals``) with their session."""

        def guarded(
            handler: Callable[[Request], Awaitable[Response]],
        ) -> Callable[[Request], Awaitable[Response]]:
            async def endpoint(request: Request) -> Response:
                if not self._sign_in:
                    return self.not_configured()
                try:
                    response = await handler(request)
                except StateUnavailable:
                    return self.message(
                        503, "Temporarily unavailable", "The broker's state cannot be reached."
                    )
                try:  # answer nothing whose record (a decision, a sign-in) is not yet durable
                    await self._services.decisions.wait_durable()
                except AuditUnavailable:
                    return self.message(
                        500, "Refused", "The audit trail cannot be written; nothing was done."
                    )
                return response

            return endpoint

        routes = [
            Route("/", guarded(self.index), methods=["GET"]),
            Route("/sign-in", guarded(self.sign_in), methods=["GET"]),
            Route("/callback", guarded(self.callback), methods=["GET"]),
            Route("/sign-out", guarded(self.sign_out), methods=["POST"]),
            Route("/{approval_id}", guarded(self.detail), methods=["GET"]),
            Route("/{approval_id}/decision", guarded(self.decision), methods=["POST"]),
        ]
        https_only = urlsplit(self._settings.issuer).scheme == "https"
        middleware = [
            Middleware(
                SessionMiddleware,
                secret_key=session_secret(self._settings),
                session_cookie=SESSION_COOKIE,
                max_age=self._config.session_max_age_seconds,
                path=PREFIX,
                same_site="lax",
                https_only=https_only,
            )
        ]

        async def page_not_found(request: Request, exc: Exception) -> Response:
            return self.not_found(None)

        pages = Starlette(
            routes=routes,
            middleware=middleware,
            exception_handlers={404: page_not_found, 405: page_not_found},
        )
        pages.router.redirect_slashes = False  # no redirect built from the request's Host
        return pages


async def _form(request: Request) -> dict[str, str]:
    """The page form's fields, read as every form of the broker is (bounded, single-valued);
    a malformed or oversized body is an empty form (then refused), never a 500."""
    try:
        form = await read_form(request, max_bytes=MAX_FORM_BYTES)
    except OAuthError:
        return {}
    return dict(form.items())


def _token_ok(given: object, expected: str) -> bool:
    return isinstance(given, str) and hmac.compare_digest(given.encode(), expected.encode())


def install_approvals(app: FastAPI, edge: Edge) -> None:
    """The approver's side: the pages (mounted at ``/approvals`` with their session) and the
    JSON API (``/v1/approvals``)."""
    app.mount(PREFIX, ApprovalPages(edge.services).asgi())
    install_approval_api(app, edge)

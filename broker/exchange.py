"""The RFC 8693 token-exchange grant: verify the subject (and actor) -> decide -> issue -> record.

A person's SSO token (from a trusted IdP) or a token this broker issued (a re-exchange by a
sub-agent) is the subject; the authenticated client, or the workload identity in ``actor_token``,
is the actor. Every decision, granted or denied, is recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.trace import Tracer

from broker.audit import DecisionLog
from broker.binding import TokenBinding
from broker.client_auth import AuthenticatedClient, WorkloadActorResolver
from broker.clock import Clock
from broker.dpop import DPoPProof
from broker.errors import (
    InvalidClient,
    InvalidGrant,
    InvalidRequest,
    InvalidScope,
    InvalidTarget,
    OAuthError,
    TemporarilyUnavailable,
    UnauthorizedClient,
)
from broker.oauth_request import OAuthForm
from broker.policy import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    Reason,
    decide,
)
from broker.policy.approvals import approved_in
from broker.revocation import Revocations, check_exchange_allowed
from broker.state import StateStore, enforce_rate_limit
from broker.tokens import BrokerTokenVerifier, TokenIssuer, TokenTooLarge
from broker.tracing import SilentTracer
from broker.types import BrokerToken, IssuedToken, Provenance, Sensitive, TokenType

if TYPE_CHECKING:
    from broker.id_jag import IdJagIssuance
from idp_adapters.base import IdentityProviderUnavailable, TokenRejected
from idp_adapters.jwt_verify import unverified_issuer
from idp_adapters.registry import IdentityRoutes
from idp_adapters.saml import ReplayCheckUnavailable, saml_issuer

GRANT_TYPE = "urn:ietf:params:oauth:grant-type:token-exchange"
REPEATABLE_PARAMETERS = frozenset({"audience", "resource"})
SUBJECT_TOKEN_TYPES = frozenset(
    {TokenType.ACCESS_TOKEN, TokenType.ID_TOKEN, TokenType.JWT, TokenType.SAML2}
)
ISSUABLE_TOKEN_TYPES = frozenset({TokenType.ACCESS_TOKEN, TokenType.JWT, TokenType.ID_JAG})
DEFAULT_MAX_SUBJECT_TOKEN_BYTES = 16384

DECISION_ERRORS: Mapping[str, type[OAuthError]] = {
    "invalid_scope": InvalidScope,
    "invalid_target": InvalidTarget,
    "unauthorized_client": UnauthorizedClient,
    "invalid_grant": InvalidGrant,
}


@dataclass(frozen=True, slots=True)
class Subject:
    """The verified subject of an exchange."""

    provenance: Provenance
    parent: BrokerToken | None
    vouched_at: int | None = None
    """For a person's SSO token: the earliest time it vouches for (sign-in, else issue),
    compared with the person's revocation time."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A token request checked up to the policy decision (`TokenExchangeGrant.prepare`)."""

    policy: Policy
    actor: AuthenticatedClient
    parent: BrokerToken | None
    person: Person
    """The person as the policy uses them (`Policy.identity_used`)."""
    provenance: Provenance
    scopes: tuple[str, ...] | None
    targets: tuple[str, ...]
    issued_type: TokenType
    subject_time: float | None = None
    """For a person's SSO token: the earliest time it vouches for (`Subject.vouched_at`)."""


def inherited_approval(parent: BrokerToken, scopes: tuple[str, ...]) -> dict[str, Any] | None:
    """A re-exchanged token keeps its parent's approval, narrowed to the permissions it still
    carries (None when it carries none of them)."""
    approval = parent.claims.get("approval")
    if not isinstance(approval, Mapping):
        return None
    kept = [p for p in approved_in(parent.claims) if p in scopes]
    if not kept:
        return None
    return {**approval, "permissions": sorted(kept)}


class SubjectTokenVerifier:
    """Routes a subject token to the one verifier that may accept it, by exact issuer: the
    ``iss`` of a JWT, the ``Issuer`` of a SAML assertion (read unverified, for routing only)."""

    def __init__(
        self,
        adapters: IdentityRoutes,
        broker_tokens: BrokerTokenVerifier,
        broker_issuer: str,
        *,
        max_bytes: int = DEFAULT_MAX_SUBJECT_TOKEN_BYTES,
    ) -> None:
        self._adapters = adapters
        self._broker_tokens = broker_tokens
        self._broker_issuer = broker_issuer
        self._max_bytes = max_bytes

    async def verify(self, token: Sensitive, token_type: TokenType) -> Subject:
        raw = token.reveal()
        if len(raw) > self._max_bytes:
            raise InvalidGrant(
                f"subject_token exceeds {self._max_bytes} bytes",
                reason="subject_token_too_large",
            )
        try:
            issuer = (
                saml_issuer(raw, max_bytes=self._max_bytes)
                if token_type is TokenType.SAML2
                else unverified_issuer(raw, max_bytes=self._max_bytes)
            )
        except TokenRejected as exc:
            kind = "SAML assertion" if token_type is TokenType.SAML2 else "JWT"
            raise InvalidGrant(
                f"subject_token is not a well-formed {kind}: {exc.reason}",
                reason="subject_token_malformed",
            ) from None
        if issuer == self._broker_issuer and token_type is not TokenType.SAML2:
            return await self._verify_broker_token(raw, token_type)
        routes = self._adapters.saml if token_type is TokenType.SAML2 else self._adapters.jwt
        adapter = routes.get(issuer) if isinstance(issuer, str) else None
        if adapter is None:
            raise InvalidGrant(
                "subject_token issuer is not a trusted identity provider",
                reason="unknown_issuer",
            )
        if not adapter.accepts(token_type):
            raise InvalidRequest(
                f"identity provider {adapter.name!r} does not accept "
                f"subject_token_type {token_type}"
            )
        try:
            principal = await adapter.authenticate(raw, token_type)
        except TokenRejected as exc:
            raise InvalidGrant(
                f"subject_token rejected: {exc.reason}",
                debug=exc.debug,
                reason="subject_token_rejected",
            ) from None
        except IdentityProviderUnavailable as exc:
            raise TemporarilyUnavailable(
                f"cannot verify subject_token: {exc.reason}",
                debug=exc.debug,
                reason="state_unavailable"
                if isinstance(exc, ReplayCheckUnavailable)
                else "idp_unavailable",
            ) from None
        return Subject(Provenance.from_principal(principal), None, principal.earliest_time)

    async def _verify_broker_token(self, raw: str, token_type: TokenType) -> Subject:
        """A re-exchange: a token this broker issued, presented by a sub-agent."""
        if token_type == TokenType.ID_TOKEN:
            raise InvalidGrant(
                "a token issued by this broker is not a person's ID token; present it "
                f"as {TokenType.ACCESS_TOKEN} to re-exchange it",
                reason="broker_token_as_id_token",
            )
        try:
            parent = await self._broker_tokens.verify(raw)
        except TokenRejected as exc:
            raise InvalidGrant(
                f"subject_token rejected: {exc.reason}",
                debug=exc.debug,
                reason="subject_token_rejected",
            ) from None
        return Subject(parent.provenance, parent)


def _parse_scope(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    scopes = tuple(dict.fromkeys(value.split()))
    if not scopes:
        raise InvalidScope("scope is empty")
    return scopes


def _parse_targets(form: OAuthForm) -> tuple[str, ...]:
    targets: list[str] = []
    for audience in form.get_all("audience"):
        if not audience or len(audience) > 512:
            raise InvalidTarget("audience must be a non-empty string of at most 512 characters")
        targets.append(audience)
    for resource in form.get_all("resource"):
        parts = urlsplit(resource)
        if not parts.scheme or not parts.netloc or parts.fragment or len(resource) > 512:
            raise InvalidTarget("resource must be an absolute URI without a fragment (RFC 8707)")
        targets.append(resource)
    return tuple(dict.fromkeys(targets))


def _token_type(form: OAuthForm, name: str, allowed: frozenset[TokenType]) -> TokenType:
    value = form.non_empty(name)
    if value is None:
        raise InvalidRequest(f"{name} is required")
    accepted = ", ".join(sorted(allowed))
    try:
        token_type = TokenType(value)
    except ValueError:
        raise InvalidRequest(f"{name} is not a known token type; accepted: {accepted}") from None
    if token_type not in allowed:
        raise InvalidRequest(f"{name} {token_type} is not supported here; accepted: {accepted}")
    return token_type


class TokenExchangeGrant:
    """The token endpoint's RFC 8693 grant (a `broker.grants.GrantHandler`)."""

    grant_type = GRANT_TYPE
    repeatable = REPEATABLE_PARAMETERS

    def __init__(
        self,
        *,
        subjects: SubjectTokenVerifier,
        workload_actors: WorkloadActorResolver,
        policy: Callable[[], Policy],
        issuer: TokenIssuer,
        decisions: DecisionLog,
        clock: Clock,
        max_lifetime_seconds: int,
        revocations: Revocations,
        state: StateStore,
        issuer_url: str,
        binding: TokenBinding,
        token_endpoint: str,
        id_jags: IdJagIssuance | None = None,
        tracer: Tracer | SilentTracer | None = None,
    ) -> None:
        self._tracer = tracer or SilentTracer()
        self._binding = binding
        self._token_endpoint = token_endpoint
        self._id_jags = id_jags
        # Where an agent asks for what needs approval (OpenID CIBA), named in the refusal.
        self._approval_endpoint = issuer_url.rstrip("/") + "/oauth2/bc-authorize"
        self._revocations = revocations
        self._state = state
        self._subjects = subjects
        self._workload_actors = workload_actors
        self._policy = policy
        self._issuer = issuer
        self._decisions = decisions
        self._clock = clock
        self._max_lifetime = max_lifetime_seconds

    async def _actor(
        self, form: OAuthForm, client: AuthenticatedClient | None
    ) -> AuthenticatedClient:
        actor_token = form.non_empty("actor_token")
        if actor_token is None:
            if form.non_empty("actor_token_type") is not None:
                raise InvalidRequest("actor_token_type given without actor_token")
            if client is None:
                raise InvalidClient("client authentication is required")
            actor = client
        else:
            _token_type(
                form, "actor_token_type", frozenset({TokenType.JWT, TokenType.ACCESS_TOKEN})
            )
            actor = await self._workload_actors.resolve(Sensitive(actor_token))
            if client is not None and client.client_id != actor.client_id:
                raise InvalidRequest("actor_token identifies a different agent than the client")
        if actor.kind != "agent":
            raise UnauthorizedClient(f"client {actor.client_id!r} is not an agent")
        return actor

    async def handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        *,
        request_id: str,
        dpop: DPoPProof | None = None,
    ) -> dict[str, Any]:
        requested: dict[str, Any] = {"request_id": request_id}
        try:
            return await self._handle(form, client, requested, dpop)
        except OAuthError as err:
            record_denial(self._decisions, "token.exchange", err, requested)
            raise

    async def prepare(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        record: dict[str, Any],
        *,
        rate_limit: str = "exchange",
        endpoint_url: str | None = None,
    ) -> Prepared:
        """Everything before the decision, shared with the CIBA endpoint (which presents the
        subject the same way): parse the request, resolve the agent, count its rate, verify
        the subject, keep what the policy uses of the person, and check revocations. Fills
        `record` as it goes (what the audit record says about a refusal)."""
        policy = self._policy()  # the whole request is decided under one policy version
        record["policy_version"] = policy.version
        if client is not None:
            record["client_id"] = client.client_id
        subject_token = form.non_empty("subject_token")
        if subject_token is None:
            raise InvalidRequest("subject_token is required")
        subject_type = _token_type(form, "subject_token_type", SUBJECT_TOKEN_TYPES)
        issued_type = TokenType.ACCESS_TOKEN
        if form.non_empty("requested_token_type") is not None:
            issued_type = _token_type(form, "requested_token_type", ISSUABLE_TOKEN_TYPES)
        scopes = _parse_scope(form.get("scope"))
        targets = _parse_targets(form)
        record.update(
            requested_scopes=list(scopes) if scopes is not None else None,
            requested_audiences=list(targets) or None,
        )

        actor = await self._actor(form, client)
        record.update(client_id=actor.client_id, client_auth=actor.method)
        agent = policy.agents.get(actor.client_id)
        if agent is not None:
            await enforce_rate_limit(
                self._state,
                f"{rate_limit}:{actor.client_id}",
                agent.spec.rate_limits.exchanges_per_minute,
                "token exchange",
            )

        with self._tracer.start_as_current_span("verify subject token") as span:
            span.set_attribute("broker.subject_token_type", str(subject_type))
            subject = await self._subjects.verify(Sensitive(subject_token), subject_type)
        parent = subject.parent
        # Only the groups and IdP roles the policy uses for this agent (and the agents it may
        # delegate to) go further: into the decision, the record and the token. The decision is
        # the same; the token stays small and tells resource servers no more than needed.
        used = policy.identity_used(Person.of(subject.provenance), actor.client_id)
        provenance = replace(subject.provenance, groups=used.groups, idp_roles=used.idp_roles)
        record.update(
            person=provenance.person_id,
            idp=provenance.idp,
            # Where the person's identity came from: the IdP, the kind of token, the groups
            # and IdP roles it asserted that the policy uses, and when the person signed in
            # (immutable through every hop).
            provenance=provenance.to_claim(),
            parent_jti=parent.jti if parent else None,
        )
        if parent is not None and parent.jkt is not None:
            # A bound parent token is accepted only with a proof by its key.
            await self._binding.subject(
                form, subject_token, parent.jkt, url=endpoint_url or self._token_endpoint
            )
        # One state round trip: the parent token, the person, every agent of the chain and
        # the asking agent (and what its credential was issued at) against revocations.
        await check_exchange_allowed(
            self._revocations,
            person=provenance.person_id,
            subject_time=subject.vouched_at,
            parent=parent,
            actor=actor.client_id,
            actor_credential_time=actor.issued_at,
        )
        return Prepared(
            policy=policy,
            actor=actor,
            parent=parent,
            person=used,
            provenance=provenance,
            scopes=scopes,
            targets=targets,
            issued_type=issued_type,
            subject_time=subject.vouched_at,
        )

    def exchange_request(
        self, prepared: Prepared, *, for_approval: bool = False
    ) -> ExchangeRequest:
        """The policy question for a prepared request (`policy_question`)."""
        return policy_question(prepared, for_approval=for_approval)

    async def _handle(
        self,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        record: dict[str, Any],
        dpop: DPoPProof | None,
    ) -> dict[str, Any]:
        prepared = await self.prepare(form, client, record)
        policy, actor, parent = prepared.policy, prepared.actor, prepared.parent
        provenance, issued_type = prepared.provenance, prepared.issued_type
        agent = policy.agents.get(actor.client_id)
        TokenBinding.require(
            actor.client_id,
            agent is not None and agent.spec.dpop == "required",
            dpop,
            parent_bound=parent is not None and parent.jkt is not None,
        )
        if dpop is not None:
            record["jkt"] = dpop.jkt
        if issued_type is TokenType.ID_JAG:
            if self._id_jags is None:
                raise InvalidRequest("this broker does not issue ID-JAGs")
            return await self._id_jags.issue(form, prepared, record, dpop)

        with self._tracer.start_as_current_span("policy decision") as span:
            decision = decide(policy, self.exchange_request(prepared))
            span.set_attribute("broker.decision", "allowed" if decision.allowed else "denied")
            span.set_attribute("broker.policy_version", decision.policy_version)
        record["agent_chain"] = list(decision.actor_chain)
        if not decision.allowed:
            raise refuse(decision, self._approval_endpoint)

        lifetime = self._lifetime(decision, provenance, parent)
        with self._tracer.start_as_current_span("issue token"):
            issued = self._issue(
                provenance=provenance,
                client_id=actor.client_id,
                actor_chain=decision.actor_chain,
                scopes=decision.scopes,
                audiences=decision.audiences,
                lifetime_seconds=lifetime,
                policy_version=decision.policy_version,
                parent_jti=parent.jti if parent else None,
                lineage=parent.lineage if parent else (),
                approval=inherited_approval(parent, decision.scopes) if parent else None,
                jkt=dpop.jkt if dpop else None,
            )
        self._decisions.record(
            "token.exchange",
            outcome="granted",
            reason="granted",
            granted_scopes=list(decision.scopes),
            audiences=list(decision.audiences),
            jti=issued.jti,
            expires_in=lifetime,
            **record,
        )
        return {
            "access_token": issued.token,
            "issued_token_type": str(issued_type),
            "token_type": "DPoP" if dpop else "Bearer",
            "expires_in": lifetime,
            "scope": " ".join(decision.scopes),
        }

    def _issue(self, **claims: Any) -> IssuedToken:
        return issue_or_refuse(self._issuer, **claims)

    def _lifetime(
        self, decision: Decision, provenance: Provenance, parent: BrokerToken | None
    ) -> int:
        """An agent token never outlives the person's session, nor its parent token."""
        return bounded_lifetime(
            self._clock.now(),
            decision.max_lifetime_seconds,
            self._max_lifetime,
            provenance.session_expires_at,
            parent.expires_at if parent is not None else None,
        )


def policy_question(prepared: Prepared, *, for_approval: bool = False) -> ExchangeRequest:
    """The policy question for a prepared request (a re-exchange keeps what the parent token's
    approval covered: it only narrows)."""
    parent = prepared.parent
    return ExchangeRequest(
        person=prepared.person,
        agent=prepared.actor.client_id,
        scopes=prepared.scopes,
        audiences=prepared.targets,
        parent=ParentGrant(parent.actor_chain, parent.scopes, parent.audiences) if parent else None,
        approved=approved_in(parent.claims) if parent else frozenset(),
        for_approval=for_approval,
    )


def refuse(decision: Decision, approval_endpoint: str) -> OAuthError:
    """A refused decision in the protocol's terms (naming where to ask for approval)."""
    description = decision.description
    if decision.reason == Reason.APPROVAL_REQUIRED:
        description += f"; request it with OpenID CIBA at POST {approval_endpoint}"
    return DECISION_ERRORS[decision.error or "invalid_grant"](description, reason=decision.reason)


def record_denial(
    decisions: DecisionLog, event: str, err: OAuthError, record: dict[str, Any]
) -> None:
    """The ``denied`` record of a token request: what `record` gathered so far (before the
    caller is known, not what it asked for)."""
    if "client_id" not in record:
        record.pop("requested_scopes", None)
        record.pop("requested_audiences", None)
    decisions.record(
        event,
        outcome="denied",
        error=err.error,
        reason=err.reason,
        description=err.description,
        **record,
    )


def issue_or_refuse(issuer: TokenIssuer, **claims: Any) -> IssuedToken:
    """Sign the token, or refuse clearly if it would be larger than the broker accepts back
    (it would fail every later use: fetch, re-exchange, introspection)."""
    try:
        return issuer.issue(**claims)
    except TokenTooLarge as exc:
        raise InvalidRequest(
            f"the token would be {exc.size} bytes, more than the {exc.limit} bytes this "
            "broker accepts; request fewer scopes or audiences",
            reason="token_too_large",
        ) from None


def bounded_lifetime(
    now: float,
    decided: int,
    global_max: int,
    session_expires_at: int,
    parent_expires_at: int | None,
) -> int:
    """The lifetime of an agent token: what the policy decided, under the global cap, never
    past the person's session nor its parent token."""
    limits = [decided, global_max, int(session_expires_at - now)]
    if parent_expires_at is not None:
        limits.append(int(parent_expires_at - now))
    lifetime = min(limits)
    if lifetime < 1:
        raise InvalidGrant(
            "the subject token expires too soon to issue a token",
            reason="subject_session_expired",
        )
    return lifetime

"""The broker's collaborators, built once per process from its settings (no globals).

`build_services(settings)` wires identity adapters, secret backends, the policy store, the
state store, the audit trail and the grant handlers; the HTTP edge (`broker.app.create_app`)
only routes requests to them.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field

import httpx

from broker.approvals.ciba import BC_AUTHORIZE_PATH, BackchannelAuthentication, CibaGrant
from broker.approvals.notifications import approval_requested, channels_of
from broker.approvals.service import ApprovalService
from broker.approvals.store import build_approval_store
from broker.audit import (
    DecisionLog,
    DecisionSink,
    KeyringCheckpointSigner,
    build_sinks,
    keeps_trail,
)
from broker.binding import TokenBinding
from broker.budget_ledger import build_ledger
from broker.cache import CredentialCache
from broker.client_auth import ClientAuthenticator, FailedAuthThrottle, WorkloadActorResolver
from broker.client_secrets import BoundedSecretVerifier
from broker.clock import Clock, SystemClock
from broker.credentials import CredentialService, record_cache_event
from broker.dpop import DPoPNonces, DPoPVerifier
from broker.exchange import SubjectTokenVerifier, TokenExchangeGrant
from broker.grants import GrantHandler
from broker.id_jag import IdJagIssuance, JwtBearerGrant
from broker.introspection import Introspection
from broker.metrics import BrokerMetrics
from broker.notify import Notifier, build_channels
from broker.policy.loader import configured_names
from broker.policy.store import PolicyStore
from broker.readiness import Readiness
from broker.revocation import Revocations
from broker.settings import SUPPORTED_JWS_ALGORITHMS, BrokerSettings
from broker.state import StateStore
from broker.state_factory import build_state_store
from broker.tokens import BrokerTokenVerifier, Keyring, TokenIssuer
from broker.tracing import Tracing, build_tracing
from broker.usage.service import BudgetGate, UsageService
from broker.usage.state import build_usage_state
from idp_adapters.registry import (
    IdentityRoutes,
    build_identity_adapters,
    build_workload_verifiers,
)
from secret_backends.config import resolve_secret_reference
from secret_backends.registry import build_secret_backends

log = logging.getLogger("broker")


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
    notifier: Notifier
    """Notification channels (webhook, Slack, Teams, e-mail), delivering in the background."""
    approvals: ApprovalService
    """Approval requests (OpenID CIBA) and their decisions, in the shared state."""
    backchannel: BackchannelAuthentication
    """OpenID CIBA's backchannel authentication endpoint (opens approval requests)."""
    grants: Mapping[str, GrantHandler]
    """The token endpoint's grant handlers by ``grant_type``."""
    binding: TokenBinding
    """Where DPoP proofs are asked for and checked (token endpoint, credential fetch)."""
    usage: UsageService
    """Usage reports from gateways (``POST /v1/usage``): pricing, budgets, alerts."""
    identities: IdentityRoutes = field(default_factory=IdentityRoutes)
    """People's identity adapters by exact issuer (approvers' sign-in and API tokens)."""


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


def dpop_nonces(settings: BrokerSettings, clock: Clock) -> DPoPNonces | None:
    """Server-provided DPoP nonces when the configuration asks for them: from the shared
    ``dpop.nonce_secret_ref``, else a key of this process (logged: not across replicas)."""
    config = settings.dpop
    if not config.require_nonce:
        return None
    if config.nonce_secret_ref:
        secret = resolve_secret_reference(config.nonce_secret_ref).reveal().encode()
    else:
        log.warning(
            "dpop.nonce_secret_ref is not set: DPoP nonces are derived from a key generated for "
            "this process (a nonce from one replica is refused by another)"
        )
        secret = secrets.token_bytes(32)
    return DPoPNonces(secret, window_seconds=config.nonce_window_seconds, clock=clock)


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
        commit_window=settings.audit.group_commit_window_ms / 1000.0,
        inline_sync_max=settings.audit.inline_sync_max_ms / 1000.0,
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
    exchange_issuer = TokenIssuer(
        keyring, settings.issuer, clock, max_bytes=broker_tokens.max_bytes
    )
    binding = TokenBinding(
        DPoPVerifier(
            clock=clock,
            replay=state,
            algorithms=settings.dpop.algorithms,
            max_age_seconds=settings.dpop.max_age_seconds,
            future_skew_seconds=settings.dpop.future_skew_seconds,
            nonces=dpop_nonces(settings, clock),
        ),
        token_endpoint=settings.token_endpoint,
    )
    exchange = TokenExchangeGrant(
        subjects=SubjectTokenVerifier(
            adapters,
            broker_tokens,
            settings.issuer,
            max_bytes=max([p.max_token_bytes for p in settings.identity_providers], default=16384),
        ),
        workload_actors=WorkloadActorResolver(workloads, policies.current),
        policy=policies.current,
        issuer=exchange_issuer,
        decisions=decisions,
        clock=clock,
        max_lifetime_seconds=tokens.max_lifetime_seconds,
        revocations=revocations,
        state=state,
        issuer_url=settings.issuer,
        binding=binding,
        token_endpoint=settings.token_endpoint,
        id_jags=IdJagIssuance(
            issuer=exchange_issuer,
            decisions=decisions,
            clock=clock,
            own_issuer=settings.issuer,
            config=settings.id_jag,
            max_lifetime_seconds=tokens.max_lifetime_seconds,
        ),
        tracer=tracing.tracer,
    )
    jwt_bearer = JwtBearerGrant(
        config=settings.id_jag,
        keyring=keyring,
        own_algorithms=tuple(sorted(SUPPORTED_JWS_ALGORITHMS)),
        http=http,
        policy=policies.current,
        issuer=exchange_issuer,
        decisions=decisions,
        clock=clock,
        state=state,
        revocations=revocations,
        own_issuer=settings.issuer,
        max_lifetime_seconds=tokens.max_lifetime_seconds,
        leeway_seconds=tokens.leeway_seconds,
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
    usage_settings = settings.usage
    ledger = build_ledger(state, clock)
    usage_state = build_usage_state(state, clock)
    budget_gate = BudgetGate(
        ledger=ledger,
        state=usage_state,
        clock=clock,
        time_zone=usage_settings.time_zone,
        hold_seconds=usage_settings.reservation_hold_seconds,
        report_grace_seconds=usage_settings.report_grace_seconds,
    )
    credentials = CredentialService(
        verifier=broker_tokens,
        policy=policies.current,
        cache=cache,
        decisions=decisions,
        clock=clock,
        revocations=revocations,
        state=state,
        binding=binding,
        budgets=budget_gate,
    )
    notifier = Notifier(
        build_channels(settings.notifications.channels, http),
        decisions,
        on_outcome=metrics.count_notification,
    )
    approvals = ApprovalService(
        build_approval_store(state, clock),
        policy=policies.current,
        decisions=decisions,
        clock=clock,
        http=http,
        on_decided=metrics.observe_approval_decided,
        on_pending_count=metrics.set_approvals_pending,
        notify=lambda record: notifier.notify(
            channels_of(record), approval_requested(record, settings.issuer)
        ),
    )
    ciba = CibaGrant(
        approvals=approvals,
        policy=policies.current,
        issuer=exchange_issuer,
        revocations=revocations,
        decisions=decisions,
        clock=clock,
        max_lifetime_seconds=tokens.max_lifetime_seconds,
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
        notifier=notifier,
        approvals=approvals,
        backchannel=BackchannelAuthentication(
            exchange=exchange,
            approvals=approvals,
            decisions=decisions,
            policy=policies.current,
            endpoint_url=settings.issuer + BC_AUTHORIZE_PATH,
        ),
        grants={
            exchange.grant_type: exchange,
            ciba.grant_type: ciba,
            jwt_bearer.grant_type: jwt_bearer,
        },
        binding=binding,
        usage=UsageService(
            verifier=broker_tokens,
            policy=policies.current,
            gate=budget_gate,
            ledger=ledger,
            state=usage_state,
            store=state,
            decisions=decisions,
            notifier=notifier,
            metrics=metrics,
            clock=clock,
            call_id_ttl_seconds=usage_settings.call_id_ttl_seconds,
            alert_channels=usage_settings.alert_channels,
            issuer=settings.issuer,
        ),
        identities=adapters,
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

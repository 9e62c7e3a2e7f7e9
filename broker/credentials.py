"""Serving provider credentials to gateways: `POST /v1/credentials/{name}`.

A registered gateway presents the agent token it received. The broker verifies the token with its
own keys, checks it is addressed to this gateway, that its scope carries the permission the
credential requires and that the gateway may receive the credential, then serves the value from the
credential cache. Every fetch, granted or denied, is one decision record without the value.

Status codes: 401 for a bad gateway or agent token, 403 with the missing permission named (or a
credential this gateway may not receive: the same answer whether or not it exists), 404 only for a
credential the gateway may know exists, 503 when the backend cannot serve it.

Rejected-version hint: a gateway whose provider refused the key it was just served (the provider
revoked it at once on rotation) fetches again with ``rejected_version=<the version it was
served>``. The hint is considered only after every check above passed, and it goes to the cache
(`CredentialCache.refresh_rejected`), which re-reads the backend only when the hint names the
version it holds, once for all concurrent hints and at most once a second per credential, so a
gateway cannot make the broker hammer the store. The answer is whatever is current then; the
decision record carries ``refresh_hint``, the ``rejected_version`` and the ``hint_outcome``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

from broker.audit import DecisionLog
from broker.binding import TokenBinding
from broker.cache import (
    CacheEvent,
    CachePolicy,
    CredentialCache,
    CredentialUnavailable,
    VersionUnavailable,
)
from broker.client_auth import AuthenticatedClient
from broker.clock import Clock
from broker.errors import (
    AccessDenied,
    InsufficientScope,
    InvalidClient,
    InvalidRequest,
    InvalidToken,
    NotFound,
    OAuthError,
    TemporarilyUnavailable,
)
from broker.oauth_request import OAuthForm
from broker.policy import Person, Policy
from broker.policy.access import (
    AccessReason,
    FetchRequest,
    RememberedStandings,
    decide_fetch,
    is_gateway,
    require_admin,
)
from broker.policy.model import Credential
from broker.revocation import Revocations, check_not_revoked
from broker.state import StateStore, enforce_rate_limit
from broker.tokens import BrokerTokenVerifier
from broker.usage.service import BudgetGate, attribution_of
from idp_adapters.base import TokenRejected
from secret_backends.base import SecretRef

VersionChoice = Literal["current", "previous"]
_NOT_FOUND_TEXT = {
    "not_found": "not found in its secret backend",
    "no_previous": "no previous version has been seen",
    "grace_expired": "the previous version was replaced longer ago than its grace period",
    "expired": "that version has expired",
}
"""What a 404 says, by condition: never the backend path (`CredentialUnavailable.message`)."""
_FETCH_REFUSALS: dict[AccessReason, type[OAuthError]] = {
    AccessReason.NOT_A_GATEWAY: InvalidClient,
    AccessReason.AUDIENCE_MISMATCH: InvalidToken,
    AccessReason.GATEWAY_NOT_ALLOWED: AccessDenied,
    AccessReason.MISSING_PERMISSION: InsufficientScope,
    AccessReason.PERMISSION_WITHDRAWN: InsufficientScope,
    AccessReason.PREVIOUS_NOT_ALLOWED: AccessDenied,
    AccessReason.BUDGET_EXCEEDED: AccessDenied,
}
"""A refused fetch decision in the protocol's terms (401, 403)."""
MAX_VERSION_ID_LENGTH = 128
"""Longer ``rejected_version`` values are refused (version ids are short: KV numbers, UUIDs)."""


def secret_ref(credential: Credential) -> SecretRef:
    return SecretRef(
        backend=credential.backend,
        path=credential.path,
        field=credential.field,
        stage=credential.stage,
    )


def cache_policy(credential: Credential) -> CachePolicy:
    return CachePolicy(
        refresh_interval=credential.refresh_interval_seconds,
        jitter=0.1,
        max_stale=credential.max_stale_seconds,
        previous_grace=credential.previous_version_grace_seconds,
    )


class CredentialService:
    def __init__(
        self,
        *,
        verifier: BrokerTokenVerifier,
        policy: Callable[[], Policy],
        cache: CredentialCache,
        decisions: DecisionLog,
        clock: Clock,
        revocations: Revocations,
        state: StateStore,
        binding: TokenBinding,
        budgets: BudgetGate | None = None,
    ) -> None:
        self._budgets = budgets
        self._binding = binding
        self._revocations = revocations
        self._state = state
        self._verifier = verifier
        self._policy = policy
        self._cache = cache
        self._decisions = decisions
        self._clock = clock
        # (policy version, credential name) -> (SecretRef, CachePolicy): built once per policy
        # version, so the hot path looks up the cache with the very same key objects.
        self._plans: dict[tuple[str, str], tuple[SecretRef, CachePolicy]] = {}
        self._standings = RememberedStandings()

    def _plan(
        self, policy: Policy, name: str, credential: Credential
    ) -> tuple[SecretRef, CachePolicy]:
        key = (policy.version, name)
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) > 4 * max(len(policy.credentials), 1):
                self._plans.clear()  # older policy versions
            plan = self._plans[key] = (secret_ref(credential), cache_policy(credential))
        return plan

    async def fetch(
        self,
        name: str,
        form: OAuthForm,
        gateway: AuthenticatedClient | None,
        *,
        version: str | None,
        request_id: str,
        dpop: Sequence[str] = (),
    ) -> dict[str, Any]:
        record: dict[str, Any] = {"request_id": request_id, "credential": name}
        try:
            return await self._fetch(name, form, gateway, version, record, dpop)
        except OAuthError as err:
            self._decisions.record(
                "credential.fetch",
                outcome="denied",
                error=err.error,
                reason=err.reason,
                description=err.description,
                **record,
            )
            raise

    async def _fetch(
        self,
        name: str,
        form: OAuthForm,
        client: AuthenticatedClient | None,
        version: str | None,
        record: dict[str, Any],
        dpop: Sequence[str],
    ) -> dict[str, Any]:
        policy = self._policy()
        record["policy_version"] = policy.version
        if client is None:
            raise InvalidClient("gateway authentication is required")
        record["gateway"] = client.client_id
        if client.kind != "gateway" or not is_gateway(policy, client.client_id):
            raise InvalidClient(
                "only registered gateways may fetch credentials", reason="not_a_gateway"
            )
        which: VersionChoice = "current"
        if version not in (None, "", "current"):
            if version != "previous":
                raise InvalidRequest("version must be 'current' or 'previous'")
            which = "previous"

        rejected_version = form.non_empty("rejected_version")
        if rejected_version is not None:
            if len(rejected_version) > MAX_VERSION_ID_LENGTH or not rejected_version.isprintable():
                raise InvalidRequest("rejected_version is not a version id")
            if which == "previous":
                raise InvalidRequest("rejected_version applies to the current version only")
            record.update(refresh_hint=True, rejected_version=rejected_version)

        token = form.non_empty("token")
        if token is None:
            raise InvalidRequest("token (the agent token) is required")
        try:
            agent_token = await self._verifier.verify(token)
        except TokenRejected as exc:
            raise InvalidToken(
                f"agent token rejected: {exc.reason}",
                debug=exc.debug,
                reason="agent_token_rejected",
            ) from None
        if agent_token.jkt is not None:
            # A bound token unlocks nothing without its agent's proof, made for this gateway.
            record["jkt"] = agent_token.jkt
            gateway_spec = policy.gateways.get(client.client_id)
            await self._binding.presented(
                dpop,
                token=token,
                jkt=agent_token.jkt,
                gateway=client.client_id,
                gateway_url=gateway_spec.url if gateway_spec is not None else None,
                method=form.non_empty("dpop_method"),
                hinted=rejected_version is not None,
            )
        await check_not_revoked(self._revocations, agent_token, InvalidToken)
        agent = policy.agents.get(agent_token.client_id)
        if agent is not None:
            await enforce_rate_limit(
                self._state,
                f"fetch:{agent_token.client_id}",
                agent.spec.rate_limits.credential_fetches_per_minute,
                "credential fetch",
            )
        record.update(
            person=agent_token.subject,
            idp=agent_token.provenance.idp,
            agent_chain=list(agent_token.actor_chain),
            jti=agent_token.jti,
            token_policy_version=agent_token.policy_version,
            # Who pays, decided now under the policy in force (the invoked agent is the last
            # of the chain): what `broker usage report --by cost_centre` sums.
            cost_centre=policy.cost_centre_of(
                agent_token.actor_chain[-1] if agent_token.actor_chain else "",
                agent_token.provenance.idp,
                agent_token.provenance.groups,
            ),
        )
        # The decision itself: the pure function policy tests and `broker policy explain` use.
        provenance = agent_token.provenance
        decision = decide_fetch(
            policy,
            FetchRequest(
                gateway=client.client_id,
                credential=name,
                person=Person.of(provenance),
                actor_chain=agent_token.actor_chain,
                scopes=agent_token.scopes,
                audiences=agent_token.audiences,
                previous=which == "previous",
            ),
            standing_now=self._standings.of(policy, agent_token),
        )
        if not decision.allowed:
            raise _FETCH_REFUSALS[decision.reason](
                decision.description, reason=str(decision.reason)
            )
        credential = policy.credentials[name]

        # Budgets: a deny budget's reservation for this call, or a refusal naming it.
        who = attribution_of(agent_token, record.get("cost_centre"), name)
        reservation = None
        if self._budgets is not None:
            reservation = await self._budgets.admit(
                policy,
                who,
                gateway=client.client_id,
                token=agent_token,
                request_id=record["request_id"],
                record=record,
            )
        ref, plan = self._plan(policy, name, credential)
        try:
            if rejected_version is None:
                cached = await self._cache.get_version(ref, plan, which)
            else:
                hinted = await self._cache.refresh_rejected(ref, plan, rejected_version)
                record["hint_outcome"] = hinted.outcome
                cached = hinted.cached
        except CredentialUnavailable as exc:
            if reservation is not None and self._budgets is not None:
                await self._budgets.release_for(policy, who, reservation)
            if exc.condition == "not_found" or isinstance(exc, VersionUnavailable):
                # The broker's own words by condition: the cache's message names the store
                # path, which the gateway has no business learning.
                raise NotFound(
                    f"credential {name!r}: {_NOT_FOUND_TEXT.get(exc.condition, 'not available')}",
                    reason=f"credential_{exc.condition}",
                ) from None
            raise TemporarilyUnavailable(
                f"credential {name!r} is unavailable: backend {credential.backend!r} is "
                f"{exc.condition}",
                reason=f"backend_{exc.condition}",
                headers={"Retry-After": "1"},
            ) from None

        secret = cached.secret
        record.update(version=secret.version_id, stage=secret.stage, stale=cached.stale or None)
        self._decisions.record("credential.fetch", outcome="granted", reason="granted", **record)
        response: dict[str, Any] = {
            "credential": name,
            "version": secret.version_id,
            "stage": secret.stage,
            "refresh_in": round(cached.refresh_in(self._clock.now()), 3),
            "stale": cached.stale,
            "served_for": {
                "sub": agent_token.subject,
                "act": agent_token.claims.get("act"),
                "client_id": agent_token.client_id,
            },
        }
        if credential.field is not None or set(secret.fields) == {"value"}:
            response["value"] = secret.value.reveal()
        else:
            response["fields"] = {k: v.reveal() for k, v in secret.fields.items()}
        if secret.expires_at is not None:
            response["expires_at"] = int(secret.expires_at)
        if reservation is not None:
            response["usage_ref"] = reservation  # name it in the usage report to settle it
        return response

    async def refresh(
        self, name: str, admin: AuthenticatedClient | None, *, request_id: str
    ) -> dict[str, Any]:
        """Push refresh: the next read sees the store's current version at once."""
        policy = self._policy()
        require_admin(policy, admin, "credentials:refresh", name)
        assert admin is not None
        credential = policy.credentials.get(name)
        if credential is None:
            raise NotFound(f"no credential named {name[:64]!r}")
        ref, plan = self._plan(policy, name, credential)
        try:
            cached = await self._cache.refresh_now(ref, plan)
        except CredentialUnavailable as exc:
            self._decisions.record(
                "credential.refresh",
                outcome="failed",
                credential=name,
                admin=admin.client_id,
                condition=exc.condition,
                request_id=request_id,
                policy_version=policy.version,
            )
            raise TemporarilyUnavailable(
                f"credential {name!r} could not be refreshed: backend is {exc.condition}"
            ) from None
        self._decisions.record(
            "credential.refresh",
            outcome="refreshed",
            credential=name,
            admin=admin.client_id,
            version=cached.secret.version_id,
            request_id=request_id,
            policy_version=policy.version,
        )
        return {
            "credential": name,
            "version": cached.secret.version_id,
            "refresh_in": round(cached.refresh_in(self._clock.now()), 3),
        }


def credential_names(policy: Policy, ref: SecretRef) -> list[str]:
    """The names under which the policy serves the secret `ref` points at."""
    key = (ref.backend, ref.path, ref.field, ref.stage)
    return sorted(
        name
        for name, credential in policy.credentials.items()
        if (credential.backend, credential.path, credential.field, credential.stage) == key
    )


def record_cache_event(
    decisions: DecisionLog, event: CacheEvent, policy: Policy | None = None
) -> None:
    """Cache observations (rotations, failed refreshes) become decision records, naming the
    credential(s) of the current policy the secret is served as."""
    decisions.record(
        event.kind,
        credentials=credential_names(policy, event.ref) if policy is not None else None,
        backend=event.ref.backend,
        path=event.ref.path,
        old_version=event.old_version,
        new_version=event.new_version,
        condition=event.condition,
        observed_at=event.observed_at,
    )

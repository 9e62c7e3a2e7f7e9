"""Usage reports from gateways (``POST /v1/usage``) and budgets at the credential fetch.

`BudgetGate.admit` runs at every granted fetch: it reserves each ``deny`` budget's
``reserve_per_call`` in the ledger (atomically, across replicas when the ledger is Redis) or
refuses the fetch naming the budget, the amount and when it resets; then it notes the fetch (so a
report for it is accepted later, and settles that reservation).

`UsageService.report` takes a gateway's batch: each record is attributed from the agent token
(verified, expired or revoked alike: spend is never dropped), must be for a credential this
gateway fetched for that token, is idempotent by the gateway's call id, priced (the gateway's
own cost, else the policy's price table, else unpriced: never silently zero), counted against
the budgets it falls under (settling the fetch's reservation), alerted on once per threshold
per period, and recorded in the audit trail (``usage.recorded``).

Overspend bound: a ``deny`` budget admits a fetch only while spent + reserved + the fetch's
reservation stays within the amount. Spend can exceed the amount only by what calls admitted
under it cost beyond their reservations: at most the calls in flight (admitted, not yet
reported) times their excess over ``reserve_per_call``; with ``reserve_per_call`` at least a
call's cost, never.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any
from zoneinfo import ZoneInfo

from cachetools import TTLCache

from broker.audit import DecisionLog
from broker.budget_ledger import BudgetLedger, LedgerKey
from broker.client_auth import AuthenticatedClient
from broker.clock import Clock
from broker.errors import (
    AccessDenied,
    InvalidClient,
    InvalidRequest,
    OAuthError,
    TemporarilyUnavailable,
)
from broker.metrics import BrokerMetrics
from broker.notify import Notification, Notifier
from broker.oauth_request import JsonDocument, OAuthForm
from broker.policy.access import is_gateway
from broker.policy.engine import Policy
from broker.policy.model import Budget
from broker.state import StateStore, StateUnavailable
from broker.tokens import BrokerTokenVerifier
from broker.types import BrokerToken
from broker.usage.budgets import (
    Attribution,
    applicable,
    crossed,
    money,
    period_end,
    period_id,
)
from broker.usage.pricing import Priced, from_micro, price_call, to_micro
from broker.usage.state import UsageState
from idp_adapters.base import TokenRejected

log = logging.getLogger("broker.usage")

MAX_RECORDS = 100
MAX_UNITS = 20
MAX_TEXT = 128
OTHER = "other"


def paying_agent(chain: Sequence[str]) -> str:
    """The agent the person invoked: the last of a chain listed newest first."""
    return chain[-1] if chain else ""


def attribution_of(token: BrokerToken, cost_centre: str | None, credential: str) -> Attribution:
    return Attribution(
        person=token.subject,
        agent=paying_agent(token.actor_chain),
        cost_centre=cost_centre,
        credential=credential,
    )


def _reference(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


class BudgetRefused(AccessDenied):
    """A ``deny`` budget is spent (or reserved) up to its amount."""


def _money(micro: int) -> str:
    return money(from_micro(micro))


@dataclass(frozen=True, slots=True)
class _Keyed:
    name: str
    budget: Budget
    key: LedgerKey
    resets_at: datetime


class BudgetGate:
    """The budgets' side of a credential fetch (see the module docstring)."""

    def __init__(
        self,
        *,
        ledger: BudgetLedger,
        state: UsageState,
        clock: Clock,
        time_zone: str,
        hold_seconds: float,
        report_grace_seconds: float,
    ) -> None:
        self._ledger = ledger
        self._state = state
        self._clock = clock
        self._zone = ZoneInfo(time_zone)
        self._hold = hold_seconds
        self._grace = report_grace_seconds
        # Fetches without a reservation are noted once a minute per (gateway, token,
        # credential) by this process, not on every call: the note outlives the token anyway.
        self._noted: TTLCache[tuple[str, str, str], bool] = TTLCache(maxsize=100_000, ttl=60)

    def keyed(self, budgets: Sequence[tuple[str, Budget]], at: datetime) -> list[_Keyed]:
        keyed = []
        for name, budget in budgets:
            ends = period_end(budget, at, self._zone)
            ttl = max(ends.timestamp() - at.timestamp(), 0.0) + 2 * 86400
            key = LedgerKey(name, period_id(budget, at, self._zone), to_micro(budget.amount), ttl)
            keyed.append(_Keyed(name, budget, key, ends))
        return keyed

    async def admit(
        self,
        policy: Policy,
        who: Attribution,
        *,
        gateway: str,
        token: BrokerToken,
        request_id: str,
        record: dict[str, Any],
    ) -> str | None:
        """Reserve for a fetch, or raise `BudgetRefused` (or 503 when the ledger cannot be
        read and a deny budget applies). Returns the reservation id (None: no deny budget)."""
        now = datetime.fromtimestamp(self._clock.now(), UTC)
        denying = [(n, b) for n, b in applicable(policy, who) if b.action == "deny"]
        reservation: str | None = None
        if denying:
            keyed = self.keyed(denying, now)
            reservation = _reference(request_id, gateway, token.jti)
            entries = [(k.key, to_micro(k.budget.reserve_per_call or Decimal(0))) for k in keyed]
            try:
                outcome = await self._ledger.reserve(entries, reservation, self._hold)
            except StateUnavailable:
                raise TemporarilyUnavailable(
                    "budget state cannot be read right now; refusing (fail closed)",
                    reason="budget_state_unavailable",
                    headers={"Retry-After": "1"},
                ) from None
            if not outcome.granted:
                over = next(k for k in keyed if k.key == outcome.refused_by)
                record["budget"] = over.name
                raise BudgetRefused(
                    f"budget {over.name!r} ({over.budget.scope.kind.replace('_', ' ')} "
                    f"{over.budget.scope.value}) is used up: {_money(outcome.spent)} spent and "
                    f"{_money(outcome.reserved)} reserved of {_money(over.key.limit)} "
                    f"{over.budget.currency} for {over.key.period}; it resets at "
                    f"{over.resets_at.isoformat()}",
                    reason="budget_exceeded",
                )
            record["budget_reservation"] = reservation
        noted = (gateway, token.jti, who.credential)
        if reservation is None and noted in self._noted:
            return None
        ttl = max(token.expires_at - self._clock.now(), 0.0) + self._grace
        try:
            await self._state.note_fetch(
                gateway,
                token.jti,
                who.credential,
                cost_centre=who.cost_centre,
                reservation=reservation,
                ttl_seconds=ttl,
            )
        except StateUnavailable:
            if reservation is not None:
                await self.release(reservation, denying, now)
            raise TemporarilyUnavailable(
                "usage state cannot be written right now; refusing (fail closed)",
                reason="usage_state_unavailable",
                headers={"Retry-After": "1"},
            ) from None
        if reservation is None:
            self._noted[noted] = True
        return reservation

    async def release(
        self, reservation: str, budgets: Sequence[tuple[str, Budget]], at: datetime
    ) -> None:
        """Give back a reservation whose fetch was not served."""
        try:
            await self._ledger.release(reservation, [k.key for k in self.keyed(budgets, at)])
        except StateUnavailable:
            log.warning("a budget reservation could not be released now; it expires by itself")

    async def release_for(self, policy: Policy, who: Attribution, reservation: str) -> None:
        now = datetime.fromtimestamp(self._clock.now(), UTC)
        denying = [(n, b) for n, b in applicable(policy, who) if b.action == "deny"]
        await self.release(reservation, denying, now)


@dataclass(frozen=True, slots=True)
class _Report:
    call_id: str
    token: str
    credential: str
    provider: str
    model: str
    units: dict[str, Decimal]
    status: str
    occurred_at: datetime
    cost: Decimal | None
    currency: str | None
    usage_ref: str | None


def _text(value: object, name: str, limit: int = MAX_TEXT) -> str:
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise InvalidRequest(f"{name} must be a printable string of 1..{limit} characters")
    return value


def _parse(raw: object, now: float) -> _Report:
    if not isinstance(raw, Mapping):
        raise InvalidRequest("a record must be a JSON object")
    units_raw = raw.get("units")
    if not isinstance(units_raw, Mapping) or not units_raw or len(units_raw) > MAX_UNITS:
        raise InvalidRequest(f"units must be an object of 1..{MAX_UNITS} unit counts")
    units: dict[str, Decimal] = {}
    for unit, quantity in units_raw.items():
        if not isinstance(unit, str) or not unit.isidentifier() or len(unit) > 40:
            raise InvalidRequest("a unit name must be a short identifier (input_tokens, ...)")
        if isinstance(quantity, bool) or not isinstance(quantity, int | float):
            raise InvalidRequest(f"units.{unit} must be a number")
        if not math.isfinite(quantity) or quantity < 0 or quantity > 1e15:
            raise InvalidRequest(f"units.{unit} must be a finite, non-negative number")
        units[unit] = Decimal(str(quantity))
    occurred = raw.get("occurred_at", now)
    if isinstance(occurred, bool) or not isinstance(occurred, int | float):
        raise InvalidRequest("occurred_at must be seconds since the epoch")
    if not math.isfinite(occurred) or not now - 40 * 86400 <= occurred <= now + 300:
        raise InvalidRequest("occurred_at must be within the last 40 days (and not ahead)")
    cost: Decimal | None = None
    currency: str | None = None
    if raw.get("cost") is not None:
        given = raw["cost"]
        if not isinstance(given, Mapping):
            raise InvalidRequest("cost must be {amount, currency}")
        try:
            cost = Decimal(str(given.get("amount")))
        except InvalidOperation:
            raise InvalidRequest("cost.amount must be a decimal string") from None
        if not cost.is_finite() or cost < 0 or cost > Decimal("1000000000"):
            raise InvalidRequest("cost.amount must be a finite, non-negative amount")
        currency = given.get("currency")
        if not isinstance(currency, str) or len(currency) != 3 or not currency.isupper():
            raise InvalidRequest("cost.currency must be an ISO 4217 code")
    usage_ref = raw.get("usage_ref")
    if usage_ref is not None:
        usage_ref = _text(usage_ref, "usage_ref", 64)
    token = raw.get("token")
    if not isinstance(token, str) or not token:
        raise InvalidRequest("token (the agent token of the call) is required")
    status = raw.get("status", "ok")
    return _Report(
        call_id=_text(raw.get("call_id"), "call_id"),
        token=token,
        credential=_text(raw.get("credential"), "credential", 64),
        provider=_text(raw.get("provider"), "provider", 64),
        model=_text(raw.get("model"), "model"),
        units=units,
        status=_text(status, "status", 32),
        occurred_at=datetime.fromtimestamp(occurred, UTC),
        cost=cost,
        currency=currency,
        usage_ref=usage_ref,
    )


class UsageService:
    """``POST /v1/usage`` (see the module docstring)."""

    def __init__(
        self,
        *,
        verifier: BrokerTokenVerifier,
        policy: Callable[[], Policy],
        gate: BudgetGate,
        ledger: BudgetLedger,
        state: UsageState,
        store: StateStore,
        decisions: DecisionLog,
        notifier: Notifier,
        metrics: BrokerMetrics,
        clock: Clock,
        call_id_ttl_seconds: float,
        alert_channels: Sequence[str],
        issuer: str,
    ) -> None:
        self._verifier = verifier
        self._policy = policy
        self._gate = gate
        self._ledger = ledger
        self._state = state
        self._store = store
        self._decisions = decisions
        self._notifier = notifier
        self._metrics = metrics
        self._clock = clock
        self._call_ttl = call_id_ttl_seconds
        self._alert_channels = tuple(alert_channels)
        self._issuer = issuer

    async def report(
        self, body: OAuthForm, gateway: AuthenticatedClient | None, *, request_id: str
    ) -> dict[str, Any]:
        policy = self._policy()
        if gateway is None:
            raise InvalidClient("gateway authentication is required")
        if gateway.kind != "gateway" or not is_gateway(policy, gateway.client_id):
            raise InvalidClient("only registered gateways may report usage", reason="not_a_gateway")
        records = body.document.get("records") if isinstance(body, JsonDocument) else None
        if not isinstance(records, list) or not 1 <= len(records) <= MAX_RECORDS:
            raise InvalidRequest(f"records must be a list of 1..{MAX_RECORDS} usage records")
        results = []
        for raw in records:
            results.append(await self._one(policy, gateway.client_id, raw, request_id))
        return {"results": results}

    async def _one(
        self, policy: Policy, gateway: str, raw: object, request_id: str
    ) -> dict[str, Any]:
        call_id = raw.get("call_id") if isinstance(raw, Mapping) else None
        shown = call_id if isinstance(call_id, str) and len(call_id) <= MAX_TEXT else None
        try:
            return await self._record(policy, gateway, _parse(raw, self._clock.now()), request_id)
        except OAuthError as err:
            self._decisions.record(
                "usage.report",
                outcome="refused",
                error=err.error,
                reason=err.reason,
                description=err.description,
                gateway=gateway,
                call_id=shown,
                request_id=request_id,
                policy_version=policy.version,
            )
            return {"call_id": shown, "error": err.error, "error_description": err.description}

    async def _record(
        self, policy: Policy, gateway: str, report: _Report, request_id: str
    ) -> dict[str, Any]:
        try:
            token = await self._verifier.verify_for_accounting(report.token)
        except TokenRejected as exc:
            raise InvalidRequest(
                f"token rejected: {exc.reason}", reason="usage_token_rejected"
            ) from None
        try:
            ticket = await self._state.fetched(
                gateway, token.jti, report.credential, report.usage_ref
            )
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "usage state cannot be read right now; report again", reason="state_unavailable"
            ) from None
        if ticket is None:
            raise AccessDenied(
                f"this gateway fetched no credential {report.credential!r} for that token",
                reason="usage_not_fetched",
            )
        try:
            first = await self._state.claim_call(gateway, report.call_id, self._call_ttl)
        except StateUnavailable:
            raise TemporarilyUnavailable(
                "usage state cannot be read right now; report again", reason="state_unavailable"
            ) from None
        if not first:
            return {"call_id": report.call_id, "outcome": "duplicate"}
        try:
            return await self._count(policy, gateway, report, token, ticket, request_id)
        except BaseException:
            try:
                await self._state.release_call(gateway, report.call_id)
            except StateUnavailable:
                log.warning("a usage claim could not be released; its retry counts as duplicate")
            raise

    async def _count(
        self,
        policy: Policy,
        gateway: str,
        report: _Report,
        token: BrokerToken,
        ticket: Any,
        request_id: str,
    ) -> dict[str, Any]:
        if report.cost is not None:
            priced = Priced(report.cost.quantize(Decimal("0.000001")), report.currency, "gateway")
        else:
            priced = price_call(
                policy.prices, report.provider, report.model, report.units, report.occurred_at
            )
        who = attribution_of(token, ticket.cost_centre, report.credential)
        budgets = applicable(policy, who)
        keyed = self._gate.keyed(budgets, report.occurred_at)
        spent: Mapping[LedgerKey, tuple[int, int]] = {}
        if keyed:
            entries = [
                (k.key, priced.micro if priced.currency == k.budget.currency else 0) for k in keyed
            ]
            deny_entries = [
                e for e, k in zip(entries, keyed, strict=True) if k.budget.action == "deny"
            ]
            other_entries = [
                e for e, k in zip(entries, keyed, strict=True) if k.budget.action != "deny"
            ]
            try:
                after: dict[LedgerKey, tuple[int, int]] = {}
                if deny_entries:
                    reservation = ticket.reservation or _reference("usage", gateway, report.call_id)
                    after.update(await self._ledger.settle(reservation, deny_entries))
                if other_entries:
                    after.update(
                        await self._ledger.record(
                            other_entries, _reference("usage", gateway, report.call_id)
                        )
                    )
                spent = after
            except StateUnavailable:
                raise TemporarilyUnavailable(
                    "budget state cannot be written right now; report again",
                    reason="budget_state_unavailable",
                ) from None
        self._decisions.record(
            "usage.recorded",
            outcome="recorded",
            reason="recorded",
            call_id=report.call_id,
            gateway=gateway,
            credential=report.credential,
            provider=report.provider,
            model=report.model,
            units={u: float(q) if q % 1 else int(q) for u, q in report.units.items()},
            status=report.status,
            occurred_at=report.occurred_at.isoformat(),
            cost=str(priced.cost) if priced.cost is not None else None,
            currency=priced.currency if priced.cost is not None else None,
            priced_by=priced.priced_by,
            unpriced_reason=priced.reason,
            price={"valid_from": priced.valid_from.isoformat(), "currency": priced.currency}
            if priced.valid_from is not None and priced.cost is not None
            else None,
            person=token.subject,
            idp=token.provenance.idp,
            agent_chain=list(token.actor_chain),
            cost_centre=ticket.cost_centre,
            jti=token.jti,
            budgets=[k.name for k in keyed] or None,
            request_id=request_id,
            policy_version=policy.version,
        )
        self._observe(policy, who, report, priced)
        for k in keyed:
            counters = spent.get(k.key)
            if counters is None or k.budget.currency != priced.currency:
                continue
            total = counters[0]
            if k.key.limit:
                self._metrics.set_budget_utilisation(k.name, total / k.key.limit)
            for threshold in crossed(k.budget.thresholds, total - priced.micro, total, k.key.limit):
                await self._alert(k, threshold, total)
        if priced.cost is None:
            await self._unknown_model(report, priced)
        return {
            "call_id": report.call_id,
            "outcome": "recorded",
            "cost": str(priced.cost) if priced.cost is not None else None,
            "currency": priced.currency if priced.cost is not None else None,
            "priced_by": priced.priced_by,
        }

    def _observe(self, policy: Policy, who: Attribution, report: _Report, priced: Priced) -> None:
        known_models = {(p.provider, p.model) for p in policy.prices}
        provider, model = (
            (report.provider, report.model)
            if (report.provider, report.model) in known_models
            else (OTHER, OTHER)
        )
        centres = {a.spec.cost_centre for a in policy.agents.values() if a.spec.cost_centre} | {
            c for _, c in policy.group_cost_centres
        }
        centre = who.cost_centre if who.cost_centre in centres else OTHER
        self._metrics.observe_usage(
            centre,
            provider,
            model,
            {u: float(q) for u, q in report.units.items()},
            float(priced.cost) if priced.cost is not None else None,
            priced.currency
            if priced.currency
            in {p.currency for p in policy.prices} | {b.currency for b in policy.budgets.values()}
            else OTHER,
            priced.reason,
        )

    async def _once(self, key: str, ttl: float) -> bool:
        try:
            return await self._store.use_once(key, ttl)
        except StateUnavailable:
            log.warning("an alert's once-per-period mark cannot be written; alerting anyway")
            return True

    async def _alert(self, keyed: _Keyed, threshold: int, spent: int) -> None:
        name, budget, key = keyed.name, keyed.budget, keyed.key
        if not await self._once(f"budget-alert:{name}:{key.period}:{threshold}", key.ttl_seconds):
            return
        text = (
            f"Budget {name} ({budget.scope.kind.replace('_', ' ')} {budget.scope.value}) has "
            f"reached {threshold} % for {key.period}: {_money(spent)} of {_money(key.limit)} "
            f"{budget.currency} spent; it resets at {keyed.resets_at.isoformat()}."
        )
        self._decisions.record(
            "budget.alert",
            outcome="sent" if budget.channels else "recorded",
            reason=f"threshold_{threshold}",
            budget=name,
            period=key.period,
            threshold=threshold,
            spent=str(from_micro(spent)),
            amount=str(budget.amount),
            currency=budget.currency,
            action=budget.action,
            channels=list(budget.channels) or None,
        )
        if budget.channels:
            self._notifier.notify(
                budget.channels,
                Notification(
                    event="budget.threshold",
                    title=f"Budget {name}: {threshold} % reached",
                    text=text,
                    idempotency_key=f"budget:{name}:{key.period}:{threshold}",
                    fields=(
                        ("budget", name),
                        ("scope", f"{budget.scope.kind}={budget.scope.value}"),
                        ("period", key.period),
                        ("spent", f"{from_micro(spent)} {budget.currency}"),
                        ("amount", f"{budget.amount} {budget.currency}"),
                        ("threshold", f"{threshold} %"),
                        ("action at the limit", budget.action),
                    ),
                ),
            )

    async def _unknown_model(self, report: _Report, priced: Priced) -> None:
        day = report.occurred_at.date().isoformat()
        key = f"usage-unpriced:{_reference(report.provider, report.model, day)}"
        if not await self._once(key, 2 * 86400):
            return
        text = (
            f"Calls to {report.provider}/{report.model} are recorded without a cost "
            f"({priced.reason}): add it to the policy's price table."
        )
        self._decisions.record(
            "usage.unpriced",
            outcome="sent" if self._alert_channels else "recorded",
            reason=priced.reason,
            provider=report.provider,
            model=report.model,
            day=day,
        )
        if self._alert_channels:
            self._notifier.notify(
                self._alert_channels,
                Notification(
                    event="usage.unpriced",
                    title=f"Unpriced model {report.provider}/{report.model}",
                    text=text,
                    idempotency_key=key,
                    fields=(("provider", report.provider), ("model", report.model), ("day", day)),
                ),
            )

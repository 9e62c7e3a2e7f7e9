"""Prometheus metrics, served at ``GET /metrics``.

Each `BrokerMetrics` owns its own `CollectorRegistry` (never the process-wide default one), so
several apps in one process do not collide. Three sources:

- decisions: `BrokerMetrics` is a `DecisionSink`; every audit record counts once in
  ``broker_decisions_total{event, outcome, reason}``. Label values are fixed codes; anything not
  matching ``[a-z0-9_.]{1,64}`` is counted as ``other``, so user input can neither leak into a
  label nor grow the label set without bound.
- request latency: ``broker_request_duration_seconds{route, status}`` for the authenticated POST
  routes, labelled with the route *template* (``/v1/credentials/{name}``) and status class.
- read on scrape: credential cache counters per credential name of the current policy, the
  policy version, reload counters and audit sink lag.

Labels never carry tokens, secrets or person identifiers.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client import Metric

    from broker.approvals.model import ApprovalRecord
    from broker.audit import DecisionLog
    from broker.cache import CredentialCache
    from broker.policy.store import PolicyStore

_LABEL_VALUE = re.compile(r"[a-z0-9_.]{1,64}")
_CACHE_STATS = (
    ("hits", "Credential gets answered from memory (stale ones included)."),
    ("misses", "Credential gets that had to wait for (or were refused by) the backend."),
    ("refreshes", "Successful backend refresh rounds (first loads included)."),
    ("refresh_errors", "Failed backend refresh rounds."),
    ("stale_served", "Gets answered with a value past its refresh interval."),
    ("backend_reads", "Backend read calls."),
    ("version_checks", "Backend current-version calls."),
    ("rejection_hints", "Rejected-version hints from gateways naming the version held."),
    ("hint_refreshes", "Backend rounds started by rejected-version hints."),
)
APPROVAL_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 86400.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def label_value(value: Any) -> str:
    """`value` if it is a short fixed code, else ``other`` (``none`` when absent)."""
    if value is None:
        return "none"
    text = str(value)
    return text if _LABEL_VALUE.fullmatch(text) else "other"


_CHILDREN_REMEMBERED = 1024
"""Labelled children a metric remembers by their raw label inputs (beyond: looked up each time)."""


def status_class(status: int) -> str:
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


class BrokerMetrics:
    """The broker's metrics in a private registry; also a `DecisionSink` (see module doc)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "broker_decisions",
            "Audit decisions by event, outcome and reason.",
            ("event", "outcome", "reason"),
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "broker_request_duration_seconds",
            "Latency of authenticated POST requests by route template and status class.",
            ("route", "status"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.approval_decision_seconds = Histogram(
            "broker_approval_decision_seconds",
            "Time from an approval request to its decision (approved, denied or expired), by "
            "approval rule and outcome.",
            ("rule", "outcome"),
            buckets=APPROVAL_BUCKETS,
            registry=self.registry,
        )
        # The labelled children of the per-request metrics, by their raw inputs: prometheus'
        # labels() validates and locks on every call, a dict lookup does not. Bounded like the
        # label sets themselves (route templates, status classes, fixed codes).
        self._durations: dict[tuple[str, int], Any] = {}
        self._decision_counts: dict[tuple[Any, Any, Any], Any] = {}
        self.approvals_pending = Gauge(
            "broker_approvals_pending",
            "Approval requests waiting for a decision, in the shared state (as last seen by "
            "this replica).",
            registry=self.registry,
        )
        self.notifications = Counter(
            "broker_notifications",
            "Notification deliveries by configured channel and outcome (delivered, failed).",
            ("channel", "outcome"),
            registry=self.registry,
        )
        self.usage_cost = Counter(
            "broker_usage_cost",
            "Spend reported by gateways, priced, by cost centre, provider, model and currency "
            "(label values from the policy only: anything else is 'other').",
            ("cost_centre", "provider", "model", "currency"),
            registry=self.registry,
        )
        self.usage_units = Counter(
            "broker_usage_units",
            "Units reported by gateways (tokens, ...), by cost centre, provider, model, unit.",
            ("cost_centre", "provider", "model", "unit"),
            registry=self.registry,
        )
        self.usage_unpriced = Counter(
            "broker_usage_unpriced_calls",
            "Calls recorded without a cost (unknown model, unit not in the price), by provider "
            "and model as the policy knows them.",
            ("provider", "model", "reason"),
            registry=self.registry,
        )
        self.budget_utilisation = Gauge(
            "broker_budget_utilisation_ratio",
            "Spent (settled) over the amount, per budget, for its current period (as last seen "
            "by this replica).",
            ("budget",),
            registry=self.registry,
        )
        self._bound = False

    def observe_usage(
        self,
        cost_centre: str,
        provider: str,
        model: str,
        units: Mapping[str, float],
        cost: float | None,
        currency: str | None,
        unpriced_reason: str | None,
    ) -> None:
        """One recorded call. Label values are the caller's, already mapped to names the
        policy knows (or ``other``), so the label set stays bounded."""
        for unit, quantity in units.items():
            self.usage_units.labels(cost_centre, provider, model, unit[:40]).inc(quantity)
        if cost is not None and currency is not None:
            self.usage_cost.labels(cost_centre, provider, model, currency).inc(cost)
        if unpriced_reason is not None:
            self.usage_unpriced.labels(provider, model, label_value(unpriced_reason)).inc()

    def set_budget_utilisation(self, budget: str, ratio: float) -> None:
        self.budget_utilisation.labels(budget[:64]).set(ratio)

    def count_notification(self, channel: str, outcome: str) -> None:
        """Channel names come from the configuration (or ``unknown``): a bounded label set."""
        self.notifications.labels(channel[:64], label_value(outcome)).inc()

    def observe_approval_decided(self, record: ApprovalRecord) -> None:
        """An approval request reached a decision: time to decision, per rule (names from the
        policy, so the label set stays bounded)."""
        if record.decided_at is None:
            return
        waited = max(0.0, record.decided_at - record.created_at)
        for rule in record.rules:  # names the policy validated (a bounded set)
            self.approval_decision_seconds.labels(rule[:64], label_value(record.state)).observe(
                waited
            )

    def set_approvals_pending(self, count: int) -> None:
        self.approvals_pending.set(count)

    # DecisionSink
    def write(self, record: Mapping[str, Any]) -> None:
        # Only fixed-format labels, so this cannot raise (a raising sink fails the request).
        key = (
            record.get("event"),
            record.get("outcome"),
            record.get("reason") or record.get("error"),
        )
        counter = self._decision_counts.get(key)
        if counter is None:
            counter = self.decisions.labels(*(label_value(value) for value in key))
            if len(self._decision_counts) < _CHILDREN_REMEMBERED and all(
                value is None or type(value) is str for value in key
            ):
                self._decision_counts[key] = counter
        counter.inc()

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        histogram = self._durations.get(key)
        if histogram is None:
            histogram = self.request_duration.labels(route, status_class(status))
            if len(self._durations) < _CHILDREN_REMEMBERED:
                self._durations[key] = histogram
        histogram.observe(seconds)

    def bind(
        self, *, policies: PolicyStore, cache: CredentialCache, decisions: DecisionLog
    ) -> None:
        """Register the scrape-time collector over the broker's live objects (once)."""
        if self._bound:
            return
        self.registry.register(_StateCollector(policies, cache, decisions))
        self._bound = True


class _StateCollector(Collector):
    def __init__(
        self, policies: PolicyStore, cache: CredentialCache, decisions: DecisionLog
    ) -> None:
        self._policies = policies
        self._cache = cache
        self._decisions = decisions

    def collect(self) -> Iterator[Metric]:
        from broker.credentials import secret_ref

        policy = self._policies.current()
        names: dict[tuple[Any, ...], str] = {}
        for name, credential in policy.credentials.items():
            ref = secret_ref(credential)
            names[(ref.backend, ref.path, ref.field, ref.stage)] = name
        totals: dict[str, dict[str, int]] = {}
        for ref, stats in self._cache.stats().items():
            name = names.get((ref.backend, ref.path, ref.field, ref.stage))
            if name is None:  # a credential no longer in the policy
                continue
            per = totals.setdefault(name, dict.fromkeys((s for s, _ in _CACHE_STATS), 0))
            for stat, _ in _CACHE_STATS:
                per[stat] += getattr(stats, stat)
        for stat, doc in _CACHE_STATS:
            family = CounterMetricFamily(
                f"broker_credential_cache_{stat}", doc, labels=("credential",)
            )
            for name in sorted(totals):
                family.add_metric((name,), totals[name][stat])
            yield family

        age = GaugeMetricFamily(
            "broker_credential_age_seconds",
            "Seconds since the store last confirmed the version served (read or version check).",
            labels=("credential",),
        )
        stale = GaugeMetricFamily(
            "broker_credential_stale",
            "1 while the value served is the last good one after a failed refresh.",
            labels=("credential",),
        )
        now = time.time()
        for name, credential in sorted(policy.credentials.items()):
            cached = self._cache.peek(secret_ref(credential))
            if cached is None:
                continue
            age.add_metric((name,), max(0.0, now - cached.loaded_at))
            stale.add_metric((name,), 1 if cached.stale else 0)
        yield age
        yield stale

        info = GaugeMetricFamily(
            "broker_policy_version_info",
            "The policy version in force (value 1).",
            labels=("version",),
        )
        info.add_metric((policy.version[:80],), 1)
        yield info
        yield CounterMetricFamily(
            "broker_policy_reloads",
            "Policy reloads that swapped a version in.",
            value=self._policies.reloads,
        )
        yield CounterMetricFamily(
            "broker_policy_reload_failures",
            "Policy reloads rejected (previous version kept).",
            value=self._policies.reload_failures,
        )
        yield GaugeMetricFamily(
            "broker_policy_last_reload_failed",
            "1 while the last policy reload was rejected, else 0.",
            value=1 if self._policies.last_error is not None else 0,
        )
        lag = GaugeMetricFamily(
            "broker_audit_sink_lag_records",
            "Audit records accepted but not yet stored, per asynchronous sink.",
            labels=("sink",),
        )
        for sink, pending in sorted(self._decisions.sink_lag().items()):
            lag.add_metric((sink,), pending)
        yield lag

"""broker.focus: ``usage.recorded`` audit records as FOCUS 1.2 rows, aggregated per day and
dimension (pure; the FinOps Foundation validator runs in tests/integration/test_usage_report.py).
"""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from broker.focus import COLUMNS, MANDATORY_1_2, focus_export

FOCUS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
COSTS = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost")
# FOCUS 1.2: the columns every cost and usage dataset carries, whatever the provider supports.
FOCUS_1_2_MANDATORY = {
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}  # fmt: skip


def _record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": "2026-11-30T12:00:01.000+00:00",
        "event": "usage.recorded",
        "outcome": "recorded",
        "call_id": "gw-1",
        "gateway": "llm-gateway",
        "credential": "openai-api-key",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "units": {"input_tokens": 120, "output_tokens": 30},
        "status": "ok",
        "occurred_at": "2026-11-30T12:34:56+00:00",
        "cost": "0.001200",
        "currency": "USD",
        "priced_by": "price_table",
        "price": {"valid_from": "2026-11-01", "currency": "USD"},
        "person": "dev/alice",
        "idp": "dev",
        "agent_chain": ["summariser-agent", "triage-agent"],
        "cost_centre": "support-ops",
        "request_id": "req-1",
    }
    record.update(overrides)
    return {k: v for k, v in record.items() if v is not None}  # the trail omits nulls


def _csv_rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_every_focus_1_2_mandatory_column_is_a_column() -> None:
    assert FOCUS_1_2_MANDATORY <= MANDATORY_1_2 <= set(COLUMNS)
    assert len(set(COLUMNS)) == len(COLUMNS)
    header = next(csv.reader(io.StringIO(focus_export([_record()]).csv())))
    assert header == list(COLUMNS)


def test_a_priced_call_is_a_usage_row_with_its_cost_and_attribution() -> None:
    export = focus_export([_record()])
    [row] = _csv_rows(export.csv())
    assert export.unpriced == 0
    for column in FOCUS_1_2_MANDATORY - {"ChargeClass"}:
        assert row[column] != "", column
    assert row["ChargeClass"] == ""  # null: not a correction
    assert row["ChargeCategory"] == "Usage" and row["ChargeFrequency"] == "Usage-Based"
    assert {Decimal(row[c]) for c in COSTS} == {Decimal("0.0012")}
    assert row["BillingCurrency"] == "USD"
    assert row["ProviderName"] == row["PublisherName"] == row["InvoiceIssuerName"] == "OpenAI"
    assert row["ServiceCategory"] == "AI and Machine Learning"
    assert row["SkuId"] == "openai/gpt-4o-mini"
    assert row["SkuPriceId"] == "openai/gpt-4o-mini@2026-11-01"
    assert row["ResourceId"] == "openai-api-key"
    assert (row["ChargePeriodStart"], row["ChargePeriodEnd"]) == (
        "2026-11-30T00:00:00Z",
        "2026-12-01T00:00:00Z",
    )
    assert (row["BillingPeriodStart"], row["BillingPeriodEnd"]) == (
        "2026-11-01T00:00:00Z",
        "2026-12-01T00:00:00Z",
    )
    for column in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart"):
        assert FOCUS_TIME.match(row[column]), column
    tags = json.loads(row["Tags"])
    assert isinstance(tags, dict) and all(isinstance(v, str) for v in tags.values())
    assert tags["broker/person"] == "dev/alice" and tags["broker/cost_centre"] == "support-ops"
    assert tags["broker/agent"] == "triage-agent"  # the one the person invoked: the last
    assert row["x_Agent"] == "triage-agent" and row["x_Person"] == "dev/alice"
    assert row["x_CostCentre"] == "support-ops" and row["x_CallCount"] == "1"
    assert (Decimal(row["x_InputTokens"]), Decimal(row["x_OutputTokens"])) == (120, 30)


def test_calls_of_one_day_and_dimension_are_one_row_and_others_are_not() -> None:
    records = [
        _record(call_id="a", occurred_at="2026-11-30T01:00:00+00:00", cost="0.001"),
        _record(call_id="b", occurred_at="2026-11-30T23:59:59+00:00", cost="0.002"),
        _record(call_id="c", occurred_at="2026-12-01T00:00:00+00:00", cost="0.004"),
        _record(call_id="d", occurred_at="2026-11-30T05:00:00+00:00", person="dev/bob"),
        _record(call_id="e", occurred_at="2026-11-30T06:00:00+00:00", cost_centre=None),
        _record(call_id="f", occurred_at="2026-11-30T07:00:00+00:00", model="gpt-4o"),
    ]
    rows = _csv_rows(focus_export(records).csv())
    assert len(rows) == 5
    [both] = [
        r
        for r in rows
        if r["x_Person"] == "dev/alice"
        and r["x_CostCentre"] == "support-ops"
        and r["SkuId"] == "openai/gpt-4o-mini"
        and r["ChargePeriodStart"] == "2026-11-30T00:00:00Z"
    ]
    assert both["x_CallCount"] == "2"
    assert Decimal(both["BilledCost"]) == Decimal("0.003")
    assert Decimal(both["x_InputTokens"]) == 240
    [december] = [r for r in rows if r["ChargePeriodStart"] == "2026-12-01T00:00:00Z"]
    assert december["BillingPeriodStart"] == "2026-12-01T00:00:00Z"
    assert december["BillingPeriodEnd"] == "2027-01-01T00:00:00Z"
    assert sum(Decimal(r["BilledCost"]) for r in rows) == Decimal("0.0106")


def test_a_price_change_within_a_day_keeps_each_price_on_its_own_row() -> None:
    rows = _csv_rows(
        focus_export(
            [
                _record(call_id="old"),
                _record(call_id="new", price={"valid_from": "2026-11-30", "currency": "USD"}),
                _record(call_id="gw", priced_by="gateway", price=None, cost="0.5", currency="EUR"),
            ]
        ).csv()
    )
    assert sorted(r["SkuPriceId"] for r in rows) == [
        "openai/gpt-4o-mini@2026-11-01",
        "openai/gpt-4o-mini@2026-11-30",
        "openai/gpt-4o-mini@gateway",
    ]
    [euro] = [r for r in rows if r["BillingCurrency"] == "EUR"]
    assert Decimal(euro["BilledCost"]) == Decimal("0.5")


def test_unpriced_calls_are_left_out_and_counted_never_zero() -> None:
    unpriced = _record(
        call_id="u", model="mystery-9", cost=None, currency=None, price=None, priced_by="unpriced"
    )
    export = focus_export([_record(), unpriced, unpriced | {"call_id": "u2"}])
    assert export.unpriced == 2
    rows = _csv_rows(export.csv())
    assert [r["SkuId"] for r in rows] == ["openai/gpt-4o-mini"]
    assert all(Decimal(r["BilledCost"]) != 0 for r in rows)


def test_since_and_until_select_by_when_the_call_happened() -> None:
    records = [
        _record(call_id=str(day), occurred_at=f"2026-11-{day:02d}T12:00:00+00:00")
        for day in (28, 29, 30)
    ]
    export = focus_export(
        records,
        since=datetime(2026, 11, 29, tzinfo=UTC),
        until=datetime(2026, 11, 30, 12, tzinfo=UTC),
    )
    assert [r["ChargePeriodStart"] for r in _csv_rows(export.csv())] == ["2026-11-29T00:00:00Z"]


def test_decimals_always_carry_a_fraction_and_no_exponent() -> None:
    rows = _csv_rows(
        focus_export([_record(cost="2"), _record(call_id="x", model="m", cost="1E-7")]).csv()
    )
    for row in rows:
        for column in (*COSTS, "PricingQuantity", "ConsumedQuantity"):
            assert "." in row[column] and "E" not in row[column].upper(), (column, row[column])
    assert {r["BilledCost"] for r in rows} == {"2.0", "0.0000001"}


@pytest.mark.parametrize("event", ["credential.fetch", "usage.unpriced", "audit.checkpoint"])
def test_other_events_are_not_usage(event: str) -> None:
    export = focus_export([_record(event=event)])
    assert export.rows == [] and export.unpriced == 0


def test_the_billing_account_is_configurable() -> None:
    [row] = _csv_rows(focus_export([_record()], billing_account="acme-ai").csv())
    assert row["BillingAccountId"] == row["BillingAccountName"] == "acme-ai"

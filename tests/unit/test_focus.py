"""broker.focus: usage audit records as FOCUS 1.2 rows (pure; the validator run is in
tests/integration/test_usage_report.py)."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from broker.focus import (
    COLUMNS,
    CUSTOM_COLUMNS,
    MANDATORY_COLUMNS,
    decimal_text,
    focus_csv,
    focus_row,
    parse_usage,
    publisher_name,
)

FOCUS_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
DECIMAL_COLUMNS = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingQuantity",
    "ConsumedQuantity",
)


def _record(**overrides: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": "2026-11-30T12:00:01.000+00:00",
        "event": "usage.recorded",
        "outcome": "recorded",
        "call_id": "gw-123",
        "gateway": "llm-gateway",
        "credential": "openai-api-key",
        "provider": "openai",
        "model": "gpt-4o-mini",
        "units": {"input_tokens": 120, "output_tokens": 30, "cached_tokens": 0},
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
        "jti": "j-1",
        "policy_version": "v1",
        "request_id": "req-1",
        "chain": "chain-a",
        "seq": 7,
    }
    record.update(overrides)
    return record


def test_the_columns_hold_every_focus_1_2_mandatory_column_and_custom_ones_are_prefixed() -> None:
    assert len(MANDATORY_COLUMNS) == 21
    assert set(MANDATORY_COLUMNS) <= set(COLUMNS)
    assert len(set(COLUMNS)) == len(COLUMNS)
    for column in COLUMNS:
        if column in CUSTOM_COLUMNS:
            assert column.startswith("x_")
        else:  # FOCUS column ids: PascalCase, alphanumeric
            assert re.fullmatch(r"[A-Z][A-Za-z]+", column), column


def test_a_priced_record_is_one_usage_row_with_exact_costs() -> None:
    row = focus_row(parse_usage(_record()))
    assert all(row[column] != "" for column in MANDATORY_COLUMNS if column != "ChargeClass")
    assert row["ChargeClass"] == ""  # null: not a correction
    assert row["ChargeCategory"] == "Usage"
    assert row["ChargeFrequency"] == "Usage-Based"
    for column in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost"):
        assert Decimal(row[column]) == Decimal("0.0012")
    assert row["BillingCurrency"] == "USD"
    # unit price x quantity = cost, exactly
    assert Decimal(row["ListUnitPrice"]) * Decimal(row["PricingQuantity"]) == Decimal(
        row["ListCost"]
    )
    assert Decimal(row["ContractedUnitPrice"]) * Decimal(row["PricingQuantity"]) == Decimal(
        row["ContractedCost"]
    )
    assert (row["PricingUnit"], row["ConsumedUnit"]) == ("Requests", "Requests")
    for column in DECIMAL_COLUMNS:
        assert "." in row[column] and "E" not in row[column].upper(), (column, row[column])
    assert row["ProviderName"] == row["PublisherName"] == row["InvoiceIssuerName"] == "OpenAI"
    assert row["ServiceName"] == "OpenAI API"
    assert row["ServiceCategory"] == "AI and Machine Learning"
    assert row["SkuId"] == "openai/gpt-4o-mini"
    assert row["SkuPriceId"] == "openai/gpt-4o-mini@2026-11-01"
    assert row["ResourceName"] == "openai-api-key"
    assert row["ResourceId"] != row["ResourceName"]
    assert row["ChargePeriodStart"] == "2026-11-30T12:00:00Z"
    assert row["ChargePeriodEnd"] == "2026-11-30T13:00:00Z"
    assert row["BillingPeriodStart"] == "2026-11-01T00:00:00Z"
    assert row["BillingPeriodEnd"] == "2026-12-01T00:00:00Z"
    for column in ("ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart"):
        assert FOCUS_TIME.match(row[column])


def test_attribution_in_tags_and_custom_columns() -> None:
    row = focus_row(parse_usage(_record()))
    tags = json.loads(row["Tags"])
    assert tags == {
        "broker/cost-centre": "support-ops",
        "broker/person": "dev/alice",
        "broker/agent": "triage-agent",  # the paying agent: the last of the chain
        "broker/agent-chain": "summariser-agent < triage-agent",
    }
    assert all(isinstance(value, str) for value in tags.values())
    assert row["x_CostCentre"] == "support-ops"
    assert row["x_Person"] == "dev/alice"
    assert row["x_Agent"] == "triage-agent"
    assert json.loads(row["x_AgentChain"]) == ["summariser-agent", "triage-agent"]
    assert (row["x_InputTokens"], row["x_OutputTokens"], row["x_CachedTokens"]) == (
        "120",
        "30",
        "0",
    )
    assert json.loads(row["x_Units"]) == {
        "input_tokens": 120,
        "output_tokens": 30,
        "cached_tokens": 0,
    }
    assert (row["x_CallId"], row["x_AuditChain"], row["x_AuditSeq"]) == ("gw-123", "chain-a", "7")
    assert row["x_CallCount"] == "1"


def test_no_cost_centre_leaves_the_tag_out_and_the_column_null() -> None:
    row = focus_row(parse_usage(_record(cost_centre=None)))
    assert "broker/cost-centre" not in json.loads(row["Tags"])
    assert row["x_CostCentre"] == ""


def test_december_bills_into_january_of_the_next_year() -> None:
    row = focus_row(parse_usage(_record(occurred_at="2026-12-31T23:59:59Z")))
    assert row["BillingPeriodStart"] == "2026-12-01T00:00:00Z"
    assert row["BillingPeriodEnd"] == "2027-01-01T00:00:00Z"
    assert row["ChargePeriodEnd"] == "2027-01-01T00:00:00Z"


def test_an_occurred_at_with_an_offset_is_converted_to_utc() -> None:
    usage = parse_usage(_record(occurred_at="2026-12-01T00:30:00+02:00"))
    assert usage.occurred_at == datetime(2026, 11, 30, 22, 30, tzinfo=UTC)
    assert focus_row(usage)["BillingPeriodStart"] == "2026-11-01T00:00:00Z"


def test_gateway_priced_record_names_the_gateway_price() -> None:
    row = focus_row(
        parse_usage(
            _record(cost="0.5", currency="eur", priced_by="gateway", price=None, provider="mistral")
        )
    )
    assert row["BillingCurrency"] == "EUR"
    assert row["BilledCost"] == "0.5"
    assert row["SkuPriceId"] == "mistral/gpt-4o-mini@gateway"
    assert row["ProviderName"] == "Mistral AI"


def test_unpriced_records_have_no_row_never_a_zero_one() -> None:
    unpriced = parse_usage(_record(cost=None, currency=None, priced_by="unpriced", price=None))
    assert unpriced.cost is None
    with pytest.raises(ValueError, match="unpriced"):
        focus_row(unpriced)
    text = focus_csv([parse_usage(_record()), unpriced, parse_usage(_record(call_id="gw-2"))])
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["x_CallId"] for r in rows] == ["gw-123", "gw-2"]
    assert list(rows[0]) == list(COLUMNS)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"event": "credential.fetch"}, "not a usage.recorded"),
        ({"cost": "0.1", "currency": None}, "without a currency"),
        ({"cost": "lots"}, "cost is not a number"),
        ({"cost": "NaN"}, "not finite"),
        ({"units": {"input_tokens": True}}, "units.input_tokens"),
        ({"units": ["input_tokens"]}, "units is not an object"),
        ({"occurred_at": "yesterday"}, "occurred_at"),
        ({"occurred_at": None}, "occurred_at"),
        ({"credential": None}, "credential"),
        ({"agent_chain": "triage-agent"}, "agent_chain"),
    ],
)
def test_malformed_records_are_refused_with_the_reason(
    overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        parse_usage(_record(**overrides))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ("5", "5.0"),
        ("0.001200", "0.001200"),
        ("1E-7", "0.0000001"),
        ("-0", "0.0"),
        ("12.5", "12.5"),
        ("1E+3", "1000.0"),
    ],
)
def test_decimal_text_is_plain_with_a_fraction(value: str, text: str) -> None:
    assert decimal_text(Decimal(value)) == text


def test_unknown_providers_keep_their_name() -> None:
    assert publisher_name("anthropic") == "Anthropic"
    assert publisher_name("OpenAI") == "OpenAI"
    assert publisher_name("acme-llm") == "acme-llm"

"""Usage records of the audit trail as FOCUS 1.2 rows: the FinOps Foundation's Open Cost and
Usage Specification, the CSV finance tools import. Pure: records in, rows and CSV text out.

One row per ``usage.recorded`` record that carries a cost (a record priced neither by the price
table nor by the gateway has no row: it is counted by the caller, never written as zero). A row
is one provider call, so every figure on it is exact and traceable to its audit record
(``x_CallId``, ``x_AuditChain``, ``x_AuditSeq``):

- ChargeCategory "Usage", ChargeClass null (no corrections), ChargeFrequency "Usage-Based".
- ChargePeriod: the UTC hour of the call; BillingPeriod: the UTC calendar month of the call.
- BilledCost = EffectiveCost = ListCost = ContractedCost = the recorded cost, in BillingCurrency
  (the record's currency). The broker applies no discounts and knows of no commitments.
- PricingQuantity 1 / PricingUnit "Requests" and ConsumedQuantity 1 / ConsumedUnit "Requests":
  a row is one request, priced as a whole from its units; ListUnitPrice = ContractedUnitPrice =
  the request's cost, so unit price x quantity = cost holds exactly. The units themselves (tokens
  and any other unit the provider bills by) are in x_InputTokens, x_OutputTokens,
  x_CachedTokens and x_Units (a JSON object of every unit). SkuId is provider/model; SkuPriceId
  names the price applied: the price table entry (provider/model@valid-from) or the gateway's.
- ProviderName = PublisherName = InvoiceIssuerName: the model's publisher (OpenAI, Anthropic,
  ...); ServiceName "<publisher> API"; ServiceCategory "AI and Machine Learning",
  ServiceSubcategory "Generative AI".
- BillingAccountId/Name, ResourceId/Name/Type: the broker credential the call was made with (an
  API key bills to one provider account; the broker knows no finer account).
- Attribution in the specification's conventions: Tags (KeyValueFormat, broker-defined keys under
  the ``broker/`` prefix: cost centre, person, paying agent, agent chain) and custom columns
  prefixed ``x_`` (x_CostCentre, x_Person, x_Agent, x_AgentChain, x_CallCount, ...).
- Conditional columns that do not apply (commitment discounts, regions, sub accounts) are
  present and null, as the specification allows when a charge is not related to them.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

FOCUS_VERSION = "1.2"

MANDATORY_COLUMNS: tuple[str, ...] = (
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "ContractedCost",
    "EffectiveCost",
    "InvoiceIssuerName",
    "ListCost",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "ServiceCategory",
    "ServiceName",
)
"""The columns FOCUS 1.2 requires in every dataset (not conditional on provider features)."""

CONDITIONAL_COLUMNS: tuple[str, ...] = (
    "ChargeFrequency",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedUnitPrice",
    "ListUnitPrice",
    "PricingCategory",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceSubcategory",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
)
"""Recommended and conditional FOCUS 1.2 columns this export fills (or leaves null)."""

CUSTOM_COLUMNS: tuple[str, ...] = (
    "x_CostCentre",
    "x_Person",
    "x_IdentityProvider",
    "x_Agent",
    "x_AgentChain",
    "x_Credential",
    "x_Gateway",
    "x_Provider",
    "x_Model",
    "x_CallId",
    "x_CallCount",
    "x_Status",
    "x_OccurredAt",
    "x_PricedBy",
    "x_PriceValidFrom",
    "x_InputTokens",
    "x_OutputTokens",
    "x_CachedTokens",
    "x_Units",
    "x_RequestId",
    "x_AuditChain",
    "x_AuditSeq",
)

COLUMNS: tuple[str, ...] = tuple(sorted(MANDATORY_COLUMNS + CONDITIONAL_COLUMNS)) + CUSTOM_COLUMNS

TAG_PREFIX = "broker/"
SERVICE_CATEGORY = "AI and Machine Learning"
SERVICE_SUBCATEGORY = "Generative AI"

PUBLISHERS: Mapping[str, str] = {
    "openai": "OpenAI",
    "azure-openai": "Microsoft",
    "azure": "Microsoft",
    "anthropic": "Anthropic",
    "google": "Google",
    "gemini": "Google",
    "vertex": "Google",
    "vertexai": "Google",
    "mistral": "Mistral AI",
    "cohere": "Cohere",
    "bedrock": "Amazon Web Services",
    "aws": "Amazon Web Services",
    "meta": "Meta",
    "groq": "Groq",
    "deepseek": "DeepSeek",
    "xai": "xAI",
}
"""Display names of the publishers of well-known provider ids; others are shown as given."""


def publisher_name(provider: str) -> str:
    return PUBLISHERS.get(provider.strip().lower(), provider)


@dataclass(frozen=True)
class UsageRecord:
    """One ``usage.recorded`` audit record, parsed (see the usage contract)."""

    call_id: str
    gateway: str
    credential: str
    provider: str
    model: str
    units: Mapping[str, Decimal]
    status: str
    occurred_at: datetime
    cost: Decimal | None
    currency: str | None
    priced_by: str
    price_valid_from: str | None
    person: str | None
    idp: str | None
    agent_chain: tuple[str, ...]
    cost_centre: str | None
    request_id: str | None
    chain: str | None
    seq: int | None

    @property
    def agent(self) -> str | None:
        """The agent that pays: the one the person invoked, the last entry of the chain."""
        return self.agent_chain[-1] if self.agent_chain else None

    @property
    def sku(self) -> str:
        return f"{self.provider}/{self.model}"


def _text(record: Mapping[str, Any], name: str) -> str:
    value = record.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} is missing or not a string")
    return value


def _optional_text(record: Mapping[str, Any], name: str) -> str | None:
    value = record.get(name)
    return value if isinstance(value, str) and value else None


def _decimal(value: Any, what: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{what} is not a number")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{what} is not a number") from None
    if not number.is_finite():
        raise ValueError(f"{what} is not finite")
    return number


def parse_time(value: Any) -> datetime:
    """An ISO 8601 time as an aware UTC datetime (UTC assumed when it has no offset)."""
    if not isinstance(value, str):
        raise ValueError("not an ISO 8601 time")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).astimezone(UTC)


def parse_usage(record: Mapping[str, Any]) -> UsageRecord:
    """A ``usage.recorded`` audit record as a `UsageRecord`; ValueError naming what is wrong."""
    if record.get("event") != "usage.recorded":
        raise ValueError("not a usage.recorded record")
    units_field = record.get("units")
    if not isinstance(units_field, Mapping):
        raise ValueError("units is not an object")
    units = {str(name): _decimal(value, f"units.{name}") for name, value in units_field.items()}
    cost = None if record.get("cost") is None else _decimal(record.get("cost"), "cost")
    currency = _optional_text(record, "currency")
    if cost is not None and currency is None:
        raise ValueError("cost without a currency")
    price = record.get("price")
    chain = record.get("agent_chain") or []
    if not isinstance(chain, list):
        raise ValueError("agent_chain is not a list")
    seq = record.get("seq")
    try:
        occurred_at = parse_time(record.get("occurred_at"))
    except ValueError:
        raise ValueError("occurred_at is not an ISO 8601 time") from None
    return UsageRecord(
        call_id=_text(record, "call_id"),
        gateway=_optional_text(record, "gateway") or "",
        credential=_text(record, "credential"),
        provider=_text(record, "provider"),
        model=_text(record, "model"),
        units=units,
        status=_optional_text(record, "status") or "ok",
        occurred_at=occurred_at,
        cost=cost,
        currency=currency.upper() if currency else None,
        priced_by=_optional_text(record, "priced_by") or ("unpriced" if cost is None else ""),
        price_valid_from=(
            str(price["valid_from"])
            if isinstance(price, Mapping) and price.get("valid_from")
            else None
        ),
        person=_optional_text(record, "person"),
        idp=_optional_text(record, "idp"),
        agent_chain=tuple(str(agent) for agent in chain),
        cost_centre=_optional_text(record, "cost_centre"),
        request_id=_optional_text(record, "request_id"),
        chain=_optional_text(record, "chain"),
        seq=seq if isinstance(seq, int) and not isinstance(seq, bool) else None,
    )


def decimal_text(value: Decimal) -> str:
    """A decimal as FOCUS numeric format wants it: plain digits, no exponent, and always a
    fractional part ("1.0", not "1") so that readers typing columns by their values see a
    decimal column, never an integer one."""
    text = format(value, "f").removeprefix("-") if value == 0 else format(value, "f")
    return text if "." in text else f"{text}.0"


def focus_time(value: datetime) -> str:
    """FOCUS Date/Time format: ISO 8601 in UTC with a Z."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month_bounds(at: datetime) -> tuple[datetime, datetime]:
    start = at.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return start, end


def _unit_text(units: Mapping[str, Decimal], name: str) -> str:
    value = units.get(name)
    return format(value, "f") if value is not None else ""


def focus_row(usage: UsageRecord) -> dict[str, str]:
    """The FOCUS 1.2 row of a priced usage record (ValueError for an unpriced one). Null is ""."""
    if usage.cost is None or usage.currency is None:
        raise ValueError("an unpriced usage record has no FOCUS row")
    cost = decimal_text(usage.cost)
    publisher = publisher_name(usage.provider)
    hour = usage.occurred_at.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    month_start, month_end = _month_bounds(usage.occurred_at)
    price_id = (
        f"{usage.sku}@{usage.price_valid_from}"
        if usage.priced_by == "price_table" and usage.price_valid_from
        else f"{usage.sku}@{usage.priced_by or 'gateway'}"
    )
    tags: dict[str, str] = {}
    if usage.cost_centre:
        tags[f"{TAG_PREFIX}cost-centre"] = usage.cost_centre
    if usage.person:
        tags[f"{TAG_PREFIX}person"] = usage.person
    if usage.agent:
        tags[f"{TAG_PREFIX}agent"] = usage.agent
        tags[f"{TAG_PREFIX}agent-chain"] = " < ".join(usage.agent_chain)
    units_json = json.dumps(
        {name: _number(value) for name, value in sorted(usage.units.items())},
        separators=(",", ":"),
    )
    who = f" for {usage.person}" if usage.person else ""
    via = f" via {usage.agent}" if usage.agent else ""
    row = {
        "BilledCost": cost,
        "BillingAccountId": usage.credential,
        "BillingAccountName": usage.credential,
        "BillingCurrency": usage.currency,
        "BillingPeriodEnd": focus_time(month_end),
        "BillingPeriodStart": focus_time(month_start),
        "ChargeCategory": "Usage",
        "ChargeClass": "",
        "ChargeDescription": f"{publisher} {usage.model} request{who}{via}",
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": focus_time(hour + timedelta(hours=1)),
        "ChargePeriodStart": focus_time(hour),
        "CommitmentDiscountCategory": "",
        "CommitmentDiscountId": "",
        "CommitmentDiscountName": "",
        "CommitmentDiscountStatus": "",
        "CommitmentDiscountType": "",
        "ConsumedQuantity": "1.0",
        "ConsumedUnit": "Requests",
        "ContractedCost": cost,
        "ContractedUnitPrice": cost,
        "EffectiveCost": cost,
        "InvoiceIssuerName": publisher,
        "ListCost": cost,
        "ListUnitPrice": cost,
        "PricingCategory": "Standard",
        "PricingQuantity": "1.0",
        "PricingUnit": "Requests",
        "ProviderName": publisher,
        "PublisherName": publisher,
        "RegionId": "",
        "RegionName": "",
        "ResourceId": f"credential/{usage.credential}",
        "ResourceName": usage.credential,
        "ResourceType": "Credential",
        "ServiceCategory": SERVICE_CATEGORY,
        "ServiceName": f"{publisher} API",
        "ServiceSubcategory": SERVICE_SUBCATEGORY,
        "SkuId": usage.sku,
        "SkuPriceId": price_id,
        "SubAccountId": "",
        "SubAccountName": "",
        "Tags": json.dumps(tags, separators=(",", ":"), sort_keys=True),
        "x_CostCentre": usage.cost_centre or "",
        "x_Person": usage.person or "",
        "x_IdentityProvider": usage.idp or "",
        "x_Agent": usage.agent or "",
        "x_AgentChain": json.dumps(list(usage.agent_chain), separators=(",", ":")),
        "x_Credential": usage.credential,
        "x_Gateway": usage.gateway,
        "x_Provider": usage.provider,
        "x_Model": usage.model,
        "x_CallId": usage.call_id,
        "x_CallCount": "1",
        "x_Status": usage.status,
        "x_OccurredAt": focus_time(usage.occurred_at),
        "x_PricedBy": usage.priced_by,
        "x_PriceValidFrom": usage.price_valid_from or "",
        "x_InputTokens": _unit_text(usage.units, "input_tokens"),
        "x_OutputTokens": _unit_text(usage.units, "output_tokens"),
        "x_CachedTokens": _unit_text(usage.units, "cached_tokens"),
        "x_Units": units_json,
        "x_RequestId": usage.request_id or "",
        "x_AuditChain": usage.chain or "",
        "x_AuditSeq": "" if usage.seq is None else str(usage.seq),
    }
    assert tuple(sorted(row)) == tuple(sorted(COLUMNS))
    return row


def _number(value: Decimal) -> int | float:
    return int(value) if value == value.to_integral_value() else float(value)


def focus_rows(records: Iterable[UsageRecord]) -> Iterator[dict[str, str]]:
    """The rows of the priced records, in the order given; unpriced records are skipped."""
    for usage in records:
        if usage.cost is not None and usage.currency is not None:
            yield focus_row(usage)


def write_focus_csv(rows: Iterable[Mapping[str, str]], out: TextIO) -> int:
    """Write the header and rows as CSV (RFC 4180, null as an empty field); returns the count."""
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    count = 0
    for row in rows:
        writer.writerow(row)
        count += 1
    return count


def focus_csv(records: Iterable[UsageRecord]) -> str:
    out = io.StringIO()
    write_focus_csv(focus_rows(records), out)
    return out.getvalue()

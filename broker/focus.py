"""The FOCUS export: the broker's ``usage.recorded`` audit records as a FinOps Open Cost and
Usage Specification (FOCUS 1.2) cost and usage dataset, the CSV finance tools import.

One row per day (UTC) and (provider, model, credential, person, agent chain, cost centre,
gateway, currency): ``ChargeCategory`` Usage, ``ChargeFrequency`` Usage-Based, the four costs
equal (no discounts are known to the broker), quantities in tokens, the provider as provider,
publisher and invoice issuer, the credential as the resource, ``provider/model`` as the SKU, the
cost centre as the sub account. The person, the agent chain and the cost centre are in ``Tags``
(a JSON object) and in ``x_`` custom columns, as the specification's extensibility rules ask.

Every FOCUS 1.2 mandatory column is present, custom columns are ``x_`` prefixed, tag values
are strings under a ``broker/`` prefix, and unit prices are the calls' blended price per token.
The FinOps Foundation's validator on PyPI (``focus-validator`` 1.0.0) still checks a few FOCUS
1.0 columns under their pre-release names (``Provider``, ``Publisher``, ``InvoiceIssuer``,
``ResourceID``, and ``ChargeType`` in its rule on ``SkuPriceId``): `VALIDATOR_OVERRIDES` names
those five rules for its ``--override-file`` (the columns exist under their 1.0 names).

A call the broker could not price is **left out** (a cost is mandatory and must not be a
made-up zero); `FocusExport.unpriced` counts them, and the CLI says so.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

COLUMNS: tuple[str, ...] = (
    # FOCUS 1.2 columns (alphabetical, as the specification lists them)
    "AvailabilityZone",
    "BilledCost",
    "BillingAccountId",
    "BillingAccountName",
    "BillingAccountType",
    "BillingCurrency",
    "BillingPeriodEnd",
    "BillingPeriodStart",
    "CapacityReservationId",
    "CapacityReservationStatus",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "ChargePeriodEnd",
    "ChargePeriodStart",
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ContractedCost",
    "ContractedUnitPrice",
    "EffectiveCost",
    "InvoiceId",
    "InvoiceIssuerName",
    "ListCost",
    "ListUnitPrice",
    "PricingCategory",
    "PricingCurrency",
    "PricingCurrencyContractedUnitPrice",
    "PricingCurrencyEffectiveCost",
    "PricingCurrencyListUnitPrice",
    "PricingQuantity",
    "PricingUnit",
    "ProviderName",
    "PublisherName",
    "RegionId",
    "RegionName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "ServiceCategory",
    "ServiceName",
    "ServiceSubcategory",
    "SkuId",
    "SkuMeter",
    "SkuPriceDetails",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "SubAccountType",
    "Tags",
    # custom columns (x_ prefixed)
    "x_AgentChain",
    "x_Agent",
    "x_CachedTokens",
    "x_CallCount",
    "x_CostCentre",
    "x_Gateway",
    "x_InputTokens",
    "x_OutputTokens",
    "x_Person",
)
MANDATORY_1_2: frozenset[str] = frozenset(
    {
        "BilledCost",
        "BillingAccountId",
        "BillingAccountName",
        "BillingAccountType",
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
    }
)
"""What FOCUS 1.2 requires of every cost and usage dataset."""

VALIDATOR_OVERRIDES: tuple[str, ...] = (
    "InvoiceIssuer_Required",
    "Provider_Required",
    "Publisher_Required",
    "ResourceID_Required",
    "SkuPriceId_Nullable",
)
"""focus-validator 1.0.0's rules on pre-release column names (the export has their 1.0 names:
InvoiceIssuerName, ProviderName, PublisherName, ResourceId; SkuPriceId is always set)."""

DISPLAY_NAMES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "google": "Google",
    "mistral": "Mistral AI",
    "cohere": "Cohere",
    "azure-openai": "Microsoft",
    "bedrock": "AWS",
}
TOKEN_UNITS = ("input_tokens", "output_tokens", "cached_tokens")


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _month(moment: datetime) -> tuple[datetime, datetime]:
    start = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


@dataclass
class _Row:
    cost: Decimal = Decimal(0)
    calls: int = 0
    units: dict[str, Decimal] = field(default_factory=dict)


@dataclass
class FocusExport:
    """Rows of the export, and what was left out."""

    rows: list[dict[str, str]]
    unpriced: int
    """Calls recorded without a cost: not in the export."""

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.rows)
        return out.getvalue()


def _number(value: Decimal) -> str:
    """A decimal as FOCUS's Decimal type reads it: always with a fractional part (a CSV
    reader must not take a whole amount for an integer column)."""
    text = format(value.normalize(), "f")
    if text in ("-0", "0"):
        return "0.0"
    return text if "." in text else text + ".0"


def focus_export(
    records: Iterable[Mapping[str, Any]],
    *,
    billing_account: str = "agent-identity-broker",
    since: datetime | None = None,
    until: datetime | None = None,
) -> FocusExport:
    """The FOCUS rows of the ``usage.recorded`` records among `records` whose call happened in
    [`since`, `until`)."""
    groups: dict[tuple[Any, ...], _Row] = {}
    unpriced = 0
    for record in records:
        if record.get("event") != "usage.recorded":
            continue
        try:
            occurred = datetime.fromisoformat(str(record["occurred_at"])).astimezone(UTC)
        except (KeyError, ValueError):
            continue
        if (since is not None and occurred < since) or (until is not None and occurred >= until):
            continue
        try:
            cost = Decimal(str(record["cost"])) if record.get("cost") is not None else None
        except ArithmeticError:
            cost = None  # a hand-edited trail: counted as unpriced, never guessed
        if cost is None or not cost.is_finite() or not record.get("currency"):
            unpriced += 1
            continue
        chain = [str(a) for a in record.get("agent_chain") or []]
        day = occurred.replace(hour=0, minute=0, second=0, microsecond=0)
        price = record.get("price")
        price_id = (
            str(price.get("valid_from"))
            if isinstance(price, Mapping) and price.get("valid_from")
            else str(record.get("priced_by") or "gateway")
        )
        key = (
            day,
            price_id,
            str(record.get("provider", "")),
            str(record.get("model", "")),
            str(record.get("credential", "")),
            str(record.get("person", "")),
            tuple(chain),
            record.get("cost_centre"),
            str(record.get("gateway", "")),
            str(record["currency"]),
        )
        row = groups.setdefault(key, _Row())
        row.cost += cost
        row.calls += 1
        units = record.get("units") or {}
        for unit, quantity in units.items() if isinstance(units, Mapping) else ():
            row.units[unit] = row.units.get(unit, Decimal(0)) + Decimal(str(quantity))
    rows = [_row(key, row, billing_account) for key, row in sorted(groups.items(), key=_order)]
    return FocusExport(rows, unpriced)


def _order(item: tuple[tuple[Any, ...], _Row]) -> tuple[str, ...]:
    return tuple(str(part) for part in item[0])


def _row(key: tuple[Any, ...], row: _Row, billing_account: str) -> dict[str, str]:
    day, price_id, provider, model, credential, person, chain, centre, gateway, currency = key
    name = DISPLAY_NAMES.get(provider, provider)
    period_start, period_end = _month(day)
    tokens = sum((q for u, q in row.units.items() if u.endswith("_tokens")), Decimal(0))
    cost = _number(row.cost)
    agent = chain[-1] if chain else ""
    tags = {
        "broker/person": person,
        "broker/agent": agent,
        "broker/agent_chain": " <- ".join(chain),
    }
    if centre:
        tags["broker/cost_centre"] = str(centre)
    unit_price = _number((row.cost / tokens).quantize(Decimal("1e-12"))) if tokens else "0.0"
    return {
        "BilledCost": cost,
        "BillingAccountId": billing_account,
        "BillingAccountName": billing_account,
        "BillingAccountType": "Organization",
        "BillingCurrency": currency,
        "BillingPeriodEnd": _iso(period_end),
        "BillingPeriodStart": _iso(period_start),
        "ChargeCategory": "Usage",
        "ChargeDescription": (
            f"{row.calls} call(s) to {name} {model} for {person} via {' <- '.join(chain)}"
        ),
        "ChargeFrequency": "Usage-Based",
        "ChargePeriodEnd": _iso(day + timedelta(days=1)),
        "ChargePeriodStart": _iso(day),
        "ConsumedQuantity": _number(tokens),
        "ConsumedUnit": "Tokens",
        "ContractedCost": cost,
        "ContractedUnitPrice": unit_price,
        "EffectiveCost": cost,
        "InvoiceIssuerName": name,
        "ListCost": cost,
        "ListUnitPrice": unit_price,
        "PricingCategory": "Standard",
        "PricingCurrency": currency,
        "PricingCurrencyContractedUnitPrice": unit_price,
        "PricingCurrencyEffectiveCost": cost,
        "PricingCurrencyListUnitPrice": unit_price,
        "PricingQuantity": _number(tokens),
        "PricingUnit": "Tokens",
        "ProviderName": name,
        "PublisherName": name,
        "ResourceId": credential,
        "ResourceName": credential,
        "ResourceType": "Provider credential",
        "ServiceCategory": "AI and Machine Learning",
        "ServiceName": f"{name} API",
        "ServiceSubcategory": "Generative AI",
        "SkuId": f"{provider}/{model}",
        "SkuMeter": "Tokens",
        # The price the calls were charged at: the price table entry (from its valid_from date),
        # or the gateway's own price.
        "SkuPriceId": f"{provider}/{model}@{price_id}",
        "SubAccountId": centre or "",
        "SubAccountName": centre or "",
        "SubAccountType": "Cost Centre" if centre else "",
        "Tags": json.dumps(tags, sort_keys=True),
        "x_AgentChain": " <- ".join(chain),
        "x_Agent": agent,
        "x_CachedTokens": _number(row.units.get("cached_tokens", Decimal(0))),
        "x_CallCount": str(row.calls),
        "x_CostCentre": centre or "",
        "x_Gateway": gateway,
        "x_InputTokens": _number(row.units.get("input_tokens", Decimal(0))),
        "x_OutputTokens": _number(row.units.get("output_tokens", Decimal(0))),
        "x_Person": person,
    }

"""The price of a reported call, from the policy's price table: a pure function.

An entry prices a (provider, model) from its ``valid_from`` date (UTC) until the next entry for
the same pair, so a price change mid-month prices each call at the price of its day. A call is
**unpriced** (cost None, never zero) when no entry covers the model on that day, or when it
reports a unit its entry does not price.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from decimal import ROUND_HALF_EVEN, Decimal

from broker.policy.model import Price

MICRO = Decimal("0.000001")
MILLION = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Priced:
    """What a call cost, and how that was decided."""

    cost: Decimal | None
    currency: str | None
    priced_by: str
    """``price_table``, ``gateway`` (the gateway's own cost), or ``unpriced``."""
    valid_from: date | None = None
    reason: str | None = None
    """For an unpriced call: ``unknown_model``, ``not_yet_priced`` or ``unit_not_priced``."""

    @property
    def micro(self) -> int:
        """The cost in micro-units of its currency (0 when unpriced)."""
        return to_micro(self.cost) if self.cost is not None else 0


def to_micro(amount: Decimal) -> int:
    return int((amount / MICRO).to_integral_value(rounding=ROUND_HALF_EVEN))


def from_micro(micro: int) -> Decimal:
    return (Decimal(micro) * MICRO).quantize(MICRO)


def price_entry(
    prices: Sequence[Price], provider: str, model: str, day: date
) -> tuple[Price | None, str | None]:
    """The entry pricing (provider, model) on `day`, or None and why."""
    entries = [p for p in prices if p.provider == provider and p.model == model]
    if not entries:
        return None, "unknown_model"
    current = [p for p in entries if p.valid_from <= day]
    if not current:
        return None, "not_yet_priced"
    return max(current, key=lambda p: p.valid_from), None


def price_call(
    prices: Sequence[Price],
    provider: str,
    model: str,
    units: Mapping[str, Decimal],
    at: datetime,
) -> Priced:
    """Price a call that used `units` at `at` (UTC)."""
    entry, reason = price_entry(prices, provider, model, at.date())
    if entry is None:
        return Priced(None, None, "unpriced", reason=reason)
    unpriced = sorted(u for u, n in units.items() if n and u not in entry.per_million)
    if unpriced:
        return Priced(None, entry.currency, "unpriced", entry.valid_from, "unit_not_priced")
    total = sum(
        (quantity * entry.per_million[unit] / MILLION for unit, quantity in units.items()),
        Decimal(0),
    )
    return Priced(
        total.quantize(MICRO, ROUND_HALF_EVEN), entry.currency, "price_table", entry.valid_from
    )

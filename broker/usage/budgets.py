"""Which budgets a call counts against, and their periods: pure functions.

A budget's scope names a cost centre, an agent (the one the person invoked: the last of the
token's chain), a person (``<idp>/<subject>``) or a credential. Periods are calendar days or
months in the configured time zone; a period's id is ``2026-11`` or ``2026-11-30``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from broker.policy.engine import Policy
from broker.policy.model import Budget


@dataclass(frozen=True, slots=True)
class Attribution:
    """Who a call or fetch is for, as its budgets see it."""

    person: str
    agent: str
    """The agent the person invoked (the last of the chain)."""
    cost_centre: str | None
    credential: str


def money(amount: Decimal) -> str:
    """An amount as people read it: cents for large amounts, more digits for small ones."""
    return f"{amount:,.2f}" if abs(amount) >= 10 else f"{amount:,.4f}"


def applicable(policy: Policy, who: Attribution) -> list[tuple[str, Budget]]:
    """The budgets `who` counts against, by name."""
    found = []
    for name, budget in sorted(policy.budgets.items()):
        scope = budget.scope
        if (
            (scope.cost_centre is not None and scope.cost_centre == who.cost_centre)
            or (scope.agent is not None and scope.agent == who.agent)
            or (scope.person is not None and scope.person == who.person)
            or (scope.credential is not None and scope.credential == who.credential)
        ):
            found.append((name, budget))
    return found


def period_start(budget: Budget, at: datetime, zone: ZoneInfo) -> datetime:
    local = at.astimezone(zone)
    if budget.period == "day":
        return local.replace(hour=0, minute=0, second=0, microsecond=0)
    return local.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def period_end(budget: Budget, at: datetime, zone: ZoneInfo) -> datetime:
    """When the period containing `at` ends (the budget resets), in `zone`."""
    start = period_start(budget, at, zone)
    if budget.period == "day":
        following = (start + timedelta(days=1, hours=3)).replace(hour=0)
    else:
        following = (start + timedelta(days=32)).replace(day=1)
    return following.replace(tzinfo=zone)


def period_id(budget: Budget, at: datetime, zone: ZoneInfo) -> str:
    start = period_start(budget, at, zone)
    return start.strftime("%Y-%m-%d" if budget.period == "day" else "%Y-%m")


def crossed(thresholds: Iterable[int], before: int, after: int, limit: int) -> list[int]:
    """The thresholds (percent of `limit`) `after` reaches that `before` did not."""
    return sorted(t for t in thresholds if before * 100 < t * limit <= after * 100)


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """Whether a fetch fits the deny budgets that apply, given what each has spent."""

    allowed: bool
    budget: str | None
    description: str
    lines: tuple[str, ...]
    """One line per applicable budget: its use so far, for explanations."""


def check_budgets(
    budgets: Sequence[tuple[str, Budget]], spent: Mapping[str, Decimal], period: str
) -> BudgetVerdict:
    """The budgets' answer for one more fetch when each has `spent` (and reserved) so much:
    a deny budget refuses when its ``reserve_per_call`` no longer fits (as `BudgetGate`)."""
    lines = []
    refusing: str | None = None
    description = "within every budget"
    for name, budget in budgets:
        used = spent.get(name, Decimal(0))
        share = used / budget.amount * 100
        scope = f"{budget.scope.kind.replace('_', ' ')} {budget.scope.value}"
        line = (
            f"budget {name} ({scope}, {budget.action}): {money(used)} of "
            f"{money(budget.amount)} {budget.currency} ({share:.0f} %) for {period}"
        )
        lines.append(line)
        fits = used + (budget.reserve_per_call or Decimal(0)) <= budget.amount
        if budget.action == "deny" and not fits and refusing is None:
            refusing = name
            description = (
                f"this fetch would be refused: {scope} has spent {share:.0f} % of "
                f"{money(budget.amount)} {budget.currency} for {period} (budget {name})"
            )
    return BudgetVerdict(refusing is None, refusing, description, tuple(lines))

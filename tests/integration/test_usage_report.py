"""`broker usage report` on a trail a real broker wrote: agents exchange tokens (one delegating to
another), the gateway fetches credentials and reports calls over HTTP (POST /v1/usage) around a
month boundary, for several people, agents, cost centres, credentials, providers, models and
currencies, with one call the price table does not know. The trail goes to a file and the CLI
reads it: fetch counts, spend per currency (the unpriced call apart, never zero), units, the model
mix per cost centre, --since/--until, and the FOCUS 1.2 export, checked by the FinOps
Foundation's validator (`focus-validator` from PyPI, in a venv of its own)."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from broker.audit import canonical_json, verify_trail
from broker.cli import app
from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.focus import MANDATORY_1_2
from tests.support.focus import FocusValidator
from tests.support.harness import (
    ACCESS_TOKEN,
    example_client_secrets,
    exchange_form,
    run_example_stack,
    write_provider_keys,
)

SECRETS = example_client_secrets()
AGENT_SECRET = generate_client_secret()
runner = CliRunner()

NOW = datetime.now(UTC).replace(microsecond=0)
_MONTH = NOW.replace(day=1, hour=0, minute=0, second=0)
BOUNDARY = (
    _MONTH if timedelta(hours=3) <= NOW - _MONTH else (_MONTH - timedelta(days=1)).replace(day=1)
)
"""The start of a month, at least three hours ago (and so within the 40 days a report may go
back): calls are reported on both sides of it."""
BEFORE, AFTER = (BOUNDARY - timedelta(hours=1)), (BOUNDARY + timedelta(hours=1))
EARLIER = BOUNDARY - timedelta(days=1, hours=2)

FOCUS_1_2_MANDATORY = {
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
}  # fmt: skip
"""What FOCUS 1.2 requires of every cost and usage dataset (independent of broker.focus)."""


def _agent(ceiling: list[str], act_for: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "authentication": {
            "method": "client_secret_basic",
            "secret_hash": hash_client_secret(AGENT_SECRET, method="sha256"),
        },
        "ceiling": ceiling,
        "audiences": ["llm-gateway"],
        "act_for": act_for,
        **extra,
    }


POLICY_EXTRA = {
    "agents": {
        "ops-agent": _agent(
            ["llm:openai:chat"],
            ["role:support"],
            cost_centre="support-ops",
            may_delegate_to=["helper-agent"],
        ),
        "helper-agent": _agent(["llm:openai:chat"], ["role:support"]),
        "eng-agent": _agent(["llm:openai:chat", "llm:anthropic:messages"], ["role:engineer"]),
    }
}


@dataclass(frozen=True)
class Call:
    """A provider call the gateway reports: who made it (a token of `via`, for `person`)."""

    person: str
    via: str  # "ops", "helper" (ops-agent delegating to helper-agent) or "eng"
    credential: str
    provider: str
    model: str
    units: dict[str, int]
    at: datetime
    gateway_cost: tuple[str, str] | None = None  # the gateway's own price

    @property
    def chain(self) -> list[str]:
        return {
            "ops": ["ops-agent"],
            "helper": ["helper-agent", "ops-agent"],
            "eng": ["eng-agent"],
        }[self.via]


CALLS: dict[str, Call] = {
    "c1": Call("alice", "ops", "openai-api-key", "openai", "gpt-4o-mini",
               {"input_tokens": 1000, "output_tokens": 200, "cached_tokens": 100}, EARLIER),
    "c2": Call("alice", "helper", "openai-api-key", "openai", "gpt-4o",
               {"input_tokens": 3000, "output_tokens": 1000}, BEFORE),
    "c3": Call("bob", "eng", "anthropic-api-key", "anthropic", "claude-sonnet-4",
               {"input_tokens": 2000, "output_tokens": 500}, BEFORE),
    "c4": Call("bob", "eng", "openai-api-key", "openai", "gpt-4o-eu",
               {"input_tokens": 800, "output_tokens": 200}, AFTER,
               gateway_cost=("0.0200", "EUR")),
    "c5": Call("dave", "ops", "openai-api-key", "openai", "gpt-4o-mini",
               {"input_tokens": 500, "output_tokens": 100, "cached_tokens": 0}, AFTER),
    "c6": Call("alice", "ops", "openai-api-key", "openai", "mystery-9",  # not in the table
               {"input_tokens": 50, "output_tokens": 5}, AFTER),
    "c7": Call("alice", "ops", "openai-api-key", "openai", "gpt-4o-mini",
               {"input_tokens": 2000, "output_tokens": 400, "cached_tokens": 500}, AFTER),
}  # fmt: skip


@dataclass(frozen=True)
class Trail:
    file: Path
    records: dict[str, dict[str, Any]]  # call id -> its usage.recorded record
    fetches: int  # granted credential fetches


def _exchange(running: Any, form: dict[str, str], agent: str) -> str:
    response = httpx.post(running.token_endpoint, data=form, auth=(agent, AGENT_SECRET))
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def _tokens(running: Any, idp: Any) -> dict[tuple[str, str], str]:
    tokens: dict[tuple[str, str], str] = {}
    for person in ("alice", "dave"):
        tokens[(person, "ops")] = _exchange(
            running,
            exchange_form(idp.mint(person), scope="llm:openai:chat", audience="llm-gateway"),
            "ops-agent",
        )
    tokens[("alice", "helper")] = _exchange(  # ops-agent hands the work to helper-agent
        running,
        exchange_form(
            tokens[("alice", "ops")], ACCESS_TOKEN, scope="llm:openai:chat", audience="llm-gateway"
        ),
        "helper-agent",
    )
    tokens[("bob", "eng")] = _exchange(
        running,
        exchange_form(
            idp.mint("bob"),
            scope="llm:openai:chat llm:anthropic:messages",
            audience="llm-gateway",
        ),
        "eng-agent",
    )
    return tokens


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trail]:
    tmp = tmp_path_factory.mktemp("usage-report")
    write_provider_keys(tmp / "keys.yaml", "sk-report-test")
    gateway = ("llm-gateway", SECRETS["LLM_GATEWAY_SECRET"])
    with run_example_stack(tmp, SECRETS, tmp / "keys.yaml", policy_extra=POLICY_EXTRA) as (
        running,
        idp,
    ):
        tokens = _tokens(running, idp)
        fetched: set[tuple[str, str, str]] = set()
        for call in CALLS.values():
            key = (call.person, call.via, call.credential)
            if key in fetched:
                continue
            response = httpx.post(
                f"{running.url}/v1/credentials/{call.credential}",
                data={"token": tokens[(call.person, call.via)]},
                auth=gateway,
            )
            assert response.status_code == 200, response.text
            fetched.add(key)
        records = []
        for call_id, call in CALLS.items():
            record: dict[str, Any] = {
                "call_id": call_id,
                "token": tokens[(call.person, call.via)],
                "credential": call.credential,
                "provider": call.provider,
                "model": call.model,
                "units": call.units,
                "occurred_at": int(call.at.timestamp()),
            }
            if call.gateway_cost:
                record["cost"] = {"amount": call.gateway_cost[0], "currency": call.gateway_cost[1]}
            records.append(record)
        answer = httpx.post(f"{running.url}/v1/usage", json={"records": records}, auth=gateway)
        assert answer.status_code == 200, answer.text
        assert [r.get("outcome") for r in answer.json()["results"]] == ["recorded"] * len(CALLS)
        written = list(running.decisions.records)
    # The broker's records, as its file sink writes them (each line its canonical JSON).
    path = tmp / "audit" / "decisions.jsonl"
    path.parent.mkdir()
    path.write_bytes(b"".join(canonical_json(r) + b"\n" for r in written))
    assert verify_trail([path]).status != "tampered"
    usage = {r["call_id"]: r for r in written if r.get("event") == "usage.recorded"}
    assert set(usage) == set(CALLS)
    granted = sum(
        1 for r in written if r.get("event") == "credential.fetch" and r["outcome"] == "granted"
    )
    yield Trail(path, usage, granted)


def _report(trail: Trail, *args: str) -> Any:
    result = runner.invoke(app, ["usage", "report", str(trail.file), *args])
    assert result.exit_code == 0, result.output
    return result


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def _bucket(call: Call, period: str) -> str:
    return call.at.strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


KEYS: dict[str, Callable[[Call, dict[str, Any]], str]] = {
    "person": lambda call, _: f"dev/{call.person}",
    "agent": lambda call, _: call.chain[-1],  # the agent the person invoked
    "cost_centre": lambda _, record: record.get("cost_centre") or "(unassigned)",
    "credential": lambda call, _: call.credential,
    "provider": lambda call, _: call.provider,
    "model": lambda call, _: f"{call.provider}/{call.model}",
}


def test_the_broker_attributed_and_priced_each_call(trail: Trail) -> None:
    records = trail.records
    for call_id, call in CALLS.items():
        record = records[call_id]
        assert record["person"] == f"dev/{call.person}"
        assert record["agent_chain"] == call.chain
        assert record["credential"] == call.credential
    assert records["c1"]["cost_centre"] == "support-ops"  # ops-agent's own cost centre
    assert records["c3"].get("cost_centre") is None  # eng-agent has none, nor have its people
    assert records["c4"]["priced_by"] == "gateway" and records["c4"]["currency"] == "EUR"
    assert records["c1"]["priced_by"] == "price_table" and records["c1"]["currency"] == "USD"
    assert records["c6"].get("cost") is None and records["c6"]["priced_by"] == "unpriced"


def test_fetches_stay_the_default_measure(trail: Trail) -> None:
    lines = _report(trail).stdout.splitlines()
    assert lines[0].split() == ["day", "credential", "fetches"]
    counted = Counter({line.split()[1]: int(line.split()[2]) for line in lines[1:-1]})
    assert counted == Counter({"openai-api-key": 4, "anthropic-api-key": 1})
    assert lines[-1].split() == ["total", str(trail.fetches)] == ["total", "5"]


@pytest.mark.parametrize("period", ["day", "month"])
@pytest.mark.parametrize("by", list(KEYS))
def test_spend_per_currency_with_the_unpriced_call_apart(
    trail: Trail, by: str, period: str
) -> None:
    spend: dict[tuple[str, str, str], Decimal] = {}
    calls: Counter[tuple[str, str, str]] = Counter()
    for call_id, call in CALLS.items():
        record = trail.records[call_id]
        currency = record.get("currency") if record.get("cost") is not None else "unpriced"
        slot = (_bucket(call, period), KEYS[by](call, record), str(currency))
        calls[slot] += 1
        if currency != "unpriced":
            spend[slot] = spend.get(slot, Decimal(0)) + Decimal(record["cost"])
    expected = [
        [*slot, f"{spend[slot]:.6f}" if slot in spend else "", str(calls[slot])]
        for slot in sorted(calls)
    ]
    rows = _csv(
        _report(trail, "--measure", "spend", "--by", by, "--period", period, "--format", "csv")
        .stdout
    )  # fmt: skip
    assert rows[0] == [period, by, "currency", "spend", "calls"]
    assert rows[1:] == expected
    unpriced = [row for row in rows[1:] if row[2] == "unpriced"]
    assert len(unpriced) == 1 and unpriced[0][3] == ""  # never a zero cost: left blank
    assert len({row[0] for row in rows[1:]}) >= 2  # both sides of the boundary


def test_spend_by_cost_centre_per_month_crosses_the_boundary(trail: Trail) -> None:
    rows = _csv(
        _report(
            trail, "--measure", "spend", "--by", "cost_centre", "--period", "month",
            "--format", "csv",
        ).stdout
    )  # fmt: skip
    before, after = _bucket(CALLS["c2"], "month"), _bucket(CALLS["c4"], "month")
    assert before != after
    months = {(row[0], row[1], row[2]) for row in rows[1:]}
    assert (before, "support-ops", "USD") in months  # c1 and c2 (the helper's, paid by ops)
    assert (before, "(unassigned)", "USD") in months  # c3: anthropic for bob
    assert (after, "(unassigned)", "EUR") in months  # c4: the gateway's euro price
    assert (after, "support-ops", "unpriced") in months  # c6: mystery-9
    cost = {
        (row[0], row[1], row[2]): Decimal(row[3]) for row in rows[1:] if row[3] not in ("-", "")
    }
    assert cost[(before, "support-ops", "USD")] == Decimal(trail.records["c1"]["cost"]) + Decimal(
        trail.records["c2"]["cost"]
    )


def test_the_model_mix_per_cost_centre(trail: Trail) -> None:
    out = _report(trail, "--measure", "spend", "--by", "cost_centre", "--period", "month").stdout
    assert "model mix" in out
    mix = out.split("model mix", 1)[1]
    month = _bucket(CALLS["c2"], "month")
    c1, c2 = (Decimal(trail.records[c]["cost"]) for c in ("c1", "c2"))
    [line] = [line for line in mix.splitlines() if month in line and "support-ops USD" in line]
    shares = dict(re.findall(r"(\S+/\S+) (\d+) %", line))
    assert shares == {
        "openai/gpt-4o": f"{c2 / (c1 + c2) * 100:.0f}",
        "openai/gpt-4o-mini": f"{c1 / (c1 + c2) * 100:.0f}",
    }
    assert sum(int(v) for v in shares.values()) in (99, 100, 101)
    other = _report(trail, "--measure", "spend", "--by", "person").stdout
    assert "model mix" not in other


@pytest.mark.parametrize("by", ["model", "person"])
def test_units_sum_each_unit_name(trail: Trail, by: str) -> None:
    totals: Counter[tuple[str, str, str]] = Counter()
    for call_id, call in CALLS.items():
        for unit, quantity in call.units.items():
            totals[(_bucket(call, "month"), KEYS[by](call, trail.records[call_id]), unit)] += (
                quantity
            )
    rows = _csv(
        _report(trail, "--measure", "units", "--by", by, "--period", "month", "--format", "csv")
        .stdout
    )  # fmt: skip
    assert rows[0] == ["month", by, "unit", "quantity"]
    assert rows[1:] == [[*slot, str(totals[slot])] for slot in sorted(totals)]


def test_since_and_until_select_calls_by_when_they_happened(trail: Trail) -> None:
    rows = _csv(
        _report(
            trail, "--measure", "spend", "--by", "model", "--format", "csv",
            "--since", BOUNDARY.isoformat(), "--until", (AFTER + timedelta(minutes=1)).isoformat(),
        ).stdout
    )  # fmt: skip
    models = {row[1] for row in rows[1:]}
    assert models == {"openai/gpt-4o-eu", "openai/gpt-4o-mini", "openai/mystery-9"}
    assert sum(int(row[4]) for row in rows[1:]) == 4  # c4, c5, c6, c7


def test_fetch_records_name_no_model(trail: Trail) -> None:
    result = runner.invoke(app, ["usage", "report", str(trail.file), "--by", "model"])
    assert result.exit_code == 1
    assert "--measure spend or units" in result.output


# -- the FOCUS export --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def focus_validator(tmp_path_factory: pytest.TempPathFactory) -> FocusValidator:
    try:
        return FocusValidator(tmp_path_factory.mktemp("focus-validator") / "venv")
    except (RuntimeError, OSError) as exc:
        pytest.fail(f"the FinOps Foundation's validator could not be installed from PyPI: {exc}")


def _export(trail: Trail, out: Path, *args: str) -> list[dict[str, str]]:
    result = _report(trail, "--format", "focus", *args)
    out.write_text(result.stdout)
    return list(csv.DictReader(io.StringIO(result.stdout)))


def test_the_focus_export_passes_the_finops_foundation_validator(
    trail: Trail, tmp_path: Path, focus_validator: FocusValidator
) -> None:
    out = tmp_path / "focus.csv"
    rows = _export(trail, out)
    header = next(csv.reader(io.StringIO(out.read_text())))
    assert set(header) >= FOCUS_1_2_MANDATORY, FOCUS_1_2_MANDATORY - set(header)
    assert set(header) >= MANDATORY_1_2
    for row in rows:
        for column in FOCUS_1_2_MANDATORY - {"ChargeClass"}:  # ChargeClass: null, no corrections
            assert row[column], (column, row)
    checked = focus_validator.validate(out)
    assert "Validation succeeded." in checked.stdout, checked.stdout + checked.stderr


def test_the_validator_rejects_a_broken_export(
    trail: Trail, tmp_path: Path, focus_validator: FocusValidator
) -> None:
    """The validator run is a real check: the export without BilledCost and with a made-up
    currency fails it, naming both."""
    rows = _export(trail, tmp_path / "focus.csv")
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=[c for c in rows[0] if c != "BilledCost"])
        writer.writeheader()
        for row in rows:
            writer.writerow({k: v for k, v in row.items() if k != "BilledCost"} | {
                "BillingCurrency": "XYZ"})  # fmt: skip
    checked = focus_validator.validate(broken).stdout
    assert "Validation failed!" in checked
    assert "BilledCost_Required" in checked and "BillingCurrency_IsCurrencyCode" in checked


def test_the_focus_export_holds_every_priced_call_once(trail: Trail, tmp_path: Path) -> None:
    rows = _export(trail, tmp_path / "focus.csv")
    priced = {c: r for c, r in trail.records.items() if r.get("cost") is not None}
    assert len(priced) == len(CALLS) - 1
    totals: dict[str, Decimal] = {}
    for record in priced.values():
        totals[record["currency"]] = totals.get(record["currency"], Decimal(0)) + Decimal(
            record["cost"]
        )
    exported: dict[str, Decimal] = {}
    for row in rows:
        exported[row["BillingCurrency"]] = exported.get(
            row["BillingCurrency"], Decimal(0)
        ) + Decimal(row["BilledCost"])
        assert row["BilledCost"] == row["EffectiveCost"] == row["ListCost"]
        assert json.loads(row["Tags"])["broker/person"] == row["x_Person"]
    assert exported == totals
    assert sum(int(row["x_CallCount"]) for row in rows) == len(priced)
    assert not any("mystery-9" in row["SkuId"] for row in rows)  # unpriced: no row, no zero
    helper = [r for r in rows if r["x_AgentChain"].startswith("helper-agent")]
    assert helper and all(r["x_Agent"] == "ops-agent" for r in helper)
    # the month boundary: each call in its own billing period
    periods = {(r["SkuId"], r["BillingPeriodStart"]) for r in rows}
    assert ("openai/gpt-4o-eu", _iso(BOUNDARY)) in periods
    assert ("openai/gpt-4o", _iso(_month_before(BOUNDARY))) in periods


def _month_before(start: datetime) -> datetime:
    return (start - timedelta(days=1)).replace(day=1)


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_the_focus_export_says_what_it_left_out_and_honours_since(
    trail: Trail, tmp_path: Path
) -> None:
    result = _report(trail, "--format", "focus")
    assert "1 unpriced call(s) left out" in result.stderr
    rows = list(
        csv.DictReader(
            io.StringIO(_report(trail, "--format", "focus", "--since", BOUNDARY.isoformat()).stdout)
        )
    )
    assert {r["BillingPeriodStart"] for r in rows} == {_iso(BOUNDARY)}
    assert sum(int(r["x_CallCount"]) for r in rows) == 3  # c4, c5, c7 (c6 is unpriced)


def test_output_writes_the_report_to_a_file(trail: Trail, tmp_path: Path) -> None:
    on_stdout = _report(trail, "--format", "focus").stdout
    out = tmp_path / "reports" / "focus.csv"
    out.parent.mkdir()
    result = _report(trail, "--format", "focus", "--output", str(out))
    assert result.stdout == ""
    assert out.read_text() == on_stdout
    assert "1 unpriced call(s) left out" in result.stderr  # notes stay on stderr
    spend = tmp_path / "spend.csv"
    _report(trail, "--measure", "spend", "--by", "person", "--format", "csv", "-o", str(spend))
    assert _csv(spend.read_text())[0] == ["day", "person", "currency", "spend", "calls"]
    failed = runner.invoke(
        app, ["usage", "report", str(trail.file), "--output", str(tmp_path / "missing" / "x")]
    )
    assert failed.exit_code == 1 and "cannot write" in failed.output

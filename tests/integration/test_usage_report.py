"""`broker usage report` on a real audit trail written by the broker's own writer (DecisionLog and
the file sink): fetch counts, spend per currency (unpriced calls apart, never as zero), units, the
model mix per cost centre, and the FOCUS 1.2 export checked by the FinOps Foundation's validator
(`focus-validator` from PyPI, installed by the test in a venv of its own)."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from broker.audit import DecisionLog, build_sinks, verify_trail
from broker.cli import app
from broker.clock import FrozenClock
from broker.focus import MANDATORY_COLUMNS
from broker.settings import AuditConfig

runner = CliRunner()


@dataclass(frozen=True)
class Call:
    occurred_at: str
    person: str
    chain: tuple[str, ...]
    cost_centre: str | None
    provider: str
    model: str
    credential: str
    cost: str | None
    currency: str | None
    units: dict[str, int]
    priced_by: str = "price_table"


CALLS: dict[str, Call] = {
    "gw-1": Call(
        "2026-11-29T10:15:00+00:00", "dev/alice", ("summariser-agent", "triage-agent"),
        "support-ops", "openai", "gpt-4o-mini", "openai-api-key", "0.001200", "USD",
        {"input_tokens": 120, "output_tokens": 30, "cached_tokens": 0},
    ),
    "gw-2": Call(
        "2026-11-30T23:30:00+00:00", "dev/alice", ("triage-agent",), "support-ops", "openai",
        "gpt-4o", "openai-api-key", "0.010000", "USD",
        {"input_tokens": 1000, "output_tokens": 500, "cached_tokens": 200},
    ),
    "gw-3": Call(
        "2026-11-30T08:00:00+00:00", "dev/bob", ("coding-agent",), "engineering", "anthropic",
        "claude-sonnet-4", "anthropic-api-key", "0.030000", "USD",
        {"input_tokens": 2000, "output_tokens": 1000},
    ),
    "gw-4": Call(  # priced by the gateway, in euros, just after the month boundary
        "2026-12-01T00:10:00+00:00", "dev/bob", ("coding-agent",), "engineering", "mistral",
        "mistral-large", "mistral-eu", "0.020000", "EUR",
        {"input_tokens": 800, "output_tokens": 200}, priced_by="gateway",
    ),
    "gw-5": Call(
        "2026-12-01T09:00:00+00:00", "dev/carol", ("summariser-agent", "triage-agent"),
        "support-ops", "openai", "gpt-4o-mini", "openai-api-key", "0.002400", "USD",
        {"input_tokens": 240, "output_tokens": 60, "cached_tokens": 0},
    ),
    "gw-6": Call(  # an unknown model: recorded, no cost
        "2026-12-01T10:00:00+00:00", "dev/carol", ("triage-agent",), "support-ops", "openai",
        "gpt-9-experimental", "openai-api-key", None, None,
        {"input_tokens": 50, "output_tokens": 5}, priced_by="unpriced",
    ),
    "gw-7": Call(  # no cost centre
        "2026-12-02T15:45:00+00:00", "dev/dave", ("triage-agent",), None, "openai",
        "gpt-4o-mini", "openai-api-key", "0.001000", "USD",
        {"input_tokens": 100, "output_tokens": 25, "cached_tokens": 0},
    ),
}  # fmt: skip
PRICED = [call_id for call_id, call in CALLS.items() if call.cost is not None]


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _usage_fields(call_id: str, call: Call, seq: int) -> dict[str, Any]:
    return {
        "outcome": "recorded",
        "call_id": call_id,
        "gateway": "llm-gateway",
        "credential": call.credential,
        "provider": call.provider,
        "model": call.model,
        "units": call.units,
        "status": "ok",
        "occurred_at": call.occurred_at,
        "cost": call.cost,
        "currency": call.currency,
        "priced_by": call.priced_by,
        "price": (
            {"valid_from": "2026-11-01", "currency": call.currency}
            if call.priced_by == "price_table"
            else None
        ),
        "person": call.person,
        "idp": "dev",
        "agent_chain": list(call.chain),
        "cost_centre": call.cost_centre,
        "jti": f"jti-{seq}",
        "policy_version": "policy-1",
        "request_id": f"req-usage-{seq}",
    }


def write_trail(path: Path, extra: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
    """A trail as `broker serve` writes it: fetches (granted and denied) then usage reports,
    each recorded a little after the call it reports."""
    clock = FrozenClock(_epoch("2026-11-29T09:00:00+00:00"))
    log = DecisionLog(build_sinks(AuditConfig(stdout=False, file=path, group_commit=False)), clock)
    fetches = [
        ("2026-11-29T10:14:00+00:00", "dev/alice", ["summariser-agent", "triage-agent"],
         "support-ops", "granted"),
        ("2026-11-30T07:59:00+00:00", "dev/bob", ["coding-agent"], "engineering", "granted"),
        ("2026-11-30T08:30:00+00:00", "dev/eve", ["coding-agent"], "engineering", "denied"),
        ("2026-12-01T08:59:00+00:00", "dev/carol", ["summariser-agent", "triage-agent"],
         "support-ops", "granted"),
    ]  # fmt: skip
    events: list[tuple[float, str, dict[str, Any]]] = [
        (
            _epoch(at),
            "credential.fetch",
            {
                "outcome": outcome,
                "person": person,
                "agent_chain": chain,
                "cost_centre": centre,
                "credential": "openai-api-key",
                "gateway": "llm-gateway",
                "request_id": f"req-fetch-{i}",
            },
        )
        for i, (at, person, chain, centre, outcome) in enumerate(fetches)
    ]
    for seq, (call_id, call) in enumerate(CALLS.items()):
        events.append((_epoch(call.occurred_at) + 2, "usage.recorded", _usage_fields(
            call_id, call, seq)))  # fmt: skip
    for at, event, fields in sorted(events, key=lambda item: item[0]):
        clock.advance(at - clock.now())
        log.record(event, **fields)
    for event, fields in extra:
        log.record(event, **fields)
    log.close()
    assert verify_trail([path]).ok


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trail") / "audit" / "decisions.jsonl"
    write_trail(path)
    return path


def _report(*args: str) -> Any:
    result = runner.invoke(app, ["usage", "report", *args])
    assert result.exit_code == 0, result.output
    return result


def _csv(text: str) -> list[list[str]]:
    return list(csv.reader(io.StringIO(text)))


def test_fetches_stay_the_default_measure_with_unchanged_output(trail: Path) -> None:
    result = _report(str(trail))
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["day", "credential", "fetches"]
    assert [line.split() for line in lines[1:-1]] == [
        ["2026-11-29", "openai-api-key", "1"],
        ["2026-11-30", "openai-api-key", "1"],  # the denied fetch is not counted
        ["2026-12-01", "openai-api-key", "1"],
    ]
    assert lines[-1].split() == ["total", "3"]


def test_spend_by_cost_centre_per_month_sums_each_currency_and_keeps_unpriced_apart(
    trail: Path,
) -> None:
    result = _report(
        str(trail), "--measure", "spend", "--by", "cost_centre", "--period", "month",
        "--format", "csv",
    )  # fmt: skip
    assert _csv(result.stdout) == [
        ["month", "cost_centre", "currency", "spend", "calls"],
        ["2026-11", "engineering", "USD", "0.030000", "1"],
        ["2026-11", "support-ops", "USD", "0.011200", "2"],
        ["2026-12", "(unassigned)", "USD", "0.001000", "1"],
        ["2026-12", "engineering", "EUR", "0.020000", "1"],
        ["2026-12", "support-ops", "(unpriced)", "", "1"],  # no cost, not a zero cost
        ["2026-12", "support-ops", "USD", "0.002400", "1"],
    ]


def test_spend_table_by_cost_centre_prints_totals_and_the_model_mix(trail: Path) -> None:
    out = _report(str(trail), "--measure", "spend", "--by", "cost_centre").stdout
    assert "total EUR 0.020000" in out
    assert "total USD 0.044600" in out
    assert "unpriced calls (no cost known, not counted as zero): 1" in out
    mix = out.split("model mix\n", 1)[1].splitlines()
    assert mix[0].split() == ["cost_centre", "currency", "model", "spend", "share"]
    assert [line.split() for line in mix[1:]] == [
        ["(unassigned)", "USD", "openai/gpt-4o-mini", "0.001000", "100.0%"],
        ["engineering", "EUR", "mistral/mistral-large", "0.020000", "100.0%"],
        ["engineering", "USD", "anthropic/claude-sonnet-4", "0.030000", "100.0%"],
        ["support-ops", "USD", "openai/gpt-4o", "0.010000", "73.5%"],
        ["support-ops", "USD", "openai/gpt-4o-mini", "0.003600", "26.5%"],
    ]
    other = _report(str(trail), "--measure", "spend", "--by", "person").stdout
    assert "model mix" not in other


def test_spend_by_agent_charges_the_agent_the_person_invoked(trail: Path) -> None:
    rows = _csv(
        _report(
            str(trail), "--measure", "spend", "--by", "agent", "--period", "month",
            "--format", "csv",
        ).stdout
    )  # fmt: skip
    agents = {row[1] for row in rows[1:]}
    assert agents == {"triage-agent", "coding-agent"}  # never summariser-agent
    triage_usd = sum(
        Decimal(row[3]) for row in rows[1:] if row[1] == "triage-agent" and row[2] == "USD"
    )
    assert triage_usd == Decimal("0.0146")


def test_units_by_model_sum_each_unit_name(trail: Path) -> None:
    rows = _csv(
        _report(
            str(trail), "--measure", "units", "--by", "model", "--period", "month",
            "--format", "csv",
        ).stdout
    )  # fmt: skip
    table = {(r[0], r[1], r[2]): r[3] for r in rows[1:]}
    assert rows[0] == ["month", "model", "unit", "quantity"]
    assert table[("2026-11", "openai/gpt-4o-mini", "input_tokens")] == "120"
    assert table[("2026-12", "openai/gpt-4o-mini", "input_tokens")] == "340"  # 240 + 100
    assert table[("2026-12", "openai/gpt-4o-mini", "output_tokens")] == "85"
    assert table[("2026-11", "openai/gpt-4o", "cached_tokens")] == "200"
    assert table[("2026-12", "openai/gpt-9-experimental", "input_tokens")] == "50"  # unpriced
    assert ("2026-11", "anthropic/claude-sonnet-4", "cached_tokens") not in table


def test_usage_is_bucketed_by_when_the_call_happened_and_filtered_by_since_until(
    trail: Path,
) -> None:
    rows = _csv(
        _report(
            str(trail), "--measure", "spend", "--by", "provider", "--format", "csv",
            "--since", "2026-11-30T00:00:00Z", "--until", "2026-12-01T06:00:00",
        ).stdout
    )  # fmt: skip
    assert rows[1:] == [
        ["2026-11-30", "anthropic", "USD", "0.030000", "1"],
        ["2026-11-30", "openai", "USD", "0.010000", "1"],  # 23:30 UTC: still November
        ["2026-12-01", "mistral", "EUR", "0.020000", "1"],
    ]


def test_provider_and_model_need_a_usage_measure(trail: Path) -> None:
    result = runner.invoke(app, ["usage", "report", str(trail), "--by", "model"])
    assert result.exit_code == 1
    assert "--measure spend or units" in result.output


def test_a_malformed_usage_record_is_reported_not_silently_dropped(tmp_path: Path) -> None:
    path = tmp_path / "trail.jsonl"
    bad = _usage_fields("gw-bad", CALLS["gw-1"], 99) | {"cost": "a lot"}
    write_trail(path, extra=[("usage.recorded", bad)])
    result = runner.invoke(app, ["usage", "report", str(path), "--measure", "spend"])
    assert result.exit_code == 0
    assert "usage record skipped: cost is not a number" in result.stderr
    assert "1 malformed usage record(s) skipped" in result.stderr
    assert "gw-bad" not in result.stdout


# -- the FOCUS export, checked by the FinOps Foundation's validator -------------------------

VALIDATOR_REQUIREMENTS = ("focus-validator==1.0.0", "multimethod<1.11")
"""focus-validator 1.0.0 pins pandera 0.17, which imports multimethod's `overload` (gone from
multimethod 1.11 on) without bounding its version; the bound makes it importable."""

STALE_RULES = (
    "Provider_Required",
    "Publisher_Required",
    "InvoiceIssuer_Required",
    "ResourceID_Required",
    "SkuPriceId_Nullable",
)
"""focus-validator 1.0.0's newest rule set ("1.0") still spells five column ids as the FOCUS 1.0
preview did: Provider, Publisher, InvoiceIssuer, ResourceID (FOCUS 1.0 itself renamed them
ProviderName, PublisherName, InvoiceIssuerName, ResourceId, the names 1.2 keeps), and its
SkuPriceId rule queries ChargeType (renamed ChargeCategory). Those rules are skipped with the
validator's own override file; `test_focus_export_*` checks their 1.2 successors itself."""


@dataclass(frozen=True)
class Validator:
    command: Path
    site_packages: Path
    overrides: Path

    def run(self, csv_file: Path) -> str:
        result = subprocess.run(
            [
                str(self.command), "--data-file", str(csv_file), "--validate-version", "1.0",
                "--override-file", str(self.overrides),
            ],
            cwd=self.site_packages,  # it reads its currency list relative to the cwd
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )  # fmt: skip
        return result.stdout + result.stderr


@pytest.fixture(scope="module")
def focus_validator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validator]:
    venv = tmp_path_factory.mktemp("focus-validator") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--quiet",
         *VALIDATOR_REQUIREMENTS],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
    )  # fmt: skip
    if install.returncode != 0:
        pytest.fail(
            "cannot install the FOCUS validator from PyPI "
            f"({' '.join(VALIDATOR_REQUIREMENTS)}):\n{install.stdout}\n{install.stderr}"
        )
    located = subprocess.run(
        [str(python), "-c", "import focus_validator, pathlib; "
         "print(pathlib.Path(focus_validator.__file__).parent.parent)"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    overrides = venv / "overrides.yaml"
    overrides.write_text("overrides:\n" + "".join(f"  - {rule}\n" for rule in STALE_RULES))
    yield Validator(venv / "bin" / "focus-validator", Path(located.stdout.strip()), overrides)


def _focus_export(trail: Path, out: Path, *args: str) -> list[dict[str, str]]:
    result = _report(str(trail), "--format", "focus", "--output", str(out), *args)
    assert result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    unpriced = len(CALLS) - len(PRICED)
    assert f"{len(rows)} FOCUS row(s)" in result.stderr
    if len(rows) == len(PRICED):
        assert f"{unpriced} unpriced call(s) have no cost and no row" in result.stderr
    return rows


def test_focus_export_passes_the_finops_foundation_validator(
    trail: Path, tmp_path: Path, focus_validator: Validator
) -> None:
    out = tmp_path / "focus.csv"
    rows = _focus_export(trail, out)
    in_trail_order = sorted(PRICED, key=lambda call_id: CALLS[call_id].occurred_at)
    assert [row["x_CallId"] for row in rows] == in_trail_order  # the unpriced call: no row
    header = next(csv.reader(io.StringIO(out.read_text())))
    missing = [column for column in MANDATORY_COLUMNS if column not in header]
    assert missing == [], f"FOCUS 1.2 mandatory columns missing: {missing}"
    for row in rows:  # what the validator's stale rules cannot check, checked here
        for column in ("ProviderName", "PublisherName", "InvoiceIssuerName", "ResourceId"):
            assert row[column], (column, row["x_CallId"])
        assert row["SkuPriceId"] and row["ChargeCategory"] == "Usage"
    report = focus_validator.run(out)
    assert "Validation succeeded." in report, report
    assert "failed" not in report.lower(), report


def test_the_validator_rejects_a_broken_export(
    trail: Path, tmp_path: Path, focus_validator: Validator
) -> None:
    """The validator run is a real check: the same export with BilledCost dropped and a made-up
    currency fails it, naming both."""
    out = tmp_path / "focus.csv"
    _focus_export(trail, out)
    table = list(csv.DictReader(io.StringIO(out.read_text())))
    broken = tmp_path / "broken.csv"
    with broken.open("w", newline="") as handle:
        columns = [c for c in table[0] if c != "BilledCost"]
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in table:
            writer.writerow(row | {"BillingCurrency": "XYZ"})
    report = focus_validator.run(broken)
    assert "Validation failed!" in report, report
    assert "BilledCost_Required" in report
    assert "BillingCurrency_IsCurrencyCode" in report


def test_focus_export_attributes_and_sums_every_priced_call(trail: Path, tmp_path: Path) -> None:
    rows = _focus_export(trail, tmp_path / "focus.csv")
    totals: dict[str, Decimal] = {}
    for row in rows:
        totals[row["BillingCurrency"]] = totals.get(row["BillingCurrency"], Decimal(0)) + Decimal(
            row["BilledCost"]
        )
        call = CALLS[row["x_CallId"]]
        assert Decimal(row["EffectiveCost"]) == Decimal(str(call.cost))
        assert json.loads(row["x_AgentChain"]) == list(call.chain)
        assert row["x_Agent"] == call.chain[-1]
        tags = json.loads(row["Tags"])
        assert tags["broker/person"] == call.person
        assert tags.get("broker/cost-centre") == call.cost_centre
        assert row["x_CostCentre"] == (call.cost_centre or "")
        assert row["ResourceName"] == call.credential
        assert row["SkuId"] == f"{call.provider}/{call.model}"
        assert row["x_AuditChain"] and row["x_AuditSeq"].isdigit()
    assert totals == {"USD": Decimal("0.0446"), "EUR": Decimal("0.02")}
    by_call = {row["x_CallId"]: row for row in rows}
    assert by_call["gw-2"]["BillingPeriodStart"] == "2026-11-01T00:00:00Z"  # 23:30 on the 30th
    assert by_call["gw-4"]["BillingPeriodStart"] == "2026-12-01T00:00:00Z"
    assert by_call["gw-4"]["SkuPriceId"] == "mistral/mistral-large@gateway"
    assert by_call["gw-1"]["SkuPriceId"] == "openai/gpt-4o-mini@2026-11-01"
    assert by_call["gw-3"]["ProviderName"] == "Anthropic"


def test_focus_export_honours_since_and_until(trail: Path, tmp_path: Path) -> None:
    rows = _focus_export(trail, tmp_path / "december.csv", "--since", "2026-12-01")
    assert [row["x_CallId"] for row in rows] == ["gw-4", "gw-5", "gw-7"]
    assert {row["BillingPeriodStart"] for row in rows} == {"2026-12-01T00:00:00Z"}

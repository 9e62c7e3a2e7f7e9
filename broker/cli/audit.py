"""`broker audit verify | query` and `broker usage report`: reading the audit trail.

`verify` exits 0 when every chain in the files is intact and closed by the broker, 1 naming each
break (file, line, chain, seq and what is wrong), 3 when a chain is open (what can be vouched for,
up to which seq, is printed). See README, "The audit trail". `query` prints the records that
match every filter given.
`usage report` sums granted ``credential.fetch`` records; the agent that pays for a fetch is the
one the person invoked: the last entry of ``agent_chain`` (the chain lists the newest agent
first). A fetch's cost centre is the one its record carries (chosen at fetch time under the
policy then in force: the agent's ``cost_centre``, else that of the person's first group binding
with one); records written before cost centres were recorded fall back to the agent's
``cost_centre`` in the policy directory given.
"""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, TextIO

import typer

from broker.audit import read_trail, verify_trail
from broker.focus import UsageRecord, decimal_text, focus_rows, parse_usage, write_focus_csv

audit_app = typer.Typer(
    help="Verify and query the audit trail.", no_args_is_help=True, add_completion=False
)
usage_app = typer.Typer(
    help="Credential usage for cost attribution.", no_args_is_help=True, add_completion=False
)

FilesArgument = Annotated[
    list[Path],
    typer.Argument(help="Audit trail files (JSON lines).", exists=True, dir_okay=False),
]
UNASSIGNED = "(unassigned)"


def _fail(message: str) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _parse_time(value: str, option: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        _fail(f"{option}: {value!r} is not an ISO 8601 date or time")
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _record_time(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["time"]))
    except (KeyError, ValueError):
        return None


def _records(files: list[Path]) -> Iterator[dict[str, Any]]:
    for _, _, record, _ in read_trail(files):
        if record is not None:
            yield record


def _agents(record: dict[str, Any]) -> list[str]:
    chain = record.get("agent_chain") or []
    agents = [str(a) for a in chain] if isinstance(chain, list) else []
    if record.get("client_id"):
        agents.append(str(record["client_id"]))
    return agents


EXIT_INTACT, EXIT_TAMPERED, EXIT_OPEN = 0, 1, 3
"""`verify`'s exit codes (2 stays the usage error of every command)."""


@audit_app.command("verify")
def verify(
    files: FilesArgument,
    keys: Annotated[
        list[str] | None,
        typer.Option(
            "--keys",
            help="The broker's public keys: a JWKS file, its signing key directory, or the "
            "URL of its JWKS (repeatable; keep JWKS copies for retired keys).",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help="Broker configuration: its signing key directory and audit.s3 bucket are used "
            "unless --keys / --s3-bucket are given.",
        ),
    ] = None,
    s3_bucket: Annotated[
        str | None, typer.Option(help="Compare the files with the S3 Object Lock copies here.")
    ] = None,
    s3_prefix: Annotated[str, typer.Option(help="The copies' key prefix.")] = "audit/",
    s3_endpoint_url: Annotated[str | None, typer.Option(help="S3-compatible endpoint.")] = None,
    s3_region: Annotated[str | None, typer.Option(help="The bucket's region.")] = None,
) -> None:
    """Check the hash chains, the signed checkpoints and (optionally) the S3 copies.

    Exit 0: intact (every chain closed by the broker, signatures verified, no break).
    Exit 1: tampered (each break named by file, line, chain and seq).
    Exit 3: open (no break, but a chain was not closed: its records after the last signed
    checkpoint cannot be vouched for; the output says up to which seq they can)."""
    from broker.audit import AuditSourceError, load_verification_keys, read_s3_copies, s3_client
    from broker.settings import AuditS3Config, load_settings

    sources = list(keys or [])
    s3: AuditS3Config | None = None
    if config is not None:
        try:
            settings = load_settings(config)
        except (ValueError, OSError) as exc:
            _fail(f"cannot load {config}: {exc}")
        if not sources and settings.signing_keys.directory.is_dir():
            sources = [str(settings.signing_keys.directory)]
        s3 = settings.audit.s3
    if s3_bucket is not None:
        s3 = AuditS3Config(
            bucket=s3_bucket, prefix=s3_prefix, endpoint_url=s3_endpoint_url, region=s3_region
        )
    try:
        verification_keys = load_verification_keys(sources) if sources else None
        copies = read_s3_copies(s3_client(s3), s3.bucket, s3.prefix) if s3 is not None else None
    except AuditSourceError as exc:
        _fail(str(exc))
    result = verify_trail(files, keys=verification_keys, copies=copies)
    status = result.status
    typer.echo(result.summary(), err=status != "intact")
    raise typer.Exit({"intact": EXIT_INTACT, "open": EXIT_OPEN, "tampered": EXIT_TAMPERED}[status])


@audit_app.command("query")
def query(
    files: FilesArgument,
    person: Annotated[str | None, typer.Option(help="Person id, e.g. dev/alice.")] = None,
    agent: Annotated[str | None, typer.Option(help="Anywhere in agent_chain or client_id.")] = None,
    credential: Annotated[str | None, typer.Option(help="Credential name.")] = None,
    decision: Annotated[
        Literal["granted", "denied"] | None, typer.Option(help="The outcome.")
    ] = None,
    event: Annotated[str | None, typer.Option(help="e.g. token.exchange.")] = None,
    since: Annotated[str | None, typer.Option(help="ISO time, inclusive (UTC if no zone).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time, exclusive.")] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print matching records as JSON lines.")
    ] = False,
) -> None:
    """Print the records that match every filter given."""
    start = _parse_time(since, "--since") if since else None
    end = _parse_time(until, "--until") if until else None
    matched = 0
    for record in _records(files):
        if person is not None and record.get("person") != person:
            continue
        if agent is not None and agent not in _agents(record):
            continue
        if credential is not None and record.get("credential") != credential:
            continue
        if decision is not None and record.get("outcome") != decision:
            continue
        if event is not None and record.get("event") != event:
            continue
        if start is not None or end is not None:
            at = _record_time(record)
            if at is None or (start and at < start) or (end and at >= end):
                continue
        matched += 1
        if as_json:
            typer.echo(json.dumps(record, separators=(",", ":"), sort_keys=True))
        else:
            chain = " <- ".join(str(a) for a in record.get("agent_chain") or [])
            typer.echo(
                "  ".join(
                    str(part)
                    for part in (
                        record.get("time"),
                        record.get("event"),
                        record.get("outcome", "-"),
                        record.get("person", "-"),
                        chain or record.get("client_id", "-"),
                        record.get("credential", ""),
                        record.get("reason", ""),
                        f"request_id={record.get('request_id', '-')}",
                    )
                    if part != ""
                )
            )
    if not as_json:
        typer.echo(f"{matched} record(s)", err=True)


def _cost_centres(policy_dir: Path) -> dict[str, str]:
    from broker.policy.loader import PolicyError, load_policy

    try:
        policy = load_policy(policy_dir).policy
    except (PolicyError, OSError) as exc:
        _fail(f"cannot load the policy in {policy_dir}: {exc}")
    return {
        name: agent.spec.cost_centre
        for name, agent in policy.agents.items()
        if agent.spec.cost_centre
    }


def _paying_agent(record: dict[str, Any]) -> str:
    chain = record.get("agent_chain") or []
    return str(chain[-1]) if isinstance(chain, list) and chain else UNASSIGNED


Measure = Literal["fetches", "spend", "units"]
By = Literal["person", "agent", "cost_centre", "credential", "provider", "model"]
UNPRICED = "(unpriced)"


def _usage_key(usage: UsageRecord, by: By) -> str:
    if by == "person":
        return usage.person or UNASSIGNED
    if by == "agent":
        return usage.agent or UNASSIGNED
    if by == "cost_centre":
        return usage.cost_centre or UNASSIGNED
    if by == "credential":
        return usage.credential
    if by == "provider":
        return usage.provider
    return usage.sku


def _usage_records(
    files: list[Path], start: datetime | None, end: datetime | None
) -> Iterator[UsageRecord]:
    """The ``usage.recorded`` records whose call happened in [start, end); malformed ones are
    counted on stderr, never silently dropped."""
    malformed = 0
    for record in _records(files):
        if record.get("event") != "usage.recorded":
            continue
        try:
            usage = parse_usage(record)
        except ValueError as exc:
            malformed += 1
            typer.echo(
                f"warning: {record.get('chain', '-')}#{record.get('seq', '-')}: "
                f"usage record skipped: {exc}",
                err=True,
            )
            continue
        if (start and usage.occurred_at < start) or (end and usage.occurred_at >= end):
            continue
        yield usage
    if malformed:
        typer.echo(f"warning: {malformed} malformed usage record(s) skipped", err=True)


def _bucket(at: datetime, period: str) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%d" if period == "day" else "%Y-%m")


def _print(
    header: tuple[str, ...],
    rows: list[tuple[str, ...]],
    output_format: str,
    numeric: set[int],
    out: TextIO,
) -> None:
    if output_format == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        return
    table = [header, *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            f"{cell:>{widths[i]}}" if i in numeric else f"{cell:<{widths[i]}}"
            for i, cell in enumerate(row)
        ]
        out.write("  ".join(cells).rstrip() + "\n")


def _fetch_report(
    files: list[Path], by: By, period: str, output_format: str, policy_dir: Path,
    start: datetime | None, end: datetime | None, out: TextIO,
) -> None:  # fmt: skip
    if by in ("provider", "model"):
        _fail(f"--by {by} needs --measure spend or units (fetch records name no model)")
    centres = _cost_centres(policy_dir) if by == "cost_centre" else {}
    counts: Counter[tuple[str, str]] = Counter()
    for record in _records(files):
        if record.get("event") != "credential.fetch" or record.get("outcome") != "granted":
            continue
        at = _record_time(record)
        if at is None or (start and at < start) or (end and at >= end):
            continue
        bucket = _bucket(at, period)
        if by == "person":
            key = str(record.get("person") or UNASSIGNED)
        elif by == "credential":
            key = str(record.get("credential") or UNASSIGNED)
        elif by == "agent":
            key = _paying_agent(record)
        else:  # recorded at fetch time under the policy then in force; else today's policy
            key = str(record.get("cost_centre") or centres.get(_paying_agent(record), UNASSIGNED))
        counts[(bucket, key)] += 1
    rows = [(bucket, key, str(count)) for (bucket, key), count in sorted(counts.items())]
    _print((period, by, "fetches"), rows, output_format, {2}, out)
    if output_format == "table":
        widths = [max(len(r[i]) for r in [(period, by, "fetches"), *rows]) for i in range(3)]
        out.write(
            f"{'total':<{widths[0]}}  {'':<{widths[1]}}  {sum(counts.values()):>{widths[2]}}\n"
        )


def _spend_report(
    usages: list[UsageRecord], by: By, period: str, output_format: str, out: TextIO
) -> None:
    spend: dict[tuple[str, str, str], Decimal] = {}
    calls: Counter[tuple[str, str, str]] = Counter()
    for usage in usages:
        currency = usage.currency if usage.cost is not None and usage.currency else UNPRICED
        key = (_bucket(usage.occurred_at, period), _usage_key(usage, by), currency)
        calls[key] += 1
        if currency != UNPRICED:
            assert usage.cost is not None
            spend[key] = spend.get(key, Decimal(0)) + usage.cost
    blank = "" if output_format == "csv" else "-"
    rows = [
        (*key, decimal_text(spend[key]) if key in spend else blank, str(calls[key]))
        for key in sorted(calls)
    ]
    _print((period, by, "currency", "spend", "calls"), rows, output_format, {3, 4}, out)
    if output_format != "table":
        return
    totals: dict[str, Decimal] = {}
    for (_, _, currency), amount in spend.items():
        totals[currency] = totals.get(currency, Decimal(0)) + amount
    for currency, amount in sorted(totals.items()):
        out.write(f"total {currency} {decimal_text(amount)}\n")
    unpriced = sum(n for (_, _, currency), n in calls.items() if currency == UNPRICED)
    if unpriced:
        out.write(f"unpriced calls (no cost known, not counted as zero): {unpriced}\n")
    if by == "cost_centre":
        _model_mix(usages, out)


def _model_mix(usages: list[UsageRecord], out: TextIO) -> None:
    """Per cost centre and currency: each provider/model's share of the spend."""
    spend: dict[tuple[str, str], dict[str, Decimal]] = {}
    for usage in usages:
        if usage.cost is None or usage.currency is None:
            continue
        models = spend.setdefault((usage.cost_centre or UNASSIGNED, usage.currency), {})
        models[usage.sku] = models.get(usage.sku, Decimal(0)) + usage.cost
    rows: list[tuple[str, ...]] = []
    for (centre, currency), models in sorted(spend.items()):
        total = sum(models.values(), Decimal(0))
        for sku, amount in sorted(models.items(), key=lambda item: (-item[1], item[0])):
            share = (amount / total * 100) if total else Decimal(0)
            rows.append((centre, currency, sku, decimal_text(amount), f"{share:.1f}%"))
    out.write("\nmodel mix\n")
    _print(("cost_centre", "currency", "model", "spend", "share"), rows, "table", {3, 4}, out)


def _units_report(
    usages: list[UsageRecord], by: By, period: str, output_format: str, out: TextIO
) -> None:
    totals: dict[tuple[str, str, str], Decimal] = {}
    for usage in usages:
        bucket, key = _bucket(usage.occurred_at, period), _usage_key(usage, by)
        for unit, quantity in usage.units.items():
            slot = (bucket, key, unit)
            totals[slot] = totals.get(slot, Decimal(0)) + quantity
    rows = [(*slot, format(totals[slot], "f")) for slot in sorted(totals)]
    _print((period, by, "unit", "quantity"), rows, output_format, {3}, out)


@usage_app.command("report")
def report(
    files: FilesArgument,
    by: Annotated[
        By,
        typer.Option(
            help="Group by; agent is the one the person invoked (the last of agent_chain); "
            "model is provider/model."
        ),
    ] = "credential",
    period: Annotated[
        Literal["day", "month"], typer.Option(help="Time bucket (UTC; usage by occurred_at).")
    ] = "day",
    measure: Annotated[
        Measure,
        typer.Option(
            help="fetches: granted credential fetches; spend: the cost of reported usage per "
            "currency (unpriced calls counted apart, never as zero); units: each unit summed."
        ),
    ] = "fetches",
    output_format: Annotated[
        Literal["table", "csv", "focus"],
        typer.Option(
            "--format",
            help="focus: a FOCUS 1.2 CSV with one row per priced usage record (ignores --by, "
            "--period and --measure).",
        ),
    ] = "table",
    since: Annotated[str | None, typer.Option(help="ISO time, inclusive (UTC if no zone).")] = None,
    until: Annotated[str | None, typer.Option(help="ISO time, exclusive.")] = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write here instead of stdout.")
    ] = None,
    policy_dir: Annotated[
        Path,
        typer.Option(
            help="Policy directory mapping agents to cost centres (fetch records written "
            "before cost centres were recorded).",
            file_okay=False,
        ),
    ] = Path("policies"),
) -> None:
    """Credential fetches, spend or units per period and person, agent, cost centre, credential,
    provider or model; or the usage as a FOCUS 1.2 CSV for finance tools."""
    start = _parse_time(since, "--since") if since else None
    end = _parse_time(until, "--until") if until else None
    out = io.StringIO()
    if output_format == "focus":
        usages = list(_usage_records(files, start, end))
        written = write_focus_csv(focus_rows(usages), out)
        unpriced = len(usages) - written
        message = f"{written} FOCUS row(s)"
        if unpriced:
            message += f"; {unpriced} unpriced call(s) have no cost and no row"
        typer.echo(message, err=True)
    elif measure == "fetches":
        _fetch_report(files, by, period, output_format, policy_dir, start, end, out)
    elif measure == "spend":
        _spend_report(list(_usage_records(files, start, end)), by, period, output_format, out)
    else:
        _units_report(list(_usage_records(files, start, end)), by, period, output_format, out)
    if output is None:
        typer.echo(out.getvalue(), nl=False)
    else:
        try:
            output.write_text(out.getvalue(), encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {output}: {exc}")

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

import contextlib
import csv
import io
import json
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn

import typer

from broker.audit import read_trail, verify_trail

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


By = Literal["person", "agent", "credential", "cost_centre", "provider", "model"]


def _key_of(record: dict[str, Any], by: By, centres: dict[str, str]) -> str:
    if by == "person":
        return str(record.get("person") or UNASSIGNED)
    if by == "credential":
        return str(record.get("credential") or UNASSIGNED)
    if by == "agent":
        return _paying_agent(record)
    if by == "provider":
        return str(record.get("provider") or UNASSIGNED)
    if by == "model":
        return f"{record.get('provider') or '?'}/{record.get('model') or '?'}"
    # recorded at fetch time under the policy then in force; else today's policy
    return str(record.get("cost_centre") or centres.get(_paying_agent(record), UNASSIGNED))


def _usage_time(record: dict[str, Any]) -> datetime | None:
    try:
        return datetime.fromisoformat(str(record["occurred_at"])).astimezone(UTC)
    except (KeyError, ValueError):
        return None


def _emit(header: tuple[str, ...], rows: list[tuple[str, ...]], output_format: str) -> None:
    if output_format == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        typer.echo(out.getvalue(), nl=False)
        return
    table = [header, *rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        cells = [
            f"{cell!s:<{widths[i]}}" if i < 2 else f"{cell!s:>{widths[i]}}"
            for i, cell in enumerate(row)
        ]
        typer.echo("  ".join(cells).rstrip())


@usage_app.command("report")
def report(
    files: FilesArgument,
    by: Annotated[
        By,
        typer.Option(
            help="Group by; agent and cost_centre use the agent the person invoked; provider and "
            "model apply to spend and units."
        ),
    ] = "credential",
    period: Annotated[Literal["day", "month"], typer.Option(help="Time bucket (UTC).")] = "day",
    measure: Annotated[
        Literal["fetches", "spend", "units"],
        typer.Option(
            help="fetches: granted credential fetches; spend: the cost of reported calls, per "
            "currency (unpriced calls counted apart, never as zero); units: tokens and other "
            "units reported."
        ),
    ] = "fetches",
    output_format: Annotated[
        Literal["table", "csv", "focus"],
        typer.Option(
            "--format",
            help="table, csv, or focus: a FOCUS 1.2 cost and usage CSV of the reported calls.",
        ),
    ] = "table",
    since: Annotated[
        str | None, typer.Option(help="Only calls or fetches at or after this ISO 8601 time.")
    ] = None,
    until: Annotated[str | None, typer.Option(help="Only those before this ISO 8601 time.")] = None,
    billing_account: Annotated[
        str, typer.Option(help="--format focus: the BillingAccountId and name.")
    ] = "agent-identity-broker",
    policy_dir: Annotated[
        Path,
        typer.Option(help="Policy directory mapping agents to cost centres.", file_okay=False),
    ] = Path("policies"),
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Write the report to this file instead of stdout."),
    ] = None,
) -> None:
    """What agents used: granted fetches, or the spend and units gateways reported, per period
    and person, agent, credential, cost centre, provider or model; or the FOCUS export."""
    if output is not None:  # the same report, captured; notes and errors still go to stderr
        captured = io.StringIO()
        with contextlib.redirect_stdout(captured):
            report(
                files, by, period, measure, output_format, since, until, billing_account,
                policy_dir,
            )  # fmt: skip
        try:
            output.write_text(captured.getvalue(), encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {output}: {exc}")
        return
    start = _parse_time(since, "--since") if since else None
    end = _parse_time(until, "--until") if until else None
    if output_format == "focus":
        from broker.focus import focus_export

        export = focus_export(
            _records(files), billing_account=billing_account, since=start, until=end
        )
        typer.echo(export.csv(), nl=False)
        if export.unpriced:
            typer.echo(
                f"note: {export.unpriced} unpriced call(s) left out (no cost to report); "
                "`--measure spend` lists them",
                err=True,
            )
        return
    if by in ("provider", "model") and measure == "fetches":
        _fail("--by provider or model applies to --measure spend or units (fetches name neither)")
    centres = _cost_centres(policy_dir) if by == "cost_centre" else {}
    fmt = "%Y-%m-%d" if period == "day" else "%Y-%m"
    if measure == "fetches":
        counts: Counter[tuple[str, str]] = Counter()
        for record in _records(files):
            if record.get("event") != "credential.fetch" or record.get("outcome") != "granted":
                continue
            at = _record_time(record)
            if at is None or (start and at < start) or (end and at >= end):
                continue
            counts[(at.astimezone(UTC).strftime(fmt), _key_of(record, by, centres))] += 1
        rows = [(bucket, key, str(count)) for (bucket, key), count in sorted(counts.items())]
        _emit((period, by, "fetches"), rows, output_format)
        if output_format == "table":
            typer.echo(f"total  {sum(counts.values())}")
        return
    spend: dict[tuple[str, str, str], Decimal] = {}
    calls: Counter[tuple[str, str, str]] = Counter()
    units: dict[tuple[str, str, str], Decimal] = {}
    mix: dict[tuple[str, str], dict[str, Decimal]] = {}
    for record in _records(files):
        if record.get("event") != "usage.recorded":
            continue
        at = _usage_time(record)
        if at is None or (start and at < start) or (end and at >= end):
            continue
        bucket, key = at.strftime(fmt), _key_of(record, by, centres)
        if measure == "units":
            for unit, quantity in (record.get("units") or {}).items():
                slot = (bucket, key, str(unit))
                units[slot] = units.get(slot, Decimal(0)) + Decimal(str(quantity))
            continue
        cost, currency = record.get("cost"), record.get("currency")
        slot = (bucket, key, str(currency) if cost is not None and currency else "unpriced")
        calls[slot] += 1
        if cost is not None and currency:
            spend[slot] = spend.get(slot, Decimal(0)) + Decimal(str(cost))
            model = f"{record.get('provider') or '?'}/{record.get('model') or '?'}"
            share = mix.setdefault((bucket, f"{key} {currency}"), {})
            share[model] = share.get(model, Decimal(0)) + Decimal(str(cost))
    if measure == "units":
        rows = [(b, k, u, _plain(q)) for (b, k, u), q in sorted(units.items())]
        _emit((period, by, "unit", "quantity"), rows, output_format)
        return
    rows = [
        (
            b,
            k,
            c,
            f"{spend[(b, k, c)]:.6f}"
            if c != "unpriced"
            else ("" if output_format == "csv" else "-"),
            str(calls[(b, k, c)]),
        )
        for (b, k, c) in sorted(calls)
    ]
    _emit((period, by, "currency", "spend", "calls"), rows, output_format)
    if by == "cost_centre" and output_format == "table" and mix:
        typer.echo("")
        typer.echo("model mix (share of spend):")
        for (bucket, centre), models in sorted(mix.items()):
            total = sum(models.values(), Decimal(0))
            shares = ", ".join(
                f"{model} {amount / total * 100:.0f} %" if total else f"{model} -"
                for model, amount in sorted(models.items(), key=lambda kv: -kv[1])
            )
            typer.echo(f"  {bucket}  {centre}: {shares}")


def _plain(quantity: Decimal) -> str:
    text = format(quantity.normalize(), "f")
    return text

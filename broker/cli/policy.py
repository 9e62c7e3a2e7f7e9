"""`broker policy check | test | explain | schema | hash-secret`.

Expected failures (an invalid policy, a missing directory, bad arguments) are reported on stderr
in a few lines, without a traceback, and exit 1. `explain` exits 0 when the exchange would be
granted and 2 when it would be denied, so scripts can branch on the decision.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Annotated, Literal, NoReturn, cast

import typer
from pydantic import BaseModel

from broker.client_secrets import generate_client_secret, hash_client_secret
from broker.policy.access import (
    FetchRequest,
    decide_admin,
    decide_fetch,
    decide_introspection,
    explain_admin,
    explain_fetch,
    explain_introspection,
)
from broker.policy.approvals import may_approve
from broker.policy.engine import (
    Decision,
    ExchangeRequest,
    ParentGrant,
    Person,
    Policy,
    decide,
    explain,
)
from broker.policy.loader import (
    TESTS_SUBDIR,
    LoadedPolicy,
    PolicyError,
    configured_names,
    load_policy,
)
from broker.policy.loader import load_policy_tests as _load_policy_tests
from broker.policy.model import ADMIN_PERMISSIONS, AdminPermission, PolicyDocument, PolicyTestFile
from broker.policy.testing import id_jag_verdict, named_person, run_policy_tests
from broker.types import normalise_groups
from broker.usage.budgets import Attribution, BudgetVerdict, applicable, check_budgets

policy_app = typer.Typer(
    help="Validate, test and explain the policy files.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_DENIED = 2
DEFAULT_DIR = Path("policies")
DEFAULT_SCHEMA = DEFAULT_DIR / "schema.json"
TESTS_SCHEMA_NAME = "schema.json"
JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

DirOption = Annotated[
    Path,
    typer.Option("--dir", "-d", help="The policy directory.", file_okay=False),
]


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def _fail_policy(directory: Path, exc: PolicyError) -> NoReturn:
    count = len(exc.problems)
    lines = [f"error: invalid policy in {directory} ({count} problem{'s' * (count != 1)}):"]
    lines.extend(f"  {problem}" for problem in exc.problems)
    typer.echo("\n".join(lines), err=True)
    raise typer.Exit(1)


def _load(directory: Path, **known: tuple[str, ...]) -> LoadedPolicy:
    try:
        return load_policy(directory, **known)
    except PolicyError as exc:
        _fail_policy(directory, exc)


@policy_app.command("check")
def check(
    directory: Annotated[
        Path | None,
        typer.Option(
            "--dir",
            "-d",
            help="The policy directory (default: the configuration's policy_dir, else policies).",
            file_okay=False,
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Treat lint warnings as errors (exit 1).")
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            envvar="BROKER_CONFIG_FILE",
            help="The broker's configuration file (the one `broker serve` reads): check the "
            "policy against its secret backends and workload issuers, as the broker will.",
            dir_okay=False,
        ),
    ] = None,
    dev: Annotated[
        bool,
        typer.Option(
            "--dev", help="Check against the configuration `broker dev` runs with (see --config)."
        ),
    ] = False,
) -> None:
    """Load and validate the policy; print its version and any lint warnings.

    With the broker's configuration (--config, BROKER_CONFIG_FILE, or --dev) the policy is
    checked exactly as the broker checks it at start and on every reload: a credential naming
    a secret backend the configuration lacks is an error, and the warnings are the broker's.
    """
    known: dict[str, tuple[str, ...]] = {}
    if config is not None or dev:
        from broker.cli.serve import _load as load_settings_or_exit
        from broker.cli.serve import dev_settings

        settings = dev_settings(config) if dev else load_settings_or_exit(config)
        known = configured_names(settings)
        directory = directory or settings.policy_dir
    directory = directory or DEFAULT_DIR
    loaded = _load(directory, **known)
    if not known:
        typer.echo(
            "note: no configuration given (--config or BROKER_CONFIG_FILE): secret backends and "
            "workload issuers are not checked",
            err=True,
        )
    for warning in loaded.warnings:
        typer.echo(f"warning: {warning}", err=True)
    if strict and loaded.warnings:
        count = len(loaded.warnings)
        _fail(f"{count} warning{'s' * (count != 1)} (--strict)")
    typer.echo(f"OK {loaded.policy.version}")


@policy_app.command("test")
def test(directory: DirOption = DEFAULT_DIR) -> None:
    """Run the policy tests in <dir>/tests/*.yaml; exit 1 on any failure or if there are none."""
    loaded = _load(directory)
    try:
        cases = _load_policy_tests(directory)
    except PolicyError as exc:
        _fail_policy(directory / TESTS_SUBDIR, exc)
    if not cases:
        _fail(f"no policy tests found in {directory / TESTS_SUBDIR}/*.yaml")
    results = run_policy_tests(loaded.policy, cases)
    for result in results:
        status = "PASS" if result.passed else "FAIL"
        typer.echo(f"{status}  {result.file}  {result.case.name}  ({result.detail})")
    failed = sum(not r.passed for r in results)
    typer.echo(f"{len(results) - failed} passed, {failed} failed")
    if failed:
        raise typer.Exit(1)


def _split(values: list[str] | None, separators: str | None) -> list[str]:
    """Flatten repeated option values, each also split on `separators` (None: whitespace)."""
    items: list[str] = []
    for value in values or []:
        if separators is None:
            items.extend(value.split())
        else:
            items.extend(part.strip() for part in value.split(separators) if part.strip())
    return items


def walk_chain(
    policy: Policy,
    person: Person,
    agents: list[str],
    scopes: tuple[str, ...] | None,
    audiences: tuple[str, ...] = (),
    approved: frozenset[str] = frozenset(),
) -> tuple[int, ExchangeRequest, Decision]:
    """Decide each hop of a delegation chain as `decide_chain` does, stopping at a denial.

    Returns the index of the last hop decided, its request (with the parent grant it saw) and
    its decision, so the caller can explain exactly that hop.
    """
    parent: ParentGrant | None = None
    for index, agent in enumerate(agents):
        request = ExchangeRequest(
            person=person,
            agent=agent,
            scopes=scopes,
            audiences=audiences,
            parent=parent,
            approved=approved,
        )
        decision = decide(policy, request)
        if not decision.allowed or index == len(agents) - 1:
            return index, request, decision
        parent = ParentGrant(
            actor_chain=decision.actor_chain,
            scopes=frozenset(decision.scopes),
            audiences=decision.audiences,
        )
    raise ValueError("the agent chain is empty")


@policy_app.command("explain")
def explain_command(
    person: Annotated[
        str | None,
        typer.Option("--person", "-p", help="Required: the person, as IDP/SUBJECT."),
    ] = None,
    groups: Annotated[
        list[str] | None,
        typer.Option("--groups", help="The person's groups, comma-separated."),
    ] = None,
    group: Annotated[
        list[str] | None,
        typer.Option("--group", "-g", help="One of the person's groups (repeatable)."),
    ] = None,
    idp_role: Annotated[
        list[str] | None,
        typer.Option(
            "--idp-role",
            help="One of the person's IdP roles (repeatable; not a group: Keycloak realm "
            "roles, Entra app roles).",
        ),
    ] = None,
    agent: Annotated[
        list[str] | None,
        typer.Option(
            "--agent",
            "-a",
            help="Required: an agent of the delegation chain (repeatable, first agent first).",
        ),
    ] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            "-s",
            help="A requested scope (repeatable, or several space-separated). "
            "None given: the agent's default scopes.",
        ),
    ] = None,
    audience: Annotated[
        list[str] | None,
        typer.Option(
            "--audience",
            help="A requested audience (repeatable); with --gateway or --introspect, an "
            "audience the token carries.",
        ),
    ] = None,
    gateway: Annotated[
        str | None,
        typer.Option(
            "--gateway",
            help="Explain a credential fetch by this gateway (with --credential) for a token "
            "of --person/--group/--agent/--scope/--audience.",
        ),
    ] = None,
    credential: Annotated[
        str | None, typer.Option("--credential", help="The credential fetched or refreshed.")
    ] = None,
    previous: Annotated[
        bool, typer.Option("--previous", help="The fetch asks for ?version=previous.")
    ] = False,
    introspect: Annotated[
        str | None,
        typer.Option(
            "--introspect",
            help="Explain whether this client may introspect a token carrying --audience.",
        ),
    ] = None,
    admin: Annotated[
        str | None,
        typer.Option("--admin", help="Explain an admin call by this admin (with --permission)."),
    ] = None,
    permission: Annotated[
        str | None,
        typer.Option(
            "--permission",
            help="revocations:write, policy:reload or credentials:refresh (with --admin).",
        ),
    ] = None,
    approved: Annotated[
        list[str] | None,
        typer.Option(
            "--approved",
            help="A permission an approval covers (repeatable), as after an approved OpenID "
            "CIBA request.",
        ),
    ] = None,
    approver: Annotated[
        str | None,
        typer.Option(
            "--approver",
            help="Also explain whether this person (IDP/SUBJECT) may approve the request.",
        ),
    ] = None,
    approver_group: Annotated[
        list[str] | None,
        typer.Option("--approver-group", help="One of the approver's groups (repeatable)."),
    ] = None,
    approver_idp_role: Annotated[
        list[str] | None,
        typer.Option("--approver-idp-role", help="One of the approver's IdP roles (repeatable)."),
    ] = None,
    id_jag: Annotated[
        str | None,
        typer.Option(
            "--id-jag",
            help="Explain an ID-JAG request by the chain's last agent for this authorization "
            "server (its name under authorization_servers), with --resource.",
        ),
    ] = None,
    resource: Annotated[
        str | None, typer.Option("--resource", help="With --id-jag: the resource asked for.")
    ] = None,
    spent: Annotated[
        list[str] | None,
        typer.Option(
            "--spent",
            help="With a fetch: BUDGET=AMOUNT spent (and reserved) so far this period "
            "(repeatable); a deny budget whose reservation no longer fits refuses the fetch.",
        ),
    ] = None,
    directory: DirOption = DEFAULT_DIR,
) -> None:
    """Explain the decision for a request (exit 0 granted, 2 denied).

    An exchange (the default): a person, an agent chain and the scopes requested. Each hop of
    the chain re-exchanges the previous hop's grant with the same scopes and audiences, as policy
    tests do; the explanation is that of the final hop, or of the first hop that is denied.
    A credential fetch (--gateway, --credential, and the token's shape), an introspection
    (--introspect CLIENT --audience ...) or an admin call (--admin NAME --permission ...):
    the decision the broker makes for it, as the policy tests of that kind run it.
    Permissions that need approval are listed with their rule, who may approve and the quorum;
    with --approver, whether that person may approve each rule.
    """
    if admin is not None or introspect is not None:
        _explain_other(directory, admin, permission, credential, introspect, audience)
        return
    if not person:
        _fail("--person IDP/SUBJECT is required")
    idp, _, subject = person.partition("/")
    if not idp or not subject:
        _fail(f"--person must be IDP/SUBJECT, got {person!r}")
    agents = _split(agent, None)
    if not agents:
        _fail("at least one --agent is required")
    the_person = Person(
        idp=idp,
        subject=subject,
        groups=normalise_groups(_split(groups, ",") + _split(group, ",")),
        idp_roles=frozenset(_split(idp_role, ",")),
    )
    scopes = tuple(_split(scope, None)) if scope is not None else None
    audiences = tuple(_split(audience, None))

    policy = _load(directory).policy
    if id_jag is not None:
        if resource is None:
            _fail("--id-jag needs --resource")
        verdict = id_jag_verdict(policy, the_person, agents, scopes, id_jag, resource)
        if verdict.allowed and verdict.decision is not None:
            typer.echo(
                f"ID-JAG for authorization server {verdict.server!r}, resource {resource}: "
                f"granted {' '.join(verdict.decision.scopes)} "
                f"(client_id there: {verdict.client_id})"
            )
            return
        typer.echo(
            f"ID-JAG for authorization server {id_jag!r}, resource {resource}: refused, "
            f"{verdict.error}: {verdict.reason}: {verdict.description}"
        )
        raise typer.Exit(EXIT_DENIED)
    if gateway is not None or credential is not None:
        if gateway is None or credential is None or scopes is None or not audiences:
            _fail("a fetch needs --gateway, --credential, and the token's --scope and --audience")
        fetch = FetchRequest(
            gateway=gateway,
            credential=credential,
            person=the_person,
            actor_chain=tuple(reversed(agents)),
            scopes=frozenset(scopes),
            audiences=audiences,
            previous=previous,
            approved=frozenset(_split(approved, None)),
        )
        typer.echo(explain_fetch(policy, fetch))
        if not decide_fetch(policy, fetch).allowed:
            raise typer.Exit(EXIT_DENIED)
        verdict = _explain_budgets(policy, the_person, agents, credential, spent)
        if verdict is not None and not verdict.allowed:
            raise typer.Exit(EXIT_DENIED)
        return
    covered = frozenset(_split(approved, None))
    index, request, decision = walk_chain(policy, the_person, agents, scopes, audiences, covered)
    if not decision.allowed and index < len(agents) - 1:
        typer.echo(
            f"denied at hop {index + 1} of {len(agents)} (agent {agents[index]!r}); "
            "later hops were not evaluated"
        )
    typer.echo(explain(policy, request))
    if approver is not None:
        typer.echo(_explain_approver(policy, request, approver, approver_group, approver_idp_role))
    if not decision.allowed:
        raise typer.Exit(EXIT_DENIED)


def _explain_budgets(
    policy: Policy, person: Person, agents: list[str], credential: str, spent: list[str] | None
) -> BudgetVerdict | None:
    """The budgets a fetch counts against, their use (--spent) and their answer."""
    amounts: dict[str, Decimal] = {}
    for item in spent or ():
        name, _, amount = item.partition("=")
        try:
            amounts[name] = Decimal(amount)
        except InvalidOperation:
            _fail(f"--spent must be BUDGET=AMOUNT, got {item!r}")
        if name not in policy.budgets:
            _fail(f"--spent: no budget {name!r} in the policy")
    invoked = agents[0]
    who = Attribution(
        person=person.person_id,
        agent=invoked,
        cost_centre=policy.cost_centre_of(invoked, person.idp, person.groups),
        credential=credential,
    )
    budgets = applicable(policy, who)
    if not budgets:
        typer.echo("budgets:        none applies")
        return None
    verdict = check_budgets(budgets, amounts, "this period")
    for line in verdict.lines:
        typer.echo(line)
    typer.echo(verdict.description)
    return verdict


def _explain_approver(
    policy: Policy,
    request: ExchangeRequest,
    approver: str,
    groups: list[str] | None,
    idp_roles: list[str] | None,
) -> str:
    """Whether `approver` may approve each rule a request for approval of `request` needs."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*/.+", approver):
        _fail(f"--approver must be IDP/SUBJECT, got {approver!r}")
    who = named_person(approver, _split(groups, ","), _split(idp_roles, ","))
    asked = decide(policy, replace(request, for_approval=True))
    if not asked.allowed or not asked.approvals:
        return f"approver {who.person_id}: nothing in this request needs approval"
    lines = []
    for requirement in asked.approvals:
        refusal = may_approve(
            policy, requirement, who, person=request.person, agent_chain=asked.actor_chain
        )
        lines.append(
            f"approver {who.person_id}: rule {requirement.rule}: "
            + ("may approve" if refusal is None else f"may not approve ({refusal})")
        )
    return "\n".join(lines)


def _explain_other(
    directory: Path,
    admin: str | None,
    permission: str | None,
    credential: str | None,
    introspect: str | None,
    audience: list[str] | None,
) -> None:
    """`explain` for an admin call or an introspection."""
    if admin is not None and introspect is not None:
        _fail("give either --admin or --introspect, not both")
    if admin is not None:
        if permission not in ADMIN_PERMISSIONS:
            _fail(f"--permission must be one of {', '.join(ADMIN_PERMISSIONS)}")
        chosen = cast(AdminPermission, permission)
        policy = _load(directory).policy
        typer.echo(explain_admin(policy, admin, chosen, credential))
        allowed = decide_admin(policy, admin, chosen, credential).allowed
    else:
        assert introspect is not None
        audiences = tuple(_split(audience, None))
        if not audiences:
            _fail("--introspect needs the token's --audience")
        policy = _load(directory).policy
        typer.echo(explain_introspection(policy, introspect, audiences))
        allowed = decide_introspection(policy, introspect, audiences).allowed
    if not allowed:
        raise typer.Exit(EXIT_DENIED)


def render_schema(model: type[BaseModel]) -> str:
    """The JSON Schema of `model` as written by `broker policy schema` (stable, ends in newline)."""
    schema = {"$schema": JSON_SCHEMA_DIALECT, **model.model_json_schema()}
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


def schema_files(output: Path, tests_output: Path | None = None) -> dict[Path, str]:
    """The schema files to write: the policy file schema and the policy test file schema."""
    tests_path = tests_output or output.parent / TESTS_SUBDIR / TESTS_SCHEMA_NAME
    return {output: render_schema(PolicyDocument), tests_path: render_schema(PolicyTestFile)}


@policy_app.command("schema")
def schema(
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="Where to write the policy file schema.", dir_okay=False
        ),
    ] = DEFAULT_SCHEMA,
    tests_output: Annotated[
        Path | None,
        typer.Option(
            "--tests-output",
            help="Where to write the policy test file schema "
            "(default: tests/schema.json beside --output).",
            dir_okay=False,
        ),
    ] = None,
) -> None:
    """Write the JSON Schemas of policy files and policy test files, for editors."""
    for path, text in schema_files(output, tests_output).items():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        except OSError as exc:
            _fail(f"cannot write {path}: {exc.strerror or exc}")
        typer.echo(f"wrote {path}")


@policy_app.command("hash-secret")
def hash_secret(
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="scrypt (any secret) or sha256 (only generated secrets of 32+ characters).",
        ),
    ] = "scrypt",
    secret_stdin: Annotated[
        bool,
        typer.Option(
            "--secret-stdin", help="Hash the secret read from stdin instead of generating one."
        ),
    ] = False,
) -> None:
    """Generate a client secret and print it once with the `secret_hash` line for the policy."""
    if method not in ("scrypt", "sha256"):
        _fail(f"--method must be scrypt or sha256, got {method!r}")
    chosen: Literal["scrypt", "sha256"] = "scrypt" if method == "scrypt" else "sha256"
    if secret_stdin:
        secret = sys.stdin.read()
        secret = secret[:-1] if secret.endswith("\n") else secret
        secret = secret[:-1] if secret.endswith("\r") else secret
        if not secret:
            _fail("no secret on stdin")
    else:
        secret = generate_client_secret()
    try:
        hashed = hash_client_secret(secret, method=chosen)
    except ValueError as exc:
        _fail(str(exc))
    if not secret_stdin:
        typer.echo("client secret (shown only now; give it to the client, do not store it here):")
        typer.echo(secret)
        typer.echo("policy line (under the client's client_secret_basic `authentication:`):")
    typer.echo(f'secret_hash: "{hashed}"')

"""Load a policy directory: parse, validate, merge, cross-check, compile, version.

Any problem makes the whole load fail with `PolicyError` listing every problem found; the caller
keeps serving the previous version (or refuses to start). Lint findings that do not make a policy
unsafe are returned as warnings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import ValidationError

from broker.policy.approvals import CompiledApprovalRule
from broker.policy.engine import CompiledAgent, Policy
from broker.policy.model import AnyPolicyTestCase, Budget, PolicyDocument, PolicyTestFile, Price
from broker.policy.permissions import PermissionSet, pattern_overlaps
from broker.policy.selectors import Selectors, compile_selectors

if TYPE_CHECKING:
    from broker.settings import BrokerSettings
from broker.types import normalise_group

POLICY_SUFFIXES = (".yaml", ".yml")
TESTS_SUBDIR = "tests"
MAX_POLICY_FILE_BYTES = 1_000_000


class PolicyError(Exception):
    """The policy directory is invalid. `problems` lists each one as 'file: where: what'."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid policy:\n  " + "\n  ".join(self.problems))


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    warnings: tuple[str, ...]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, but a key given twice in one mapping is an error, not a silent overwrite."""


def _construct_mapping(
    loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False
) -> dict:
    seen: set[object] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "unhashable mapping key", key_node.start_mark
            ) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,  # type: ignore[arg-type]
)


def _read_yaml(path: Path) -> object:
    data = path.read_bytes()
    if len(data) > MAX_POLICY_FILE_BYTES:
        raise ValueError(f"larger than {MAX_POLICY_FILE_BYTES} bytes")
    return yaml.load(data, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def _format_validation(name: str, err: ValidationError) -> list[str]:
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in item["loc"]) or "(top level)"
        problems.append(f"{name}: {where}: {item['msg']}")
    return problems


def policy_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise PolicyError([f"{directory}: policy directory does not exist"])
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in POLICY_SUFFIXES)


def compute_version(files: list[tuple[str, bytes]]) -> str:
    """A content hash over every policy file (name and bytes), independent of mtime or order."""
    digest = hashlib.sha256()
    for name, content in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return "sha256:" + digest.hexdigest()[:32]


def configured_names(settings: BrokerSettings) -> dict[str, tuple[str, ...]]:
    """What a policy is checked against in a broker running with `settings` (the keyword
    arguments of `load_policy`): the running broker and `broker policy check --config` both
    use this, so they agree on every error and warning."""
    names: dict[str, tuple[str, ...]] = {
        "known_workload_issuers": tuple(w.name for w in settings.workload_issuers),
        "known_secret_backends": tuple(b.name for b in settings.secret_backends),
    }
    notifications = getattr(settings, "notifications", None)
    channels = getattr(notifications, "channels", None)
    if channels is not None:
        names["known_notification_channels"] = tuple(channels)
    return names


def load_policy(
    directory: Path,
    *,
    known_workload_issuers: Iterable[str] | None = None,
    known_secret_backends: Iterable[str] | None = None,
    known_notification_channels: Iterable[str] | None = None,
) -> LoadedPolicy:
    problems: list[str] = []
    documents: list[tuple[str, PolicyDocument]] = []
    raw_files: list[tuple[str, bytes]] = []
    for path in policy_files(directory):
        try:
            raw_files.append((path.name, path.read_bytes()))
            data = _read_yaml(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            problems.append(f"{path.name}: cannot parse: {exc}")
            continue
        if data is None:
            continue
        try:
            documents.append((path.name, PolicyDocument.model_validate(data)))
        except ValidationError as exc:
            problems.extend(_format_validation(path.name, exc))
    if not raw_files:
        problems.append(f"{directory}: no policy files (*.yaml) found")
    if problems:
        raise PolicyError(problems)

    merged = _merge(documents, problems)
    policy, warnings = _compile(
        merged,
        compute_version(raw_files),
        problems,
        known_workload_issuers,
        known_secret_backends,
        known_notification_channels,
    )
    if problems:
        raise PolicyError(problems)
    return LoadedPolicy(policy, tuple(warnings))


@dataclass
class _Merged:
    roles: dict
    group_bindings: list
    person_bindings: list
    agents: dict
    resource_servers: dict
    gateways: dict
    credentials: dict
    admins: dict
    approvals: dict
    authorization_servers: dict
    budgets: dict
    prices: list
    limits: object
    origin: dict[str, str]
    files: list[str]


def _merge(documents: list[tuple[str, PolicyDocument]], problems: list[str]) -> _Merged:
    merged = _Merged({}, [], [], {}, {}, {}, {}, {}, {}, {}, {}, [], None, {}, [])
    for name, doc in documents:
        merged.files.append(name)
        for section in (
            "roles",
            "agents",
            "resource_servers",
            "gateways",
            "credentials",
            "admins",
            "approvals",
            "authorization_servers",
            "budgets",
        ):
            target = getattr(merged, section)
            for key, value in getattr(doc, section).items():
                where = f"{section}.{key}"
                if key in target:
                    problems.append(f"{name}: {where}: already defined in {merged.origin[where]}")
                    continue
                target[key] = value
                merged.origin[where] = name
        merged.group_bindings.extend((name, b) for b in doc.group_bindings)
        merged.person_bindings.extend((name, b) for b in doc.person_bindings)
        merged.prices.extend((name, p) for p in doc.prices)
        if doc.limits is not None:
            if merged.limits is not None:
                problems.append(f"{name}: limits: already defined in {merged.origin['limits']}")
            else:
                merged.limits = doc.limits
                merged.origin["limits"] = name
    clients: dict[str, str] = {}
    for section in ("agents", "resource_servers", "gateways", "admins"):
        for key in getattr(merged, section):
            if key in clients:
                problems.append(
                    f"{section}.{key}: the same client id is already declared in {clients[key]}"
                )
            clients.setdefault(key, section)
    return merged


def _compile(
    merged: _Merged,
    version: str,
    problems: list[str],
    known_workload_issuers: Iterable[str] | None,
    known_secret_backends: Iterable[str] | None = None,
    known_notification_channels: Iterable[str] | None = None,
) -> tuple[Policy, list[str]]:
    from broker.policy.model import Limits

    warnings: list[str] = []
    limits = merged.limits if merged.limits is not None else Limits()
    roles = {name: PermissionSet.of(role.permissions) for name, role in merged.roles.items()}

    def check_roles(origin: str, where: str, names: list[str]) -> None:
        for role in names:
            if role not in roles:
                problems.append(f"{origin}: {where}: unknown role {role!r}")

    group_roles: dict[tuple[str, str], set[str]] = {}
    idp_role_roles: dict[tuple[str, str], set[str]] = {}
    group_cost_centres: dict[tuple[str, str], str] = {}
    for index, (origin, binding) in enumerate(merged.group_bindings):
        check_roles(origin, f"group_bindings[{index}]", binding.roles)
        for idp in binding.idps:
            if binding.idp_role is not None:
                idp_role_roles.setdefault((idp, binding.idp_role), set()).update(binding.roles)
                continue
            group = normalise_group(binding.group or "")
            if not group:
                problems.append(f"{origin}: group_bindings[{index}]: empty group name")
                continue
            group_roles.setdefault((idp, group), set()).update(binding.roles)
            if binding.cost_centre is not None:
                known = group_cost_centres.setdefault((idp, group), binding.cost_centre)
                if known != binding.cost_centre:
                    problems.append(
                        f"{origin}: group_bindings[{index}]: group {idp}/{group} already "
                        f"has cost_centre {known!r}"
                    )
    person_roles: dict[tuple[str, str], set[str]] = {}
    for index, (origin, binding) in enumerate(merged.person_bindings):
        check_roles(origin, f"person_bindings[{index}]", binding.roles)
        person_roles.setdefault((binding.idp, binding.subject), set()).update(binding.roles)

    def selectors(origin: str, where: str, written: Iterable[str]) -> Selectors:
        compiled, found = compile_selectors(written)
        problems.extend(f"{origin}: {where}: {problem}" for problem in found)
        check_roles(origin, where, sorted(compiled.roles))
        return compiled

    everything_granted = PermissionSet.of(p for r in merged.roles.values() for p in r.permissions)
    workload_issuers = None if known_workload_issuers is None else set(known_workload_issuers)
    seen_workloads: dict[tuple[str, str], str] = {}
    agents: dict[str, CompiledAgent] = {}
    for name, spec in merged.agents.items():
        origin = merged.origin[f"agents.{name}"]
        where = f"{origin}: agents.{name}"
        ceiling = PermissionSet.of(spec.ceiling)
        act_for = selectors(origin, f"agents.{name}.act_for", spec.act_for)
        for target in spec.may_delegate_to:
            if target not in merged.agents:
                problems.append(f"{where}.may_delegate_to: unknown agent {target!r}")
            if target == name:
                problems.append(f"{where}.may_delegate_to: an agent cannot delegate to itself")
        for binding in spec.workload_identities:
            key = (binding.issuer, binding.subject)
            if key in seen_workloads:
                problems.append(
                    f"{where}.workload_identities: {binding.subject!r} is already agent "
                    f"{seen_workloads[key]!r}"
                )
            seen_workloads[key] = name
            if workload_issuers is not None and binding.issuer not in workload_issuers:
                warnings.append(
                    f"{where}.workload_identities: unknown workload issuer {binding.issuer!r}"
                )
        if not ceiling:
            warnings.append(f"{where}: empty ceiling; this agent can never be granted anything")
        for pattern in spec.ceiling:
            if not pattern_overlaps(pattern, everything_granted):
                warnings.append(f"{where}.ceiling: {pattern!r} is granted by no role")
        for scope in spec.default_scopes:
            if not ceiling.covers(scope):
                warnings.append(f"{where}.default_scopes: {scope!r} is outside the ceiling")
        if not spec.act_for:
            warnings.append(f"{where}: empty act_for; this agent may act for nobody")
        if not spec.audiences:
            warnings.append(f"{where}: no audiences; every exchange will fail with invalid_target")
        for audience in spec.default_audiences:
            if audience not in spec.audiences:
                problems.append(
                    f"{where}.default_audiences: {audience!r} is not one of the agent's audiences"
                )
        if spec.require_audience and spec.default_audiences:
            problems.append(
                f"{where}: require_audience and default_audiences contradict each other "
                "(a default is what a request without an audience gets)"
            )
        require_audience = (
            spec.require_audience if spec.require_audience is not None else limits.require_audience  # type: ignore[attr-defined]
        )
        agents[name] = CompiledAgent(
            name=name,
            spec=spec,
            ceiling=ceiling,
            default_scopes=tuple(spec.default_scopes),
            audiences=frozenset(spec.audiences),
            default_audiences=tuple(dict.fromkeys(spec.default_audiences)),
            require_audience=bool(require_audience) and not spec.default_audiences,
            act_for=act_for,
            may_delegate_to=frozenset(spec.may_delegate_to),
        )

    for name, role in merged.roles.items():
        if not any(
            pattern_overlaps(p, PermissionSet.of(a.spec.ceiling))
            for p in role.permissions
            for a in agents.values()
        ):
            warnings.append(f"roles.{name}: no agent's ceiling admits any of its permissions")

    backends = None if known_secret_backends is None else set(known_secret_backends)
    for name, credential in merged.credentials.items():
        where = f"{merged.origin[f'credentials.{name}']}: credentials.{name}"
        if backends is not None and credential.backend not in backends:
            # Every fetch of it would fail: an error wherever the configuration is known.
            configured = ", ".join(sorted(backends)) or "none"
            problems.append(
                f"{where}.backend: no secret backend {credential.backend!r} is configured "
                f"(configured: {configured})"
            )
        if not everything_granted.covers(credential.requires):
            warnings.append(f"{where}.requires: {credential.requires!r} is granted by no role")
    for name, gateway in merged.gateways.items():
        where = f"{merged.origin[f'gateways.{name}']}: gateways.{name}"
        for credential_name in gateway.credentials:
            if credential_name not in merged.credentials:
                problems.append(f"{where}.credentials: unknown credential {credential_name!r}")
    for name, admin in merged.admins.items():
        where = f"{merged.origin[f'admins.{name}']}: admins.{name}"
        if not admin.permissions:
            warnings.append(f"{where}: no permissions; every admin call by it is refused")
        if admin.credentials is not None:
            if "credentials:refresh" not in admin.permissions:
                problems.append(
                    f"{where}.credentials: applies only with the permission credentials:refresh"
                )
            for credential_name in admin.credentials:
                if credential_name not in merged.credentials:
                    problems.append(f"{where}.credentials: unknown credential {credential_name!r}")

    for name, server in merged.authorization_servers.items():
        where = f"{merged.origin[f'authorization_servers.{name}']}: authorization_servers.{name}"
        for agent in [*server.agents, *server.client_ids]:
            if agent not in merged.agents:
                problems.append(f"{where}: unknown agent {agent!r}")
        for resource in server.resources:
            if not any(resource in spec.audiences for spec in merged.agents.values()):
                warnings.append(
                    f"{where}.resources: no agent lists {resource!r} in its audiences; no "
                    "ID-JAG can be issued for it"
                )

    prices = _compile_prices(merged, problems)
    budgets = _compile_budgets(merged, problems, warnings, known_notification_channels)

    approval_rules = _compile_approvals(
        merged, problems, warnings, selectors, everything_granted, known_notification_channels
    )

    policy = Policy(
        version=version,
        roles=roles,
        group_roles={k: frozenset(v) for k, v in group_roles.items()},
        idp_role_roles={k: frozenset(v) for k, v in idp_role_roles.items()},
        person_roles={k: frozenset(v) for k, v in person_roles.items()},
        agents=agents,
        resource_servers=dict(merged.resource_servers),
        gateways=dict(merged.gateways),
        credentials=dict(merged.credentials),
        admins=dict(merged.admins),
        max_token_lifetime_seconds=limits.max_token_lifetime_seconds,  # type: ignore[attr-defined]
        max_delegation_depth=limits.max_delegation_depth,  # type: ignore[attr-defined]
        files=tuple(merged.files),
        group_cost_centres=tuple(group_cost_centres.items()),
        approval_rules=approval_rules,
        authorization_servers=dict(merged.authorization_servers),
        prices=prices,
        budgets=budgets,
    )
    return policy, warnings


def _compile_prices(merged: _Merged, problems: list[str]) -> tuple[Price, ...]:
    """Price entries by (provider, model, valid_from); the same three twice is an error."""
    seen: dict[tuple[str, str, object], str] = {}
    for origin, price in merged.prices:
        key = (price.provider, price.model, price.valid_from)
        if key in seen:
            problems.append(
                f"{origin}: prices: {price.provider}/{price.model} from {price.valid_from} is "
                f"already priced in {seen[key]}"
            )
        seen[key] = origin
    return tuple(
        sorted((p for _, p in merged.prices), key=lambda p: (p.provider, p.model, p.valid_from))
    )


def _compile_budgets(
    merged: _Merged,
    problems: list[str],
    warnings: list[str],
    known_notification_channels: Iterable[str] | None,
) -> dict[str, Budget]:
    channels = None if known_notification_channels is None else set(known_notification_channels)
    centres = {a.cost_centre for a in merged.agents.values() if a.cost_centre} | {
        b.cost_centre for _, b in merged.group_bindings if b.cost_centre
    }
    for name, budget in merged.budgets.items():
        where = f"{merged.origin[f'budgets.{name}']}: budgets.{name}"
        scope = budget.scope
        if scope.agent and scope.agent not in merged.agents:
            problems.append(f"{where}.scope.agent: unknown agent {scope.agent!r}")
        if scope.credential and scope.credential not in merged.credentials:
            problems.append(f"{where}.scope.credential: unknown credential {scope.credential!r}")
        if scope.cost_centre and scope.cost_centre not in centres:
            warnings.append(
                f"{where}.scope.cost_centre: no agent or group binding has cost centre "
                f"{scope.cost_centre!r}; nothing is counted against this budget"
            )
        for channel in budget.channels:
            if channels is not None and channel not in channels:
                configured = ", ".join(sorted(channels)) or "none"
                problems.append(
                    f"{where}.channels: no notification channel {channel!r} is configured "
                    f"(configured: {configured})"
                )
    return dict(merged.budgets)


def _compile_approvals(
    merged: _Merged,
    problems: list[str],
    warnings: list[str],
    selectors: Callable[[str, str, Iterable[str]], Selectors],
    everything_granted: PermissionSet,
    known_notification_channels: Iterable[str] | None,
) -> tuple[CompiledApprovalRule, ...]:
    """Check and compile the ``approvals:`` rules (in name order)."""
    channels = None if known_notification_channels is None else set(known_notification_channels)
    compiled: list[CompiledApprovalRule] = []
    for name in sorted(merged.approvals):
        rule = merged.approvals[name]
        origin = merged.origin[f"approvals.{name}"]
        where = f"{origin}: approvals.{name}"
        for agent in rule.agents or ():
            if agent not in merged.agents:
                problems.append(f"{where}.agents: unknown agent {agent!r}")
        for channel in rule.channels:
            if channels is not None and channel not in channels:
                configured = ", ".join(sorted(channels)) or "none"
                problems.append(
                    f"{where}.channels: no notification channel {channel!r} is configured "
                    f"(configured: {configured})"
                )
        for pattern in rule.permissions:
            if not pattern_overlaps(pattern, everything_granted):
                warnings.append(f"{where}.permissions: {pattern!r} is granted by no role")
        people = (
            None
            if rule.people is None
            else selectors(origin, f"approvals.{name}.people", rule.people)
        )
        approvers = rule.approver_selectors
        compiled.append(
            CompiledApprovalRule(
                name=name,
                permissions=PermissionSet.of(rule.permissions),
                agents=None if rule.agents is None else frozenset(rule.agents),
                people=people,
                consent=rule.consent,
                approvers=approvers,
                approver_selectors=selectors(origin, f"approvals.{name}.approvers", approvers),
                quorum=rule.quorum,
                request_expiry_seconds=rule.request_expiry_seconds,
                token_lifetime_seconds=rule.token_lifetime_seconds,
                channels=tuple(rule.channels),
                description=rule.description,
            )
        )
    return tuple(compiled)


def load_policy_tests(directory: Path) -> list[tuple[str, AnyPolicyTestCase]]:
    tests_dir = directory / TESTS_SUBDIR
    if not tests_dir.is_dir():
        return []
    cases: list[tuple[str, AnyPolicyTestCase]] = []
    problems: list[str] = []
    for path in sorted(p for p in tests_dir.iterdir() if p.suffix in POLICY_SUFFIXES):
        try:
            data = _read_yaml(path)
            cases.extend((path.name, c) for c in PolicyTestFile.model_validate(data).tests)
        except ValidationError as exc:
            problems.extend(_format_validation(f"{TESTS_SUBDIR}/{path.name}", exc))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            problems.append(f"{TESTS_SUBDIR}/{path.name}: cannot parse: {exc}")
    if problems:
        raise PolicyError(problems)
    return cases

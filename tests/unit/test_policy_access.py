"""The pure decisions besides the exchange (broker/policy/access.py): admin permissions, a
gateway's credential fetch, introspection."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from broker.policy import load_policy
from broker.policy.access import (
    AccessReason,
    FetchRequest,
    decide_admin,
    decide_fetch,
    decide_introspection,
)
from broker.policy.engine import Person, Policy

POLICIES = Path(__file__).resolve().parents[2] / "policies"
AUTH = {"method": "client_secret_basic", "secret_ref": "env:X"}


def _policy(tmp_path: Path, extra: dict | None = None) -> Policy:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory, ignore=shutil.ignore_patterns("tests"))
    if extra:
        (directory / "zz-extra.yaml").write_text(yaml.safe_dump(extra))
    return load_policy(directory).policy


def test_the_example_rotation_hook_may_only_refresh() -> None:
    policy = load_policy(POLICIES).policy
    refresh = decide_admin(policy, "rotation-hook", "credentials:refresh", "openai-api-key")
    assert refresh.allowed
    for permission in ("revocations:write", "policy:reload"):
        decision = decide_admin(policy, "rotation-hook", permission)  # type: ignore[arg-type]
        assert not decision.allowed
        assert decision.reason is AccessReason.ADMIN_PERMISSION_MISSING
        assert decision.error == "access_denied"
        assert permission in decision.description


def test_an_admin_listing_nothing_may_do_nothing_and_is_linted(tmp_path: Path) -> None:
    directory = tmp_path / "p"
    shutil.copytree(POLICIES, directory, ignore=shutil.ignore_patterns("tests"))
    (directory / "zz.yaml").write_text(
        yaml.safe_dump({"admins": {"idle": {"authentication": AUTH}}})
    )
    loaded = load_policy(directory)
    assert any("admins.idle: no permissions" in w for w in loaded.warnings)
    for permission in ("revocations:write", "policy:reload", "credentials:refresh"):
        assert not decide_admin(loaded.policy, "idle", permission).allowed  # type: ignore[arg-type]
    assert decide_admin(loaded.policy, "nobody", "policy:reload").reason is (
        AccessReason.NOT_AN_ADMIN
    )


def test_refresh_may_be_limited_to_named_credentials(tmp_path: Path) -> None:
    narrow = {"authentication": AUTH, "permissions": ["credentials:refresh"]}
    policy = _policy(
        tmp_path, {"admins": {"narrow": {**narrow, "credentials": ["openai-api-key"]}}}
    )
    assert decide_admin(policy, "narrow", "credentials:refresh", "openai-api-key").allowed
    other = decide_admin(policy, "narrow", "credentials:refresh", "anthropic-api-key")
    assert other.reason is AccessReason.ADMIN_CREDENTIAL_NOT_ALLOWED


@pytest.mark.parametrize(
    ("admin", "problem"),
    [
        (
            {"permissions": ["credentials:refresh"], "credentials": ["no-such-key"]},
            "unknown credential 'no-such-key'",
        ),
        (
            {"permissions": ["revocations:write"], "credentials": ["openai-api-key"]},
            "applies only with the permission credentials:refresh",
        ),
        ({"permissions": ["revocations:*"]}, "permissions.0"),
    ],
)
def test_admin_permission_mistakes_are_errors(tmp_path: Path, admin: dict, problem: str) -> None:
    from broker.policy import PolicyError

    with pytest.raises(PolicyError) as err:
        _policy(tmp_path, {"admins": {"a": {"authentication": AUTH, **admin}}})
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_fetch_decisions_name_the_refusal() -> None:
    policy = load_policy(POLICIES).policy

    def fetch(**overrides: object) -> AccessReason:
        request = {
            "gateway": "llm-gateway",
            "credential": "openai-api-key",
            "person": Person("dev", "alice", frozenset({"support"})),
            "actor_chain": ("triage-agent",),
            "scopes": frozenset({"llm:openai:chat"}),
            "audiences": ("llm-gateway",),
            **overrides,
        }
        return decide_fetch(policy, FetchRequest(**request)).reason  # type: ignore[arg-type]

    assert fetch() is AccessReason.GRANTED
    assert fetch(gateway="tickets-api") is AccessReason.NOT_A_GATEWAY
    assert fetch(audiences=("https://tickets.internal.example",)) is AccessReason.AUDIENCE_MISMATCH
    assert fetch(credential="no-such-key") is AccessReason.GATEWAY_NOT_ALLOWED
    assert fetch(scopes=frozenset({"tickets:read"})) is AccessReason.MISSING_PERMISSION
    assert fetch(previous=True) is AccessReason.GRANTED  # openai has a grace period
    # The token carries the permission, but the policy in force no longer grants it: carol
    # (finance) is not someone triage acts for, nor does an unknown chain hold anything.
    carol = Person("dev", "carol", frozenset({"finance"}))
    assert fetch(person=carol) is AccessReason.PERMISSION_WITHDRAWN
    assert fetch(actor_chain=("gone-agent",)) is AccessReason.PERMISSION_WITHDRAWN
    withdrawn = decide_fetch(
        policy,
        FetchRequest(
            "llm-gateway",
            "anthropic-api-key",
            Person("dev", "alice", frozenset({"support"})),
            ("triage-agent",),
            frozenset({"llm:anthropic:messages"}),
            ("llm-gateway",),
        ),
    )
    assert withdrawn.reason is AccessReason.PERMISSION_WITHDRAWN
    assert withdrawn.detail == "person_lacks_scope"
    assert (
        fetch(
            credential="anthropic-api-key",
            person=Person("dev", "bob", frozenset({"engineering"})),
            actor_chain=("coding-agent",),
            scopes=frozenset({"llm:anthropic:messages"}),
            previous=True,
        )
        is AccessReason.PREVIOUS_NOT_ALLOWED
    )


def test_introspection_decisions() -> None:
    policy = load_policy(POLICIES).policy
    tickets = ("https://tickets.internal.example",)
    assert decide_introspection(policy, "tickets-api", tickets).allowed
    assert decide_introspection(policy, "tickets-api", ("llm-gateway",)).reason is (
        AccessReason.AUDIENCE_MISMATCH
    )
    assert decide_introspection(policy, "llm-gateway", ("llm-gateway",)).allowed
    assert decide_introspection(policy, "triage-agent", tickets).reason is (
        AccessReason.NOT_AN_INTROSPECTOR
    )


# -- the configuration the policy is checked against ------------------------------------------


def test_a_credential_naming_an_unconfigured_backend_is_an_error_when_the_config_is_known(
    tmp_path: Path,
) -> None:
    from broker.policy import PolicyError
    from broker.policy.loader import configured_names
    from broker.settings import BrokerSettings

    # Not known (a bare `broker policy check`): not checked.
    assert load_policy(POLICIES).warnings == ()
    # Known, and lacking `vault`: an error naming the credential, not a warning.
    settings = BrokerSettings(
        secret_backends=[{"name": "aws", "kind": "aws_secrets_manager", "region": "us-east-1"}]
    )
    with pytest.raises(PolicyError) as err:
        load_policy(POLICIES, **configured_names(settings))
    assert any(
        "credentials.openai-api-key.backend: no secret backend 'vault' is configured "
        "(configured: aws)" in p
        for p in err.value.problems
    )
    # The broker refuses to start with it (the same check).
    from broker.policy.store import PolicyStore

    with pytest.raises(PolicyError):
        PolicyStore(POLICIES, **configured_names(settings))
    # Known and present: clean.
    vault = BrokerSettings(
        secret_backends=[
            {
                "name": "vault",
                "kind": "vault",
                "address": "http://127.0.0.1:1",
                "auth": {"method": "token", "token_ref": "env:UNUSED"},
            }
        ]
    )
    assert load_policy(POLICIES, **configured_names(vault)).warnings == ()

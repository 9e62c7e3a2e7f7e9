"""The shipped policies/ directory loads cleanly, its policy tests pass, its schemas are fresh."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from broker.cli.policy import schema_files
from broker.policy import load_policy, load_policy_tests, run_policy_tests
from broker.policy.model import (
    AdminTestCase,
    FetchTestCase,
    IdJagTestCase,
    IntrospectionTestCase,
    PolicyDocument,
    PolicyTestCase,
    PolicyTestFile,
)
from broker.policy.store import PolicyRejected, PolicyStore

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
POLICY_SCHEMA = POLICIES / "schema.json"
TESTS_SCHEMA = POLICIES / "tests" / "schema.json"


def test_example_policy_loads_without_errors_or_warnings() -> None:
    loaded = load_policy(POLICIES)
    assert loaded.warnings == ()
    policy = loaded.policy
    assert {"triage-agent", "summariser-agent", "coding-agent"} <= set(policy.agents)
    assert policy.version.startswith("sha256:")


def test_every_example_policy_test_passes() -> None:
    policy = load_policy(POLICIES).policy
    cases = load_policy_tests(POLICIES)
    assert len(cases) >= 10
    results = run_policy_tests(policy, cases)
    failures = [f"{r.file}: {r.case.name}: {r.detail}" for r in results if not r.passed]
    assert failures == []
    # Both kinds of expectation are exercised, for every kind of test.
    exchanges = [c for _, c in cases if isinstance(c, PolicyTestCase)]
    assert any(c.expect_granted is not None for c in exchanges)
    assert any(c.expect_error is not None for c in exchanges)
    id_jags = [c for _, c in cases if isinstance(c, IdJagTestCase)]
    assert any(c.expect_granted is not None for c in id_jags)
    assert any(c.expect_error is not None for c in id_jags)
    for kind in (FetchTestCase, IntrospectionTestCase, AdminTestCase):
        expectations = {c.expect for _, c in cases if isinstance(c, kind)}
        assert expectations == {"allowed", "denied"}, kind.__name__


@pytest.mark.parametrize(
    ("edit", "failing"),
    [
        # A gateway gains an audience: tokens for another service would unlock its keys.
        (
            (
                "credentials.yaml",
                "    audiences: [llm-gateway]\n",
                "    audiences: [llm-gateway, https://tickets.internal.example]\n",
            ),
            "a token for the tickets api unlocks nothing at the llm gateway",
        ),
        # A gateway may receive a credential it should not.
        (
            (
                "credentials.yaml",
                "    credentials: [openai-api-key, anthropic-api-key]\n",
                "    credentials: [openai-api-key]\n",
            ),
            "the coding agent gets the anthropic key for an engineer",
        ),
        # The rotation hook is given revocation rights.
        (
            (
                "credentials.yaml",
                "    permissions: [credentials:refresh]\n",
                "    permissions: [credentials:refresh, revocations:write]\n",
            ),
            "the rotation hook may not revoke",
        ),
        # A resource server becomes able to introspect tokens for the llm gateway.
        (
            (
                "resource_servers.yaml",
                "    audiences: [https://tickets.internal.example]\n",
                "    audiences: [https://tickets.internal.example, llm-gateway]\n",
            ),
            "the tickets api learns nothing about tokens for the llm gateway",
        ),
        # Another agent may obtain ID-JAGs for the tickets MCP server.
        (
            (
                "authorization_servers.yaml",
                "    agents: [triage-agent]\n",
                "    agents: [triage-agent, coding-agent]\n",
            ),
            "the coding agent is not one of the tickets MCP server's agents",
        ),
    ],
)
def test_widening_edits_fail_the_shipped_policy_tests(
    tmp_path: Path, edit: tuple[str, str, str], failing: str
) -> None:
    directory = tmp_path / "policies"
    shutil.copytree(POLICIES, directory)
    store = PolicyStore(directory)  # a broker serving the shipped policy
    file, old, new = edit
    text = (directory / file).read_text()
    assert text.count(old) == 1, (file, old)
    (directory / file).write_text(text.replace(old, new))
    results = run_policy_tests(load_policy(directory).policy, load_policy_tests(directory))
    assert failing in [r.case.name for r in results if not r.passed]
    # ...and so the broker refuses to reload it: the previous version keeps serving.
    with pytest.raises(PolicyRejected) as rejected:
        store.reload(trigger="test")
    assert any(failing in p for p in rejected.value.problems)


@pytest.mark.parametrize(
    ("path", "model"), [(POLICY_SCHEMA, PolicyDocument), (TESTS_SCHEMA, PolicyTestFile)]
)
def test_exported_schemas_are_up_to_date(path: Path, model: type) -> None:
    expected = schema_files(POLICY_SCHEMA)[path]
    assert path.read_text(encoding="utf-8") == expected, (
        f"{path.relative_to(ROOT)} is stale: run `broker policy schema`"
    )
    schema = json.loads(expected)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["title"] == model.__name__
    assert schema["additionalProperties"] is False


def test_policy_schema_describes_every_section() -> None:
    schema = json.loads(POLICY_SCHEMA.read_text(encoding="utf-8"))
    assert set(schema["properties"]) == set(PolicyDocument.model_fields)
    assert {"Agent", "Role", "GroupBinding", "ClientSecretBasicAuth"} <= set(schema["$defs"])

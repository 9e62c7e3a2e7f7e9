"""The shipped policies/ directory loads cleanly, its policy tests pass, its schemas are fresh."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from broker.cli.policy import schema_files
from broker.policy import load_policy, load_policy_tests, run_policy_tests
from broker.policy.model import PolicyDocument, PolicyTestFile

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
    # Both kinds of expectation are exercised.
    assert any(c.expect_granted is not None for _, c in cases)
    assert any(c.expect_error is not None for _, c in cases)


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

"""`broker policy check | test | explain | schema | hash-secret`, through the real typer app
(and once as the installed console script)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from broker.cli import app
from broker.cli.policy import schema_files
from broker.client_secrets import verify_client_secret
from broker.policy import load_policy
from broker.policy.loader import configured_names
from broker.policy.model import ClientSecretBasicAuth
from broker.policy.store import PolicyStore
from broker.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
BROKER = Path(sys.executable).with_name("broker")

runner = CliRunner()


def run(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = runner.invoke(app, ["policy", *args], input=input)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def policy_copy(tmp_path: Path) -> Path:
    """A writable copy of the shipped policy directory (with its tests)."""
    return Path(shutil.copytree(POLICIES, tmp_path / "policies"))


# -- check -------------------------------------------------------------------------------------


def test_check_ok() -> None:
    code, out, err = run("check", "--dir", str(POLICIES))
    assert code == 0, err
    assert out.strip() == f"OK {load_policy(POLICIES).policy.version}"
    assert err.startswith("note: no configuration given")  # and nothing else
    assert "warning" not in err


def _config(tmp_path: Path, policy_dir: Path, backends: list[dict]) -> Path:
    config = tmp_path / "broker.yaml"
    config.write_text(yaml.safe_dump({"policy_dir": str(policy_dir), "secret_backends": backends}))
    return config


AWS = {"name": "aws", "kind": "aws_secrets_manager", "region": "us-east-1"}
VAULT = {"name": "vault", "kind": "file", "path": "/nonexistent.yaml"}


def test_check_knows_the_configuration(
    policy_copy: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A configuration without the backend the example credentials name: an error, not a note.
    config = _config(tmp_path, policy_copy, [AWS])
    for args in (["--config", str(config)], []):  # the option, or BROKER_CONFIG_FILE
        if not args:
            monkeypatch.setenv("BROKER_CONFIG_FILE", str(config))
        code, out, err = run("check", *args)
        assert code == 1, (args, out, err)
        assert "no secret backend 'vault' is configured (configured: aws)" in err
        assert "openai-api-key" in err and "Traceback" not in err
    monkeypatch.delenv("BROKER_CONFIG_FILE")

    # With it: the policy_dir comes from the configuration, and the warnings are exactly the
    # ones the broker logs when it loads the policy (an agent naming an unknown workload issuer).
    agents = policy_copy / "agents.yaml"
    agents.write_text(
        agents.read_text().replace(
            "    # workload_identities:\n    #   - {issuer: workloads,",
            "    workload_identities:\n      - {issuer: workloads,",
        )
    )
    config = _config(tmp_path, policy_copy, [VAULT])
    code, out, err = run("check", "--config", str(config))
    assert code == 0, err
    warnings = [line.removeprefix("warning: ") for line in err.splitlines()]
    settings = load_settings(config)
    store = PolicyStore(settings.policy_dir, **configured_names(settings))  # as build_services
    assert warnings == list(store.warnings)
    assert any("unknown workload issuer 'workloads'" in w for w in warnings)
    code, _, err = run("check", "--strict", "--config", str(config))
    assert code == 1 and "(--strict)" in err
    # Without the configuration, the same directory shows no such warning (and says so).
    code, _, err = run("check", "--strict", "--dir", str(policy_copy))
    assert code == 0 and "no configuration given" in err


def test_check_refuses_an_unreadable_configuration(tmp_path: Path) -> None:
    code, _, err = run("check", "--config", str(tmp_path / "missing.yaml"))
    assert code == 1 and "does not exist" in err and "Traceback" not in err


def test_check_broken_directory(policy_copy: Path) -> None:
    (policy_copy / "roles.yaml").write_text(
        "roles:\n  support: {permissions: ['*']}\n  support: {permissions: [a:b]}\n"
    )
    (policy_copy / "extra.yaml").write_text("agents:\n  Bad Name: {}\n")
    code, out, err = run("check", "--dir", str(policy_copy))
    assert code == 1
    assert out == ""
    assert err.startswith(f"error: invalid policy in {policy_copy} (")
    assert "roles.yaml: cannot parse" in err and "duplicate key 'support'" in err
    assert "extra.yaml: agents.Bad Name" in err
    assert "Traceback" not in err


def test_check_missing_directory(tmp_path: Path) -> None:
    code, out, err = run("check", "--dir", str(tmp_path / "nope"))
    assert code == 1
    assert out == ""
    assert "policy directory does not exist" in err
    assert "Traceback" not in err


def test_check_strict_fails_on_warnings(policy_copy: Path) -> None:
    (policy_copy / "zz-extra.yaml").write_text(
        textwrap.dedent(
            """
            agents:
              payroll-agent:
                authentication: {method: client_secret_basic, secret_ref: "env:PAYROLL"}
                ceiling: [payroll:read]
                audiences: [payroll]
                act_for: ["group:dev/finance"]
            """
        )
    )
    code, out, err = run("check", "--dir", str(policy_copy))
    assert code == 0
    assert out.startswith("OK sha256:")
    assert (
        "warning: zz-extra.yaml: agents.payroll-agent.ceiling: 'payroll:read' is granted by no "
        "role" in err.splitlines()
    )
    code, out, err = run("check", "--strict", "--dir", str(policy_copy))
    assert code == 1
    assert "OK" not in out
    assert "payroll:read" in err and "error: 1 warning (--strict)" in err


def test_check_as_installed_console_script(tmp_path: Path) -> None:
    assert BROKER.exists(), (
        "the project is not installed: run `pip install -e '.[server]'` (make install)"
    )
    done = subprocess.run(
        [str(BROKER), "policy", "check"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"OK sha256:[0-9a-f]{32}\n", done.stdout)
    done = subprocess.run(
        [str(BROKER), "policy", "check", "--dir", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "policy directory does not exist" in done.stderr
    assert "Traceback" not in done.stderr


# -- test --------------------------------------------------------------------------------------


def test_test_passes_on_the_shipped_policy() -> None:
    code, out, err = run("test", "--dir", str(POLICIES))
    assert code == 0, out + err
    lines = out.strip().splitlines()
    assert lines[-1] == f"{len(lines) - 1} passed, 0 failed"
    assert all(line.startswith("PASS  ") for line in lines[:-1])
    files = {line.split()[1] for line in lines[:-1]}
    assert {"example.yaml", "keycloak.yaml"} <= files  # every file in policies/tests/ runs
    assert any("triage delegates to the summariser, which narrows" in line for line in lines)


def test_test_reports_a_failing_test(policy_copy: Path) -> None:
    (policy_copy / "tests" / "zz-failing.yaml").write_text(
        textwrap.dedent(
            """
            tests:
              - name: support person wrongly expected to close tickets
                person: dev/alice
                groups: [support]
                agents: [triage-agent]
                scope: [tickets:close]
                expect_granted: [tickets:close]
              - name: this one passes
                person: dev/alice
                groups: [support]
                agents: [triage-agent]
                scope: [kb:read]
                expect_granted: [kb:read]
            """
        )
    )
    code, out, _ = run("test", "--dir", str(policy_copy))
    assert code == 1
    fail = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fail) == 1
    assert fail[0].startswith(
        "FAIL  zz-failing.yaml  support person wrongly expected to close tickets  (expected grant"
    )
    assert "invalid_scope" in fail[0]
    assert "PASS  zz-failing.yaml  this one passes" in out
    passed = len([line for line in out.splitlines() if line.startswith("PASS")])
    assert out.strip().splitlines()[-1] == f"{passed} passed, 1 failed"


def test_test_without_tests_fails(policy_copy: Path) -> None:
    shutil.rmtree(policy_copy / "tests")
    code, out, err = run("test", "--dir", str(policy_copy))
    assert code == 1
    assert out == ""
    assert "no policy tests found" in err


def test_test_with_an_invalid_test_file(policy_copy: Path) -> None:
    (policy_copy / "tests" / "bad.yaml").write_text("tests:\n  - {name: x, person: nobody}\n")
    code, _, err = run("test", "--dir", str(policy_copy))
    assert code == 1
    assert "tests/bad.yaml: tests.0" in err
    assert "Traceback" not in err


def test_test_with_an_invalid_policy(policy_copy: Path) -> None:
    (policy_copy / "limits.yaml").write_text("limits: {max_delegation_depth: 0}\n")
    code, _, err = run("test", "--dir", str(policy_copy))
    assert code == 1
    assert "limits.yaml: limits.max_delegation_depth" in err


# -- explain -----------------------------------------------------------------------------------


def explain(*args: str) -> tuple[int, str, str]:
    return run("explain", "--dir", str(POLICIES), *args)


def test_explain_granted() -> None:
    code, out, err = explain(
        "--person",
        "dev/alice",
        "--group",
        "support",
        "--agent",
        "triage-agent",
        "--scope",
        "tickets:read kb:read",
        "--audience",
        "llm-gateway",
    )
    assert code == 0, out + err
    assert "decision:       GRANTED" in out
    assert "granted:        tickets:read kb:read" in out
    assert "audience:       llm-gateway" in out
    assert "max lifetime:   900s" in out


def test_explain_defaults_when_no_scope_is_given() -> None:
    code, out, _ = explain("--person", "dev/alice", "--groups", "support", "-a", "triage-agent")
    assert code == 0
    assert "+ tickets:read: allowed" in out and "+ kb:read: allowed" in out


def test_explain_person_lacks_scope() -> None:
    code, out, _ = explain(
        "--person",
        "dev/alice",
        "--groups",
        "support,other",
        "--agent",
        "triage-agent",
        "--scope",
        "tickets:write",
    )
    assert code == 2
    assert "DENIED (invalid_scope)" in out
    assert "reason:         person_lacks_scope" in out
    assert "groups: other, support" in out


def test_explain_shows_idp_roles_apart_and_what_the_token_carries() -> None:
    """A realm role named like a group is not that group; group paths are normalised; the
    explanation shows the groups a token would carry (not every group given)."""
    code, out, _ = explain(
        "--person",
        "keycloak/alice",
        "--group",
        "/support,unrelated",
        "--idp-role",
        "support-leads",
        "--agent",
        "triage-agent",
        "--scope",
        "tickets:write",
    )
    assert code == 2
    assert "groups: support, unrelated" in out
    assert "IdP roles:      support-leads" in out
    assert "token carries:  groups: support; IdP roles: -" in out
    assert "reason:         person_lacks_scope" in out


def test_explain_ceiling_excludes_scope() -> None:
    code, out, _ = explain(
        "--person",
        "dev/dave",
        "--group",
        "support-leads",
        "--agent",
        "triage-agent",
        "--agent",
        "summariser-agent",
        "--scope",
        "tickets:write",
    )
    assert code == 2
    assert "agent chain:    summariser-agent <- triage-agent" in out
    assert "- tickets:write: denied: ceiling_excludes_scope" in out


def test_explain_shows_what_needs_approval_and_who_may_approve() -> None:
    request = ("-p", "dev/dave", "-g", "support-leads", "-a", "triage-agent")
    code, out, _ = explain(
        *request, "-s", "tickets:close tickets:refund", "--approver", "dev/carol",
        "--approver-group", "finance",
    )  # fmt: skip
    assert code == 2
    assert "reason:         approval_required: scope needs approval: 'tickets:close' " in out
    assert "- tickets:refund: denied: approval_required" in out
    assert "  rule close-tickets-consent: tickets:close\n" in out
    assert "    approvers:  the person (consent); quorum 1\n" in out
    assert "approved token lives at most 600s" in out
    assert "  rule refunds-need-finance: tickets:refund\n" in out
    assert "approvers:  group:dev,keycloak,keycloak-saml/finance; quorum 1; not the person" in out
    assert "approver dev/carol: rule close-tickets-consent: may not approve (not_eligible)" in out
    assert "approver dev/carol: rule refunds-need-finance: may approve" in out
    # With the approval: granted, for no longer than the rule allows, nothing left to approve.
    code, out, _ = explain(*request, "-s", "tickets:close", "--approved", "tickets:close")
    assert code == 0
    assert "granted:        tickets:close" in out and "max lifetime:   600s" in out
    assert "needs approval" not in out


def test_explain_agent_may_not_act_for_person() -> None:
    code, out, _ = explain(
        "--person",
        "dev/carol",
        "--group",
        "finance",
        "--agent",
        "triage-agent",
        "--scope",
        "llm:openai:chat",
    )
    assert code == 2
    assert "DENIED (unauthorized_client)" in out
    assert "reason:         agent_may_not_act_for_person" in out


def test_explain_delegation_chain() -> None:
    code, out, _ = explain(
        "--person",
        "dev/alice",
        "--group",
        "support",
        "--agent",
        "triage-agent",
        "--agent",
        "summariser-agent",
        "--scope",
        "tickets:read",
    )
    assert code == 0
    assert "agent chain:    summariser-agent <- triage-agent" in out
    assert "max lifetime:   300s" in out
    # The sub-agent alone is refused: it only accepts delegated tokens.
    code, out, _ = explain(
        "--person",
        "dev/alice",
        "--group",
        "support",
        "--agent",
        "summariser-agent",
    )
    assert code == 2
    assert "agent_accepts_only_delegated_tokens" in out


def test_explain_names_the_denied_earlier_hop() -> None:
    code, out, _ = explain(
        "--person",
        "dev/carol",
        "--group",
        "finance",
        "--agent",
        "triage-agent",
        "--agent",
        "summariser-agent",
    )
    assert code == 2
    assert out.startswith("denied at hop 1 of 2 (agent 'triage-agent')")
    assert "agent chain:    triage-agent\n" in out
    assert "agent_may_not_act_for_person" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agent", "triage-agent"], "--person IDP/SUBJECT is required"),
        (["--person", "alice", "--agent", "triage-agent"], "--person must be IDP/SUBJECT"),
        (["--person", "dev/", "--agent", "triage-agent"], "--person must be IDP/SUBJECT"),
        (["--person", "dev/alice"], "at least one --agent is required"),
    ],
)
def test_explain_bad_arguments_exit_1(args: list[str], message: str) -> None:
    code, out, err = explain(*args)
    assert code == 1
    assert out == ""
    assert message in err


def test_explain_with_an_invalid_policy(tmp_path: Path) -> None:
    code, _, err = run(
        "explain", "--dir", str(tmp_path), "--person", "dev/a", "--agent", "triage-agent"
    )
    assert code == 1
    assert "no policy files" in err


ALICE_TOKEN = ["--person", "dev/alice", "--group", "support", "--agent", "triage-agent"]


def test_explain_a_credential_fetch() -> None:
    fetch = ["--gateway", "llm-gateway", "--credential", "openai-api-key", *ALICE_TOKEN]
    code, out, err = explain(*fetch, "--scope", "llm:openai:chat", "--audience", "llm-gateway")
    assert code == 0, err
    assert "decision:       ALLOWED" in out and "requires llm:openai:chat" in out
    code, out, _ = explain(
        *fetch, "--scope", "llm:openai:chat", "--audience", "https://tickets.internal.example"
    )
    assert code == 2
    assert "DENIED (invalid_token)" in out and "audience_mismatch" in out
    code, out, _ = explain(
        "--gateway", "llm-gateway", "--credential", "anthropic-api-key", *ALICE_TOKEN,
        "--scope", "llm:anthropic:messages", "--audience", "llm-gateway",
    )  # fmt: skip
    assert code == 2
    assert "permission_withdrawn (person_lacks_scope)" in out
    code, _, err = explain(*fetch, "--scope", "llm:openai:chat")
    assert code == 1 and "--audience" in err


def test_explain_introspection_and_admin_calls() -> None:
    code, out, _ = explain("--introspect", "tickets-api", "--audience", "llm-gateway")
    assert code == 2 and "audience_mismatch" in out
    code, out, _ = explain(
        "--introspect", "tickets-api", "--audience", "https://tickets.internal.example"
    )
    assert code == 0 and "ALLOWED" in out
    code, out, _ = explain("--admin", "rotation-hook", "--permission", "credentials:refresh")
    assert code == 0 and "holds: credentials:refresh" in out
    code, out, _ = explain("--admin", "rotation-hook", "--permission", "policy:reload")
    assert code == 2 and "admin_permission_missing" in out
    code, _, err = explain("--admin", "rotation-hook", "--permission", "everything")
    assert code == 1 and "--permission must be one of" in err


def test_test_reports_a_failing_fetch_test(policy_copy: Path) -> None:
    # An edit lets the llm gateway accept tokens meant for the tickets API.
    credentials = policy_copy / "credentials.yaml"
    credentials.write_text(
        credentials.read_text().replace(
            "    audiences: [llm-gateway]\n",
            "    audiences: [llm-gateway, https://tickets.internal.example]\n",
        )
    )
    code, out, _ = run("test", "--dir", str(policy_copy))
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1
    assert "a token for the tickets api unlocks nothing at the llm gateway" in failed[0]
    assert "expected denied, but allowed" in failed[0]


# -- schema ------------------------------------------------------------------------------------


def test_schema_writes_both_files(tmp_path: Path) -> None:
    output = tmp_path / "out" / "schema.json"
    code, out, err = run("schema", "--output", str(output))
    assert code == 0, err
    tests_schema = tmp_path / "out" / "tests" / "schema.json"
    assert out.splitlines() == [f"wrote {output}", f"wrote {tests_schema}"]
    expected = schema_files(output)
    assert output.read_text() == expected[output]
    assert tests_schema.read_text() == expected[tests_schema]
    assert output.read_text() == (POLICIES / "schema.json").read_text()
    other = tmp_path / "elsewhere.json"
    code, _, _ = run("schema", "-o", str(output), "--tests-output", str(other))
    assert code == 0
    assert other.read_text() == (POLICIES / "tests" / "schema.json").read_text()


def test_schema_unwritable_output(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run("schema", "--output", str(blocker / "schema.json"))
    assert code == 1
    assert err.startswith("error: cannot write")


# -- hash-secret -------------------------------------------------------------------------------


def _hash_line(out: str) -> str:
    [line] = [line for line in out.splitlines() if line.startswith("secret_hash: ")]
    return line


def test_hash_secret_generates_a_secret_and_its_hash(tmp_path: Path) -> None:
    code, out, _ = run("hash-secret")
    assert code == 0
    lines = out.splitlines()
    secret = lines[lines.index(next(x for x in lines if x.startswith("client secret"))) + 1]
    assert len(secret) >= 43
    line = _hash_line(out)
    stored = yaml.safe_load(line)["secret_hash"]
    assert stored.startswith("scrypt$16384$8$1$")
    assert verify_client_secret(secret, stored)
    assert not verify_client_secret(secret + "x", stored)
    # The printed line pastes straight into a policy file.
    policy_dir = Path(shutil.copytree(POLICIES, tmp_path / "p"))
    (policy_dir / "zz-extra.yaml").write_text(
        "agents:\n  new-agent:\n    authentication:\n      method: client_secret_basic\n"
        f"      {line}\n    ceiling: [kb:read]\n    audiences: [kb]\n"
        "    act_for: ['group:dev/support']\n"
    )
    auth = load_policy(policy_dir).policy.agents["new-agent"].spec.authentication
    assert isinstance(auth, ClientSecretBasicAuth)
    assert auth.secret_hash == stored


def test_hash_secret_sha256_and_fresh_secrets() -> None:
    first = run("hash-secret", "--method", "sha256")
    second = run("hash-secret", "--method", "sha256")
    assert first[0] == second[0] == 0
    assert first[1] != second[1]
    assert yaml.safe_load(_hash_line(first[1]))["secret_hash"].startswith("sha256$")


def test_hash_secret_from_stdin() -> None:
    code, out, _ = run("hash-secret", "--secret-stdin", input="my chosen secret\n")
    assert code == 0
    assert "my chosen secret" not in out
    assert out.splitlines() == [_hash_line(out)]
    assert verify_client_secret("my chosen secret", yaml.safe_load(out)["secret_hash"])


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (["--secret-stdin", "--method", "sha256"], "too short\n", "at least 32 characters"),
        (["--secret-stdin"], "", "no secret on stdin"),
        (["--method", "md5"], None, "--method must be scrypt or sha256"),
    ],
)
def test_hash_secret_refusals(args: list[str], stdin: str | None, message: str) -> None:
    code, out, err = run("hash-secret", *args, input=stdin)
    assert code == 1
    assert out == ""
    assert message in err


def test_explain_an_id_jag_request() -> None:
    resource = "https://tickets-mcp.internal.example/mcp"
    base = ("explain", "--person", "dev/alice", "--group", "support", "--agent", "triage-agent")
    code, out, _ = run(
        *base,
        "--id-jag",
        "tickets-mcp",
        "--resource",
        resource,
        "--scope",
        "tickets:read tickets:comment",
    )
    assert code == 0, out
    assert "granted tickets:read tickets:comment" in out and "client_id there: triage-agent" in out
    code, out, _ = run(
        *base, "--id-jag", "tickets-mcp", "--resource", resource, "--scope", "tickets:write"
    )
    assert code == 2 and "invalid_scope: person_lacks_scope" in out
    code, out, _ = run(*base, "--id-jag", "tickets-mcp", "--resource", "https://other.example/mcp")
    assert code == 2 and "unknown_resource" in out
    code, out, _ = run(
        "explain",
        "--person",
        "dev/bob",
        "--group",
        "engineering",
        "--agent",
        "coding-agent",
        "--id-jag",
        "tickets-mcp",
        "--resource",
        resource,
    )
    assert code == 2 and "unauthorized_client: id_jag_not_allowed" in out
    code, out, err = run(*base, "--id-jag", "tickets-mcp")
    assert code != 0 and "--resource" in out + err

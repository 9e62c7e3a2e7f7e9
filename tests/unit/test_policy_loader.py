"""`load_policy`: parsing, validation, merging, cross-checks, versioning and lint warnings."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from broker.policy import PolicyError, load_policy, load_policy_tests
from broker.policy.loader import LoadedPolicy

AUTH = "authentication: {method: client_secret_basic, secret_ref: 'env:X'}"

ROLES = """
roles:
  reader: {permissions: [docs:read]}
  llm: {permissions: ["llm:*"]}
"""

AGENTS = f"""
agents:
  main:
    {AUTH}
    ceiling: [docs:read, "llm:openai:*"]
    audiences: [api]
    act_for: ["group:corp/readers"]
    may_delegate_to: [sub]
  sub:
    {AUTH}
    ceiling: [docs:read]
    audiences: [api]
    act_for: ["role:reader"]
    accepts_person_tokens: false
"""

BINDINGS = """
group_bindings:
  - {idp: corp, group: readers, roles: [reader, llm]}
"""


def write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return directory


def good_files(**overrides: str) -> dict[str, str]:
    files = {"roles.yaml": ROLES, "agents.yaml": AGENTS, "bindings.yaml": BINDINGS}
    files.update(overrides)
    return files


def load(tmp_path: Path, files: dict[str, str]) -> LoadedPolicy:
    return load_policy(write(tmp_path / "policy", files))


def problems(tmp_path: Path, files: dict[str, str]) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load(tmp_path, files)
    assert info.value.problems, "a PolicyError must list its problems"
    assert all(p in str(info.value) for p in info.value.problems)
    return info.value.problems


def agent_yaml(name: str, body: str) -> str:
    return f"agents:\n  {name}:\n" + textwrap.indent(textwrap.dedent(body).strip(), "    ") + "\n"


def test_good_policy_loads(tmp_path: Path) -> None:
    loaded = load(tmp_path, good_files())
    policy = loaded.policy
    assert set(policy.agents) == {"main", "sub"}
    assert set(policy.roles) == {"reader", "llm"}
    assert policy.group_roles[("corp", "readers")] == frozenset({"reader", "llm"})
    assert policy.files == ("agents.yaml", "bindings.yaml", "roles.yaml")
    assert policy.version.startswith("sha256:")
    assert policy.max_delegation_depth == 4  # default limits
    assert policy.max_token_lifetime_seconds == 3600


def test_duplicate_key_in_one_file(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        good_files(
            **{
                "roles.yaml": """
                roles:
                  reader: {permissions: [docs:read]}
                  reader: {permissions: [docs:write]}
                  llm: {permissions: ["llm:*"]}
                """
            }
        ),
    )
    assert len(found) == 1
    assert found[0].startswith("roles.yaml: cannot parse")
    assert "duplicate key 'reader'" in found[0]


def test_duplicate_nested_key_in_one_file(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        {"a.yaml": "roles:\n  r:\n    permissions: [a:b]\n    permissions: [c:d]\n"},
    )
    assert "duplicate key 'permissions'" in found[0]


def test_unhashable_key_is_a_policy_error(tmp_path: Path) -> None:
    found = problems(tmp_path, {"a.yaml": "? [a, b]\n: 1\n"})
    assert found[0].startswith("a.yaml: cannot parse")


def test_invalid_yaml_and_non_mapping_documents(tmp_path: Path) -> None:
    found = problems(tmp_path, {"a.yaml": "roles: [unclosed\n", "b.yaml": "- just\n- a list\n"})
    assert any(p.startswith("a.yaml: cannot parse") for p in found)
    assert any(p.startswith("b.yaml:") for p in found)


def test_role_defined_in_two_files(tmp_path: Path) -> None:
    found = problems(
        tmp_path, good_files(**{"more.yaml": "roles:\n  reader: {permissions: [x:y]}\n"})
    )
    assert found == ["roles.yaml: roles.reader: already defined in more.yaml"]


def test_agent_and_limits_defined_twice(tmp_path: Path) -> None:
    extra = agent_yaml("main", f"{AUTH}\nceiling: [docs:read]\naudiences: [api]")
    found = problems(
        tmp_path,
        good_files(
            **{
                "extra.yaml": extra + "limits: {max_delegation_depth: 2}\n",
                "limits.yaml": "limits: {max_delegation_depth: 3}\n",
            }
        ),
    )
    assert "extra.yaml: agents.main: already defined in agents.yaml" in found
    assert "limits.yaml: limits: already defined in extra.yaml" in found


def test_agent_that_is_also_a_resource_server(tmp_path: Path) -> None:
    rs = f"resource_servers:\n  main:\n    {AUTH}\n    audiences: [api]\n"
    found = problems(tmp_path, good_files(**{"rs.yaml": rs}))
    assert any(
        "resource_servers.main" in p and "already declared in agents" in p for p in found
    )


def test_unknown_roles_in_bindings_and_act_for(tmp_path: Path) -> None:
    bindings = """
    group_bindings:
      - {idp: corp, group: readers, roles: [reader, ghost-role]}
    person_bindings:
      - {idp: corp, subject: bob, roles: [phantom]}
    """
    agents = AGENTS.replace('"role:reader"', '"role:nobody"')
    found = problems(tmp_path, good_files(**{"bindings.yaml": bindings, "agents.yaml": agents}))
    assert "bindings.yaml: group_bindings[0]: unknown role 'ghost-role'" in found
    assert "bindings.yaml: person_bindings[0]: unknown role 'phantom'" in found
    assert "agents.yaml: agents.sub.act_for: unknown role 'nobody'" in found


def test_unknown_agent_in_may_delegate_to(tmp_path: Path) -> None:
    found = problems(
        tmp_path, good_files(**{"agents.yaml": AGENTS.replace("[sub]", "[sub, nobody]")})
    )
    assert found == ["agents.yaml: agents.main.may_delegate_to: unknown agent 'nobody'"]


def test_agent_may_not_delegate_to_itself(tmp_path: Path) -> None:
    found = problems(tmp_path, good_files(**{"agents.yaml": AGENTS.replace("[sub]", "[main]")}))
    assert any("cannot delegate to itself" in p for p in found)


@pytest.mark.parametrize(
    "permission", ["Docs:Read", "docs::read", "llm:*:chat", "docs read", ":docs", "docs:", "-a"]
)
def test_invalid_permission_in_role(tmp_path: Path, permission: str) -> None:
    roles = f'roles:\n  reader: {{permissions: ["{permission}"]}}\n'
    found = problems(tmp_path, good_files(**{"roles.yaml": roles}))
    assert any(p.startswith("roles.yaml: roles.reader.permissions.0:") for p in found)
    assert any("not a permission pattern" in p for p in found)


@pytest.mark.parametrize("field", ["ceiling", "default_scopes"])
def test_invalid_permission_in_agent(tmp_path: Path, field: str) -> None:
    body = f'{AUTH}\naudiences: [api]\nceiling: [docs:read]\n{field}: ["Docs:READ"]'
    body = body.replace("ceiling: [docs:read]\nceiling", "ceiling")
    found = problems(tmp_path, {"a.yaml": agent_yaml("x", body)})
    assert any(f"agents.x.{field}.0" in p for p in found)


def test_wildcard_is_not_a_default_scope(tmp_path: Path) -> None:
    body = f'{AUTH}\naudiences: [api]\nceiling: ["llm:*"]\ndefault_scopes: ["llm:*"]'
    found = problems(tmp_path, {"a.yaml": agent_yaml("x", body)})
    assert any("agents.x.default_scopes.0" in p and "no wildcard" in p for p in found)


@pytest.mark.parametrize("where", ["role", "ceiling"])
def test_bare_star_is_refused(tmp_path: Path, where: str) -> None:
    if where == "role":
        files = good_files(**{"roles.yaml": 'roles:\n  reader: {permissions: ["*"]}\n'})
    else:
        files = good_files(**{"agents.yaml": AGENTS.replace('"llm:openai:*"', '"*"')})
    found = problems(tmp_path, files)
    assert any("'*' is not a permission pattern" in p for p in found)


def test_inline_private_jwk_is_rejected(tmp_path: Path) -> None:
    private = agent_yaml(
        "x",
        """
        authentication:
          method: private_key_jwt
          jwks: {keys: [{kty: EC, crv: P-256, x: AAAA, y: BBBB, d: SECRET}]}
        ceiling: [docs:read]
        audiences: [api]
        """,
    )
    found = problems(tmp_path, {"a.yaml": private})
    assert any("public keys only" in p for p in found)
    rsa_private = private.replace(
        "kty: EC, crv: P-256, x: AAAA, y: BBBB, d: SECRET",
        "kty: RSA, n: AAAA, e: AQAB, p: SECRET, q: SECRET",
    )
    assert any("public keys only" in p for p in problems(tmp_path, {"a.yaml": rsa_private}))
    public = private.replace(", d: SECRET", "")
    assert "x" in load(tmp_path, {"a.yaml": public}).policy.agents


def test_private_key_jwt_rejects_symmetric_algorithms_and_plain_http_jwks_uri(
    tmp_path: Path,
) -> None:
    body = """
    authentication:
      method: private_key_jwt
      jwks_uri: http://keys.example.com/jwks
    ceiling: [docs:read]
    """
    assert any("https" in p for p in problems(tmp_path, {"a.yaml": agent_yaml("x", body)}))
    body = """
    authentication:
      method: private_key_jwt
      jwks_uri: https://keys.example.com/jwks
      algorithms: [HS256]
    ceiling: [docs:read]
    """
    assert any("not allowed" in p for p in problems(tmp_path, {"a.yaml": agent_yaml("x", body)}))


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (
            "{method: client_secret_basic, secret_hash: 'scrypt$1$2$3$a$b', secret_ref: 'env:X'}",
            "exactly one of secret_hash or secret_ref",
        ),
        ("{method: client_secret_basic}", "exactly one of secret_hash or secret_ref"),
        ("{method: client_secret_basic, secret_hash: 'plaintext'}", "must start with"),
        ("{method: client_secret_basic, secret_ref: 'the-secret'}", "env:NAME"),
        (
            "{method: client_secret_basic, client_secret: hunter2, secret_ref: 'env:X'}",
            "Extra inputs",
        ),
    ],
)
def test_client_secret_configuration(tmp_path: Path, auth: str, message: str) -> None:
    body = f"authentication: {auth}\nceiling: [docs:read]\naudiences: [api]"
    found = problems(tmp_path, {"a.yaml": agent_yaml("x", body)})
    assert any(message in p for p in found), found


def test_agent_needs_some_authentication(tmp_path: Path) -> None:
    found = problems(tmp_path, {"a.yaml": agent_yaml("x", "ceiling: [docs:read]")})
    assert any("needs authentication or workload_identities" in p for p in found)


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        {
            "a.yaml": 'roles:\n  r: {permissions: ["*"]}\n',
            "b.yaml": "agents:\n  X: {}\n",
            "c.yaml": "unknown_section: 1\n",
        },
    )
    files = {p.split(":", 1)[0] for p in found}
    assert files == {"a.yaml", "b.yaml", "c.yaml"}


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="does not exist"):
        load_policy(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not policy")
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy(tmp_path / "empty")


def test_only_top_level_yaml_files_are_policy(tmp_path: Path) -> None:
    directory = write(tmp_path / "policy", good_files())
    before = load_policy(directory).policy.version
    write(
        directory,
        {"tests/t.yaml": "tests: not even valid\n", "schema.json": "{}", "README.md": "# notes"},
    )
    assert load_policy(directory).policy.version == before
    write(directory, {"extra.yml": "roles:\n  other: {permissions: [x:y]}\n"})
    loaded = load_policy(directory)
    assert "other" in loaded.policy.roles
    assert loaded.policy.version != before


def test_version_depends_on_content_not_mtime(tmp_path: Path) -> None:
    directory = write(tmp_path / "policy", good_files())
    first = load_policy(directory).policy.version
    for path in directory.iterdir():
        os.utime(path, (1_000_000_000, 1_000_000_000))
    assert load_policy(directory).policy.version == first
    # Same content in a fresh directory: same version.
    assert load(tmp_path / "copy", good_files()).policy.version == first
    # A comment is a content change.
    (directory / "roles.yaml").write_text(textwrap.dedent(ROLES) + "# a comment\n")
    second = load_policy(directory).policy.version
    assert second != first
    (directory / "roles.yaml").write_text(textwrap.dedent(ROLES))
    assert load_policy(directory).policy.version == first
    # The file name is part of the content.
    (directory / "roles.yaml").rename(directory / "roles2.yaml")
    assert load_policy(directory).policy.version not in (first, second)


def test_warnings_for_empty_ceiling_and_permissions_granted_nowhere(tmp_path: Path) -> None:
    agents = AGENTS + textwrap.indent(
        textwrap.dedent(
            f"""
            empty:
              {AUTH}
              audiences: [api]
              act_for: ["group:corp/readers"]
            dreamer:
              {AUTH}
              ceiling: [docs:read, "payroll:*", secrets:read]
              default_scopes: [docs:write]
              act_for: ["group:corp/readers"]
            """
        ),
        "  ",
    )
    roles = ROLES + "  hr: {permissions: [hr:read]}\n"
    loaded = load(tmp_path, good_files(**{"agents.yaml": agents, "roles.yaml": roles}))
    warnings = loaded.warnings
    assert "agents.yaml: agents.empty: empty ceiling; this agent can never be granted anything" in (
        warnings
    )
    assert "agents.yaml: agents.dreamer.ceiling: 'payroll:*' is granted by no role" in warnings
    assert "agents.yaml: agents.dreamer.ceiling: 'secrets:read' is granted by no role" in warnings
    assert not any("'docs:read' is granted by no role" in w for w in warnings)
    assert "agents.yaml: agents.dreamer.default_scopes: 'docs:write' is outside the ceiling" in (
        warnings
    )
    assert (
        "agents.yaml: agents.dreamer: no audiences; every exchange will fail with "
        "invalid_target" in warnings
    )
    assert "roles.hr: no agent's ceiling admits any of its permissions" in warnings
    assert not any(w.startswith("roles.reader") or w.startswith("roles.llm") for w in warnings)


def test_good_policy_has_no_warnings(tmp_path: Path) -> None:
    assert load(tmp_path, good_files()).warnings == ()


def test_load_policy_tests(tmp_path: Path) -> None:
    directory = write(tmp_path / "policy", good_files())
    assert load_policy_tests(directory) == []
    write(
        directory,
        {
            "tests/a.yaml": """
            tests:
              - {name: one, person: corp/alice, agents: [main], expect_granted: [docs:read]}
            """
        },
    )
    cases = load_policy_tests(directory)
    assert [(file, case.name) for file, case in cases] == [("a.yaml", "one")]
    write(directory, {"tests/b.yaml": "tests:\n  - {name: two, person: corp/a, agents: [main]}\n"})
    with pytest.raises(PolicyError) as info:
        load_policy_tests(directory)
    assert any(
        p.startswith("tests/b.yaml:") and "exactly one of expect_granted or expect_error" in p
        for p in info.value.problems
    )


def test_cost_centres_come_from_the_agent_else_the_persons_first_group(tmp_path: Path) -> None:
    bindings = """
    group_bindings:
      - {idp: corp, group: readers, roles: [reader, llm], cost_centre: reading-room}
      - {idp: corp, group: writers, roles: [reader], cost_centre: newsroom}
      - {idp: corp, group: guests, roles: [reader]}
    """
    policy = load(tmp_path, good_files(**{"bindings.yaml": bindings})).policy
    # No agent cost centre: the person's first group (in policy order) that has one.
    assert policy.cost_centre_of("main", "corp", ["writers", "readers"]) == "reading-room"
    assert policy.cost_centre_of("main", "corp", ["/writers"]) == "newsroom"
    assert policy.cost_centre_of("main", "corp", ["guests"]) is None
    assert policy.cost_centre_of("main", "other-idp", ["readers"]) is None
    assert policy.cost_centre_of("unknown-agent", "corp", ["readers"]) == "reading-room"
    with_agent_centre = AGENTS.replace(
        "    may_delegate_to: [sub]\n", "    may_delegate_to: [sub]\n    cost_centre: platform\n"
    )
    policy = load(
        tmp_path / "2", good_files(**{"bindings.yaml": bindings, "agents.yaml": with_agent_centre})
    ).policy
    assert policy.cost_centre_of("main", "corp", ["readers"]) == "platform"  # the agent wins
    assert policy.cost_centre_of("sub", "corp", ["readers"]) == "reading-room"


def test_one_group_cannot_have_two_cost_centres(tmp_path: Path) -> None:
    bindings = """
    group_bindings:
      - {idp: corp, group: readers, roles: [reader], cost_centre: a}
      - {idp: corp, group: readers, roles: [llm], cost_centre: b}
    """
    found = problems(tmp_path, good_files(**{"bindings.yaml": bindings}))
    assert any("corp/readers already has cost_centre 'a'" in p for p in found)

"""Permission strings, patterns and the one matching rule (`PermissionSet.covers`)."""

from __future__ import annotations

import pytest

from broker.policy.permissions import (
    EMPTY,
    MAX_PERMISSION_LENGTH,
    PermissionSet,
    is_pattern,
    is_permission,
    pattern_overlaps,
)


@pytest.mark.parametrize(
    "value",
    ["tickets", "tickets:read", "llm:openai:chat", "a1:b_2:c-3:d.4", "0:1", "x" * 200],
)
def test_valid_permissions(value: str) -> None:
    assert is_permission(value)
    assert is_pattern(value)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "*",
        ":*",
        "llm:*",
        "Tickets:read",
        "tickets:READ",
        "tickets::read",
        ":tickets",
        "tickets:",
        "tickets read",
        " tickets",
        "tickets:read\n",
        "-tickets",
        "tickets:_read",
        "llm:*:chat",
        "tickets/read",
        "x" * (MAX_PERMISSION_LENGTH + 1),
    ],
)
def test_invalid_permissions(value: str) -> None:
    assert not is_permission(value)


@pytest.mark.parametrize("value", ["llm:*", "llm:openai:*", "a:b:c:*", "tickets:read"])
def test_valid_patterns(value: str) -> None:
    assert is_pattern(value)


@pytest.mark.parametrize(
    "value",
    [
        "*",
        "**",
        "*:read",
        "llm:*:chat",
        "llm:**",
        "llm*",
        "llm:op*",
        "LLM:*",
        "llm::*",
        ":*",
        "",
        "llm:*\n",
        "x" * (MAX_PERMISSION_LENGTH - 1) + ":*",
    ],
)
def test_invalid_patterns(value: str) -> None:
    assert not is_pattern(value)


def test_wildcard_covers_every_longer_permission_under_its_prefix() -> None:
    rights = PermissionSet.of(["llm:*"])
    assert rights.covers("llm:openai:chat")
    assert rights.covers("llm:x")
    assert rights.covers("llm:a:b:c:d")
    assert not rights.covers("llm")
    assert not rights.covers("llmx:a")
    assert not rights.covers("llmx")
    assert not rights.covers("xllm:a")
    assert not rights.covers("tickets:read")


def test_nested_wildcard_only_covers_its_own_subtree() -> None:
    rights = PermissionSet.of(["llm:openai:*"])
    assert rights.covers("llm:openai:chat")
    assert rights.covers("llm:openai:chat:stream")
    assert not rights.covers("llm:openai")
    assert not rights.covers("llm:anthropic:messages")
    assert not rights.covers("llm:openaix:chat")


def test_exact_patterns_match_exactly() -> None:
    rights = PermissionSet.of(["tickets:read", "kb"])
    assert rights.covers("tickets:read")
    assert rights.covers("kb")
    assert not rights.covers("tickets")
    assert not rights.covers("tickets:read:all")
    assert not rights.covers("kb:read")
    assert not rights.covers("tickets:write")


def test_a_pattern_string_is_not_covered_as_a_permission() -> None:
    # `covers` is for concrete permissions; a request for "llm:*" is malformed, and even the
    # set holding the same pattern must not treat the literal string as one of its members.
    assert not PermissionSet.of(["tickets:read"]).covers("tickets:*")
    assert not PermissionSet.of(["llm:openai:chat"]).covers("llm:*")


def test_empty_set_covers_nothing_and_is_falsy() -> None:
    assert not EMPTY
    assert not EMPTY.covers("a")
    assert not PermissionSet.of([]).covers("llm:x")
    assert PermissionSet.of(["a"])
    assert PermissionSet.of(["a:*"])


def test_union_and_patterns() -> None:
    union = PermissionSet.of(["a:b", "c:*"]).union(PermissionSet.of(["d", "c:*", "e:f:*"]))
    assert union.patterns() == ["a:b", "c:*", "d", "e:f:*"]
    assert union.covers("a:b") and union.covers("c:z") and union.covers("e:f:g")
    assert not union.covers("e:f")
    assert PermissionSet.of(union.patterns()) == union


@pytest.mark.parametrize(
    ("pattern", "others", "expected"),
    [
        ("llm:*", ["llm:openai:chat"], True),
        ("llm:*", ["llm:openai:*"], True),
        ("llm:openai:*", ["llm:*"], True),
        ("llm:openai:*", ["llm:anthropic:*"], False),
        ("llm:*", ["llmx:a"], False),
        ("tickets:read", ["tickets:*"], True),
        ("tickets:read", ["tickets:write"], False),
        ("tickets:read", [], False),
    ],
)
def test_pattern_overlaps(pattern: str, others: list[str], expected: bool) -> None:
    assert pattern_overlaps(pattern, PermissionSet.of(others)) is expected

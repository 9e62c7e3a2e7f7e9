"""Permission strings and the only matching rule there is.

A permission is colon-separated segments, e.g. ``tickets:read`` or ``llm:openai:chat``. A *pattern*
(used in roles and agent ceilings, never in requests) may end in a wildcard segment: ``llm:*``
covers every permission that starts with ``llm:`` and has at least one more segment. A bare ``*``
is not allowed: nobody gets everything by accident.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

_SEGMENT = r"[a-z0-9][a-z0-9_.\-]*"
PERMISSION_RE = re.compile(rf"^{_SEGMENT}(?::{_SEGMENT})*$")
PATTERN_RE = re.compile(rf"^{_SEGMENT}(?::{_SEGMENT})*(?::\*)?$")
MAX_PERMISSION_LENGTH = 200


def is_permission(value: str) -> bool:
    return len(value) <= MAX_PERMISSION_LENGTH and PERMISSION_RE.fullmatch(value) is not None


def is_pattern(value: str) -> bool:
    return len(value) <= MAX_PERMISSION_LENGTH and PATTERN_RE.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class PermissionSet:
    """A set of permission patterns, compiled for O(segments) membership tests."""

    exact: frozenset[str]
    prefixes: frozenset[str]
    """Wildcard patterns stored without the trailing ``*`` (``llm:*`` is stored as ``llm:``)."""

    @classmethod
    def of(cls, patterns: Iterable[str]) -> PermissionSet:
        exact: set[str] = set()
        prefixes: set[str] = set()
        for pattern in patterns:
            if pattern.endswith(":*"):
                prefixes.add(pattern[:-1])
            else:
                exact.add(pattern)
        return cls(frozenset(exact), frozenset(prefixes))

    def union(self, other: PermissionSet) -> PermissionSet:
        return PermissionSet(self.exact | other.exact, self.prefixes | other.prefixes)

    def covers(self, permission: str) -> bool:
        """True when `permission` (a concrete permission, not a pattern) is in this set."""
        if permission in self.exact:
            return True
        if not self.prefixes:
            return False
        end = permission.find(":")
        while end != -1:
            if permission[: end + 1] in self.prefixes:
                return True
            end = permission.find(":", end + 1)
        return False

    def patterns(self) -> list[str]:
        return sorted(self.exact | {p + "*" for p in self.prefixes})

    def __bool__(self) -> bool:
        return bool(self.exact or self.prefixes)


EMPTY = PermissionSet(frozenset(), frozenset())


def pattern_overlaps(pattern: str, other: PermissionSet) -> bool:
    """Whether any permission matched by `pattern` could also be matched by `other` (for lints)."""
    if not pattern.endswith(":*"):
        return other.covers(pattern)
    prefix = pattern[:-1]
    return any(p.startswith(prefix) for p in other.exact) or any(
        p.startswith(prefix) or prefix.startswith(p) for p in other.prefixes
    )

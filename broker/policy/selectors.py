"""Selectors of people (``group:``, ``idp-role:``, ``person:``, ``role:``), compiled once.

One matching rule for every place the policy names people: an agent's ``act_for``, and an
approval rule's ``people`` (whose requests need approval) and ``approvers`` (who may approve).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from broker.types import normalise_group

if TYPE_CHECKING:
    from broker.policy.engine import Person


@dataclass(frozen=True, slots=True)
class Selectors:
    """Compiled selectors: who they match is a set lookup per group, IdP role and role."""

    groups: frozenset[tuple[str, str]] = frozenset()
    """(idp, normalised group) from ``group:<idp>[,<idp>...]/<group>``."""
    idp_roles: frozenset[tuple[str, str]] = frozenset()
    """(idp, IdP role) from ``idp-role:<idp>[,<idp>...]/<role>``."""
    people: frozenset[tuple[str, str]] = frozenset()
    """(idp, subject) from ``person:<idp>/<subject>``."""
    roles: frozenset[str] = frozenset()
    """Broker roles from ``role:<role>`` (the person holds the role through any binding)."""

    def matches(self, person: Person, roles: frozenset[str]) -> bool:
        """Whether `person`, who holds the broker `roles` (``policy.roles_of(person)``), is
        selected."""
        if (person.idp, person.subject) in self.people:
            return True
        if any((person.idp, group) in self.groups for group in person.groups):
            return True
        if any((person.idp, role) in self.idp_roles for role in person.idp_roles):
            return True
        return not self.roles.isdisjoint(roles)

    def __bool__(self) -> bool:
        return bool(self.groups or self.idp_roles or self.people or self.roles)


def compile_selectors(selectors: Iterable[str]) -> tuple[Selectors, list[str]]:
    """Compile selectors already checked for shape by the policy model. Returns the compiled
    set and the problems found (a selector naming an empty group, e.g. ``group:dev//``), each
    as "<selector>: what"; the caller adds where it was found and checks ``role:`` names."""
    groups: set[tuple[str, str]] = set()
    idp_roles: set[tuple[str, str]] = set()
    people: set[tuple[str, str]] = set()
    roles: set[str] = set()
    problems: list[str] = []
    for selector in selectors:
        kind, _, rest = selector.partition(":")
        idps, _, value = rest.partition("/")
        if kind == "role":
            roles.add(rest)
        elif kind == "person":
            people.add((idps, value))
        elif kind == "idp-role":
            idp_roles.update((idp, value) for idp in idps.split(","))
        elif kind != "group":
            problems.append(f"{selector!r} is not a selector")
        elif normalise_group(value):
            groups.update((idp, normalise_group(value)) for idp in idps.split(","))
        else:
            problems.append(f"{selector!r} names an empty group")
    return (
        Selectors(frozenset(groups), frozenset(idp_roles), frozenset(people), frozenset(roles)),
        problems,
    )

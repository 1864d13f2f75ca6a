"""Typed converters for the attrs records of every stage.

A field declared ``converter=tuple`` (or ``dict``) is what attrs needs, but mypy's attrs plugin
cannot bind ``tuple``'s item type (python/mypy#8417), so it refuses every argument of the record's
constructor; a generic converter leaves its type variable unbound the same way. A converter written
for one item type type-checks. The item types that records of several stages share live here; a
record whose items are its own stage's type defines its converter beside it.
"""

from __future__ import annotations

from collections.abc import Iterable


def ints(items: Iterable[int]) -> tuple[int, ...]:
    return tuple(items)


def strings(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(items)

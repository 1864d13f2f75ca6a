"""Checking what callers pass to the public API: a wrong argument is an error that names it.

Each check raises ``ArgumentTypeError`` (also a TypeError) or ``ArgumentError`` (a ValueError),
worded ``NAME is EXPECTED, got GIVEN``, before the argument reaches code that would fail on it
with an error about something else.
"""

from __future__ import annotations

import operator
from typing import SupportsIndex, cast

from polykv.errors import ArgumentError, ArgumentTypeError


def whole_number(value: object, name: str, *, least: int | None = None, most: int | None = None) -> int:
    """``value`` as an int (a bool or a float with a fraction is refused), within ``least``..``most``."""
    if isinstance(value, bool):
        raise ArgumentTypeError(f"{name} is a whole number, got {value!r}")
    try:
        number = operator.index(cast(SupportsIndex, value))  # the check: TypeError where value has no __index__
    except TypeError:
        raise ArgumentTypeError(f"{name} is a whole number, got {_shown(value)}") from None
    if (least is not None and number < least) or (most is not None and number > most):
        bounds = (
            f"from {least:,} to {most:,}" if least is not None and most is not None
            else f"at least {least:,}" if least is not None else f"at most {most:,}"
        )  # fmt: skip
        raise ArgumentError(f"{name} is a whole number {bounds}, got {number:,}")
    return number


def instance(value: object, kinds: type | tuple[type, ...], name: str, expected: str) -> None:
    """Refuse ``value`` unless it is one of ``kinds``; ``expected`` says what the argument is, in words."""
    if not isinstance(value, kinds):
        raise ArgumentTypeError(f"{name} is {expected}, got {_shown(value)}")


def _shown(value: object) -> str:
    text = repr(value)
    kind = type(value).__name__
    return f"{kind} {text[:60]}{'...' if len(text) > 60 else ''}" if not isinstance(value, (str, int, float)) else text

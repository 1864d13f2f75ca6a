"""A layer's budget once a spec is resolved: a number of tokens, or a share of the prompt.

The language has more kinds of budget (``@auto``, a total for the whole model); resolution turns
them into one of these two, so the cache engine works on plain numbers and never on syntax.
``None`` stands for "keep everything" wherever a budget is optional.
"""

from __future__ import annotations

import decimal
import math

import attrs


def _positive_count(_instance: object, _attribute: attrs.Attribute, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"a token budget is a whole number of at least 1, got {value!r}")


def _share(_instance: object, _attribute: attrs.Attribute, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 100:
        raise ValueError(f"a share of the prompt is a percentage in (0, 100], got {value!r}")


@attrs.frozen
class Tokens:
    """A fixed number of tokens (``@256``)."""

    count: int = attrs.field(validator=_positive_count)

    def tokens(self, prompt_length: int) -> int:
        return self.count

    def __str__(self) -> str:
        return str(self.count)


@attrs.frozen
class Share:
    """A percentage of the prompt (``@10%``), at least one token."""

    percent: float = attrs.field(validator=_share)

    def tokens(self, prompt_length: int) -> int:
        return max(1, math.ceil(self.percent * prompt_length / 100))

    def __str__(self) -> str:
        if isinstance(self.percent, int):
            return f"{self.percent}%"
        return format(decimal.Decimal(repr(self.percent)), "f").rstrip("0").rstrip(".") + "%"  # no exponent


Budget = Tokens | Share

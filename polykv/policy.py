"""The interface an eviction policy implements, and what the cache hands it.

A policy is a class with a name, a one-line description, typed parameters and a ``select``
method: given one layer's cached keys and values and a token budget, it returns which tokens to
keep for every batch row and KV head. Most policies only rank tokens; they subclass
``ScoringPolicy`` and write ``score``. A policy says what else it needs (the queries of the last
positions, their attention, or attention accumulated over the whole prompt) through ``needs``;
the cache computes only what some layer asked for.

    class KeyNorm(ScoringPolicy):
        name = "knorm"
        description = "Keeps the keys with the lowest L2 norm."

        def score(self, view):
            return -view.keys.float().norm(dim=-1)

Shapes use B for batch rows, H for KV heads, G for query heads per KV head (GQA group), L for
tokens and D for head dimension.
"""

from __future__ import annotations

import abc
import enum
import math
import types
from collections.abc import Mapping
from typing import ClassVar

import attrs
import torch

from polykv.values import Value, describe_value, format_value


class Phase(enum.Enum):
    """When a policy runs: once on the prompt, or while generating (to bound memory)."""

    PREFILL = "prefill"
    DECODE = "decode"


class ParameterError(ValueError):
    """A parameter value a policy does not accept; ``hint`` says what would be accepted."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}


def _known_type(instance: Param, _attribute: attrs.Attribute, value: type) -> None:
    if value not in _TYPE_WORDS:
        raise TypeError(f"parameter {instance.name!r}: type must be int, float, bool or str, not {value!r}")


@attrs.frozen
class Param:
    """One declared parameter of a policy: its type, default, allowed range and meaning."""

    name: str
    type: type = attrs.field(validator=_known_type)
    default: Value
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = attrs.field(default=(), converter=tuple)

    def coerce(self, value: Value) -> Value:
        """``value`` as this parameter's type; raises ParameterError naming what is expected."""
        kind = self.type
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ParameterError(
                f"parameter '{self.name}' takes {_TYPE_WORDS[kind]}, got {describe_value(value)}",
                hint=f"for example {self.name}={format_value(self.default)}",
            )
        if kind is float:
            value = self._finite(value)
        if self.choices and value not in self.choices:
            options = ", ".join(format_value(c) for c in self.choices)
            raise ParameterError(
                f"parameter '{self.name}' is one of {options}, got {format_value(value)}",
                hint=f"for example {self.name}={format_value(self.choices[0])}",
            )
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
            raise ParameterError(f"parameter '{self.name}' must be {self.range_words()}, got {format_value(value)}")
        return value

    def _finite(self, value: int | float) -> float:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ParameterError(f"parameter '{self.name}' takes a finite number, got {format_value(value)}")
        return number

    def range_words(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {_number(self.min)} and {_number(self.max)}"
        if self.min is not None:
            return f"at least {_number(self.min)}"
        if self.max is not None:
            return f"at most {_number(self.max)}"
        return "any value"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@attrs.frozen
class Needs:
    """What a policy needs beyond the keys and values, so the cache computes only that.

    ``window``: how many of the last queries it wants (0: none). ``window_attention``: the
    softmax attention of those queries over all tokens. ``accumulated_attention``: attention
    summed over every query of the prompt, computed in chunks (prefill only).
    """

    window: int = 0
    window_attention: bool = False
    accumulated_attention: bool = False

    def __attrs_post_init__(self) -> None:
        if self.window < 0:
            raise ValueError("a query window is >= 0")
        if self.window_attention and self.window == 0:
            raise ValueError("window attention needs a window of at least one query")


#: A policy that needs nothing beyond keys and values.
NOTHING_MORE = Needs()


@attrs.frozen(kw_only=True)
class LayerView:
    """One layer's cache as a policy sees it, and the budget to fit it into.

    At prefill the tokens are the prompt; while decoding they are what the layer holds.
    ``token_mask`` is False for padding, which a policy must never keep in place of a real token.
    ``positions`` are the tokens' positions in the sequence (keys carry them, rotated in).
    """

    layer: int
    phase: Phase
    budget: int
    keys: torch.Tensor  # (B, H, L, D)
    values: torch.Tensor  # (B, H, L, D)
    token_mask: torch.Tensor  # (B, H, L) bool
    positions: torch.Tensor  # (B, H, L) long
    queries: torch.Tensor | None = None  # (B, H, G, window, D), rotated like the keys
    window_attention: torch.Tensor | None = None  # (B, H, G, window, L), float32
    accumulated_attention: torch.Tensor | None = None  # (B, H, G, L), float32

    @property
    def length(self) -> int:
        return self.keys.shape[-2]


class Policy(abc.ABC):
    """Base class of eviction policies. Subclasses set the class attributes and implement ``select``.

    ``budgeted = False`` marks a policy that keeps everything and so takes no budget (``full``).
    Parameter values become attributes of the instance (``self.window``) and ``self.values``.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    parameters: ClassVar[tuple[Param, ...]] = ()
    budgeted: ClassVar[bool] = True

    def __init__(self, **values: Value):
        declared = {p.name: p for p in self.parameters}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ParameterError(f"{self.name} has no parameter '{unknown[0]}'")
        resolved = {
            name: param.coerce(values[name]) if name in values else param.default for name, param in declared.items()
        }
        for name, value in resolved.items():
            setattr(self, name, value)
        self.values: Mapping[str, Value] = types.MappingProxyType(resolved)

    def needs(self) -> Needs:
        """What the policy needs beyond keys and values (default: nothing)."""
        return Needs()

    def min_budget(self) -> int:
        """The smallest budget the policy can work with (for example its protected window)."""
        return 1

    @abc.abstractmethod
    def select(self, view: LayerView) -> torch.Tensor:
        """Indices of the ``view.budget`` tokens to keep: a long tensor of shape (B, H, budget).

        Indices must be distinct within each row and head, and never point at padding when the
        row has at least ``budget`` real tokens. Their order does not matter.
        """

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={format_value(v)}" for k, v in self.values.items())
        return f"{self.name}({settings})" if settings else self.name


class ScoringPolicy(Policy):
    """A policy that ranks tokens: ``select`` keeps the ``budget`` highest scores per row and head.

    Scores of padding are ignored; give ``math.inf`` to tokens that must always be kept. Ties go
    to the earlier token. Ranking rather than selecting is what lets the same policy serve
    per-head budgets later.
    """

    @abc.abstractmethod
    def score(self, view: LayerView) -> torch.Tensor:
        """A score per token, shape (B, H, L): higher means more worth keeping."""

    def select(self, view: LayerView) -> torch.Tensor:
        scores = self.score(view).float().masked_fill(~view.token_mask, -math.inf)
        # A stable sort breaks ties (frequent after max pooling) by order in the sequence, which left
        # padding does not change: a padded row keeps what it would keep alone, on any device.
        return scores.sort(dim=-1, descending=True, stable=True).indices[..., : view.budget]


# --- helpers for writing policies ---------------------------------------------------------------


def most_recent(view: LayerView, count: int) -> torch.Tensor:
    """True for the ``count`` most recent real tokens of each row and head, shape (B, H, L)."""
    from_end = view.token_mask.flip(-1).long().cumsum(-1).flip(-1)
    return view.token_mask & (from_end <= count)


def first_tokens(view: LayerView, count: int) -> torch.Tensor:
    """True for the first ``count`` real tokens of each row and head (attention sinks), shape (B, H, L)."""
    from_start = view.token_mask.long().cumsum(-1)
    return view.token_mask & (from_start <= count)


def per_kv_head(scores: torch.Tensor) -> torch.Tensor:
    """Average scores over each GQA group: (B, H, G, ...) to (B, H, ...)."""
    return scores.mean(dim=2)

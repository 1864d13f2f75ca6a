"""The syntax tree of a polykv spec.

Every node keeps the span it was parsed from; spans take no part in equality, so a spec built in
code equals the same spec parsed from text. Comments and blank lines are kept as items so that
`polykv fmt` can print a file back without losing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import attrs

from polykv.converters import strings
from polykv.language.source import Span
from polykv.values import AUTO, KEYWORDS, Value, is_name

__all__ = ["AUTO", "KEYWORDS", "Value"]  # re-exported: the language's words and values


def _span() -> Span | None:
    return attrs.field(default=None, eq=False, repr=False, kw_only=True)


def _is_name(_instance: object, attribute: attrs.Attribute, value: str) -> None:
    if not is_name(value):
        raise ValueError(f"{attribute.name} must be a name (letters, digits, _), got {value!r}")


def _policy_name(instance: object, attribute: attrs.Attribute, value: str) -> None:
    _is_name(instance, attribute, value)
    if value in KEYWORDS and value != AUTO:
        raise ValueError(f"{value!r} is a keyword of the language, not a policy name")


def _candidate_names(instance: object, attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
    for name in value:
        _policy_name(instance, attribute, name)
        if name == AUTO:
            raise ValueError("auto cannot be its own candidate")


# Typed converters, as polykv.converters says why.
def _indices(items: Iterable[LayerIndex | LayerRange]) -> tuple[LayerIndex | LayerRange, ...]:
    return tuple(items)


def _parameters(items: Iterable[Parameter]) -> tuple[Parameter, ...]:
    return tuple(items)


def _finite_value(_instance: object, _attribute: attrs.Attribute, value: object) -> None:
    if not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"a parameter value is a bool, int, float or str, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"a parameter value is a finite number, got {value!r}")


def _percentage(_instance: object, _attribute: attrs.Attribute, value: int | float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a percentage is a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"a percentage is a finite number >= 0, got {value!r}")


def _comment_text(_instance: object, _attribute: attrs.Attribute, value: str | None) -> None:
    if value is not None and ("\n" in value or "\r" in value or value != value.rstrip()):
        raise ValueError(f"a comment is one line without trailing spaces, got {value!r}")


# --- budgets -----------------------------------------------------------------------------------


@attrs.frozen
class Tokens:
    """A budget of a fixed number of tokens (``@64``, ``budget 512``)."""

    count: int
    span: Span | None = _span()


@attrs.frozen
class Percent:
    """A budget that is a percentage of the context length (``@10%``)."""

    value: int | float = attrs.field(validator=_percentage)
    span: Span | None = _span()


@attrs.frozen
class AutoBudget:
    """``@auto``: the budget solver shares the total budget out."""

    span: Span | None = _span()


Budget = Tokens | Percent | AutoBudget


# --- selectors ---------------------------------------------------------------------------------


@attrs.frozen
class LayerIndex:
    """One layer; negative indices count from the last layer (-1)."""

    index: int
    span: Span | None = _span()


@attrs.frozen
class LayerRange:
    """Layers ``start`` to ``stop``, both included."""

    start: int
    stop: int
    span: Span | None = _span()


@attrs.frozen
class LayerList:
    """A comma list of indices and ranges: ``0-3``, ``0,2,5``, ``28--1``."""

    items: tuple[LayerIndex | LayerRange, ...] = attrs.field(converter=_indices)
    span: Span | None = _span()

    @items.validator
    def _not_empty(self, _attribute: attrs.Attribute, value: tuple) -> None:
        if not value:
            raise ValueError("a layer list names at least one layer")


@attrs.frozen
class EveryLayer:
    """``*``: every layer that no other statement names."""

    span: Span | None = _span()


Selector = LayerList | EveryLayer


@attrs.frozen
class HeadList:
    """``heads 0,2-3``: KV heads of the selected layers, written as layers are (``-1`` is the last head).

    ``heads *`` (``every``) names each head of the selected layers, one by one: where routing or budget
    solving is left open, every head is routed and budgeted on its own. ``heads adaptive`` keeps the
    statement about whole layers, whose budget is shared among their heads at prefill by the policy's
    scores (Ada-KV)."""

    items: tuple[LayerIndex | LayerRange, ...] = attrs.field(converter=_indices)
    span: Span | None = _span()
    every: bool = attrs.field(default=False, kw_only=True)
    adaptive: bool = attrs.field(default=False, kw_only=True)

    @items.validator
    def _not_empty(self, _attribute: attrs.Attribute, value: tuple) -> None:
        if not value and not self.every:
            raise ValueError("a head list names at least one head")
        if value and self.every:
            raise ValueError("`heads *` names every head: it takes no list")
        if self.adaptive and not self.every:
            raise ValueError("`heads adaptive` shares a layer's budget among all its heads")

    @property
    def names_heads(self) -> bool:
        """Whether the statement is about some KV heads (not about whole layers, as ``heads adaptive`` is)."""
        return not self.adaptive


# --- policies ----------------------------------------------------------------------------------


@attrs.frozen
class Parameter:
    """``name=value`` inside a policy's parentheses."""

    name: str = attrs.field(validator=_is_name)
    value: Value = attrs.field(validator=_finite_value)
    span: Span | None = _span()
    value_span: Span | None = _span()


@attrs.frozen
class PolicyUse:
    """A policy with its budget and parameters: ``snapkv@auto(window=32)``, ``auto[snapkv, h2o]@256``.

    ``candidates`` is only meaningful for ``auto`` (an empty tuple lets the router choose from
    every installed policy). ``budget`` is None where none was written.
    """

    name: str = attrs.field(validator=_policy_name)
    budget: Budget | None = None
    parameters: tuple[Parameter, ...] = attrs.field(default=(), converter=_parameters)
    candidates: tuple[str, ...] = attrs.field(default=(), converter=strings, validator=_candidate_names)
    span: Span | None = _span()
    name_span: Span | None = _span()

    @candidates.validator
    def _candidates_only_for_auto(self, _attribute: attrs.Attribute, value: tuple[str, ...]) -> None:
        if value and self.name != AUTO:
            raise ValueError("only auto takes a list of candidate policies")

    @property
    def is_auto(self) -> bool:
        return self.name == AUTO


# --- statements --------------------------------------------------------------------------------


@attrs.frozen
class ModelLayers:
    """``model layers 32`` (``model layers 32 heads 8``): the layer (and KV head) count the spec is written for."""

    count: int
    heads: int | None = attrs.field(default=None, kw_only=True)
    comment: str | None = attrs.field(default=None, validator=_comment_text)
    span: Span | None = _span()


@attrs.frozen
class BudgetDecl:
    """``budget 512`` (average per layer), ``budget total 16384`` or ``budget 10%``."""

    amount: Tokens | Percent
    total: bool = False
    comment: str | None = attrs.field(default=None, validator=_comment_text)
    span: Span | None = _span()


@attrs.frozen
class PrefillLimit:
    """``prefill <= 1.5x``: auto layers are routed so the prefill costs at most this many times the full cache's.

    Costs are what calibration measured per policy; a limit lets a user who cares about prefill time
    forbid costly scorers where they would not pay for themselves.
    """

    factor: float
    comment: str | None = attrs.field(default=None, validator=_comment_text)
    span: Span | None = _span()


@attrs.frozen
class SolverDecl:
    """``solver pyramid(beta=20)``: who shares out @auto budgets and routes auto layers."""

    name: str = attrs.field(validator=_is_name)
    parameters: tuple[Parameter, ...] = attrs.field(default=(), converter=_parameters)
    comment: str | None = attrs.field(default=None, validator=_comment_text)
    span: Span | None = _span()
    name_span: Span | None = _span()


@attrs.frozen
class Rule:
    """``layers SELECTOR [heads HEADS]: POLICY [decode POLICY]``: which policy (per phase) the selected layers use.

    ``heads`` (None: every head) narrows the statement to some KV heads of those layers.
    """

    selector: Selector
    prefill: PolicyUse
    decode: PolicyUse | None = None
    comment: str | None = attrs.field(default=None, validator=_comment_text)
    heads: HeadList | None = attrs.field(default=None, kw_only=True)
    span: Span | None = _span()

    @property
    def named_heads(self) -> HeadList | None:
        """The KV heads this statement is about, or None where it is about whole layers."""
        return self.heads if self.heads is not None and self.heads.names_heads else None

    @property
    def adaptive_heads(self) -> bool:
        """Whether the layers share their budget among their heads at prefill (``heads adaptive``)."""
        return self.heads is not None and self.heads.adaptive


Statement = ModelLayers | BudgetDecl | PrefillLimit | SolverDecl | Rule


@attrs.frozen
class Comment:
    """A comment on a line of its own (``text`` follows the ``#``)."""

    text: str = attrs.field(validator=_comment_text)
    span: Span | None = _span()


@attrs.frozen
class BlankLine:
    """A paragraph break between items (runs of blank lines collapse into one)."""

    span: Span | None = _span()


Item = ModelLayers | BudgetDecl | PrefillLimit | SolverDecl | Rule | Comment | BlankLine


def _canonical_items(items: tuple[Item, ...]) -> tuple[Item, ...]:
    """Collapse runs of blank lines and drop those at either end, so every Spec prints canonically."""
    kept: list[Item] = []
    for item in items:
        if isinstance(item, BlankLine) and (not kept or isinstance(kept[-1], BlankLine)):
            continue
        kept.append(item)
    while kept and isinstance(kept[-1], BlankLine):
        kept.pop()
    return tuple(kept)


@attrs.frozen
class Spec:
    """A whole spec: its statements in order, with the comments and paragraph breaks between them."""

    items: tuple[Item, ...] = attrs.field(default=(), converter=_canonical_items)
    source_name: str = attrs.field(default="<string>", eq=False)
    #: The text it was parsed from, where an error about the spec as a whole points (an empty file's, say).
    source_text: str = attrs.field(default="", eq=False, repr=False)

    @property
    def statements(self) -> tuple[Statement, ...]:
        return tuple(i for i in self.items if isinstance(i, (ModelLayers, BudgetDecl, PrefillLimit, SolverDecl, Rule)))

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(i for i in self.items if isinstance(i, Rule))

    @property
    def budget(self) -> BudgetDecl | None:
        """The (first) budget declaration, if any."""
        return next((i for i in self.items if isinstance(i, BudgetDecl)), None)

    @property
    def prefill_limit(self) -> PrefillLimit | None:
        """The (first) prefill limit, if any."""
        return next((i for i in self.items if isinstance(i, PrefillLimit)), None)

    @property
    def solver(self) -> SolverDecl | None:
        """The (first) solver declaration, if any."""
        return next((i for i in self.items if isinstance(i, SolverDecl)), None)

    @property
    def model_layers(self) -> ModelLayers | None:
        """The (first) ``model layers N`` declaration, if any."""
        return next((i for i in self.items if isinstance(i, ModelLayers)), None)

    def with_budget(self, budget: BudgetDecl) -> Spec:
        """This spec with ``budget`` declared before its first rule."""
        return self._with_setting(budget)

    def with_prefill_limit(self, limit: PrefillLimit) -> Spec:
        """This spec with ``limit`` declared before its first rule."""
        return self._with_setting(limit)

    def _with_setting(self, setting: BudgetDecl | PrefillLimit) -> Spec:
        items = list(self.items)
        first_rule = next((n for n, i in enumerate(items) if isinstance(i, Rule)), len(items))
        items.insert(first_rule, setting)
        return Spec(tuple(items), source_name=self.source_name, source_text=self.source_text)

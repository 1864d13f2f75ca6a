"""The budget problem: per-layer options with predicted losses, under one total of stored tokens.

Each layer either keeps everything (costing the prompt length) or runs a policy at a budget from
the grid, at the loss the calibration table predicts; a layer the spec fixes has one option. The
total counts the stored tokens of every layer, whole ones included. Losses between grid budgets
are interpolated linearly; budgets at or above the prompt length keep the layer whole.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Mapping, Sequence

import attrs

from polykv.errors import PolykvError

#: The policy name a choice carries when the layer is kept whole.
WHOLE = "full"


class InfeasibleError(PolykvError):
    """No assignment fits the total: fixed and minimum budgets already exceed it."""


def _ascending(_instance: object, _attribute: attrs.Attribute, grid: tuple[int, ...]) -> None:
    if not grid or any(b < 1 for b in grid) or list(grid) != sorted(set(grid)):
        raise ValueError(f"a budget grid is strictly ascending positive token counts, got {grid!r}")


@attrs.frozen
class LayerOptions:
    """What one layer may do.

    ``losses`` maps a policy to its predicted loss at each grid budget (math.inf: the policy cannot
    take that budget). ``whole`` is the loss of keeping the layer whole (None: not allowed).
    ``fixed`` is a choice the spec imposes: (policy, tokens), tokens None for whole. Budgets are
    kept within [``min_budget``, ``max_budget``].
    """

    losses: Mapping[str, tuple[float, ...]] = attrs.field(factory=dict)
    whole: float | None = 0.0
    fixed: tuple[str, int | None] | None = None
    min_budget: int = 1
    max_budget: int | None = None

    def loss_at(self, policy: str, budget: int, grid: Sequence[int]) -> float:
        """The predicted loss of ``policy`` at ``budget`` tokens, linear between grid points.

        Below the grid it is the smallest budget's loss (an optimistic guess, used only to route
        the budgets a published rule hands out; polykv's own solver stays on the grid).
        """
        table = self.losses[policy]
        if budget <= grid[0]:
            return table[0]
        if budget >= grid[-1]:
            return table[-1]
        right = bisect.bisect_left(grid, budget)
        left = right - 1
        if grid[right] == budget:
            return table[right]
        share = (budget - grid[left]) / (grid[right] - grid[left])
        low, high = table[left], table[right]
        if math.isinf(low) or math.isinf(high):
            return math.inf
        return low + share * (high - low)


@attrs.frozen
class BudgetProblem:
    """Choose (policy, budget) per layer minimising the summed loss, with stored tokens summing to ``total``."""

    grid: tuple[int, ...] = attrs.field(converter=tuple, validator=_ascending)
    layers: tuple[LayerOptions, ...] = attrs.field(converter=tuple)
    total: int
    prompt_length: int
    step: int = 16

    def __attrs_post_init__(self) -> None:
        if self.prompt_length < 1 or self.step < 1 or self.total < 0:
            raise ValueError("prompt_length and step are at least 1, total at least 0")
        for index, layer in enumerate(self.layers):
            for policy, table in layer.losses.items():
                if len(table) != len(self.grid):
                    raise ValueError(f"layer {index}: {policy} has {len(table)} losses for {len(self.grid)} budgets")


@attrs.frozen
class LayerChoice:
    """What a solver chose for one layer: a policy and its tokens (the prompt length when kept whole)."""

    policy: str
    tokens: int
    loss: float
    whole: bool = False

    def describe(self) -> str:
        return WHOLE if self.whole else f"{self.policy}@{self.tokens}"


@attrs.frozen
class Solution:
    """Every layer's choice, the predicted loss, and which solver made it (and why, in ``note``)."""

    layers: tuple[LayerChoice, ...] = attrs.field(converter=tuple)
    loss: float
    solver: str
    note: str = ""

    @property
    def tokens(self) -> int:
        return sum(choice.tokens for choice in self.layers)


def monotone(table: Sequence[float]) -> tuple[float, ...]:
    """A loss table made non-increasing in budget (running minimum): more tokens never predict a worse loss."""
    result, best = [], math.inf
    for loss in table:
        best = min(best, loss)
        result.append(best)
    return tuple(result)


def options(problem: BudgetProblem, layer: LayerOptions) -> list[LayerChoice]:
    """Every choice ``layer`` allows, cheapest first: its fixed one, or policies at grid budgets and whole.

    Budgets at or above the prompt length are the same as keeping the layer whole, and are left out.
    """
    if layer.fixed is not None:
        policy, tokens = layer.fixed
        whole = tokens is None or tokens >= problem.prompt_length
        return [LayerChoice(policy, problem.prompt_length if whole else tokens, 0.0, whole=whole)]
    found = []
    for index, budget in enumerate(problem.grid):
        if budget < layer.min_budget or budget >= problem.prompt_length:
            continue
        if layer.max_budget is not None and budget > layer.max_budget:
            continue
        for policy, table in layer.losses.items():
            if not math.isinf(table[index]):
                found.append(LayerChoice(policy, budget, table[index]))
    if layer.whole is not None:
        found.append(LayerChoice(WHOLE, problem.prompt_length, layer.whole, whole=True))
    if not found:
        raise InfeasibleError(
            "a layer has no option: no policy can take a budget of the grid, and it cannot stay whole"
        )
    return sorted(found, key=lambda choice: choice.tokens)


def check_feasible(problem: BudgetProblem) -> None:
    """Raise InfeasibleError, saying by how much, when even the cheapest choices exceed the total."""
    needed = sum(options(problem, layer)[0].tokens for layer in problem.layers)
    if needed > problem.total:
        raise InfeasibleError(
            f"the layers need at least {needed} stored tokens (fixed budgets, minimums and whole layers), "
            f"{needed - problem.total} more than the total of {problem.total}: "
            "raise the total or lower the fixed budgets"
        )

"""The interface a budget solver implements, and the problem it is given.

A solver decides, for the layers a spec leaves open, which policy each runs and how many tokens it
keeps, under one total (``solver NAME(params)`` in a spec picks one; polykv's own exact knapsack and
the published rules are built-in plugins). Its input is a ``BudgetProblem``: per layer, the
options with the losses the calibration table predicts. Each layer either keeps everything
(costing the prompt length) or runs a policy at a budget from the grid; a layer the spec fixes has
one option. The total counts the stored tokens of every layer, whole ones included. Losses between
grid budgets are interpolated linearly; budgets at or above the prompt length keep the layer whole.

``allocate`` shares a total in proportion to per-layer weights and routes each layer to its best
policy: a rule solver (uniform, pyramid, CAKE) is a choice of weights.
"""

from __future__ import annotations

import abc
import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import attrs

from polykv.converters import ints
from polykv.errors import PolykvError
from polykv.parameters import Configurable

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


# Typed converters, as polykv.converters says why.
def _layer_options(items: Iterable[LayerOptions]) -> tuple[LayerOptions, ...]:
    return tuple(items)


def _layer_choices(items: Iterable[LayerChoice]) -> tuple[LayerChoice, ...]:
    return tuple(items)


@attrs.frozen
class BudgetProblem:
    """Choose (policy, budget) per layer minimising the summed loss, with stored tokens summing to ``total``."""

    grid: tuple[int, ...] = attrs.field(converter=ints, validator=_ascending)
    layers: tuple[LayerOptions, ...] = attrs.field(converter=_layer_options)
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

    layers: tuple[LayerChoice, ...] = attrs.field(converter=_layer_choices)
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
        return [_fixed(problem, layer)]
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


class Solver(Configurable, abc.ABC):
    """Turns a BudgetProblem into a Solution. Subclasses set ``name`` and ``description``, declare
    parameters with ``parameter`` (``solver pyramid(beta=20)`` sets them), and implement ``solve``.

    ``signals`` are per-layer measurements by name (``entropy``, ``variance``, ...), for rules
    that read them. ``reads_losses`` says the solver chooses from the calibrated loss tables, and
    ``reads_signals`` which signals it needs: either needs a profile of the model.
    """

    description: ClassVar[str]
    reads_losses: ClassVar[bool] = False
    reads_signals: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        """Every layer's choice, summing to the total where the layers can hold it."""


def allocate(problem: BudgetProblem, shares: Sequence[float], solver: str) -> Solution:
    """Share the total among free layers in proportion to ``shares``, then route each to its best policy."""
    check_feasible(problem)
    budgets = _proportional(problem, shares)
    chosen = [_route(problem, layer, budget) for layer, budget in zip(problem.layers, budgets)]
    return Solution(chosen, sum(c.loss for c in chosen), solver)


def uniform_solution(problem: BudgetProblem) -> Solution | None:
    """The best single policy at one shared budget on every free layer (the knapsack's guard), or None."""
    policies = sorted({name for layer in problem.layers if layer.fixed is None for name in layer.losses})
    budgets = _proportional(problem, [1.0] * len(problem.layers))
    best = None
    for policy in policies:
        chosen = [
            _fixed(problem, layer) if layer.fixed is not None else _as(problem, layer, policy, budget)
            for layer, budget in zip(problem.layers, budgets)
        ]
        complete = [c for c in chosen if c is not None]
        if len(complete) < len(chosen):  # a layer cannot take its budget with this policy
            continue
        loss = sum(c.loss for c in complete)
        if best is None or loss < best.loss:
            best = Solution(complete, loss, "uniform", note=policy)
    return best


def free_total(problem: BudgetProblem) -> int:
    """The tokens the total leaves for the layers the spec does not fix."""
    return problem.total - sum(_fixed(problem, layer).tokens for layer in problem.layers if layer.fixed is not None)


def _proportional(problem: BudgetProblem, shares: Sequence[float]) -> list[int]:
    """Integer budgets for the free layers, in proportion to ``shares``, within bounds, summing to the free total."""
    free = [i for i, layer in enumerate(problem.layers) if layer.fixed is None]
    budgets = [0] * len(problem.layers)
    for i, layer in enumerate(problem.layers):
        if layer.fixed is not None:
            budgets[i] = _fixed(problem, layer).tokens
    lows = {i: _lowest(problem, problem.layers[i]) for i in free}
    highs = {i: _highest(problem, problem.layers[i]) for i in free}
    remaining, open_layers = free_total(problem), list(free)
    settled: dict[int, int] = {}
    while open_layers:  # water-filling: layers whose proportional share breaks a bound are clamped, the rest re-shared
        weight = sum(shares[i] for i in open_layers) or float(len(open_layers))
        wanted = {i: remaining * (shares[i] if weight else 1.0) / weight for i in open_layers}
        clamped = {i: min(max(wanted[i], lows[i]), highs[i]) for i in open_layers}
        # Clamping moves tokens one way overall; settle only the layers clamped that way, re-share the rest.
        excess = sum(clamped.values()) - remaining
        broken = [
            i
            for i in open_layers
            if clamped[i] != wanted[i] and (excess == 0 or (clamped[i] > wanted[i]) == (excess > 0))
        ]
        if not broken:
            break
        for i in broken:
            settled[i] = round(clamped[i])
            remaining -= settled[i]
            open_layers.remove(i)
    exact = {i: remaining * shares[i] / (sum(shares[j] for j in open_layers) or 1.0) for i in open_layers}
    floors = {i: math.floor(value) for i, value in exact.items()}
    odd = remaining - sum(floors.values())
    for i in sorted(open_layers, key=lambda i: (-(exact[i] - floors[i]), i))[: max(0, odd)]:
        floors[i] += 1
    for i in free:
        budgets[i] = settled.get(i, floors.get(i, lows[i]))
    return budgets


def _lowest(problem: BudgetProblem, layer: LayerOptions) -> int:
    """The fewest tokens a free layer can hold: its minimum, and no less than the first budget a policy takes."""
    taken = [b for i, b in enumerate(problem.grid) if any(not math.isinf(t[i]) for t in layer.losses.values())]
    first = taken[0] if taken and taken[0] > problem.grid[0] else 1
    return max(1, layer.min_budget, first)


def _highest(problem: BudgetProblem, layer: LayerOptions) -> int:
    """The most tokens a free layer can hold: the prompt if it may stay whole, else one less, within its bound."""
    most = problem.prompt_length if layer.whole is not None else problem.prompt_length - 1
    return min(most, layer.max_budget or most)


def _route(problem: BudgetProblem, layer: LayerOptions, budget: int) -> LayerChoice:
    if layer.fixed is not None:
        return _fixed(problem, layer)
    routed = [_as(problem, layer, policy, budget) for policy in sorted(layer.losses)]
    candidates = [c for c in routed if c is not None]
    if not candidates:
        if layer.whole is not None:
            return LayerChoice(WHOLE, problem.prompt_length, layer.whole, whole=True)
        raise ValueError(f"no policy of this layer can take {budget} tokens")
    return min(candidates, key=lambda c: c.loss)


def _as(problem: BudgetProblem, layer: LayerOptions, policy: str, budget: int) -> LayerChoice | None:
    if budget >= problem.prompt_length and layer.whole is not None:
        return LayerChoice(WHOLE, problem.prompt_length, layer.whole, whole=True)
    budget = min(budget, _highest(problem, layer))
    loss = layer.loss_at(policy, budget, problem.grid)
    return None if math.isinf(loss) else LayerChoice(policy, budget, loss)


def _fixed(problem: BudgetProblem, layer: LayerOptions) -> LayerChoice:
    assert layer.fixed is not None  # called for the layers the spec fixes only
    policy, tokens = layer.fixed
    if tokens is None or tokens >= problem.prompt_length:
        return LayerChoice(policy, problem.prompt_length, 0.0, whole=True)
    return LayerChoice(policy, tokens, 0.0)

"""polykv's own solver: routing and budgets as one multiple-choice knapsack, solved exactly on the grid.

Each layer picks one option (a policy at a grid budget, or staying whole); the options' tokens
must fit the total and their predicted losses add up. Dynamic programming over units of ``step``
tokens finds the minimum exactly: for every layer and every capacity, the best loss of the layers
so far, vectorised over capacities with torch (80 layers, 10 policies and 64 budgets take a few
tens of milliseconds).

Fixed layers are constants taken off the total first. When every free layer's least-loss option
fits what is left (a total above the prompt keeps layers whole), that is the answer, without a
table. Otherwise the free layers are counted in units of ``step`` tokens (or of a smaller divisor
of the grid's budgets), and the layers kept whole in a dimension of their own, since a prompt
length is rarely a multiple of the unit: so no choice is lost to rounding and the unit stays coarse.
A table past MAX_CELLS or MAX_WORK counts in coarser units instead (budgets rounded up, so the total
is never overspent), which bounds time and memory for any total. Tokens the grid leaves over are
then handed to compressed layers one grid interval at a time, where the interpolated loss falls
fastest per token (ties to the lower layer index), so the solution uses the total exactly whenever
the layers can hold it. A guard compares the result with the best uniform assignment (every free
layer the same policy at the same budget), which can win only off the grid, and returns whichever
predicts less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import attrs
import torch

from polykv.solver import BudgetProblem, LayerChoice, Solution, Solver, check_feasible, options, uniform_solution


class KnapsackSolver(Solver):
    """Exact: minimise the summed calibrated loss under the total (polykv's default)."""

    name = "polykv"
    reads_losses = True
    description = "Chooses policy and budget per layer to minimise the calibrated loss under the total (exact DP)."

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        check_feasible(problem)
        chosen = _dynamic_programme(problem)
        chosen = hand_out_leftover(problem, chosen)
        solution = Solution(chosen, sum(c.loss for c in chosen), self.name)
        uniform = uniform_solution(problem)
        if uniform is not None and uniform.loss < solution.loss - 1e-12:
            return Solution(uniform.layers, uniform.loss, self.name, note=f"uniform {uniform.note} predicts less")
        return solution


#: Cells of one table of the programme (float64: 8 MiB), and cells updated over all layers and options
#: (about a second; the choices kept for the way back take 2 bytes a cell). Past either, tokens are
#: counted in coarser units, which bounds the solver's time and memory for any total.
MAX_CELLS, MAX_WORK = 2**20, 2**26


def _dynamic_programme(problem: BudgetProblem) -> list[LayerChoice]:
    """The least-loss choice per layer whose tokens fit the total (see the module docstring)."""
    chosen: list[LayerChoice | None] = [None] * len(problem.layers)
    free = []
    for index, layer in enumerate(problem.layers):
        if layer.fixed is not None:  # one option: a constant, not a decision
            chosen[index] = options(problem, layer)[0]
        else:
            free.append(index)
    room = problem.total - sum(c.tokens for c in chosen if c is not None)
    per_layer = [options(problem, problem.layers[i]) for i in free]
    best_alone = [min(found, key=lambda c: (c.loss, c.tokens)) for found in per_layer]
    if sum(c.tokens for c in best_alone) <= room:  # every layer's best fits (a total above the prompt): no trade
        picked = best_alone
    else:
        picked = _Units.chosen(problem, per_layer, room).solve(per_layer, room)
    for index, choice in zip(free, picked):
        chosen[index] = choice
    return chosen


@attrs.frozen
class _Units:
    """How the programme counts tokens: in units of ``size`` tokens.

    With ``apart`` (the exact unit, when the prompt length is not a multiple of it), the layers kept
    whole are counted in a dimension of their own, up to ``most_whole``, and their remainders settled
    at the end; otherwise a whole layer costs the prompt length rounded up to units. ``capacity``: the
    units the table spans (no more than the layers can use).
    """

    size: int
    apart: bool
    most_whole: int
    capacity: int
    prompt_length: int

    @classmethod
    def chosen(cls, problem: BudgetProblem, per_layer: list[list[LayerChoice]], room: int) -> _Units:
        """The finest units (the exact ones first) whose tables stay within MAX_CELLS and MAX_WORK."""
        budgets = [c.tokens for found in per_layer for c in found if not c.whole]
        size = exact = math.gcd(problem.step, *budgets) if budgets else problem.step
        while True:
            units = cls._of(problem, per_layer, room, size, exact=size == exact)
            cells = (units.most_whole + 1) * (units.capacity + 1)
            work = cells * sum(len(units.candidates(found)) for found in per_layer)
            if (cells <= MAX_CELLS and work <= MAX_WORK) or size >= problem.prompt_length:
                return units
            size *= 2

    @classmethod
    def _of(cls, problem: BudgetProblem, per_layer, room: int, size: int, *, exact: bool) -> _Units:
        apart = exact and problem.prompt_length % size != 0
        wholes = sum(any(c.whole for c in found) for found in per_layer)
        units = cls(size, apart, min(room // problem.prompt_length, wholes) if apart else 0, 0, problem.prompt_length)
        usable = sum(max(units.cost(c)[1] for c in found) for found in per_layer)
        return attrs.evolve(units, capacity=min(room // size, usable))

    def cost(self, choice: LayerChoice) -> tuple[int, int]:
        """(whole layers, units) a choice takes: a budget rounded up to units, so rounding never overspends."""
        if not choice.whole:
            return 0, -(-choice.tokens // self.size)
        if self.apart:
            return 1, self.prompt_length // self.size
        return 0, -(-self.prompt_length // self.size)

    def candidates(self, found: list[LayerChoice]) -> list[LayerChoice]:
        return _cheapest_per_cost([c for c in found if not c.whole], self.size) + [c for c in found if c.whole]

    def solve(self, per_layer: list[list[LayerChoice]], room: int) -> list[LayerChoice]:
        """The least-loss choice of every layer, by dynamic programming over these units."""
        shape = (self.most_whole + 1, self.capacity + 1)
        # best[k, c]: least loss of the layers so far with k of them whole (apart) and at most c units in the rest
        best = torch.full(shape, math.inf, dtype=torch.float64)
        best[0] = 0.0
        picks = []
        for found in per_layer:
            candidates = self.candidates(found)
            costs = [self.cost(choice) for choice in candidates]
            after = torch.full(shape, math.inf, dtype=torch.float64)
            pick = torch.zeros(shape, dtype=torch.int16)
            for row, (choice, (k, cost)) in enumerate(zip(candidates, costs)):
                if k > self.most_whole or cost > self.capacity:
                    continue
                offered = best[: shape[0] - k, : shape[1] - cost] + choice.loss
                better = offered < after[k:, cost:]  # strictly: ties go to the first, cheapest option
                after[k:, cost:][better] = offered[better]
                pick[k:, cost:][better] = row
            best = after
            picks.append((candidates, costs, pick))
        # With k layers whole (apart), their prompt lengths' remainders take k * rest tokens from the room.
        rest = self.prompt_length % self.size if self.apart else 0
        ends = [(k, min((room - k * rest) // self.size, self.capacity)) for k in range(shape[0]) if room >= k * rest]
        k, c = min(ends, key=lambda end: (float(best[end]), end[0]))
        if math.isinf(float(best[k, c])):  # rounding up to coarse units left nothing that fits: the cheapest do
            return [found[0] for found in per_layer]
        chosen = []
        for candidates, costs, pick in reversed(picks):
            row = int(pick[k, c])
            chosen.append(candidates[row])
            k, c = k - costs[row][0], c - costs[row][1]
        return chosen[::-1]


def _cheapest_per_cost(choices: list[LayerChoice], step: int) -> list[LayerChoice]:
    """Of the choices costing the same number of units, the one with the least loss (the first on ties)."""
    kept: dict[int, LayerChoice] = {}
    for choice in choices:
        unit = -(-choice.tokens // step)
        if unit not in kept or choice.loss < kept[unit].loss:
            kept[unit] = choice
    return [kept[unit] for unit in sorted(kept)]


def hand_out_leftover(problem: BudgetProblem, chosen: list[LayerChoice]) -> list[LayerChoice]:
    """Give the tokens the choices leave unused to compressed layers, where the loss falls fastest per token."""
    chosen = list(chosen)
    leftover = problem.total - sum(c.tokens for c in chosen)
    while leftover > 0:
        best_layer, best_gain, best_target = None, -math.inf, 0
        for index, choice in enumerate(chosen):
            layer = problem.layers[index]
            if choice.whole or layer.fixed is not None:
                continue
            ceiling = min(problem.prompt_length - 1, layer.max_budget or problem.prompt_length)
            target = min(_next_grid_point(problem.grid, choice.tokens, ceiling), choice.tokens + leftover)
            if target <= choice.tokens:
                continue
            gain = (choice.loss - layer.loss_at(choice.policy, target, problem.grid)) / (target - choice.tokens)
            if gain > best_gain:
                best_layer, best_gain, best_target = index, gain, target
        if best_layer is None:
            break
        old = chosen[best_layer]
        loss = problem.layers[best_layer].loss_at(old.policy, best_target, problem.grid)
        chosen[best_layer] = LayerChoice(old.policy, best_target, min(loss, old.loss))
        leftover -= best_target - old.tokens
    return chosen


def _next_grid_point(grid: Sequence[int], tokens: int, ceiling: int) -> int:
    for budget in grid:
        if budget > tokens:
            return min(budget, ceiling)
    return ceiling

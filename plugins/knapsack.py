"""polykv's own solver: routing and budgets as one multiple-choice knapsack, solved exactly on the grid.

Each layer picks one option (a policy at a grid budget, or staying whole); the options' tokens
must fit the total and their predicted losses add up. Dynamic programming over units of ``step``
tokens finds the minimum exactly: for every layer and every capacity, the best loss of the layers
so far, vectorised over capacities with torch (80 layers, 10 policies and 64 budgets take a few
tens of milliseconds).

Fixed layers are constants taken off the total first. The others are counted in units of
``step`` tokens (or of a smaller divisor of the grid's budgets), and the layers kept whole in a
dimension of their own, since a prompt length is rarely a multiple of the unit: so no choice is
lost to rounding and the unit stays coarse. Tokens the grid leaves over are then handed to
compressed layers one grid interval at a time, where
the interpolated loss falls fastest per token (ties to the lower layer index), so the solution uses
the total exactly whenever the layers can hold it. A guard compares the result with the best
uniform assignment (every free layer the same policy at the same budget), which can win only off
the grid, and returns whichever predicts less.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

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


def _dynamic_programme(problem: BudgetProblem) -> list[LayerChoice]:
    """The least-loss choice per layer whose tokens fit the total, exactly (see the module docstring)."""
    chosen: list[LayerChoice | None] = [None] * len(problem.layers)
    free = []
    for index, layer in enumerate(problem.layers):
        if layer.fixed is not None:  # one option: a constant, not a decision
            chosen[index] = options(problem, layer)[0]
        else:
            free.append(index)
    room = problem.total - sum(c.tokens for c in chosen if c is not None)
    per_layer = [options(problem, problem.layers[i]) for i in free]
    budgets = [c.tokens for found in per_layer for c in found if not c.whole]
    unit = math.gcd(problem.step, *budgets) if budgets else problem.step
    whole_units, whole_rest = divmod(problem.prompt_length, unit)
    most_whole = room // problem.prompt_length if any(c.whole for f in per_layer for c in f) else 0
    capacity = room // unit
    # best[k, c]: least loss of the layers so far with k of them whole and at most c units in the others
    best = torch.full((most_whole + 1, capacity + 1), math.inf, dtype=torch.float64)
    best[0] = 0.0
    picks = []
    for found in per_layer:
        compressed = _cheapest_per_cost([c for c in found if not c.whole], unit)
        whole = [c for c in found if c.whole]
        candidates = compressed + whole
        shifted = torch.full((len(candidates), most_whole + 1, capacity + 1), math.inf, dtype=torch.float64)
        costs = []
        for row, choice in enumerate(candidates):
            k, cost = (1, whole_units) if choice.whole else (0, choice.tokens // unit)
            costs.append((k, cost))
            if cost <= capacity:
                shifted[row, k:, cost:] = best[: most_whole + 1 - k, : capacity + 1 - cost] + choice.loss
        best, pick = shifted.min(dim=0)  # ties go to the first, cheapest option
        picks.append((candidates, costs, pick))
    # With k layers whole, their prompt lengths' remainders take k * whole_rest tokens from the room.
    ends = [(k, (room - k * whole_rest) // unit) for k in range(most_whole + 1) if room - k * whole_rest >= 0]
    k, c = min(ends, key=lambda end: (float(best[end[0], min(end[1], capacity)]), end[0]))
    c = min(c, capacity)
    for index, (candidates, costs, pick) in zip(reversed(free), reversed(picks)):
        row = int(pick[k, c])
        chosen[index] = candidates[row]
        k, c = k - costs[row][0], c - costs[row][1]
    return chosen


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

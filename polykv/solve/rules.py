"""Solvers by name, and the published allocation rules: uniform, PyramidKV's pyramid, CAKE's preference.

A rule shares the total out among the free layers by a fixed shape (equal, falling with depth, or
in proportion to a layer's attention statistics); within a layer it then routes to the policy the
problem's loss table predicts best at that budget (with one candidate policy: that one). Fixed
layers are counted first. Budgets are whole tokens that sum exactly to the total (largest
remainders get the odd tokens, ties to the lower layer), clamped to each layer's bounds.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Mapping, Sequence
from typing import ClassVar

from polykv.parameters import Configurable, parameter
from polykv.solve.problem import WHOLE, BudgetProblem, LayerChoice, LayerOptions, Solution, check_feasible


class Solver(Configurable, abc.ABC):
    """Turns a BudgetProblem into a Solution. Subclasses set ``name`` and ``description``, declare
    parameters with ``parameter`` (``solver pyramid(beta=20)`` sets them), and implement ``solve``.

    ``signals`` are per-layer measurements by name (``entropy``, ``variance``, ...), for rules
    that read them.
    """

    description: ClassVar[str]

    @abc.abstractmethod
    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        """Every layer's choice, summing to the total where the layers can hold it."""


class UniformSolver(Solver):
    """Every free layer the same budget: the baseline every published method compares against."""

    name = "uniform"
    description = "Shares the total equally among the layers the spec does not fix."

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        return allocate(problem, [1.0] * len(problem.layers), self.name)


class PyramidSolver(Solver):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069): budgets fall linearly with depth, same mean.

    Each layer keeps the observation ``window`` plus a share that runs from b_max at the first
    layer to b_min = (B - window) / ``beta`` at the last, with b_max = 2 (B - window) - b_min, B
    being the average budget: the paper's schedule, with its beta = 20.
    """

    name = "pyramid"
    description = "Budgets fall linearly with depth around the same mean (PyramidKV)."
    window: int = parameter(8, "tokens every layer keeps besides its share (the observation window)", min=0, max=4096)
    beta: float = parameter(20.0, "how far the last layer's share falls: (B - window) / beta", min=1.0, max=1000.0)

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        free = [i for i, layer in enumerate(problem.layers) if layer.fixed is None]
        average = _free_total(problem) / max(1, len(free))
        spread = max(0.0, average - self.window)
        low = spread / self.beta
        high = 2 * spread - low
        shares = [0.0] * len(problem.layers)
        for rank, index in enumerate(free):
            depth = rank / (len(free) - 1) if len(free) > 1 else 0.0
            shares[index] = self.window + high - depth * (high - low)
        return allocate(problem, shares, self.name)


class CakeSolver(Solver):
    """CAKE (Qin et al. 2025, arXiv 2503.12491): budgets in proportion to H^(1/tau1) * V^(1/tau2).

    H is the entropy of a layer's observation-window attention (spatial dispersion), V the variance
    of its tokens' attention across the window (temporal shift), both from calibration signals.
    The paper tunes the temperatures per model and budget (0.4 to 2.3); 1 and 1 are the untuned
    default.
    """

    name = "cake"
    description = "Budgets in proportion to attention entropy^(1/tau1) x variance^(1/tau2) (CAKE)."
    tau1: float = parameter(1.0, "temperature of the entropy (spatial dispersion)", min=0.01, max=100.0)
    tau2: float = parameter(1.0, "temperature of the variance (temporal shift)", min=0.01, max=100.0)

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        signals = signals or {}
        missing = [name for name in ("entropy", "variance") if name not in signals]
        if missing:
            raise ValueError(f"cake needs the {' and '.join(missing)} signal(s) of every layer (from a profile)")
        entropy, variance = signals["entropy"], signals["variance"]
        shares = [
            max(h, 1e-12) ** (1 / self.tau1) * max(v, 1e-12) ** (1 / self.tau2) for h, v in zip(entropy, variance)
        ]
        return allocate(problem, shares, self.name)


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
        if any(c is None for c in chosen):
            continue
        loss = sum(c.loss for c in chosen)
        if best is None or loss < best.loss:
            best = Solution(chosen, loss, "uniform", note=policy)
    return best


def _free_total(problem: BudgetProblem) -> int:
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
    remaining, open_layers = _free_total(problem), list(free)
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
    candidates = [_as(problem, layer, policy, budget) for policy in sorted(layer.losses)]
    candidates = [c for c in candidates if c is not None]
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
    policy, tokens = layer.fixed
    if tokens is None or tokens >= problem.prompt_length:
        return LayerChoice(policy, problem.prompt_length, 0.0, whole=True)
    return LayerChoice(policy, tokens, 0.0)

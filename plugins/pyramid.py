"""pyramid: budgets that fall linearly with depth (PyramidKV)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from polykv.parameters import parameter
from polykv.solver import BudgetProblem, Solution, Solver, allocate, free_total


class PyramidSolver(Solver):
    """PyramidKV (Cai et al. 2024, arXiv 2406.02069): budgets fall linearly with depth, same mean.

    Each layer keeps the observation ``window`` plus a share that runs from b_max at the first
    layer to b_min = (B - window) / ``beta`` at the last, with b_max = 2 (B - window) - b_min, B
    being the average budget: the paper's schedule, with its beta = 20.
    """

    name = "pyramid"
    description = "Budgets fall linearly with depth around the same mean (PyramidKV)."
    window: int = parameter(
        default=8, description="tokens every layer keeps besides its share (the observation window)", min=0, max=4096
    )
    beta: float = parameter(
        default=20.0, description="how far the last layer's share falls: (B - window) / beta", min=1.0, max=1000.0
    )

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        free = [i for i, layer in enumerate(problem.layers) if layer.fixed is None]
        average = free_total(problem) / max(1, len(free))
        spread = max(0.0, average - self.window)
        low = spread / self.beta
        high = 2 * spread - low
        shares = [0.0] * len(problem.layers)
        for rank, index in enumerate(free):
            depth = rank / (len(free) - 1) if len(free) > 1 else 0.0
            shares[index] = self.window + high - depth * (high - low)
        return allocate(problem, shares, self.name)

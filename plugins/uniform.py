"""uniform: every free layer the same budget."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from polykv.solver import BudgetProblem, Solution, Solver, allocate


class UniformSolver(Solver):
    """Every free layer the same budget: the baseline every published method compares against."""

    name = "uniform"
    description = "Shares the total equally among the layers the spec does not fix."

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        return allocate(problem, [1.0] * len(problem.layers), self.name)

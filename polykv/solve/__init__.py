"""Routing and budget solving: which policy and how many tokens each layer gets under one total.

``problem`` states the decision (per-layer options with their predicted losses, fixed layers, the
total); ``knapsack`` solves it exactly on the budget grid (polykv's own solver); ``rules`` holds
the published allocation rules (uniform, PyramidKV's pyramid, CAKE's preference scores), so an
experiment can swap them in by name.
"""

from polykv.solve.knapsack import KnapsackSolver
from polykv.solve.problem import BudgetProblem, InfeasibleError, LayerChoice, LayerOptions, Solution, monotone
from polykv.solve.rules import CakeSolver, PyramidSolver, Solver, UniformSolver

BUILTIN_SOLVERS: tuple[type[Solver], ...] = (KnapsackSolver, UniformSolver, PyramidSolver, CakeSolver)

__all__ = [
    "BUILTIN_SOLVERS",
    "BudgetProblem",
    "CakeSolver",
    "InfeasibleError",
    "KnapsackSolver",
    "LayerChoice",
    "LayerOptions",
    "PyramidSolver",
    "Solution",
    "Solver",
    "UniformSolver",
    "monotone",
]

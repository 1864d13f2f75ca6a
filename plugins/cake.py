"""cake: budgets from attention entropy and variance (CAKE)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from polykv.parameters import parameter
from polykv.solver import BudgetProblem, Solution, Solver, allocate


class CakeSolver(Solver):
    """CAKE (Qin et al. 2025, arXiv 2503.12491): budgets in proportion to H^(1/tau1) * V^(1/tau2).

    H is the entropy of a layer's observation-window attention (spatial dispersion), V the variance
    of its tokens' attention across the window (temporal shift), both from calibration signals.
    The paper tunes the temperatures per model and budget (0.4 to 2.3); 1 and 1 are the untuned
    default.
    """

    name = "cake"
    reads_signals = ("entropy", "variance")
    description = "Budgets in proportion to attention entropy^(1/tau1) x variance^(1/tau2) (CAKE)."
    tau1: float = parameter(
        default=1.0, description="temperature of the entropy (spatial dispersion)", min=0.01, max=100.0
    )
    tau2: float = parameter(
        default=1.0, description="temperature of the variance (temporal shift)", min=0.01, max=100.0
    )

    def solve(self, problem: BudgetProblem, signals: Mapping[str, Sequence[float]] | None = None) -> Solution:
        signals = signals or {}
        missing = [name for name in self.reads_signals if name not in signals]
        if missing:
            raise ValueError(f"cake needs the {' and '.join(missing)} signal(s) of every layer (from a profile)")
        entropy, variance = signals["entropy"], signals["variance"]
        shares = [
            max(h, 1e-12) ** (1 / self.tau1) * max(v, 1e-12) ** (1 / self.tau2) for h, v in zip(entropy, variance)
        ]
        return allocate(problem, shares, self.name)

"""How long polykv's exact solver takes on large instances (random losses, monotone in budget).

    python benchmarks/solver_speed.py

Prints a table and writes benchmarks/results/solver_speed_<machine>.json. Sizes: layers x
policies x budget steps, with a total of 512 tokens per layer on average; the prompt length is
either a multiple of the step (the solver counts in 16-token units) or not (it counts in tokens).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
from pathlib import Path

import torch.utils.benchmark as benchmark
from polykv_plugins.knapsack import KnapsackSolver

from polykv.solver import BudgetProblem, LayerOptions, monotone

RESULTS = Path(__file__).parent / "results"


def instance(layers: int, policies: int, steps: int, prompt: int, seed: int = 0) -> BudgetProblem:
    rng = random.Random(seed)
    grid = tuple(16 * (i + 1) for i in range(steps))
    options = []
    for _ in range(layers):
        losses = {f"p{p}": monotone([rng.random() / (i + 1) for i in range(steps)]) for p in range(policies)}
        options.append(LayerOptions(losses))
    return BudgetProblem(grid, options, total=layers * 512, prompt_length=prompt, step=16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    for layers, policies, steps, prompt in [
        (30, 4, 16, 1024),
        (30, 4, 16, 1027),
        (80, 10, 64, 32768),
        (80, 10, 64, 32771),
    ]:
        problem = instance(layers, policies, steps, prompt)
        timer = benchmark.Timer("solver.solve(problem)", globals={"solver": KnapsackSolver(), "problem": problem})
        measured = timer.blocked_autorange(min_run_time=2)
        rows.append(
            {
                "layers": layers,
                "policies": policies,
                "budget_steps": steps,
                "prompt_length": prompt,
                "median_seconds": measured.median,
                "runs": len(measured.times),
            }
        )
    print(f"{'layers':>6} {'policies':>8} {'steps':>5} {'prompt':>6} {'median':>9}")
    for row in rows:
        print(
            f"{row['layers']:>6} {row['policies']:>8} {row['budget_steps']:>5} {row['prompt_length']:>6} "
            f"{row['median_seconds'] * 1000:>7.1f}ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}-{platform.system().lower()}-cpu"
    path = args.out / f"solver_speed_{machine}.json"
    path.write_text(json.dumps({"machine": machine, "processor": platform.processor(), "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

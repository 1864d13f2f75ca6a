"""Which cheap per-layer signal predicts the measured effect of compressing a layer?

    python benchmarks/signal_correlation.py [--profile PROFILE.json]

Reads a calibration profile (default: the one shipped for the bundled model) and compares, across
layers, every signal with the measured loss: the KL of next-token distributions when only that
layer is compressed (task-balanced, one policy, one budget). Reported per budget: Spearman's rank
correlation over the layers, and how many of the 5 layers that lose most the signal also ranks in
its top 5. The output-deviation curve is also compared within each layer, over policies and
budgets, where it is meant to rank. Prints a table, writes benchmarks/results/signal_correlation.json
and a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from polykv.profile import Profile, default_profile

RESULTS = Path(__file__).parent / "results"
BUDGETS = (16, 32, 64, 128)
TOP = 5


def ranks(values: list[float]) -> torch.Tensor:
    """Ranks with ties averaged, as Spearman's coefficient needs."""
    x = torch.tensor(values, dtype=torch.float64)
    order = x.argsort()
    ranked = torch.empty_like(x)
    ranked[order] = torch.arange(len(x), dtype=torch.float64)
    for value in x.unique():
        tied = x == value
        ranked[tied] = ranked[tied].mean()
    return ranked


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm()).item()
    return (ra @ rb).item() / denominator if denominator else 0.0


def top_overlap(signal: list[float], loss: list[float]) -> int:
    def top(values):
        return set(sorted(range(len(values)), key=lambda i: -values[i])[:TOP])

    return len(top(signal) & top(loss))


def task_mean(per_task: dict[str, list]) -> list:
    """The task-balanced mean of per-task lists (nested lists averaged element-wise)."""
    stacked = torch.tensor([per_task[task] for task in sorted(per_task)], dtype=torch.float64)
    return stacked.mean(0).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, help="a calibration profile (default: the bundled model's)")
    parser.add_argument("--policy", default="pyramidkv", help="the policy whose losses are predicted")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    profile = Profile.load(args.profile) if args.profile else default_profile()
    policies = list(profile.policies)
    column = policies.index(args.policy)
    losses = task_mean({task: profile.losses[task] for task in profile.tasks})  # [layer][policy][budget]
    layers = len(losses)
    scalar = {name: task_mean(dict(values)) for name, values in profile.signals.items()}
    scalar["cake (entropy x variance)"] = [h * v for h, v in zip(scalar["entropy"], scalar["variance"])]
    scalar["depth (pyramid: earlier layers matter more)"] = [float(layers - i) for i in range(layers)]
    deviation = task_mean(dict(profile.curves["output_deviation"]))  # [layer][policy][budget]

    rows = []
    for budget in BUDGETS:
        g = list(profile.grid).index(budget)
        loss = [losses[layer][column][g] for layer in range(layers)]
        candidates = dict(scalar)
        candidates["output deviation at this budget"] = [deviation[layer][column][g] for layer in range(layers)]
        for name, values in candidates.items():
            rows.append(
                {
                    "signal": name,
                    "budget": budget,
                    "spearman": spearman(values, loss),
                    "top5": top_overlap(values, loss),
                }
            )
    within = [
        spearman(
            [deviation[layer][p][g] for p in range(len(policies)) for g in range(len(profile.grid))],
            [losses[layer][p][g] for p in range(len(policies)) for g in range(len(profile.grid))],
        )
        for layer in range(layers)
    ]
    within_median = sorted(within)[layers // 2]

    names = list(dict.fromkeys(row["signal"] for row in rows))
    print(f"profile: {profile.model.name}, {layers} layers, losses of {args.policy}, task-balanced")
    print(f"across layers: Spearman rho (top-{TOP} overlap) with the measured single-layer KL")
    print(f"{'signal':48}" + "".join(f"{'@' + str(b):>14}" for b in BUDGETS))
    for name in names:
        cells = [row for row in rows if row["signal"] == name]
        print(f"{name:48}" + "".join(f"{row['spearman']:>+9.2f} ({row['top5']}/{TOP})" for row in cells))
    print(f"within a layer (policies x budgets): output deviation vs KL, median rho {within_median:+.2f}")

    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "profile": profile.model.name,
        "profile_command": profile.settings.get("command"),
        "policy": args.policy,
        "across_layers": rows,
        "within_layer_spearman": within,
        "within_layer_median": within_median,
    }
    path = args.out / "signal_correlation.json"
    path.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {path}")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(BUDGETS)
    for i, budget in enumerate(BUDGETS):
        values = [next(r["spearman"] for r in rows if r["signal"] == n and r["budget"] == budget) for n in names]
        axis.bar([j + i * width for j in range(len(names))], values, width, label=f"@{budget}")
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], [n.split(" (")[0] for n in names], rotation=20)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_ylabel("Spearman rho with measured KL")
    axis.set_title("Across layers: which signal ranks the layers that lose most")
    axis.legend()
    figure.tight_layout()
    figure.savefig(args.out / "signal_correlation.png", dpi=120)
    print(f"wrote {args.out / 'signal_correlation.png'}")


if __name__ == "__main__":
    main()

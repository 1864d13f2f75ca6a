"""How far two `polykv eval` runs of the same samples differ, sample by sample (for example two devices).

    python benchmarks/compare_sweeps.py docs/results/sweep/results.jsonl docs/results/sweep-cpu-count4/results.jsonl

For every method, over the (task, format, seed, method, budget) records both runs hold: the median
absolute difference of the target's loss, the median relative difference of the KL, and how many
greedy answers agree. Prints a table and writes a JSON file beside the second run's results.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def records(path: Path) -> dict[tuple, dict]:
    rows = (json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return {(r["task"], r["format"], r["seed"], r["method"], r["budget"]): r for r in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    args = parser.parse_args()
    first, second = records(args.first), records(args.second)
    shared = sorted(set(first) & set(second), key=str)
    by_method: dict[str, list[tuple[float, float]]] = defaultdict(list)
    answers = agreeing = 0
    for key in shared:
        a, b = first[key], second[key]
        by_method[key[3]].append((abs(a["nll"] - b["nll"]), abs(a["kl"] - b["kl"]) / max(a["kl"], 1e-3)))
        if a.get("accuracy") is not None and b.get("accuracy") is not None:
            answers += 1
            agreeing += a["accuracy"] == b["accuracy"]
    rows = {
        method: {
            "records": len(pairs),
            "median_nll_difference": statistics.median(d for d, _ in pairs),
            "median_relative_kl_difference": statistics.median(r for _, r in pairs),
        }
        for method, pairs in by_method.items()
    }
    print(f"{len(shared)} shared records; answers agree on {agreeing} of {answers}")
    print(f"{'method':16} {'median |d NLL|':>15} {'median rel. d KL':>17}")
    for method, row in rows.items():
        print(f"{method:16} {row['median_nll_difference']:>15.4f} {row['median_relative_kl_difference']:>17.3f}")
    out = args.second.with_name("comparison.json")
    result = {"first": str(args.first), "second": str(args.second), "shared": len(shared)}
    result |= {"answers": answers, "agreeing": agreeing, "methods": rows}
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""polykv and NVIDIA kvpress side by side: a ``polykv eval`` run merged with benchmarks/kvpress_peer.py's records.

    python benchmarks/peer_comparison.py --polykv docs/results/sweep --kvpress benchmarks/results/peer

Both sides scored the same samples (benchmarks/peer_samples.py exports polykv's as token ids) at
the same average stored tokens per layer, in each setting: ``question`` (the question inside the
compressed prompt) and ``context`` (the context compressed first, the question asked after it).
Only the samples both sides hold are compared, per setting; each side's full cache is kept as a
check that both saw the same model (its loss and its accuracy must agree). Scores are aggregated
as ``polykv eval`` reports them (``polykv.evaluation.report.summary``: task-balanced KL to the full
cache, accuracy over the tasks with an answer to check).

Writes comparison.md, comparison.json and comparison.png (KL and accuracy against the budget per
setting, kvpress dashed) to ``--out`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from polykv.evaluation.report import FULL, summary
from polykv.evaluation.runner import SINGLES, read
from polykv.harness.scorer import Record
from polykv.values import SETTINGS

RESULTS = Path(__file__).parent / "results" / "peer"
#: How kvpress_peer.py names its methods and its full cache.
PEER = "kvpress-"
PEER_FULL = "kvpress-full"
TITLES = {
    "question": "Question inside the compressed prompt",
    "context": "Context compressed first, question asked after it",
}


def peer_records(folder: Path) -> list[Record]:
    """kvpress_peer.py's lines (kvpress-SETTING.jsonl) as polykv records; the fields polykv has no use for dropped."""
    fields = Record.__attrs_attrs__
    found = []
    for path in sorted(folder.glob(f"{PEER}*.jsonl")):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                data = json.loads(line)
                try:
                    found.append(Record(**{field.name: data[field.name] for field in fields if field.name in data}))
                except TypeError as error:
                    raise SystemExit(f"{path}:{number}: not a kvpress_peer.py result line ({error})") from None
    return found


def merged(ours: Sequence[Record], theirs: Sequence[Record], setting: str) -> tuple[list[Record], dict]:
    """Both sides' records of ``setting`` on the samples both hold, and how many each side had and kept."""
    mine = [r for r in ours if r.setting == setting]
    peer = [r for r in theirs if r.setting == setting]
    # A sample counts once both sides scored its full cache (each run writes it with the sample's first scores).
    common = {(r.task, r.format, r.seed) for r in mine if r.method == FULL}
    common &= {(r.task, r.format, r.seed) for r in peer if r.method == PEER_FULL}
    kept = [r for r in [*mine, *peer] if (r.task, r.format, r.seed) in common]
    counts = {
        "samples": len(common),
        "polykv_samples": len({(r.task, r.format, r.seed) for r in mine}),
        "kvpress_samples": len({(r.task, r.format, r.seed) for r in peer}),
        "tasks": sorted({f"{task}:{form}" for task, form, _ in common}),
    }
    return kept, counts


def compare(ours: Sequence[Record], theirs: Sequence[Record]) -> dict:
    """Per setting: polykv's summary of the merged records, the samples compared, and the best of each side."""
    found = {}
    for setting in SETTINGS:
        records, counts = merged(ours, theirs, setting)
        if not records:
            continue
        data = summary([r for r in records if r.method != PEER_FULL], resamples=0)
        data["table"] = {name: cell for name, cell in data["table"].items() if cell["samples"]}  # none: not run
        best = {}
        for budget in data["budgets"]:
            cell = {m: data["table"].get(f"{m}@{budget}") for m in data["methods"]}
            groups = {
                "polykv uniform": [m for m in cell if m in SINGLES],
                "polykv routed": [m for m in cell if not m.startswith(PEER) and m not in SINGLES and m != FULL],
                "kvpress": [m for m in cell if m.startswith(PEER) and m != PEER_FULL],
            }
            best[budget] = {
                name: min(present, key=lambda m: cell[m]["kl"])
                for name, methods in groups.items()
                if (present := [m for m in methods if cell[m]])
            }
        found[setting] = {
            **counts,
            "budgets": data["budgets"],
            "methods": data["methods"],
            "table": data["table"],
            "best": best,
            "full_check": full_check(records),
        }
    return found


def full_check(records: Sequence[Record], tolerance: float = 0.1) -> dict:
    """Both full caches on the shared samples: mean target loss and accuracy, and the samples whose losses differ
    by more than ``tolerance`` nats (the two sides did not score the same tokens, or not with the same model)."""
    check: dict = {}
    for name in (FULL, PEER_FULL):
        chosen = [r for r in records if r.method == name]
        graded = [r.accuracy for r in chosen if r.accuracy is not None]
        check[name] = {
            "nll": sum(r.nll for r in chosen) / len(chosen) if chosen else None,
            "accuracy": sum(graded) / len(graded) if graded else None,
        }
    losses = {
        name: {(r.task, r.format, r.seed): r.nll for r in records if r.method == name} for name in (FULL, PEER_FULL)
    }
    both = sorted(set(losses[FULL]) & set(losses[PEER_FULL]))
    differences = {key: abs(losses[FULL][key] - losses[PEER_FULL][key]) for key in both}
    check["largest_nll_difference"] = max(differences.values(), default=None)
    check["differing"] = [
        f"{task}:{form} seed {seed}" for (task, form, seed), d in differences.items() if d > tolerance
    ]
    return check


def markdown(comparison: dict) -> str:
    """One table per setting: every method's KL and accuracy per budget, the lowest KL of a budget in bold."""
    sections = []
    for setting, data in comparison.items():
        budgets, table = data["budgets"], data["table"]
        lines = [
            f"### {TITLES[setting]}",
            "",
            f"{data['samples']} samples ({', '.join(data['tasks'])}); KL task-balanced, accuracy over the tasks "
            "with an answer; budgets are average stored tokens per layer; lowest KL in bold.",
            "",
            "| method | "
            + " | ".join(f"KL @{b}" for b in budgets)
            + " | "
            + " | ".join(f"acc @{b}" for b in budgets)
            + " |",
            "| --- |" + " ---: |" * (2 * len(budgets)),
        ]
        lowest = {b: min((c["kl"] for _, c in _cells(data, b)), default=None) for b in budgets}
        for method in _ordered(data["methods"]):
            if method in (FULL, PEER_FULL):
                continue
            cells = [table.get(f"{method}@{b}") for b in budgets]
            kl = [_kl(c, lowest[b], data["samples"]) for c, b in zip(cells, budgets)]
            accuracy = [f"{c['accuracy']:.2f}" if c and c["accuracy"] is not None else "" for c in cells]
            lines.append(f"| {method} | " + " | ".join(kl) + " | " + " | ".join(accuracy) + " |")
        lines += ["", "Best by KL at each budget:", ""]
        groups = sorted({g for picks in data["best"].values() for g in picks})
        lines.append("| budget | " + " | ".join(groups) + " |")
        lines.append("| ---: |" + " --- |" * len(groups))
        for budget in budgets:
            picks = data["best"].get(budget) or data["best"].get(str(budget)) or {}
            row = []
            for group in groups:
                method = picks.get(group)
                cell = table.get(f"{method}@{budget}") if method else None
                accuracy = "" if not cell or cell["accuracy"] is None else f", acc {cell['accuracy']:.2f}"
                row.append(f"{method} (KL {cell['kl']:.3f}{accuracy})" if cell else "")
            lines.append(f"| {budget} | " + " | ".join(row) + " |")
        check = data["full_check"]
        fulls = [
            f"{name} loss {check[name]['nll']:.3f}"
            + ("" if check[name]["accuracy"] is None else f", accuracy {check[name]['accuracy']:.2f}")
            for name in (FULL, PEER_FULL)
            if check[name]["nll"] is not None
        ]
        largest = check["largest_nll_difference"]
        agree = "" if largest is None else f"; per sample the losses differ by at most {largest:.3f}"
        lines += ["", "Full caches, the same model on both sides: " + "; ".join(fulls) + agree + ".", ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def plot(comparison: dict, path: Path) -> Path | None:
    """KL and accuracy against the budget, one row per setting; kvpress dashed (None without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    everyone = dict.fromkeys(m for data in comparison.values() for m in _ordered(data["methods"]))
    colours = {m: plt.cm.tab20(n % 20) for n, m in enumerate(m for m in everyone if m not in (FULL, PEER_FULL))}
    figure, axes = plt.subplots(len(comparison), 2, figsize=(12, 4.5 * len(comparison)), squeeze=False)
    for row, (setting, data) in enumerate(comparison.items()):
        budgets, table = data["budgets"], data["table"]
        shown = [m for m in _ordered(data["methods"]) if m not in (FULL, PEER_FULL)]
        for method in shown:
            cells = [table.get(f"{method}@{b}") for b in budgets]
            look = {"linestyle": "--" if method.startswith(PEER) else "-", "color": colours[method]}
            kl = [c["kl"] if c else None for c in cells]
            axes[row][0].plot(budgets, kl, marker="o", markersize=3, label=method, **look)
            accuracy = [c["accuracy"] if c else None for c in cells]
            if any(a is not None for a in accuracy):
                axes[row][1].plot(budgets, accuracy, marker="o", markersize=3, label=method, **look)
        full = data["full_check"].get(FULL, {}).get("accuracy")
        if full is not None:
            axes[row][1].axhline(full, color="black", linewidth=1, label="full cache")
        for axis, label in zip(axes[row], ("KL(full || method), task-balanced", "accuracy")):
            if not axis.lines:  # no task with an answer to check
                axis.set_axis_off()
                continue
            axis.set_xscale("log", base=2)
            axis.set_xticks(budgets, [str(b) for b in budgets])
            axis.set_xlabel("average stored tokens per layer")
            axis.set_ylabel(label)
            axis.set_title(f"{TITLES[setting]} ({data['samples']} samples)", fontsize=9)
        axes[row][0].set_yscale("log")
        axes[row][0].legend(fontsize=6, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _ordered(methods: Sequence[str]) -> list[str]:
    """polykv's methods first, then kvpress's, each in the order they came."""
    return [m for m in methods if not m.startswith(PEER)] + [m for m in methods if m.startswith(PEER)]


def _cells(data: dict, budget: int):
    for method in data["methods"]:
        cell = data["table"].get(f"{method}@{budget}")
        if cell and method not in (FULL, PEER_FULL):
            yield method, cell


def _kl(cell: dict | None, lowest: float | None, samples: int) -> str:
    """A KL cell: bold where lowest, with the number of samples where the run did not score them all yet."""
    if not cell:
        return ""
    text = f"{cell['kl']:.3f}"
    text = f"**{text}**" if cell["kl"] == lowest else text
    return text if cell["samples"] == samples else f"{text} ({cell['samples']} samples)"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polykv", type=Path, required=True, help="a `polykv eval --out` folder (its results.jsonl)")
    parser.add_argument("--kvpress", type=Path, default=RESULTS, help="kvpress_peer.py's --out folder")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for comparison.md, .json and .png")
    args = parser.parse_args(argv)
    ours = read(args.polykv / "results.jsonl")
    theirs = peer_records(args.kvpress)
    if not ours or not theirs:
        missing = args.polykv / "results.jsonl" if not ours else args.kvpress / f"{PEER}*.jsonl"
        raise SystemExit(f"no results in {missing}")
    comparison = compare(ours, theirs)
    if not comparison:
        raise SystemExit("the two runs share no sample in any setting (same --count, --seed and --length?)")
    for setting, data in comparison.items():
        if data["full_check"]["differing"]:
            print(
                f"warning: {setting}: the full caches' losses differ on {', '.join(data['full_check']['differing'])}"
                " (not the same samples? compare --length and --seed)",
                file=sys.stderr,
            )
    text = markdown(comparison)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "comparison.md").write_text(text, encoding="utf-8")
    (args.out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n", encoding="utf-8")
    written = plot(comparison, args.out / "comparison.png")
    print(text)
    print(f"wrote {args.out / 'comparison.md'}, comparison.json" + (", comparison.png" if written else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

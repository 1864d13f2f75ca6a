"""The evaluation's report: tables of scores and gap recovery, and their plots.

Scores are task-balanced: each task weighs the same however many samples it has. "Best single"
at a budget is the uniform single policy with the lowest task-balanced KL on these very samples
(the strongest baseline); gap recovery is reported for every other method, with a bootstrap
confidence interval, overall and per task, so that losses show as well as wins.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from polykv.evaluation.runner import SINGLES
from polykv.evaluation.scoring import bootstrap_recovery
from polykv.files import writing
from polykv.harness.scorer import Record

FULL = "full"


def summary(records: Sequence[Record], *, resamples: int = 1000) -> dict:
    """Everything the report shows, as plain data (written as JSON beside the markdown)."""
    budgets = sorted({r.budget for r in records if r.method != FULL})
    methods = list(dict.fromkeys(r.method for r in records))
    tasks = sorted({(r.task, r.format) for r in records})
    table: dict = {}
    full_accuracy = {_sample(r): r.accuracy for r in records if r.method == FULL and r.accuracy is not None}
    for method in methods:
        for budget in [0] if method == FULL else budgets:
            chosen = [r for r in records if r.method == method and (method == FULL or r.budget == budget)]
            table[f"{method}@{budget}"] = _scores(chosen, tasks)
            if method != FULL:
                table[f"{method}@{budget}"]["agreement"] = _agreement(chosen, full_accuracy)
    recovery: dict = {}
    for budget in budgets:
        singles = [m for m in methods if m in SINGLES and _complete(records, m, budget, tasks)]
        if not singles:
            continue
        losses = {m: _per_sample(records, m, budget) for m in methods}
        best = min(singles, key=lambda m: _mean(losses[m]))
        recovery[budget] = {"best_single": best}
        for method in methods:
            if method in SINGLES or method == FULL or not losses[method]:
                continue
            point, low, high = bootstrap_recovery(losses, method, singles, FULL, resamples=resamples)
            per_task = {}
            for task in tasks:
                single = {m: _mean(_per_sample(records, m, budget, task)) for m in singles}
                best_here = min(single.values())
                full = _mean(_per_sample(records, FULL, budget, task))
                mine = _mean(_per_sample(records, method, budget, task))
                per_task["/".join(task)] = (best_here - mine) / (best_here - full) if best_here > full else math.nan
            recovery[budget][method] = {"recovery": point, "low": low, "high": high, "per_task": per_task}
    return {
        "budgets": budgets,
        "methods": methods,
        "tasks": ["/".join(t) for t in tasks],
        "table": table,
        "recovery": recovery,
    }


def markdown(data: dict) -> str:
    """The summary as markdown: KL and accuracy per method and budget, then gap recovery."""
    budgets, methods = data["budgets"], data["methods"]
    lines = [
        "| method | "
        + " | ".join(f"KL @{b}" for b in budgets)
        + " | "
        + " | ".join(f"acc @{b}" for b in budgets)
        + " |"
    ]
    lines.append("| --- |" + " ---: |" * (2 * len(budgets)))
    for method in methods:
        cells = [data["table"].get(f"{method}@{0 if method == FULL else b}") for b in budgets]
        kl = [f"{c['kl']:.4f}" if c else "" for c in cells]
        accuracy = [f"{c['accuracy']:.2f}" if c and c["accuracy"] is not None else "" for c in cells]
        lines.append(f"| {method} | " + " | ".join(kl) + " | " + " | ".join(accuracy) + " |")
    lines += _agreement_lines(data)
    others = _combined(methods)
    if not others:
        lines += ["", "No method but single policies and the full cache: no gap recovery to report."]
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "Gap recovery of the task-balanced KL, (best single - method) / (best single - full), 95% bootstrap interval:",
        "",
    ]
    lines.append("| budget | best single | " + " | ".join(others) + " |")
    lines.append("| ---: | --- |" + " ---: |" * len(others))
    for budget in budgets:
        found = data["recovery"].get(budget) or data["recovery"].get(str(budget))
        if not found:
            continue
        cells = []
        for method in methods:
            if method in SINGLES or method == FULL:
                continue
            cell = found.get(method)
            cells.append(f"{cell['recovery']:.2f} [{cell['low']:.2f}, {cell['high']:.2f}]" if cell else "")
        lines.append(f"| {budget} | {found['best_single']} | " + " | ".join(cells) + " |")
    lines += ["", "Gap recovery per task (negative: worse than the best single policy on that task):", ""]
    lines.append("| task | " + " | ".join(f"{m} @{b}" for m in others for b in budgets) + " |")
    lines.append("| --- |" + " ---: |" * (len(others) * len(budgets)))
    for task in data["tasks"]:
        row = []
        for method in others:
            for budget in budgets:
                found = (data["recovery"].get(budget) or data["recovery"].get(str(budget)) or {}).get(method)
                value = found["per_task"].get(task) if found else None
                row.append("" if value is None or math.isnan(value) else f"{value:.2f}")
        lines.append(f"| {task} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plots(data: dict, folder: Path, *, suffix: str = "") -> list[Path]:
    """score_vs_budget{suffix}.png, and recovery{suffix}.png where a method combines policies (single policies
    and the full cache have no gap recovery to draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets, written = data["budgets"], []
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in data["methods"]:
        if method == FULL:
            continue
        kl = [data["table"].get(f"{method}@{b}", {}).get("kl") for b in budgets]
        accuracy = [data["table"].get(f"{method}@{b}", {}).get("accuracy") for b in budgets]
        style = "-" if method not in SINGLES else "--"
        axes[0].plot(budgets, kl, style, marker="o", label=method)
        if all(a is not None for a in accuracy):
            axes[1].plot(budgets, accuracy, style, marker="o", label=method)
    full = data["table"].get(f"{FULL}@0")
    if full and full["accuracy"] is not None:
        axes[1].axhline(full["accuracy"], color="black", linewidth=1, label="full cache")
    for axis, label in zip(axes, ("KL(full || method), task-balanced", "accuracy (retrieval tasks)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("average budget per layer (tokens)")
        axis.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[1].legend(fontsize=7)
    figure.tight_layout()
    path = folder / f"score_vs_budget{suffix}.png"
    with writing(path):
        figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    others = _combined(data["methods"])
    if not others:
        return written
    figure, axis = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(others))
    for number, method in enumerate(others):
        xs: list[float] = []
        ys: list[float] = []
        errors: list[list[float]] = [[], []]
        for position, budget in enumerate(budgets):
            found = (data["recovery"].get(budget) or data["recovery"].get(str(budget)) or {}).get(method)
            if found:
                xs.append(position + number * width)
                ys.append(found["recovery"])
                errors[0].append(max(0.0, found["recovery"] - found["low"]))
                errors[1].append(max(0.0, found["high"] - found["recovery"]))
        axis.bar(xs, ys, width, yerr=errors, capsize=3, label=method)
    axis.axhline(0, color="black", linewidth=1)
    axis.set_xticks([p + width * (len(others) - 1) / 2 for p in range(len(budgets))], [str(b) for b in budgets])
    axis.set_xlabel("average budget per layer (tokens)")
    axis.set_ylabel("gap recovery (1 = full cache, 0 = best single)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    path = folder / f"recovery{suffix}.png"
    with writing(path):
        figure.savefig(path, dpi=120)
    plt.close(figure)
    written.append(path)
    return written


def _scores(records: Sequence[Record], tasks) -> dict:
    by_task = defaultdict(list)
    for record in records:
        by_task[(record.task, record.format)].append(record)
    present = [t for t in tasks if by_task[t]]
    kl = sum(_mean([r.kl for r in by_task[t]]) for t in present) / max(1, len(present))
    nll = sum(_mean([r.nll for r in by_task[t]]) for t in present) / max(1, len(present))
    graded = [t for t in present if by_task[t][0].accuracy is not None]
    accuracy = sum(_mean([r.accuracy for r in by_task[t]]) for t in graded) / len(graded) if graded else None
    return {
        "kl": kl,
        "nll": nll,
        "accuracy": accuracy,
        "stored": _mean([r.stored for r in records]),
        "samples": len(records),
        "per_task": {"/".join(t): {"kl": _mean([r.kl for r in by_task[t]])} for t in present},
    }


def _sample(record: Record) -> tuple:
    return (record.task, record.format, record.seed, record.setting)


def _agreement(records: Sequence[Record], full_accuracy: dict) -> dict | None:
    """How many graded answers score what the full cache's answer to the same sample scores: a compressed cache
    that departs from the full cache shows here even where its accuracy is the same (or, by luck, higher)."""
    pairs = [(r.accuracy, full_accuracy[_sample(r)]) for r in records if _sample(r) in full_accuracy]
    pairs = [(mine, full) for mine, full in pairs if mine is not None]
    if not pairs:
        return None
    return {"same": sum(mine == full for mine, full in pairs), "graded": len(pairs)}


def _agreement_lines(data: dict) -> list[str]:
    """The agreement table: per method and budget, graded answers scored as the full cache's (same / graded)."""
    budgets = data["budgets"]
    rows = []
    for method in (m for m in data["methods"] if m != FULL):
        cells = [(data["table"].get(f"{method}@{b}") or {}).get("agreement") for b in budgets]
        if any(cells):
            shown = [f"{c['same']} / {c['graded']}" if c else "" for c in cells]
            rows.append(f"| {method} | " + " | ".join(shown) + " |")
    if not rows:
        return []
    return [
        "",
        "Graded answers scored as the full cache's answer to the same sample (same / graded):",
        "",
        "| method | " + " | ".join(f"@{b}" for b in budgets) + " |",
        "| --- |" + " ---: |" * len(budgets),
        *rows,
    ]


def _per_sample(records: Sequence[Record], method: str, budget: int, task=None) -> list[float]:
    """Task-balanced per-sample KL in a fixed sample order (each task's samples weigh 1 / their count)."""
    chosen = sorted(
        (r for r in records if r.method == method and (method == FULL or r.budget == budget)),
        key=lambda r: (r.task, r.format, r.seed),
    )
    if task is not None:
        return [r.kl for r in chosen if (r.task, r.format) == task]
    counts: defaultdict[tuple[str, str], int] = defaultdict(int)
    for record in chosen:
        counts[(record.task, record.format)] += 1
    groups = len(counts)
    return [r.kl * len(chosen) / (counts[(r.task, r.format)] * groups) for r in chosen]


def _complete(records: Sequence[Record], method: str, budget: int, tasks) -> bool:
    present = {(r.task, r.format) for r in records if r.method == method and r.budget == budget}
    return present == set(tasks)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else math.nan


def _combined(methods: list[str]) -> list[str]:
    """The methods that are neither a single policy nor the full cache: those with a gap recovery."""
    return [method for method in methods if method not in SINGLES and method != FULL]

"""benchmarks/peer_comparison.py: polykv's and kvpress's records merged on the samples both sides scored."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "peer_comparison.py"


@pytest.fixture(scope="module")
def comparison():
    spec = importlib.util.spec_from_file_location("peer_comparison", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def line(task, seed, method, budget, kl, *, setting="question", nll=1.0, accuracy=None, **extra) -> dict:
    accuracy = None if task == "continue" else 1.0 if accuracy is None else accuracy  # continue has no answer
    return {
        "task": task,
        "format": "raw",
        "seed": seed,
        "method": method,
        "budget": budget,
        "kl": kl,
        "nll": nll,
        "accuracy": accuracy,
        "stored": float(budget),
        "setting": setting,
        **extra,
    }


def write(path: Path, lines) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")


@pytest.fixture
def runs(tmp_path):
    """polykv scored seeds 0-2 of two tasks in both settings, kvpress seeds 0-1."""
    ours, theirs = [], {"question": [], "context": []}
    for setting in ("question", "context"):
        for task in ("passkey", "continue"):
            for seed in range(3):
                ours.append(line(task, seed, "full", 0, 0.0, setting=setting))
                ours.append(line(task, seed, "tova", 64, 1.0 + seed + (task == "continue"), setting=setting))
                ours.append(line(task, seed, "polykv", 64, 0.5, setting=setting, accuracy=None if seed else 0.0))
                if seed < 2:
                    extra = {"allocated": 999.0, "answer": "x", "ratio": 0.9}
                    peer = [line(task, seed, "kvpress-full", 0, 0.0, setting=setting, nll=1.02, **extra)]
                    peer.append(line(task, seed, "kvpress-kvzip", 64, 0.8, setting=setting, accuracy=0.5, **extra))
                    theirs[setting] += peer
    write(tmp_path / "polykv" / "results.jsonl", ours)
    for setting, lines in theirs.items():
        write(tmp_path / "peer" / f"kvpress-{setting}.jsonl", lines)
    return tmp_path


def test_only_the_samples_both_sides_scored_are_compared(comparison, runs):
    from polykv.evaluation.runner import read

    found = comparison.compare(read(runs / "polykv" / "results.jsonl"), comparison.peer_records(runs / "peer"))
    assert list(found) == ["question", "context"]
    question = found["question"]
    assert (question["samples"], question["polykv_samples"], question["kvpress_samples"]) == (4, 6, 4)
    # Seed 2 is left out on polykv's side: tova's KL is task-balanced over seeds 0-1 only.
    assert question["table"]["tova@64"]["kl"] == pytest.approx(((1 + 2) / 2 + (2 + 3) / 2) / 2)
    assert question["table"]["kvpress-kvzip@64"]["kl"] == pytest.approx(0.8)
    assert question["table"]["kvpress-kvzip@64"]["accuracy"] == pytest.approx(0.5)  # continue has no answer
    assert question["best"][64] == {"polykv uniform": "tova", "polykv routed": "polykv", "kvpress": "kvpress-kvzip"}
    assert "kvpress-full@0" not in question["table"] and question["budgets"] == [64]
    check = question["full_check"]
    assert check["kvpress-full"]["nll"] == pytest.approx(1.02)
    assert check["largest_nll_difference"] == pytest.approx(0.02) and check["differing"] == []


def test_the_report_is_written_and_flags_full_caches_that_disagree(comparison, runs, capsys):
    path = runs / "peer" / "kvpress-context.jsonl"
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    for x in lines:
        if x["method"] == "kvpress-full" and x["seed"] == 1:
            x["nll"] = 3.0  # not the same tokens
    write(path, lines)
    assert comparison.main(["--polykv", str(runs / "polykv"), "--kvpress", str(runs / "peer"), "--out", str(runs)]) == 0
    printed = capsys.readouterr()
    assert "context: the full caches' losses differ on continue:raw seed 1, passkey:raw seed 1" in printed.err
    text = (runs / "comparison.md").read_text()
    assert "### Question inside the compressed prompt" in text and "### Context compressed first" in text
    assert "| polykv | **0.500** |" in text and "| kvpress-kvzip | 0.800 |" in text
    assert json.loads((runs / "comparison.json").read_text())["context"]["full_check"]["differing"]
    assert (runs / "comparison.png").stat().st_size > 0

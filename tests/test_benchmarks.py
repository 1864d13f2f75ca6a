"""The GPU benchmark scripts, run on the CPU with small sizes (a tiny random model where the script's
numbers do not depend on the model's answers, the bundled model where they do): they must keep working
where there is no GPU to try them on (no timings are asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import requires_real_model

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"
SMALL = ["--model", "tiny", "--length", "520", "--steps", "1", "--repeats", "1", "--batches", "1,2"]


def run(script: str, *args: str, out: Path) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (written,) = out.glob("*.json")
    return json.loads(written.read_text())


def test_gpu_speed_runs_on_the_cpu(tmp_path):
    result = run("gpu_speed.py", *SMALL, "--lengths", "520", out=tmp_path)
    rows = [row["row"] for row in result["rows"]]
    assert rows == [
        "prefill snapkv@512, 520 tokens",
        "prefill h2o@512, 520 tokens",
        "decode snapkv@512, batch 1, 520 tokens",
        "decode snapkv@512, batch 2, 520 tokens",
        "decode with streaming@520 eviction vs without, batch 1, 520 tokens",
    ]
    for row in result["rows"]:
        for key, value in row.items():
            if key.endswith("gpu_ms"):
                assert value is None  # GPU time is measured with CUDA events, on CUDA only
            elif key.endswith(("_s", "_ms")):
                assert value > 0


def test_gpu_decode_runs_on_the_cpu(tmp_path):
    result = run("gpu_decode.py", *SMALL, out=tmp_path)
    assert [row["batch"] for row in result["decode"]] == [1, 2]
    for row in result["decode"]:
        # The compressed static step attends fewer bytes than the full cache's.
        assert row["snapkv@512"]["cache_bytes"] < row["full"]["cache_bytes"]
        assert row["snapkv@512"]["bound_ms"] < row["full"]["bound_ms"]
    assert [(row["batch"], row["cache"]) for row in result["compiled_step"]] == [
        (batch, cache) for batch in (1, 2) for cache in ("full", "snapkv@512")
    ]
    # model.generate's steps with transformers' caches and a polykv one, beside polykv's compiled static step.
    assert [row["batch"] for row in result["generate"]] == [1, 2]
    for row in result["generate"]:
        assert all(row[key] > 0 for key in row if key.endswith("_ms"))
    for row in result["compiled_step"]:
        assert row["compiled"]["cache_bytes"] == row["eager"]["cache_bytes"]
    assert result["largest_batch"] == []  # CUDA only


def test_heads_runs_on_the_cpu(tmp_path):
    result = run("heads.py", *SMALL, "--average", "64", out=tmp_path)
    assert [(row["batch"], row["plan"]) for row in result["rows"]] == [
        (1, "uniform"), (1, "ragged"), (2, "uniform"), (2, "ragged")
    ]  # fmt: skip
    for row in result["rows"]:
        assert abs(row["over_budgets"]) <= 0.02  # a ragged layer stores the sum of its heads' budgets
        assert abs(row["over_uniform"]) <= 0.02 and row["ms_per_token"] > 0 and row["static_ms_per_token"] > 0


@requires_real_model
def test_calibration_cost_runs_on_the_cpu(tmp_path):
    result = run("calibration_cost.py", "--quick", "--prompts", "4", out=tmp_path)
    batch = result["batch_s"]
    assert batch["measured"] > 0 and batch["extrapolated"] > 0
    assert result["profile"]["entries"] == 7 * 4 * len(result["meta"]["policies"]) * len(result["meta"]["grid"])
    by_processes = result["profile"]["seconds_by_processes"]
    assert by_processes["2"] < by_processes["1"]  # sharing the batches: each process measures half


def test_h2o_prefill_says_it_needs_a_gpu(tmp_path):
    """The per-kernel H2O breakdown times CUDA kernels only: without a GPU it says so and writes nothing."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the script would time it")
    script = str(BENCHMARKS / "h2o_prefill.py")
    done = subprocess.run([sys.executable, script, "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "h2o_prefill.py times CUDA kernels: run it on a GPU" in done.stderr
    assert not list(tmp_path.iterdir())


def test_calibration_cost_times_a_whole_profile(tmp_path):
    """``--whole`` calibrates for real (the tiny model on the CPU here) and keeps the time and the profile."""
    command = [sys.executable, str(BENCHMARKS / "calibration_cost.py"), "--quick", "--whole", "--prompts", "1"]
    done = subprocess.run([*command, "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "calibration_whole_quick_1p.json").read_text())
    assert result["processes"] == 1 and result["seconds"] > 0 and result["prompts_per_task"] == 1
    profile = json.loads((tmp_path / "calibration_whole_quick_1p.profile.json").read_text())
    assert profile["losses"] and profile["regimes"]  # measured and tuned


@requires_real_model
@pytest.mark.parametrize(
    "precision",
    [["--draft-tf32"], ["--draft-dtype", "bfloat16"]],  # TF32 changes no product on the CPU: its path runs
)
def test_speculation_runs_on_the_cpu(tmp_path, precision):
    result = run(
        "speculation.py",
        "--quick",
        "--length",
        "160",
        "--batches",
        "1",
        "--lookaheads",
        "2",
        "--new-tokens",
        "6",
        "--step-costs",
        "--profile-checks",
        *precision,
        out=tmp_path,
    )
    assert set(result["rows"][0]["step_costs"]) == {"full 1", "draft 1", "draft 2", "full 3"}
    drafts = [(row["spec"], row["lookahead"]) for row in result["rows"]]
    assert drafts == [
        ("plain", 0),
        ("*: streaming@64", 2),
        ("budget 64; *: auto@auto", 2),
        ("budget 64; *: auto@auto [acceptance]", 2),
    ]
    for row in result["rows"][1:]:
        assert row["rows_equal"] == 1.0 and 0 <= row["row_acceptance"] <= 1
        assert row["draft_cache_bytes"] < row["full_cache_bytes"]
        assert row["check_ms"] > 0 and row["predicted_check_ms"] > 0  # a check's wall time beside its steps'
        assert row["checks"] >= row["row_checks"] and row["idle_checks"] == 0  # the batch waits for its last row
        # A check is a draft forward (lookahead 2: one of two tokens, one of one), the full cache's, and the rest.
        kernels = row["check_kernels"]["count"]
        assert set(kernels) == {"polykv: draft forward", "polykv: full cache forward", "the rest"}
        assert kernels["polykv: draft forward"] > kernels["polykv: full cache forward"] > kernels["the rest"] > 0
        for region, named in row["check_kernels"]["kernels"].items():  # the most frequent first, at most 40
            counts = [count for _, count, _ in named]
            assert 0 < len(named) <= 40 and counts == sorted(counts, reverse=True) and sum(counts) <= kernels[region]
        assert "aten::linear" in {name for name, _, _ in row["check_kernels"]["kernels"]["polykv: full cache forward"]}


def test_speculation_combines_kept_results_into_the_8b_shapes_speedups(tmp_path):
    """The 8B shape's speed-up is its kept step costs at the bundled model's kept tokens per check."""
    rows = [{"batch": 32, "spec": "plain"}, {"batch": 32, "spec": "d", "lookahead": 3, "tokens_per_check": 3.5}]
    costs = {"32": {"full 1": 50.0, "draft 1": 10.0, "draft 2": 11.0, "full 4": 52.0}}
    (tmp_path / "bundled.json").write_text(json.dumps({"machine": "gpu", "rows": rows}))
    (tmp_path / "shape.json").write_text(json.dumps({"shape": {"costs": costs}}))
    command = [sys.executable, str(BENCHMARKS / "speculation.py"), "--combine", "bundled.json", "shape.json"]
    subprocess.run([*command, "--out", str(tmp_path)], cwd=tmp_path, check=True, capture_output=True)
    [speedup] = json.loads((tmp_path / "speculation_gpu_8b-speedup.json").read_text())["speedups"]
    assert speedup["check_ms"] == 11.0 + 2 * 10.0 + 52.0 and speedup["speedup"] == pytest.approx(3.5 * 50.0 / 83.0)


@pytest.mark.parametrize("freeze", [False, True], ids=["as-it-is", "weights-frozen"])
def test_step_kernels_runs_on_the_cpu_and_reprints_its_table(tmp_path, freeze):
    options = ["--model", "tiny", "--length", "520", "--batch", "2", "--steps", "2"] + (["--freeze"] if freeze else [])
    result = run("step_kernels.py", *options, out=tmp_path)
    assert result["freeze"] is freeze
    assert [(row["spec"], row["compiled"]) for row in result["rows"]] == [
        (spec, compiled) for spec in ("*: full", "*: streaming@256") for compiled in (False, True)
    ]
    for eager, compiled in zip(result["rows"][::2], result["rows"][1::2]):
        # Compiled, the model's side runs fewer operators (inductor's fused kernels are not aten operators).
        assert compiled["kernels_per_step"]["model"] < eager["kernels_per_step"]["model"]
    (written,) = tmp_path.glob("*.json")
    table = subprocess.run(
        [sys.executable, str(BENCHMARKS / "step_kernels.py"), "--table", str(written)],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert table.count("\n| `*: ") == 4 and "operators (CPU) per step" in table

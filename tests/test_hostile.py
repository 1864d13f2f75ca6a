"""Issue 19's hostile inputs: each ends in a clear error (or the right result), quickly and within a memory limit.

One test per group of the issue: specs at and past the limits of polykv.limits, output that cannot be
written, model configurations, commands against a model's positions, misdeclared plugins. The budget
solver's bound is tested in test_solve.py, static decoding's in test_static_decoding.py, damaged
profiles and misbehaving policies in test_cache_contract.py. benchmarks/hostile_inputs.py runs them
all as a user would, with their time and memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import tiny_llama

import polykv
from polykv import limits
from polykv.cli import main
from polykv.language.check import check_text
from polykv.language.diagnostics import SpecError
from polykv.limits import MAX_LAYERS, MAX_NUMBER_DIGITS, MAX_STATEMENTS, MAX_TOKENS

pytestmark = pytest.mark.memory_limit(1024)

EVERY_LAYER = ",".join(str(i) for i in range(30))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model layers 1000000000\n*: full", f"models of up to {MAX_LAYERS:,} layers, not 1000000000"),
        ("model layers 123456789012345678901234567890\n*: full", f"models of up to {MAX_LAYERS:,} layers"),
        ("layers 0-100000000: full", "layer 100000000 does not exist"),
        (f"layers 0: snapkv@{'9' * 5000}", f"a whole number of 5,000 digits is too long.*{MAX_NUMBER_DIGITS} digits"),
        (f"prefill <= {'9' * 5000}x\n*: full", "a whole number of 5,000 digits is too long"),
        (f"prefill <= {'9' * 400}.5x\n*: full", r"the factor 9999999999\.\.\.99.5x is too large"),
        ("prefill <= 1e400x\n*: full", "unexpected number 1e400; expected a multiple of the full cache's cost"),
        (f"budget {'9' * 400}%\n*: full", "a whole number of 400 digits is too long"),
        ("model layers 30\n" + f"layers {EVERY_LAYER}: full\n" * 8_000, f"at most {MAX_TOKENS:,} words.*496,003"),
        ("layers " + "0," * 2_000_000 + "0: full", f"at most {MAX_TOKENS:,} words"),
        ("layers 0: full; " * 500_000, f"at most {MAX_STATEMENTS:,} statements.*500,000"),
        ("layers 0: nosuchpolicy@8\n" * 20_000, f"at most {MAX_STATEMENTS:,} statements"),
        ("layers 0: @@\n" * 100_000, f"at most {MAX_STATEMENTS:,} statements"),
        ("layers 0: @@\n" * 5_000, "stopped after 50 syntax errors"),
        ("model layers 30\n" + f"layers {EVERY_LAYER}: full\n" * 1_000, "already given a policy"),
    ],
    ids=lambda value: value[:24] if isinstance(value, str) else None,
)
def test_a_hostile_spec_is_one_clear_error_in_seconds(text, message):
    started = time.perf_counter()
    with pytest.raises(SpecError, match=message) as raised:
        check_text(text, "hostile.pkv", layers=30 if text.startswith("layers 0-1000") else None)
    assert time.perf_counter() - started < 30
    assert len(raised.value.diagnostics) <= 101  # the rest are counted, not listed


@pytest.mark.slow
@pytest.mark.heavy  # 6 s; the token limit's refusal runs in the quick tier
def test_a_spec_at_the_token_limit_is_checked():
    text = "layers " + ",".join(["0"] * (MAX_TOKENS // 2 - 10)) + ": full\n"
    with pytest.raises(SpecError, match="layer 0 is already given a policy earlier in this statement") as raised:
        check_text(text, "near.pkv", layers=30)
    assert "more errors like these" in str(raised.value)


def test_a_prefill_limit_past_floats_is_an_argument_error():
    with pytest.raises(polykv.ArgumentError, match="prefill_limit is a finite number, got 1000000000"):
        polykv.compile("*: full", tiny_llama(), prefill_limit=10**400)


@pytest.mark.parametrize(
    ("shell", "status", "output"),
    [
        ("validate --layers 30 SPEC | head -c 5", 0, ""),
        ("validate --json --layers 30 SPEC | head -c 5", 0, ""),
        ("validate --layers 30 SPEC > /dev/full", 1, "polykv: error: cannot write to standard output"),
        ("validate - <&-", 1, "<stdin>: cannot read"),
    ],
)
def test_output_and_input_that_cannot_be_used_are_user_errors(tmp_path, shell, status, output):
    spec = tmp_path / "spec.pkv"
    spec.write_text("layers 0-1: full\n*: snapkv@256\n")
    command = f'{sys.executable} -m polykv {shell.replace("SPEC", str(spec))}; echo "status ${{PIPESTATUS[0]}}"'
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "internal error" not in done.stderr
    assert output in done.stderr
    # A closed pipe ends quietly with the conventional status (128 + SIGPIPE), or 0 when all was written.
    expected = {status, 141} if "head" in shell else {status}
    assert int(done.stdout.split("status ")[-1]) in expected


@pytest.mark.parametrize("layers", [10**9, 0, -3, "30", None, 1.5])
def test_a_model_configuration_with_a_hostile_layer_count_is_refused_before_loading(tmp_path, capsys, layers):
    folder = tmp_path / "model"
    folder.mkdir()
    config = {"model_type": "llama", "num_hidden_layers": layers, "hidden_size": 64, "vocab_size": 100}
    (folder / "config.json").write_text(json.dumps(config))
    spec = tmp_path / "spec.pkv"
    spec.write_text("*: full\n")
    assert main(["validate", "--model", str(folder), str(spec)]) == 1
    err = capsys.readouterr().err
    assert "num_hidden_layers" in err and "Traceback" not in err


def test_an_endless_prompt_file_is_refused_before_the_model_loads(capsys):
    assert main(["generate", "--spec", "*: full", "--prompt-file", "/dev/zero", "--model", "/nonexistent"]) == 1
    assert "/dev/zero: cannot read: larger than 64 MiB, too large for a prompt" in capsys.readouterr().err


def test_a_parameter_bound_must_be_a_number():
    for bound in ["a", float("nan"), True]:
        with pytest.raises(TypeError, match="x: min is a finite number or None"):

            class Odd(polykv.ScoringPolicy):
                name = "odd"
                description = "declares a bound that is no number"
                x: int = polykv.parameter(3, "x", min=bound)


# --- commands against a small model's positions ----------------------------------------------------------


def test_commands_check_sizes_against_the_models_positions(small_model, tmp_path, capsys):
    model = ["--model", small_model, "--device", "cpu"]
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("the quick brown fox jumps over the lazy dog. " * 466_000)  # 20 MB
    cases = [
        (["generate", *model, "--spec", "*: full", "--prompt-file", str(prompt)], "need 655,3"),
        (
            ["generate", *model, "--spec", "*: full", "--prompt", "hi", "--max-new-tokens", "100000"],
            "the model has 512",
        ),
        (["calibrate", *model, "--out", str(tmp_path / "p.json"), "--length", "1000000"], "the model has 512"),
        (
            ["eval", *model, "--methods", "full", "--length", "64", "--data", "/dev/zero", "--out", str(tmp_path)],
            "/dev/zero: cannot read: larger than 256 MiB",
        ),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (argv, err)


def test_outputs_that_would_overwrite_or_cannot_be_made_are_refused_before_work(small_model, tmp_path, capsys):
    existing = tmp_path / "existing.txt"
    existing.write_text("keep me\n")
    model = ["--model", small_model, "--device", "cpu"]
    assert main(["calibrate", *model, "--out", str(tmp_path)]) == 1
    assert "is a folder; name the file to write" in capsys.readouterr().err
    assert main(["eval", *model, "--quick", "--out", str(existing)]) == 1
    assert "exists and is not a folder" in capsys.readouterr().err
    assert main(["plan", "*: snapkv@64", *model, "--png", str(existing)]) == 1
    assert f"--png {existing}: writes a .png file; name it so, such as {tmp_path / 'existing.png'}" in (
        capsys.readouterr().err
    )
    assert main(["plan", "*: snapkv@64", *model, "--png", str(tmp_path)]) == 1
    assert f"is a folder; name the file to write, such as {tmp_path / 'plan.png'}" in capsys.readouterr().err
    assert existing.read_text() == "keep me\n"


def test_the_limits_page_lists_every_bound_with_its_value():
    page = (Path(__file__).parent.parent / "docs" / "limits.md").read_text()
    for name, value in vars(limits).items():
        if name.isupper():
            shown = f"{value // 2**20} MiB" if name.endswith("_BYTES") and value >= 2**20 else f"{value:,}"
            assert f"`{name}`" in page and f"| {shown} |" in page, name


def test_calibrate_takes_the_generated_tasks_it_is_given(small_model, tmp_path, capsys):
    model = ["--model", small_model, "--device", "cpu"]
    out = ["--out", str(tmp_path / "p.json")]
    assert main(["calibrate", *model, *out, "--tasks", "continue", "--data", "x.jsonl"]) == 1
    assert "--tasks picks generated tasks and --data brings samples" in capsys.readouterr().err
    assert main(["calibrate", *model, *out, "--tasks", "summarise"]) == 1
    assert "--tasks summarise: tasks are " in capsys.readouterr().err
    small = ["--samples", "1", "--tune-samples", "0", "--length", "96", "--policies", "streaming", "--grid", "16"]
    assert main(["calibrate", *model, *out, *small, "--tasks", "continue", "copy", "--objective", "acceptance"]) == 0
    profile = polykv.Profile.load(tmp_path / "p.json")
    assert profile.tasks == ("continue:raw", "copy:raw") and profile.objective == "acceptance"

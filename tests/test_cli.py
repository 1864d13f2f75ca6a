"""The polykv command: validate, fmt, policies; exit codes, JSON, standard input, and no tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import polykv
from polykv.cli import main

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.pkv"))


@pytest.fixture
def spec_file(tmp_path):
    def write(text: str, name: str = "spec.pkv") -> str:
        path = tmp_path / name
        path.write_text(text)
        return str(path)

    return write


def test_examples_are_valid_and_documented(capsys):
    assert len(EXAMPLES) >= 3
    assert main(["validate", *map(str, EXAMPLES)]) == 0
    for example in EXAMPLES:
        assert example.read_text().startswith("# When to use:"), example


def test_validate_prints_a_per_layer_summary(spec_file, capsys):
    path = spec_file("budget 64\nlayers 0-1: full\nlayers 2: streaming@32(sink=2) decode tova@48\n*: knorm@10%\n")
    assert main(["validate", path, "--layers", "5"]) == 0
    out = capsys.readouterr().out
    assert out == (
        f"{path}: ok (5 layers)\n"
        "  budget 64  # tokens per layer on average, 320 in all\n"
        "  layers 0-1: full\n"
        "  layers 2: streaming@32(sink=2) decode tova@48(per_head=false)\n"
        "  layers 3-4: knorm@10%\n"
    )
    # What validate prints is itself a spec, and it says the same as the one it checked.
    printed = "\n".join(line.strip() for line in out.splitlines()[1:])
    assert polykv.check(polykv.parse(printed), layers=5).layers == polykv.check(polykv.load(path), layers=5).layers


def test_validate_without_a_layer_count_summarises_rules(spec_file, capsys):
    path = spec_file("layers 0: full\n*: snapkv@256\n")
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert '  layers *: snapkv@256(window=32, kernel=7, pooling="max")' in out
    assert "(layer count unknown: give --layers N or --model MODEL to check coverage and ranges)" in out


def test_validate_reports_every_error_and_exits_1(spec_file, capsys):
    path = spec_file("layers 0: snapvk@64\nlayers 1 full\n")
    assert main(["validate", path]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{path}:1:11: error: unknown policy 'snapvk'\n"
        "    1 | layers 0: snapvk@64\n"
        "      |           ^^^^^^\n"
        "  hint: did you mean 'snapkv'?\n"
        "\n"
        f"{path}:2:10: error: unexpected name 'full'; expected `:`, `,`, `heads` or `-`\n"
        "    2 | layers 1 full\n"
        "      |          ^^^^\n"
        "  hint: put `:` between the layers and the policy, as in `layers 0-3: snapkv@256`\n"
        "\n"
        "2 errors in spec\n"
    )


def test_validate_checks_every_file_and_fails_if_one_fails(spec_file, capsys):
    good = spec_file("*: full", "good.pkv")
    bad = spec_file("*: nope@3", "bad.pkv")
    assert main(["validate", good, bad]) == 1
    captured = capsys.readouterr()
    assert f"{good}: ok" in captured.out and f"{bad}:1:4: error: unknown policy 'nope'" in captured.err


def test_validate_reads_standard_input(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("layers 0: full; 1: snapkv@\n"))
    assert main(["validate", "-"]) == 1
    assert capsys.readouterr().err.startswith("<stdin>:1:27: error: unexpected end of line")


def test_validate_json(spec_file, capsys):
    good = spec_file("layers 0: full\n*: streaming@8 decode streaming@16\n", "good.pkv")
    bad = spec_file("*: knorm@0\n", "bad.pkv")
    assert main(["validate", good, bad, "--layers", "2", "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is False
    first, second = result["files"]
    assert first["ok"] and first["layer_count"] == 2 and first["budget"] is None
    assert first["layers"][1] == {
        "layer": 1,
        "prefill": {
            "policy": "streaming",
            "params": {"sink": 4},
            "budget": {"tokens": 8},
            "candidates": [],
            "text": "streaming@8(sink=4)",
        },
        "decode": {
            "policy": "streaming",
            "params": {"sink": 4},
            "budget": {"tokens": 16},
            "candidates": [],
            "text": "streaming@16(sink=4)",
        },
    }
    assert second["errors"] == [
        {
            "code": "budget-too-small",
            "message": "a budget of 0 keeps nothing",
            "hint": "give at least 1 token",
            "file": bad,
            "line": 1,
            "column": 10,
            "end_line": 1,
            "end_column": 11,
            "notes": [],
        }
    ]


def test_validate_of_a_missing_file_still_checks_the_others(spec_file, capsys):
    good = spec_file("*: full", "good.pkv")
    assert main(["validate", "does-not-exist.pkv", good, "nor-this"]) == 1
    captured = capsys.readouterr()
    assert "error: does-not-exist.pkv: cannot read: No such file or directory" in captured.err
    assert "error: nor-this: cannot read: No such file or directory" in captured.err
    assert f"{good}: ok" in captured.out


def test_unreadable_inputs_are_named_and_bounded(tmp_path, capsys):
    assert main(["validate", str(tmp_path)]) == 1
    assert f"{tmp_path}: cannot read: Is a directory" in capsys.readouterr().err
    assert main(["validate", "/dev/zero"]) == 1  # endless input: refused, not read to the end
    assert "/dev/zero: cannot read: larger than 8 MiB, too large for a spec" in capsys.readouterr().err
    binary = tmp_path / "binary.pkv"
    binary.write_bytes(b"layers 0: full\xff\xfe\n")
    assert main(["validate", str(binary)]) == 1
    assert "binary.pkv: cannot read: not UTF-8 text (byte 14)" in capsys.readouterr().err


def test_a_byte_order_mark_is_accepted(tmp_path, capsys):
    path = tmp_path / "bom.pkv"
    path.write_bytes("\ufefflayers *: full\n".encode())
    assert main(["validate", str(path)]) == 0
    assert main(["fmt", str(path)]) == 0
    assert capsys.readouterr().out.endswith("layers *: full\n")


def test_a_syntax_error_is_not_preceded_by_coverage_errors(spec_file, capsys):
    path = spec_file("layers 0: full\nlayers 1-2 snapkv@8\n")
    assert main(["validate", path, "--layers", "3"]) == 1
    err = capsys.readouterr().err
    assert "have no policy" not in err and "unexpected name 'snapkv'" in err


def test_bad_command_lines_exit_2(capsys):
    bad = [
        ["validate"],
        ["validate", "x.pkv", "--layers", "0"],
        ["validate", "x.pkv", "--layers", "1000000000"],
        ["validate", "x.pkv", "--layers", str(10**20)],
        ["frobnicate"],
        [],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--max-new-tokens", "0"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--budget", "lots"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--budget", "-10"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--budget", "150%"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--device", "tpu"],
        ["generate", "--spec", "*: full", "--draft-spec", "*: full", "--prompt", "hi"],
        ["generate", "--draft-spec", "*: full", "--prompt", "hi", "--lookahead", "0"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--temperature", "0"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--temperature", "nan"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--top-p", "1.5"],
        ["generate", "--spec", "*: full", "--prompt", "hi", "--top-k", "0"],
    ]
    for argv in bad:
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2, argv
    err = capsys.readouterr().err
    assert "--layers: expected a number from 1 to 10,000, got 0" in err
    assert "--layers: expected a number from 1 to 10,000, got 1000000000" in err
    assert "--max-new-tokens: expected a number from 1 to 100,000, got 0" in err
    assert "--budget: expected 512, 'total 16384' or '10%', got 'lots'" in err
    assert "--budget: a total budget keeps at least 1 token, not -10" in err
    assert "--budget: a percentage budget is more than 0% and at most 100%, not 150%" in err
    assert "--temperature: a temperature is above 0 (for the likeliest token, leave it out), got 0" in err
    assert "--temperature: a temperature is above 0 (for the likeliest token, leave it out), got nan" in err
    assert "--top-p: expected a probability above 0 and at most 1, got 1.5" in err


def test_fmt_prints_the_canonical_form(spec_file, capsys):
    path = spec_file("# head\nbudget   512 # per layer\n0-1:full;*:snapkv@256( window = 8 )\n\n\n")
    assert main(["fmt", path]) == 0
    assert capsys.readouterr().out == (
        "# head\nbudget 512  # per layer\nlayers 0-1: full\nlayers *: snapkv@256(window=8)\n"
    )


def test_fmt_check(spec_file, capsys):
    canonical = spec_file("layers 0-1: full\n", "canonical.pkv")
    messy = spec_file("0-1 :  full", "messy.pkv")
    assert main(["fmt", "--check", canonical]) == 0
    assert main(["fmt", "--check", canonical, messy]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"{messy}: not in canonical form (polykv fmt prints it)\n"


def test_fmt_of_a_file_with_syntax_errors(spec_file, capsys):
    assert main(["fmt", spec_file("layers 0 full")]) == 1
    assert "error: unexpected name 'full'" in capsys.readouterr().err


def test_examples_are_canonical():
    assert main(["fmt", "--check", *map(str, EXAMPLES)]) == 0


def test_policies_lists_parameters_and_providers(capsys):
    assert main(["policies"]) == 0
    out = capsys.readouterr().out
    from polykv import __version__

    assert f"snapkv  (polykv-core {__version__})" in out
    assert '    pooling: str = "max", one of max, avg  how scores are pooled' in out
    assert "    sink: int = 4, between 0 and 1024  attention-sink tokens kept at the start" in out


def test_policies_json(capsys):
    assert main(["policies", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in listing["policies"]]
    assert {"full", "streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "random"} <= set(names)
    h2o = next(p for p in listing["policies"] if p["name"] == "h2o")
    assert h2o["parameters"] == [
        {
            "name": "recent",
            "type": "float",
            "default": 0.5,
            "min": 0.0,
            "max": 1.0,
            "choices": [],
            "description": "share of the budget kept for the most recent tokens",
        }
    ]
    assert listing["failures"] == []


def test_internal_errors_are_reported_without_a_traceback(monkeypatch, capsys, spec_file):
    def explode(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("polykv.language.check.check_text", explode)
    assert main(["validate", spec_file("*: full")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polykv: internal error: RuntimeError: boom\n")
    assert "Traceback" not in err


def test_the_console_script_is_installed(tmp_path):
    executable = Path(sys.executable).parent / "polykv"  # installed beside the interpreter, venv activated or not
    assert executable.exists(), f"no polykv entry point next to {sys.executable}"
    path = tmp_path / "spec.pkv"
    path.write_text("*: streaming@3\n")
    result = subprocess.run([executable, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: a budget of 3 is too small for streaming(sink=4): it needs at least 5" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_reports_spec_errors_before_loading_a_model(capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a spec with errors")

    monkeypatch.setattr("polykv.cli.commands.generate.load_model", no_model)
    assert main(["generate", "--spec", "layers 0: snapvk@3", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.startswith("--spec:1:11: error: unknown policy 'snapvk'\n")
    assert main(["generate", "--spec", "*: full", "--prompt", "   "]) == 1
    assert capsys.readouterr().err == "polykv: error: the prompt is empty\n"
    assert main(["generate", "--spec", "budget 128; *: full", "--budget", "64", "--prompt", "hi"]) == 1
    assert "error: the spec sets its own budget, and --budget sets another" in capsys.readouterr().err
    assert main(["generate", "--spec", "*: full", "--prompt-file", "no-such-prompt.txt"]) == 1
    assert "no-such-prompt.txt: cannot read: No such file or directory" in capsys.readouterr().err
    assert main(["generate", "--spec", "no/such/spec.pkv", "--prompt", "hi"]) == 1
    assert "--spec no/such/spec.pkv: not spec text (it reads like a file name)" in capsys.readouterr().err
    assert main(["generate", "--spec-file", "no/such/spec.pkv", "--prompt", "hi"]) == 1
    assert "no/such/spec.pkv: cannot read: No such file or directory" in capsys.readouterr().err
    assert main(["generate", "--draft-spec", "*: snapvk@3", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.startswith("--draft-spec:1:4: error: unknown policy 'snapvk'\n")
    assert main(["generate", "--spec", "*: full", "--prompt", "hi", "--model", "/no/such/model"]) == 1
    assert "/no/such/model: no such model directory" in capsys.readouterr().err
    assert main(["generate", "--spec", "*: full", "--prompt", "hi", "--model", __file__]) == 1
    assert f"{__file__}: a file, and no .gguf file: a model is a folder" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["generate", "--spec", "*: full", "--prompt", "hi", "--device", "cuda"]) == 1
        assert "--device cuda: no CUDA device is available here" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["fmt", "-"], ["validate", "-"], ["policies"]])
def test_language_commands_start_without_transformers(command):
    """fmt needs neither torch nor transformers; validate and policies load plugins (torch) only."""
    script = (
        "import sys\nfrom polykv.cli import main\nmain(sys.argv[1:])\n"
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *command], input="*: full\n", capture_output=True, text=True, timeout=120
    )
    torch_loaded, transformers_loaded = result.stdout.split()[-2:]
    assert transformers_loaded == "False"
    assert torch_loaded == ("False" if command[0] == "fmt" else "True")


def test_spec_text_is_text_and_a_spec_file_is_named_as_one(tmp_path):
    from argparse import Namespace

    from polykv.cli.commands.setup import spec_argument

    text = "*: snapkv@16(window=4) # 1/2 of it"
    assert polykv.print_spec(spec_argument(Namespace(spec=text, spec_file=None), "--spec")) == (
        "layers *: snapkv@16(window=4)  # 1/2 of it\n"
    )
    path = tmp_path / "spec.txt"
    path.write_text("layers 0: full\n*: knorm@8\n")
    assert spec_argument(Namespace(spec=None, spec_file=path), "--spec") == polykv.parse("layers 0: full; *: knorm@8")
    with pytest.raises(polykv.PolykvError, match=r"a spec file is given with --spec-file examples/uniform-snapkv\.pkv"):
        spec_argument(Namespace(spec="examples/uniform-snapkv.pkv", spec_file=None), "--spec")


@pytest.mark.parametrize("way", [[], ["--static"], ["--draft-spec", "*: streaming@8(sink=2)", "--lookahead", "3"]])
def test_generate_samples_when_asked_and_the_seed_repeats_the_draws(small_model, capsys, way):
    """Greedy by default; any sampling option draws (seeded), in transformers' generate, static decoding and
    self-speculation alike."""
    base = ["generate", "--model", small_model, "--device", "cpu", "--prompt", "the quick brown fox jumps over"]
    base += ["--max-new-tokens", "12", *way] + ([] if "--draft-spec" in way else ["--spec", "*: snapkv@8(window=2)"])

    def text(*options: str) -> str:
        assert main([*base, *options]) == 0
        return capsys.readouterr().out.partition("\n\n")[0]

    greedy = text()
    assert text() == greedy
    hot = ["--temperature", "3", "--top-k", "2000"]  # a random model: nearly even draws among 2,000 tokens
    drawn = text(*hot, "--seed", "1")
    assert drawn != greedy and text(*hot, "--seed", "1") == drawn and text(*hot, "--seed", "2") != drawn
    assert text("--top-k", "1") == greedy  # the likeliest token is the only one left to draw


def test_generate_refuses_options_of_a_way_of_decoding_it_was_not_asked_for(small_model, capsys):
    command = ["generate", "--model", small_model, "--device", "cpu", "--prompt", "hello", "--spec", "*: full"]
    assert main([*command, "--compile"]) == 1
    assert "--compile compiles static decoding steps: add --static" in capsys.readouterr().err
    assert main([*command, "--lookahead", "3"]) == 1
    assert "--lookahead is how many tokens a draft proposes per check: give the draft's --draft-spec" in (
        capsys.readouterr().err
    )
    assert main([*command, "--draft-tf32"]) == 1
    assert "--draft-tf32 is the precision a draft proposes in: give the draft's --draft-spec" in capsys.readouterr().err
    assert main([*command[:-2], "--draft-spec", "*: streaming@64", "--draft-tf32"]) == 1
    assert "--draft-tf32 has CUDA's float32 matrix products use TF32, which this run (float32 on cpu)" in (
        capsys.readouterr().err
    )
    assert main([*command, "--draft-dtype", "bfloat16"]) == 1
    assert "--draft-dtype is the precision a draft proposes in: give the draft's --draft-spec" in (
        capsys.readouterr().err
    )
    assert main([*command[:-2], "--draft-spec", "*: streaming@64", "--draft-tf32", "--draft-dtype", "bfloat16"]) == 1
    assert "--draft-tf32 is for a draft in float32, and --draft-dtype bfloat16 drafts in bfloat16" in (
        capsys.readouterr().err
    )


def test_generate_drafts_in_a_lower_dtype_and_says_the_same(small_model, capsys):
    command = ["generate", "--model", small_model, "--device", "cpu", "--prompt", "the quick brown fox jumps over"]
    command += ["--max-new-tokens", "10", "--draft-spec", "*: streaming@8(sink=2)", "--lookahead", "3"]
    outputs = []
    for extra in ([], ["--draft-dtype", "bfloat16"]):
        assert main([*command, *extra]) == 0
        outputs.append(capsys.readouterr().out.partition("\n\n")[0])
    assert outputs[0] == outputs[1] and outputs[0]


@pytest.mark.parametrize(
    "command, message",
    [
        (["generate", "--spec", "*: snapkv@64", "--prompt", "hi", "--objective", "acceptance"], "--objective says how"),
        (["generate", "--spec", "*: full", "--prompt", "hi", "--profile", "p.json"], "--profile says how"),
        (["plan", "*: snapkv@64", "--setting", "context", "--context", "900"], "--context and --setting say how"),
        (["validate", "--heads", "3", "-"], "--heads H checks head selectors against H KV heads of a model"),
        (["calibrate", "--out", "p.json", "--length", "256", "--grid", "8", "512", "300"], "--grid 512 300: a budget"),
        (["eval", "--out", "runs", "--report-only", "--methods", "full", "--count", "3"], "--methods, --count would"),
    ],
)
def test_options_that_would_change_nothing_are_refused(command, message, monkeypatch, capsys):
    """An option the command would drop without a word (it only matters with auto, or with scoring) is an error."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("layers * heads 0: full; layers * heads 1-2: snapkv@8\n"))
    assert main(command) == 1
    assert message in capsys.readouterr().err


def test_routing_options_are_taken_where_auto_decides(small_model, capsys):
    spec = ["budget 64; solver pyramid; *: streaming@auto", "--model", small_model, "--device", "cpu"]
    assert main(["plan", *spec, "--setting", "question", "--objective", "kl", "--context", "300"]) == 0
    assert "300" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.heavy  # compiles the small model's step (some 15 s on two cores)
def test_generate_static_compiled_gives_the_static_text(small_model, capsys):
    command = ["generate", "--model", small_model, "--device", "cpu", "--prompt", "the quick brown fox jumps over"]
    command += ["--max-new-tokens", "10", "--spec", "*: snapkv@8(window=2)", "--static"]
    texts = []
    for extra in ([], ["--compile"]):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        assert main([*command, *extra]) == 0
        texts.append(capsys.readouterr().out.partition("\n\n")[0])
    assert texts[0] == texts[1]
    # One graph serves the static steps: the progress bar's hooks, which count on the host, are not traced into it
    # (dynamo would guard on their counts and compile every step anew).
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2


def test_generate_static_reports_its_set_up_apart_from_its_steps(small_model, capsys):
    command = ["generate", "--model", small_model, "--device", "cpu", "--prompt", "the quick brown fox jumps over"]
    assert main([*command, "--max-new-tokens", "12", "--spec", "*: snapkv@8(window=2)", "--static"]) == 0
    report = capsys.readouterr().out
    assert "static decoding: set-up " in report
    assert "(an ordinary step, then the first static step), then 9 tokens in " in report
    assert main([*command, "--max-new-tokens", "12", "--spec", "*: snapkv@8(window=2)"]) == 0
    assert "static decoding" not in capsys.readouterr().out


def test_eval_checks_method_templates_before_the_model_loads(tmp_path, capsys):
    """A template's mistake names the method and the budget it was read at, before any model loads."""
    methods = ["--methods", "mine=*: snapkv@{budget}(windo=2)", "--budgets", "64"]
    assert main(["eval", "--out", str(tmp_path), *methods]) == 1
    err = capsys.readouterr().err
    assert err.startswith("method 'mine' at budget 64:1:14: error: snapkv has no parameter 'windo'"), err
    assert "hint: did you mean 'window'?" in err and "loading" not in err

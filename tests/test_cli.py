"""The polykv command: validate, fmt, policies; exit codes, JSON, standard input, and no tracebacks."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert capsys.readouterr().out == (
        f"{path}: ok (5 layers)\n"
        "  layers  policy     budget  parameters  decode\n"
        "  0-1     full       all\n"
        "  2       streaming  32      sink=2      tova(per_head=false)@48\n"
        "  3-4     knorm      10%\n"
        "  total budget: 64 tokens per layer on average (320 in all)\n"
    )


def test_validate_without_a_layer_count_summarises_rules(spec_file, capsys):
    path = spec_file("layers 0: full\n*: snapkv@256\n")
    assert main(["validate", path]) == 0
    out = capsys.readouterr().out
    assert '  *       snapkv  256     window=32, kernel=7, pooling="max"' in out
    assert out.endswith("layer count unknown: give --layers N or --model DIR to check coverage and ranges\n")


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
        f"{path}:2:10: error: unexpected name 'full'; expected `:`, `,` or `-`\n"
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
        "prefill": {"policy": "streaming", "params": {"sink": 4}, "budget": {"tokens": 8}, "candidates": []},
        "decode": {"policy": "streaming", "params": {"sink": 4}, "budget": {"tokens": 16}, "candidates": []},
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


def test_validate_of_a_missing_file(capsys):
    assert main(["validate", "does-not-exist.pkv"]) == 1
    assert capsys.readouterr().err == "polykv: error: does-not-exist.pkv: no such file\n"


def test_bad_command_lines_exit_2(capsys):
    for argv in (["validate"], ["validate", "x.pkv", "--layers", "0"], ["frobnicate"], []):
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
    assert "--layers: expected at least 1, got 0" in capsys.readouterr().err


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

    monkeypatch.setattr("polykv.cli.check_text", explode)
    assert main(["validate", spec_file("*: full")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("polykv: internal error: RuntimeError: boom\n")
    assert "Traceback" not in err


def test_the_console_script_is_installed(tmp_path):
    executable = shutil.which("polykv")
    assert executable, "the polykv entry point is not on PATH"
    path = tmp_path / "spec.pkv"
    path.write_text("*: streaming@3\n")
    result = subprocess.run([executable, "validate", str(path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "error: a budget of 3 is too small for streaming(sink=4): it needs at least 5" in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_reports_spec_errors_before_loading_a_model(capsys, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded for a spec with errors")

    monkeypatch.setattr("polykv.generate.load_model", no_model)
    assert main(["generate", "--spec", "layers 0: snapvk@3", "--prompt", "hi"]) == 1
    assert capsys.readouterr().err.startswith("--spec:1:11: error: unknown policy 'snapvk'\n")

"""Fuzzing the language: whatever the input, only SpecError escapes, and `polykv validate` exits 0 or 1.

Inputs: text the grammar generates, valid specs mutated (cut short, characters dropped, doubled or
replaced, tokens swapped), arbitrary text and bytes, huge numbers, very long lists, a 10 MB file.
Every diagnostic must point inside the text it is about. Each test runs under a memory limit, so
an input that makes checking allocate without bound fails here instead of exhausting the machine.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polykv.cli import main
from polykv.language.check import check_text
from polykv.language.diagnostics import SpecError
from polykv.testing.strategies import grammar_text

EXAMPLES = [path.read_text() for path in sorted((Path(__file__).parent.parent / "examples").glob("*.pkv"))]
VALID = [
    *EXAMPLES,
    "layers 0-1: full; *: snapkv@256",
    "budget 64\nsolver pyramid(beta=10)\nlayers 0: full\nlayers *: auto[snapkv, tova]@auto decode streaming@128",
    'model layers 4\n0,2: h2o@10%(recent=0.25); 1: knorm@8; 3: snapkv@16(pooling="avg", window=8)',
]
pytestmark = pytest.mark.memory_limit(512)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def only_spec_errors(text: str, layers: int | None = None) -> None:
    """Checking ``text`` succeeds or raises SpecError whose diagnostics all point inside the text."""
    try:
        check_text(text, "fuzz.pkv", layers=layers)
    except SpecError as error:
        assert error.diagnostics
        for diagnostic in error.diagnostics:
            if diagnostic.span is not None:
                assert 0 <= diagnostic.span.start <= diagnostic.span.end <= len(text), diagnostic
                assert diagnostic.span.source.text == text


@st.composite
def mutated(draw) -> str:
    text = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(1, 4))):
        if not text:
            break
        at = draw(st.integers(0, len(text) - 1))
        kind = draw(st.sampled_from(["cut", "drop", "double", "replace", "swap", "insert"]))
        if kind == "cut":
            text = text[:at]
        elif kind == "drop":
            text = text[:at] + text[at + 1 :]
        elif kind == "double":
            text = text[:at] + text[at] + text[at:]
        elif kind == "replace":
            text = text[:at] + draw(st.characters()) + text[at + 1 :]
        elif kind == "insert":
            text = (
                text[:at]
                + draw(st.sampled_from(["@", ":", ";", "(", ")", ",", "-", "*", "#", '"', "\n", "9" * 30]))
                + text[at:]
            )
        else:
            words = text.split(" ")
            i, j = draw(st.integers(0, len(words) - 1)), draw(st.integers(0, len(words) - 1))
            words[i], words[j] = words[j], words[i]
            text = " ".join(words)
    return text


@FUZZ
@given(grammar_text(), st.sampled_from([None, 1, 4, 32]))
def test_text_the_grammar_accepts_checks_or_fails_cleanly(text, layers):
    only_spec_errors(text, layers)


@FUZZ
@given(mutated(), st.sampled_from([None, 30]))
def test_mutated_specs_fail_cleanly(text, layers):
    only_spec_errors(text, layers)


@FUZZ
@given(st.text(), st.sampled_from([None, 30]))
def test_arbitrary_text_fails_cleanly(text, layers):
    only_spec_errors(text, layers)


@pytest.mark.parametrize(
    "text",
    [
        "layers 99999999999999999999999999: full",
        "layers 0: snapkv@99999999999999999999999999",
        "layers 0: snapkv@64(window=99999999999999999999999999)",
        "layers 0: snapkv@64(kernel=9223372036854775807)",
        "layers 0: h2o@64(recent=1e400)",
        "budget 1e999999%",
        "model layers 99999999999999999999999999",
        "layers -99999999999999999999-99999999999999999999: full",
        "layers 0: streaming@100.5%",
    ],
)
def test_huge_numbers_are_errors_not_crashes(text):
    with pytest.raises(SpecError):
        check_text(text, layers=30)


@pytest.mark.parametrize("count", [10_001, 1_000_000_000, 10**30])
def test_a_layer_count_past_the_limit_is_an_error_not_an_allocation(count):
    with pytest.raises(SpecError, match="models of up to 10,000 layers") as raised:
        check_text(f"model layers {count}\n*: full")
    assert raised.value.diagnostics[0].code == "bad-layer-count"
    with pytest.raises(ValueError, match="from 1 to 10,000"):
        check_text("*: full", layers=count)


def test_statements_naming_every_layer_check_in_time_linear_in_the_statements():
    text = "model layers 10000\n" + "layers 0-9999: full\n" * 2000
    with pytest.raises(SpecError) as raised:
        check_text(text)
    assert raised.value.diagnostics[0].message == "layers 0-9999 are already given a policy by an earlier statement"


def test_very_long_lists_check_in_linear_time():
    many = ",".join(str(i) for i in range(10_000))
    checked = check_text(f"layers {many}: full", layers=10_000)
    assert len(checked.layers) == 10_000
    with pytest.raises(SpecError, match="already given a policy"):
        check_text(f"layers {many},0: full", layers=10_000)


@FUZZ
@given(st.binary(max_size=300))
def test_validate_exits_0_or_1_on_any_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("fuzz") / "spec.pkv"
    path.write_bytes(data)
    assert main(["validate", str(path), "--layers", "8"]) in (0, 1)


def test_a_10_mb_file_is_refused_at_once(tmp_path):
    path = tmp_path / "big.pkv"
    path.write_text("layers *: full\n" * 700_000)  # about 10 MB
    result = subprocess.run(
        [sys.executable, "-m", "polykv.cli", "validate", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert "too large for a spec" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["validate", "/dev/null"],
        ["validate", "/dev/zero"],
        ["fmt", "/dev/zero"],
        ["fmt", "--check", "/dev/null"],
        ["validate", "/"],
    ],
)
def test_validate_and_fmt_never_print_a_traceback(argv):
    result = subprocess.run([sys.executable, "-m", "polykv.cli", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr

"""Semantic checks: every kind of finding with its exact text, and the per-layer table of a valid spec."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

import polykv
from polykv.language import ast
from polykv.language.check import check_text
from polykv.language.printer import layer_ranges


def _errors(text: str, **options) -> polykv.SpecError:
    with pytest.raises(polykv.SpecError) as raised:
        check_text(text, "spec.pkv", **options)
    return raised.value


def _only(text: str, **options) -> polykv.Diagnostic:
    error = _errors(text, **options)
    assert len(error.diagnostics) == 1, error.format()
    return error.diagnostics[0]


def test_unknown_policy_with_suggestion():
    assert str(_errors("layers 0-3: snapvk@64")) == (
        "spec.pkv:1:13: error: unknown policy 'snapvk'\n"
        "    1 | layers 0-3: snapvk@64\n"
        "      |             ^^^^^^\n"
        "  hint: did you mean 'snapkv'?\n"
        "\n"
        "1 error in spec"
    )


def test_unknown_policy_without_a_close_name_lists_the_installed_ones():
    hint = _only("layers 0: zzzzz@5").hint
    assert hint.startswith("installed policies: expected, full, h2o, knorm, kvzip, observed, pyramidkv, random")


def test_unknown_parameter():
    diagnostic = _only("layers 0: snapkv@64(windw=8)")
    assert (diagnostic.code, diagnostic.message, diagnostic.hint) == (
        "unknown-parameter",
        "snapkv has no parameter 'windw'",
        "did you mean 'window'?",
    )
    assert (diagnostic.span.column, diagnostic.span.end_column) == (21, 28)
    assert _only("layers 0: knorm@64(x=1)").hint == "knorm takes no parameters"


def test_parameter_of_the_wrong_type():
    assert str(_errors("layers 0: snapkv@64(kernel=1.5)")) == (
        "spec.pkv:1:28: error: snapkv: parameter 'kernel' takes a whole number, got a number (1.5)\n"
        "    1 | layers 0: snapkv@64(kernel=1.5)\n"
        "      |                            ^^^\n"
        "  hint: for example kernel=7\n"
        "\n"
        "1 error in spec"
    )


def test_parameter_out_of_range_and_not_a_choice():
    assert _only("layers 0: h2o@64(recent=1.5)").message == ("h2o: parameter 'recent' must be between 0 and 1, got 1.5")
    assert _only('layers 0: snapkv@64(pooling="mean")').message == (
        'snapkv: parameter \'pooling\' is one of "max", "avg", got "mean"'
    )
    assert (
        _only("layers 0: streaming@64(sink=-1)").message
        == "streaming: parameter 'sink' must be between 0 and 1024, got -1"
    )


def test_duplicate_parameter():
    assert _only("layers 0: streaming@64(sink=1, sink=2)").message == "parameter 'sink' is given twice"


def test_overlapping_selectors():
    assert str(_errors("layers 0-3: full\nlayers 2-5: full", layers=6)) == (
        "spec.pkv:2:8: error: layers 2-3 are already given a policy by an earlier statement\n"
        "    2 | layers 2-5: full\n"
        "      |        ^^^\n"
        "  hint: name each layer in one statement only\n"
        "spec.pkv:1:8: note: first given here\n"
        "    1 | layers 0-3: full\n"
        "      |        ^^^\n"
        "\n"
        "1 error in spec"
    )
    assert _only("layers 1, -3: full; *: full", layers=4).message == (
        "layer 1 is already given a policy earlier in this statement"
    )


def test_layers_not_covered():
    assert str(_errors("model layers 8\nlayers 0-1: full\nlayers 4: full")) == (
        "spec.pkv:1:1: error: layers 2-3,5-7 of 8 have no policy\n"
        "    1 | model layers 8\n"
        "      | ^^^^^^^^^^^^^^\n"
        "  hint: add `layers 2-3,5-7: POLICY`, or `*: POLICY` for every layer not named\n"
        "\n"
        "1 error in spec"
    )


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_a_spec_without_statements_is_named_in_its_error(text):
    """An empty file's error says which file, as every other error does."""
    assert str(_errors(text, layers=4)).startswith("spec.pkv:1:1: error: layers 0-3 of 4 have no policy\n")


def test_layer_out_of_range():
    assert _only("layers 30-40: full; *: full", layers=32).message == (
        "layer 40 does not exist: the model has 32 layers (0-31, or -32--1 from the end)"
    )
    assert _only("layers -33: full; *: full", layers=32, layers_from="--layers").message == (
        "layer -33 does not exist: --layers has 32 layers (0-31, or -32--1 from the end)"
    )


def test_backwards_ranges():
    assert _only("layers 5-3: full").message == "the range 5-3 runs backwards"
    assert _only("layers 5-3: full").hint == "write 3-5"
    assert _only("layers 6--3: full; *: full", layers=8).message == (
        "the range 6--3 runs backwards: with 8 layers it is 6 to 5"
    )


def test_second_every_selector():
    assert _only("*: full; *: full").message == "only one statement can use `*`"


def test_layer_count_mismatch():
    diagnostic = _only("model layers 32\n*: full", layers=30, layers_from="the model (smol)")
    assert diagnostic.message == "this spec is written for 32 layers, but the model (smol) has 30"
    assert diagnostic.hint == "write `model layers 30` or drop the line to use the spec with any model"


def test_fixed_budgets_exceeding_the_total():
    assert str(_errors("budget total 1000\nlayers 0-1: full\n*: snapkv@256", layers=6)) == (
        "spec.pkv:1:1: error: the fixed budgets add up to 1024 tokens, more than the total budget of 1000\n"
        "    1 | budget total 1000\n"
        "      | ^^^^^^^^^^^^^^^^^\n"
        "  hint: lower the fixed budgets or raise the total\n"
        "\n"
        "1 error in spec"
    )
    assert _only("budget 100\n*: snapkv@256", layers=4).message == (
        "the fixed budgets add up to 1024 tokens, more than the total budget of 400"
    )
    assert _only("budget 20%\nlayers 0: full\n*: tova@10%", layers=4).message == (
        "the budgets keep 32.5% of the context per layer on average, more than the total budget of 20%"
    )


def test_auto_budget_without_a_total():
    assert str(_errors("layers *: snapkv@auto")) == (
        "spec.pkv:1:18: error: an @auto budget needs a total budget to share\n"
        "    1 | layers *: snapkv@auto\n"
        "      |                  ^^^^\n"
        "  hint: add a line such as `budget 512` (average tokens per layer), or pass budget= to polykv.compile\n"
        "\n"
        "1 error in spec"
    )


def test_budget_below_what_the_policy_needs():
    assert str(_errors("layers *: streaming@4(sink=4)")) == (
        "spec.pkv:1:21: error: a budget of 4 is too small for streaming(sink=4): it needs at least 5\n"
        "    1 | layers *: streaming@4(sink=4)\n"
        "      |                     ^\n"
        "  hint: raise the budget to 5 or more, or lower the policy's parameters\n"
        "\n"
        "1 error in spec"
    )
    assert _only("layers *: snapkv@16").message == (
        'a budget of 16 is too small for snapkv(window=32, kernel=7, pooling="max"): it needs at least 32'
    )
    assert _only("layers *: knorm@0").message == "a budget of 0 keeps nothing"


def test_percentages_out_of_range():
    assert _only("layers *: knorm@0%").message == "a percentage budget is more than 0% and at most 100%, not 0%"
    assert _only("layers *: knorm@150%").message == "a percentage budget is more than 0% and at most 100%, not 150%"


def test_duplicate_settings():
    assert str(_errors("budget 512\nmodel layers 4\nbudget 10%\n*: full")) == (
        "spec.pkv:3:1: error: `budget` is set twice\n"
        "    3 | budget 10%\n"
        "      | ^^^^^^^^^^\n"
        "  hint: keep one `budget` line\n"
        "spec.pkv:1:1: note: first set here\n"
        "    1 | budget 512\n"
        "      | ^^^^^^^^^^\n"
        "\n"
        "1 error in spec"
    )
    assert _only("model layers 4\nmodel layers 4\n*: full").message == "`model layers` is set twice"


def test_budget_declarations():
    assert _only("budget total 10%\n*: full").message == (
        "a percentage budget is already an average per layer; `total` does not apply"
    )
    assert _only("budget 0\n*: full").message == "a total budget keeps at least 1 token, not 0"
    assert _only("model layers 0\n*: full").message == "a model has at least 1 layer, not 0"


def test_budgets_policies_take_or_not():
    assert _only("*: snapkv").message == "snapkv needs a budget"
    assert _only("*: snapkv").hint == "write snapkv@256 (tokens), snapkv@10% (of the context) or snapkv@auto"
    assert _only("*: full@64").message == "full keeps every token; it takes no budget"


def test_decode_policies():
    assert _only("*: snapkv@64 decode h2o@128").message == (
        "h2o needs attention accumulated over the whole prompt, which exists only at prefill"
    )
    assert _only("*: snapkv@64 decode full").message == (
        "`decode full` changes nothing: a layer keeps what it generates unless a decode policy bounds it"
    )


def test_auto():
    assert _only("budget 64\n*: auto[snapkv, snapkv]@auto").message == "'snapkv' is listed twice"
    assert _only("budget 64\n*: auto[snapkv, tvoa]@auto").hint == "did you mean 'tova'?"
    assert _only("budget 64\n*: auto@auto(window=3)").message == (
        "auto takes no parameters: the router picks the policy and uses its defaults"
    )
    assert _only("*: auto").message == "auto needs a budget"


def test_every_finding_of_a_file_together_in_source_order():
    text = "layers 0: snapvk@64\nlayers 1 2: full\nlayers 2: knorm@0\nbudget 5\nbudget 6\n*: streaming@2"
    error = _errors(text, layers=4)
    assert [(d.code, d.span.line) for d in error.diagnostics] == [
        ("unknown-policy", 1),
        ("syntax", 2),
        ("budget-too-small", 3),
        ("duplicate-setting", 5),
        ("budget-too-small", 6),
    ]


# --- valid specs ------------------------------------------------------------------------------------


def test_layer_table():
    checked = check_text(
        "layers 0, -1: full\nlayers 1-2: streaming@64(sink=2) decode streaming@128\n*: snapkv@10%(window=8)", layers=6
    )
    assert checked.layer_count == 6
    table = {e.index: (e.prefill.policy, e.prefill.budget, e.decode and e.decode.policy) for e in checked.layers}
    assert table == {
        0: ("full", None, None),
        1: ("streaming", ast.Tokens(64), "streaming"),
        2: ("streaming", ast.Tokens(64), "streaming"),
        3: ("snapkv", ast.Percent(10), None),
        4: ("snapkv", ast.Percent(10), None),
        5: ("full", None, None),
    }
    assert checked.layers[3].prefill.params == {"window": 8, "kernel": 7, "pooling": "max"}
    assert checked.layers[1].decode.params == {"sink": 4}


def test_without_a_layer_count_only_rules_are_checked():
    checked = check_text("layers 0-1: full\n*: snapkv@256\nlayers -1: tova@32")
    assert checked.layers is None and checked.layer_count is None
    assert [r.prefill.policy for r in checked.rules] == ["full", "snapkv", "tova"]


def test_parameters_are_typed():
    checked = check_text("*: h2o@64(recent=1)", layers=1)
    assert checked.layers[0].prefill.params == {"recent": 1.0}
    assert type(checked.layers[0].prefill.params["recent"]) is float


@given(st.integers(min_value=1, max_value=40), st.data())
def test_every_layer_gets_exactly_the_rule_that_names_it(count, data):
    """Cut the layers into runs, name each run by a random mix of positive and negative indices."""
    cuts = sorted(data.draw(st.sets(st.integers(min_value=1, max_value=count - 1), max_size=5))) if count > 1 else []
    bounds = [0, *cuts, count]
    lines, expected = [], {}
    for number, (start, stop) in enumerate(itertools.pairwise(bounds)):
        first = start - count if data.draw(st.booleans()) else start
        last = stop - 1 - count if data.draw(st.booleans()) else stop - 1
        if first > last and (first < 0) == (last < 0):
            first, last = start, stop - 1
        lines.append(f"layers {first}-{last}: streaming@{number + 1}(sink=0)")
        expected.update({i: number + 1 for i in range(start, stop)})
    checked = check_text("\n".join(lines), layers=count)
    assert {e.index: e.prefill.budget.count for e in checked.layers} == expected


def test_layer_ranges_text():
    assert layer_ranges([5, 0, 1, 2, 7, 8, 9]) == "0-2,5,7-9"
    assert layer_ranges([]) == ""

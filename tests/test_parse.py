"""The language: parsing both forms, spans, comments, the canonical printer, and syntax errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import polykv
from polykv.language import ast
from polykv.language.parse import parse_recovering
from polykv.language.printer import print_spec
from polykv.testing.strategies import grammar_text, specs

FILE_FORM = """\
# LLaMA-3.1-8B, 512 tokens per layer on average
model layers 32            # optional: the layer count this spec is written for
budget 512                 # average kept tokens per layer

layers 0-1: full
layers 2-3: streaming@64(sink=4)
layers 4-27: snapkv@auto(window=32, kernel=7)
layers 28-31: auto@auto    # the router picks the policy; auto[snapkv, h2o] limits its choice
"""


def test_one_line_form():
    spec = polykv.parse("layers 0-3: streaming@64; 4-27: snapkv@auto")
    assert spec == ast.Spec(
        (
            ast.Rule(ast.LayerList([ast.LayerRange(0, 3)]), ast.PolicyUse("streaming", ast.Tokens(64))),
            ast.Rule(ast.LayerList([ast.LayerRange(4, 27)]), ast.PolicyUse("snapkv", ast.AutoBudget())),
        )
    )


def test_file_form():
    spec = polykv.parse(FILE_FORM, source="llama.pkv")
    assert spec.model_layers.count == 32
    assert spec.budget == ast.BudgetDecl(ast.Tokens(512), comment=" average kept tokens per layer")
    assert [r.prefill.name for r in spec.rules] == ["full", "streaming", "snapkv", "auto"]
    streaming = spec.rules[1].prefill
    assert streaming.parameters == (ast.Parameter("sink", 4),)
    assert spec.rules[3].comment == " the router picks the policy; auto[snapkv, h2o] limits its choice"
    assert (
        isinstance(spec.items[0], ast.Comment)
        and spec.items[0].text == " LLaMA-3.1-8B, 512 tokens per layer on average"
    )
    assert isinstance(spec.items[3], ast.BlankLine)


def test_spans_locate_every_node():
    spec = polykv.parse(FILE_FORM, source="llama.pkv")
    snapkv = spec.rules[2].prefill
    assert (snapkv.name_span.line, snapkv.name_span.column) == (7, 14)
    assert snapkv.name_span.source.name == "llama.pkv"
    window = snapkv.parameters[0]
    assert (window.span.column, window.value_span.column, window.value_span.end_column) == (26, 33, 35)
    selector = spec.rules[2].selector
    assert (selector.span.line, selector.span.column, selector.span.end_column) == (7, 8, 12)


@pytest.mark.parametrize(
    ("text", "selector"),
    [
        ("layers 3: full", [ast.LayerIndex(3)]),
        ("layers 0-3: full", [ast.LayerRange(0, 3)]),
        ("layers 0,2,5: full", [ast.LayerIndex(0), ast.LayerIndex(2), ast.LayerIndex(5)]),
        ("layers 0-1, 28-31: full", [ast.LayerRange(0, 1), ast.LayerRange(28, 31)]),
        ("layers -1: full", [ast.LayerIndex(-1)]),
        ("layers -4--1: full", [ast.LayerRange(-4, -1)]),
        ("layers 28--1: full", [ast.LayerRange(28, -1)]),
        ("3: full", [ast.LayerIndex(3)]),
    ],
)
def test_selectors(text, selector):
    assert polykv.parse(text).rules[0].selector == ast.LayerList(selector)


def test_every_layer_selector():
    assert polykv.parse("layers *: full").rules[0].selector == ast.EveryLayer()
    assert polykv.parse("*: full").rules[0].selector == ast.EveryLayer()


@pytest.mark.parametrize(
    ("text", "budget"),
    [
        ("x@64", ast.Tokens(64)),
        ("x@auto", ast.AutoBudget()),
        ("x@10%", ast.Percent(10)),
        ("x@12.5%", ast.Percent(12.5)),
        ("x", None),
    ],
)
def test_budgets(text, budget):
    assert polykv.parse(f"layers 0: {text}").rules[0].prefill.budget == budget


@pytest.mark.parametrize(
    ("text", "declaration"),
    [
        ("budget 512", ast.BudgetDecl(ast.Tokens(512))),
        ("budget total 16384", ast.BudgetDecl(ast.Tokens(16384), total=True)),
        ("budget 10%", ast.BudgetDecl(ast.Percent(10))),
    ],
)
def test_total_budgets(text, declaration):
    assert polykv.parse(text).budget == declaration


def test_typed_parameter_values():
    use = polykv.parse(r'layers 0: x@8(a=3, b=-2.5, c=1e3, d=true, e=false, f="se;mi \"q\" \u00e9")').rules[0].prefill
    values = {p.name: p.value for p in use.parameters}
    assert values == {"a": 3, "b": -2.5, "c": 1000.0, "d": True, "e": False, "f": 'se;mi "q" é'}
    assert type(values["a"]) is int and type(values["c"]) is float


def test_decode_clause():
    rule = polykv.parse("layers 2-27: snapkv@256 decode streaming@1024(sink=4)").rules[0]
    assert rule.prefill == ast.PolicyUse("snapkv", ast.Tokens(256))
    assert rule.decode == ast.PolicyUse("streaming", ast.Tokens(1024), [ast.Parameter("sink", 4)])


def test_auto_with_candidates():
    use = polykv.parse("layers 28-31: auto[snapkv, h2o]@auto").rules[0].prefill
    assert use.is_auto and use.candidates == ("snapkv", "h2o")


def test_separators_comments_and_blank_lines():
    text = "\n\n# head\nlayers 0: full ;; layers 1: full # tail\n\n\n\nlayers 2: full\n;\n"
    spec = polykv.parse(text)
    kinds = [type(item).__name__ for item in spec.items]
    assert kinds == ["Comment", "Rule", "Rule", "BlankLine", "Rule"]
    assert spec.rules[1].comment == " tail"


def test_empty_spec():
    assert polykv.parse("") == ast.Spec()
    assert polykv.parse("  # nothing\n\n") == ast.Spec((ast.Comment(" nothing"),))


def test_canonical_print_keeps_comments_and_paragraphs():
    canonical = print_spec(polykv.parse(FILE_FORM))
    assert canonical == (
        "# LLaMA-3.1-8B, 512 tokens per layer on average\n"
        "model layers 32  # optional: the layer count this spec is written for\n"
        "budget 512  # average kept tokens per layer\n"
        "\n"
        "layers 0-1: full\n"
        "layers 2-3: streaming@64(sink=4)\n"
        "layers 4-27: snapkv@auto(window=32, kernel=7)\n"
        "layers 28-31: auto@auto  # the router picks the policy; auto[snapkv, h2o] limits its choice\n"
    )


def test_one_line_form_prints_one_statement_per_line():
    assert print_spec(polykv.parse("layers 0-3: streaming@64; 4-27: snapkv@auto decode tova@9")) == (
        "layers 0-3: streaming@64\nlayers 4-27: snapkv@auto decode tova@9\n"
    )


@given(specs)
def test_parse_of_print_is_identity(spec):
    assert polykv.parse(print_spec(spec)) == spec


@given(specs)
def test_print_is_canonical(spec):
    text = print_spec(spec)
    assert print_spec(polykv.parse(text)) == text


@given(grammar_text())
def test_grammar_text_parses_or_fails_cleanly(text):
    try:
        spec = polykv.parse(text)
    except polykv.SpecError as error:  # a literal the language rejects, such as 1e999 or a keyword as a name
        assert all(d.code == "syntax" and d.span is not None for d in error.diagnostics)
        return
    assert polykv.parse(print_spec(spec)) == spec


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_spec_error(text):
    try:
        polykv.parse(text)
    except polykv.SpecError as error:
        assert error.diagnostics


def test_load_names_the_file(tmp_path):
    path = tmp_path / "spec.pkv"
    path.write_text("layers 0: full\nlayers 1: snapkv@\n")
    with pytest.raises(polykv.SpecError) as raised:
        polykv.load(path)
    assert str(raised.value).startswith(f"{path}:2:18: error: unexpected end of line")


def test_load_of_a_missing_file_is_a_spec_error(tmp_path):
    with pytest.raises(polykv.SpecError) as raised:
        polykv.load(tmp_path / "missing.pkv")
    assert raised.value.diagnostics[0].code == "unreadable-file"
    assert "missing.pkv" in raised.value.diagnostics[0].message


# --- syntax errors: the exact text a user sees ----------------------------------------------------


def _error(text: str) -> str:
    with pytest.raises(polykv.SpecError) as raised:
        polykv.parse(text, source="spec.pkv")
    return str(raised.value)


def test_missing_colon():
    assert _error("layers 0-3 snapkv@64") == (
        "spec.pkv:1:12: error: unexpected name 'snapkv'; expected `:`, `,` or `heads`\n"
        "    1 | layers 0-3 snapkv@64\n"
        "      |            ^^^^^^\n"
        "  hint: put `:` between the layers and the policy, as in `layers 0-3: snapkv@256`\n"
        "\n"
        "1 error in spec"
    )


def test_bad_budget_word():
    assert _error("layers 0: snapkv@big") == (
        "spec.pkv:1:18: error: unexpected name 'big'; expected a budget: a number of tokens such as 64, "
        "a percentage such as 10%, or `auto`\n"
        "    1 | layers 0: snapkv@big\n"
        "      |                  ^^^\n"
        "  hint: a budget is a token count (64), a percentage of the context (10%) or auto\n"
        "\n"
        "1 error in spec"
    )


def test_budget_before_policy():
    assert "expected a policy name (or `auto`)" in _error("layers 4: 64")
    assert "hint: name the policy before its budget, as in `snapkv@64`" in _error("layers 4: 64")


def test_unexpected_character():
    assert _error("layers 0: x@8(mode='a')") == (
        'spec.pkv:1:20: error: unexpected character "\'"; expected a value: a number, `true`, `false` '
        "or a string in double quotes\n"
        "    1 | layers 0: x@8(mode='a')\n"
        "      |                    ^\n"
        "  hint: strings are written in double quotes\n"
        "\n"
        "1 error in spec"
    )


def test_unclosed_parameters():
    message = _error("layers 0: snapkv@64(window=3\nlayers 1: full")
    assert message.startswith("spec.pkv:1:29: error: unexpected end of line; expected `,` or `)`\n")
    assert "hint: a statement fits on one line" in message


def test_unknown_statement():
    assert _error("foo").startswith(
        "spec.pkv:1:1: error: unexpected name 'foo'; expected a statement such as "
        "`layers 0-3: snapkv@256`, `budget 512`, `prefill <= 1.5x`, `solver pyramid` or `model layers 32`\n"
    )


def test_end_of_input():
    assert _error("layers 0: full decode").startswith(
        "spec.pkv:1:22: error: unexpected end of input; expected a policy name (or `auto`)\n"
    )


def test_second_policy_without_decode():
    message = _error("layers 0: snapkv@64 streaming@32")
    assert "expected the end of the statement, `decode` or `(`" in message
    assert "write `decode` before it" in message


@pytest.mark.parametrize("keyword", ["budget", "true", "decode"])
def test_keyword_as_policy_name(keyword):
    assert _error(f"layers 0: {keyword}@8").startswith(
        f"spec.pkv:1:11: error: '{keyword}' is a keyword of the language, not a policy name\n"
    )


def test_every_syntax_error_of_a_file_is_reported():
    text = "layers 0-3 full\nbudget\nlayers 4: ok@1; layers 5: x(a 1); layers 6: full\nmodel 32"
    spec, diagnostics = parse_recovering(text, "spec.pkv")
    assert [(d.span.line, d.span.column) for d in diagnostics] == [(1, 12), (2, 7), (3, 31), (4, 7)]
    assert [rule.selector.items[0].index for rule in spec.rules] == [4, 6]  # what did parse is kept
    with pytest.raises(polykv.SpecError) as raised:
        polykv.parse(text)
    assert str(raised.value).endswith("4 errors in spec")


BUILT_INS = ["full", "streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "random"]
plan_budgets = st.one_of(
    st.builds(polykv.budget.Tokens, st.integers(1, 10**9)),
    st.builds(polykv.budget.Share, st.integers(1, 100) | st.floats(0.001, 100, allow_nan=False)),
)


@given(st.sampled_from(BUILT_INS), plan_budgets, st.none() | st.sampled_from(["streaming", "tova"]), st.data())
def test_what_a_plan_prints_for_a_layer_parses_back_to_the_same_choice(name, budget, decode_name, data):
    from polykv.choice import Choice
    from polykv.plan import LayerPlan

    registry = polykv.registry.default_registry()

    def phase(policy: str) -> Choice:
        params = dict(registry.policies.create(policy).values)
        for parameter in registry.policies.get(policy).cls.parameters:  # any value in bounds, not only the defaults
            if parameter.type is int:
                params[parameter.name] = data.draw(st.integers(parameter.min, parameter.max))
        return Choice(policy, params, None if policy == "full" else budget)

    decode = None if decode_name is None else phase(decode_name)
    layer = LayerPlan(0, phase(name), decode, "cpu", "float32")
    rule = polykv.parse(f"layers 0: {layer.describe()}").items[0]
    for printed, parsed in ((layer.prefill, rule.prefill), (layer.decode, rule.decode)):
        if printed is None:
            assert parsed is None
            continue
        assert parsed.name == printed.policy
        assert {p.name: p.value for p in parsed.parameters} == printed.params
        assert (parsed.budget is None) == (printed.budget is None)
        if isinstance(printed.budget, polykv.budget.Tokens):
            assert parsed.budget == ast.Tokens(printed.budget.count)
        elif printed.budget is not None:
            assert parsed.budget == ast.Percent(printed.budget.percent)


@given(st.sets(st.integers(0, 300), min_size=1, max_size=40))
def test_printed_layer_ranges_select_exactly_those_layers(indices):
    from polykv.language.printer import layer_ranges

    selector = polykv.parse(f"layers {layer_ranges(indices)}: full").items[0].selector
    chosen = set()
    for item in selector.items:
        if isinstance(item, ast.LayerIndex):
            chosen.add(item.index)
        else:
            chosen.update(range(item.start, item.stop + 1))
    assert chosen == indices


def test_a_polykv_that_was_not_installed_says_so_instead_of_failing_inside(monkeypatch):
    """Run from a source folder without installing, the package has no grammar (the repository's grammar/ is put
    inside the package by the install): one clear error, not a ModuleNotFoundError from deep inside."""
    import importlib.resources

    from polykv.errors import PolykvError
    from polykv.language import parse as parsing

    def files(package):
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(importlib.resources, "files", files)
    parsing.lark_parser.cache_clear()
    try:
        with pytest.raises(PolykvError, match=r"grammar is missing .* was not installed .* install it"):
            parsing.lark_parser()
    finally:
        monkeypatch.undo()
        parsing.lark_parser.cache_clear()
    assert parsing.lark_parser() is not None

"""Hypothesis strategies for polykv specs: syntax trees built directly (``specs``), and text from the grammar
(``grammar_text``), for tests of the language and of tools that read specs."""

from __future__ import annotations

from typing import Literal

import hypothesis.strategies as st
from hypothesis.extra.lark import from_lark

from polykv.language import ast
from polykv.language.parse import lark_parser

#: Unicode's category of surrogates, which UTF-8 text cannot hold (written out: mypy takes ("Cs",) for a tuple[str]).
_SURROGATES: tuple[Literal["Cs"]] = ("Cs",)

_NAMES = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
policy_names = _NAMES.filter(lambda name: name not in ast.KEYWORDS)
parameter_names = _NAMES  # keywords are fine as parameter names

values = st.one_of(
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(st.characters(exclude_categories=_SURROGATES)),
)

tokens = st.builds(ast.Tokens, st.integers())
percents = st.builds(ast.Percent, st.integers(min_value=0) | st.floats(min_value=0, max_value=1e6, allow_nan=False))
budgets = st.one_of(tokens, percents, st.builds(ast.AutoBudget))

_index_lists = st.lists(
    st.builds(ast.LayerIndex, st.integers()) | st.builds(ast.LayerRange, st.integers(), st.integers()),
    min_size=1,
    max_size=4,
)
selectors = st.one_of(st.builds(ast.EveryLayer), st.builds(ast.LayerList, _index_lists))
head_lists = st.one_of(
    st.builds(ast.HeadList, _index_lists),
    st.just(ast.HeadList((), every=True)),
    st.just(ast.HeadList((), every=True, adaptive=True)),
)

parameters = st.lists(st.builds(ast.Parameter, parameter_names, values), max_size=3)

policy_uses = st.one_of(
    st.builds(ast.PolicyUse, policy_names, st.none() | budgets, parameters),
    st.builds(
        ast.PolicyUse,
        st.just(ast.AUTO),
        st.none() | budgets,
        parameters,
        st.lists(policy_names, max_size=3),
    ),
)

comment_texts = st.text(st.characters(exclude_categories=_SURROGATES, exclude_characters="\r\n"), max_size=20).map(
    str.rstrip
)
comments = st.none() | comment_texts

statements = st.one_of(
    st.builds(ast.ModelLayers, st.integers(), comments, heads=st.none() | st.integers()),
    st.builds(ast.BudgetDecl, tokens | percents, st.booleans(), comments),
    st.builds(ast.Rule, selectors, policy_uses, st.none() | policy_uses, comments, heads=st.none() | head_lists),
)

items = st.one_of(
    statements,
    statements,
    comment_texts.map(ast.Comment),
    st.builds(ast.BlankLine),
)

specs = st.builds(ast.Spec, st.lists(items, max_size=8))


def _spaced(strategy: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return strategy.map(lambda text: text + " ")


def _grammar_terminals() -> dict[str, st.SearchStrategy[str]]:
    """Every terminal followed by a space, so generated tokens never run together; no comments."""
    explicit = {}
    for terminal in lark_parser().terminals:
        if terminal.name in {"_SEP", "COMMENT"} or terminal.name.startswith("__IGNORE"):
            continue
        if terminal.pattern.type == "str":
            explicit[terminal.name] = st.just(terminal.pattern.value + " ")
        elif terminal.name == "NAME":
            explicit[terminal.name] = _spaced(_NAMES)
        else:
            explicit[terminal.name] = _spaced(st.from_regex(terminal.pattern.to_regexp(), fullmatch=True))
    explicit["COMMENT"] = st.just(" ")
    return explicit


def grammar_text() -> st.SearchStrategy[str]:
    """Text the grammar accepts (it may still fail semantic checks)."""
    return from_lark(lark_parser(), explicit=_grammar_terminals())

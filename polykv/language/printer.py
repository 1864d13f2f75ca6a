"""The canonical text of a spec: one statement per line, `layers` always written, comments kept.

``parse(print_spec(spec)) == spec`` holds for every spec (tests check it as a property).
"""

from __future__ import annotations

import decimal
from collections.abc import Iterable, Sequence
from typing import TypeVar, cast

from polykv.language import ast
from polykv.values import format_use, format_value

T = TypeVar("T")


def print_spec(spec: ast.Spec) -> str:
    """The canonical text of ``spec``, ending with a newline (empty for an empty spec)."""
    lines = [_item(item) for item in spec.items]
    return "".join(line + "\n" for line in lines)


def format_policy(use: ast.PolicyUse) -> str:
    """``name[candidates]@budget(parameters)`` as written in a spec."""
    budget = None if use.budget is None else format_budget(use.budget)
    return format_use(use.name, budget, [(p.name, p.value) for p in use.parameters], use.candidates)


def layer_runs(values: Sequence[T]) -> list[tuple[list[int], T]]:
    """Runs of consecutive layers (by index) holding equal values: the one grouping polykv prints with."""
    runs: list[tuple[list[int], T]] = []
    for index, value in enumerate(values):
        if runs and runs[-1][1] == value:
            runs[-1][0].append(index)
        else:
            runs.append(([index], value))
    return runs


def layer_ranges(indices: Iterable[int]) -> str:
    """``0-3,5,7-9``: sorted layer indices as the language writes a selector."""
    ordered = sorted(set(indices))
    parts: list[str] = []
    start = previous = None
    for index in [*ordered, None]:
        # previous is set whenever start is.
        if start is not None and (index is None or index != cast(int, previous) + 1):
            parts.append(str(start) if start == previous else f"{start}-{previous}")
            start = None
        if index is not None and start is None:
            start = index
        previous = index
    return ",".join(parts)


def format_budget(budget: ast.Budget) -> str:
    if isinstance(budget, ast.Tokens):
        return str(budget.count)
    if isinstance(budget, ast.Percent):
        return f"{_positional(budget.value)}%"
    return ast.AUTO


def format_selector(selector: ast.Selector | ast.HeadList) -> str:
    if getattr(selector, "adaptive", False):
        return "adaptive"
    if isinstance(selector, ast.EveryLayer) or getattr(selector, "every", False):
        return "*"
    return ",".join(
        str(item.index) if isinstance(item, ast.LayerIndex) else f"{item.start}-{item.stop}" for item in selector.items
    )


def _positional(value: int | float) -> str:
    """A number without an exponent (percentages are written that way), exact for floats."""
    if isinstance(value, int):
        return str(value)
    text = format(decimal.Decimal(repr(value)), "f")
    return text if "." in text else text + ".0"


def _item(item: ast.Item) -> str:
    if isinstance(item, ast.Comment):
        return "#" + item.text
    if isinstance(item, ast.BlankLine):
        return ""
    return _with_comment(_statement(item), item.comment)


def _statement(statement: ast.Statement) -> str:
    if isinstance(statement, ast.ModelLayers):
        heads = "" if statement.heads is None else f" heads {statement.heads}"
        return f"model layers {statement.count}{heads}"
    if isinstance(statement, ast.SolverDecl):
        parameters = ", ".join(f"{p.name}={format_value(p.value)}" for p in statement.parameters)
        return f"solver {statement.name}" + (f"({parameters})" if statement.parameters else "")
    if isinstance(statement, ast.PrefillLimit):
        return f"prefill <= {_positional(statement.factor).removesuffix('.0')}x"
    if isinstance(statement, ast.BudgetDecl):
        total = "total " if statement.total else ""
        return f"budget {total}{format_budget(statement.amount)}"
    heads = "" if statement.heads is None else f" heads {format_selector(statement.heads)}"
    text = f"layers {format_selector(statement.selector)}{heads}: {format_policy(statement.prefill)}"
    if statement.decode is not None:
        text += f" decode {format_policy(statement.decode)}"
    return text


def _with_comment(text: str, comment: str | None) -> str:
    return text if comment is None else f"{text}  #{comment}"

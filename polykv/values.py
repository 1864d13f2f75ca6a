"""The values a policy parameter can take, the words the language reserves, and how values are written.

Policies, the registry and the language all need these; keeping them here means none of them has
to import the syntax tree to know what a parameter value or a valid policy name is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Final

#: A parameter value as the language writes it: `true`, `3`, `0.5`, `"max"`.
Value = bool | int | float | str

#: Where the question is when a cache is compressed: inside the compressed prompt, or asked after the
#: compressed context (as when one context serves several questions). Profiles are measured for one.
SETTINGS = ("question", "context")

#: What calibration minimises, and so what routing optimises: the KL divergence from the full cache's
#: next-token distribution, or (for a speculative draft) the share of proposals the full cache refuses.
OBJECTIVES = ("kl", "acceptance")

#: The keyword that asks the router (or the budget solver) to decide.
AUTO: Final = "auto"

#: Words of the language that cannot name a policy.
KEYWORDS = frozenset(
    {"layers", "model", "budget", "total", "decode", "auto", "true", "false", "solver", "prefill", "heads"}
)

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def is_name(text: str) -> bool:
    """Whether ``text`` is a name of the language (letters, digits and _, not starting with a digit)."""
    return bool(_NAME.match(text))


def format_value(value: Value) -> str:
    """``value`` as the language writes it: ``true``, ``3``, ``0.5``, ``"max"``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    return repr(value)


def describe_value(value: object) -> str:
    """``a whole number (3)``: what kind of value ``value`` is, for error messages."""
    kinds = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string"}
    kind = kinds.get(type(value), type(value).__name__)
    shown = format_value(value) if isinstance(value, (bool, int, float, str)) else repr(value)
    return f"{kind} ({shown})"


def format_use(
    name: str,
    budget: str | None,
    parameters: Mapping[str, Value] | Sequence[tuple[str, Value]],
    candidates: Sequence[str] = (),
) -> str:
    """A policy use in the language's order, ``snapkv@256(window=32, kernel=7)``: the one way polykv
    writes a policy with its budget and parameters, so that whatever it prints parses back."""
    pairs = list(parameters.items()) if isinstance(parameters, Mapping) else list(parameters)
    text = name
    if candidates:
        text += "[" + ", ".join(candidates) + "]"
    if budget is not None:
        text += "@" + budget
    if pairs:
        text += "(" + ", ".join(f"{key}={format_value(value)}" for key, value in pairs) + ")"
    return text

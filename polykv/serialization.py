"""One converter for every document polykv writes: plans and profiles, as JSON.

attrs classes are written field by field (cattrs), so a record gains a field without a new pair of
functions. A budget is ``{"tokens": 64}`` or ``{"percent": 10}``, and a loss that a policy cannot
reach (``math.inf``) is ``null``. Reading is strict: every value must have its field's type (no
``8.9`` read as 8, no number read as a name), unknown fields are refused, and the error names the
field's path (``$.layers[3].prefill.budget.tokens``). Each document carries a format number; one
this polykv does not know is refused with the number it reads.
"""

from __future__ import annotations

import json
import math
from typing import Any, NewType, TypeVar

import cattrs
from cattrs.errors import ClassValidationError, ForbiddenExtraKeysError, IterableValidationError

from polykv.budget import Budget, Share, Tokens
from polykv.errors import PolykvError
from polykv.values import Value

T = TypeVar("T")

#: A measured loss: a float, or math.inf where a policy cannot take a budget (written as null).
Loss = NewType("Loss", float)


class FormatError(PolykvError, ValueError):
    """A document (plan or profile) that is not JSON, not of a known format, or has a wrong field."""


converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(kind: type, words: str):
    def structure(value: object, _type: object) -> Any:
        if isinstance(value, bool) and kind is not bool:
            raise TypeError(f"expected {words}, got {json.dumps(value)}")
        if kind is float and isinstance(value, int):
            return float(value)
        if not isinstance(value, kind):
            raise TypeError(f"expected {words}, got {_shown(value)}")
        if isinstance(value, float) and not math.isfinite(value):  # only where kind is float
            raise ValueError(f"expected a finite number, got {value!r}")
        return value

    return structure


converter.register_structure_hook(int, _strict(int, "a whole number"))
converter.register_structure_hook(float, _strict(float, "a number"))
converter.register_structure_hook(str, _strict(str, "a string"))
converter.register_structure_hook(bool, _strict(bool, "true or false"))


def _structure_value(value: object, _type: object) -> Value:
    if not isinstance(value, (bool, int, float, str)):
        raise TypeError(f"expected a parameter value (a number, true, false or a string), got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return value


converter.register_structure_hook(Value, _structure_value)


def _unstructure_budget(budget: Budget) -> dict:
    return {"tokens": budget.count} if isinstance(budget, Tokens) else {"percent": budget.percent}


def _structure_budget(data: object, _type: object) -> Budget:
    if isinstance(data, dict) and set(data) == {"tokens"}:
        return Tokens(converter.structure(data["tokens"], int))
    if isinstance(data, dict) and set(data) == {"percent"}:
        return Share(converter.structure(data["percent"], float))
    raise TypeError(f'expected a budget, {{"tokens": N}} or {{"percent": P}}, got {_shown(data)}')


for _kind in (Tokens, Share):
    converter.register_unstructure_hook(_kind, _unstructure_budget)
converter.register_structure_hook(Budget, _structure_budget)
converter.register_structure_hook(
    Budget | None, lambda data, _type: None if data is None else _structure_budget(data, _type)
)


def _structure_loss(value: object, _type: object) -> float:
    return math.inf if value is None else converter.structure(value, float)


converter.register_structure_hook(Loss, _structure_loss)
converter.register_unstructure_hook(float, lambda value: None if math.isinf(value) else value)


def document(record: object, *, format: int) -> dict:
    """``record`` (an attrs record) as a JSON-ready dict, with its format number first."""
    return {"format": format, **converter.unstructure(record)}


def dumps(record: object, *, format: int) -> str:
    """``record`` as indented JSON text (see ``document``)."""
    return json.dumps(document(record, format=format), indent=1) + "\n"


def loads(text: str | bytes, cls: type[T], *, format: int, what: str, source: str = "<string>") -> T:
    """The ``cls`` record in JSON ``text`` of format ``format``; FormatError names the source and field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise FormatError(f"{source}:{error.lineno}:{error.colno}: not JSON: {error.msg}") from None
    except (TypeError, ValueError) as error:  # ValueError: not UTF-8, or a number past the int-to-string limit
        raise FormatError(f"{source}: not JSON text polykv reads: {error}") from None
    return structure(data, cls, format=format, what=what, source=source)


def structure(data: object, cls: type[T], *, format: int, what: str, source: str = "<string>") -> T:
    """``cls`` from parsed JSON ``data`` (see ``loads``)."""
    if not isinstance(data, dict):
        raise FormatError(f"{source}: not a polykv {what}: expected a JSON object, got {_shown(data)}")
    if data.get("format") != format:
        found = json.dumps(data["format"]) if "format" in data else "none"
        raise FormatError(
            f"{source}: not a polykv {what} of format {format}, the one this polykv reads "
            f"(found format {found}): make it again with this version of polykv"
        )
    fields = {key: value for key, value in data.items() if key != "format"}
    try:
        return converter.structure(fields, cls)
    except (ClassValidationError, IterableValidationError, ForbiddenExtraKeysError) as error:
        raise FormatError(f"{source}: not a valid {what}: {_first_problem(error)}") from None
    except (TypeError, ValueError, KeyError) as error:
        raise FormatError(f"{source}: not a valid {what}: {error}") from None


def _first_problem(error: Exception) -> str:
    """``$.layers[3].index: expected a whole number, got "1"``: the first problem, path first."""
    problems = cattrs.transform_error(error, path="$", format_exception=_described)
    message, _, path = problems[0].rpartition(" @ ")
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    if message.startswith(f"{path}."):  # a record's own check names the field's path already
        return f"{message}{extra}"
    return f"{path}: {message}{extra}"


def _described(error: BaseException, _type: object) -> str:
    if isinstance(error, KeyError):
        return "required field missing"
    if isinstance(error, ForbiddenExtraKeysError):
        return f"unknown field(s) {', '.join(sorted(error.extra_fields))}"
    return str(error) or type(error).__name__


def _shown(value: object) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

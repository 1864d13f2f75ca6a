"""Typed, documented parameters for the things a spec names: policies and solvers.

A class declares each parameter once, as an annotated class attribute::

    class SnapKV(ScoringPolicy):
        window: int = parameter(default=32, description="the last queries that score tokens", min=1, max=4096)

and gets from it the ``parameters`` table (what ``polykv policies`` prints and the checker
validates against), a keyword constructor that checks every value, and ``self.window`` typed for
IDEs and type checkers (``typing.dataclass_transform`` tells them ``parameter`` declares a field).
Give ``default=`` by keyword: a type checker reads a field's default only from that keyword (PEP
681), so with a positional default ``SnapKV()`` looks to it like a call missing ``window``.
A subclass that differs only in a default assigns the new value, and keeps the description and
bounds it inherits::

    class PyramidKV(SnapKV):
        window = 8

Instances are immutable and compare by their parameter values. No decorator is needed and a
class stays a plain class: the declarations are read once, when the class is created, and a
malformed one fails there with a message that names it.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

import attrs

from polykv.converters import strings
from polykv.values import Value, describe_value, format_value

_TYPE_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
_TYPES = {"int": int, "float": float, "bool": bool, "str": str, int: int, float: float, bool: bool, str: str}


class ParameterError(ValueError):
    """A parameter value that is not accepted; ``hint`` says what would be."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


def _known_type(instance: Param, _attribute: attrs.Attribute, value: type) -> None:
    if value not in _TYPE_WORDS:
        raise TypeError(f"parameter {instance.name!r}: type must be int, float, bool or str, not {value!r}")


@attrs.frozen
class Param:
    """One declared parameter: its type, default, allowed range or choices, and meaning."""

    name: str
    type: type = attrs.field(validator=_known_type)
    default: Value
    description: str
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = attrs.field(default=(), converter=strings)

    def coerce(self, value: Value) -> Value:
        """``value`` as this parameter's type; raises ParameterError naming what is expected."""
        kind = self.type
        if kind is bool:
            ok = isinstance(value, bool)
        elif kind is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, str)
        if not ok:
            raise ParameterError(
                f"parameter '{self.name}' takes {_TYPE_WORDS[kind]}, got {describe_value(value)}",
                hint=f"for example {self.name}={format_value(self.default)}",
            )
        if kind is float:
            value = self._finite(typing.cast(float, value))  # a number: anything else was refused above
        if self.choices and value not in self.choices:
            options = ", ".join(format_value(c) for c in self.choices)
            raise ParameterError(
                f"parameter '{self.name}' is one of {options}, got {format_value(value)}",
                hint=f"for example {self.name}={format_value(self.choices[0])}",
            )
        number = typing.cast(float, value)  # bounds are declared for numbers
        if (self.min is not None and number < self.min) or (self.max is not None and number > self.max):
            raise ParameterError(f"parameter '{self.name}' must be {self.range_words()}, got {format_value(value)}")
        return value

    def _finite(self, value: int | float) -> float:
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ParameterError(f"parameter '{self.name}' takes a finite number, got {format_value(value)}")
        return number

    def range_words(self) -> str:
        if self.min is not None and self.max is not None:
            return f"between {_number(self.min)} and {_number(self.max)}"
        if self.min is not None:
            return f"at least {_number(self.min)}"
        if self.max is not None:
            return f"at most {_number(self.max)}"
        return "any value"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


@attrs.frozen
class _Declared:
    """What ``parameter()`` leaves in a class body until the class is created."""

    default: Value
    description: str
    min: float | None
    max: float | None
    choices: tuple[str, ...]


def parameter(
    default: Value,
    description: str,
    *,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] = (),
) -> Any:
    """Declare a parameter of a policy or solver (see the module docstring): its default, meaning and bounds.
    Pass ``default=`` by keyword, which is where type checkers read it (the module docstring says why)."""
    return _Declared(default, description, min, max, tuple(choices))


@typing.dataclass_transform(kw_only_default=True, field_specifiers=(parameter,))
class Configurable:
    """Base of classes a spec names with parameters: ``name(param=value, ...)``.

    Subclasses set ``name`` and declare parameters with ``parameter``. ``self.values`` maps every
    parameter to its value, defaults included.
    """

    name: ClassVar[str]
    parameters: ClassVar[tuple[Param, ...]] = ()
    _values: Mapping[str, Value]  # set once, by __init__ (instances are immutable)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "parameters" in cls.__dict__:
            raise TypeError(
                f"{cls.__qualname__}: declare each parameter as `name: type = parameter(default=..., description=...)` "
                "instead of assigning `parameters`"
            )
        declared = {param.name: param for param in cls.parameters}  # inherited: not set in this body
        annotations = inspect.get_annotations(cls)
        for attribute, value in list(cls.__dict__.items()):
            if isinstance(value, _Declared):
                declared[attribute] = _param(cls, attribute, annotations.get(attribute), value)
                setattr(cls, attribute, declared[attribute].default)
            elif attribute in declared:  # a new default for an inherited parameter
                try:
                    default = declared[attribute].coerce(value)
                except ParameterError as error:
                    raise TypeError(f"{cls.__qualname__}: the default of {error}") from None
                declared[attribute] = attrs.evolve(declared[attribute], default=default)
        cls.parameters = tuple(declared.values())

    def __init__(self, **values: Value):
        declared = {param.name: param for param in self.parameters}
        unknown = sorted(set(values) - set(declared))
        if unknown:
            raise ParameterError(f"{self.name} has no parameter '{unknown[0]}'")
        resolved = {
            name: param.coerce(values[name]) if name in values else param.default for name, param in declared.items()
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        object.__setattr__(self, "_values", types.MappingProxyType(resolved))

    @property
    def values(self) -> Mapping[str, Value]:
        """Every parameter's value, defaults included, in declaration order."""
        return self._values

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.name} is immutable: make a new one with other parameters")

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and dict(other.values) == dict(self.values)

    def __hash__(self) -> int:
        return hash((type(self), tuple(self.values.items())))

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={format_value(v)}" for k, v in self.values.items())
        return f"{self.name}({settings})" if settings else self.name

    def __reduce__(self) -> tuple:
        # Made again from its values, so that copy.deepcopy and pickle work (a cache holds its policies).
        return _configured, (type(self), dict(self.values))


def _configured(cls: type[Configurable], values: dict[str, Value]) -> Configurable:
    return cls(**values)


def _param(cls: type, attribute: str, annotation: object, declared: _Declared) -> Param:
    kind = _TYPES.get(annotation)
    if kind is None:
        raise TypeError(
            f"{cls.__qualname__}.{attribute}: annotate a parameter with int, float, bool or str (found {annotation!r})"
        )
    if kind in (str, bool) and (declared.min is not None or declared.max is not None):
        choices = " (give a str parameter choices)" if kind is str else ""
        raise TypeError(
            f"{cls.__qualname__}.{attribute}: min and max bound numbers, and {attribute} is a {kind.__name__}{choices}"
        )
    for bound, value in (("min", declared.min), ("max", declared.max)):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and not (number and math.isfinite(value)):
            raise TypeError(f"{cls.__qualname__}.{attribute}: {bound} is a finite number or None, got {value!r}")
    param = Param(attribute, kind, declared.default, declared.description, declared.min, declared.max, declared.choices)
    try:
        param.coerce(param.default)
    except ParameterError as error:
        raise TypeError(f"{cls.__qualname__}: the default of {error}") from None
    return param

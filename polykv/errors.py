"""The exception types of polykv. Every error polykv raises on purpose is a PolykvError.

Errors about what a caller passed are also the built-in type an ``except`` clause would expect:
an ``ArgumentError`` is a ValueError, an ``ArgumentTypeError`` also a TypeError.
"""


class PolykvError(Exception):
    """Base of the errors polykv raises on purpose."""


class ArgumentError(PolykvError, ValueError):
    """An argument of a public function or method has a value it cannot take; the message names the
    argument, what was given and what is expected."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument of a public function or method is of the wrong type."""


class CacheError(PolykvError):
    """A PolyCache was used in a way it cannot serve (empty prompt, model not prepared, wrong state, ...)."""


class PolicyError(PolykvError):
    """A policy returned something the cache cannot use (wrong shape, padding kept, duplicates)."""


class ModelError(PolykvError):
    """A model polykv cannot work with, or cannot find (unsupported attention, missing files)."""

"""The exception types of polykv. Every error polykv raises on purpose is a PolykvError."""


class PolykvError(Exception):
    """Base of the errors polykv raises on purpose."""


class CacheError(PolykvError):
    """A PolyCache was used in a way it cannot serve (empty prompt, model not prepared, ...)."""


class PolicyError(PolykvError):
    """A policy returned something the cache cannot use (wrong shape, padding kept, duplicates)."""


class ModelError(PolykvError):
    """A model polykv cannot work with, or cannot find (unsupported attention, missing files)."""

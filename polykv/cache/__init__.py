"""The cache engine: PolyCache, its layers, and the attention function that serves them."""

from polykv.cache.cache import PolyCache
from polykv.cache.layer import PhaseRule, PolyLayer
from polykv.cache.preparation import Prepared, is_prepared, prepare_model, prepared, restore_model

__all__ = [
    "PhaseRule",
    "PolyCache",
    "PolyLayer",
    "Prepared",
    "is_prepared",
    "prepare_model",
    "prepared",
    "restore_model",
]

"""The cache engine: PolyCache, its layers, and the attention function that serves them."""

from polykv.cache.attention import is_prepared, prepare_model, restore_model
from polykv.cache.cache import PolyCache
from polykv.cache.layer import PhaseRule, PolyLayer

__all__ = ["PhaseRule", "PolyCache", "PolyLayer", "is_prepared", "prepare_model", "restore_model"]

"""Models: finding and loading them offline (``load``), and describing a loaded one (``describe``)."""

from polykv.model.describe import (
    LayerPlacement,
    ModelInfo,
    attention_modules,
    cache_argument,
    describe_model,
    sliding_windows,
)
from polykv.model.load import (
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_PACKAGE,
    ModelLocation,
    default_model_location,
    kv_head_count,
    layer_count,
    load_default_model,
    load_model,
    locate,
)

__all__ = [
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_PACKAGE",
    "LayerPlacement",
    "ModelInfo",
    "ModelLocation",
    "attention_modules",
    "cache_argument",
    "default_model_location",
    "describe_model",
    "kv_head_count",
    "layer_count",
    "load_default_model",
    "load_model",
    "locate",
    "sliding_windows",
]

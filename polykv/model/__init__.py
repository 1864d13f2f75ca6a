"""Models: finding and loading them offline (``load``, the bundled one converted once: ``converted``), and
describing a loaded one (``describe``)."""

from polykv.model.describe import (
    LayerPlacement,
    ModelInfo,
    attention_modules,
    cache_argument,
    describe_model,
    model_name,
    sliding_windows,
)
from polykv.model.load import (
    DEFAULT,
    DEFAULT_MODEL_FILE,
    DEFAULT_MODEL_NAME,
    DEFAULT_MODEL_PACKAGE,
    ModelLocation,
    default_model_location,
    kv_head_count,
    layer_count,
    load_default_model,
    load_model,
    load_tokenizer,
    load_weights,
    locate,
)

__all__ = [
    "DEFAULT",
    "DEFAULT_MODEL_FILE",
    "DEFAULT_MODEL_NAME",
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
    "load_tokenizer",
    "load_weights",
    "locate",
    "model_name",
    "sliding_windows",
]

"""What polykv needs to know of a loaded model: its geometry, and where each layer's attention lives.

Plans, profiles and captures describe a model this way; nothing here loads or changes one.
"""

from __future__ import annotations

import functools
import inspect
from pathlib import Path

import attrs
import torch

from polykv.errors import ModelError

#: What polykv's attention functions are registered as: ``polykv_sdpa`` wraps ``sdpa`` (``polykv.cache.attention``).
PREFIX = "polykv_"


@attrs.frozen
class ModelInfo:
    """What a plan needs to know of a model: its name and attention geometry."""

    name: str
    layers: int
    query_heads: int
    kv_heads: int
    head_dim: int
    attention: str

    def geometry(self) -> str:
        return f"{self.layers} layers, {self.query_heads} query and {self.kv_heads} KV heads of size {self.head_dim}"


@attrs.frozen
class LayerPlacement:
    """Where one decoder layer's attention lives, and what it can see (None: every earlier token)."""

    device: str
    dtype: str
    sliding_window: int | None = None


def describe_model(model) -> tuple[ModelInfo, dict[int, LayerPlacement]]:
    """The model's geometry, and each decoder layer's device, dtype and sliding window."""
    config = model.config.get_text_config()
    query_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // query_heads
    info = ModelInfo(
        name=model_name(getattr(config, "_name_or_path", "")) or type(model).__name__,
        layers=config.num_hidden_layers,
        query_heads=query_heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or query_heads,
        head_dim=head_dim,
        attention=kernel_name(model),
    )
    windows = sliding_windows(config, type(model).__name__)
    modules = attention_modules(model)
    missing = [i for i in range(info.layers) if i not in modules]
    if missing:
        raise ModelError(f"cannot find the attention modules of layers {missing[:5]} in {type(model).__name__}")
    hooked = _execution_devices(model)
    placement = {}
    for index, module in modules.items():
        parameter = next(module.parameters())
        device = next((hooked[part] for part in module.modules() if part in hooked), str(parameter.device))
        placement[index] = LayerPlacement(device, str(parameter.dtype).removeprefix("torch."), windows[index])
    return info, placement


def model_name(name_or_path: str) -> str:
    """What plans, profiles and messages call a model: a hub id as it is; for a path on this machine, the hub
    id it was downloaded as (a hub cache's ``models--org--name`` folder) or else the folder's own name. A
    path means nothing on another machine, where plans and profiles are read."""
    if not name_or_path:
        return ""
    path = Path(name_or_path).expanduser()
    if not (path.is_absolute() or path.exists() or name_or_path.startswith(".")):
        return name_or_path  # a hub id: org/name
    for part in reversed(path.parts):
        if part.startswith("models--"):
            return part.removeprefix("models--").replace("--", "/")
    return path.resolve().name


def _execution_devices(model) -> dict[torch.nn.Module, str]:
    """Where accelerate's hooks (``device_map``, offloading) run each module: offloaded weights rest on
    the CPU or meta, but the layer computes, and its cache lives, on the hook's execution device (a
    hook on a module covers its children; offloading hooks each projection)."""
    found: dict[torch.nn.Module, str] = {}

    def visit(module: torch.nn.Module, inherited: str | None) -> None:
        device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
        here = str(torch.device(device)) if device is not None else inherited
        if here is not None:
            found[module] = here
        for child in module.children():
            visit(child, here)

    visit(model, None)
    return found


def sliding_windows(config, model_name: str) -> list[int | None]:
    """Each layer's sliding window (None for full attention), classified the way transformers' cache does."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    kinds, arguments = get_layer_types_and_kwargs(config)
    if len(kinds) != config.num_hidden_layers:
        raise ModelError(
            f"{model_name} shares KV caches between layers ({len(kinds)} caches for {config.num_hidden_layers} "
            "layers); polykv needs one cache per layer"
        )
    # transformers 5.17 gives one dict for every layer, newer releases one dict per layer.
    per_layer = arguments if isinstance(arguments, list) else [arguments] * len(kinds)
    windows: list[int | None] = []
    for index, (kind, layer_arguments) in enumerate(zip(kinds, per_layer)):
        if kind == "full_attention":
            windows.append(None)
        elif kind == "sliding_attention":
            windows.append(int(layer_arguments["sliding_window"]))
        else:
            raise ModelError(
                f"layer {index} of {model_name} uses {kind!r} layers; polykv handles full and sliding-window "
                "attention layers"
            )
    return windows


def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of each decoder layer, by layer index (those with weights and a GQA group size)."""
    return {
        module.layer_idx: module
        for module in model.modules()
        if getattr(module, "layer_idx", None) is not None
        and hasattr(module, "num_key_value_groups")
        and next(module.parameters(), None) is not None
    }


def positions(model) -> int | None:
    """The most positions the model was made for (``max_position_embeddings``), or None when it does not say."""
    found = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    return found if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None


def kernel_name(model) -> str:
    """The attention kernel the model runs (``sdpa`` or ``eager``), with or without polykv."""
    return model.config._attn_implementation.removeprefix(PREFIX)


#: The forward's keyword that also names a PolyCache in static decoding: transformers hands a forward's extra
#: keywords on to the attention function, which finds the cache's layers through it (``PolyCache.update``).
STATIC_CACHE_KEYWORD = "polykv_static_cache"


def cache_argument(model, cache) -> dict:
    """``{keyword: cache}`` for ``model(...)`` and ``model.generate(...)``: transformers 5.24 takes the cache as
    ``cache`` and warns about ``past_key_values``, which earlier releases take (``model(ids, **cache_argument(model,
    cache))`` works with both). A PolyCache in static decoding is named by ``STATIC_CACHE_KEYWORD`` too."""
    # A class is hashable; mypy reads its __hash__ as the instances' unbound one (python/mypy#20409).
    arguments = {_cache_keyword(type(model)): cache}  # type: ignore[arg-type]
    if getattr(cache, "in_static_decoding", False):
        arguments[STATIC_CACHE_KEYWORD] = cache
    return arguments


@functools.cache
def _cache_keyword(model_class: type[torch.nn.Module]) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"

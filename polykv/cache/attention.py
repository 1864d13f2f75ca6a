"""polykv's attention function: lets layers of different lengths attend correctly, and compress.

transformers builds one attention mask per forward pass, sized for one layer, so eager and SDPA
attention cannot serve layers holding different numbers of tokens. polykv registers its own
attention function (``polykv_sdpa`` or ``polykv_eager``, wrapping the model's kernel): for a
layer of a PolyCache it fits the mask to that layer, runs the kernel, then hands the layer the
queries it needs to choose what to keep. For anything else it is the wrapped kernel, unchanged.

The cache tells the function which layer it is serving through a context variable set in
``PolyCache.update``: the function checks that the keys it received are the very tensor that
update returned, so a stale hand-off can never be mistaken for the current one.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable

import attrs
import torch

from polykv.errors import ModelError

PREFIX = "polykv_"
SUPPORTED = ("sdpa", "eager")


@attrs.frozen
class Handoff:
    """The layer that just returned ``keys`` from ``update``."""

    layer: object  # PolyLayer; typed loosely to keep this module free of the cache's imports
    keys: torch.Tensor


_HANDOFF: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar("polykv_handoff", default=None)


def hand_over(layer: object, keys: torch.Tensor) -> None:
    _HANDOFF.set(Handoff(layer, keys))


def _kernel(inner: str, module: torch.nn.Module) -> Callable:
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"{type(module).__name__} has no eager_attention_forward; use sdpa attention")
    return eager


def _attention_function(inner: str) -> Callable:
    def polykv_attention(module, query, key, value, attention_mask, **kwargs):
        kernel = _kernel(inner, module)
        handoff = _HANDOFF.get()
        if handoff is None or handoff.keys is not key or handoff.layer.index != module.layer_idx:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        _HANDOFF.set(None)
        layer = handoff.layer
        mask = layer.attention_mask(attention_mask, query.shape[-2], query.shape[1])
        output = kernel(module, query, key, value, mask, **kwargs)
        scaling = kwargs.get("scaling")
        layer.after_attention(query, attention_mask, module.scaling if scaling is None else scaling)
        return output

    polykv_attention.__name__ = f"{PREFIX}{inner}_attention"
    return polykv_attention


def prepare_model(model: torch.nn.Module) -> torch.nn.Module:
    """Route ``model``'s attention through polykv (SDPA or eager kept as the kernel); returns the model.

    Outputs without a PolyCache are unchanged. Calling it again does nothing.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return model
    if current not in SUPPORTED:
        raise ModelError(
            f"the model uses {current!r} attention; polykv works with {' or '.join(SUPPORTED)} "
            "(load it with attn_implementation='sdpa')"
        )
    name = PREFIX + current
    AttentionInterface.register(name, _attention_function(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ModelError(f"{type(model).__name__} does not let polykv set its attention function")
    return model


def kernel_name(model: torch.nn.Module) -> str:
    """The attention kernel the model runs (``sdpa`` or ``eager``), with or without polykv."""
    return model.config._attn_implementation.removeprefix(PREFIX)

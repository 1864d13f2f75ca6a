"""Preparing a model for PolyCaches, and giving it back as it was.

Three things change on a prepared model: its attention implementation becomes polykv's wrapper
around the same kernel (``polykv_sdpa``, see ``attention``), which fits the mask to each layer and
hands the layer its queries; ``generate``'s prefill tells a PolyCache where the prompt starts and
ends (``PolyCache.prompt``), so the cache never guesses it from the size of a chunk; and each
forward tells the PolyCache it is given which model runs it (hooks), so that the cache can ask
the model to repeat a prompt when a policy scores that way. Without a PolyCache a prepared model
computes exactly what it did before. ``restore_model`` undoes both;
``prepared(model)`` returns a handle that does it on exit from a ``with`` block.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from polykv.cache.attention import SUPPORTED, attention_function
from polykv.cache.cache import PolyCache
from polykv.errors import ArgumentError, CacheError, ModelError
from polykv.model.describe import PREFIX, kernel_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def prepare_model(model: PreTrainedModel) -> bool:
    """Route ``model``'s attention through polykv (SDPA or eager kept as the kernel), and let its
    ``generate`` tell PolyCaches where prompts end.

    Returns True if the model was changed, False if it was already prepared. Outputs without a
    PolyCache are unchanged; ``restore_model`` undoes it.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    current = model.config._attn_implementation
    if current.startswith(PREFIX):
        return False
    if current not in SUPPORTED:
        raise ModelError(
            f"the model uses {current!r} attention; polykv works with {' or '.join(SUPPORTED)} "
            "(load it with attn_implementation='sdpa')"
        )
    name = PREFIX + current
    AttentionInterface.register(name, attention_function(current))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    model.set_attn_implementation(name)
    if model.config._attn_implementation != name:
        raise ModelError(f"{type(model).__name__} does not let polykv set its attention function")
    prefill = getattr(type(model), "_prefill", None)  # generate's prefill, where the model and transformers have one
    if prefill is not None:
        model._prefill = _announcing(prefill.__get__(model))
    # torch types Module.__setattr__ for tensors and modules only; any other value is kept as a plain attribute.
    model._polykv_hooks = (  # type: ignore[assignment]
        model.register_forward_pre_hook(_before_forward, with_kwargs=True),
        model.register_forward_hook(_after_forward, with_kwargs=True),
    )
    return True


def restore_model(model: PreTrainedModel) -> None:
    """Give ``model`` back the attention implementation (and the ``generate``) it had before ``prepare_model``."""
    if is_prepared(model):
        model.set_attn_implementation(kernel_name(model))
    model.__dict__.pop("_prefill", None)
    for hook in model.__dict__.pop("_polykv_hooks", ()):
        hook.remove()


def is_prepared(model: PreTrainedModel) -> bool:
    return model.config._attn_implementation.startswith(PREFIX)


class Prepared:
    """A model prepared for polykv; as a context manager it gives the model its own attention back on exit
    (only if preparing changed it: a model that was prepared before stays prepared)."""

    def __init__(self, model: PreTrainedModel, changed: bool):
        self.model = model
        self.changed = changed

    def __enter__(self) -> PreTrainedModel:
        return self.model

    def __exit__(self, *exc) -> None:
        if self.changed:
            restore_model(self.model)


def prepared(model: PreTrainedModel) -> Prepared:
    """Prepare ``model`` (``prepare_model``) and return the handle that restores it."""
    return Prepared(model, prepare_model(model))


def _announcing(prefill):
    """``generate``'s prefill, run as one prompt of the PolyCache it is given (chunked or not)."""

    @functools.wraps(prefill)
    def announced(input_ids, generation_config, model_kwargs, *args, **kwargs):
        cache = _cache_in(model_kwargs)
        if cache is None:
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)
        _check_generate_inputs(input_ids, getattr(generation_config, "prefill_chunk_size", None), cache)
        with cache.prompt(length=input_ids.shape[1] if input_ids is not None and input_ids.ndim == 2 else None):
            return prefill(input_ids, generation_config, model_kwargs, *args, **kwargs)

    return announced


def _cache_in(kwargs: dict) -> PolyCache | None:
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache if isinstance(cache, PolyCache) else None


def _before_forward(model, args, kwargs):
    cache = _cache_in(kwargs)
    if cache is not None:
        if kwargs.get("use_cache") is False:
            raise CacheError(
                "use_cache=False was given with a PolyCache: without a cache every step feeds the whole sequence "
                "again, and the cache would store it again; drop use_cache=False, or pass no cache"
            )
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache.before_forward(model, ids, kwargs.get("attention_mask"))


def _after_forward(model, args, kwargs, output):
    cache = _cache_in(kwargs)
    if cache is not None:
        cache.after_forward()


def _check_generate_inputs(input_ids: torch.Tensor, chunk: object, cache: PolyCache) -> None:
    """What transformers would fail on with a shape error, said in words first."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ArgumentError(f"prefill_chunk_size is a whole number of tokens of at least 1, or None; got {chunk!r}")
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[0] == 0:
        raise CacheError("the batch is empty: generate got 0 rows of input_ids")
    if input_ids is not None and input_ids.ndim == 2 and input_ids.shape[1] <= cache.get_seq_length():
        raise CacheError("the prompt is empty: generate got no tokens beyond what the cache holds")

"""polykv's attention function: lets layers of different lengths attend correctly, and compress.

transformers builds one attention mask per forward pass, sized for one layer, so eager and SDPA
attention cannot serve layers holding different numbers of tokens. polykv registers its own
attention function (``polykv_sdpa`` or ``polykv_eager``, wrapping the model's kernel): for a
layer of a PolyCache it fits the mask to that layer, runs the kernel, then hands the layer the
queries it needs to choose what to keep. For anything else it is the wrapped kernel, unchanged.

Preparing a model (``polykv.cache.preparation``) switches its attention implementation to this
wrapper. A cache used with a model that was not prepared notices in the same forward pass: every
layer's update must be followed by this function before the next layer's update.

The cache tells the function which layer it is serving through a context variable set in
``PolyCache.update``: the function checks that the keys it received are the very tensor that
update returned, so a stale hand-off can never be mistaken for the current one.

``torch.compile`` cannot read a context variable. A layer in static decoding therefore takes another
way, which it traces (``polykv.decoding.compiled``): its update notes the layer on the cache, and the
function takes it from the cache that the forward's keyword ``STATIC_CACHE_KEYWORD`` names
(``cache_argument`` adds it in static decoding). Every other PolyCache layer stays eager, but a
prepared model with transformers' own caches must still compile whole (``generate``'s compiled
StaticCache): a plain count of pending hand-offs says whether any can be waiting; at zero the
function is the wrapped kernel, traced with the rest of the forward, otherwise the eager function
reads the context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
from collections.abc import Callable

import attrs
import torch
import torch.nn.attention

from polykv.cache.inputs import Visibility
from polykv.cache.kernels import column_sums
from polykv.cache.kernels.decode_attention import decode_attention_op
from polykv.errors import ModelError
from polykv.model.describe import PREFIX, STATIC_CACHE_KEYWORD

SUPPORTED = ("sdpa", "eager")


@attrs.frozen
class Handoff:
    """The layer of ``cache`` that just returned ``keys`` from ``update``."""

    cache: object  # PolyCache; typed loosely to keep this module free of the cache's imports
    layer: object  # PolyLayer
    keys: torch.Tensor


_HANDOFF: contextvars.ContextVar[Handoff | None] = contextvars.ContextVar("polykv_handoff", default=None)
#: How many contexts (threads, tasks) hold a hand-off not yet taken: a module global, which compiled code can read.
_PENDING = 0
_PENDING_LOCK = threading.Lock()


def _count_pending(change: int) -> None:
    global _PENDING
    with _PENDING_LOCK:
        _PENDING += change


def hand_over(cache: object, layer: object, keys: torch.Tensor) -> None:
    if _HANDOFF.get() is None:
        _count_pending(1)
    _HANDOFF.set(Handoff(cache, layer, keys))


def _take() -> None:
    _HANDOFF.set(None)
    _count_pending(-1)


def _kernel(inner: str, module: torch.nn.Module) -> Callable:
    if inner == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise ModelError(f"{type(module).__name__} has no eager_attention_forward; use sdpa attention")
    return eager


#: SDPA backends for a PolyCache's decoding steps on CUDA. cuDNN is left out: it plans anew for
#: every sequence length it meets (tens of ms of CPU each time), and a decoding step meets a new
#: length at every step; flash and memory-efficient attention do not. Prefill keeps PyTorch's
#: choice (cuDNN plans once per prompt there, and is the fastest). See docs/performance.md.
CUDA_BACKENDS = (
    torch.nn.attention.SDPBackend.FLASH_ATTENTION,
    torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION,
    torch.nn.attention.SDPBackend.MATH,
)


def _backends(inner: str, query: torch.Tensor):
    if inner != "sdpa" or not query.is_cuda or query.shape[-2] != 1:
        return contextlib.nullcontext()
    return torch.nn.attention.sdpa_kernel(list(CUDA_BACKENDS))


def _attention_with_log_normalisers(query, key, value, scaling: float):
    """Causal SDPA that also returns each query's log-normaliser (for accumulated attention), as
    transformers' SDPA returns its output; (None, None) where no kernel that returns them applies."""
    groups = query.shape[1] // key.shape[1]
    found = column_sums.attention_with_lse(
        query, key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1), scaling
    )
    if found is None:
        return None, None
    output, lse = found
    return (output.transpose(1, 2).contiguous(), None), lse


def _attend(layer, kernel, inner, module, query, key, value, attention_mask, scaling, softcap, kwargs):
    """Attend ``query`` to what ``layer`` (a PolyLayer) holds, then let the layer compress."""
    lse = None
    if inner == "sdpa" and attention_mask is None and layer.wants_log_normalisers(query):
        output, lse = _attention_with_log_normalisers(query, key, value, scaling)
    if lse is None:
        mask = layer.attention_mask(attention_mask, query.shape[-2], query.shape[1])
        with _backends(inner, query):
            output = kernel(module, query, key, value, mask, **kwargs)
    visibility = Visibility(sliding_window=layer.sliding_window, softcap=softcap)
    layer.after_attention(query, attention_mask, scaling, visibility, lse=lse)
    return output


def _attend_static(layer, query, scaling, softcap) -> torch.Tensor:
    """Attend ``query`` to the slots of ``layer`` (a PolyLayer in static decoding), then let it evict."""
    static = layer.static
    output = decode_attention_op(
        query, static.keys, static.values, static.positions, static.position, static.real, scaling,
        layer.sliding_window, softcap,
    )  # fmt: skip
    static.after_attention()
    return output


def _attend_pool(layer, query, scaling, softcap) -> torch.Tensor:
    """Attend ``query`` to the pooled slots of ``layer`` (a SplitLayer in static decoding): in one launch where
    the kernels run, else group by group over each group's view; then let its groups evict."""
    static = layer.static
    if static.pool.attends(query):
        output = static.pool.attend(query, static.position, scaling, layer.sliding_window, softcap)
    else:
        output = layer.join(
            [
                decode_attention_op(
                    layer.queries_of(query, number), part.static.keys, part.static.values, part.static.positions,
                    static.position, part.static.real, scaling, layer.sliding_window, softcap,
                )
                for number, part in enumerate(layer.parts)
            ]
        )  # fmt: skip
    static.after_attention()
    return output


def _attend_in_static(layer, query, scaling, softcap) -> torch.Tensor:
    """Attend ``query`` to ``layer`` in static decoding (a PolyLayer's slots, or a SplitLayer's pool)."""
    if getattr(layer, "groups", None) is None:
        return _attend_static(layer, query, scaling, softcap)
    return _attend_pool(layer, query, scaling, softcap)


def _scaling_and_softcap(inner: str, module, kwargs) -> tuple[float, float | None]:
    scaling = kwargs.get("scaling")
    scaling = module.scaling if scaling is None else scaling
    # SDPA has no soft-capping (transformers' SDPA path ignores it); score as the kernel computes.
    return scaling, kwargs.get("softcap") if inner == "eager" else None


def attention_function(inner: str) -> Callable:
    @torch.compiler.disable  # layers of different lengths and their eviction stay eager (polykv.decoding.compiled)
    def serve(module, query, key, value, attention_mask, **kwargs):
        kernel = _kernel(inner, module)
        handoff = _HANDOFF.get()
        if handoff is None or handoff.keys is not key or handoff.layer.index != module.layer_idx:
            return kernel(module, query, key, value, attention_mask, **kwargs)
        _take()
        layer = handoff.layer
        handoff.cache.attended(layer)
        scaling, softcap = _scaling_and_softcap(inner, module, kwargs)
        if layer.static is not None:
            return _attend_in_static(layer, query, scaling, softcap), None
        parts = getattr(layer, "groups", None)  # a SplitLayer: each group of heads attends to its own tokens
        if parts is None:
            return _attend(layer, kernel, inner, module, query, key, value, attention_mask, scaling, softcap, kwargs)
        outputs = [
            _attend(
                part, kernel, inner, module, layer.queries_of(query, number), part.keys, part.values, attention_mask,
                scaling, softcap, kwargs,
            )[0]
            for number, (_heads, part) in enumerate(parts)
        ]  # fmt: skip
        layer.after_groups()
        return layer.join(outputs), None

    def polykv_attention(module, query, key, value, attention_mask, **kwargs):
        cache = kwargs.pop(STATIC_CACHE_KEYWORD, None)
        layer = None if cache is None else cache.static_attention(module.layer_idx)
        if layer is not None:  # a layer in static decoding: traced by torch.compile, with its slots' write
            return _attend_in_static(layer, query, *_scaling_and_softcap(inner, module, kwargs)), None
        if _PENDING == 0:  # no PolyCache awaits this attention: the wrapped kernel, which torch.compile traces
            return _kernel(inner, module)(module, query, key, value, attention_mask, **kwargs)
        return serve(module, query, key, value, attention_mask, **kwargs)

    polykv_attention.__name__ = f"{PREFIX}{inner}_attention"
    return polykv_attention

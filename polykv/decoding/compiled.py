"""A model's forward compiled with ``torch.compile``, for static decoding steps.

In a decoding step each layer runs some 60 small kernels besides its matrix products (norms, rotary
embedding, activation, residual adds, the cache's writes: 1,795 a step on the bundled model,
``benchmarks/step_kernels.py``); captured in a CUDA graph, their count rather than the bytes they
read sets much of a small step's time (docs/performance.md).
``torch.compile`` fuses the elementwise work between one matrix product and the next. A layer in
static decoding (``polykv.cache.static``) is traced with the model: its slots' write and its
attention (the operator ``polykv::decode_attention``, which inductor calls as it is) sit in the
same graph as the rotary embedding before them and the output projection after, so a whole step is
one graph (``PolyCache.update`` says how the attention finds the layer without a context variable,
which dynamo cannot trace); so is a layer whose groups of heads share a pool of slots
(``polykv.cache.pool``, attended by the operator ``polykv::ragged_decode_attention``). What stays
eager breaks the graph: the prepared model's hooks before and after the forward, and a policy's
ranking in a step that evicts. Dynamo guards on the layer index the cache is given, so the parts
after a break are compiled once per layer, under a recompile limit raised to match
(``polykv.cache.compiling``). A layer's number of slots is a size the compiled step does not
specialise on, nor is the number of tokens it has seen (``PolyCache.get_mask_sizes``): one
compilation serves every prompt, every static stage and every speculation's room, but for pooled
layers, whose attention takes its longest head's count from the host (a stage compiles anew); a new
batch or number of tokens per step compiles anew too.

Compiled kernels compute what the eager ones compute up to rounding order: in float32 the tokens
equal the eager step's (tested on the CPU), in bfloat16 near ties can break differently.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from polykv.cache.compiling import compiled

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


def compiled_forward(model: PreTrainedModel) -> Callable:
    """``model``'s forward compiled (static shapes), made once per model and kept while the model lives."""
    found = _COMPILED.get(model)
    if found is None:
        # Each layer's parts, for up to 16 input shapes (speculation meets a step, a draft's first step and a check
        # of each lookahead).
        layers = model.config.get_text_config().num_hidden_layers
        found = _COMPILED[model] = compiled(model, recompile_limit=16 * (layers + 1))
    return found

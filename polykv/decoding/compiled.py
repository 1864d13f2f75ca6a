"""A model's forward compiled with ``torch.compile``, for static decoding steps.

In a decoding step each layer runs some 60 small kernels besides its matrix products (norms, rotary
embedding, activation, residual adds, the cache's writes: 1,795 a step on the bundled model,
``benchmarks/step_kernels.py``); captured in a CUDA graph, their count rather than the bytes they
read sets much of a small step's time (docs/performance.md).
``torch.compile`` fuses the elementwise work between one layer's attention and the next one's
into a few kernels. polykv's cache bookkeeping and attention stay eager: ``PolyCache.update``,
``before_forward``, ``after_forward`` and the attention function are excluded from tracing
(``torch.compiler.disable``), so each layer breaks the graph at its cache update and its attention,
and what lies between is compiled. Dynamo guards on the layer index passed to the cache, so those
parts are compiled once per layer, under a recompile limit raised to match (``polykv.cache.compiling``).

Compiled kernels compute what the eager ones compute up to rounding order: in float32 the tokens
equal the eager step's (tested on the CPU), in bfloat16 near ties can break differently.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch

from polykv.cache.compiling import compiled

_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, Callable] = weakref.WeakKeyDictionary()


def compiled_forward(model: torch.nn.Module) -> Callable:
    """``model``'s forward compiled (static shapes), made once per model and kept while the model lives."""
    found = _COMPILED.get(model)
    if found is None:
        # Each layer's parts, for up to 16 input shapes (speculation meets a step, a draft's first step and a check
        # of each lookahead).
        layers = model.config.get_text_config().num_hidden_layers
        found = _COMPILED[model] = compiled(model, recompile_limit=16 * (layers + 1))
    return found

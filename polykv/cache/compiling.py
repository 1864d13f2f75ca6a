"""``torch.compile`` with static shapes, and room for as many compilations as the caller's shapes need.

Dynamo compiles a frame once per input shape (and, in a model's forward, once per set of layers
that break the graph: it guards on the layer index handed to the cache) and runs it uncompiled
past ``recompile_limit`` (8 by default), with only a warning. polykv's compiled static steps meet
more shapes than that, so each compiled function carries its own limit, raised for its calls alone.

Shapes are static, but for the dimensions a caller marks dynamic (``torch._dynamo.mark_dynamic``):
a static layer's slots (``polykv.cache.static``), whose count changes with every static stage and
every speculation's room, so that one compilation of a model's forward serves them all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compiled(function: Callable, *, recompile_limit: int) -> Callable:
    """``function`` through ``torch.compile`` (static shapes but marked dimensions), compiled up to
    ``recompile_limit`` times per frame (``accumulated_recompile_limit``, over all its frames, four times that)."""
    inner = torch.compile(function, dynamic=None)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(
            recompile_limit=recompile_limit,
            accumulated_recompile_limit=4 * recompile_limit,
            automatic_dynamic_shapes=False,  # a shape that changes compiles anew, as a static one
        ):
            return inner(*args, **kwargs)

    return run

"""``torch.compile`` with static shapes, and room for as many compilations as the caller's shapes need.

Dynamo compiles a frame once per input shape (and, in a model's forward, once per layer: it guards
on the layer index handed to the cache) and runs it uncompiled past ``recompile_limit`` (8 by
default), with only a warning. polykv's compiled static steps meet more shapes than that, so each
compiled function carries its own limit, raised for its calls alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def compiled(function: Callable, *, recompile_limit: int) -> Callable:
    """``function`` through ``torch.compile`` (static shapes), compiled up to ``recompile_limit`` times per frame
    (``accumulated_recompile_limit``, over all its frames, four times that)."""
    inner = torch.compile(function, dynamic=False)

    def run(*args, **kwargs):
        with torch._dynamo.config.patch(
            recompile_limit=recompile_limit, accumulated_recompile_limit=4 * recompile_limit
        ):
            return inner(*args, **kwargs)

    return run

"""PolyCache: a transformers ``Cache`` whose layers each keep their own budget of tokens."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache

from polykv.cache.attention import hand_over
from polykv.cache.layer import PolyLayer


class PolyCache(Cache):
    """A per-layer compressed KV cache for ``model.generate(..., past_key_values=cache)``.

    Make one per request with ``plan.make_cache()``; the model must have been prepared
    (``polykv.compile`` does it). ``get_seq_length`` counts every token seen, so positions stay
    those of the full cache, while each layer stores only what its policy kept.
    """

    def __init__(self, layers: Sequence[PolyLayer]):
        super().__init__(layers=list(layers))

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        hand_over(self.layers[layer_idx], keys)
        return keys, values

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens, e.g. an answer, to ask again."""
        for layer in self.layers:
            layer.rewind(length)

    def layer_lengths(self) -> list[int]:
        """Tokens stored per row and KV head in each layer."""
        return [layer.keys.shape[-2] if layer.is_initialized else 0 for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes the cache holds: keys, values and the positions of evicted layers."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                total += layer.keys.nbytes + layer.values.nbytes
                total += layer.positions.nbytes if layer.positions is not None else 0
        return total

    def full_nbytes(self) -> int:
        """Bytes an uncompressed cache would hold for the same tokens."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                batch, heads, _stored, dim = layer.keys.shape
                total += 2 * batch * heads * layer.seen * dim * layer.keys.element_size()
        return total

"""PolyCache: a transformers ``Cache`` whose layers each keep their own budget of tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers.cache_utils import Cache

from polykv.cache.attention import hand_over
from polykv.cache.checks import raise_pending
from polykv.cache.layer import PhaseRule, PolyLayer
from polykv.errors import CacheError


class PolyCache(Cache):
    """A per-layer compressed KV cache for ``model.generate(..., cache=cache)`` (``past_key_values=`` before
    transformers 5.24; ``polykv.cache_argument`` picks the keyword).

    Make one per request with ``plan.make_cache()``; the model must be prepared (``plan.apply``
    or ``polykv.compile``). ``get_seq_length`` counts every token seen, so positions stay those of
    the full cache, while each layer stores only what its policy kept.
    """

    def __init__(
        self,
        layers: Sequence[PolyLayer],
        resolve: Callable[[int], Sequence[tuple[PhaseRule, PhaseRule | None]]] | None = None,
    ):
        """``resolve`` gives every layer's rules for a prompt length; it is called once, before the
        first layer of the first forward runs (a plan whose budgets depend on the prompt length)."""
        super().__init__(layers=list(layers))
        self._awaiting: PolyLayer | None = None
        self._resolve = resolve
        self._resolved = resolve is None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise CacheError(
                f"the model has a layer {layer_idx}, but this cache was planned for {len(self.layers)} layers; "
                "compile the spec against this model"
            )
        if self._awaiting is not None:
            waiting, self._awaiting = self._awaiting, None
            raise CacheError(
                f"layer {waiting.index}'s attention did not go through polykv, so it could not fit its mask or "
                "compress: prepare the model first (with plan.apply(model): ..., or polykv.prepare_model(model); "
                "polykv.compile does it)"
            )
        if layer_idx == 0:
            self.check()
            if not self._resolved:
                self.resolve(key_states.shape[-2])
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._awaiting = self.layers[layer_idx]
        hand_over(self, self.layers[layer_idx], keys)
        return keys, values

    def resolve(self, prompt_length: int) -> None:
        """Set every layer's rules for a prompt of ``prompt_length`` tokens (once, before the first forward).

        Called by the first forward with its own length; call it first when the prompt comes in
        chunks (``generate(..., prefill_chunk_size=N)``), so that budgets follow the whole prompt.
        """
        if self._resolve is None:
            return
        if any(layer.is_initialized for layer in self.layers):
            raise CacheError("a cache is resolved for its prompt before the first forward pass, not after")
        for layer, (prefill, decode) in zip(self.layers, self._resolve(prompt_length)):
            layer.set_rules(prefill, decode)
        self._resolved = True

    def attended(self, layer: PolyLayer) -> None:
        """Called by polykv's attention function once ``layer`` has attended."""
        if self._awaiting is layer:
            self._awaiting = None

    def check(self) -> None:
        """Raise the problems that device-side checks found since the last check (see ``checks``)."""
        pending = [found for layer in self.layers for found in layer.problems]
        for layer in self.layers:
            layer.problems = []
        raise_pending(pending)

    def begin_static(self, room: int, slack: int = 0) -> None:
        """Decode with fixed shapes (``polykv.cache.static``) for up to ``room`` tokens; see ``polykv.decoding``.

        ``slack``: a layer bounded by a decode policy evicts ``slack + 1`` tokens at a time.
        """
        self.check()
        for layer in self.layers:
            layer.begin_static(room, slack)

    def plan_static_step(self) -> tuple[int, ...]:
        """Prepare the coming static step; the layers that evict in it (each set of them is its own graph)."""
        return tuple(layer.index for layer in self.layers if layer.static.plan_step())

    def static_stepped(self) -> None:
        """Count a static step that ran."""
        for layer in self.layers:
            layer.static.stepped()

    def end_static(self, steps: int) -> None:
        """Back to ordinary decoding after ``steps`` static steps: every layer holds its tokens by position again."""
        for layer in self.layers:
            layer.end_static(steps)

    def end_prefill(self) -> None:
        """End the prefill: later forwards append (to ask several questions about one compressed context)."""
        for layer in self.layers:
            layer.end_prefill()

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens, e.g. an answer, to ask again."""
        for layer in self.layers:
            layer.rewind(length)

    def reset(self) -> None:
        self._awaiting = None
        self._resolved = self._resolve is None
        super().reset()

    def layer_lengths(self) -> list[int]:
        """Tokens stored per row and KV head in each layer."""
        if any(layer.static for layer in self.layers):
            raise CacheError("the lengths of a cache in static decoding are known after end_static")
        self.check()
        return [layer.storage.size for layer in self.layers]

    def nbytes(self) -> int:
        """Bytes the cache holds: keys, values, positions of evicted layers, and headroom for appending."""
        return sum(layer.static.nbytes() if layer.static else layer.storage.nbytes() for layer in self.layers)

    def full_nbytes(self) -> int:
        """Bytes transformers' own cache would hold for the same tokens (a sliding layer keeps its window)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                tokens = layer.seen if layer.sliding_window is None else min(layer.seen, layer.sliding_window - 1)
                total += 2 * layer.batch_size * layer.kv_heads * tokens * layer.head_dim * layer.dtype.itemsize
        return total

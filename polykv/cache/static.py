"""Static decoding: a layer's decoding step with fixed shapes and no host round trip.

An ordinary decoding step changes Python-side lengths and tensor shapes (``Storage.append``,
``keep``), so every step is planned anew by the host, and a CUDA graph cannot replay it. In static
decoding a layer holds a fixed number of slots: its kept tokens and room for the tokens to come,
or, for a layer bounded while decoding, its bound plus one. A step writes the new token into a slot
chosen on the device, attends over every slot (``decode_attention``: a slot is visible by its stored
position, and a free slot holds the position ``FREE``, after every real one), and, where the layer
is bounded, frees the slot of the lowest-ranked token for the next step. Slots are reused in any order;
``finish`` sorts them back by position and hands the layer its ordinary storage.

This is what the step of a bounded layer computes, exactly: the ordinary path appends, attends
over budget + 1 tokens and evicts one; here the free slot takes the token, all budget + 1 slots are
attended, and one slot is freed.
"""

from __future__ import annotations

import math

import torch

from polykv.cache.storage import POSITION
from polykv.errors import CacheError
from polykv.policy import LayerView, Phase, ScoringPolicy

#: The position of a free slot: after every real position, so causal masking hides it.
FREE = torch.iinfo(POSITION).max


class StaticDecoding:
    """One layer's slots during static decoding (see the module docstring)."""

    def __init__(self, layer, room: int):
        """``layer`` (a PolyLayer in its decoding phase) gets slots for ``room`` more tokens, or its bound."""
        self.layer = layer
        storage = layer.storage
        self.size = storage.size  # tokens held when static decoding began
        self.bound, self.policy = _bound_and_policy(layer)  # policy None with a bound: keep the newest
        if self.bound is not None and storage.size > self.bound:
            raise CacheError(
                f"layer {layer.index} holds {storage.size} tokens, more than its decoding bound of {self.bound}: "
                "run one ordinary decoding step first, which evicts down to the bound"
            )
        slots = storage.size + room if self.bound is None else self.bound + 1
        batch, heads = layer.batch_size, layer.kv_heads
        device = storage.keys.device
        self.keys = _with_slots(storage.keys, slots)
        self.values = _with_slots(storage.values, slots)
        self.positions = torch.full((batch, heads, slots), FREE, dtype=POSITION, device=device)
        self.positions[:, :, : storage.size] = storage.positions_or_slots()
        self.real: torch.Tensor | None = None  # (B, H, slots) False for padding, None without padding
        if layer.real is not None:
            self.real = torch.ones(batch, heads, slots, dtype=torch.bool, device=device)
            self.real[:, :, : storage.size] = layer.token_mask(storage.positions_or_slots())
        storage.clear()  # the slots hold the tokens now (one layer's copy at a time); finish() gives them back
        self.slot = torch.full((batch, heads, 1), self.size, dtype=torch.long, device=device)
        self.position = torch.full((1,), layer.seen, dtype=torch.long, device=device)  # of the next token

    # --- one step: PolyLayer.update appends, polykv's attention function attends (decode_attention) --

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's token into the free slot; return every slot's keys and values."""
        if keys.shape[-2] != 1:
            raise CacheError("static decoding takes one token per step")
        dim = keys.shape[-1]
        self.keys.scatter_(2, self.slot[..., None].expand(-1, -1, -1, dim), keys)
        self.values.scatter_(2, self.slot[..., None].expand(-1, -1, -1, dim), values)
        self.positions.scatter_(2, self.slot, self.position.to(POSITION).expand_as(self.slot))
        if self.real is not None:
            self.real.scatter_(2, self.slot, True)
        return self.keys, self.values

    def after_attention(self) -> None:
        """Choose the next step's slot (freeing the lowest-ranked token if the layer is full)."""
        self.position += 1
        if self.bound is None:
            self.slot += 1
            return
        held = self.positions != FREE
        view = LayerView(
            layer=self.layer.index,
            phase=Phase.DECODE,
            budget=self.bound,
            keys=self.keys,
            values=self.values,
            token_mask=held if self.real is None else held & self.real,
            positions=self.positions.long(),
        )
        scores = (view.positions if self.policy is None else self.policy.score(view)).float()
        # Free slots go first (no eviction while one is left), then padding, then the lowest score.
        lowest_real = torch.finfo(torch.float32).min / 2
        ranked = scores.nan_to_num(nan=lowest_real).clamp(min=lowest_real).masked_fill(~view.token_mask, -3e38)
        ranked = ranked.masked_fill(~held, -math.inf)
        # Ties go to the earlier token (as in ScoringPolicy.select): of the lowest, free the newest.
        lowest = ranked == ranked.min(dim=-1, keepdim=True).values
        newest_lowest = torch.where(lowest, self.positions, -1).argmax(dim=-1, keepdim=True)
        self.slot.copy_(newest_lowest)  # in place: a captured graph reads this very tensor
        self.positions.scatter_(2, self.slot, FREE)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.positions, self.real) if t is not None)

    # --- back to ordinary decoding ----------------------------------------------------------------

    def finish(self, steps: int) -> None:
        """Give the layer its ordinary storage after ``steps`` static steps: held tokens sorted by position."""
        layer = self.layer
        held = self.size + steps if self.bound is None else min(self.size + steps, self.bound)
        order = self.positions.argsort(dim=-1, stable=True)[..., :held]
        gather = order[..., None].expand(-1, -1, -1, self.keys.shape[-1])
        layer.storage.hold(self.keys.gather(2, gather), self.values.gather(2, gather), self.positions.gather(-1, order))
        layer.seen += steps
        if layer.real is not None:
            layer.real = torch.cat([layer.real, layer.real.new_ones(layer.real.shape[0], steps)], dim=1)


def _bound_and_policy(layer) -> tuple[int | None, ScoringPolicy | None]:
    """The most tokens the layer may hold while decoding, and the policy that ranks them."""
    rule = layer.decode
    budget = None if rule is None else rule.tokens(layer.prompt_length)
    if layer.sliding_window:
        if budget is not None:
            raise CacheError(
                f"layer {layer.index} has a sliding window and a decode policy; static decoding supports one or "
                "the other: decode with model.generate"
            )
        return layer.sliding_window - 1, None  # ranked by recency
    if budget is None:
        return None, None
    if not (isinstance(rule.policy, ScoringPolicy) and rule.policy.static_decoding):
        raise CacheError(
            f"layer {layer.index}: decode policy {rule.policy.name!r} cannot run in a static decoding step (it does "
            "not declare static_decoding = True); use a policy that does (streaming, knorm), or model.generate"
        )
    return budget, rule.policy


def _with_slots(stored: torch.Tensor, slots: int) -> torch.Tensor:
    """A (B, H, slots, D) buffer holding ``stored`` in its first slots."""
    buffer = stored.new_zeros(*stored.shape[:2], slots, stored.shape[-1])
    buffer[:, :, : stored.shape[2]] = stored
    return buffer

"""Static decoding: a layer's decoding step with fixed shapes and no host round trip.

An ordinary decoding step changes Python-side lengths and tensor shapes (``Storage.append``,
``keep``), so every step is planned anew by the host, and a CUDA graph cannot replay it. In static
decoding a layer holds a fixed number of slots: its kept tokens and room for the tokens to come,
or, for a layer bounded while decoding, its bound plus one. A step writes the new token into the
next free slot (a list of them lives on the device), attends over every slot (``decode_attention``:
a slot is visible by its stored position, and a free slot holds the position ``FREE``, after every
real one), and, in a step where the layer goes over its bound, frees the slots of the lowest-ranked
tokens. Which steps those are is known on the host, since counts do not depend on the data, so
each step's graph is fixed. Slots are reused in any order; ``finish`` sorts them back by position
and hands the layer its ordinary storage.

This is what the step of a bounded layer computes, exactly: the ordinary path appends, attends
over budget + 1 tokens and evicts one; here the free slot takes the token, all budget + 1 slots are
attended, and one slot is freed. With a slack s, s + 1 slots are freed at once instead, so the
layer ranks its tokens once every s + 1 steps: it then holds between bound - s and bound tokens.

A layer may also take several tokens in one step (a speculative check), and, with ``holes``, mark
some of the tokens it took as holes: their slots stay taken but are never seen again (a proposal
that this batch row refused while another row kept it). A bounded layer with holes (a speculative
draft) evicts once per check instead of in its steps: at the check's end, down to its bound minus
the next check's tokens (``plan_check``, ``evict_for_check``), holes first. It then holds at most
its bound during a check, and one graph serves every check that evicts the same way.
"""

from __future__ import annotations

import functools

import attrs
import torch

from polykv.cache.compiling import compiled
from polykv.cache.storage import POSITION
from polykv.errors import CacheError
from polykv.policy import LayerView, Phase, ScoringPolicy

#: The position of a free slot: after every real position, so causal masking hides it.
FREE = torch.iinfo(POSITION).max
#: The slack static decoding takes unless told otherwise: 31 tokens (measured: 1.008x the step of a layer that does not
#: evict, against 1.44x evicting at every step; docs/performance.md), at most a sixteenth of the bound.
DEFAULT_SLACK, DEFAULT_SLACK_SHARE = 31, 16


class StaticDecoding:
    """One layer's slots during static decoding (see the module docstring)."""

    def __init__(
        self,
        layer,
        room: int,
        slack: int | None = 0,
        holes: bool = False,
        per_check: int = 0,
        buffers: SlotBuffers | None = None,
    ):
        """``layer`` (a PolyLayer in its decoding phase) gets ``static_slots`` slots: for ``room`` more tokens, or
        its bound; in ``buffers`` of that many free slots (a pool's views) or its own.

        ``slack`` lets a layer bounded by a decode policy evict ``slack + 1`` tokens at once when it
        goes over its bound, so that it evicts every ``slack + 1`` steps instead of at every step
        (a sliding window always keeps its whole window); None takes DEFAULT_SLACK, at most a sixteenth
        of the bound (0 decodes exactly as ``model.generate``). ``holes`` lets steps bring tokens that are not
        real (``incoming``) and ``refuse`` tokens already taken; a bounded layer with holes then evicts
        once per speculative check of ``per_check`` tokens (see the module docstring).
        """
        self.layer = layer
        storage = layer.storage
        self.bound, self.policy = _bound_and_policy(layer)  # policy None with a bound: keep the newest
        self.per_check = per_check if holes and self.bound is not None else 0
        self.target: int | None = None
        if holes and self.bound is not None and per_check < 1:
            raise CacheError(f"layer {layer.index} evicts while decoding: it takes holes only in checks (per_check)")
        if self.per_check:
            if layer.sliding_window:
                raise CacheError(
                    f"layer {layer.index} has a sliding window, which counts slots, so its slots cannot hold holes: "
                    "speculate with ordinary forwards (static=False)"
                )
            # per_check is set for a bounded layer, and one without a sliding window is bounded by its policy.
            assert self.bound is not None and self.policy is not None
            self.target = self.bound - per_check  # what the layer holds after a check that evicts
            if self.target < self.policy.min_budget():
                raise CacheError(
                    f"layer {layer.index} keeps {self.bound} tokens while decoding, too few to take checks of "
                    f"{per_check} tokens and keep the {self.policy.min_budget()} its policy needs: draft fewer "
                    "tokens per check (lookahead) or give the layer a larger decode budget"
                )
            layer.evict_to(self.target)  # from the first check on, it holds at most its bound
        elif self.bound is not None and storage.size > self.bound:
            raise CacheError(
                f"layer {layer.index} holds {storage.size} tokens, more than its decoding bound of {self.bound}: "
                "run one ordinary decoding step first, which evicts down to the bound"
            )
        self.slack = 0
        if self.policy is not None:
            assert self.bound is not None  # a policy comes with its bound (_bound_and_policy)
            if slack is None:
                slack = min(DEFAULT_SLACK, self.bound // DEFAULT_SLACK_SHARE)
            self.slack = max(0, min(slack, self.bound - self.policy.min_budget()))
        self.held = storage.size  # tokens held now, known on the host: counts do not depend on the data
        self.evicting = False  # whether the coming step evicts (see plan_step)
        self.tokens = 1  # in the current step
        slots = static_slots(layer, room, holes, per_check)
        batch, heads = layer.batch_size, layer.kv_heads
        device = storage.keys.device
        tracks_real = tracks_real_tokens(layer, holes)
        if buffers is None:
            buffers = SlotBuffers.empty(batch, heads, slots, storage.keys, real=tracks_real)
        self.keys, self.values, self.positions = buffers.keys, buffers.values, buffers.positions
        stored = storage.positions_or_slots()
        self.keys[:, :, : storage.size] = storage.keys
        self.values[:, :, : storage.size] = storage.values
        self.positions[:, :, : storage.size] = stored
        self.real: torch.Tensor | None = None  # (B, H, slots) False: padding, hidden, holes; None: all real
        #: (B, n) whether each of a step's n tokens is real (set by whoever runs the steps); None: all are.
        self.incoming: torch.Tensor | None = None
        if tracks_real:
            self.real = buffers.real
            assert self.real is not None  # buffers made for a layer that tracks real tokens
            self.real[:, :, : storage.size] = layer.token_mask(stored)
            self.true = torch.ones((), dtype=torch.bool, device=device)  # what a real token's slot is marked
        storage.clear()  # the slots hold the tokens now; finish() gives them back
        # The free slots, taken in order: first the room after the kept tokens, then what evictions free.
        free = slots - self.held if self.per_check else max(slots - self.held, self.slack + 1)
        self.free = torch.arange(self.held, self.held + free, device=device).clamp(max=slots - 1)
        self.free = self.free.expand(batch, heads, free).contiguous()
        self.cursor = torch.zeros(1, dtype=torch.long, device=device)  # the next free slot's place in ``free``
        # Indices every write uses, made once: rows (B, 1, 1), heads (1, H, 1), and token offsets in a step, sliced.
        self.row_numbers = torch.arange(batch, device=device)[:, None, None]
        self.head_numbers = torch.arange(heads, device=device)[None, :, None]
        self.token_offsets = torch.arange(slots, device=device)
        _mark_slots_dynamic(self)
        self.position = torch.full((1,), layer.seen, dtype=torch.long, device=device)  # of the next token
        self.refuse_slots = refuse_tokens  # or its compiled form (compile_refusals)

    # --- one step: PolyLayer.update appends, polykv's attention function attends (decode_attention) --

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's n tokens into the next free slots; return every slot's keys and values."""
        tokens = self.take(keys.shape[-2])
        indices = self._indices(tokens)  # traced within a compiled forward (PolyCache.update), fused with it
        slots = write_tokens(
            self.keys, self.values, self.positions, self.free, self.cursor, self.position, keys, values, indices
        )
        if self.real is not None:
            batch, heads = keys.shape[:2]
            real = self.true if self.incoming is None else self.incoming[:, None, :].expand(batch, heads, tokens)
            # index_put_ rather than scatter_, as in write_tokens: traced, it writes in place.
            self.real.index_put_((indices[0], indices[1], slots), real)
        return self.keys, self.values

    def take(self, tokens: int) -> int:
        """Note that the coming step brings ``tokens`` tokens (a pool writes them for its groups)."""
        if tokens != 1 and self.bound is not None and not self.per_check:
            raise CacheError(f"layer {self.layer.index} evicts while decoding: its static steps take one token each")
        self.tokens = tokens
        return tokens

    def share(self, free: torch.Tensor, cursor: torch.Tensor, position: torch.Tensor) -> None:
        """Keep the free list, cursor and position in these tensors from now on (a pool's, shared by its groups so
        that one write serves them all): ``free`` (B, H, F) and ``cursor`` (H, 1) take this layer's values, and
        ``position`` is the step's, advanced by the pool."""
        free.copy_(self.free)
        cursor.copy_(self.cursor.expand_as(cursor))
        self.free, self.cursor, self.position = free, cursor, position

    def compile_refusals(self) -> None:
        """Refuse a check's tokens with a compiled function (``torch.compile``): one fused kernel where the eager
        refusal launches five, which on a GPU is a share of a small step's time. (A step's write is traced with
        a compiled forward.)"""
        self.refuse_slots = _compiled_refusal()

    def refuse(self, refused: torch.Tensor) -> None:
        """Make holes of the last n tokens taken where ``refused`` (B, n) says so."""
        if self.real is None:
            raise CacheError("this layer's static decoding was begun without holes")
        self.refuse_slots(self.real, self.free, self.cursor, refused, self._indices(refused.shape[1]))

    def _indices(self, tokens: int) -> Indices:
        """A write's indices for a step of ``tokens`` tokens (views of tensors made once)."""
        return self.row_numbers, self.head_numbers, self.token_offsets[:tokens]

    def after_attention(self) -> None:
        """Move past the step's tokens; in an evicting step, free the slots of the lowest-ranked tokens."""
        self.position += self.tokens
        self.evict_if_planned()

    def evict_if_planned(self) -> None:
        """In an evicting step, free the slots of the lowest-ranked tokens."""
        if self.evicting and not self.per_check:
            assert self.bound is not None  # plan_step evicts only a bounded layer
            self._free_lowest(self.held + 1 - (self.bound - self.slack), self.bound - self.slack)

    @torch.compiler.disable  # a policy's ranking stays eager under torch.compile: a graph break in evicting steps only
    def _free_lowest(self, count: int, budget: int) -> None:
        """Free the slots of the ``count`` lowest-ranked held tokens (holes and padding first), keeping ``budget``."""
        view = LayerView(
            layer=self.layer.index,
            phase=Phase.DECODE,
            budget=budget,
            keys=self.keys,
            values=self.values,
            token_mask=torch.ones_like(self.positions, dtype=torch.bool) if self.real is None else self.real,
            positions=self.positions.long(),
        )
        scores = (view.positions if self.policy is None else self.policy.score(view)).float()
        lowest_real = torch.finfo(torch.float32).min / 2  # padding ranks below every real token
        ranked = scores.nan_to_num(nan=lowest_real).clamp(min=lowest_real).masked_fill(~view.token_mask, -3e38)
        if self.per_check:  # a check may end with slots not taken yet (one token a step fills every slot first)
            ranked = ranked.masked_fill(self.positions == FREE, torch.inf)
        freed = _lowest_ranked(ranked, self.positions, count)
        spare = self.per_check - count  # free slots a check that evicts fewer than it brings has not taken
        if spare > 0:
            freed = torch.cat([freed, taken_slots(self.free, self.cursor, self.token_offsets[:spare])], dim=-1)
        self.free[..., : freed.shape[-1]].copy_(freed)  # in place: a captured graph reads these very tensors
        self.cursor.zero_()
        self.positions.scatter_(2, freed[..., :count], FREE)

    def plan_step(self) -> bool:
        """Whether the coming step evicts: the layer would go over its bound (decided on the host)."""
        self.evicting = self.bound is not None and not self.per_check and self.held + 1 > self.bound
        return self.evicting

    def plan_check(self) -> bool:
        """Whether the coming speculative check ends with an eviction (a bounded layer with holes: it would
        hold more than its bound minus a check's tokens; decided on the host)."""
        self.evicting = bool(self.per_check) and self.held + self.per_check > self.target
        return self.evicting

    def evict_for_check(self) -> None:
        """At the end of a check planned to evict: keep the best ``bound - per_check`` tokens, holes first out."""
        if self.evicting:
            self._free_lowest(self.held + self.per_check - self.target, self.target)

    def stepped(self, tokens: int = 1) -> None:
        """Count the step (or check) just run, of ``tokens`` tokens (on the host)."""
        if not self.evicting:
            self.held += tokens
        else:
            assert self.bound is not None  # only a bounded layer evicts (plan_step, plan_check)
            self.held = self.target if self.per_check else self.bound - self.slack

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.positions, self.real) if t is not None)

    # --- back to ordinary decoding ----------------------------------------------------------------

    def finish(self, tokens: int) -> None:
        """Give the layer its ordinary storage after static steps that brought ``tokens`` tokens: held tokens
        sorted by position, holes marked as padding is."""
        layer = self.layer
        order = self.positions.argsort(dim=-1, stable=True)[..., : self.held]  # free slots sort last
        if self.real is not None and self.bound is None:  # the new tokens are the last held: real or holes
            new = self.real[:, 0].gather(-1, order[:, 0, self.held - tokens :])  # heads take the same tokens
            past = layer.real if layer.real is not None else new.new_ones(new.shape[0], layer.seen)
            layer.real = torch.cat([past, new], dim=1)
        elif layer.real is not None:
            layer.real = torch.cat([layer.real, layer.real.new_ones(layer.real.shape[0], tokens)], dim=1)
        layer.storage.hold(self.keys, self.values, self.positions)
        layer.storage.keep(order, self.positions.gather(-1, order))
        layer.seen += tokens


def _mark_slots_dynamic(static: StaticDecoding) -> None:
    """Have torch.compile take the number of slots (and free slots) as a size it does not specialise on
    (``polykv.cache.compiling``): a traced static step then compiles once for every room."""
    for tensor, dimension in ((static.keys, 2), (static.values, 2), (static.positions, 2), (static.real, 2),
                              (static.free, 2), (static.token_offsets, 0)):  # fmt: skip
        if tensor is not None:
            torch._dynamo.mark_dynamic(tensor, dimension)


#: Indices a write uses: rows (B, 1, 1), heads (1, H, 1) and the step's token offsets (n,), made once per layer so
#: that a step launches no kernel to make them.
Indices = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def write_tokens(
    stored_keys: torch.Tensor,
    stored_values: torch.Tensor,
    positions: torch.Tensor,
    free: torch.Tensor,
    cursor: torch.Tensor,
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    indices: Indices,
) -> torch.Tensor:
    """Write ``keys`` and ``values`` (B, H, n, D) into the next n free slots (from place ``cursor`` of ``free``),
    at positions from ``position`` on, and move the cursor past them; the slots taken (B, H, n)."""
    rows, heads, offsets = indices
    slots = taken_slots(free, cursor, offsets)
    # index_put_ rather than scatter_: compiled, it writes in place (a compiled scatter_ copies the whole buffer).
    where = (rows, heads, slots)
    stored_keys.index_put_(where, keys)
    stored_values.index_put_(where, values)
    positions.index_put_(where, (position + offsets).to(POSITION).expand_as(slots))
    cursor += offsets.shape[0]
    return slots


def refuse_tokens(
    real: torch.Tensor, free: torch.Tensor, cursor: torch.Tensor, refused: torch.Tensor, indices: Indices
) -> None:
    """Mark as holes in ``real`` the last n slots taken before place ``cursor`` of ``free`` where ``refused`` (B, n)
    says so."""
    rows, heads, offsets = indices
    where = (rows, heads, taken_slots(free, cursor - offsets.shape[0], offsets))
    real.index_put_(where, real[where] & ~refused[:, None, :])


def taken_slots(free: torch.Tensor, first: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The slots (B, H, n) taken from the free list ``free`` (B, H, F) from place ``first`` on: (1,), or (H, 1)
    where each head has its own (a pool's groups)."""
    return free.gather(-1, (first + offsets).expand(*free.shape[:2], offsets.shape[0]))


#: Shapes the compiled refusals are compiled for (per check's size, group of heads and cache of a speculation; the
#: number of slots is dynamic); past it dynamo would run them uncompiled.
REFUSAL_SHAPES = 64


@functools.cache
def _compiled_refusal():
    """``refuse_tokens`` compiled, once per process."""
    return compiled(refuse_tokens, recompile_limit=REFUSAL_SHAPES)


def _lowest_ranked(ranked: torch.Tensor, positions: torch.Tensor, count: int) -> torch.Tensor:
    """The slots (B, H, count) of the ``count`` lowest ranks; ties go to the earlier token (as in
    ``ScoringPolicy.select``), so of equal ranks the newest is freed. One slot takes a reduction,
    several a sort."""
    if count == 1:
        lowest = ranked == ranked.min(dim=-1, keepdim=True).values
        return torch.where(lowest, positions, -1).argmax(dim=-1, keepdim=True)
    newest_first = positions.argsort(dim=-1, descending=True, stable=True)
    order = ranked.gather(-1, newest_first).argsort(dim=-1, stable=True)[..., :count]
    return newest_first.gather(-1, order)


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


def static_slots(layer, room: int, holes: bool = False, per_check: int = 0) -> int:
    """The slots ``layer``'s static decoding holds (the arguments of ``StaticDecoding``): its kept tokens and
    ``room`` more; with a bound, one new token over it, or (checks) a check's tokens over the target, that is
    the bound itself."""
    bound, _policy = _bound_and_policy(layer)
    if bound is None:
        return layer.storage.size + room
    return bound if holes and per_check else bound + 1


def tracks_real_tokens(layer, holes: bool) -> bool:
    """Whether ``layer``'s static decoding tracks which slots hold real tokens (padding, hidden, holes)."""
    return layer.real is not None or layer.hidden is not None or holes


@attrs.frozen
class SlotBuffers:
    """What a layer's static decoding holds its slots in: keys and values (B, H, S, D), positions (B, H, S)
    (``FREE`` where no token is), and real (B, H, S) (False: padding, hidden, holes) or None."""

    keys: torch.Tensor
    values: torch.Tensor
    positions: torch.Tensor
    real: torch.Tensor | None

    @classmethod
    def empty(cls, batch: int, heads: int, slots: int, like: torch.Tensor, real: bool) -> SlotBuffers:
        """Free slots, keys and values of ``like``'s dtype, device and head size; real ones all True."""
        keys = like.new_zeros(batch, heads, slots, like.shape[-1])
        positions = torch.full((batch, heads, slots), FREE, dtype=POSITION, device=like.device)
        mask = torch.ones(batch, heads, slots, dtype=torch.bool, device=like.device) if real else None
        return cls(keys, torch.zeros_like(keys), positions, mask)

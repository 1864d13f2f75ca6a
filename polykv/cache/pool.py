"""One layer's static slots for KV heads that keep different counts, in one buffer, attended in one launch.

In static decoding (``polykv.cache.static``) a SplitLayer's groups of heads each hold their own
slots. In buffers of their own, each group needs its own attention launch, its queries taken apart
and its output put back: some ten kernels more per layer and step than a uniform layer runs, about
a fifth of an 8B model's decoding step (docs/performance.md). A pool lays every group's slots one
after another in one (B, T, D) buffer for keys and one for values, T the sum over KV heads of
their slots, so memory is still the sum of the heads' counts. A group's slots are a (B, Hg, Sg, D)
view into it, which the group's ``StaticDecoding`` evicts from as it would its own buffer;
attention reads every head's slots in one launch (``ragged_decode_attention``: KV head h's slots
start at ``starts[h]``, ``counts[h]`` of them), where the kernels run. Elsewhere each group attends
to its own view, as before.

Writes are pooled too: the groups' free lists, cursors and step position live in shared tensors
(each group's are views, ``StaticDecoding.share``), so one write puts a step's tokens into every
head's next free slot, where each group would launch its own (measured on an 8B shape: the ragged
step at 1.0x the uniform one, from 1.1x with a write per group and 1.28x group by group).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv.cache.kernels.decode_attention import ragged_decode_attention_op, suits_kernels
from polykv.cache.static import SlotBuffers, StaticDecoding, taken_slots
from polykv.cache.storage import POSITION


class SlotPool:
    """A SplitLayer's static slots, every group's in one buffer (see the module docstring)."""

    def __init__(self, groups: Sequence[tuple[tuple[int, ...], int]], batch: int, like: torch.Tensor, real: bool):
        """``groups``: each group's KV heads (ascending) and slots per head; keys and values of ``like``'s dtype and
        device; ``real``: whether any group tracks which tokens are real (its buffer starts all True)."""
        heads = sum(len(group) for group, _slots in groups)
        self.offsets: list[int] = []  # where each group's slots begin in a batch row
        starts, counts = [0] * heads, [0] * heads
        offset = 0
        for group, slots in groups:
            self.offsets.append(offset)
            for place, head in enumerate(group):
                starts[head], counts[head] = offset + place * slots, slots
            offset += len(group) * slots
        self.shapes = [(len(group), slots) for group, slots in groups]
        order = [head for group, _slots in groups for head in group]  # the pool's heads, group by group
        self.order = None if order == sorted(order) else torch.tensor(order, device=like.device)
        self.pooled_starts = torch.tensor([starts[head] for head in order], device=like.device)[:, None]  # (H, 1)
        # Set by share(): the free lists (B, H, F), cursors (H, 1), step position (1,), and a write's row and token
        # indices.
        self.free: torch.Tensor | None = None
        self.cursor: torch.Tensor | None = None
        self.position: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.token_offsets: torch.Tensor | None = None
        self.real_tokens: torch.Tensor | None = None  # (B, n) whether each of a step's tokens is real; None: all are
        whole = SlotBuffers.empty(batch, 1, offset, like, real)  # one head of every slot: views below
        self.keys, self.values = whole.keys[:, 0], whole.values[:, 0]  # (B, T, D)
        self.positions = whole.positions[:, 0]  # (B, T)
        self.real = None if whole.real is None else whole.real[:, 0]
        self.starts = torch.tensor(starts, dtype=torch.int32, device=like.device)
        self.counts = torch.tensor(counts, dtype=torch.int32, device=like.device)
        self.largest = max(counts)

    def buffers(self, number: int) -> SlotBuffers:
        """Group ``number``'s slots as views (B, Hg, Sg, ...) into the pool."""
        (heads, slots), offset = self.shapes[number], self.offsets[number]
        batch, dim = self.keys.shape[0], self.keys.shape[-1]

        def view(tensor: torch.Tensor, *tail: int) -> torch.Tensor:
            return tensor.narrow(1, offset, heads * slots).view(batch, heads, slots, *tail)

        real = None if self.real is None else view(self.real)
        return SlotBuffers(view(self.keys, dim), view(self.values, dim), view(self.positions), real)

    def share(self, statics: Sequence[StaticDecoding]) -> None:
        """Hold the groups' (``statics``, in group order) free lists, cursors and step position in shared tensors,
        each group's a view, so that ``write`` serves every group."""
        batch, heads = self.keys.shape[0], int(self.starts.shape[0])
        longest = max(static.free.shape[-1] for static in statics)
        device = self.keys.device
        self.free = torch.zeros(batch, heads, longest, dtype=torch.long, device=device)
        self.cursor = torch.zeros(heads, 1, dtype=torch.long, device=device)
        self.position = statics[0].position.clone()
        self.rows, self.token_offsets = statics[0].row_numbers, statics[0].token_offsets  # made once per layer
        first = 0
        for static in statics:
            count, length = static.free.shape[1], static.free.shape[2]
            free, cursor = self.free[:, first : first + count, :length], self.cursor[first : first + count]
            static.share(free, cursor, self.position)
            first += count

    def write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a step's n tokens (B, H, n, D) into every head's next free slots, in one write."""
        if self.order is not None:  # the pool holds the heads group by group
            keys, values = keys.index_select(1, self.order), values.index_select(1, self.order)
        # share() set these before the first write.
        assert self.free is not None and self.cursor is not None and self.position is not None
        assert self.rows is not None and self.token_offsets is not None
        offsets = self.token_offsets[: keys.shape[-2]]
        real = None if self.real is None else self.real_tokens
        write_pooled(
            self.keys, self.values, self.positions, self.real, self.free, self.cursor, self.pooled_starts,
            self.position, keys, values, real, self.rows, offsets,
        )  # fmt: skip

    def attends(self, query: torch.Tensor) -> bool:
        """Whether ``attend`` runs for this query: the kernels take it, on this device."""
        return suits_kernels(query, self.keys, self.values, self.starts.shape[0])

    def attend(
        self, query: torch.Tensor, position: torch.Tensor, scaling: float, sliding_window: int | None, softcap
    ) -> torch.Tensor:
        """The step's attention over every head's slots in one launch: (B, n, Hq, D)."""
        return ragged_decode_attention_op(
            query, self.keys, self.values, self.positions, self.real, self.starts, self.counts, self.largest,
            position, scaling, sliding_window, softcap,
        )  # fmt: skip

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.positions, self.real) if t is not None)


def write_pooled(
    keys_pool: torch.Tensor,
    values_pool: torch.Tensor,
    positions_pool: torch.Tensor,
    real_pool: torch.Tensor | None,
    free: torch.Tensor,
    cursor: torch.Tensor,
    starts: torch.Tensor,
    position: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    real: torch.Tensor | None,
    rows: torch.Tensor,
    offsets: torch.Tensor,
) -> None:
    """Write ``keys``, ``values`` (B, H, n, D; the pool's heads in its order) into each head's next n free slots
    (``free`` (B, H, F) from its place ``cursor`` (H, 1), after the head's first slot ``starts`` (H, 1)), at
    positions from ``position`` on, marking them real as ``real`` (B, n) says (None: all are); move the cursors."""
    slots = starts + taken_slots(free, cursor, offsets)  # (B, H, n) in the pool's (B, T)
    where = (rows, slots)
    keys_pool.index_put_(where, keys)
    values_pool.index_put_(where, values)
    positions_pool.index_put_(where, (position + offsets).to(POSITION).expand_as(slots))
    if real_pool is not None:
        real_pool.index_put_(where, torch.ones_like(slots, dtype=torch.bool) if real is None else real[:, None, :])
    cursor += offsets.shape[0]

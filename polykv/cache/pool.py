"""One layer's static slots for KV heads that keep different counts, in one buffer, attended in one launch.

In static decoding (``polykv.cache.static``) a SplitLayer's groups of heads each hold their own
slots. In buffers of their own, each group needs its own attention launch, its queries taken apart
and its output put back: some ten kernels more per layer and step than a uniform layer runs, about
a fifth of an 8B model's decoding step (docs/performance.md). A pool lays every group's slots one
after another in one (B, T, D) buffer for keys and one for values, T the sum over KV heads of
their slots, so memory is still the sum of the heads' counts. A group's slots are a (B, Hg, Sg, D)
view into it, which the group's ``StaticDecoding`` writes and evicts as it would its own buffer;
attention reads every head's slots in one launch (``ragged_decode_attention``: KV head h's slots
start at ``starts[h]``, ``counts[h]`` of them), where the kernels run. Elsewhere each group attends
to its own view, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv.cache.kernels.decode_attention import ragged_decode_attention, suits_kernels
from polykv.cache.static import SlotBuffers


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

        def view(tensor: torch.Tensor | None, *tail: int) -> torch.Tensor | None:
            if tensor is None:
                return None
            return tensor.narrow(1, offset, heads * slots).view(batch, heads, slots, *tail)

        return SlotBuffers(view(self.keys, dim), view(self.values, dim), view(self.positions), view(self.real))

    def attends(self, query: torch.Tensor) -> bool:
        """Whether ``attend`` runs for this query: the kernels take it, on this device."""
        return suits_kernels(query, self.keys, self.values, self.starts.shape[0])

    def attend(
        self, query: torch.Tensor, position: torch.Tensor, scaling: float, sliding_window: int | None, softcap
    ) -> torch.Tensor:
        """The step's attention over every head's slots in one launch: (B, n, Hq, D)."""
        return ragged_decode_attention(
            query, self.keys, self.values, self.positions, self.real, self.starts, self.counts, self.largest,
            position, scaling, sliding_window, softcap,
        )  # fmt: skip

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.keys, self.values, self.positions, self.real) if t is not None)

"""The memory of one cache layer: keys, values and positions in buffers that grow with headroom.

Appending writes into spare room at the end of the buffers, so a decoding step costs the new token
and not a copy of the whole layer (the dynamic cache's ``torch.cat`` copies everything every step).
When the room runs out the buffers grow by a fraction of their size; eviction compacts the kept
tokens into buffers of exactly their size, so a compressed layer really holds fewer bytes.

Within each batch row and KV head, slots are ordered by position: appends come last and ``keep``
takes sorted indices. So the newest tokens are always the last slots, and dropping the oldest is a
slice. ``positions`` is None while slot ``i`` holds position ``i`` (nothing evicted yet); the
cache then needs no position table and uses the model's own mask unchanged.
"""

from __future__ import annotations

import torch

#: Stored positions take 4 bytes per token and head (2**31 positions is ample); indexing uses long.
POSITION = torch.int32

#: Growth when the room runs out: this fraction of the size, rounded up to a multiple of ``ALIGN`` tokens (so at
#: least that many once the capacity is aligned): a compressed layer keeps its saving while it decodes.
GROWTH_FRACTION = 8
ALIGN = 64


class Storage:
    """Dense (B, H, S, D) keys and values of one layer, and (B, H, S) positions once something was evicted."""

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None
        self.size = 0
        self._shared = False  # the buffers are a fork's too: the next append copies them first

    # --- what is stored ---------------------------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._keys is None else self._keys[:, :, : self.size]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._values is None else self._values[:, :, : self.size]

    @property
    def positions(self) -> torch.Tensor | None:
        """(B, H, S) int32 position of each slot, or None while slot i holds position i."""
        return None if self._positions is None else self._positions[:, :, : self.size]

    @property
    def capacity(self) -> int:
        return 0 if self._keys is None else self._keys.shape[2]

    def positions_or_slots(self) -> torch.Tensor:
        """(B, H, S) long positions, materialised from the slot order where none are stored."""
        positions = self.positions
        if positions is not None:
            return positions.long()
        assert self._keys is not None  # a layer asks for positions once it stores tokens
        batch, heads = self._keys.shape[:2]
        return torch.arange(self.size, device=self._keys.device).expand(batch, heads, self.size)

    def nbytes(self) -> int:
        """Bytes allocated (headroom included): what the layer really costs in memory."""
        return sum(t.nbytes for t in (self._keys, self._values, self._positions) if t is not None)

    # --- changes ------------------------------------------------------------------------------------

    def append(self, keys: torch.Tensor, values: torch.Tensor, first_position: int, limit: int | None = None) -> None:
        """Add ``keys``/``values`` (B, H, n, D) at positions first_position, first_position + 1, ...

        ``limit`` caps the capacity a growth may reach (a layer whose memory is bounded never
        allocates past its bound plus the tokens of one forward).
        """
        new = keys.shape[2]
        if self._keys is None:
            self._keys, self._values = keys, values  # the first tokens are stored as given, without a copy
            self.size = new
            return
        needed = self.size + new
        if needed > self.capacity or self._shared:
            self._grow(needed, limit)
        assert self._values is not None  # stored with the keys
        self._keys[:, :, self.size : needed] = keys
        self._values[:, :, self.size : needed] = values
        if self._positions is not None:
            fresh = torch.arange(first_position, first_position + new, device=self._positions.device, dtype=POSITION)
            self._positions[:, :, self.size : needed] = fresh
        self.size = needed

    def keep(self, indices: torch.Tensor, positions: torch.Tensor) -> None:
        """Keep the slots ``indices`` (B, H, K), in order of position, whose positions are ``positions`` (B, H, K)."""
        keys, values = self.keys, self.values
        assert keys is not None and values is not None  # eviction picks among stored tokens
        gather = indices[..., None].expand(-1, -1, -1, keys.shape[-1])
        self.hold(keys.gather(2, gather), values.gather(2, gather), positions)

    def hold(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor) -> None:
        """Hold exactly these (B, H, S, D) keys and values at ``positions`` (B, H, S); ``keep`` then picks."""
        self._keys, self._values, self._positions = keys, values, positions.to(POSITION)
        self.size = keys.shape[2]
        self._shared = False

    def keep_newest(self, count: int) -> None:
        """Keep the last ``count`` slots (the newest tokens of every row and head)."""
        if count >= self.size:
            return
        drop = self.size - count
        keys, values, positions = self.keys, self.values, self.positions
        assert keys is not None and values is not None  # more tokens stored than kept
        if positions is None:
            batch, heads = keys.shape[:2]
            kept = torch.arange(drop, self.size, device=keys.device, dtype=POSITION)
            self._positions = kept.expand(batch, heads, count).contiguous()
        else:
            self._positions = positions[:, :, drop:].contiguous()
        self._keys = keys[:, :, drop:].contiguous()
        self._values = values[:, :, drop:].contiguous()
        self.size = count

    def truncate(self, count: int) -> None:
        """Keep the first ``count`` slots (the rest stays allocated as headroom)."""
        self.size = min(self.size, count)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep (and reorder) batch rows, for beam search."""
        self._map_rows(lambda t: t[:, :, : self.size].index_select(0, rows.to(t.device)))

    def repeat_rows(self, repeats: int) -> None:
        """Repeat each batch row ``repeats`` times, for ``num_return_sequences`` and beam search."""
        self._map_rows(lambda t: t[:, :, : self.size].repeat_interleave(repeats, dim=0))

    def adopt(self, other: Storage, *, share_room: bool = False, heads: tuple[int, ...] | None = None) -> None:
        """Share ``other``'s stored tokens. Without ``share_room`` an append here never writes into
        ``other``'s buffers; with it, appends use ``other``'s spare room (one sharer at a time).
        ``heads`` takes only those KV heads (a copy of them, so without shared room)."""
        if heads is not None:
            index = torch.tensor(heads, device=other.device)
            stored = (other.keys, other.values, other.positions)
            self._keys, self._values, self._positions = (t if t is None else t.index_select(1, index) for t in stored)
        elif share_room:
            self._keys, self._values, self._positions = other._keys, other._values, other._positions
        else:
            self._keys, self._values, self._positions = other.keys, other.values, other.positions
        self.size = other.size

    def fork(self) -> Storage:
        """A storage holding the same tokens in the same buffers, until either one appends (it copies first)."""
        twin = Storage()
        twin._keys, twin._values, twin._positions, twin.size = self._keys, self._values, self._positions, self.size
        self._shared = twin._shared = self._keys is not None
        return twin

    def to(self, device: torch.device | str) -> None:
        """Move the buffers to ``device`` (to offload a layer, and to bring it back)."""
        for name in ("_keys", "_values", "_positions"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(device, non_blocking=True))

    def cast(self, dtype: torch.dtype) -> None:
        """Hold the stored keys and values in ``dtype``: copies of exactly what is stored (no headroom, no buffer
        shared with a fork or a capture any more)."""
        keys, values = self.keys, self.values
        if keys is None or keys.dtype == dtype:
            return
        assert values is not None  # stored with the keys
        self._keys, self._values, self._positions = keys.to(dtype), values.to(dtype), self.positions
        self._shared = False

    @property
    def device(self) -> torch.device | None:
        return None if self._keys is None else self._keys.device

    def reserve(self, room: int) -> None:
        """Make room for ``room`` more tokens without growing later (one copy now)."""
        if self._keys is not None and (self.capacity < self.size + room or self._shared):
            self._grow(self.size + room, self.size + room)

    def fit(self) -> None:
        """Give back the spare room (one copy): after a burst that will not come again, such as the repeat of a
        prompt (``polykv.cache.reconstruction``)."""
        keys, values, positions = self.keys, self.values, self.positions
        if keys is not None and self.capacity > self.size:
            assert values is not None  # stored with the keys
            self._keys, self._values = keys.clone(), values.clone()
            if positions is not None:
                self._positions = positions.clone()
            self._shared = False

    def clear(self) -> None:
        type(self).__init__(self)

    # --- internals ------------------------------------------------------------------------------------

    def _map_rows(self, change) -> None:
        if self._keys is None:
            return
        self._keys, self._values = change(self._keys), change(self._values)
        if self._positions is not None:
            self._positions = change(self._positions)

    def _grow(self, needed: int, limit: int | None) -> None:
        capacity = max(needed, self.capacity + self.capacity // GROWTH_FRACTION)
        capacity = -(-capacity // ALIGN) * ALIGN
        if limit is not None:
            capacity = max(needed, min(capacity, limit))
        keys, values, positions = self.keys, self.values, self.positions
        assert keys is not None and values is not None  # grows only once tokens are stored
        self._keys = _resized(keys, capacity)
        self._values = _resized(values, capacity)
        if positions is not None:
            self._positions = _resized(positions, capacity)
        self._shared = False


def _resized(stored: torch.Tensor, capacity: int) -> torch.Tensor:
    """A new buffer of ``capacity`` slots along dim 2 holding ``stored`` at its start."""
    shape = list(stored.shape)
    shape[2] = capacity
    buffer = stored.new_empty(shape)
    buffer[:, :, : stored.shape[2]] = stored
    return buffer

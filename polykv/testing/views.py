"""Random ``LayerView``s as the cache builds them: real shapes and dtypes, GQA, left padding, and
positions with gaps where earlier evictions left them.

Keys and queries are random; the attention a policy needs is computed from them the way the
cache computes it (``polykv.cache.inputs``), so it is consistent with the keys and the padding.
"""

from __future__ import annotations

import torch

from polykv.cache import inputs
from polykv.policy import LayerView, Phase, Policy

#: The most tokens a random view holds (token vectors are drawn from pools of this size).
POOL = 2048


def random_view(
    policy: Policy,
    *,
    budget: int,
    length: int,
    batch: int = 2,
    heads: int = 2,
    groups: int = 2,
    dim: int = 8,
    pads: list[int] | None = None,
    phase: Phase = Phase.PREFILL,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    layer: int = 0,
    evicted: bool = False,
) -> LayerView:
    """A view of ``length`` tokens for ``policy`` at ``budget``; row b has ``pads[b]`` padding tokens on the left.

    Real tokens are the same random vectors whatever the padding before them, so a padded row and
    the same row alone differ only by the padding (what the contract's padding property needs).
    ``evicted``: the view holds what is left of a longer sequence, so its positions have gaps and do
    not start at 0 (only its newest ``needs().window`` tokens, whose queries the view carries, are
    consecutive); a policy that reads positions as slot indices fails there.
    """
    pads = pads if pads is not None else [0] * batch
    if length > POOL:
        raise ValueError(f"random views hold at most {POOL} tokens")
    generator = torch.Generator().manual_seed(seed)
    # Token vectors come from pools of a fixed size, so the i-th real token of a row is the same
    # vector whatever the view's length and padding.
    real_keys = torch.randn(batch, heads, POOL, dim, generator=generator)
    real_values = torch.randn(batch, heads, POOL, dim, generator=generator)
    real_queries = torch.randn(batch, heads, groups, POOL, dim, generator=generator)
    pad_vectors = torch.randn(batch, heads, POOL, dim, generator=generator) * 3
    needs = policy.needs()
    window = max(needs.window, 1)
    keys = torch.empty(batch, heads, length, dim)
    values, queries = torch.empty_like(keys), torch.empty(batch, heads, groups, length, dim)
    token_mask = torch.zeros(batch, heads, length, dtype=torch.bool)
    for row, pad in enumerate(pads):  # real tokens shifted right by the row's padding
        keys[row, :, pad:] = real_keys[row, :, : length - pad]
        values[row, :, pad:] = real_values[row, :, : length - pad]
        queries[row, :, :, pad:] = real_queries[row, :, :, : length - pad]
        keys[row, :, :pad] = values[row, :, :pad] = pad_vectors[row, :, :pad]
        queries[row, :, :, :pad] = 0.0
        token_mask[row, :, pad:] = True
    slot_positions = _positions_with_gaps(length, window, pads, generator) if evicted else torch.arange(length)
    positions = slot_positions.expand(batch, heads, length).clone()
    for row, pad in enumerate(pads):  # padding comes first in the sequence
        positions[row, :, :pad] = torch.arange(pad)
    scaling = dim**-0.5
    found: dict[str, torch.Tensor] = {}
    if needs.window:
        found["queries"] = queries[..., -window:, :]
        if needs.window_attention:
            found["window_attention"] = inputs.window_attention(
                found["queries"], slot_positions[-window:], keys, positions, token_mask, scaling
            )
    if needs.accumulated_attention:
        found["accumulated_attention"] = inputs.accumulated_attention(
            queries, slot_positions, token_mask[:, 0], keys, positions, token_mask, scaling
        )
    if needs.reconstruction:  # every real query posed again: the most attention each token receives
        attention = inputs.window_attention(queries, slot_positions, keys, positions, token_mask, scaling)
        attention = attention * token_mask[:, :, None, :, None]
        found["reconstruction_attention"] = attention.amax(dim=(2, 3))
    return LayerView(
        layer=layer,
        phase=phase,
        budget=budget,
        keys=keys.to(device=device, dtype=dtype),
        values=values.to(device=device, dtype=dtype),
        token_mask=token_mask.to(device=device),
        positions=positions.to(device=device),
        **{name: tensor.to(device=device) for name, tensor in found.items()},
    )


def _positions_with_gaps(length: int, window: int, pads: list[int], generator: torch.Generator) -> torch.Tensor:
    """Increasing positions of ``length`` slots (shared by the rows' real tokens) with random gaps, except between
    the newest ``window``; the gaps count from the newest slot, so a row's real tokens keep their positions
    relative to each other whatever its padding, and every row's padding fits before its first real token."""
    gaps = torch.randint(1, 9, (POOL,), generator=generator) * (torch.rand(POOL, generator=generator) < 0.4) + 1
    gaps[: max(window, 1)] = 1
    before_newest = torch.cat([torch.zeros(1, dtype=torch.long), gaps[: length - 1].cumsum(0)])  # from the newest
    evicted_first = int(torch.randint(0, 64, (), generator=generator))  # tokens gone before the oldest held
    end = evicted_first + max(pad + int(before_newest[length - 1 - pad]) + 1 for pad in pads)
    return (end - 1 - before_newest).flip(0)

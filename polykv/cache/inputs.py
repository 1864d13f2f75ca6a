"""What query-aware policies need, computed from the queries the attention function already has.

Nothing here switches the model to eager attention or builds the full attention matrix of a long
prompt: window attention covers only the last few queries, and accumulated attention runs over
chunks of queries whose size bounds the memory it takes.
"""

from __future__ import annotations

import torch

#: Upper bound on the float32 attention elements one chunk of accumulated attention holds (256 MiB).
CHUNK_ELEMENTS = 1 << 26


def grouped(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, Hq, n, D) queries as (B, H, G, n, D): query heads grouped under their KV head."""
    batch, query_heads, length, dim = queries.shape
    return queries.reshape(batch, kv_heads, query_heads // kv_heads, length, dim)


def window_attention(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    token_mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Softmax attention of a few queries over every token, float32, shape (B, H, G, n, L).

    ``queries`` (B, H, G, n, D) sit at ``query_positions`` (n,); a query sees the real tokens at
    or before its own position. A query that sees nothing (padding) gets all zeros.
    """
    logits = torch.einsum("bhgnd,bhld->bhgnl", queries.float(), keys.float()) * scaling
    visible = token_mask[:, :, None, None, :] & (
        key_positions[:, :, None, None, :] <= query_positions[None, None, None, :, None]
    )
    return _masked_softmax(logits, visible)


def accumulated_attention(
    queries: torch.Tensor,
    keys: torch.Tensor,
    token_mask: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Attention each token receives, summed over every real query of the prompt: (B, H, G, L).

    Prefill only: query i sits at position i and sees tokens 0..i. Runs over chunks of queries so
    that at most CHUNK_ELEMENTS attention weights exist at once.
    """
    batch, heads, groups, length, _ = queries.shape
    chunk = max(1, CHUNK_ELEMENTS // (batch * heads * groups * length))
    positions = torch.arange(length, device=keys.device)
    real_queries = token_mask[:, :1, None, :, None].float()  # (B, 1, 1, L, 1): padding queries count for nothing
    total = torch.zeros(batch, heads, groups, length, device=keys.device, dtype=torch.float32)
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        weights = window_attention(
            queries[:, :, :, start:stop],
            positions[start:stop],
            keys,
            positions.expand_as(token_mask),
            token_mask,
            scaling,
        )
        total += (weights * real_queries[:, :, :, start:stop]).sum(dim=-2)
    return total


def _masked_softmax(logits: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    logits = logits.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(logits, dim=-1)
    return torch.nan_to_num(weights, nan=0.0)

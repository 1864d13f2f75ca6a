"""What query-aware policies need, computed from the queries the attention function already has.

Nothing here switches the model to eager attention or builds the full attention matrix of a long
prompt: window attention covers only the last few queries, and accumulated attention runs over
chunks of queries whose size bounds the memory it takes.

Attention is computed the way the model computes it: a query sees the real tokens at or before its
own position, within the sliding window on sliding layers, with the logits soft-capped where the
model's kernel caps them (Gemma 2 with eager attention).
"""

from __future__ import annotations

import attrs
import torch

#: Upper bound on the float32 attention elements one chunk of accumulated attention holds (256 MiB).
CHUNK_ELEMENTS = 1 << 26


@attrs.frozen
class Visibility:
    """How the model's attention restricts what a query sees, beyond causality and padding."""

    sliding_window: int | None = None
    softcap: float | None = None


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
    visibility: Visibility = Visibility(),
) -> torch.Tensor:
    """Softmax attention of a few queries over the stored tokens, float32, shape (B, H, G, n, L).

    ``queries`` (B, H, G, n, D) sit at ``query_positions`` (n,); ``key_positions`` (B, H, L) and
    ``token_mask`` (B, H, L) describe the stored tokens. A query that sees nothing gets all zeros.
    """
    logits = torch.einsum("bhgnd,bhld->bhgnl", queries.float(), keys.float()) * scaling
    if visibility.softcap:
        logits = torch.tanh(logits / visibility.softcap) * visibility.softcap
    keys_at = key_positions[:, :, None, None, :]
    queries_at = query_positions[None, None, None, :, None]
    visible = token_mask[:, :, None, None, :] & (keys_at <= queries_at)
    if visibility.sliding_window:
        visible &= keys_at > queries_at - visibility.sliding_window
    weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1)
    return torch.nan_to_num(weights, nan=0.0)


def accumulated_attention(
    queries: torch.Tensor,
    query_positions: torch.Tensor,
    real_queries: torch.Tensor,
    keys: torch.Tensor,
    key_positions: torch.Tensor,
    token_mask: torch.Tensor,
    scaling: float,
    visibility: Visibility = Visibility(),
) -> torch.Tensor:
    """Attention each stored token receives, summed over the real queries given: (B, H, G, L).

    ``queries`` (B, H, G, n, D) at ``query_positions`` (n,); ``real_queries`` (B, n) is False for
    padding queries, which count for nothing. Runs over chunks of queries so that at most
    CHUNK_ELEMENTS attention weights exist at once.
    """
    batch, heads, groups, count, _ = queries.shape
    length = keys.shape[-2]
    chunk = max(1, CHUNK_ELEMENTS // (batch * heads * groups * length))
    weight_of_query = real_queries[:, None, None, :, None].float()  # (B, 1, 1, n, 1)
    total = torch.zeros(batch, heads, groups, length, device=keys.device, dtype=torch.float32)
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        weights = window_attention(
            queries[:, :, :, start:stop],
            query_positions[start:stop],
            keys,
            key_positions,
            token_mask,
            scaling,
            visibility,
        )
        total += (weights * weight_of_query[:, :, :, start:stop]).sum(dim=-2)
    return total

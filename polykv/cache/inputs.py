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
    padding queries, which count for nothing. A whole prompt (the queries are the stored tokens'
    own) takes the fused path; otherwise this runs over chunks of queries so that at most
    CHUNK_ELEMENTS attention weights exist at once.
    """
    whole_prompt = queries.shape[-2] == keys.shape[-2] and torch.equal(
        key_positions, query_positions.expand_as(key_positions)
    )
    if whole_prompt and not visibility.sliding_window and not visibility.softcap:
        fused = _fused_column_sums(queries, keys, real_queries, scaling)
        if fused is not None:
            return fused * token_mask[:, :, None, :]
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


#: A logit far below any real one: exp() of it is 0 in every float type polykv computes in.
_NEVER = -1e4


def _fused_column_sums(
    queries: torch.Tensor, keys: torch.Tensor, real_queries: torch.Tensor, scaling: float
) -> torch.Tensor | None:
    """Causal attention summed over queries, (B, H, G, L), with two fused attention passes and no L x L matrix.

    The weight query i gives token j is exp(s q_i.k_j - lse_i), with lse_i the log-normaliser of
    row i. Pass one gets every lse_i. The column sum over i >= j is then itself a log-sum-exp:
    exp(logsumexp_i(s k_j.q'_i)) with q'_i = [q_i, -lse_i / s] and k_j extended by a 1, which is
    attention with the roles of queries and keys swapped, made causal by reversing the sequence.
    Padding keys get the bias _NEVER in pass one, padding queries a huge lse so they add nothing.
    Returns None where the kernel that reports log-normalisers is not available.
    """
    attention_with_lse = _attention_with_lse(queries.device)
    if attention_with_lse is None:
        return None
    batch, heads, groups, length, dim = queries.shape
    flat_queries = queries.reshape(batch, heads * groups, length, dim)
    flat_keys = keys[:, :, None].expand(batch, heads, groups, length, dim).reshape(batch, heads * groups, length, dim)
    real_keys = real_queries[:, None, :, None]  # with left padding, a key is real where its query is
    ones = torch.ones_like(flat_queries[..., :1])
    key_bias = torch.where(real_keys, 0.0, _NEVER / scaling).to(flat_keys.dtype).expand_as(ones)
    _, lse = attention_with_lse(_padded(flat_queries, ones), _padded(flat_keys, key_bias), scaling)
    lse = torch.where(real_queries[:, None, :], lse, -_NEVER)  # padding queries spread nothing
    swapped_queries = _padded(flat_keys, ones).flip(2)
    swapped_keys = _padded(flat_queries, (-lse / scaling)[..., None].to(flat_queries.dtype)).flip(2)
    _, column_lse = attention_with_lse(swapped_queries, swapped_keys, scaling)
    return column_lse.flip(2).float().exp().reshape(batch, heads, groups, length)


def _padded(tensor: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``tensor`` with the column ``extra`` appended, zero-padded to a head size the kernels take (x8)."""
    size = tensor.shape[-1] + 1
    zeros = tensor.new_zeros(*tensor.shape[:-1], -size % 8)
    return torch.cat([tensor, extra, zeros], dim=-1)


def _attention_with_lse(device: torch.device):
    """A causal attention kernel returning (output, log-normaliser per query), or None on this device."""
    if device.type == "cpu":
        kernel = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
        if kernel is None:
            return None

        def cpu(query, key, scale):
            output, lse = kernel(query, key, torch.zeros_like(query), 0.0, True, scale=scale)
            return output, lse

        return cpu
    return None

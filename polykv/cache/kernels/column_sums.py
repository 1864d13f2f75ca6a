"""Accumulated attention of a whole prompt on CUDA, in one fused Triton kernel.

H2O-style policies score each token by the attention all prompt queries give it: column sums of
the causal softmax matrix. Building that matrix in float32 chunks costs several times the prefill
itself on long prompts. Given the per-query log-normaliser the prompt's attention forward already
returns, each weight is exp(scaling q_i.k_j - lse_i), so a kernel can recompute the weights block
by block and sum them per key without ever holding the L x L matrix.

triton is optional: this module imports without it, and ``available`` says whether the kernel runs
(see ``triton_support``).
"""

from __future__ import annotations

import math

import torch

from polykv.cache.kernels.triton_support import available, dot_precision, jit, tl, triton

__all__ = ["available", "column_sums", "attention_with_lse"]

#: Keys per program, queries per loop step and pipeline stages, for query rows of at most 256 bytes (bf16 heads up
#: to 128) and for longer ones. Measured on an H200 over 32 query heads of 8k tokens: in bf16 0.7 ms at D=64, 0.9 ms
#: at D=128, 1.9 ms at D=256, below the flash-attention forward that produced the lse (1.0, 1.7 and 3.6 ms); in fp32
#: 3.5 ms at D=128.
SHORT_ROWS = (64, 128, 3)
LONG_ROWS = (64, 64, 2)


def column_sums(
    queries: torch.Tensor, keys: torch.Tensor, lse: torch.Tensor, real_queries: torch.Tensor, scaling: float
) -> torch.Tensor:
    """Causal attention each key receives, summed over the real queries: float32, (B, H, G, L).

    ``queries`` (B, H, G, L, D) and ``keys`` (B, H, L, D) share a dtype; query i and key j sit at
    positions i and j. ``lse`` (B, H*G, L) is each query's natural-log normaliser and
    ``real_queries`` (B, L) is False for padding queries, which add nothing. The result is
    sum over real i >= j of exp(scaling q_i.k_j - lse_i), whether or not key j is itself padding.
    """
    batch, heads, groups, length, dim = queries.shape
    out = torch.zeros(batch, heads, groups, length, device=queries.device, dtype=torch.float32)
    if out.numel() == 0:
        return out
    # In base 2 (the kernel uses exp2); a padding query gets an infinite normaliser, so weight 0.
    lse2 = torch.where(real_queries[:, None, :], lse.float() * math.log2(math.e), math.inf).contiguous()
    block_dim = max(16, triton.next_power_of_2(dim))
    block_keys, block_queries, stages = SHORT_ROWS if block_dim * queries.element_size() <= 256 else LONG_ROWS
    grid = (triton.cdiv(length, block_keys) * batch * heads * groups,)
    assert _kernel is not None  # jitted: column_sums runs where triton is (available)
    _kernel[grid](
        queries,
        keys,
        lse2,
        out,
        length,
        heads,
        groups,
        *queries.stride(),
        *keys.stride(),
        scaling * math.log2(math.e),
        HEAD_DIM=dim,
        BLOCK_D=block_dim,
        BLOCK_K=block_keys,
        BLOCK_Q=block_queries,
        PRECISION=dot_precision(queries),
        num_warps=4,
        num_stages=stages,
    )
    return out


def attention_with_lse(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention of (B, Hq, L, D) inputs and each query's log-normaliser, float32 (B, Hq, L).

    Runs cuDNN's attention where it applies (what SDPA itself prefers for a whole prompt on Hopper,
    so the prefill of an accumulating layer costs what a full cache's does), else PyTorch's
    flash-attention kernel; None where neither applies (not CUDA, not bf16/fp16, a head size or
    layout the kernels do not take), so that the caller falls back.
    """
    if query.device.type != "cuda" or query.dtype not in (torch.bfloat16, torch.float16):
        return None
    params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, True, False)
    batch, heads, length, _ = query.shape
    if torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.can_use_cudnn_attention(params):
        outputs = torch.ops.aten._scaled_dot_product_cudnn_attention(
            query, key, value, None, True, 0.0, True, False, scale=scaling
        )
        return outputs[0], outputs[1].reshape(batch, heads, length).float()
    if not torch.backends.cuda.can_use_flash_attention(params):
        return None
    outputs = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, 0.0, True, False, scale=scaling)
    return outputs[0], outputs[1]


def _column_sums_kernel(
    queries,
    keys,
    lse2,
    out,
    length,
    heads,
    groups,
    stride_qb,
    stride_qh,
    stride_qg,
    stride_ql,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kl,
    stride_kd,
    scale2,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: BLOCK_K keys of one (batch, KV head, group) row, summed over the queries at or after them.

    Weights are exp2(scale2 q.k - lse2) with scale2 = scaling log2(e) and lse2 = lse log2(e).
    Stage 0 covers the query blocks that overlap the keys (masked causally), stage 1 the queries after them.
    """
    blocks = tl.cdiv(length, BLOCK_K)
    row = tl.program_id(0) // blocks
    key_start = (tl.program_id(0) % blocks) * BLOCK_K
    group = row % groups
    head = (row // groups) % heads
    batch = row // (groups * heads)
    query_base = queries + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + group * stride_qg
    lse_base = lse2 + row.to(tl.int64) * length

    key_at = key_start + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    key_base = keys + batch.to(tl.int64) * stride_kb + head.to(tl.int64) * stride_kh
    keys_t = tl.load(
        key_base + key_at[None, :] * stride_kl + dims[:, None] * stride_kd,
        mask=(key_at[None, :] < length) & (dims[:, None] < HEAD_DIM),
        other=0.0,
    )  # (BLOCK_D, BLOCK_K)

    diagonal = (BLOCK_K + BLOCK_Q - 1) // BLOCK_Q * BLOCK_Q  # whole query blocks covering the keys' positions
    total = tl.zeros([BLOCK_K], dtype=tl.float32)
    for stage in tl.static_range(2):
        if stage == 0:
            start = key_start
            stop = tl.minimum(key_start + diagonal, length)
        else:
            start = key_start + diagonal
            stop = length
        for query_start in range(start, stop, BLOCK_Q):
            query_at = query_start + tl.arange(0, BLOCK_Q)
            inside = query_at < length
            block = tl.load(
                query_base + query_at[:, None] * stride_ql + dims[None, :] * stride_qd,
                mask=inside[:, None] & (dims[None, :] < HEAD_DIM),
                other=0.0,
            )  # (BLOCK_Q, BLOCK_D)
            normaliser = tl.load(lse_base + query_at, mask=inside, other=float("inf"))
            logits = tl.dot(block, keys_t, input_precision=PRECISION) * scale2 - normaliser[:, None]
            if stage == 0:
                logits = tl.where(query_at[:, None] >= key_at[None, :], logits, float("-inf"))
            total += tl.sum(tl.exp2(logits), axis=0)

    tl.store(out + row.to(tl.int64) * length + key_at, total, mask=key_at < length)


_kernel = jit(_column_sums_kernel)

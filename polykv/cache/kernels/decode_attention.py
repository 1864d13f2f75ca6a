"""Attention of a decoding step over a layer's static slots, with visibility read from stored positions.

In static decoding (``polykv.cache.static``) a layer attends over a fixed number of slots, some of
them free or padding, in no particular order. PyTorch's SDPA takes such a layer only with an
explicit mask, which rules out its flash kernel and leaves one that walks a long cache with a single
thread block per head: 71 ms a step for an 8B model at 32k tokens, where reading the weights and
the cache takes under 5. Here the mask is never built: a slot is visible when its position is at or
before the query's (and inside the sliding window, and not padding).

On CUDA the step runs as split-K ("flash-decoding") Triton kernels. One query per head cannot fill
a GPU by itself, so the slots are cut into chunks, one program per chunk and KV head: it reads that
chunk's keys and values once for all the query heads sharing them (GQA) and keeps an online softmax
in float32. A second kernel merges the chunks' partial results. The number of chunks depends on the
shapes alone and the query's position is read on the device, so the step can be captured in a CUDA
graph and replayed at every position. Elsewhere (no triton, or the CPU without triton's
interpreter) the plain PyTorch version runs, which upcasts every key and value to float32.

A step may bring several tokens (a speculative check: the newest token and the proposals after it);
the i-th of them sits at the step's position + i and sees what that position sees. The kernels
treat them as more rows sharing each KV head, as GQA's query heads already do.

A row with no visible slot, which decoding never produces (the query sees its own slot), comes out
as NaN in both versions; the other rows are unaffected.

KV heads that keep different counts (``polykv.cache.pool``) lay their slots one after another in one
(B, T, D) buffer: ``ragged_decode_attention`` reads KV head h's slots from ``starts[h]`` on,
``counts[h]`` of them, in the same one launch (a head's chunks past its count find nothing).
"""

from __future__ import annotations

import functools
import math

import attrs
import torch

from polykv.cache.kernels.triton_support import available, dot_precision, jit, tl, triton

__all__ = [
    "available",
    "decode_attention",
    "decode_attention_op",
    "ragged_decode_attention",
    "ragged_decode_attention_op",
    "suits_kernels",
    "torch_decode_attention",
]

#: Programs per multiprocessor the split aims at: enough resident programs, each streaming its chunk's keys and
#: values, to keep the memory system busy, and few enough that the chunks stay long (fewer partials to merge).
PROGRAMS_PER_PROCESSOR = 4
#: Bytes of one tile of keys (or values) a program loads per loop step; tiles are 16 to 64 slots long.
TILE_BYTES = 16384
#: Chunks the merge kernel takes per loop step.
MERGE_CHUNKS = 16
#: The largest head size, and query rows per KV head (group size x tokens in the step), the kernels are built for;
#: larger ones take the PyTorch version.
MAX_HEAD_DIM = 256
MAX_GROUPS = 32

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: Multiprocessors assumed under triton's interpreter (a CPU device).
_INTERPRETED_PROCESSORS = 1


def decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    position: torch.Tensor,
    real: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The step's n queries per row and head over the slots: (B, n, Hq, D) in the query's dtype, as
    transformers' attention kernels return it.

    ``query`` (B, Hq, n, D); ``keys``, ``values`` (B, H, S, D) with Hq a multiple of H (GQA);
    ``positions`` (B, H, S) int32, a free slot holding a position after every real one;
    ``position`` (1,) int64, the first query's (query i sits at position + i); ``real`` (B, H, S)
    False for padding, or None.
    Runs the Triton kernels where ``available`` and the inputs suit them, else ``torch_decode_attention``.
    """
    if suits_kernels(query, keys, values, keys.shape[1]):
        layout = _Layout.of(keys, values, positions, real)
        return _split_decode_attention(
            query, keys, values, positions, layout, position, scaling, sliding_window, softcap
        )  # fmt: skip
    return torch_decode_attention(query, keys, values, positions, position, real, scaling, sliding_window, softcap)


@torch.library.custom_op("polykv::decode_attention", mutates_args=())
def decode_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    position: torch.Tensor,
    real: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """``decode_attention`` as an operator ``torch.compile`` calls as it is, inside a compiled graph: a compiled
    static step then needs no graph break at a layer's attention (dynamo would not trace the kernels' launch
    code), and the work before and after it (rotary embedding, the cache's write, the output projection) fuses.
    Contiguous, as its registered shape says."""
    output = decode_attention(query, keys, values, positions, position, real, scaling, sliding_window, softcap)
    return output.contiguous()


@decode_attention_op.register_fake
def _decode_attention_shape(query, keys, values, positions, position, real, scaling, sliding_window, softcap):
    return _output_like(query)


def _output_like(query: torch.Tensor) -> torch.Tensor:
    """What the attention operators return for ``query`` (B, Hq, n, D), without computing it: (B, n, Hq, D),
    contiguous."""
    batch, query_heads, length, dim = query.shape
    return query.new_empty(batch, length, query_heads, dim)


def ragged_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    real: torch.Tensor | None,
    starts: torch.Tensor,
    counts: torch.Tensor,
    largest: int,
    position: torch.Tensor,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``decode_attention`` over KV heads that keep different counts, in one launch: (B, n, Hq, D).

    ``keys``, ``values`` (B, T, D), ``positions`` (B, T) int32 and ``real`` (B, T) or None hold every head's
    slots one after another; KV head h's are slots ``starts[h]`` to ``starts[h] + counts[h]`` (``starts``,
    ``counts``: (H,) int32 on the device), ``largest`` the largest count (known on the host). Kernels only:
    check ``suits_kernels`` first (elsewhere attend head group by head group with ``decode_attention``).
    """
    heads = starts.shape[0]
    if not suits_kernels(query, keys, values, heads):
        raise ValueError("ragged_decode_attention runs the Triton kernels only, and they do not take these inputs")
    layout = _Layout.of(keys, values, positions, real, starts, counts, largest)
    return _split_decode_attention(query, keys, values, positions, layout, position, scaling, sliding_window, softcap)


@torch.library.custom_op("polykv::ragged_decode_attention", mutates_args=())
def ragged_decode_attention_op(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    real: torch.Tensor | None,
    starts: torch.Tensor,
    counts: torch.Tensor,
    largest: int,
    position: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """``ragged_decode_attention`` as an operator that a compiled graph calls as it is (see ``decode_attention_op``)."""
    output = ragged_decode_attention(
        query, keys, values, positions, real, starts, counts, largest, position, scaling, sliding_window, softcap
    )
    return output.contiguous()


@ragged_decode_attention_op.register_fake
def _ragged_decode_attention_shape(
    query, keys, values, positions, real, starts, counts, largest, position, scaling, sliding_window, softcap
):
    return _output_like(query)


def torch_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    position: torch.Tensor,
    real: torch.Tensor | None,
    scaling: float,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """``decode_attention`` in plain PyTorch, in float32 throughout: the reference and the fallback."""
    batch, query_heads, length, dim = query.shape
    heads = keys.shape[1]
    grouped = query.reshape(batch, heads, query_heads // heads, length, dim).float()
    logits = torch.einsum("bhgnd,bhsd->bhgns", grouped, keys.float()) * scaling
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    now = (position + torch.arange(length, device=position.device))[:, None]  # (n, 1)
    stored = positions[:, :, None, :]  # (B, H, 1, S)
    visible = stored <= now
    if sliding_window:
        visible &= stored > now - sliding_window
    if real is not None:
        visible &= real[:, :, None, :]
    weights = torch.softmax(logits.masked_fill(~visible[:, :, None], float("-inf")), dim=-1)
    output = torch.einsum("bhgns,bhsd->bnhgd", weights, values.float())
    return output.reshape(batch, length, query_heads, dim).to(query.dtype)


def suits_kernels(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, heads: int) -> bool:
    """Whether the kernels run for these inputs (``heads`` KV heads): they are ``available`` on the device, one
    float dtype, a head size and group they are built for, no empty axis."""
    _, query_heads, length, dim = query.shape
    return (
        available(query.device)
        and query.dtype in _DTYPES
        and keys.dtype == values.dtype == query.dtype
        and keys.shape == values.shape
        and query_heads % heads == 0
        and query_heads // heads * length <= MAX_GROUPS
        and dim <= MAX_HEAD_DIM
        and query.numel() > 0
        and keys.numel() > 0
    )


@attrs.frozen
class _Layout:
    """Where the kernels find a KV head's slots: strides of (batch, head, slot[, dim]) for keys and values,
    positions and real; with ``starts`` and ``counts``, head h's slots start at slot ``starts[h]`` (its head
    stride is 0) and number ``counts[h]``, else every head has ``largest`` slots."""

    key_strides: tuple[int, ...]
    value_strides: tuple[int, ...]
    position_strides: tuple[int, ...]
    real: torch.Tensor  # positions' own tensor as a placeholder pointer without padding (has_real False)
    real_strides: tuple[int, ...]
    has_real: bool
    heads: int
    largest: int  # slots of the longest head
    total: int  # slots of a batch row, all heads together
    starts: torch.Tensor | None = None
    counts: torch.Tensor | None = None

    @classmethod
    def of(cls, keys, values, positions, real, starts=None, counts=None, largest: int = 0) -> _Layout:
        """Uniform: keys and values (B, H, S, D). Ragged (``starts``, ``counts``, ``largest`` given): (B, T, D),
        read as (B, H, T, D) with head stride 0."""
        visible_real = positions if real is None else real.view(torch.uint8)
        if starts is None:
            heads, largest = keys.shape[1], keys.shape[2]
            return cls(
                keys.stride(), values.stride(), positions.stride(), visible_real, visible_real.stride(),
                real is not None, heads, largest, heads * largest,
            )  # fmt: skip

        def strides(tensor: torch.Tensor) -> tuple[int, ...]:
            return (tensor.stride(0), 0, *tensor.stride()[1:])

        return cls(
            strides(keys), strides(values), strides(positions), visible_real, strides(visible_real), real is not None,
            starts.shape[0], largest, keys.shape[1], starts, counts,
        )  # fmt: skip


def _split_decode_attention(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    positions: torch.Tensor,
    layout: _Layout,
    position: torch.Tensor,
    scaling: float,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    """``decode_attention`` by the split and merge kernels; launches only, no host read of any tensor."""
    batch, query_heads, length, dim = query.shape
    heads = layout.heads
    groups = query_heads // heads
    block_dim = max(16, triton.next_power_of_2(dim))
    block_slots = max(16, min(64, TILE_BYTES // (block_dim * keys.element_size())))
    chunk = _chunk_slots(batch * layout.total, block_slots, query.device)
    chunks = triton.cdiv(layout.largest, chunk)

    rows = batch * length * query_heads  # one per token and query head: (b * n + t) * Hq + h * G + g
    maxima = torch.empty(rows, chunks, device=query.device, dtype=torch.float32)
    sums = torch.empty_like(maxima)
    partials = torch.empty(rows, chunks, dim, device=query.device, dtype=torch.float32)
    if softcap:  # logits2 = softcap log2(e) tanh(scaling q.k / softcap)
        pre_scale, post_scale = scaling / softcap, softcap * math.log2(math.e)
    else:  # logits2 = scaling log2(e) q.k
        pre_scale, post_scale = scaling * math.log2(math.e), 1.0
    ragged = layout.starts is not None
    assert _split_kernel is not None and _merge_kernel is not None  # jitted: this runs where triton is (available)
    _split_kernel[(batch * heads, chunks)](
        query,
        keys,
        values,
        positions,
        position,
        layout.real,
        layout.starts if ragged else position,  # placeholder pointers when uniform
        layout.counts if ragged else position,
        maxima,
        sums,
        partials,
        layout.largest,
        heads,
        groups,
        length,
        chunk,
        int(sliding_window or 0),
        pre_scale,
        post_scale,
        query.stride(0),
        query.stride(1),
        query.stride(2),
        query.stride(3),
        *layout.key_strides,
        *layout.value_strides,
        *layout.position_strides,
        *layout.real_strides,
        HEAD_DIM=dim,
        BLOCK_D=block_dim,
        BLOCK_G=max(16, triton.next_power_of_2(groups * length)),
        BLOCK_S=block_slots,
        HAS_REAL=layout.has_real,
        HAS_WINDOW=bool(sliding_window),
        HAS_SOFTCAP=bool(softcap),
        RAGGED=ragged,
        PRECISION=dot_precision(query),
        num_warps=4,
        num_stages=3,
    )
    output = torch.empty(batch, length, query_heads, dim, device=query.device, dtype=query.dtype)
    _merge_kernel[(rows,)](
        maxima, sums, partials, output, chunks, HEAD_DIM=dim, BLOCK_D=block_dim, BLOCK_C=MERGE_CHUNKS, num_warps=4
    )
    return output


def _chunk_slots(work: int, block_slots: int, device: torch.device) -> int:
    """Slots per program, a multiple of ``block_slots``: about PROGRAMS_PER_PROCESSOR programs per multiprocessor
    over the ``work`` slots of the whole batch, and at least one tile."""
    processors = _processors(device) if device.type == "cuda" else _INTERPRETED_PROCESSORS
    per_program = triton.cdiv(work, processors * PROGRAMS_PER_PROCESSOR)
    return triton.cdiv(per_program, block_slots) * block_slots


@functools.cache
def _processors(device: torch.device) -> int:
    """The device's multiprocessor count."""
    return torch.cuda.get_device_properties(device).multi_processor_count


def _split_decode_kernel(
    query,
    keys,
    values,
    positions,
    position,
    real,
    starts,
    counts,
    maxima,
    sums,
    partials,
    slots,
    heads,
    groups,
    length,
    chunk,
    window,
    pre_scale,
    post_scale,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_vd,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_rb,
    stride_rh,
    stride_rs,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HAS_REAL: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    RAGGED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One program: the ``chunk`` slots of one chunk of one (batch, KV head) row, for the row's query heads and
    tokens: query row i is token i // groups of the step, query head i % groups of the KV head's group.
    ``RAGGED``: the head's slots start at slot ``starts[head]`` and number ``counts[head]``, else ``slots``.

    Stores the chunk's base-2 logit maximum, the sum of exp2(logit - maximum) and the values weighted by them,
    per query head. Logits are post_scale * q.k * pre_scale, or post_scale * tanh(pre_scale * q.k) with a softcap,
    both in base 2. A chunk with no visible slot stores maximum -inf, sum 0 and zero values.
    """
    kv_row = tl.program_id(0)
    batch = (kv_row // heads).to(tl.int64)
    head = (kv_row % heads).to(tl.int64)
    if RAGGED:
        start_slot = tl.load(starts + head).to(tl.int64)
        slots = tl.load(counts + head)
    else:
        start_slot = 0
    first = tl.program_id(1) * chunk
    last = tl.minimum(first + chunk, slots)  # a head's chunks past its slots find nothing (RAGGED)
    now = tl.load(position)  # on the device: a replayed graph sees the position of its step

    member = tl.arange(0, BLOCK_G)
    token, group = member // groups, member % groups
    dims = tl.arange(0, BLOCK_D)
    in_group = member < groups * length
    in_dims = dims < HEAD_DIM
    question = tl.load(
        query
        + batch * stride_qb
        + (head * groups + group)[:, None] * stride_qh
        + token[:, None] * stride_qt
        + dims[None, :] * stride_qd,
        mask=in_group[:, None] & in_dims[None, :],
        other=0.0,
    )  # (BLOCK_G, BLOCK_D); rows past the group are zero and never stored
    sees = (now + token)[:, None]  # (BLOCK_G, 1) each row's own position
    key_base = keys + batch * stride_kb + head * stride_kh + start_slot * stride_ks
    value_base = values + batch * stride_vb + head * stride_vh + start_slot * stride_vs
    position_base = positions + batch * stride_pb + head * stride_ph + start_slot * stride_ps
    real_base = real + batch * stride_rb + head * stride_rh + start_slot * stride_rs

    best = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    total = tl.zeros([BLOCK_G], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    for start in range(first, last, BLOCK_S):
        slot = start + tl.arange(0, BLOCK_S)
        inside = slot < last
        tile = inside[:, None] & in_dims[None, :]
        key = tl.load(key_base + slot[:, None] * stride_ks + dims[None, :] * stride_kd, mask=tile, other=0.0)
        value = tl.load(value_base + slot[:, None] * stride_vs + dims[None, :] * stride_vd, mask=tile, other=0.0)
        held = tl.load(position_base + slot * stride_ps, mask=inside, other=0)[None, :]
        visible = inside[None, :] & (held <= sees)  # (BLOCK_G, BLOCK_S)
        if HAS_WINDOW:
            visible &= held > sees - window
        if HAS_REAL:
            visible &= (tl.load(real_base + slot * stride_rs, mask=inside, other=0) != 0)[None, :]

        logits = tl.dot(question, tl.trans(key), input_precision=PRECISION) * pre_scale  # (BLOCK_G, BLOCK_S)
        if HAS_SOFTCAP:  # tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 without overflow trouble
            logits = 1.0 - 2.0 / (tl.exp2(logits * 2.885390081777927) + 1.0)  # 2 log2(e)
            logits *= post_scale
        logits = tl.where(visible, logits, float("-inf"))
        new_best = tl.maximum(best, tl.max(logits, axis=1))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)  # keeps all-invisible rows at 0 rather than NaN
        weights = tl.exp2(logits - shift[:, None])
        rescale = tl.exp2(best - shift)
        total = total * rescale + tl.sum(weights, axis=1)
        weighted = weighted * rescale[:, None] + tl.dot(weights.to(value.dtype), value, input_precision=PRECISION)
        best = new_best

    query_row = ((batch * length + token) * heads + head) * groups + group  # (b * n + t) * Hq + h * G + g
    row = query_row.to(tl.int64) * tl.num_programs(1) + tl.program_id(1)  # (query row, chunk)
    tl.store(maxima + row, best, mask=in_group)
    tl.store(sums + row, total, mask=in_group)
    tl.store(partials + row[:, None] * HEAD_DIM + dims[None, :], weighted, mask=in_group[:, None] & in_dims[None, :])


def _merge_decode_kernel(
    maxima,
    sums,
    partials,
    output,
    chunks,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program: one query head's chunks merged into its output row, exp2(maximum - overall maximum) each.

    A row with no visible slot anywhere divides 0 by 0: NaN.
    """
    row = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    in_dims = dims < HEAD_DIM
    best = tl.full([1], float("-inf"), dtype=tl.float32)
    total = tl.zeros([1], dtype=tl.float32)
    weighted = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, chunks, BLOCK_C):
        chunk = start + tl.arange(0, BLOCK_C)
        inside = chunk < chunks
        at = row * chunks + chunk
        maximum = tl.load(maxima + at, mask=inside, other=float("-inf"))
        part_sum = tl.load(sums + at, mask=inside, other=0.0)
        part = tl.load(
            partials + at[:, None] * HEAD_DIM + dims[None, :], mask=inside[:, None] & in_dims[None, :], other=0.0
        )
        new_best = tl.maximum(best, tl.max(maximum, axis=0))
        shift = tl.where(new_best == float("-inf"), 0.0, new_best)
        weight = tl.exp2(maximum - shift)  # (BLOCK_C,)
        rescale = tl.exp2(best - shift)  # (1,)
        total = total * rescale + tl.sum(weight * part_sum, axis=0)
        weighted = weighted * rescale + tl.sum(weight[:, None] * part, axis=0)
        best = new_best
    tl.store(output + row * HEAD_DIM + dims, (weighted / total).to(output.dtype.element_ty), mask=in_dims)


_split_kernel = jit(_split_decode_kernel)
_merge_kernel = jit(_merge_decode_kernel)

"""decode_attention against dense attention: the PyTorch version here, the Triton kernels in triton's interpreter
on the CPU and compiled on CUDA (also inside a captured CUDA graph).

triton picks interpreting or compiling once per process, when it is imported, and an interpreting process would
also send every CPU call through the kernels; so the interpreted tests run in a child pytest process started with
TRITON_INTERPRET=1 (as in test_column_sums), and are skipped in this one. The interpreter cannot multiply bfloat16
(its tl.dot returns garbage), so bfloat16 is tested on CUDA only.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreter import interpreted, parent_only, run_interpreted

from polykv.cache.kernels import decode_attention as da

FREE = torch.iinfo(torch.int32).max  # a free slot's position, as in polykv.cache.static


def slot_inputs(batch, heads, groups, slots, dim, *, free, padding, seed=0, dtype=torch.float32, device="cpu"):
    """query (B, H*G, 1, D), keys and values (B, H, S, D), positions (B, H, S), position (1,) and real (B, H, S).

    Each row holds distinct positions up to the query's own (2 S), the query's slot among them, in shuffled slot
    order; about ``free`` of the other slots are free and about ``padding`` of them are padding.
    """
    generator = torch.Generator(device=device).manual_seed(seed)

    def uniform(*shape):
        return torch.rand(*shape, generator=generator, device=device)

    now = 2 * slots
    earlier = uniform(batch, heads, now).argsort(dim=-1)[..., : slots - 1]
    positions = torch.cat([earlier, torch.full((batch, heads, 1), now, device=device)], dim=-1)
    positions = positions.masked_fill((uniform(batch, heads, slots) < free) & (positions != now), FREE)
    positions = positions.gather(-1, uniform(batch, heads, slots).argsort(dim=-1)).to(torch.int32)
    real = (uniform(batch, heads, slots) >= padding) | (positions == now)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, device=device).to(dtype)

    query = normal(batch, heads * groups, 1, dim)
    keys, values = normal(batch, heads, slots, dim), normal(batch, heads, slots, dim)
    return query, keys, values, positions, torch.tensor([now], device=device), real


def dense_attention(query, keys, values, positions, position, real, scaling, window=None, softcap=None):
    """Attention in float64 over keys and values repeated per query head, with an explicit (B, Hq, n, S) mask:
    query i of the step sits at ``position + i``."""
    groups = query.shape[1] // keys.shape[1]
    now = position + torch.arange(query.shape[2])[:, None]  # (n, 1)
    age = now - positions.long()[:, :, None, :]  # how long before each query a slot's token came; free: negative
    visible = (age >= 0) & (age < window if window else True) & (real[:, :, None, :] if real is not None else True)
    mask = visible.repeat_interleave(groups, dim=1)
    keys, values = (t.double().repeat_interleave(groups, dim=1) for t in (keys, values))
    if softcap is None:
        output = F.scaled_dot_product_attention(query.double(), keys, values, attn_mask=mask, scale=scaling)
    else:
        logits = torch.tanh(query.double() @ keys.transpose(-1, -2) * scaling / softcap) * softcap
        output = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1) @ values
    return output.transpose(1, 2)  # (B, n, Hq, D)


def step_of(query, tokens, seed=0):
    """``query`` (B, Hq, 1, D) with ``tokens - 1`` more queries after it: a step of several tokens, as a
    speculative check feeds, whose later tokens sit at positions no slot holds yet (they see what the first sees)."""
    generator = torch.Generator().manual_seed(seed)
    more = torch.randn(*query.shape[:2], tokens - 1, query.shape[-1], generator=generator).to(query)
    return torch.cat([query, more], dim=2)


@pytest.fixture(params=[1, 16, 256], ids=["one-chunk", "few-chunks", "many-chunks"])
def split(request, monkeypatch):
    """Programs per processor under the interpreter (one 'multiprocessor'), over 2 x 2 rows of 1030 slots: one
    chunk of 17 tiles per row, 4 chunks of 5 tiles, or 17 chunks of one tile, more than one merge step takes."""
    monkeypatch.setattr(da, "PROGRAMS_PER_PROCESSOR", request.param)


# --- the PyTorch version ------------------------------------------------------------------------------------------


@parent_only
@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    groups=st.sampled_from([1, 3, 4]),
    slots=st.integers(1, 40),
    dim=st.sampled_from([8, 16]),
    free=st.sampled_from([0.0, 0.3, 0.9]),
    padding=st.sampled_from([0.0, 0.3]),
    window=st.none() | st.integers(1, 90),
    softcap=st.none() | st.floats(0.5, 20.0),
    seed=st.integers(0, 2**16),
)
def test_torch_version_matches_dense_attention(batch, heads, groups, slots, dim, free, padding, window, softcap, seed):
    inputs = slot_inputs(batch, heads, groups, slots, dim, free=free, padding=padding, seed=seed)
    scaling = dim**-0.5
    expected = dense_attention(*inputs, scaling, window, softcap)
    result = da.decode_attention(*inputs, scaling, window, softcap)  # the PyTorch version: no triton on the CPU
    assert result.shape == (batch, 1, heads * groups, dim) and result.dtype == torch.float32
    torch.testing.assert_close(result, expected.float(), rtol=1e-5, atol=1e-5)


@parent_only
@settings(max_examples=30, deadline=None)
@given(
    tokens=st.integers(2, 6),
    groups=st.sampled_from([1, 3]),
    slots=st.integers(1, 40),
    window=st.none() | st.integers(1, 90),
    seed=st.integers(0, 2**16),
)
def test_torch_version_with_several_tokens_matches_dense_attention(tokens, groups, slots, window, seed):
    """Each of a step's tokens sees the slots up to its own position: moving the step's position back by one
    hides the newest slot from the first token only."""
    query, *rest = slot_inputs(2, 2, groups, slots, 16, free=0.3, padding=0.2, seed=seed)
    query = step_of(query, tokens, seed)
    positions, position = rest[2], rest[3] - 1
    inputs = (query, rest[0], rest[1], positions, position, rest[4])
    result = da.decode_attention(*inputs, 0.25, window)
    assert result.shape == (2, tokens, 2 * groups, 16)
    expected = dense_attention(*inputs, 0.25, window).float()
    now = position + torch.arange(tokens)[:, None]
    sees = (
        (positions[:, :, None, :] <= now) & (positions[:, :, None, :] > now - (window or 10**6)) & rest[4][:, :, None]
    )
    defined = sees.any(dim=-1).repeat_interleave(groups, dim=1).transpose(1, 2)[..., None].expand_as(result)
    assert torch.equal(result.isfinite(), defined)  # a token can see nothing once its slot is ahead of it
    torch.testing.assert_close(result[defined], expected[defined], rtol=1e-5, atol=1e-5)


@parent_only
@settings(max_examples=15, deadline=None)
@given(
    tokens=st.integers(1, 4),
    groups=st.sampled_from([1, 3]),
    slots=st.integers(1, 20),
    padded=st.booleans(),
    window=st.none() | st.integers(1, 30),
    seed=st.integers(0, 2**16),
)
def test_the_operator_is_decode_attention_and_keeps_its_registered_shape(tokens, groups, slots, padded, window, seed):
    """polykv::decode_attention, which a compiled static step calls inside its graph: the function's result, and
    what torch.library's checks ask of an operator (its fake shape and strides, its schema) for every input."""
    query, keys, values, positions, position, real = slot_inputs(
        2, 2, groups, slots, 16, free=0.3, padding=0.2, seed=seed
    )
    inputs = (step_of(query, tokens, seed), keys, values, positions, position, real if padded else None)
    result = da.decode_attention_op(*inputs, 0.25, window, None)
    torch.testing.assert_close(result, da.decode_attention(*inputs, 0.25, window), equal_nan=True, rtol=0, atol=0)
    torch.library.opcheck(da.decode_attention_op, (*inputs, 0.25, window, None))


@parent_only
def test_cpu_runs_the_torch_version_without_the_interpreter():
    assert not da.available(torch.device("cpu"))
    inputs = slot_inputs(1, 2, 2, 9, 16, free=0.3, padding=0.3, dtype=torch.bfloat16)
    torch.testing.assert_close(da.decode_attention(*inputs, 0.25), da.torch_decode_attention(*inputs, 0.25))


@pytest.mark.usefixtures("split")
@pytest.mark.filterwarnings("ignore:invalid value encountered in divide:RuntimeWarning")  # the interpreter's 0 / 0
def test_a_row_that_sees_no_slot_is_nan_and_alone():
    """A query head that sees nothing (here: every slot of one batch row's KV head is padding) gives NaN for its
    own output row only. Runs in both processes: the PyTorch version here, the kernels in the interpreter."""
    query, keys, values, positions, position, real = slot_inputs(2, 2, 3, 70, 16, free=0.2, padding=0.2)
    real[1, 0] = False
    result = da.decode_attention(query, keys, values, positions, position, real, 0.25)
    blind = torch.zeros(2, 6, dtype=torch.bool)
    blind[1, :3] = True  # batch row 1, the query heads of KV head 0
    assert result[:, 0][blind].isnan().all() and result[:, 0][~blind].isfinite().all()
    expected = dense_attention(query, keys, values, positions, position, real, 0.25)
    torch.testing.assert_close(result[:, 0][~blind], expected[:, 0][~blind].float(), rtol=1e-5, atol=1e-5)


# --- the Triton kernels in the interpreter ------------------------------------------------------------------------


@parent_only
def test_interpreted_tests_pass():
    """This file's interpreted tests, in a child process whose triton interprets."""
    run_interpreted(__file__)


@interpreted
@pytest.mark.usefixtures("split")
@pytest.mark.parametrize("groups", [1, 4])
@pytest.mark.parametrize("dim", [16, 64])
@pytest.mark.parametrize("slots", [1, 5, 300, 1030])
def test_interpreted_kernels_match_the_torch_version(slots, dim, groups):
    """Free slots, padding, a sliding window and a softcap, slots in no order."""
    inputs = slot_inputs(2, 2, groups, slots, dim, free=0.3, padding=0.2, seed=slots + dim + groups)
    window, softcap, scaling = slots // 2 + 1, 1.5, dim**-0.5
    result = da.decode_attention(*inputs, scaling, window, softcap)
    assert result.shape == (2, 1, 2 * groups, dim) and result.dtype == torch.float32
    expected = da.torch_decode_attention(*inputs, scaling, window, softcap)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.usefixtures("split")
@pytest.mark.parametrize("slots", [5, 300])
def test_interpreted_kernels_without_window_softcap_or_padding(slots):
    inputs = slot_inputs(1, 3, 3, slots, 24, free=0.5, padding=0.0)
    result = da.decode_attention(*inputs[:-1], None, 0.2)
    torch.testing.assert_close(result, da.torch_decode_attention(*inputs[:-1], None, 0.2), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.usefixtures("split")
@pytest.mark.parametrize("window", [4, 40])
def test_interpreted_kernels_with_slots_in_order_and_a_short_window(window):
    """Slots in position order, as prefill leaves them: a short window sees only the last chunks, and the last
    slot's key, made to dominate, puts the largest logit in the last merge step."""
    query, keys, values, _, _, _ = slot_inputs(2, 2, 1, 1030, 16, free=0.0, padding=0.0)
    keys[:, :, -1] = 2 * query[:, :, 0]
    positions = torch.arange(1030, dtype=torch.int32).expand(2, 2, -1)
    inputs = (query, keys, values, positions, torch.tensor([1029]), None, 0.25, window)
    torch.testing.assert_close(da.decode_attention(*inputs), da.torch_decode_attention(*inputs), rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.usefixtures("split")
@pytest.mark.parametrize(("groups", "tokens"), [(1, 5), (3, 5), (4, 8)])
def test_interpreted_kernels_with_several_tokens(groups, tokens):
    """A speculative check's step: rows per KV head are group size x tokens (up to MAX_GROUPS)."""
    query, keys, values, positions, position, real = slot_inputs(2, 2, groups, 300, 16, free=0.3, padding=0.2)
    inputs = (step_of(query, tokens), keys, values, positions, position - 2, real, 0.25, 120, 2.0)
    result = da.decode_attention(*inputs)
    assert result.shape == (2, tokens, 2 * groups, 16)
    torch.testing.assert_close(result, da.torch_decode_attention(*inputs), rtol=1e-5, atol=1e-5, equal_nan=True)


@interpreted
def test_interpreted_kernels_take_views_and_fp16():
    """The query as transformers hands it (a transposed view), keys and values as slices of larger buffers."""
    query, keys, values, positions, position, real = slot_inputs(2, 2, 4, 200, 64, free=0.3, padding=0.2)
    query = query.transpose(1, 2).contiguous().transpose(1, 2)
    keys = torch.cat([keys, keys], dim=-1)[..., ::2]  # stride 2 along the head dimension
    values = torch.cat([values, values], dim=2)[:, :, 200:]
    positions = positions.transpose(0, 1).contiguous().transpose(0, 1)
    real = torch.stack([real, real], dim=-1)[..., 0]  # stride 2 along the slots
    inputs = (query, keys, values, positions, position, real)
    expected = da.torch_decode_attention(*inputs, 0.125, 50, 3.0)
    torch.testing.assert_close(da.decode_attention(*inputs, 0.125, 50, 3.0), expected, rtol=1e-5, atol=1e-5)
    half = tuple(t.half() if t.is_floating_point() else t for t in inputs)
    result = da.decode_attention(*half, 0.125, 50, 3.0)
    assert result.dtype == torch.float16
    torch.testing.assert_close(result.float(), expected, rtol=2e-2, atol=2e-3)


def ragged_inputs(counts, order, groups, dim, *, batch=2, tokens=1, seed=0, device="cpu", dtype=torch.float32):
    """KV heads keeping ``counts[h]`` slots each, laid one after another in a pool in the order ``order`` (as a
    SlotPool lays groups of heads): the ragged kernel's inputs and each head's own (B, 1, S_h, ...) tensors.
    Every head's slots end at the query's position ``now``; about a third of the others are free, a fifth padding."""
    now = 2 * max(counts)
    heads = [slot_inputs(batch, 1, groups, count, dim, free=0.3, padding=0.2, seed=seed + head, device=device)
             for head, count in enumerate(counts)]  # fmt: skip
    own = []
    for query, keys, values, positions, position, real in heads:
        shifted = torch.where(positions == FREE, positions, positions + (now - position.item())).to(torch.int32)
        own.append((query, keys.to(dtype), values.to(dtype), shifted, real))
    query = torch.cat([h[0] for h in own], dim=1).to(dtype)
    if tokens > 1:
        query = step_of(query, tokens, seed)
    pool = [torch.cat([own[h][i][:, 0] for h in order], dim=1) for i in (1, 2, 3, 4)]  # (B, T, ...)
    starts, offset = [0] * len(counts), 0
    for head in order:
        starts[head], offset = offset, offset + counts[head]
    layout = (torch.tensor(starts, dtype=torch.int32, device=device), torch.tensor(counts, dtype=torch.int32,
              device=device), max(counts))  # fmt: skip
    return query, pool, layout, own, torch.tensor([now], device=device)


def per_head_attention(query, own, position, scaling, window=None, softcap=None):
    """The reference: each KV head's query heads over that head's own slots (``torch_decode_attention``)."""
    groups = query.shape[1] // len(own)
    outputs = [
        da.torch_decode_attention(query[:, h * groups : (h + 1) * groups], keys, values, positions, position, real,
                                  scaling, window, softcap)
        for h, (_q, keys, values, positions, real) in enumerate(own)
    ]  # fmt: skip
    return torch.cat(outputs, dim=2)


@parent_only
def test_ragged_attention_refuses_where_the_kernels_do_not_run():
    query, pool, layout, _own, position = ragged_inputs([3, 5], [0, 1], 2, 16)
    assert not da.suits_kernels(query, pool[0], pool[1], 2)
    with pytest.raises(ValueError, match="Triton kernels only"):
        da.ragged_decode_attention(query, *pool, *layout, position, 0.25)


@interpreted
@pytest.mark.usefixtures("split")
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize(
    ("counts", "order"),
    [([700, 700, 90, 90], [0, 1, 2, 3]), ([90, 700, 90, 700], [0, 2, 1, 3]), ([1, 1030, 40], [2, 1, 0])],
    ids=["runs", "interleaved", "one-slot-head"],
)
def test_interpreted_ragged_kernels_attend_each_head_to_its_own_slots(counts, order, groups):
    """Heads of different counts in one pool, in any order: each attends exactly as it would alone, with free
    slots, padding, a sliding window and a softcap (a head shorter than a chunk finds nothing in the others)."""
    query, pool, layout, own, position = ragged_inputs(counts, order, groups, 16, seed=sum(counts))
    result = da.ragged_decode_attention(query, *pool, *layout, position, 0.25, 600, 2.0)
    assert result.shape == (2, 1, len(counts) * groups, 16)
    expected = per_head_attention(query, own, position, 0.25, 600, 2.0)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


@interpreted
@pytest.mark.usefixtures("split")
def test_interpreted_ragged_kernels_with_several_tokens_and_no_padding():
    """A speculative check's step over ragged heads, without a real mask (every slot real)."""
    query, pool, layout, own, position = ragged_inputs([300, 60], [1, 0], 4, 16, tokens=5, seed=3)
    own = [(q, k, v, p, None) for q, k, v, p, _real in own]
    result = da.ragged_decode_attention(query, *pool[:3], None, *layout, position - 2, 0.25)
    assert result.shape == (2, 5, 8, 16)
    expected = per_head_attention(query, own, position - 2, 0.25)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5, equal_nan=True)


# --- compiled on CUDA ---------------------------------------------------------------------------------------------


def assert_close_to_fp32(result: torch.Tensor, expected: torch.Tensor) -> None:
    """Within bfloat16's accuracy of the float32 output, relative to the output's scale (outputs averaged over
    thousands of slots are small)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(result.float(), expected, rtol=2e-2, atol=1e-2 * scale)
    assert (result.float() - expected).norm() <= 1e-2 * expected.norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4096, 50.0)], ids=["plain", "window-softcap"])
@pytest.mark.parametrize("slots", [513, 32768 + 193])
@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_kernels_match_float32_in_bf16(batch, slots, window, softcap):
    assert da.available(torch.device("cuda"))
    inputs = slot_inputs(batch, 8, 4, slots, 128, free=0.1, padding=0.05, dtype=torch.bfloat16, device="cuda")
    result = da.decode_attention(*inputs, 128**-0.5, window, softcap)
    assert result.shape == (batch, 1, 32, 128) and result.dtype == torch.bfloat16
    upcast = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    assert_close_to_fp32(result, da.torch_decode_attention(*upcast, 128**-0.5, window, softcap))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graph_reads_the_position_on_the_device():
    """A graph captured at one position and replayed after ``position`` changes in place attends as of the new
    position: the kernels read it on the device, never on the host."""
    inputs = slot_inputs(2, 8, 4, 4096 + 7, 128, free=0.1, padding=0.05, dtype=torch.bfloat16, device="cuda")
    query, keys, values, positions, position, real = inputs
    window, scaling = 2000, 128**-0.5

    def step():
        return da.decode_attention(query, keys, values, positions, position, real, scaling, window)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    upcast = tuple(t.float() if t.is_floating_point() else t for t in inputs)
    graph.replay()
    before = output.clone()
    assert_close_to_fp32(before, da.torch_decode_attention(*upcast, scaling, window))

    position.sub_(3000)  # the window and the causal bound both move
    graph.replay()
    assert_close_to_fp32(output, da.torch_decode_attention(*upcast, scaling, window))
    assert (output.float() - before.float()).norm() > 0.5 * before.float().norm()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 8])
def test_compiled_ragged_kernels_match_float32_in_bf16(batch):
    """8B-shaped ragged heads (8 KV heads of 128, groups of 4 query heads): half keep 768 slots, half 256,
    interleaved in the pool."""
    counts = [768 if head % 2 else 256 for head in range(8)]
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    query, pool, layout, own, position = ragged_inputs(counts, order, 4, 128, batch=batch, device="cuda",
                                                      dtype=torch.bfloat16)  # fmt: skip
    result = da.ragged_decode_attention(query, *pool, *layout, position, 128**-0.5)
    upcast = [tuple(t.float() if t.is_floating_point() else t for t in head) for head in own]
    assert_close_to_fp32(result, per_head_attention(query.float(), upcast, position, 128**-0.5))

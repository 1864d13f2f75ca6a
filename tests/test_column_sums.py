"""The fused column-sum kernel against dense attention: in triton's interpreter on the CPU, compiled on CUDA.

triton picks interpreting or compiling once per process, when it is imported, and an interpreting
process would also send polykv's CPU work through the kernel; so the interpreted tests run in a
child pytest process started with TRITON_INTERPRET=1 (tests/interpreter.py), and are skipped in this one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from interpreter import interpreted, parent_only, run_interpreted

pytest.importorskip("triton")

from polykv.cache.kernels import column_sums as cs


def random_inputs(batch, heads, groups, length, dim, *, padding, dtype=torch.float32, device="cpu", seed=0):
    """Queries (B, H, G, L, D), keys (B, H, L, D) and real_queries (B, L): row 0 left-padded when ``padding``."""
    generator = torch.Generator().manual_seed(seed)
    queries = torch.randn(batch, heads, groups, length, dim, generator=generator)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    real = torch.ones(batch, length, dtype=torch.bool)
    if padding:
        real[0, : max(1, length // 2)] = False
    return queries.to(device, dtype), keys.to(device, dtype), real.to(device)


def dense_reference(queries, keys, real, scaling):
    """Column sums of the causal softmax over real keys, summed over real queries, and each query's lse (B, H*G, L).

    float64 from the given (possibly rounded) inputs. A padding key gets weight 0; a padding query, which sees
    no real key under left padding, has lse -inf.
    """
    batch, heads, groups, length, _ = queries.shape
    logits = torch.einsum("bhgid,bhjd->bhgij", queries.double(), keys.double()) * scaling
    causal = torch.ones(length, length, dtype=torch.bool, device=queries.device).tril()
    visible = causal & real[:, None, None, None, :]
    logits = logits.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.nan_to_num(torch.softmax(logits, dim=-1), nan=0.0) * real[:, None, None, :, None]
    return weights.sum(dim=-2), lse.reshape(batch, heads * groups, length).float()


@parent_only
def test_interpreted_tests_pass():
    """This file's interpreted tests, in a child process whose triton interprets."""
    run_interpreted(__file__)


#: (length, head size, padding): lengths around the block sizes, and a head size that is no power of two.
CASES = [(length, dim, padding) for length in (1, 7, 64, 130) for dim in (16, 64) for padding in (False, True)]


@interpreted
@pytest.mark.parametrize(("length", "dim", "padding"), [*CASES, (130, 200, True)])
def test_interpreted_kernel_matches_dense_attention(length, dim, padding):
    queries, keys, real, scaling = *random_inputs(2, 2, 3, length, dim, padding=padding), dim**-0.5
    expected, lse = dense_reference(queries, keys, real, scaling)
    result = cs.column_sums(queries, keys, lse, real, scaling)
    assert result.shape == (2, 2, 3, length) and result.dtype == torch.float32
    # Padding keys are outside the contract's softmax: only real keys' columns are compared.
    torch.testing.assert_close(result * real[:, None, None, :], expected.float(), rtol=1e-5, atol=1e-5)


@interpreted
def test_interpreted_kernel_takes_the_cpu_flash_lse_and_strided_inputs():
    """The lse PyTorch's CPU flash kernel returns is the one column_sums expects; queries may be a strided view."""
    queries, keys, real = random_inputs(1, 2, 2, 70, 24, padding=False)
    scaling = 0.3
    flat_queries = queries.reshape(1, 4, 70, 24)
    flat_keys = keys.repeat_interleave(2, dim=1)
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        flat_queries, flat_keys, flat_keys, 0.0, True, scale=scaling
    )
    strided = queries.transpose(-1, -2).contiguous().transpose(-1, -2)
    expected, _ = dense_reference(queries, keys, real, scaling)
    result = cs.column_sums(strided, keys, lse, real, scaling)
    torch.testing.assert_close(result, expected.float(), rtol=1e-5, atol=1e-5)


@parent_only
def test_unavailable_on_the_cpu_without_the_interpreter():
    assert not cs.available(torch.device("cpu"))
    queries, keys, _ = random_inputs(1, 1, 1, 4, 16, padding=False)
    assert cs.attention_with_lse(queries[:, 0], keys, keys, 0.25) is None


@pytest.mark.gpu
@pytest.mark.parametrize("cudnn", [True, False], ids=["cudnn-where-it-applies", "flash"])
@pytest.mark.parametrize("padding", [False, True])
@pytest.mark.parametrize("dim", [128, 256])
def test_compiled_kernel_matches_dense_attention_in_bf16(dim, padding, cudnn):
    length, scaling = 1000, dim**-0.5
    queries, keys, real = random_inputs(2, 2, 4, length, dim, padding=padding, dtype=torch.bfloat16, device="cuda")
    expected, dense_lse = dense_reference(queries, keys, real, scaling)
    flat_queries = queries.reshape(2, 8, length, dim)
    flat_keys = keys.repeat_interleave(4, dim=1)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(cudnn and enabled)
    try:
        found = cs.attention_with_lse(flat_queries, flat_keys, flat_keys, scaling)
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
    assert found is not None and cs.available(queries.device)
    output, lse = found
    assert lse.shape == (2, 8, length) and lse.dtype == torch.float32
    sdpa = F.scaled_dot_product_attention(flat_queries, flat_keys, flat_keys, is_causal=True, scale=scaling)
    torch.testing.assert_close(output, sdpa, rtol=2e-2, atol=2e-2)
    if not padding:
        # The flash kernel cannot leave padding keys out of its normaliser; then the dense lse stands in.
        torch.testing.assert_close(lse, dense_lse, rtol=1e-4, atol=1e-4)
    result = cs.column_sums(queries, keys, lse if not padding else dense_lse, real, scaling)
    torch.testing.assert_close(result * real[:, None, None, :], expected.float(), rtol=2e-2, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("dim", [64, 256])
def test_compiled_kernel_in_fp16_and_fp32(dim, dtype):
    """fp32 inner products keep fp32 accuracy (3xTF32, not TF32), and no block configuration outgrows shared memory."""
    length, scaling = 700, dim**-0.5
    queries, keys, real = random_inputs(1, 2, 3, length, dim, padding=True, dtype=dtype, device="cuda")
    expected, lse = dense_reference(queries, keys, real, scaling)
    result = cs.column_sums(queries, keys, lse, real, scaling)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(result * real[:, None, None, :], expected.float(), rtol=tolerance, atol=tolerance)

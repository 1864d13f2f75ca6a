"""triton, optional: whether polykv's Triton kernels run on a device, and how they multiply.

polykv imports without triton (CI has none); its kernels (``column_sums``, ``decode_attention``)
then stay unused and PyTorch code runs instead. triton decides once, when it is first imported,
whether it compiles or interprets: with TRITON_INTERPRET=1 set before that, every kernel runs in
triton's interpreter, on the CPU too, which is how the kernels are tested without a GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

try:
    # triton comes with CUDA builds of torch only; without it the kernels are not offered.
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

#: Whether triton interprets its kernels (TRITON_INTERPRET=1 at its import) instead of compiling them.
INTERPRETED = triton is not None and triton.knobs.runtime.interpret


def available(device: torch.device) -> bool:
    """Whether polykv's Triton kernels run for tensors on ``device``: triton is installed and the device
    is CUDA, or triton interprets its kernels."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


class Kernel(Protocol):
    """A Triton kernel: ``kernel[grid](*arguments, **constants)`` launches it over ``grid`` programs."""

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., object]: ...


def jit(function: Callable) -> Kernel | None:
    """``function`` as a Triton kernel, or None without triton."""
    return None if triton is None else triton.jit(function)


def dot_precision(inputs: torch.Tensor) -> str | None:
    """How tl.dot multiplies ``inputs``: fp32 at fp32 accuracy, as three TF32 products where tensor cores
    take TF32 (sm80 on) and plainly elsewhere; half precision as it is (None, triton's default)."""
    if inputs.dtype != torch.float32:
        return None
    if inputs.is_cuda and torch.cuda.get_device_capability(inputs.device) >= (8, 0):
        return "tf32x3"
    return "ieee"

"""A speculative draft's matrix products in TF32, where its proposals need not be exact.

A draft's proposals only have to be likely: the full cache's check decides every token. So on CUDA
a float32 model can draft with TF32 tensor cores (``torch.backends.cuda.matmul.allow_tf32``) while
its checks keep full float32, and the output stays plain float32 decoding's token for token. This
matters where the draft step's many small float32 products set its time, as they do for the
bundled model at batch 32 (``benchmarks/results/step_kernels_NVIDIA-H200_float32-traced.txt``).
The flag is set around the draft's forwards only: a CUDA graph captures the products it chose, and
compiled forwards are compiled anew for it (dynamo guards on it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def tf32_matmuls(enabled: bool) -> Iterator[None]:
    """Inside, CUDA float32 matrix products use TF32 if ``enabled`` (else the setting is left as it is)."""
    if not enabled:
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before

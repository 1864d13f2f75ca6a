"""The precision a speculative draft runs in, where its proposals need not be exact.

A draft's proposals only have to be likely: the full cache's check decides every token. So a
float32 model can draft in a cheaper precision while its checks keep full float32, and the output
stays plain float32 decoding's token for token. This matters where the draft step's many small
float32 products set its time, as they do for the bundled model at batch 32
(``benchmarks/results/step_kernels_NVIDIA-H200_float32-traced.txt``). Two ways:

- TF32 products (``tf32_matmuls``): the same weights, CUDA's TF32 tensor cores. The flag is set
  around the draft's forwards only: a CUDA graph captures the products it chose, and compiled
  forwards are compiled anew for it (dynamo guards on it).
- A lower dtype (``draft_model``): a twin of the model with its weights in bfloat16 (or float16),
  whose draft cache holds its keys and values in that dtype too (``PolyCache.cast``). Every kernel
  of the draft's step then reads half the bytes, and its products run on tensor cores. The twin
  costs its weights' memory once more, at half the size.
"""

from __future__ import annotations

import contextlib
import copy
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from polykv.cache.preparation import restore_model

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Per model: (its weights' identity when the twin was made, the twin) by dtype.
_TWINS: weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype, tuple[tuple, PreTrainedModel]]] = (
    weakref.WeakKeyDictionary()
)


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


def draft_model(model: PreTrainedModel, dtype: torch.dtype | None) -> PreTrainedModel:
    """The model a draft in ``dtype`` runs: ``model`` itself where ``dtype`` is None or its weights are ``dtype``
    already, else a twin whose floating weights are copies in ``dtype`` (tied weights stay tied), unprepared for
    polykv.

    The twin is made once per model and dtype, so that its compiled forward is compiled once too, and made again
    when the model's weights were replaced or changed in place since (their versions say so)."""
    weights = list(model.parameters())
    if dtype is None or all(weight.dtype == dtype for weight in weights if weight.is_floating_point()):
        return model
    identity = tuple((weight.data_ptr(), weight._version) for weight in weights)
    twins = _TWINS.setdefault(model, {})
    found = twins.get(dtype)
    if found is not None and found[0] == identity:
        return found[1]
    memo: dict[int, object] = {
        id(weight): torch.nn.Parameter(weight.detach().to(dtype), requires_grad=False)
        for weight in weights
        if weight.is_floating_point()
    }
    twin = copy.deepcopy(model, memo)
    restore_model(twin)  # a prepared model's copy: its hooks and attention go, as draft.apply prepares it again
    twins[dtype] = (identity, twin)
    return twin

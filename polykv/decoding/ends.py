"""Where generated rows end: the end-of-sequence tokens, the pad token after them, and a device's clock.

Every decoding loop (``static``, ``speculative``, ``static_speculation``) takes the same
``eos_token_id`` and ``pad_token_id`` as ``model.generate``, and gives its rows the same shape:
the pad token after each row's first end token, the columns after the last row's end cut.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch


def end_tokens(
    eos_token_id: int | Sequence[int] | None, pad_token_id: int | None, like: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """The end tokens as a tensor on ``like``'s device and in its dtype, and the pad token (default: the first end
    token, or 0)."""
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    return torch.tensor(eos, dtype=like.dtype, device=like.device), pad


def padded_after_end(generated: torch.Tensor, eos: torch.Tensor, pad: int) -> torch.Tensor:
    """``generated`` (B, n) with the pad token after each row's first end token, cut where the last row ended."""
    if not len(eos):
        return generated
    ends = torch.isin(generated, eos)
    after = (ends.long().cumsum(dim=1) - ends.long()) > 0
    generated = generated.masked_fill(after, pad)
    if bool(ends.any(dim=1).all()):
        generated = generated[:, : int(ends.long().argmax(dim=1).max()) + 1]
    return generated


def device_time(device: torch.device) -> float:
    """Seconds on the host's clock once ``device`` has done its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

"""Position ids of left-padded batches, numbered as transformers' ``generate`` numbers them.

Whoever drives a PolyCache by hand (the harness's captured prefill, static decoding) must give the
model the positions ``generate`` would, so that a cache built one way holds what the other holds.
"""

from __future__ import annotations

import torch


def prompt_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded prompt (B, L), as generate gives them (padding, never seen, gets 1)."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def continuation_positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of ``new`` tokens after a prompt with ``attention_mask`` (B, L): as generate counts them."""
    start = attention_mask.long().sum(-1, keepdim=True)
    return start + torch.arange(new, device=attention_mask.device)

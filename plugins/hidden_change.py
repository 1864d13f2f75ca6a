"""hidden_change: how much the attention block turns the hidden state (SqueezeAttention)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal


class HiddenChange(Signal):
    """How much the attention block turns the hidden state (SqueezeAttention, Wang et al. 2024, arXiv 2404.04793).

    1 - cos(h, h + attention(h)): a block that barely changes its input matters little.
    """

    name = "hidden_change"
    description = "1 - cosine similarity of the hidden state before and after the attention block (SqueezeAttention)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        before = observation.hidden.float()
        after = before + observation.attention_output.float()
        return (1 - torch.nn.functional.cosine_similarity(before, after, dim=-1)).mean(-1)

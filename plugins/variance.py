"""variance: how a layer's attention moves from query to query (CAKE's temporal shift)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal


class AttentionVariance(Signal):
    """Temporal shift (CAKE): how much each token's attention varies across the window's queries, summed.

    A layer whose important tokens change from query to query cannot keep a few fixed ones.
    """

    name = "variance"
    description = "Variance of each token's attention across window queries, summed (CAKE's temporal shift)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        variance = observation.window_attention.var(dim=-2, unbiased=False).sum(-1)  # (B, H, G)
        return variance.mean(dim=(1, 2))

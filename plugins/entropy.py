"""entropy: how spread a layer's attention is (CAKE's spatial dispersion)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal


class AttentionEntropy(Signal):
    """Spatial dispersion (CAKE, Qin et al. 2025, arXiv 2503.12491): entropy of the window's mean attention.

    A layer whose attention spreads over many tokens needs more of them kept.
    """

    name = "entropy"
    description = "Entropy of the observation window's mean attention (CAKE's spatial dispersion)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        mean = observation.window_attention.mean(dim=-2)  # (B, H, G, L): averaged over window queries
        entropy = -(mean * mean.clamp_min(1e-12).log()).sum(-1)
        return entropy.mean(dim=(1, 2))

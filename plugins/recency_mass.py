"""recency_mass: attention on the latest tokens (SimLayerKV's lazy layers)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal, mean_window_attention

#: Tokens counted as recent (SnapKV's default window).
RECENT = 32


class RecencyMass(Signal):
    """Attention on the latest tokens (SimLayerKV): with the sinks, what a lazy layer looks at."""

    name = "recency_mass"
    description = f"Share of the window's attention on the last {RECENT} tokens (SimLayerKV)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        attention = mean_window_attention(observation)
        return attention[:, -RECENT:].sum(-1)

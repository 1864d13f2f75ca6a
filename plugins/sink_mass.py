"""sink_mass: attention parked on the first tokens (SimLayerKV's lazy layers)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal, mean_window_attention

#: Tokens counted as attention sinks (StreamingLLM keeps 4).
SINKS = 4


class SinkMass(Signal):
    """Attention on the first tokens (SimLayerKV, Zhang et al. 2024, arXiv 2410.13846): lazy layers park it there."""

    name = "sink_mass"
    description = f"Share of the window's attention on the first {SINKS} real tokens (SimLayerKV)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        real = observation.token_mask[:, 0]  # (B, L)
        first = real & (real.long().cumsum(-1) <= SINKS)
        return (mean_window_attention(observation) * first).sum(-1)

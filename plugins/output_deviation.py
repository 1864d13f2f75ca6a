"""output_deviation: how far keeping only some tokens moves the block's output (a curve signal)."""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal


class OutputDeviation(Signal):
    """How far keeping only some tokens moves the block's output, relative to the residual stream.

    ||W_o (o_kept - o_all)||^2 / ||h||^2 at the window positions: the direct, per-policy and
    per-budget measure (a sensitivity curve). It ranks budgets well within a layer; across layers
    it needs scaling by a measured point (see docs/routing.md).
    """

    name = "output_deviation"
    description = "Change of the attention block's output when only the kept tokens remain, over the residual norm."
    curve = True

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        if kept is None:
            raise ValueError("output_deviation is a curve signal: it needs the kept tokens")
        # Both outputs recomputed the same way, so the difference is the eviction's alone.
        moved = observation.attention_output_with(kept).float() - observation.attention_output_with(None).float()
        residual = observation.hidden.float()
        return (moved.pow(2).sum(-1) / residual.pow(2).sum(-1).clamp_min(1e-12)).mean(-1)

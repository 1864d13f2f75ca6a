"""The built-in layer signals, registered through the ``register_signals`` hook like any plugin's.

Each follows a published method's layer measurement (cited in its docstring); calibration records
them all so that their power to predict a layer's real sensitivity can be checked on the model.
"""

from __future__ import annotations

import torch

from polykv.signals import LayerObservation, Signal, mean_window_attention

#: Tokens counted as attention sinks (StreamingLLM keeps 4) and as recent (SnapKV's default window).
SINKS, RECENT = 4, 32


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


class AttentionVariance(Signal):
    """Temporal shift (CAKE): how much each token's attention varies across the window's queries, summed.

    A layer whose important tokens change from query to query cannot keep a few fixed ones.
    """

    name = "variance"
    description = "Variance of each token's attention across window queries, summed (CAKE's temporal shift)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        variance = observation.window_attention.var(dim=-2, unbiased=False).sum(-1)  # (B, H, G)
        return variance.mean(dim=(1, 2))


class SinkMass(Signal):
    """Attention on the first tokens (SimLayerKV, Zhang et al. 2024, arXiv 2410.13846): lazy layers park it there."""

    name = "sink_mass"
    description = f"Share of the window's attention on the first {SINKS} real tokens (SimLayerKV)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        real = observation.token_mask[:, 0]  # (B, L)
        first = real & (real.long().cumsum(-1) <= SINKS)
        return (mean_window_attention(observation) * first).sum(-1)


class RecencyMass(Signal):
    """Attention on the latest tokens (SimLayerKV): with the sinks, what a lazy layer looks at."""

    name = "recency_mass"
    description = f"Share of the window's attention on the last {RECENT} tokens (SimLayerKV)."

    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        attention = mean_window_attention(observation)
        return attention[:, -RECENT:].sum(-1)


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


BUILTIN_SIGNALS = (AttentionEntropy, AttentionVariance, SinkMass, RecencyMass, HiddenChange, OutputDeviation)

"""How far a compressed cache's predictions move from the full cache's, on teacher-forced tokens.

The KL divergence KL(full || compressed) of next-token distributions, averaged over positions, is
what calibration measures per layer and what evaluation reports; the loss (negative
log-likelihood) of the true tokens says how good the predictions are in absolute terms.

A compressed cache used as a speculative draft (``polykv.speculative_generate``) is judged by how
often the full cache keeps its proposals instead. Its ``rejection`` rate, 1 - sum_v min(p_v, q_v)
(the total variation distance of full p and compressed q), is the share of proposals speculative
sampling refuses. KL weighs every difference in the distribution's tail, which a draft may get
wrong at no cost; the rejection rate counts only the probability the draft puts in the wrong place.
Calibrating for ``acceptance`` measures it in place of KL (``OBJECTIVES``).
"""

from __future__ import annotations

import torch


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(reference || logits) of next-token distributions, averaged over positions: (B,).

    ``reference`` and ``logits`` are (B, T, V) logits (any float type; computed in float32). Rounding can
    take a divergence of nearly equal distributions a hair below zero; it is held at zero, as KL is.
    """
    reference = torch.log_softmax(reference.float(), dim=-1)
    compressed = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - compressed)).sum(-1).clamp(min=0).mean(-1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss of the true next tokens ``targets`` (B, T) under ``logits`` (B, T, V), averaged: (B,)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets[..., None]).squeeze(-1).mean(-1)


def rejection(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row share of proposals drawn from ``logits`` that speculative sampling against ``reference`` refuses,
    1 - sum min(p, q), averaged over positions: (B,). Shapes as ``kl_divergence``."""
    reference = torch.softmax(reference.float(), dim=-1)
    compressed = torch.softmax(logits.float(), dim=-1)
    return 1.0 - torch.minimum(reference, compressed).sum(-1).mean(-1)


#: The per-row divergence that measures each of calibration's objectives (``polykv.values.OBJECTIVES``).
DIVERGENCES = {"kl": kl_divergence, "acceptance": rejection}

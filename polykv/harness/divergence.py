"""How far a compressed cache's predictions move from the full cache's, on teacher-forced tokens.

The KL divergence KL(full || compressed) of next-token distributions, averaged over positions, is
what calibration measures per layer and what evaluation reports; the loss (negative
log-likelihood) of the true tokens says how good the predictions are in absolute terms.
"""

from __future__ import annotations

import torch


def kl_divergence(reference: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(reference || logits) of next-token distributions, averaged over positions: (B,).

    ``reference`` and ``logits`` are (B, T, V) logits (any float type; computed in float32).
    """
    reference = torch.log_softmax(reference.float(), dim=-1)
    compressed = torch.log_softmax(logits.float(), dim=-1)
    return (reference.exp() * (reference - compressed)).sum(-1).mean(-1)


def negative_log_likelihood(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row loss of the true next tokens ``targets`` (B, T) under ``logits`` (B, T, V), averaged: (B,)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return -logprobs.gather(-1, targets[..., None]).squeeze(-1).mean(-1)

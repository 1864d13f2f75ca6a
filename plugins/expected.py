"""expected: the attention future queries are expected to pay, from statistics of recent queries.

Expected Attention (Devoto et al. 2025, arXiv 2510.00636; kvpress's ExpectedAttentionPress) models
the queries to come as a Gaussian, mean mu and covariance Sigma per query head, and scores each key
k by the softmax over keys of mu.k/sqrt(d) + k'Sigma k/(2d), the expected logit of a Gaussian query,
averaged over the GQA group and scaled by the value's norm; the first ``sink`` tokens are kept.

kvpress estimates the statistics from every query of the prompt before rotary embedding and
rotates them to the next 512 positions. polykv estimates them from the last ``window`` queries as
the model rotated them: they sit just before the positions to come, so their rotation is close,
and the cache already holds them, so this costs no extra pass over the prompt's hidden states.
"""

import math

import torch

from polykv.policy import LayerView, Needs, ScoringPolicy, first_tokens, parameter, per_kv_head


class ExpectedAttention(ScoringPolicy):
    name = "expected"
    description = "Keeps the tokens future queries are expected to attend to (a Gaussian of recent queries)."
    window: int = parameter(
        default=64, description="recent queries whose mean and covariance model the queries to come", min=2, max=1024
    )
    sink: int = parameter(default=4, description="attention-sink tokens kept at the start", min=0, max=1024)

    def needs(self) -> Needs:
        return Needs(window=self.window)

    def min_budget(self) -> int:
        return self.sink + 1

    def score(self, view: LayerView) -> torch.Tensor:
        queries = view.queries.float()  # (B, H, G, W, D)
        keys = view.keys.float()  # (B, H, L, D)
        mean = queries.mean(dim=-2)  # (B, H, G, D)
        centred = queries - mean[..., None, :]
        covariance = centred.transpose(-1, -2) @ centred / max(1, queries.shape[-2] - 1)  # (B, H, G, D, D)
        scale = 1 / math.sqrt(keys.shape[-1])
        logits = torch.einsum("bhgd,bhld->bhgl", mean, keys) * scale
        logits = logits + 0.5 * scale**2 * torch.einsum("bhld,bhgde,bhle->bhgl", keys, covariance, keys)
        logits = logits.masked_fill(~view.token_mask[:, :, None, :], -math.inf)
        expected = per_kv_head(torch.softmax(logits, dim=-1).nan_to_num(0.0))  # (B, H, L)
        scores = expected * view.values.float().norm(dim=-1)
        return scores.masked_fill(first_tokens(view, self.sink), math.inf)

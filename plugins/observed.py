"""observed: accumulated attention, averaged over the queries that could see each token.

H2O sums the attention a token receives over every query of the prompt, which favours early
tokens: more queries see them. Dividing by the number of queries that can see the token (those at
or after it) gives the average attention it receives, the normalisation the H2O paper lists as an
option (Zhang et al. 2023, arXiv 2306.14048) and kvpress's ObservedAttentionPress uses. No recent
window is protected.
"""

import torch

from polykv.policy import LayerView, Needs, ScoringPolicy, per_kv_head


class ObservedAttention(ScoringPolicy):
    name = "observed"
    description = "Keeps the tokens with the most attention per query that could see them (normalised H2O)."

    def needs(self) -> Needs:
        return Needs(accumulated_attention=True)

    def score(self, view: LayerView) -> torch.Tensor:
        received = per_kv_head(view.accumulated_attention)  # (B, H, L), summed over the prompt's queries
        # With left padding every position after a real token is a real query, the last one included.
        last = view.positions.masked_fill(~view.token_mask, -1).amax(dim=-1, keepdim=True)
        watchers = (last + 1 - view.positions).clamp(min=1)
        return received / watchers.to(received.dtype)

"""random: a uniformly random choice of tokens, as a control for the other policies.

Seeded: the same seed and layer give the same choice on any device. A token's score depends on
its rank among the row's real tokens, not on its slot, so left padding changes nothing.
"""

import torch

from polykv.policy import LayerView, ScoringPolicy, parameter


class RandomEviction(ScoringPolicy):
    name = "random"
    description = "Keeps a random choice of tokens (seeded), as a baseline."
    seed: int = parameter(default=0, description="random seed (combined with the layer index)", min=0, max=2**31 - 1)

    def score(self, view: LayerView) -> torch.Tensor:
        batch, heads, length = view.token_mask.shape
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view.layer)
        # Drawn rank-major so the i-th real token's score does not depend on the prompt's length.
        by_rank = torch.rand(length, heads, generator=generator).T.to(view.keys.device)
        rank = (view.token_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, H, L)
        return by_rank.expand(batch, heads, length).gather(-1, rank)

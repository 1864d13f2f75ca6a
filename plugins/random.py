"""random: a uniformly random choice of tokens, as a control for the other policies.

Seeded: the same seed and layer give the same choice on any device.
"""

import torch

from polykv.policy import LayerView, ScoringPolicy, parameter


class RandomEviction(ScoringPolicy):
    name = "random"
    description = "Keeps a random choice of tokens (seeded), as a baseline."
    seed: int = parameter(0, "random seed (combined with the layer index)", min=0, max=2**31 - 1)

    def score(self, view: LayerView) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + view.layer)
        scores = torch.rand(view.token_mask.shape, generator=generator)
        return scores.to(view.keys.device)

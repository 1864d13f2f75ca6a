"""knorm: keys with a low L2 norm (Devoto et al. 2024, arXiv 2406.11430).

A low key norm usually goes with high attention, so the lowest-norm keys are kept. Needs no
queries or attention at all, which makes it the cheapest scorer.
"""

import torch

from polykv.policy import LayerView, ScoringPolicy


class KeyNorm(ScoringPolicy):
    name = "knorm"
    static_decoding = True
    description = "Keeps the tokens whose keys have the lowest L2 norm."

    def score(self, view: LayerView) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)

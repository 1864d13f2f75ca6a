"""keydiff: keep the keys least like the others (KeyDiff, Park et al. 2025, arXiv 2504.15364).

Keys that point the same way as the layer's mean key carry little that the rest do not; the
distinctive ones are what attention later singles out. Scoring needs only the keys, no queries
or attention, so it works with any attention kernel and costs one pass over the cache.
"""

import math

import torch
import torch.nn.functional as F

from polykv.hooks import hookimpl
from polykv.policy import LayerView, ScoringPolicy, most_recent, parameter

__all__ = ["KeyDiff", "register_policies"]


class KeyDiff(ScoringPolicy):
    name = "keydiff"
    description = "Keeps the tokens whose keys are least similar (cosine) to the mean key; keeps the last `window`."
    window: int = parameter(default=8, description="most recent tokens always kept", min=0, max=1024)

    def min_budget(self) -> int:
        return max(1, self.window)

    def score(self, view: LayerView) -> torch.Tensor:
        keys = view.keys.float()
        real = view.token_mask[..., None].float()  # padding must not pull the mean towards itself
        mean_key = (keys * real).sum(dim=-2) / real.sum(dim=-2).clamp(min=1)
        scores = -F.cosine_similarity(keys, mean_key[..., None, :], dim=-1)
        return scores.masked_fill(most_recent(view, self.window), math.inf)


@hookimpl
def register_policies(register):
    register(KeyDiff)

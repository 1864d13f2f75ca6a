"""snapkv: attention of an observation window, pooled (SnapKV, Li et al. 2024, arXiv 2404.14469).

Each token is scored by the attention the last ``window`` queries pay it, summed over the window
and over each GQA group's query heads (averaged), then pooled along the sequence so that
neighbours of important tokens survive too. The window itself is always kept. Defaults follow
the paper's LongBench setting: window 32, kernel 7, max pooling.
"""

import math

import torch
import torch.nn.functional as F

from polykv.policy import LayerView, Needs, ScoringPolicy, most_recent, parameter, per_kv_head


class SnapKV(ScoringPolicy):
    name = "snapkv"
    description = "Scores tokens by the pooled attention of the last `window` queries; keeps the window."
    window: int = parameter(
        default=32, description="observation window: the last queries whose attention scores tokens", min=1, max=1024
    )
    kernel: int = parameter(default=7, description="pooling width along the sequence (1: no pooling)", min=1, max=255)
    pooling: str = parameter(default="max", description="how scores are pooled", choices=("max", "avg"))

    def needs(self) -> Needs:
        return Needs(window=self.window, window_attention=True)

    def min_budget(self) -> int:
        return self.window

    def score(self, view: LayerView) -> torch.Tensor:
        window = most_recent(view, self.window)
        scores = per_kv_head(view.window_attention.sum(dim=-2))  # (B, H, L)
        scores = scores.masked_fill(window, 0.0)  # the window is kept, not scored
        scores = self._pool(scores)
        return scores.masked_fill(window, math.inf)

    def _pool(self, scores: torch.Tensor) -> torch.Tensor:
        if self.kernel == 1:
            return scores
        batch, heads, length = scores.shape
        flat = scores.reshape(batch * heads, 1, length)
        pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
        pooled = pool(flat, kernel_size=self.kernel, stride=1, padding=self.kernel // 2)
        return pooled[..., :length].reshape(batch, heads, length)

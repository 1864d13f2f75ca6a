"""tova: the last query's attention decides (TOVA, Oren et al. 2024, arXiv 2401.06104).

Tokens are ranked by the attention of the most recent query. As in the paper, the attention is
averaged over all heads of the layer, so every KV head keeps the same tokens; ``per_head`` ranks
each KV head by its own query group instead.
"""

import torch

from polykv.policy import LayerView, Needs, ScoringPolicy, parameter, per_kv_head


class TOVA(ScoringPolicy):
    name = "tova"
    description = "Keeps the tokens the last query attends to most (averaged over the layer's heads)."
    per_head: bool = parameter(default=False, description="rank each KV head by its own query group")

    def needs(self) -> Needs:
        return Needs(window=1, window_attention=True)

    def score(self, view: LayerView) -> torch.Tensor:
        scores = per_kv_head(view.window_attention[..., -1, :])  # (B, H, L)
        if self.per_head:
            return scores
        return scores.mean(dim=1, keepdim=True).expand_as(scores)

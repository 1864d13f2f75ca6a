"""h2o: heavy hitters plus recent tokens (H2O, Zhang et al. 2023, arXiv 2306.14048).

A token's score is the attention it receives summed over every query of the prompt (averaged
over each GQA group's query heads). A ``recent`` share of the budget goes to the most recent
tokens, the rest to the heaviest hitters; the paper splits evenly.
"""

import math

import torch

from polykv.policy import LayerView, Needs, ScoringPolicy, most_recent, parameter, per_kv_head


class H2O(ScoringPolicy):
    name = "h2o"
    description = "Keeps the tokens with the most accumulated attention, plus a share of recent ones."
    recent: float = parameter(
        default=0.5, description="share of the budget kept for the most recent tokens", min=0.0, max=1.0
    )

    def needs(self) -> Needs:
        return Needs(accumulated_attention=True)

    def score(self, view: LayerView) -> torch.Tensor:
        scores = per_kv_head(view.accumulated_attention)
        recent = most_recent(view, round(self.recent * view.budget))
        return scores.masked_fill(recent, math.inf)

"""streaming: attention sinks plus a recent window (StreamingLLM, Xiao et al. 2023, arXiv 2309.17453).

The first ``sink`` real tokens soak up attention mass that the model parks there; keeping them
with the most recent tokens keeps generation stable. The paper's default is 4 sinks.
"""

import math

import torch

from polykv.policy import LayerView, ScoringPolicy, first_tokens, parameter


class Streaming(ScoringPolicy):
    name = "streaming"
    static_decoding = True
    description = "Keeps the first `sink` tokens (attention sinks) and the most recent ones."
    sink: int = parameter(default=4, description="attention-sink tokens kept at the start", min=0, max=1024)

    def min_budget(self) -> int:
        return self.sink + 1

    def score(self, view: LayerView) -> torch.Tensor:
        recency = view.positions.float()
        return recency.masked_fill(first_tokens(view, self.sink), math.inf)

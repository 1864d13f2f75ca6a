"""kvzip: what the model needs to repeat the prompt (KVzip, Kim et al. 2025, arXiv 2505.23416).

After the prompt, the model is asked to repeat it (``polykv.cache.reconstruction``); a token's
score is the most attention any repeating query of its KV head pays it. The score does not depend
on a question, so a context compressed this way serves questions asked later. The first ``sink``
tokens are always kept, as kvpress keeps them. The repeat costs about one more prefill.
"""

import math

import torch

from polykv.policy import LayerView, Needs, ScoringPolicy, first_tokens, parameter


class KVzip(ScoringPolicy):
    name = "kvzip"
    description = "Keeps the tokens the model attends to most while repeating the prompt (query-agnostic)."
    sink: int = parameter(default=4, description="attention-sink tokens kept at the start", min=0, max=1024)

    def needs(self) -> Needs:
        return Needs(reconstruction=True)

    def min_budget(self) -> int:
        return self.sink + 1

    def score(self, view: LayerView) -> torch.Tensor:
        return view.reconstruction_attention.masked_fill(first_tokens(view, self.sink), math.inf)

"""full: keeps every token (the uncompressed cache), for layers that should not be compressed."""

import torch

from polykv.policy import LayerView, Policy


class Full(Policy):
    name = "full"
    description = "Keeps every token: the uncompressed cache. Takes no budget."
    budgeted = False

    def select(self, view: LayerView) -> torch.Tensor:
        batch, heads, length = view.token_mask.shape
        return torch.arange(length, device=view.keys.device).expand(batch, heads, length)

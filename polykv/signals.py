"""Layer-level signals: what can be measured about a layer on calibration prompts, cheaply.

A signal looks at one layer of a captured prefill (``LayerObservation``) and gives one number per
prompt: how spread its attention is, how much of it goes to the first or the latest tokens, how
much the attention block changes the hidden state. A *curve* signal also gets the tokens a policy
would keep at a budget and says how far that moves the layer (the sensitivity curve).

Signals are plugins, registered like policies through the ``register_signals`` hook, so a
researcher can add one without changing polykv. Calibration records them beside the measured loss
of each layer, and `polykv plan` prints them with the decision they go with.

Shapes: B prompts, H KV heads, G query heads per KV head, W window queries, L tokens, D head size,
E hidden size.
"""

from __future__ import annotations

import abc
from typing import ClassVar, Protocol

import attrs
import torch


class Projection(Protocol):
    """What a signal reads of a layer's o_proj (a Linear, or a quantized stand-in for one): its weight (E, H*D)."""

    @property
    def weight(self) -> torch.Tensor: ...


@attrs.frozen(kw_only=True)
class LayerObservation:
    """One layer after a captured prefill, as a signal sees it."""

    index: int
    keys: torch.Tensor  # (B, H, L, D)
    values: torch.Tensor  # (B, H, L, D)
    token_mask: torch.Tensor  # (B, H, L) bool, False for padding
    positions: torch.Tensor  # (B, H, L) long
    queries: torch.Tensor  # (B, H, G, W, D), the last W queries
    window_attention: torch.Tensor  # (B, H, G, W, L) float32, their attention over every token
    scaling: float
    hidden: torch.Tensor  # (B, W, E) the residual stream entering the layer at the window positions
    attention_output: torch.Tensor  # (B, W, E) what the attention block adds to it there
    output_projection: Projection  # the layer's o_proj: maps heads' outputs to the hidden size

    def attention_output_with(self, kept: torch.Tensor | None) -> torch.Tensor:
        """The block's output at the window positions if the layer held only ``kept`` (B, H, K) (None: every
        token), recomputed from the captured queries, keys and values: (B, W, E).

        The window queries stand in for the queries to come: each sees the kept tokens before it
        and itself (as a new token always sees itself).
        """
        heads = self.keys.shape[1]
        keep = torch.zeros_like(self.token_mask)
        if kept is None:
            keep.fill_(True)
        else:
            keep.scatter_(-1, kept, True)
        logits = torch.einsum("bhgwd,bhld->bhgwl", self.queries.float(), self.keys.float()) * self.scaling
        key_at = self.positions[:, :, None, None, :]
        query_at = self.positions[:, :, -self.queries.shape[-2] :][:, :, None, :, None]
        visible = self.token_mask[:, :, None, None, :] & (key_at <= query_at)
        visible = visible & (keep[:, :, None, None, :] | (key_at == query_at))
        weights = torch.softmax(logits.masked_fill(~visible, float("-inf")), dim=-1).nan_to_num(0.0)
        per_head = torch.einsum("bhgwl,bhld->bwhgd", weights, self.values.float())
        batch, window = per_head.shape[:2]
        flat = per_head.reshape(batch, window, heads * per_head.shape[3] * per_head.shape[4])
        weight = self.output_projection.weight
        return flat.to(weight.dtype) @ weight.T


class Signal(abc.ABC):
    """A measurement of one layer, one number per prompt: subclasses set ``name``, ``description``, ``measure``.

    ``curve = True`` marks a signal that depends on what a policy keeps: ``measure`` then gets the
    kept indices (B, H, K) and is called once per candidate policy and budget.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    curve: ClassVar[bool] = False

    @abc.abstractmethod
    def measure(self, observation: LayerObservation, kept: torch.Tensor | None = None) -> torch.Tensor:
        """A float tensor of shape (B,): the signal for each prompt."""


def mean_window_attention(observation: LayerObservation) -> torch.Tensor:
    """The window queries' attention averaged over queries and heads of each prompt: (B, L)."""
    return observation.window_attention.mean(dim=(1, 2, 3))

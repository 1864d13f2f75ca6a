"""The interface an eviction policy implements, and what the cache hands it.

A policy is a class with a name, a one-line description, typed parameters and a ``select``
method: given one layer's cached keys and values and a token budget, it returns which tokens to
keep for every batch row and KV head. Most policies only rank tokens; they subclass
``ScoringPolicy`` and write ``score``. A policy says what else it needs (the queries of the last
positions, their attention, or attention accumulated over the whole prompt) through ``needs``;
the cache computes only what some layer asked for.

    class KeyNorm(ScoringPolicy):
        name = "knorm"
        description = "Keeps the keys with the lowest L2 norm."

        def score(self, view):
            return -view.keys.float().norm(dim=-1)

    class Streaming(ScoringPolicy):
        name = "streaming"
        description = "Keeps the first `sink` tokens and the most recent ones."
        sink: int = parameter(default=4, description="attention-sink tokens kept at the start", min=0, max=1024)

Shapes use B for batch rows, H for KV heads, G for query heads per KV head (GQA group), L for
tokens and D for head dimension.
"""

from __future__ import annotations

import abc
import enum
import math
from typing import ClassVar

import attrs
import torch

from polykv.parameters import Configurable, Param, ParameterError, parameter

__all__ = [
    "NOTHING_MORE",
    "LayerView",
    "Needs",
    "Param",
    "ParameterError",
    "Phase",
    "Policy",
    "ScoringPolicy",
    "first_tokens",
    "most_recent",
    "parameter",
    "per_kv_head",
]


class Phase(enum.Enum):
    """When a policy runs: once on the prompt, or while generating (to bound memory)."""

    PREFILL = "prefill"
    DECODE = "decode"


@attrs.frozen
class Needs:
    """What a policy needs beyond the keys and values, so the cache computes only that.

    ``window``: how many of the last queries it wants (0: none). ``window_attention``: the
    softmax attention of those queries over all tokens. ``accumulated_attention``: attention
    summed over every query of the prompt, computed in chunks (prefill only).
    ``reconstruction``: an extra pass after the prompt, in which the model repeats it; each
    token's score is the most attention a repeating query pays it (prefill only; see
    ``polykv.cache.reconstruction``). The pass costs about one more prefill.
    """

    window: int = 0
    window_attention: bool = False
    accumulated_attention: bool = False
    reconstruction: bool = False

    @property
    def prefill_only(self) -> bool:
        """Whether the policy can only run on a prompt (what it needs exists only there)."""
        return self.accumulated_attention or self.reconstruction

    def __attrs_post_init__(self) -> None:
        if not isinstance(self.window, int) or isinstance(self.window, bool):
            raise TypeError(f"a query window is a whole number of queries, got {self.window!r}")
        if self.window < 0:
            raise ValueError("a query window is >= 0")
        if self.window_attention and self.window == 0:
            raise ValueError("window attention needs a window of at least one query")


#: A policy that needs nothing beyond keys and values.
NOTHING_MORE = Needs()


@attrs.frozen(kw_only=True)
class LayerView:
    """One layer's cache as a policy sees it, and the budget to fit it into.

    At prefill the tokens are the prompt; while decoding they are what the layer holds.
    ``token_mask`` is False for padding, which a policy must never keep in place of a real token.
    ``positions`` are the tokens' positions in the sequence (keys carry them, rotated in).
    """

    layer: int
    phase: Phase
    budget: int
    keys: torch.Tensor  # (B, H, L, D)
    values: torch.Tensor  # (B, H, L, D)
    token_mask: torch.Tensor  # (B, H, L) bool
    positions: torch.Tensor  # (B, H, L) long
    queries: torch.Tensor | None = None  # (B, H, G, window, D), rotated like the keys
    window_attention: torch.Tensor | None = None  # (B, H, G, window, L), float32
    accumulated_attention: torch.Tensor | None = None  # (B, H, G, L), float32
    reconstruction_attention: torch.Tensor | None = None  # (B, H, L), float32: most attention while repeating

    @property
    def length(self) -> int:
        return self.keys.shape[-2]

    def of_heads(self, heads: tuple[int, ...]) -> LayerView:
        """The view a group of these KV ``heads`` alone gives its policy (a layer whose heads keep differently)."""
        index = torch.tensor(heads, device=self.keys.device)
        sliced = {
            name: None if value is None else value.index_select(1, index)
            for name, value in attrs.asdict(self, recurse=False).items()
            if isinstance(value, torch.Tensor) or value is None
        }
        # attrs' mypy plugin checks **changes against every field's type, not only the tensor fields named here.
        return attrs.evolve(self, **sliced)  # type: ignore[arg-type]


class Policy(Configurable, abc.ABC):
    """Base class of eviction policies. Subclasses set ``name`` and ``description``, declare their
    parameters with ``parameter`` (see ``polykv.parameters``) and implement ``select``.

    ``budgeted = False`` marks a policy that keeps everything and so takes no budget (``full``).
    ``static_decoding = True`` promises that its choice depends only on the view's tensors (keys,
    values, positions, token_mask; never slot order, the host or a query), so it can run as a decode
    policy inside a captured decoding step (``polykv.decoding``).
    Parameter values are attributes of the instance (``self.window``) and ``self.values``.
    """

    description: ClassVar[str]
    budgeted: ClassVar[bool] = True
    static_decoding: ClassVar[bool] = False

    def needs(self) -> Needs:
        """What the policy needs beyond keys and values (default: nothing)."""
        return Needs()

    def min_budget(self) -> int:
        """The smallest budget the policy can work with (for example its protected window)."""
        return 1

    @abc.abstractmethod
    def select(self, view: LayerView) -> torch.Tensor:
        """Indices of the ``view.budget`` tokens to keep: a long tensor of shape (B, H, budget).

        Indices must be distinct within each row and head, and never point at padding when the
        row has at least ``budget`` real tokens. Their order does not matter.
        """


class ScoringPolicy(Policy):
    """A policy that ranks tokens: ``select`` keeps the ``budget`` highest scores per row and head.

    Scores of padding are ignored; give ``math.inf`` to tokens that must always be kept. Ties go
    to the earlier token. Ranking rather than selecting is what lets the same policy serve
    per-head budgets later.
    """

    @abc.abstractmethod
    def score(self, view: LayerView) -> torch.Tensor:
        """A score per token, shape (B, H, L): higher means more worth keeping."""

    def masked_scores(self, view: LayerView) -> torch.Tensor:
        """``score`` in float32, -inf for padding (which is never kept in place of a real token)."""
        return self.score(view).float().masked_fill(~view.token_mask, -math.inf)

    def select(self, view: LayerView) -> torch.Tensor:
        scores = self.masked_scores(view)
        # A stable sort breaks ties (frequent after max pooling) by order in the sequence, which left
        # padding does not change: a padded row keeps what it would keep alone, on any device.
        return scores.sort(dim=-1, descending=True, stable=True).indices[..., : view.budget]


# --- helpers for writing policies ---------------------------------------------------------------


def most_recent(view: LayerView, count: int) -> torch.Tensor:
    """True for the ``count`` most recent real tokens of each row and head, shape (B, H, L).

    Decided by positions, not by slot order, so it holds where slots are reused (static decoding).
    """
    return view.token_mask & (view.positions >= _kth_position(view, count, newest=True))


def first_tokens(view: LayerView, count: int) -> torch.Tensor:
    """True for the first ``count`` real tokens of each row and head (attention sinks), shape (B, H, L)."""
    return view.token_mask & (view.positions <= _kth_position(view, count, newest=False))


def _kth_position(view: LayerView, count: int, *, newest: bool) -> torch.Tensor:
    """The position of the ``count``-th newest (or oldest) real token, (B, H, 1); a bound that
    passes every real token where a row has fewer, and none where ``count`` is 0."""
    positions = view.positions.long()
    length = positions.shape[-1]
    outside = -1 if newest else torch.iinfo(torch.long).max  # padding sorts past every real token
    if count <= 0:
        return torch.full_like(positions[..., :1], torch.iinfo(torch.long).max if newest else -1)
    if count >= length:
        return torch.full_like(positions[..., :1], outside)
    ranked = positions.masked_fill(~view.token_mask, outside)
    k = length - count + 1 if newest else count
    return ranked.kthvalue(k, dim=-1, keepdim=True).values


def per_kv_head(scores: torch.Tensor) -> torch.Tensor:
    """Average scores over each GQA group: (B, H, G, ...) to (B, H, ...)."""
    return scores.mean(dim=2)

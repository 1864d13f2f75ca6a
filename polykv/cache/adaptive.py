"""Ada-KV's rule: a layer's budget shared among its KV heads by the scores of its policy.

Ada-KV (Feng et al. 2024, arXiv 2407.11550) keeps, over all the KV heads of a layer together, the
budget x heads tokens with the highest scores: a head whose attention is concentrated keeps few
tokens and a head that spreads it keeps many, at the same total. A floor (a fifth of the budget,
and at least what the policy needs) keeps every head usable, as the paper's safeguard does.

The rule decides per sequence, so in a batch each row shares its own budget. polykv stores a layer
whose heads keep different counts as one group per KV head (``SplitLayer``), each holding the
tokens of its largest row; a row whose share of that head is smaller hides the rest of them
(``PolyLayer.hide``: its lowest-ranked, never seen again). Each row then attends to exactly what it
would keep alone, and a head stores its largest row's count for every row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import torch

from polykv.cache.selection import ordered_keys
from polykv.policy import LayerView, ScoringPolicy

#: The floor of every head, as a share of the layer's budget per head (Ada-KV's safeguard).
FLOOR_SHARE = 0.2


def floor_of(budget: int, least: int) -> int:
    """The fewest tokens a head keeps for a layer ``budget`` per head: a fifth of it, at least ``least``."""
    return min(budget, max(least, math.ceil(FLOOR_SHARE * budget)))


@attrs.frozen
class Shares:
    """What each row keeps of each KV head, ``counts`` (B, H, on the host), and the scores (B, H, L; -inf for
    padding) that ranked the tokens."""

    counts: torch.Tensor
    scores: torch.Tensor

    def largest(self, head: int) -> int:
        """The most tokens a row keeps of ``head``: what the head's group stores for every row."""
        return int(self.counts[:, head].max())

    def hidden(self, head: int, kept: torch.Tensor) -> torch.Tensor:
        """Of the tokens ``head`` stores (their indices ``kept``, (B, K), the ``largest(head)`` best), those a
        row keeps beyond its own count: its lowest-ranked, ties going to the later token. (B, K) bool."""
        keys = ordered_keys(self.scores[:, head]).gather(-1, kept)
        ranks = keys.argsort(dim=-1, descending=True).argsort(dim=-1)  # 0 for each row's best stored token
        return ranks >= self.counts[:, head, None].to(ranks.device)


def share(policy: ScoringPolicy, views: Sequence[LayerView], budget: int) -> Shares:
    """Tokens each row keeps of each KV head, one ``views`` entry per head (what ``policy`` sees of it),
    ``budget`` on average."""
    scores = torch.cat([policy.masked_scores(view) for view in views], dim=1)
    return Shares(shared_counts(scores, budget, floor_of(budget, policy.min_budget())), scores)


def shared_counts(scores: torch.Tensor, budget: int, floor: int) -> torch.Tensor:
    """Tokens each row keeps of each KV head (B, H), from ``scores`` (B, H, L; -inf for padding): every row's
    counts sum to ``budget`` x H.

    Every head keeps its ``floor`` best tokens; the rest of a row's total goes to its best scores left
    over all heads together.
    """
    batch, heads, length = scores.shape
    if budget >= length:
        return torch.full((batch, heads), length, dtype=torch.long)
    ranked = scores.float().sort(dim=-1, descending=True).values[:, :, floor:]  # what competes beyond the floors
    extra = heads * (budget - floor)
    counts = torch.full((batch, heads), floor, dtype=torch.long)
    if extra > 0:
        best = ranked.reshape(batch, -1).topk(extra, dim=-1).indices // (length - floor)
        counts += torch.nn.functional.one_hot(best, heads).sum(dim=1).cpu()
    return counts

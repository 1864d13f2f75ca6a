"""Ada-KV's rule: a layer's budget shared among its KV heads by the scores of its policy.

Ada-KV (Feng et al. 2024, arXiv 2407.11550) keeps, over all the KV heads of a layer together, the
budget x heads tokens with the highest scores: a head whose attention is concentrated keeps few
tokens and a head that spreads it keeps many, at the same total. A floor (a fifth of the budget,
and at least what the policy needs) keeps every head usable, as the paper's safeguard does.

The published rule decides per sequence. polykv stores a layer whose heads keep different counts as
one group per KV head (``SplitLayer``), with one count per head for every row of a batch, so each
head keeps the mean of the rows' counts, rounded so that the counts still sum to the total. For a
batch of one this is the rule itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from polykv.policy import LayerView, ScoringPolicy

#: The floor of every head, as a share of the layer's budget per head (Ada-KV's safeguard).
FLOOR_SHARE = 0.2


def floor_of(budget: int, least: int) -> int:
    """The fewest tokens a head keeps for a layer ``budget`` per head: a fifth of it, at least ``least``."""
    return min(budget, max(least, math.ceil(FLOOR_SHARE * budget)))


def share(policy: ScoringPolicy, views: Sequence[LayerView], budget: int) -> list[int]:
    """Tokens each KV head keeps, one ``views`` entry per head (what ``policy`` sees of it), ``budget`` on average."""
    scores = torch.cat([policy.masked_scores(view) for view in views], dim=1)
    return shared_counts(scores, budget, floor_of(budget, policy.min_budget()))


def shared_counts(scores: torch.Tensor, budget: int, floor: int) -> list[int]:
    """Tokens each KV head keeps, from ``scores`` (B, H, L; -inf for padding), summing to ``budget`` x H.

    Every head keeps its ``floor`` best tokens; the rest of the total goes to the best scores left over
    all heads of a row together; each head then keeps the rows' mean count, largest remainders rounded up.
    """
    batch, heads, length = scores.shape
    total = heads * budget
    if budget >= length:
        return [length] * heads
    ranked = scores.float().sort(dim=-1, descending=True).values[:, :, floor:]  # what competes beyond the floors
    extra = total - heads * floor
    counts = torch.full((batch, heads), floor, dtype=torch.float64)
    if extra > 0:
        best = ranked.reshape(batch, -1).topk(extra, dim=-1).indices // (length - floor)
        counts += torch.nn.functional.one_hot(best, heads).sum(dim=1).double().cpu()
    mean = counts.mean(dim=0)
    kept = mean.floor().long()
    short = total - int(kept.sum())
    for head in (mean - kept).argsort(descending=True, stable=True)[:short].tolist():
        kept[head] += 1
    return kept.tolist()

"""Scores: how close a compressed cache's predictions stay to the full cache's, and gap recovery.

The harness gives each sample its graded scores (``polykv.harness.divergence``) and its greedy
answer, checked for the expected strings (``polykv.tasks``).

Gap recovery compares a method with the best single uniform policy at the same budget and with
the full cache: (best single - method) / (best single - full) for a loss (lower is better); 1 is
the full cache's quality, 0 the best single policy's, negative is worse than it. Confidence
intervals resample the samples (jointly for every method) and pick the best single policy again
in every resample.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence


def gap_recovery(method: float, best_single: float, full: float) -> float:
    """(best single - method) / (best single - full) for a loss; nan when the single policy has no gap."""
    gap = best_single - full
    if gap <= 0:
        return math.nan
    return (best_single - method) / gap


def bootstrap_recovery(
    per_sample: Mapping[str, Sequence[float]],
    method: str,
    singles: Sequence[str],
    full: str,
    *,
    resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Gap recovery of ``method`` and its confidence interval (low, high) over resampled samples.

    ``per_sample[name]`` holds one loss per sample, in the same sample order for every method.
    """
    count = len(per_sample[method])
    point = _recovery([range(count)], per_sample, method, singles, full)[0]
    rng = random.Random(seed)
    draws = [[rng.randrange(count) for _ in range(count)] for _ in range(resamples)]
    values = sorted(v for v in _recovery(draws, per_sample, method, singles, full) if not math.isnan(v))
    if not values:
        return point, math.nan, math.nan
    low = values[int((1 - level) / 2 * (len(values) - 1))]
    high = values[int((1 + level) / 2 * (len(values) - 1))]
    return point, low, high


def _recovery(draws, per_sample, method: str, singles: Sequence[str], full: str) -> list[float]:
    found = []
    for draw in draws:
        draw = list(draw)

        def mean(name: str, draw=draw) -> float:
            return sum(per_sample[name][i] for i in draw) / len(draw)

        best = min(mean(name) for name in singles)
        found.append(gap_recovery(mean(method), best, mean(full)))
    return found

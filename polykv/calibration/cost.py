"""What each policy adds to the prefill: its prefill time over the full cache's, on the calibration prompts.

Routing reads these costs when a spec limits the prefill (``prefill <= 1.5x``): most policies add a
few percent (a top-k over scores the attention already made), while reconstruction scoring runs
the model a second time over the repeated prompt. Each policy runs on every layer at one budget;
specs and policies are interleaved over the repeats so drift in the machine's speed hits all alike,
and the median is kept.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from polykv.cache.preparation import prepared
from polykv.model.describe import cache_argument
from polykv.plan import compile
from polykv.registry import Registry
from polykv.tasks.tasks import Sample

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Tokens per layer the costs are measured at: small enough that every policy evicts.
COST_BUDGET = 64
#: Timed prefills per policy and prompt (after one untimed warm-up).
REPEATS = 3
#: Prompts timed (the first of each task's samples, up to this many).
PROMPTS = 2


def prefill_costs(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    policies: Sequence[str],
    *,
    registry: Registry,
    tokenizer=None,
    setting: str = "question",
    budget: int = COST_BUDGET,
    repeats: int = REPEATS,
) -> dict[str, float]:
    """Per policy, the median prefill time with it on every layer over the full cache's (1.0: free)."""
    prompts = _prompts(samples, setting)
    with prepared(model), torch.no_grad():
        specs = {"": "layers *: full"}
        for name in policies:
            specs[name] = f"layers *: {name}@{max(budget, registry.policies.create(name).min_budget())}"
        plans = {name: compile(spec, model, registry=registry, tokenizer=tokenizer) for name, spec in specs.items()}
        seconds: dict[str, list[float]] = {name: [] for name in plans}
        for prompt in prompts:
            ids = torch.tensor([prompt], device=model.device)
            for plan in plans.values():
                _prefill(model, plan, ids, registry)  # warm-up: kernels, allocator, compiled paths
            for _ in range(repeats):
                for name, plan in plans.items():
                    seconds[name].append(_prefill(model, plan, ids, registry))
    full = statistics.median(seconds[""])
    return {name: round(statistics.median(seconds[name]) / full, 4) for name in policies}


def _prompts(samples: Sequence[Sample], setting: str) -> list[list[int]]:
    """What is compressed in ``setting``: the first sample of up to PROMPTS tasks (the whole prompt, or its context)."""
    first: dict[str, Sample] = {}
    for sample in samples:
        first.setdefault(sample.group, sample)
    chosen = list(first.values())[:PROMPTS]
    return [list(sample.prompt if setting == "question" else sample.parts()[0]) for sample in chosen]


def _prefill(model: PreTrainedModel, plan, ids: torch.Tensor, registry: Registry) -> float:
    cache = plan.make_cache(registry, prompt_length=ids.shape[1])
    _synchronize(ids.device)
    start = time.perf_counter()
    model(ids, **cache_argument(model, cache))
    _synchronize(ids.device)
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)

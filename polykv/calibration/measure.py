"""Measuring how much each layer suffers under each policy and budget, on the model itself.

The table behind routing and budget solving: for every layer l, candidate policy p and budget b,
the loss when ONLY layer l is compressed with p to b tokens and every other layer keeps
everything, measured as the KL divergence of the next-token distributions (full cache ||
compressed) on scored continuation tokens, averaged per task; or, calibrating a speculative
draft's routing for ``acceptance``, as the share of proposals the full cache would refuse
(``polykv.harness.divergence``).

It is cheap because compression happens after the prefill's attention: one prefill per batch of
prompts is captured, and each table entry then costs one short teacher-forced pass over the
continuation (the harness's ``Scorer.layer_loss``), which starts at layer l where the model allows.

With ``heads`` it also measures each KV head on its own: the loss when only head h of layer l is
compressed, from the same captured prefill, for routing and budgets per head. That multiplies the
table's passes by 1 + the KV heads per layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import attrs
import torch
from tqdm import tqdm

from polykv.cache.preparation import prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.harness.processes import ONE, Processes
from polykv.harness.scorer import Scorer, by_group, group_sizes, needs_of
from polykv.registry import Registry, default_registry
from polykv.signals import Signal
from polykv.tasks.tasks import Sample
from polykv.values import Value

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Signals look at a window of at least this many of the last queries.
SIGNAL_WINDOW = 32


@attrs.frozen
class Measurements:
    """What calibration measured, per task: ``losses[task][layer][policy][budget]`` and signals per layer.

    ``losses`` entries are math.inf where a policy cannot take a budget. ``signals[name][task][layer]``
    holds scalar signals; ``curves[name][task][layer][policy][budget]`` the curve signals. A task is
    a samples' group, ``task:format``. ``head_losses[task][layer][head][policy][budget]`` (empty unless
    heads were measured) holds the losses with only that KV head compressed.
    """

    grid: tuple[int, ...]
    policies: tuple[str, ...]
    losses: Mapping[str, list]
    signals: Mapping[str, Mapping[str, list]]
    curves: Mapping[str, Mapping[str, list]]
    samples: Mapping[str, int]
    prompt_length: int
    continuation_length: int
    head_losses: Mapping[str, list] = attrs.field(factory=dict)


def measure(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    *,
    policies: Mapping[str, Mapping[str, Value]],
    grid: Sequence[int],
    signals: Sequence[Signal] = (),
    batch_size: int = 8,
    registry: Registry | None = None,
    progress: bool = True,
    setting: str = "question",
    reconstruction: Reconstruction | None = None,
    processes: Processes = ONE,
    objective: str = "kl",
    heads: bool = False,
) -> Measurements:
    """Measure the loss table (and signals) of ``model`` on ``samples``; see the module docstring.

    ``setting`` says where the question is when the cache is compressed (``polykv.harness.scorer``);
    ``reconstruction`` lets the model repeat each prompt, for policies that score that way. With several
    ``processes`` (torchrun), each measures a share of the batches and every one returns the whole table,
    equal to one process's (``polykv.harness.processes``)."""
    registry = default_registry() if registry is None else registry
    created = {name: registry.policies.create(name, dict(params)) for name, params in policies.items()}
    needs = needs_of([policy.needs() for policy in created.values()], window=SIGNAL_WINDOW)
    grid = tuple(sorted(set(grid)))
    batches = list(by_group(samples, batch_size))
    config = model.config.get_text_config()
    layers = config.num_hidden_layers
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    measured_heads = range(kv_heads) if heads else range(0)
    scalar = [s for s in signals if not s.curve]
    curve = [s for s in signals if s.curve]
    mine = processes.share(len(batches))
    bar = tqdm(
        total=len(mine) * layers * len(created) * len(grid) * (1 + len(measured_heads)),
        desc="calibrating",
        unit="entry",
        disable=not (progress and processes.main),
    )
    added: dict[int, list[tuple[tuple, float, int]]] = {}  # batch -> its (key, sum, count), in the order measured
    with prepared(model), torch.no_grad(), bar:
        for index in mine:
            batch = batches[index]
            task, entries = batch[0].group, added.setdefault(index, [])
            scorer = Scorer(model, batch, needs, hidden=True, setting=setting, reconstruction=reconstruction)
            for layer in range(layers):
                observation = scorer.captured.observation(layer)
                for signal in scalar:
                    entries.append(_summed(("signal", signal.name, task, layer), signal.measure(observation)))
                for p, policy in enumerate(created.values()):
                    for g, budget in enumerate(grid):
                        loss, kept = scorer.layer_loss(layer, policy, budget, objective)
                        entries.append(_summed(("loss", task, layer, p, g), loss))
                        for signal in curve:
                            value = signal.measure(observation, kept) if kept is not None else torch.zeros_like(loss)
                            entries.append(_summed(("curve", signal.name, task, layer, p, g), value))
                        for head in measured_heads:
                            loss, _kept = scorer.layer_loss(layer, policy, budget, objective, head=head)
                            entries.append(_summed(("head", task, layer, head, p, g), loss))
                        bar.update(1 + len(measured_heads))
    sums = _Sums()
    merged = {index: entries for part in processes.gather(added) for index, entries in part.items()}
    for index in range(len(batches)):  # in batch order, as one process adds them
        for key, total, count in merged[index]:
            sums.add(key, total, count)
    tasks = sorted(group_sizes(samples))
    return Measurements(
        grid=grid,
        policies=tuple(created),
        losses={t: _table(sums, ("loss", t), layers, len(created), len(grid)) for t in tasks},
        signals={
            s.name: {t: [sums.mean(("signal", s.name, t, layer)) for layer in range(layers)] for t in tasks}
            for s in scalar
        },
        curves={
            s.name: {t: _table(sums, ("curve", s.name, t), layers, len(created), len(grid)) for t in tasks}
            for s in curve
        },
        samples=dict(sorted(group_sizes(samples).items())),
        prompt_length=round(sum(s.length for s in samples) / len(samples)),
        continuation_length=max(len(s.target) for s in samples),
        head_losses={
            t: [_table(sums, ("head", t, layer), kv_heads, len(created), len(grid)) for layer in range(layers)]
            for t in tasks
        }
        if heads
        else {},
    )


def _summed(key: tuple, values: torch.Tensor) -> tuple[tuple, float, int]:
    """One batch's part of a mean: its key, the sum of its values, and their count."""
    values = values.detach().float().cpu()
    return key, float(values.sum()), values.numel()


class _Sums:
    """Running per-sample sums, averaged at the end."""

    def __init__(self) -> None:
        self.total: dict[tuple, float] = {}
        self.count: dict[tuple, int] = {}

    def add(self, key: tuple, total: float, count: int) -> None:
        self.total[key] = self.total.get(key, 0.0) + total
        self.count[key] = self.count.get(key, 0) + count

    def mean(self, key: tuple) -> float:
        return self.total[key] / self.count[key]


def _table(sums: _Sums, prefix: tuple, units: int, policies: int, budgets: int) -> list:
    """Means per [unit][policy][budget], a unit being a layer (or a KV head, under a layer's prefix)."""
    return [
        [[sums.mean((*prefix, unit, p, g)) for g in range(budgets)] for p in range(policies)] for unit in range(units)
    ]

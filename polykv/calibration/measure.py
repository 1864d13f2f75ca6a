"""Measuring how much each layer suffers under each policy and budget, on the model itself.

The table behind routing and budget solving: for every layer l, candidate policy p and budget b,
the loss when ONLY layer l is compressed with p to b tokens and every other layer keeps
everything, measured as the KL divergence of the next-token distributions (full cache ||
compressed) on scored continuation tokens, averaged per task.

It is cheap because compression happens after the prefill's attention: one prefill per batch of
prompts is captured (``polykv.harness.capture``), each table entry then costs one short
teacher-forced pass over the continuation through a cache built from the captured tensors. Layers
below l compute the same thing in every entry of layer l, so where the model allows it the pass
starts at layer l from the hidden states of the full-cache pass (checked against the full pass
for each layer before it is used).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch
from tqdm import tqdm

from polykv.cache.attention import prepare_model
from polykv.cache.positions import continuation_positions
from polykv.harness.capture import Capture, capture
from polykv.model import attention_modules
from polykv.policy import Needs, Policy
from polykv.registry import Registry, default_registry
from polykv.signals import Signal
from polykv.values import Value


@attrs.frozen
class CalibrationSample:
    """A prompt and the tokens after it whose prediction is scored (teacher-forced)."""

    task: str
    context: torch.Tensor  # (L,) token ids
    continuation: torch.Tensor  # (T,) token ids, T >= 2: the first is predicted by the prefill itself


@attrs.frozen
class Measurements:
    """What calibration measured, per task: ``losses[task][layer][policy][budget]`` and signals per layer.

    ``losses`` entries are math.inf where a policy cannot take a budget. ``signals[name][task][layer]``
    holds scalar signals; ``curves[name][task][layer][policy][budget]`` the curve signals.
    """

    grid: tuple[int, ...]
    policies: tuple[str, ...]
    losses: Mapping[str, list]
    signals: Mapping[str, Mapping[str, list]]
    curves: Mapping[str, Mapping[str, list]]
    samples: Mapping[str, int]
    prompt_length: int
    continuation_length: int


def measure(
    model: torch.nn.Module,
    samples: Sequence[CalibrationSample],
    *,
    policies: Mapping[str, Mapping[str, Value]],
    grid: Sequence[int],
    signals: Sequence[Signal] = (),
    batch_size: int = 8,
    registry: Registry | None = None,
    progress: bool = True,
) -> Measurements:
    """Measure the loss table (and signals) of ``model`` on ``samples``; see the module docstring."""
    registry = default_registry() if registry is None else registry
    prepare_model(model)
    created = {name: registry.policies.create(name, dict(params)) for name, params in policies.items()}
    grid = tuple(sorted(set(grid)))
    batches = list(_batches(samples, batch_size))
    layers = model.config.get_text_config().num_hidden_layers
    scalar = [s for s in signals if not s.curve]
    curve = [s for s in signals if s.curve]
    sums = _Sums()
    bar = tqdm(
        total=len(batches) * layers * len(created) * len(grid),
        desc="calibrating",
        unit="entry",
        disable=not progress,
    )
    device = next(model.parameters()).device
    with torch.no_grad(), bar:
        for task, batch in batches:
            ids, mask, continuation = _pad(batch, device)
            captured = capture(
                model, ids, mask, needs=_union(created.values()), room=continuation.shape[1], hidden=True
            )
            passes = _ContinuationPasses(model, captured, mask, continuation)
            for layer in range(layers):
                observation = captured.observation(layer)
                for signal in scalar:
                    sums.add(("signal", signal.name, task, layer), signal.measure(observation))
                for p, policy in enumerate(created.values()):
                    for g, budget in enumerate(grid):
                        loss, kept = passes.loss(layer, policy, budget)
                        sums.add(("loss", task, layer, p, g), loss)
                        for signal in curve:
                            value = signal.measure(observation, kept) if kept is not None else torch.zeros_like(loss)
                            sums.add(("curve", signal.name, task, layer, p, g), value)
                        bar.update(1)
    tasks = sorted({task for task, _ in batches})
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
        samples={t: sum(len(b) for task, b in batches if task == t) for t in tasks},
        prompt_length=round(sum(len(s.context) for s in samples) / len(samples)),
        continuation_length=max(len(s.continuation) for s in samples),
    )


class _ContinuationPasses:
    """Teacher-forced passes over one batch's continuation, through caches built from one capture."""

    def __init__(self, model: torch.nn.Module, captured: Capture, mask: torch.Tensor, continuation: torch.Tensor):
        self.model = model
        self.captured = captured
        self.inputs = continuation[:, :-1]  # each position predicts the next continuation token
        self.mask = torch.cat([mask, torch.ones_like(continuation)], dim=1)[:, : mask.shape[1] + self.inputs.shape[1]]
        self.positions = continuation_positions(mask, self.inputs.shape[1])
        reference = model(
            self.inputs,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=captured.cache(share_room=True),
            output_hidden_states=True,
        )
        self.reference = torch.log_softmax(reference.logits.float(), dim=-1)
        self.entering = reference.hidden_states  # hidden_states[l]: the input of layer l
        self.skips = _LayerSkipper(model)
        self.skip_ok: dict[int, bool] = {}

    def loss(self, layer: int, policy: Policy, budget: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample KL (B,) with only ``layer`` compressed by ``policy`` to ``budget``, and the kept indices."""
        batch = self.inputs.shape[0]
        if budget < policy.min_budget():
            return torch.full((batch,), math.inf), None
        rule_budget = budget if budget < self.captured.layers[layer].storage.size else None
        if rule_budget is None:  # the budget covers the prompt: the layer is kept whole
            return torch.zeros(batch), None
        kept = self.captured.select(layer, policy, budget).indices
        logits = self._logits(layer, {layer: kept})
        compressed = torch.log_softmax(logits.float(), dim=-1)
        kl = (self.reference.exp() * (self.reference - compressed)).sum(-1)  # (B, T-1)
        return kl.mean(-1).cpu(), kept

    def _logits(self, layer: int, keep: Mapping[int, torch.Tensor]) -> torch.Tensor:
        if self._can_skip(layer):
            with self.skips.from_layer(layer):
                return self.model(
                    inputs_embeds=self.entering[layer],
                    attention_mask=self.mask,
                    position_ids=self.positions,
                    past_key_values=self.captured.cache(keep, share_room=True),
                ).logits
        return self.model(
            self.inputs,
            attention_mask=self.mask,
            position_ids=self.positions,
            past_key_values=self.captured.cache(keep, share_room=True),
        ).logits

    def _can_skip(self, layer: int) -> bool:
        """Whether starting at ``layer`` reproduces the full pass on this model (checked once per layer)."""
        if layer not in self.skip_ok:
            ok = False
            if layer > 0 and self.skips.possible:
                with self.skips.from_layer(layer):
                    logits = self.model(
                        inputs_embeds=self.entering[layer],
                        attention_mask=self.mask,
                        position_ids=self.positions,
                        past_key_values=self.captured.cache(share_room=True),
                    ).logits
                expected = self.reference.exp()
                ok = torch.allclose(torch.softmax(logits.float(), dim=-1), expected, rtol=1e-3, atol=1e-5)
            self.skip_ok[layer] = ok
        return self.skip_ok[layer]


class _LayerSkipper:
    """Runs a model from decoder layer l on: its layer list shortened for the duration of a pass."""

    def __init__(self, model: torch.nn.Module):
        self.owner, self.attribute, self.layers = _decoder_layer_list(model)
        self.possible = self.owner is not None

    @contextlib.contextmanager
    def from_layer(self, layer: int) -> Iterator[None]:
        setattr(self.owner, self.attribute, torch.nn.ModuleList(list(self.layers)[layer:]))
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.layers)


def _decoder_layer_list(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str, torch.nn.ModuleList | None]:
    """The module holding the decoder layers as a ModuleList, the attribute's name, and the list."""
    attention = list(attention_modules(model).values())
    for owner in model.modules():
        for name, child in owner.named_children():
            holds_layers = isinstance(child, torch.nn.ModuleList) and len(child) == len(attention)
            if holds_layers and all(any(a is m for m in layer.modules()) for layer, a in zip(child, attention)):
                return owner, name, child
    return None, "", None


class _Sums:
    """Running per-sample sums, averaged at the end."""

    def __init__(self) -> None:
        self.total: dict[tuple, float] = {}
        self.count: dict[tuple, int] = {}

    def add(self, key: tuple, values: torch.Tensor) -> None:
        values = values.detach().float().cpu()
        self.total[key] = self.total.get(key, 0.0) + float(values.sum())
        self.count[key] = self.count.get(key, 0) + values.numel()

    def mean(self, key: tuple) -> float:
        return self.total[key] / self.count[key]


def _table(sums: _Sums, prefix: tuple, layers: int, policies: int, budgets: int) -> list:
    return [
        [[sums.mean((*prefix, layer, p, g)) for g in range(budgets)] for p in range(policies)]
        for layer in range(layers)
    ]


def _union(policies) -> Needs:
    needs = [policy.needs() for policy in policies]
    return Needs(
        window=max([32, *(n.window for n in needs)]),  # signals look at a window of 32 queries at least
        window_attention=True,
        accumulated_attention=any(n.accumulated_attention for n in needs),
    )


def _batches(samples: Sequence[CalibrationSample], size: int) -> Iterator[tuple[str, list[CalibrationSample]]]:
    """Samples of one task at a time, ``size`` per batch, in a fixed order."""
    by_task: dict[str, list[CalibrationSample]] = {}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample)
    for task in sorted(by_task):
        group = by_task[task]
        for start in range(0, len(group), size):
            yield task, group[start : start + size]


def _pad(batch: list[CalibrationSample], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded contexts (B, L) with their mask, and the continuations (B, T) cut to the shortest."""
    width = max(len(s.context) for s in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for row, sample in enumerate(batch):
        ids[row, width - len(sample.context) :] = sample.context
        mask[row, width - len(sample.context) :] = 1
    shortest = min(len(s.continuation) for s in batch)
    if shortest < 2:
        raise ValueError("a calibration sample needs at least 2 continuation tokens (the first is not scored)")
    continuation = torch.stack([s.continuation[:shortest] for s in batch])
    return ids.to(device), mask.to(device), continuation.to(device)

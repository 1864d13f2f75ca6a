"""One batch of evaluation samples: prefilled once with the full cache, then scored under any plan.

The evaluation runner and the calibration's tuning both score many plans on the same prompts; the
prompt's prefill is captured once (``polykv.harness.capture``) and each plan's cache is built from the
capture exactly as its own prefill would have built it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import attrs
import torch

from polykv.cache.positions import continuation_positions
from polykv.harness.capture import Capture, capture
from polykv.harness.divergence import kl_divergence, negative_log_likelihood
from polykv.plan import Plan
from polykv.policy import Needs
from polykv.tasks.tasks import Sample


@attrs.frozen
class Record:
    """One sample scored with one method at one budget."""

    task: str
    format: str
    seed: int
    method: str
    budget: int
    kl: float
    nll: float
    accuracy: float | None
    stored: float  # tokens stored per layer after prefill, on average over layers

    @property
    def key(self) -> tuple:
        return (self.task, self.format, self.seed, self.method, self.budget)


class BatchScorer:
    """One batch of samples, prefilled once, scored under any method's cache.

    ``needs`` is what the methods' policies need captured (``needs_of``). With a ``tokenizer`` the
    scores include greedy answers (accuracy); without one only the graded scores are computed.
    """

    def __init__(self, model, batch: Sequence[Sample], needs: Needs, *, pad_token_id: int, tokenizer=None):
        self.model, self.tokenizer, self.batch = model, tokenizer, batch
        device = next(model.parameters()).device
        width = max(s.length for s in batch)
        self.ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
        self.mask = torch.zeros_like(self.ids)
        for row, sample in enumerate(batch):
            self.ids[row, width - sample.length :] = torch.tensor(sample.prompt)
            self.mask[row, width - sample.length :] = 1
        self.ids, self.mask = self.ids.to(device), self.mask.to(device)
        length = min(len(s.target) for s in batch)
        self.targets = torch.tensor([s.target[:length] for s in batch], device=device)
        self.steps = max(len(s.target) for s in batch) + 2
        room = max(length, self.steps)
        self.captured: Capture = capture(model, self.ids, self.mask, needs=needs, room=room)
        self.reference = self._teacher_forced(self.captured.cache(share_room=True))

    def score(self, method: str, budget: int, plan: Plan | None) -> Iterator[Record]:
        if plan is None:
            logits, stored = self.reference, float(self.captured.seen)
        else:
            cache = self.captured.cache_for(plan)
            stored = sum(cache.layer_lengths()) / len(cache.layers)
            logits = self._teacher_forced(cache)
        answers = self._greedy(plan) if self.tokenizer is not None else [None] * len(self.batch)
        kl = kl_divergence(self.reference, logits)
        nll = negative_log_likelihood(logits, self.targets[:, 1:])
        for row, sample in enumerate(self.batch):
            accuracy = sample.correct(answers[row]) if sample.expected and answers[row] is not None else None
            yield Record(
                sample.task,
                sample.format,
                sample.seed,
                method,
                budget,
                float(kl[row]),
                float(nll[row]),
                accuracy,
                stored,
            )

    def _teacher_forced(self, cache) -> torch.Tensor:
        """Logits predicting target tokens 2.. (the first is predicted by the prefill itself)."""
        inputs = self.targets[:, :-1]
        mask = torch.cat([self.mask, torch.ones_like(inputs)], dim=1)
        with torch.no_grad():
            return self.model(
                inputs,
                attention_mask=mask,
                position_ids=continuation_positions(self.mask, inputs.shape[1]),
                past_key_values=cache,
            ).logits

    def _greedy(self, plan: Plan | None) -> list[str]:
        cache = self.captured.cache() if plan is None else self.captured.cache_for(plan)
        token = self.captured.logits.argmax(-1, keepdim=True)
        produced, mask = [token], self.mask
        with torch.no_grad():
            for step in range(self.steps - 1):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                positions = continuation_positions(self.mask, 1) + step
                logits = self.model(token, attention_mask=mask, position_ids=positions, past_key_values=cache).logits
                token = logits[:, -1].argmax(-1, keepdim=True)
                produced.append(token)
        tokens = torch.cat(produced, dim=1)
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens]


def needs_of(plans) -> Needs:
    """What to capture so that every plan's cache can be built from the capture and scored."""
    needs = [plan.needs() for plan in plans]
    return Needs(
        window=max([1, *(n.window for n in needs)]),
        window_attention=True,
        accumulated_attention=any(n.accumulated_attention for n in needs),
    )


def by_task(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    """Batches of at most ``size`` samples, each of one task and format (prompts of similar length)."""
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.task, sample.format), []).append(sample)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]

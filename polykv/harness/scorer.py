"""The capture-and-score harness: a batch of samples prefilled once, then scored under any compressed cache.

Calibration, the solver's tuning and evaluation all ask one question many times: how far does a
compressed cache move the model's predictions on these prompts? A policy compresses a layer after
the prefill's attention has run, so one prefill with every layer whole (``capture``) serves every
cache anyone wants to try: a plan's (``records``: what evaluation and tuning score) or one with a
single layer compressed (``layer_loss``: an entry of calibration's table). Each is scored
teacher-forced on the samples' target tokens against the full cache (``reference``), and, with a
tokenizer, by a greedy answer.

Two settings (``SETTINGS``): with ``question`` the compressed prompt holds the question (the whole
``Sample.prompt``), as in most benchmarks; with ``context`` only the context is compressed, and the
question arrives after it, uncompressed, as when one compressed context serves several questions
(kvpress's pipeline; where query-aware policies have no query to go by).

Samples of a batch are left-padded to one length; their targets are cut to the shortest; in the
context setting the questions are left-padded to the longest, between context and answer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence

import attrs
import torch

from polykv.cache.positions import prompt_positions
from polykv.cache.reconstruction import Reconstruction
from polykv.errors import PolykvError
from polykv.harness.capture import Capture, capture
from polykv.harness.divergence import DIVERGENCES, kl_divergence, negative_log_likelihood, rejection
from polykv.model import attention_modules
from polykv.model.describe import cache_argument, positions
from polykv.plan.plan import Plan
from polykv.policy import Needs, Policy
from polykv.tasks.tasks import Sample
from polykv.values import SETTINGS


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
    setting: str = "question"
    rejection: float | None = None  # the share of proposals speculative sampling would refuse (None: not scored)

    def loss(self, objective: str) -> float:
        """What calibration for ``objective`` minimises: KL, or the rejection rate."""
        if objective == "kl":
            return self.kl
        assert self.rejection is not None, "a record scored without rejection has no acceptance loss"
        return self.rejection

    @property
    def key(self) -> tuple:
        return (self.task, self.format, self.seed, self.method, self.budget, self.setting)


class Scorer:
    """One batch of samples, prefilled once with the full cache, scored under any cache built from the capture.

    ``needs`` is what the policies to be tried need captured (``needs_of``). ``hidden`` also keeps
    what signals read and lets ``layer_loss`` start its passes at the compressed layer. With a
    ``tokenizer``, ``records`` include greedy answers (accuracy) where a sample expects one (a batch
    of continuations generates nothing: it has no answer to grade). ``setting`` says where the
    question is (see ``SETTINGS``); ``reconstruction`` lets the model repeat the prompt after the
    prefill, for policies that score that way.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        samples: Sequence[Sample],
        needs: Needs,
        *,
        pad_token_id: int = 0,
        tokenizer=None,
        hidden: bool = False,
        setting: str = "question",
        reconstruction: Reconstruction | None = None,
    ):
        if setting not in SETTINGS:
            raise ValueError(f"setting is one of {', '.join(SETTINGS)}, not {setting!r}")
        self.model, self.samples, self.setting = model, list(samples), setting
        self.tokenizer = tokenizer if any(sample.expected for sample in samples) else None
        device = next(model.parameters()).device
        compressed = [s.prompt if setting == "question" else s.parts()[0] for s in samples]
        ids, self.mask = _left_padded(compressed, pad_token_id, device)
        shortest = min(len(sample.target) for sample in samples)
        if shortest < 2:
            raise ValueError("a scored sample needs at least 2 target tokens (the first is predicted by the prefill)")
        self.targets = torch.tensor([sample.target[:shortest] for sample in samples], device=device)
        self.steps = max(len(sample.target) for sample in samples) + 2  # greedy answers: the target and a little
        questions, asked = _left_padded(
            [s.parts()[1] if setting == "context" else () for s in samples], pad_token_id, device
        )
        if questions.shape[1] == 0:  # each target token predicts the next; the prefill predicts the first
            self._scored = self.targets[:, 1:]
        elif all(s.parts()[1] for s in samples):  # the question's last token predicts the first target token
            self._scored = self.targets
        else:
            raise ValueError("in the context setting a batch's samples all have a question or none does")
        self._question, self._question_mask = questions, asked
        inputs = torch.cat([questions, self.targets[:, :-1]], dim=1)
        room = inputs.shape[1] + (self.steps if self.tokenizer is not None else 0)
        _check_positions(model, samples, [len(tokens) for tokens in compressed], room)
        self.captured: Capture = capture(
            model, ids, self.mask, needs=needs, room=room, hidden=hidden, reconstruction=reconstruction
        )
        self._inputs = inputs
        self._input_mask = torch.cat([self.mask, asked, torch.ones_like(self.targets[:, :-1])], dim=1)
        self._positions = prompt_positions(self._input_mask)[:, -inputs.shape[1] :]
        with torch.no_grad():
            reference = self._forward(self.captured.cache(share_room=True), hidden_states=hidden)
        self.reference = reference.logits
        self._entering = reference.hidden_states if hidden else None  # hidden_states[l]: the input of layer l
        self._skips = _LayerSkipper(model) if hidden else None
        self._skip_ok: dict[int, bool] = {}

    # --- a plan's cache ------------------------------------------------------------------------------

    def records(self, method: str, budget: int, plan: Plan | None) -> Iterator[Record]:
        """Every sample scored under ``plan``'s cache (None: the full cache), labelled ``method`` at ``budget``."""
        if plan is None:
            logits, stored = self.reference, float(self.captured.seen)
        else:
            cache = self.captured.cache_for(plan)
            stored = sum(cache.layer_lengths()) / len(cache.layers)
            with torch.no_grad():
                logits = self._forward(cache).logits
        answers = self.answers(plan) if self.tokenizer is not None else [None] * len(self.samples)
        scored = self._scored.shape[1]
        kl = kl_divergence(self.reference[:, -scored:], logits[:, -scored:])
        refused = rejection(self.reference[:, -scored:], logits[:, -scored:])
        nll = negative_log_likelihood(logits[:, -scored:], self._scored)
        for row, sample in enumerate(self.samples):
            answer = answers[row]
            accuracy = sample.correct(answer) if sample.expected and answer is not None else None
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
                self.setting,
                float(refused[row]),
            )

    def answers(self, plan: Plan | None) -> list[str]:
        """Each sample's greedy answer under ``plan``'s cache (None: the full cache)."""
        cache = self.captured.cache() if plan is None else self.captured.cache_for(plan)
        mask = torch.cat([self.mask, self._question_mask], dim=1)
        with torch.no_grad():
            # In the context setting the question comes now, after the compressed context.
            asked = self._question.shape[1] > 0
            logits = self._step(cache, self._question, mask) if asked else self.captured.logits
            token = logits.argmax(-1, keepdim=True)
            produced = [token]
            for _ in range(self.steps - 1):
                mask = torch.cat([mask, torch.ones_like(token)], dim=1)
                token = self._step(cache, token, mask).argmax(-1, keepdim=True)
                produced.append(token)
        tokens = torch.cat(produced, dim=1)
        assert self.tokenizer is not None, "greedy answers are decoded with the scorer's tokenizer"
        return [self.tokenizer.decode(row, skip_special_tokens=True) for row in tokens]

    def _step(self, cache, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The next-token logits (B, V) after ``tokens``, whose attention ``mask`` ends the full one."""
        positions = prompt_positions(mask)[:, -tokens.shape[1] :]
        output = self.model(tokens, attention_mask=mask, position_ids=positions, **cache_argument(self.model, cache))
        return output.logits[:, -1]

    # --- one layer compressed ------------------------------------------------------------------------

    def layer_loss(
        self, layer: int, policy: Policy, budget: int, objective: str = "kl", head: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample loss (B,) with only ``layer`` compressed by ``policy`` to ``budget``, and the kept indices:
        KL, or for ``objective`` "acceptance" the rejection rate (``polykv.harness.divergence``). With ``head``
        only that KV head of the layer is compressed (as a group of its own), the others kept whole.

        The loss is infinite where the policy cannot take the budget, and 0 where the budget covers the
        prompt (the layer is kept whole).
        """
        rows = self.targets.shape[0]
        if budget < policy.min_budget():
            return torch.full((rows,), math.inf), None
        captured = self.captured.layers[layer]
        if budget >= captured.storage.size:
            return torch.zeros(rows), None
        skip = self._starts_at(layer)  # before the cache below: both write into the capture's spare room
        if head is None:
            kept = self.captured.select(layer, policy, budget).indices
            cache = self.captured.cache({layer: kept}, share_room=True)
        else:
            kept = self.captured.select(layer, policy, budget, heads=(head,)).indices
            others = tuple(h for h in range(captured.kv_heads) if h != head)
            groups = [((head,), kept, None)] + ([(others, None, None)] if others else [])
            cache = self.captured.cache(split={layer: groups}, share_room=True)
        with torch.no_grad():
            if skip:
                assert self._skips is not None and self._entering is not None  # _starts_at said yes: hidden was kept
                with self._skips.from_layer(layer):
                    logits = self._forward(cache, embeddings=self._entering[layer]).logits
            else:
                logits = self._forward(cache).logits
        scored = self._scored.shape[1]
        return DIVERGENCES[objective](self.reference[:, -scored:], logits[:, -scored:]).cpu(), kept

    def _starts_at(self, layer: int) -> bool:
        """Whether starting at ``layer`` reproduces the full pass on this model (checked once per layer):
        layers below it compute the same whatever ``layer`` keeps, so their work is skipped."""
        if self._skips is None or not self._skips.possible or layer == 0:
            return False
        assert self._entering is not None  # kept with hidden, like the skips
        if layer not in self._skip_ok:
            with torch.no_grad(), self._skips.from_layer(layer):
                logits = self._forward(self.captured.cache(share_room=True), embeddings=self._entering[layer]).logits
            expected = torch.softmax(self.reference.float(), dim=-1)
            self._skip_ok[layer] = torch.allclose(torch.softmax(logits.float(), -1), expected, rtol=1e-3, atol=1e-5)
        return self._skip_ok[layer]

    def _forward(self, cache, *, embeddings: torch.Tensor | None = None, hidden_states: bool = False):
        """The teacher-forced pass over the targets through ``cache`` (from ``embeddings`` when given)."""
        tokens = {"input_ids": self._inputs} if embeddings is None else {"inputs_embeds": embeddings}
        return self.model(
            **tokens,
            attention_mask=self._input_mask,
            position_ids=self._positions,
            **cache_argument(self.model, cache),
            output_hidden_states=hidden_states,
        )


class _LayerSkipper:
    """Runs a model from decoder layer l on: its layer list shortened for the duration of a pass."""

    def __init__(self, model: torch.nn.Module):
        self.owner, self.attribute, self.layers = _decoder_layer_list(model)
        self.possible = self.owner is not None

    @contextlib.contextmanager
    def from_layer(self, layer: int) -> Iterator[None]:
        assert self.layers is not None, "a model whose decoder layers were not found cannot skip them"
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
            if not (isinstance(child, torch.nn.ModuleList) and len(child) == len(attention)):
                continue
            if all(any(a is m for m in layer.modules()) for layer, a in zip(child, attention)):
                return owner, name, child
    return None, "", None


def _left_padded(rows: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows left-padded to the longest: ids (B, W) and mask (B, W)."""
    width = max((len(row) for row in rows), default=0)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for number, row in enumerate(rows):
        if len(row):
            ids[number, width - len(row) :] = torch.tensor(row)
            mask[number, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def needs_of(plans, *, window: int = 1) -> Needs:
    """What to capture so that every plan's cache (and any of the policies' in ``needs``) can be built."""
    needs = [plan if isinstance(plan, Needs) else plan.needs() for plan in plans]
    return Needs(
        window=max([window, *(n.window for n in needs)]),
        window_attention=True,
        accumulated_attention=any(n.accumulated_attention for n in needs),
        reconstruction=any(n.reconstruction for n in needs),
    )


def by_group(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    """Batches of at most ``size`` samples, each of one task and format (prompts of similar length), and
    either all with a question to ask after the context or none (the context setting scores them apart)."""
    groups: dict[tuple[str, str, bool], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.task, sample.format, bool(sample.parts()[1])), []).append(sample)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def group_sizes(samples: Sequence[Sample]) -> Mapping[str, int]:
    """How many samples each group (``task:format``) holds."""
    found: dict[str, int] = {}
    for sample in samples:
        found[sample.group] = found.get(sample.group, 0) + 1
    return found


def _check_positions(model: torch.nn.Module, samples: Sequence[Sample], lengths: Sequence[int], room: int) -> None:
    """Refuse, before any forward, a sample whose compressed prompt (``lengths``) and the tokens after it need
    more positions than the model has."""
    most = positions(model)
    length, longest = max(zip(lengths, samples), key=lambda pair: pair[0])
    if most is not None and length + room > most:
        raise PolykvError(
            f"sample {longest.group} {longest.seed}: its {length:,} prompt tokens and {room} tokens after them "
            f"need {length + room:,} positions; the model has {most:,} (max_position_embeddings)"
        )

"""The evaluation runner: methods x budgets x tasks, one shared prefill per batch, resumable.

A method is a spec with ``{budget}`` where the average budget per layer goes (``*: snapkv@{budget}``,
``budget {budget}; *: auto@auto``), or a short name for a built-in one (``METHODS``). Every method
is compared at the same number of stored tokens over all layers, layers kept whole included.

For each batch of samples of one task and format, the prompt is prefilled once with the full
cache and captured; each method's cache is then built from the capture exactly as its own
prefill would have built it (``Plan.cache_from``), so a method costs only its scoring passes:

- graded: the true target tokens teacher-forced, KL(full || method) and the loss of the target;
- exact: a greedy answer of the target's length (plus 2), checked for the expected strings.

Results go to ``results.jsonl`` in the output folder, one line per sample, method and budget, with
the sample's seed; a second run skips what is there.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import torch
from tqdm import tqdm

from polykv.cache.attention import prepare_model
from polykv.cache.capture import Capture, capture, continuation_positions
from polykv.errors import PolykvError
from polykv.eval.scoring import kl_divergence, negative_log_likelihood
from polykv.eval.tasks import Sample
from polykv.lang.diagnostics import SpecError
from polykv.plan import Plan, compile
from polykv.policy import Needs

#: Single policies applied uniformly: the baselines "best single" is chosen among.
SINGLES = ("streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm")
METHODS = {
    "full": None,
    **{name: f"layers *: {name}@{{budget}}" for name in SINGLES},
    "pyramid": "budget {budget}\nsolver pyramid\nlayers *: pyramidkv@auto",
    "cake": "budget {budget}\nsolver cake\nlayers *: pyramidkv@auto",
    "polykv": "budget {budget}\nlayers *: auto@auto",
    "polykv-budgets": "budget {budget}\nlayers *: pyramidkv@auto",
}
RESULTS = "results.jsonl"


@attrs.frozen
class Method:
    """A named spec template; ``template`` None is the full cache."""

    name: str
    template: str | None

    def spec(self, budget: int) -> str | None:
        return None if self.template is None else self.template.replace("{budget}", str(budget))


def method(text: str) -> Method:
    """A built-in method by name, or a spec template (``name=template`` names it)."""
    if text in METHODS:
        return Method(text, METHODS[text])
    name, _, template = text.partition("=")
    if template and "{budget}" in template:
        return Method(name.strip(), template)
    if "{budget}" in text:
        return Method(text, text)
    known = ", ".join(METHODS)
    raise PolykvError(f"method {text!r}: name one of {known}, or give a spec with {{budget}} (NAME=SPEC names it)")


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


def run(
    model: torch.nn.Module,
    tokenizer,
    samples: Sequence[Sample],
    methods: Sequence[Method],
    budgets: Sequence[int],
    out: Path,
    *,
    profile=None,
    batch_size: int = 8,
    answers: bool = True,
    progress: bool = True,
) -> list[Record]:
    """Score every method at every budget on ``samples``; results in ``out/results.jsonl`` (resumed).

    ``answers=False`` skips the greedy answers (accuracy), which cost more than the graded scores.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / RESULTS
    done = {record.key: record for record in read(path)}
    prepare_model(model)
    plans = _plans(model, methods, budgets, profile)
    cells = [(m, b) for m in methods for b in budgets if m.template is not None] + [(_full(methods), 0)]
    batches = list(_batches(samples, batch_size))
    todo = sum(1 for batch in batches for s in batch for m, b in cells if _key(s, m, b) not in done)
    with (
        path.open("a", encoding="utf-8") as sink,
        tqdm(total=todo, desc="evaluating", unit="score", disable=not progress) as bar,
    ):
        for batch in batches:
            missing = [(m, b) for m, b in cells if any(_key(s, m, b) not in done for s in batch)]
            if not missing:
                continue
            scorer = _BatchScorer(model, tokenizer, batch, _needs(plans.values()), answers=answers)
            for chosen, budget in missing:
                plan = plans.get((chosen.name, budget))
                for record in scorer.score(chosen.name, budget, plan):
                    if record.key not in done:
                        done[record.key] = record
                        sink.write(json.dumps(attrs.asdict(record)) + "\n")
                        bar.update(1)
                sink.flush()
    return list(done.values())


def read(path: Path) -> list[Record]:
    """The records in a results file (none if it does not exist yet)."""
    if not path.exists():
        return []
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(Record(**json.loads(line)))
        except (json.JSONDecodeError, TypeError) as error:
            raise PolykvError(
                f"{path}:{number}: not a result line ({error}); move the file away to start over"
            ) from None
    return records


def machine() -> str:
    """A name for the machine results come from (its device and processor)."""
    device = torch.cuda.get_device_name().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    return f"{platform.machine()}-{device}"


class _BatchScorer:
    """One batch of samples, prefilled once, scored under any method's cache."""

    def __init__(self, model, tokenizer, batch: Sequence[Sample], needs: Needs, *, answers: bool = True):
        self.model, self.tokenizer, self.batch, self.answers = model, tokenizer, batch, answers
        device = next(model.parameters()).device
        width = max(s.length for s in batch)
        self.ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
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
            cache = plan.cache_from(self.captured)
            stored = sum(cache.layer_lengths()) / len(cache.layers)
            logits = self._teacher_forced(cache)
        answers = self._greedy(plan) if self.answers else [None] * len(self.batch)
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
        cache = self.captured.cache() if plan is None else plan.cache_from(self.captured)
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


def _plans(model, methods: Sequence[Method], budgets: Sequence[int], profile) -> dict[tuple[str, int], Plan]:
    plans = {}
    for chosen in methods:
        for budget in budgets:
            spec = chosen.spec(budget)
            if spec is None:
                continue
            try:
                plans[(chosen.name, budget)] = compile(spec, model, profile=profile)
            except SpecError as error:
                raise PolykvError(f"method {chosen.name} at budget {budget}:\n{error.format()}") from None
    return plans


def _full(methods: Sequence[Method]) -> Method:
    return next((m for m in methods if m.template is None), Method("full", None))


def _needs(plans) -> Needs:
    needs = [plan.needs() for plan in plans]
    return Needs(
        window=max([1, *(n.window for n in needs)]),
        window_attention=True,
        accumulated_attention=any(n.accumulated_attention for n in needs),
    )


def _key(sample: Sample, method: Method, budget: int) -> tuple:
    return (sample.task, sample.format, sample.seed, method.name, budget)


def _batches(samples: Sequence[Sample], size: int) -> Iterator[list[Sample]]:
    groups: dict[tuple[str, str], list[Sample]] = {}
    for sample in samples:
        groups.setdefault((sample.task, sample.format), []).append(sample)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]

"""The evaluation runner: methods x budgets x tasks, one shared prefill per batch, resumable.

A method is a spec with ``{budget}`` where the average budget per layer goes (``*: snapkv@{budget}``,
``budget {budget}; *: auto@auto``), or a short name for a built-in one (``METHODS``). Every method
is compared at the same number of stored tokens over all layers, layers kept whole included.

For each batch of samples of one task and format, the prompt is prefilled once with the full
cache and captured; each method's cache is then built from the capture exactly as its own
prefill would have built it (``Capture.cache_for``), so a method costs only its scoring passes:

- graded: the true target tokens teacher-forced, KL(full || method) and the loss of the target;
- exact: a greedy answer of the target's length (plus 2), checked for the expected strings.

Results go to ``results.jsonl`` in the output folder, one line per sample, method and budget, with
the sample's seed; a second run skips what is there.
"""

from __future__ import annotations

import contextlib
import json
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch
from tqdm import tqdm

from polykv.cache.preparation import prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.errors import PolykvError
from polykv.files import writing
from polykv.harness.processes import ONE, Processes
from polykv.harness.scorer import Record, Scorer, by_group, needs_of
from polykv.language import ast
from polykv.language.check import check
from polykv.language.parse import parse
from polykv.plan import compile
from polykv.tasks.tasks import Sample
from polykv.values import SETTINGS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Single policies applied uniformly: the baselines "best single" is chosen among.
SINGLES = ("streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "observed", "expected", "kvzip")
METHODS = {
    "full": None,
    **{name: f"layers *: {name}@{{budget}}" for name in SINGLES},
    "pyramid": "budget {budget}\nsolver pyramid\nlayers *: pyramidkv@auto",
    "cake": "budget {budget}\nsolver cake\nlayers *: pyramidkv@auto",
    "polykv": "budget {budget}\nlayers *: auto@auto",
    "polykv-budgets": "budget {budget}\nlayers *: pyramidkv@auto",
    "polykv-heads": "budget {budget}\nlayers * heads *: auto@auto",
    "adakv": "layers * heads adaptive: snapkv@{budget}",
}
RESULTS = "results.jsonl"


@attrs.frozen
class Method:
    """A named spec template; ``template`` None is the full cache."""

    name: str
    template: str | None

    def spec(self, budget: int) -> ast.Spec | None:
        """The spec at ``budget``, parsed (SpecError names the method and the budget), or None for the full cache."""
        if self.template is None:
            return None
        return parse(self.template.replace("{budget}", str(budget)), source=f"method {self.name!r} at budget {budget}")

    def check(self, budget: int) -> None:
        """Raise SpecError for what is wrong with the spec at ``budget`` whatever the model (before it loads)."""
        spec = self.spec(budget)
        if spec is not None:
            check(spec)


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


def run(
    model: PreTrainedModel,
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
    settings: Sequence[str] = ("question",),
    processes: Processes = ONE,
) -> list[Record]:
    """Score every method at every budget on ``samples``; results in ``out/results.jsonl`` (resumed).

    ``answers=False`` skips the greedy answers (accuracy), which cost more than the graded scores.
    ``settings`` says where the question is when the cache is compressed (``polykv.harness.scorer``:
    ``question`` inside the prompt, ``context`` asked after it); each setting is scored apart. With
    several ``processes`` (torchrun) each scores a share of the batches, the first writes the file,
    and every one returns the records one process would, in its order (``polykv.harness.processes``).
    """
    unknown = [setting for setting in settings if setting not in SETTINGS]
    if unknown:
        raise PolykvError(f"setting {unknown[0]!r}: settings are {', '.join(SETTINGS)}")
    path = out / RESULTS
    if processes.main:
        with writing(out):
            out.mkdir(parents=True, exist_ok=True)
    done = processes.from_main(lambda: {record.key: record for record in read(path)})  # all agree on what is left
    with writing(path):
        sink = path.open("a", encoding="utf-8") if processes.main else None  # the first process writes the file
    with prepared(model), contextlib.nullcontext() if sink is None else sink:  # give the model back as it was
        plans = {setting: _plans(model, methods, budgets, profile, tokenizer, setting) for setting in settings}
        cells = [(m, b) for m in methods for b in budgets if m.template is not None] + [(_full(methods), 0)]
        batches = [(batch, setting) for setting in settings for batch in by_group(samples, batch_size)]
        todo = sum(
            1 for batch, setting in batches for s in batch for m, b in cells if _key(s, m, b, setting) not in done
        )
        work = [
            (batch, setting, missing)
            for batch, setting in batches
            if (missing := [(m, b) for m, b in cells if any(_key(s, m, b, setting) not in done for s in batch)])
        ]
        needs = needs_of([plan for chosen in plans.values() for plan in chosen.values()])
        reconstruction = Reconstruction.for_tokenizer(tokenizer) if needs.reconstruction else None
        shown = progress and processes.main

        def score(batch: list[Sample], setting: str, missing: list) -> list[Record]:
            """One batch's records for its ``missing`` cells: one prefill, then every method's cache scored."""
            scorer = Scorer(
                model,
                batch,
                needs,
                pad_token_id=tokenizer.pad_token_id,
                tokenizer=tokenizer if answers else None,
                setting=setting,
                reconstruction=reconstruction,
            )
            return [
                record
                for chosen, budget in missing
                for record in scorer.records(chosen.name, budget, plans[setting].get((chosen.name, budget)))
            ]

        with tqdm(total=todo, desc="evaluating", unit="score", disable=not shown) as bar:
            # A round: every process scores one batch; the round's records are kept (and written) in batch order.
            for index in processes.rounds(len(work)):
                scored = [] if index is None else score(*work[index])
                for record in (record for part in processes.gather(scored) for record in part):
                    if record.key not in done:
                        done[record.key] = record
                        if sink is not None:
                            with writing(path):
                                sink.write(json.dumps(attrs.asdict(record)) + "\n")
                        bar.update(1)
                if sink is not None:
                    with writing(path):
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


def _plans(model, methods: Sequence[Method], budgets: Sequence[int], profile, tokenizer, setting: str) -> dict:
    plans = {}
    for chosen in methods:
        for budget in budgets:
            spec = chosen.spec(budget)
            if spec is None:
                continue
            plans[(chosen.name, budget)] = compile(spec, model, profile=profile, tokenizer=tokenizer, setting=setting)
    return plans


def _full(methods: Sequence[Method]) -> Method:
    return next((m for m in methods if m.template is None), Method("full", None))


def _key(sample: Sample, method: Method, budget: int, setting: str) -> tuple:
    return (sample.task, sample.format, sample.seed, method.name, budget, setting)

"""What calibration measures on: generated tasks by default, or the user's own text.

The calibration set mixes retrieval (passkey, multi-key, span copy) with natural-text
continuation, generated offline from a seed and from the calibration half of the text
(``polykv.tasks.text``), so a profile never sees the evaluation's prompts. Or bring your own with
``--data``: JSON lines ``{"task": ..., "context": ..., "continuation": ...}`` (texts; the
continuation is scored, teacher-forced). Either way a sample is a ``polykv.tasks.Sample``, as
evaluation's are, and its table is kept under its group, ``task:format``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from polykv.errors import PolykvError
from polykv.tasks.loader import json_objects
from polykv.tasks.tasks import Sample, make

#: The default calibration: tasks (with their formats), samples of each, prompt tokens, policies, budgets.
TASKS = (
    ("passkey", "raw"), ("passkey", "chat"), ("niah", "raw"), ("multikey", "raw"), ("multikey", "chat"),
    ("copy", "raw"), ("continue", "raw"),
)  # fmt: skip
SAMPLES, LENGTH = 4, 1024
POLICIES = ("pyramidkv", "tova", "h2o", "streaming", "observed", "kvzip")
GRID = (8, 16, 32, 64, 128, 256, 512)
#: Continuation tokens scored per sample: enough to see a layer's effect, few enough to keep passes cheap.
SCORED = 16
#: Held-out samples per task for tuning (drawn with other seeds than the measured ones).
TUNE_SAMPLES = 2


def calibration_samples(
    tokenizer, *, count: int = SAMPLES, length: int = LENGTH, seed: int = 0, tasks: Sequence[tuple[str, str]] = TASKS
) -> list[Sample]:
    """The calibration set: ``count`` samples of each of ``tasks`` ((task, format) pairs; by default the
    retrieval and continuation mix), from the calibration text."""
    return [
        attrs.evolve(sample, target=sample.target[:SCORED])
        for task, form in tasks
        for sample in (
            make(task, tokenizer, length=length, seed=seed + n, split="calibration", format=form) for n in range(count)
        )
    ]


def tuning_samples(
    tokenizer,
    *,
    count: int = TUNE_SAMPLES,
    length: int = LENGTH,
    seed: int = 0,
    tasks: Sequence[tuple[str, str]] = TASKS,
) -> list[Sample]:
    """Held-out prompts for tuning the solver: the calibration tasks with seeds the measurement never uses."""
    return [
        make(task, tokenizer, length=length, seed=seed + 10_000 + n, split="calibration", format=form)
        for task, form in tasks
        for n in range(count)
    ]


#: What a line of ``--data`` holds.
FIELDS = ("task", "context", "continuation")
WORDS = "`task`, `context` and `continuation` texts"


def read_samples(path: Path, tokenizer) -> list[Sample]:
    """Calibration samples from JSON lines with ``task``, ``context`` and ``continuation`` texts."""
    found = []
    for number, record in json_objects(path):
        missing = [key for key in FIELDS if key not in record]
        if missing:
            raise PolykvError(
                f"{path}:{number}: missing {', '.join(f'`{key}`' for key in missing)}; a line has {WORDS}"
            )
        wrong = [key for key in FIELDS if not isinstance(record[key], str)]
        if wrong:
            raise PolykvError(
                f"{path}:{number}: {', '.join(f'`{key}`' for key in wrong)} must be text; a line has {WORDS}"
            )
        task, context, continuation = (record[key] for key in FIELDS)
        ids = tokenizer(context, return_tensors="pt").input_ids[0]
        scored = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(scored) < 2:
            raise PolykvError(f"{path}:{number}: the continuation needs at least 2 tokens, it has {len(scored)}")
        found.append(Sample(str(task), "raw", number, "local", ids.tolist(), scored.tolist(), ()))
    if not found:
        raise PolykvError(f"{path}: no calibration samples")
    return found

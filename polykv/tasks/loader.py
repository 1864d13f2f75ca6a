"""Evaluation samples from JSON lines users have locally, in LongBench's or RULER's style.

One JSON object per line. Fields read:

- ``context`` (text, required): the long document;
- ``input`` (text, optional): the question, placed after the context;
- ``answers`` (list of texts, or ``outputs`` as RULER names it; required): a greedy answer is
  correct for the share of them it contains; the first is also the scored target;
- ``_id`` or ``index`` (optional): kept as the sample's seed when it is a number, else the line
  number is;
- ``task`` (optional, default the file's name): groups samples in the report.

The prompt is ``context``, a blank line, then ``input``; the model's chat template is applied with
``format="chat"``. Prompts longer than ``max_length`` tokens keep their first and last halves, as
LongBench truncates.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from polykv.errors import PolykvError
from polykv.files import read_text
from polykv.limits import MAX_DATA_BYTES
from polykv.tasks.tasks import Sample, need_chat_template


def read_jsonl(path: str | Path, tokenizer, *, format: str = "raw", max_length: int | None = None) -> list[Sample]:
    """The samples in ``path``; a malformed line is an error naming the file and line."""
    path = Path(path)
    samples: list[Sample] = []
    lines_of: dict[tuple[str, int], int] = {}
    for number, record in json_objects(path):
        sample = _sample(record, path, number, tokenizer, format, max_length)
        earlier = lines_of.setdefault((sample.task, sample.seed), number)
        if earlier != number:  # results are keyed by task and identifier: one would be taken for the other
            raise PolykvError(
                f"{path}:{number}: task {sample.task!r} already has a sample {sample.seed} (line {earlier}); "
                "give each sample of a task its own `_id` or `index`"
            )
        samples.append(sample)
    if not samples:
        raise PolykvError(f"{path}: no samples")
    return samples


def json_objects(path: Path) -> Iterator[tuple[int, dict]]:
    """Each non-blank line of the data file ``path`` with its number, as a JSON object; a line that is none is an
    error naming the file, line and (for bad JSON) column."""
    lines = read_text(path, limit=MAX_DATA_BYTES, what="data file").splitlines()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise PolykvError(f"{path}:{number}:{error.colno}: not JSON: {error.msg}") from None
        except ValueError as error:  # a number past Python's int-to-string limit
            raise PolykvError(f"{path}:{number}: not JSON polykv reads: {error}") from None
        if not isinstance(record, dict):
            raise PolykvError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def _sample(record: dict, path: Path, number: int, tokenizer, format: str, max_length: int | None) -> Sample:
    where = f"{path}:{number}"
    context = record.get("context")
    answers = record.get("answers", record.get("outputs"))
    if not isinstance(context, str):
        raise PolykvError(f"{where}: `context` must be a text")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise PolykvError(f"{where}: `answers` (or `outputs`) must be a list of non-empty texts")
    question = record.get("input") or ""
    if not isinstance(question, str):
        raise PolykvError(f"{where}: `input` must be a text")
    text = f"{context}\n\n{question}".strip()
    if format == "chat":
        need_chat_template(tokenizer)
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
    prompt = _halves(tokenizer(text, add_special_tokens=format != "chat")["input_ids"], max_length)
    cut = text.rfind("\n\n" + question) if question else len(text)  # the question, asked later in that setting
    asked = tokenizer(text[cut:], add_special_tokens=False)["input_ids"] if question else []
    before = tokenizer(text[:cut], add_special_tokens=format != "chat")["input_ids"]
    context = _halves(before, None if max_length is None else max(1, max_length - len(asked)))
    identifier = record.get("_id", record.get("index"))
    seed = identifier if isinstance(identifier, int) else number
    target = tokenizer(" " + answers[0].strip(), add_special_tokens=False)["input_ids"]
    if len(target) < 2:
        raise PolykvError(
            f"{where}: the answer {answers[0].strip()!r} is {len(target)} token; an answer is scored from its second "
            "token on (the full prefill predicts the first, the same for every method), so it needs at least 2: "
            "put a longer answer first in `answers`"
        )
    task = str(record.get("task") or path.stem)
    expected = tuple(a.strip() for a in answers)
    return Sample(task, format, seed, "local", prompt, target, expected, context=context, question=asked)


def _halves(ids: list[int], most: int | None) -> list[int]:
    """``ids``, or their first and last halves when longer than ``most`` (as LongBench truncates)."""
    if most is None or len(ids) <= most:
        return ids
    half = most // 2
    return ids[:half] + ids[len(ids) - (most - half) :]

"""Long-context tasks generated offline from a seed: retrieval in RULER's style, copying, continuation.

Every sample is a prompt (context, question and the answer's lead-in, as token ids), the target
tokens that follow it (the true answer or the true continuation, scored teacher-forced), and the
strings a correct greedy answer contains. Haystacks are real prose (``text``), drawn from the split
asked for, so calibration and evaluation samples never share text; seeds never collide either
(each split draws from its own stream).

Tasks (after RULER, Hsieh et al. 2024, arXiv 2404.06654, and the passkey test of Mohtashami and
Jaggi 2023):

- ``passkey``: one pass key in the prose; the prompt ends "The pass key is".
- ``niah``: one "special magic number" for a key word, asked back.
- ``multikey``: four such needles with different key words; one is asked.
- ``multivalue``: three numbers for one key word; all are asked.
- ``vartrack``: a chain of variable assignments (and a distractor chain) in the prose; the
  variables that end up holding a value are asked.
- ``copy``: a paragraph of the context is to be repeated from its first words (graded only).
- ``continue``: the true continuation of a document (graded only).

``passkey_prompt`` is the classic form of the passkey test, a needle in repeated filler sentences,
as text: the README's example prompt and the real-model tests use it.

Formats: ``raw`` (the prompt as text, ending with the answer's lead-in) and ``chat`` (the
question in the model's chat template, the lead-in opening the assistant's turn).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence

import attrs

from polykv.converters import ints, strings
from polykv.errors import ArgumentError
from polykv.tasks.text import SPLITS, paragraphs

TASKS = ("passkey", "niah", "multikey", "multivalue", "vartrack", "copy", "continue")
FORMATS = ("raw", "chat")
#: Tokens scored after the prompt for tasks scored by continuation alone.
CONTINUATION = 32


@attrs.frozen
class Sample:
    """One prompt, the tokens that truly follow it, and what a correct answer contains."""

    task: str
    format: str
    seed: int
    split: str
    prompt: tuple[int, ...] = attrs.field(converter=ints, repr=False)
    target: tuple[int, ...] = attrs.field(converter=ints, repr=False)
    expected: tuple[str, ...] = attrs.field(converter=strings)
    depth: float | None = None
    # The prompt cut where the question starts, each part tokenized alone: for asking after the context
    # was compressed (an empty question: the prompt has none, all of it is context).
    context: tuple[int, ...] = attrs.field(default=(), converter=ints, repr=False)
    question: tuple[int, ...] = attrs.field(default=(), converter=ints, repr=False)

    @property
    def length(self) -> int:
        return len(self.prompt)

    def parts(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The context and the question asked after it (the question may be empty)."""
        return (self.context, self.question) if self.context else (self.prompt, ())

    @property
    def group(self) -> str:
        """``task:format``: what calibration measures a loss table for, and evaluation reports by."""
        return f"{self.task}:{self.format}"

    def correct(self, answer: str) -> float:
        """The share of expected strings found in ``answer`` (RULER's score)."""
        if not self.expected:
            raise ValueError(f"a {self.task} sample is scored by its continuation, not by an answer")
        return sum(text in answer for text in self.expected) / len(self.expected)


def make(task: str, tokenizer, *, length: int, seed: int, split: str = "evaluation", format: str = "raw") -> Sample:
    """The sample ``seed`` of ``task`` in ``format``, about ``length`` tokens long, from ``split``'s text."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if format not in FORMATS:
        raise ValueError(f"format is one of {', '.join(FORMATS)}, not {format!r}")
    if split not in SPLITS:
        raise ValueError(f"split is one of {', '.join(SPLITS)}, not {split!r}")
    if task == "continue" and format != "raw":
        raise ValueError("continue is a raw task: it continues a document, with no question to wrap")
    if format == "chat":
        need_chat_template(tokenizer)
    rng = random.Random(f"{split}/{task}/{format}/{seed}")
    builder = _Builder(tokenizer, split, format, rng)
    return _BUILDERS[task](builder, length, (task, format, seed, split))


def need_chat_template(tokenizer) -> None:
    """Refuse a tokenizer whose chat template is missing (None) for the chat format: transformers' own
    error is no hint. A tokenizer without the attribute is left to its ``apply_chat_template``."""
    if hasattr(tokenizer, "chat_template") and not tokenizer.chat_template:
        raise ArgumentError(
            "the chat format (TASK:chat) needs the model's chat template, and its tokenizer has none: "
            "use raw tasks, or a model with a chat template"
        )


def samples(
    tasks: Sequence[str],
    tokenizer,
    *,
    length: int,
    count: int,
    split: str = "evaluation",
    formats: Sequence[str] = ("raw",),
    first_seed: int = 0,
) -> list[Sample]:
    """``count`` samples of every task in every format, seeds ``first_seed``, ``first_seed + 1``, ..."""
    return [
        make(task, tokenizer, length=length, seed=seed, split=split, format=form)
        for task in tasks
        for form in formats
        for seed in range(first_seed, first_seed + count)
    ]


# --- building prompts --------------------------------------------------------------------------------------


class _Builder:
    """Assembles a prompt of a target length from instructions, prose, needles and a question."""

    def __init__(self, tokenizer, split: str, format: str, rng: random.Random):
        self.tokenizer = tokenizer
        self.split = split
        self.format = format
        self.rng = rng

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def words(self, count: int) -> list[str]:
        """Distinct key words (lower-case, 5 to 9 letters) from this split's prose."""
        return self.rng.sample(_vocabulary(self.split), count)

    def number(self, digits: int = 7) -> str:
        return str(self.rng.randrange(10 ** (digits - 1), 10**digits))

    def prompt(
        self, instruction: str, needles: Sequence[tuple[float, str]], question: str, lead_in: str, length: int
    ) -> tuple[list[int], list[int], list[int]]:
        """Prompt ids of about ``length`` tokens, prose with ``needles`` (depth, sentence) inside; and the same
        text cut where the question starts, each part tokenized alone (context, question)."""
        fixed = self._wrap(instruction, "", question, lead_in)
        room = max(0, length - len(self.encode(fixed)) - sum(len(self.encode(n)) + 1 for _, n in needles))
        prose = self._prose(room)
        for depth, needle in sorted(needles, reverse=True):  # from the back, so earlier depths keep their place
            cut = self._sentence_boundary(prose, depth)
            prose = prose[:cut] + " " + needle + " " + prose[cut:]
        text = self._wrap(instruction, prose.strip(), question, lead_in)
        cut = text.rfind("\n\n" + question)
        return self.encode(text), self.encode(text[:cut]), self.encode(text[cut:])

    def _wrap(self, instruction: str, context: str, question: str, lead_in: str) -> str:
        body = f"{instruction}\n\n{context}\n\n{question}".strip() if instruction else f"{context}\n\n{question}"
        if self.format == "raw":
            return f"{body} {lead_in}".rstrip()
        messages = [{"role": "user", "content": body}]
        template = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return template + lead_in

    def _prose(self, tokens: int) -> str:
        """Whole paragraphs of this split's prose, in a seeded order, cut to ``tokens`` tokens."""
        pool = paragraphs(self.split)
        order = list(range(len(pool)))
        self.rng.shuffle(order)
        chosen, count = [], 0
        for index in order:
            if count >= tokens:
                break
            chosen.append(pool[index])
            count += _token_count(self.tokenizer, self.split, index)
        text = " ".join(chosen)
        words = text.split(" ")
        while words and len(self.encode(" ".join(words))) > tokens:  # trim the last paragraph to fit
            words = words[: max(0, len(words) - max(1, (len(self.encode(" ".join(words))) - tokens) // 2))]
        return " ".join(words)

    def _sentence_boundary(self, text: str, depth: float) -> int:
        """The start of the sentence nearest to ``depth`` (0 to 1) of ``text``."""
        if not text:
            return 0
        target = int(depth * len(text))
        starts = [0] + [i + 2 for i in range(len(text) - 1) if text[i] == "." and text[i + 1] == " "]
        return min(starts, key=lambda start: abs(start - target))

    def target(self, answer: str) -> list[int]:
        return self.encode(answer)


@functools.cache
def _vocabulary(split: str) -> list[str]:
    words = {w.strip(".,;:()\"'").lower() for p in paragraphs(split) for w in p.split()}
    return sorted(w for w in words if w.isalpha() and 5 <= len(w) <= 9)


@functools.cache
def _token_counts(tokenizer, split: str) -> tuple[int, ...]:
    return tuple(len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in paragraphs(split))


def _token_count(tokenizer, split: str, index: int) -> int:
    return _token_counts(tokenizer, split)[index]


# --- the tasks ----------------------------------------------------------------------------------------------

#: A sample's first fields: (task, format, seed, split).
_Identity = tuple[str, str, int, str]

_HAYSTACK = "A special piece of information is hidden in the following text. Find it and remember it."


def _passkey(b: _Builder, length: int, identity: _Identity) -> Sample:
    key = b.number(5)
    depth = b.rng.random()
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    question = "What is the pass key?"
    prompt, context, question_ids = b.prompt(_HAYSTACK, [(depth, needle)], question, "The pass key is", length)
    return Sample(*identity, prompt, b.target(f" {key}."), (key,), depth, context=context, question=question_ids)


def _niah(b: _Builder, length: int, identity: _Identity) -> Sample:
    (word,) = b.words(1)
    value = b.number()
    depth = b.rng.random()
    needle = f"One of the special magic numbers for {word} is: {value}."
    question = f"What is the special magic number for {word} mentioned in the provided text?"
    lead_in = f"The special magic number for {word} mentioned in the provided text is"
    prompt, context, question_ids = b.prompt(_HAYSTACK, [(depth, needle)], question, lead_in, length)
    return Sample(*identity, prompt, b.target(f" {value}."), (value,), depth, context=context, question=question_ids)


def _multikey(b: _Builder, length: int, identity: _Identity) -> Sample:
    words = b.words(4)
    values = [b.number() for _ in words]
    depths = sorted(b.rng.random() for _ in words)
    needles = [(d, f"One of the special magic numbers for {w} is: {v}.") for d, w, v in zip(depths, words, values)]
    asked = b.rng.randrange(len(words))
    word, value = words[asked], values[asked]
    question = f"What is the special magic number for {word} mentioned in the provided text?"
    lead_in = f"The special magic number for {word} mentioned in the provided text is"
    prompt, context, question_ids = b.prompt(_HAYSTACK, needles, question, lead_in, length)
    return Sample(
        *identity, prompt, b.target(f" {value}."), (value,), depths[asked], context=context, question=question_ids
    )


def _multivalue(b: _Builder, length: int, identity: _Identity) -> Sample:
    (word,) = b.words(1)
    values = [b.number() for _ in range(3)]
    depths = sorted(b.rng.random() for _ in values)
    needles = [(d, f"One of the special magic numbers for {word} is: {v}.") for d, v in zip(depths, values)]
    question = f"What are all the special magic numbers for {word} mentioned in the provided text?"
    lead_in = f"The special magic numbers for {word} mentioned in the provided text are"
    prompt, context, question_ids = b.prompt(_HAYSTACK, needles, question, lead_in, length)
    return Sample(
        *identity,
        prompt,
        b.target(" " + ", ".join(values) + "."),
        values,
        depths[0],
        context=context,
        question=question_ids,
    )


def _vartrack(b: _Builder, length: int, identity: _Identity) -> Sample:
    names = [word.upper()[:5] for word in b.words(8)]
    value, other = b.number(5), b.number(5)
    chain, distractor = names[:4], names[4:7]
    assignments = [f"VAR {chain[0]} = {value}."] + [f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, 4)]
    assignments += [f"VAR {distractor[0]} = {other}."] + [
        f"VAR {distractor[i]} = VAR {distractor[i - 1]}." for i in range(1, 3)
    ]
    depths = sorted(b.rng.random() for _ in assignments)
    ordered = [assignments[i] for i in (0, 4, 1, 5, 2, 6, 3)]  # each chain in order, interleaved
    needles = list(zip(depths, ordered))
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = f"Find all variables that are assigned the value {value} in the text above."
    lead_in = f"Answer: the variables that are assigned the value {value} are"
    prompt, context, question_ids = b.prompt(instruction, needles, question, lead_in, length)
    return Sample(
        *identity,
        prompt,
        b.target(" " + ", ".join(chain) + "."),
        chain,
        depths[0],
        context=context,
        question=question_ids,
    )


def _copy(b: _Builder, length: int, identity: _Identity) -> Sample:
    pool = paragraphs(b.split)
    source = pool[b.rng.randrange(len(pool))]
    words = source.split()
    start, rest = " ".join(words[:6]), " " + " ".join(words[6:])
    depth = b.rng.random()
    question = f'Repeat the paragraph of the text above that begins "{start}", word for word.'
    prompt, context, question_ids = b.prompt(_HAYSTACK, [(depth, source)], question, start, length)
    return Sample(*identity, prompt, b.target(rest)[:CONTINUATION], (), depth, context=context, question=question_ids)


def _continue(b: _Builder, length: int, identity: _Identity) -> Sample:
    tokens = b.encode(b._prose(length + 2 * CONTINUATION))
    return Sample(*identity, tokens[:length], tokens[length : length + CONTINUATION], ())


_BUILDERS = {
    "passkey": _passkey,
    "niah": _niah,
    "multikey": _multikey,
    "multivalue": _multivalue,
    "vartrack": _vartrack,
    "copy": _copy,
    "continue": _continue,
}


# The classic passkey prompt: repeated filler sentences, as Mohtashami and Jaggi wrote it.
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_INTRODUCTION = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n"
)
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_prompt(filler_repeats: int, depth: float, key: int) -> str:
    """A prompt with ``key`` after ``depth`` (0 to 1) of ``filler_repeats`` filler paragraphs.

    With SmolLM2's tokenizer 40 repeats make a prompt of 1,027 tokens (about 24 per repeat).
    """
    if not 0 <= depth <= 1:
        raise ValueError(f"depth is between 0 and 1, got {depth}")
    before = round(filler_repeats * depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return (
        PASSKEY_INTRODUCTION
        + PASSKEY_FILLER * before
        + needle
        + PASSKEY_FILLER * (filler_repeats - before)
        + PASSKEY_QUESTION
    )

"""Export the evaluation samples ``polykv eval`` scores, as token ids, for a peer library to score the same way.

    python benchmarks/peer_samples.py --count 4 --out benchmarks/results/peer/samples.jsonl

A peer (benchmarks/kvpress_peer.py) runs in its own environment, with its own transformers, and
must not import polykv; so the very token ids polykv evaluates are written down here, with what
scoring needs: ``prompt`` (context, question and the answer's lead-in, tokenized together),
``context`` and ``question`` (the same text cut where the question starts, each tokenized alone:
``Sample.parts()``), the ``target`` ids that truly follow, and the ``expected`` strings a correct
answer contains. The defaults are ``polykv eval``'s (tasks, prompt length, first seed, evaluation
split), so both sides score the same samples.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from polykv.cli.main import EVAL_TASKS
from polykv.tasks.tasks import Sample, samples

RESULTS = Path(__file__).parent / "results" / "peer"
#: What a line of the samples file holds, in this order.
FIELDS = ("task", "format", "seed", "split", "prompt", "context", "question", "target", "expected")


def evaluation_samples(
    tokenizer, tasks: Sequence[str] = EVAL_TASKS, *, count: int, length: int = 1024, first_seed: int = 0
) -> list[Sample]:
    """What ``polykv eval --tasks TASKS --count COUNT --length LENGTH --seed FIRST_SEED`` scores, in its order."""
    chosen = []
    for text in tasks:
        task, _, form = text.partition(":")
        chosen += samples(
            [task], tokenizer, length=length, count=count, formats=(form or "raw",), first_seed=first_seed
        )
    return chosen


def to_line(sample: Sample) -> dict:
    """One sample as plain JSON data; ``context`` and ``question`` are always the split ``parts()`` gives."""
    context, question = sample.parts()
    return {
        "task": sample.task,
        "format": sample.format,
        "seed": sample.seed,
        "split": sample.split,
        "prompt": list(sample.prompt),
        "context": list(context),
        "question": list(question),
        "target": list(sample.target),
        "expected": list(sample.expected),
    }


def write(samples_: Iterable[Sample], path: Path) -> int:
    """Write the samples as JSON lines; returns how many."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(to_line(sample)) for sample in samples_]
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return len(lines)


def read(path: Path) -> list[dict]:
    """The lines of a samples file, as written by ``write``."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=4, help="samples per task (polykv eval --count; default 4)")
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens (polykv eval --length; default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="first sample seed (polykv eval --seed; default 0)")
    parser.add_argument("--tasks", nargs="+", default=list(EVAL_TASKS), help="task or task:chat (polykv eval's)")
    parser.add_argument("--out", type=Path, default=RESULTS / "samples.jsonl", help="the JSON lines file to write")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    from polykv.model import default_model_location

    location = default_model_location()  # the bundled model polykv eval loads; only its tokenizer is needed
    tokenizer = AutoTokenizer.from_pretrained(location.directory, **location.loading_arguments())
    chosen = evaluation_samples(tokenizer, args.tasks, count=args.count, length=args.length, first_seed=args.seed)
    written = write(chosen, args.out)
    print(
        f"{'task':<10} {'format':<6} {'seed':>4} {'prompt':>6} {'context':>7} {'question':>8} {'target':>6}  expected"
    )
    for sample in chosen:
        context, question = sample.parts()
        print(
            f"{sample.task:<10} {sample.format:<6} {sample.seed:>4} {len(sample.prompt):>6} {len(context):>7} "
            f"{len(question):>8} {len(sample.target):>6}  {', '.join(sample.expected)}"
        )
    print(f"wrote {written} samples to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What the bundled model answers with the FULL cache, per task, format and prompt length.

    python benchmarks/task_capability.py [--count 10] [--lengths 512 1024]

An evaluation where the full cache fails measures nothing, so the evaluation keeps only task
configurations that this table shows the model solves. Greedy answers, batches of left-padded
prompts; accuracy is RULER's (share of expected strings in the answer). Writes
benchmarks/results/task_capability_<machine>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import polykv
from polykv.tasks.tasks import FORMATS, make

RESULTS = Path(__file__).parent / "results"
RETRIEVAL = ("passkey", "niah", "multikey", "multivalue", "vartrack")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10, help="samples per task, format and length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--tasks", nargs="+", default=list(RETRIEVAL))
    parser.add_argument("--batch", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model, tokenizer = polykv.load_default_model()
    rows = []
    for task in args.tasks:
        for form in FORMATS:
            for length in args.lengths:
                started = time.perf_counter()
                samples = [make(task, tokenizer, length=length, seed=s, format=form) for s in range(args.count)]
                scores = []
                for start in range(0, len(samples), args.batch):
                    scores += _answers(model, tokenizer, samples[start : start + args.batch])
                row = {
                    "task": task,
                    "format": form,
                    "length": length,
                    "samples": len(samples),
                    "accuracy": sum(scores) / len(scores),
                    "seconds": time.perf_counter() - started,
                }
                rows.append(row)
                print(f"{task:>10} {form:>4} {length:>5}  accuracy {row['accuracy']:.2f}", file=sys.stderr)
    _table(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.machine()}-cpu"
    path = args.out / f"task_capability_{machine}.json"
    path.write_text(
        json.dumps({"machine": machine, "python": platform.python_version(), "rows": rows}, indent=2) + "\n"
    )
    print(f"wrote {path}")


def _answers(model, tokenizer, samples) -> list[float]:
    width = max(s.length for s in samples)
    ids = torch.full((len(samples), width), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    for row, sample in enumerate(samples):
        ids[row, width - sample.length :] = torch.tensor(sample.prompt)
        mask[row, width - sample.length :] = 1
    new = max(len(s.target) for s in samples) + 4
    with torch.no_grad():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return [s.correct(tokenizer.decode(out[row, width:], skip_special_tokens=True)) for row, s in enumerate(samples)]


def _table(rows) -> None:
    lengths = sorted({r["length"] for r in rows})
    print(f"{'task':>10} {'format':>6} " + " ".join(f"{n:>6}" for n in lengths))
    for task in dict.fromkeys(r["task"] for r in rows):
        for form in FORMATS:
            cells = {r["length"]: r["accuracy"] for r in rows if r["task"] == task and r["format"] == form}
            print(f"{task:>10} {form:>6} " + " ".join(f"{cells.get(n, float('nan')):>6.2f}" for n in lengths))


if __name__ == "__main__":
    main()

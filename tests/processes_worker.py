"""Calibrate and evaluate a tiny model, run by tests/test_processes.py as one process or under torchrun.

Every process writes what it returned (``profile-RANK.json``, ``records-RANK.json``); evaluation's
results file is written by the first process only (``eval/results.jsonl``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import attrs
import torch

from polykv.calibration.calibrate import calibrate
from polykv.evaluation.runner import method, run
from polykv.harness.processes import joined
from polykv.tasks.tasks import Sample
from polykv.testing import tiny_model


class Tokens:
    """Just what evaluation asks of a tokenizer: the pad id, and text for answers."""

    pad_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def samples(count: int, seed: int, split: str) -> list[Sample]:
    """Random prompts of 40 to 47 tokens in two tasks, each with 6 target tokens (the first expected)."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for n in range(count):
        prompt = torch.randint(3, 128, (40 + n % 8,), generator=generator).tolist()
        target = torch.randint(3, 128, (6,), generator=generator).tolist()
        found.append(Sample("ab"[n % 2], "raw", seed + n, split, prompt, target, (str(target[0]),)))
    return found


def main(out: Path) -> None:
    with joined("cpu") as (processes, _):
        model = tiny_model("llama", max_position_embeddings=256)
        profile = calibrate(
            model,
            samples(10, 0, "calibration"),
            policies=("tova", "h2o"),
            grid=(8, 16, 32),
            batch_size=2,
            tune_on=samples(6, 100, "calibration"),
            progress=False,
            processes=processes,
        )
        methods = [method("full"), method("tova"), method("polykv")]
        records = run(
            model, Tokens(), samples(6, 200, "evaluation"), methods, [16], out / "eval", profile=profile,
            batch_size=2, progress=False, processes=processes,
        )  # fmt: skip
        (out / f"profile-{processes.rank}.json").write_text(profile.to_json())
        (out / f"records-{processes.rank}.json").write_text(json.dumps([attrs.asdict(r) for r in records]))


if __name__ == "__main__":
    main(Path(sys.argv[1]))

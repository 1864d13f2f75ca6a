"""Calibration: measure a model's per-layer sensitivity and keep it as a profile (``polykv calibrate``).

The calibration set mixes retrieval (passkey, multi-key, span copy) with natural-text
continuation, generated offline from a seed and from the calibration half of the text
(``polykv.eval.text``), so a profile never sees the evaluation's prompts. Or bring your own with
``--data``: JSON lines ``{"task": ..., "context": ..., "continuation": ...}`` (texts; the
continuation is scored, teacher-forced).
"""

from __future__ import annotations

import json
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from polykv.errors import PolykvError
from polykv.measure import CalibrationSample, measure
from polykv.profile import Profile, fingerprint
from polykv.registry import Registry, default_registry
from polykv.values import Value

#: The default calibration: tasks (with their formats), samples of each, prompt tokens, policies, budgets.
TASKS = (("passkey", "raw"), ("passkey", "chat"), ("multikey", "raw"), ("copy", "raw"), ("continue", "raw"))
SAMPLES, LENGTH = 4, 1024
POLICIES = ("pyramidkv", "tova", "h2o", "streaming")
GRID = (16, 32, 64, 128, 256, 512)
#: Continuation tokens scored per sample: enough to see a layer's effect, few enough to keep passes cheap.
SCORED = 16


def calibration_samples(
    tokenizer, *, count: int = SAMPLES, length: int = LENGTH, seed: int = 0
) -> list[CalibrationSample]:
    """The default calibration set: ``count`` samples of each task, from the calibration text."""
    from polykv.eval.tasks import make

    return [
        CalibrationSample(f"{task}:{form}", torch.tensor(s.prompt), torch.tensor(s.target[:SCORED]))
        for task, form in TASKS
        for s in (
            make(task, tokenizer, length=length, seed=seed + n, split="calibration", format=form) for n in range(count)
        )
    ]


def read_samples(path: Path, tokenizer) -> list[CalibrationSample]:
    """Calibration samples from JSON lines with ``task``, ``context`` and ``continuation`` texts."""
    found = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PolykvError(f"{path}: cannot read the calibration data: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task, context, continuation = record["task"], record["context"], record["continuation"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PolykvError(
                f"{path}:{number}: expected a JSON object with task, context and continuation ({error})"
            ) from None
        ids = tokenizer(context, return_tensors="pt").input_ids[0]
        scored = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(scored) < 2:
            raise PolykvError(f"{path}:{number}: the continuation needs at least 2 tokens, it has {len(scored)}")
        found.append(CalibrationSample(str(task), ids, scored))
    if not found:
        raise PolykvError(f"{path}: no calibration samples")
    return found


def calibrate(
    model: torch.nn.Module,
    samples: Sequence[CalibrationSample],
    *,
    policies: Sequence[str] = POLICIES,
    grid: Sequence[int] = GRID,
    registry: Registry | None = None,
    batch_size: int = 4,
    settings: dict | None = None,
    progress: bool = True,
) -> Profile:
    """Measure ``model`` on ``samples`` and return the profile (tables, signals, and where they came from)."""
    from polykv.model import describe_model

    registry = registry or default_registry()
    chosen: dict[str, dict[str, Value]] = {name: dict(registry.create(name).values) for name in policies}
    signals = [entry.cls() for entry in registry.signals()]
    measured = measure(
        model,
        samples,
        policies=chosen,
        grid=grid,
        signals=signals,
        batch_size=batch_size,
        registry=registry,
        progress=progress,
    )
    info, _ = describe_model(model)
    return Profile(
        model=info,
        fingerprint=fingerprint(model),
        settings={
            "prompt_length": measured.prompt_length,
            "continuation_length": measured.continuation_length,
            "samples": dict(measured.samples),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "python": platform.python_version(),
            "torch": torch.__version__,
            **(settings or {}),
        },
        grid=measured.grid,
        policies=chosen,
        losses=measured.losses,
        signals=measured.signals,
        curves=measured.curves,
    )

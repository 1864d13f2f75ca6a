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
TASKS = (
    ("passkey", "raw"), ("passkey", "chat"), ("niah", "raw"), ("multikey", "raw"), ("multikey", "chat"),
    ("copy", "raw"), ("continue", "raw"),
)  # fmt: skip
SAMPLES, LENGTH = 4, 1024
POLICIES = ("pyramidkv", "tova", "h2o", "streaming")
GRID = (8, 16, 32, 64, 128, 256, 512)
#: Continuation tokens scored per sample: enough to see a layer's effect, few enough to keep passes cheap.
SCORED = 16
#: Average budgets (tokens per layer at the calibration prompt length) at which the solver is tuned.
TUNE_BUDGETS = (32, 64, 128, 256)
#: Held-out samples per task for tuning (drawn with other seeds than the measured ones).
TUNE_SAMPLES = 2


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


def tuning_samples(tokenizer, *, count: int = TUNE_SAMPLES, length: int = LENGTH, seed: int = 0) -> list:
    """Held-out prompts for tuning the solver: the calibration tasks with seeds the measurement never uses."""
    from polykv.eval.tasks import make

    return [
        make(task, tokenizer, length=length, seed=seed + 10_000 + n, split="calibration", format=form)
        for task, form in TASKS
        for n in range(count)
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
    tune_on: Sequence = (),
    pad_token_id: int = 0,
    progress: bool = True,
) -> Profile:
    """Measure ``model`` on ``samples`` and return the profile (tables, signals, and where they came from).

    With ``tune_on`` (evaluation samples of the same tasks, held out from ``samples``) the solver is
    also tuned per budget regime (``tune``).
    """
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
    profile = Profile(
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
    if tune_on:
        profile = tune(
            model,
            profile,
            tune_on,
            registry=registry,
            batch_size=batch_size,
            pad_token_id=pad_token_id,
            progress=progress,
        )
    return profile


def tune(
    model: torch.nn.Module,
    profile: Profile,
    samples: Sequence,
    *,
    budgets: Sequence[int] = TUNE_BUDGETS,
    registry: Registry | None = None,
    batch_size: int = 4,
    pad_token_id: int = 0,
    progress: bool = True,
) -> Profile:
    """Choose, for each average budget, the task weights and floor whose solution loses least on ``samples``.

    Single-layer losses add up well for plain continuation, but much worse for retrieval: a needle
    that survives in other layers makes each layer alone look cheap, and compressing them together
    loses it; and how much worse depends on how hard the model is compressed. So at each budget
    every task gets a composition factor, its measured loss under uniform compression over the sum
    its table predicts. The candidates are equal weights and these factors, each with the smallest
    budgets of the grid as a floor, and the one with the least measured loss (task-balanced, on
    ``samples``, which the tables never saw) is kept per budget.
    """
    import attrs
    from tqdm import tqdm

    from polykv.eval.batch import BatchScorer, by_task, needs_of
    from polykv.plan import compile
    from polykv.profile import TunedRegime

    registry = registry or default_registry()
    budgets = [b for b in budgets if b < profile.prompt_length]  # a budget over the prompt compresses nothing
    if not budgets:
        return profile
    baseline = "pyramidkv" if "pyramidkv" in profile.policies else next(iter(profile.policies))
    batches = list(by_task(samples, batch_size))
    losses: dict[tuple, list[float]] = {}

    def score(plans: dict) -> None:
        needs = needs_of(plans.values())
        for batch in tqdm(batches, desc="tuning", unit="batch", disable=not progress, leave=False):
            scorer = BatchScorer(model, batch, needs, pad_token_id=pad_token_id)
            for key, plan in plans.items():
                for record in scorer.score(str(key), 0, plan):
                    losses.setdefault((key, f"{record.task}:{record.format}"), []).append(record.kl)

    def balanced(key) -> float:
        return sum(_mean(losses[(key, task)]) for task in profile.tasks) / len(profile.tasks)

    score({("uniform", b): compile(f"layers *: {baseline}@{b}", model, registry=registry) for b in budgets})
    equal = {task: 1.0 for task in profile.tasks}
    factors = {
        budget: {
            task: max(_mean(losses[(("uniform", budget), task)]), 1e-6)
            / max(_predicted(profile, task, baseline, budget), 1e-6)
            for task in profile.tasks
        }
        for budget in budgets
    }
    candidates = {}
    for budget in budgets:
        for name, chosen in (("equal", equal), ("composition", factors[budget])):
            variant = attrs.evolve(profile, weights=chosen, regimes=())
            plan = compile(f"budget {budget}\nlayers *: auto@auto", model, profile=variant, registry=registry)
            for floor in [b for b in profile.grid[:3] if b <= budget]:
                regimes = [attrs.evolve(regime, floor=floor) for regime in plan.resolver.regimes]
                resolver = attrs.evolve(plan.resolver, regimes=regimes)
                candidates[(name, budget, floor)] = attrs.evolve(plan, resolver=resolver)
    score(candidates)
    tuned = []
    for budget in budgets:
        keys = [key for key in candidates if key[1] == budget]
        measured = {f"{name} weights, floor {floor}": balanced((name, b, floor)) for name, b, floor in keys}
        measured[f"uniform {baseline}"] = balanced(("uniform", budget))
        best = min(keys, key=balanced)
        tuned.append(TunedRegime(budget, equal if best[0] == "equal" else factors[budget], best[2], measured))
    return attrs.evolve(profile, regimes=tuned, settings={**profile.settings, "composition_factors": factors})


def _predicted(profile: Profile, task: str, policy: str, budget: int) -> float:
    """The task's loss the single-layer table predicts for every layer at ``policy`` and ``budget``."""
    from polykv.resolve import interpolate

    column = list(profile.policies).index(policy)
    return sum(interpolate(profile.grid, layer[column], [budget])[0] for layer in profile.losses[task])


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)

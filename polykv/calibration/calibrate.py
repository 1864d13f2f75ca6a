"""Calibration: measure a model's per-layer sensitivity and keep it as a profile (``polykv calibrate``).

``calibrate`` measures the loss tables on the calibration samples (``samples``, ``measure``) and
each policy's prefill cost (``cost``), records where they came from, and tunes the solver on
held-out prompts (``tune``).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from polykv.cache.reconstruction import Reconstruction
from polykv.calibration.cost import prefill_costs
from polykv.calibration.measure import measure
from polykv.calibration.samples import GRID, POLICIES
from polykv.calibration.tune import tune
from polykv.errors import ArgumentError
from polykv.harness.processes import ONE, Processes
from polykv.profile import Profile, fingerprint
from polykv.registry import Registry, default_registry
from polykv.tasks.tasks import Sample
from polykv.values import OBJECTIVES, Value

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def check_policies(policies: Sequence[str], registry: Registry, name: str = "policies") -> None:
    """Refuse what calibration cannot measure: an unknown policy, or one that takes no budget (``full``)."""
    installed = registry.policies.names()
    for policy in policies:
        if policy not in registry.policies:
            raise ArgumentError(f"{name}: unknown policy {policy!r}; installed: {', '.join(installed)}")
        if not registry.policies.get(policy).cls.budgeted:
            raise ArgumentError(
                f"{name}: {policy} keeps every token and takes no budget; calibration measures how policies lose "
                "as their budget shrinks (a layer kept whole is always an option of the solver)"
            )
    if not policies:
        raise ArgumentError(f"{name}: name at least one policy to measure")


def calibrate(
    model: PreTrainedModel,
    samples: Sequence[Sample],
    *,
    policies: Sequence[str] = POLICIES,
    grid: Sequence[int] = GRID,
    registry: Registry | None = None,
    batch_size: int = 4,
    settings: dict | None = None,
    tune_on: Sequence[Sample] = (),
    pad_token_id: int = 0,
    progress: bool = True,
    setting: str = "question",
    tokenizer=None,
    processes: Processes = ONE,
    objective: str = "kl",
    heads: bool = False,
) -> Profile:
    """Measure ``model`` on ``samples`` and return the profile (tables, signals, and where they came from).

    With ``tune_on`` (evaluation samples of the same tasks, held out from ``samples``) the solver is
    also tuned per budget regime (``tune``). ``setting`` says where the question is when the cache
    is compressed (``question`` inside the prompt, or ``context``: asked after it); the profile
    records it, and routing uses a profile of the setting it is asked for; ``objective`` likewise says
    what the tables measure (``kl``, or ``acceptance``: the share of a speculative draft's proposals
    the full cache refuses), and the solver is tuned for it. ``tokenizer`` is needed
    when a policy scores by reconstruction (kvzip). With several ``processes`` (torchrun) each
    measures a share of the prompts, the prefill costs are timed on the first alone, and every
    process returns the profile one process would (``polykv.harness.processes``). ``heads`` also
    measures each KV head on its own (``measure``), for specs that route and budget heads (``heads *``);
    the regimes tuned on whole layers serve the head tables too.
    """
    from polykv.model import describe_model

    registry = default_registry() if registry is None else registry
    check_policies(policies, registry)
    if objective not in OBJECTIVES:
        raise ArgumentError(f"objective is one of {', '.join(OBJECTIVES)}, got {objective!r}")
    chosen: dict[str, dict[str, Value]] = {name: dict(registry.policies.create(name).values) for name in policies}
    signals = [entry.cls() for entry in registry.signals]
    reconstruction = None
    if any(registry.policies.create(name).needs().reconstruction for name in policies):
        if tokenizer is None:
            raise ArgumentError("a policy to measure scores by reconstruction: calibrate(..., tokenizer=tokenizer)")
        reconstruction = Reconstruction.for_tokenizer(tokenizer)
    measured = measure(
        model,
        samples,
        policies=chosen,
        grid=grid,
        signals=signals,
        batch_size=batch_size,
        registry=registry,
        progress=progress,
        setting=setting,
        reconstruction=reconstruction,
        processes=processes,
        objective=objective,
        heads=heads,
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
            "setting": setting,
            "objective": objective,
            **(settings or {}),
        },
        grid=measured.grid,
        policies=chosen,
        losses=measured.losses,
        signals=measured.signals,
        curves=measured.curves,
        head_losses=measured.head_losses,
        costs=processes.from_main(  # timings: one process, undisturbed by the others
            lambda: prefill_costs(model, samples, policies, registry=registry, tokenizer=tokenizer, setting=setting)
        ),
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
            setting=setting,
            tokenizer=tokenizer,
            processes=processes,
        )
    return profile

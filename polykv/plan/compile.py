"""Compiling: a spec checked against a model, every layer's choice resolved, the model prepared.

``compile`` is language -> resolution -> plan: the checker reads the spec against the model's layer
count, resolution decides what the spec leaves open (from a profile), and the plan records every
layer's choice with where the layer lives.
"""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import torch

from polykv.language import ast
from polykv.language.check import PhaseChoice, check
from polykv.language.diagnostics import Diagnostic, SpecError
from polykv.language.parse import load, parse
from polykv.language.printer import print_spec
from polykv.model import LayerPlacement, describe_model
from polykv.plan.plan import LayerPlan, PhasePlan, Plan
from polykv.profile import Profile, ProfileError, as_profile, default_profile
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import fixed_budget, resolver


def compile(
    spec: ast.Spec | str | os.PathLike,
    model: torch.nn.Module,
    *,
    budget: int | str | None = None,
    profile: Profile | str | os.PathLike | None = None,
    context_length: int | None = None,
    registry: Registry | None = None,
) -> Plan:
    """Check ``spec`` against ``model``, resolve every layer's choice, and prepare the model's attention.

    ``spec`` is a Spec, spec text (``"layers 0-1: full; *: snapkv@256"``) or the path of a spec
    file. ``budget`` is the total budget for a spec without a ``budget`` line: tokens per layer on
    average (512), or the text after ``budget`` (``"total 16384"``, ``"10%"``). ``auto`` policies
    and ``@auto`` budgets are decided from ``profile`` (a Profile or the path of one; by default
    the profile shipped for the bundled model, when ``model`` is that model); the plan's layers
    show the decisions for ``context_length`` tokens (default: the profile's prompt length), and
    each cache decides again for its own prompt. The model is prepared as ``plan.apply(model)``
    does. Raises SpecError with every problem found.
    """
    registry = registry or default_registry()
    spec = as_spec(spec)
    if budget is not None:
        spec = with_total_budget(spec, budget)
    info, placement = describe_model(model)
    checked = check(spec, layers=info.layers, layers_from=f"the model ({info.name})", registry=registry)
    layers = [_layer_plan(entry.index, entry.prefill, entry.decode, placement[entry.index]) for entry in checked.layers]
    plan = Plan(print_spec(spec), info, layers)
    if checked.has_auto:
        found = _profile_for(model, profile)
        length = context_length or (found.prompt_length if found else DEFAULT_CONTEXT)
        plan = attrs.evolve(plan, resolver=resolver(checked, found, registry)).resolved(length, registry)
    _check_windows(plan.layers, checked, registry)
    plan.apply(model)
    return plan


#: The prompt length a plan without a profile shows its decisions for.
DEFAULT_CONTEXT = 1024


def _profile_for(model: torch.nn.Module, profile: Profile | str | os.PathLike | None) -> Profile | None:
    """The profile to route and solve with: the one given (checked against the model), or the bundled
    model's when ``model`` is it, or None."""
    if profile is not None:
        found = as_profile(profile)
        found.check_model(model)
        return found
    try:
        found = default_profile()
        found.check_model(model)
    except ProfileError:
        return None
    return found


def _layer_plan(index: int, prefill: PhaseChoice, decode: PhaseChoice | None, placement: LayerPlacement) -> LayerPlan:
    """A layer as the spec says; open choices (auto) stay as written until resolution decides them."""
    return LayerPlan(
        index,
        _phase_plan(prefill),
        _phase_plan(decode) if decode is not None else None,
        placement.device,
        placement.dtype,
        placement.sliding_window,
    )


def _phase_plan(choice: PhaseChoice) -> PhasePlan:
    budget = fixed_budget(choice.budget)
    policy = "full" if choice.policy == ast.AUTO else choice.policy  # decided by resolution
    return PhasePlan(policy, dict(choice.params) if choice.policy != ast.AUTO else {}, budget)


def _check_windows(layers: list[LayerPlan], checked, registry: Registry) -> None:
    """A sliding-window layer never holds more than its window: the policy must work with that."""
    problems = []
    for layer, entry in zip(layers, checked.layers):
        if layer.sliding_window is None:
            continue
        for phase, choice in ((layer.prefill, entry.prefill), (layer.decode, entry.decode)):
            if phase is None:
                continue
            needed = registry.policies.create(phase.policy, dict(phase.params)).min_budget()
            if layer.sliding_window - 1 < needed:
                use = choice.use
                problems.append(
                    Diagnostic(
                        "budget-too-small",
                        f"layer {layer.index} is a sliding-window layer that keeps at most {layer.sliding_window - 1} "
                        f"tokens, fewer than the {needed} {phase.policy} needs",
                        use.span if use is not None else None,
                        hint="lower the policy's window parameter for these layers, or give them another policy",
                    )
                )
    if problems:
        raise SpecError(problems)


def as_spec(spec: ast.Spec | str | os.PathLike, source: str = "<string>") -> ast.Spec:
    """A Spec from a Spec, a ``.pkv`` path, or spec text (named ``source`` in messages)."""
    if isinstance(spec, ast.Spec):
        return spec
    if isinstance(spec, os.PathLike) or spec.endswith(".pkv"):
        return load(Path(spec))
    return parse(spec, source=source)


def with_total_budget(spec: ast.Spec, budget: int | str) -> ast.Spec:
    """``spec`` with a total budget from code: tokens per layer (512) or budget text ("total 16384", "10%")."""
    if spec.budget is not None:
        raise SpecError(
            [
                Diagnostic(
                    "duplicate-setting",
                    "the spec sets its own budget, and budget= sets another",
                    spec.budget.span,
                    hint="drop the budget= argument or the `budget` line",
                )
            ]
        )
    if isinstance(budget, bool) or not isinstance(budget, (int, str)):
        raise TypeError(f"budget= takes tokens per layer (an int) or budget text such as '10%', not {budget!r}")
    declaration = parse(f"budget {budget}", source="budget=").statements
    if len(declaration) != 1 or not isinstance(declaration[0], ast.BudgetDecl):
        raise SpecError(
            [Diagnostic("bad-budget", f"budget={budget!r} is not one budget", hint="for example 512 or '10%'")]
        )
    return spec.with_budget(declaration[0])

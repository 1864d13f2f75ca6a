"""Compiling: a spec checked against a model, every layer's choice resolved, the model prepared.

``compile`` is language -> resolution -> plan: the checker reads the spec against the model (its
layers and their sliding windows), resolution decides what the spec leaves open (from a profile),
and the plan records every layer's choice with where the layer lives.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch

from polykv.arguments import instance, whole_number
from polykv.budget import Budget, Share, Tokens
from polykv.cache.reconstruction import Reconstruction
from polykv.choice import Choice
from polykv.errors import ArgumentError, ArgumentTypeError
from polykv.language import ast
from polykv.language.check import LayerEntry, PhaseChoice, check
from polykv.language.diagnostics import Diagnostic, SpecError
from polykv.language.parse import load, parse
from polykv.language.printer import print_spec
from polykv.model import describe_model
from polykv.plan.plan import HeadPlan, LayerPlan, Plan
from polykv.profile import Profile, ProfileError, as_profile, default_profile
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import Decision, fixed_budget, resolver
from polykv.values import OBJECTIVES, SETTINGS

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The prompt length a plan without a profile shows its decisions for.
DEFAULT_CONTEXT = 1024


def compile(
    spec: ast.Spec | str | os.PathLike,
    model: PreTrainedModel,
    *,
    budget: int | Budget | str | None = None,
    profile: Profile | str | os.PathLike | None = None,
    context_length: int | None = None,
    registry: Registry | None = None,
    tokenizer=None,
    setting: str = "question",
    prefill_limit: float | None = None,
    objective: str = "kl",
) -> Plan:
    """Check ``spec`` against ``model``, resolve every layer's choice, and prepare the model's attention.

    ``spec`` is a Spec, spec text (``"layers 0-1: full; *: snapkv@256"``) or a ``pathlib.Path`` of a
    spec file. ``budget`` is the total budget for a spec without a ``budget`` line: tokens per layer
    on average (``512`` or ``Tokens(512)``), a share of the prompt per layer (``Share(10)``), or the
    words after ``budget`` in the language (``"total 16384"``, ``"10%"``). ``auto`` policies and
    ``@auto`` budgets are decided from ``profile`` (a Profile or the path of one; by default the
    profile shipped for the bundled model, when ``model`` is that model); the plan's layers show
    the decisions for ``context_length`` tokens (default: the profile's prompt length), and each
    cache decides again for its own prompt. ``setting`` says where the question will be when the
    cache is compressed: ``question`` (inside the prompt) or ``context`` (asked after the compressed
    context); routing reads a profile measured for it. ``tokenizer`` (the model's) lets caches ask
    the model to repeat a prompt, which policies that score by reconstruction (kvzip) need.
    ``prefill_limit`` (for a spec without a ``prefill <=`` line) bounds the prefill time routing may
    spend, as a multiple of the full cache's by the profile's measured costs (1.5: at most 1.5x).
    ``objective`` says what routing optimises, and so which profile it reads: ``kl`` (the compressed
    cache's outputs stay close to the full cache's) or ``acceptance`` (a speculative draft whose
    proposals the full cache keeps; see docs/speculation.md). The model is prepared as
    ``plan.apply(model)`` does. Raises SpecError with every problem found.
    """
    registry = default_registry() if registry is None else registry
    instance(registry, Registry, "registry", "a polykv.Registry (or None for the installed plugins)")
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "config")):
        raise ArgumentTypeError(f"model is a transformers model (loaded with polykv.load_model, say), got {model!r}")
    if context_length is not None:
        context_length = whole_number(context_length, "context_length", least=1)
    instance(profile, (Profile, str, os.PathLike, type(None)), "profile", "a Profile, the path of one, or None")
    if setting not in SETTINGS:
        raise ArgumentError(f"setting is one of {', '.join(SETTINGS)}, got {setting!r}")
    if objective not in OBJECTIVES:
        raise ArgumentError(f"objective is one of {', '.join(OBJECTIVES)}, got {objective!r}")
    spec = as_spec(spec)
    if budget is not None:
        spec = with_total_budget(spec, budget)
    if prefill_limit is not None:
        spec = with_prefill_limit(spec, prefill_limit)
    info, placement = describe_model(model)
    windows = [placement[index].sliding_window for index in range(info.layers)]
    checked = check(
        spec,
        layers=info.layers,
        layers_from=f"the model ({info.name})",
        registry=registry,
        windows=windows,
        heads=info.kv_heads,
    )
    assert checked.layers is not None  # checked against the model's layer and KV head counts
    decisions: Sequence[Decision]
    if checked.has_auto:  # resolution decides what is open, shown for one prompt length
        found = _profile_for(model, profile, setting, objective, heads=checked.routes_heads)
        context = context_length or (found.prompt_length if found else DEFAULT_CONTEXT)
        deciding = resolver(checked, found, registry, windows=windows)
        decisions = deciding.decide(context, registry)
    else:
        deciding, context = None, None
        decisions = [Decision(_choice(entry.prefill)) for entry in checked.layers]
    layers = [
        LayerPlan(
            entry.index,
            decision.choice,
            _choice(entry.decode) if entry.decode is not None else None,
            placement[entry.index].device,
            placement[entry.index].dtype,
            placement[entry.index].sliding_window,
            decision.measurements,
            heads=_head_plans(entry, decision),
            adaptive_heads=entry.adaptive_heads,
        )
        for entry, decision in zip(checked.layers, decisions)
    ]
    plan = Plan(print_spec(spec), info, layers, deciding, context)
    if plan.needs(registry).reconstruction:  # a policy scores by letting the model repeat the prompt
        if tokenizer is None:
            raise ArgumentError(
                "a policy of this spec scores by reconstruction (the model repeats the prompt), which needs the "
                "tokenizer to ask it: polykv.compile(spec, model, tokenizer=tokenizer)"
            )
        plan = attrs.evolve(plan, reconstruction=Reconstruction.for_tokenizer(tokenizer))
    plan.apply(model)
    return plan


def _head_plans(entry: LayerEntry, decision: Decision) -> list[HeadPlan]:
    """What each KV head of a layer whose heads choose for themselves does: as written, or as resolution decided."""
    prefills = decision.heads or [_choice(head.prefill) for head in entry.heads]
    return [
        HeadPlan(prefill, None if head.decode is None else _choice(head.decode))
        for head, prefill in zip(entry.heads, prefills)
    ]


def _choice(choice: PhaseChoice) -> Choice:
    """A checked policy use that leaves nothing open, as the plan records it."""
    return Choice(choice.policy, dict(choice.params), fixed_budget(choice.budget))


def _profile_for(
    model: PreTrainedModel, profile: Profile | str | os.PathLike | None, setting: str, objective: str, heads: bool
) -> Profile | None:
    """The profile to route and solve with: the one given (checked against the model, the setting and the
    objective), or the bundled model's for them (one that measured heads, for a spec that routes ``heads``)
    when ``model`` is it, or None."""
    if profile is not None:
        found = as_profile(profile)
        found.check_model(model)
        found.check_setting(setting, objective)
        return found
    try:
        found = default_profile(setting, objective, heads=heads)
        found.check_model(model)
    except ProfileError:
        return None
    return found


def as_spec(spec: ast.Spec | str | os.PathLike, source: str = "<string>") -> ast.Spec:
    """A Spec from a Spec, a path (``pathlib.Path``: a spec file, any suffix), or spec text named ``source``."""
    if isinstance(spec, ast.Spec):
        return spec
    if isinstance(spec, os.PathLike):
        return load(Path(spec))
    if isinstance(spec, bytes):
        raise ArgumentTypeError("spec is text (str), not bytes: decode it first, spec.decode('utf-8')")
    instance(spec, str, "spec", "spec text (a str), a pathlib.Path of a spec file, or a polykv.Spec")
    try:
        return parse(spec, source=source)
    except SpecError as error:
        if "\n" not in spec and len(spec) < 4096 and Path(spec).is_file():
            hint = Diagnostic(
                "text-names-a-file",
                f"this spec text is the name of a file: pass pathlib.Path({spec!r}) to read the file",
            )
            raise SpecError([hint, *error.diagnostics]) from None
        raise


def with_total_budget(
    spec: ast.Spec, budget: int | Budget | str, *, given_as: str = "the budget= argument"
) -> ast.Spec:
    """``spec`` with a total budget from code (see ``compile``), as if it had a ``budget`` line; ``given_as`` names
    where that budget came from, for the error when the spec has its own (the CLI's ``--budget``)."""
    if spec.budget is not None:
        raise SpecError(
            [
                Diagnostic(
                    "duplicate-setting",
                    f"the spec sets its own budget, and {given_as} sets another",
                    spec.budget.span,
                    hint=f"drop {given_as} or the `budget` line",
                )
            ]
        )
    return spec.with_budget(_declaration(budget))


def with_prefill_limit(spec: ast.Spec, factor: float) -> ast.Spec:
    """``spec`` with a prefill limit from code (see ``compile``), as if it had a ``prefill <=`` line."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)):
        raise ArgumentTypeError(
            f"prefill_limit is a number (1.5: at most 1.5x the full cache's prefill), got {factor!r}"
        )
    if spec.prefill_limit is not None:
        raise SpecError(
            [
                Diagnostic(
                    "duplicate-setting",
                    "the spec sets its own prefill limit, and prefill_limit= sets another",
                    spec.prefill_limit.span,
                    hint="drop the prefill_limit= argument or the `prefill <=` line",
                )
            ]
        )
    try:
        value = float(factor)
    except OverflowError:  # an int past float's range
        value = math.inf
    if not math.isfinite(value):
        raise ArgumentError(f"prefill_limit is a finite number, got {str(factor)[:20]}")
    return spec.with_prefill_limit(ast.PrefillLimit(value))


def _declaration(budget: int | Budget | str) -> ast.BudgetDecl:
    if isinstance(budget, Tokens):
        return ast.BudgetDecl(ast.Tokens(budget.count))
    if isinstance(budget, Share):
        return ast.BudgetDecl(ast.Percent(budget.percent))
    if isinstance(budget, int) and not isinstance(budget, bool):
        return ast.BudgetDecl(ast.Tokens(budget))
    if isinstance(budget, str):
        statements = parse(f"budget {budget}", source="budget=").statements
        if len(statements) == 1 and isinstance(statements[0], ast.BudgetDecl):
            return statements[0]
        raise SpecError(
            [Diagnostic("bad-budget", f"budget={budget!r} is not one budget", hint="for example 512 or '10%'")]
        )
    raise ArgumentTypeError(
        f"budget is tokens per layer (an int or polykv.Tokens), a share of the prompt (polykv.Share) "
        f"or budget words such as 'total 16384', got {budget!r}"
    )

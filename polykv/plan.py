"""A plan: a spec resolved against a model, ready to make caches from, and serialisable.

``compile`` checks a spec against a model's layer count, resolves every layer's policy and
budget into plain values, records each layer's device, dtype and sliding window, and prepares the
model's attention. A plan is reusable (one cache per request) and round-trips through JSON, so it
can be computed once and shipped; ``plan.apply(model)`` prepares a model for it (and, used as a
context manager, gives the model back its own attention afterwards).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import attrs
import torch

from polykv.budget import Budget, budget_from_dict, budget_to_dict
from polykv.cache import PhaseRule, PolyCache, PolyLayer
from polykv.cache.attention import prepare_model, restore_model
from polykv.cache.capture import Capture
from polykv.errors import ModelError
from polykv.lang import ast
from polykv.lang.check import PhaseChoice, check
from polykv.lang.diagnostics import Diagnostic, SpecError
from polykv.lang.parse import load, parse
from polykv.lang.printer import format_use, layer_runs, print_spec
from polykv.model import LayerPlacement, ModelInfo, describe_model
from polykv.policy import Needs
from polykv.profile import Profile, ProfileError, as_profile, default_profile
from polykv.registry import Registry, default_registry
from polykv.resolve import Resolver, fixed_budget, resolver
from polykv.values import Value

FORMAT_VERSION = 2


@attrs.frozen
class PhasePlan:
    """A layer's policy for one phase, resolved: its name, every parameter, and its budget (None: all)."""

    policy: str
    params: Mapping[str, Value] = attrs.field(factory=dict)
    budget: Budget | None = None

    def describe(self) -> str:
        """``snapkv@256(window=32, kernel=7, pooling="max")``: what the layer does, as the language writes it."""
        return format_use(self.policy, None if self.budget is None else str(self.budget), self.params)

    def rule(self, registry: Registry) -> PhaseRule:
        entry = registry.get(self.policy)
        return PhaseRule(entry.policy(**self.params), self.budget, entry.distribution)

    def to_dict(self) -> dict:
        return {"policy": self.policy, "params": dict(self.params), "budget": budget_to_dict(self.budget)}

    @classmethod
    def from_dict(cls, data: Mapping) -> PhasePlan:
        return cls(data["policy"], dict(data["params"]), budget_from_dict(data["budget"]))


@attrs.frozen
class LayerPlan:
    """What one layer does, where it lives, what it can see, and the measurements that decided it."""

    index: int
    prefill: PhasePlan
    decode: PhasePlan | None
    device: str
    dtype: str
    sliding_window: int | None = None
    measurements: Mapping[str, float] = attrs.field(factory=dict)

    def describe(self) -> str:
        return self.prefill.describe() + (f" decode {self.decode.describe()}" if self.decode else "")

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict() if self.decode else None,
            "device": self.device,
            "dtype": self.dtype,
            "sliding_window": self.sliding_window,
            "measurements": dict(self.measurements),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerPlan:
        return cls(
            data["index"],
            PhasePlan.from_dict(data["prefill"]),
            PhasePlan.from_dict(data["decode"]) if data.get("decode") else None,
            data["device"],
            data["dtype"],
            data.get("sliding_window"),
            dict(data.get("measurements", {})),
        )


@attrs.frozen
class Plan:
    """Every layer's policy and budget for one model. ``make_cache`` gives a fresh PolyCache.

    A plan that routes or solves (``auto``, ``@auto``) keeps its ``resolver``: ``layers`` shows the
    decisions for ``context_length`` tokens, and each cache is solved again for its own prompt.
    """

    spec: str
    model: ModelInfo
    layers: tuple[LayerPlan, ...] = attrs.field(converter=tuple)
    resolver: Resolver | None = None
    context_length: int | None = None

    def make_cache(self, registry: Registry | None = None, *, prompt_length: int | None = None) -> PolyCache:
        """A new, empty cache for one request (a batch of prompts) with this plan.

        A plan that solves per prompt length solves when the first forward starts; give
        ``prompt_length`` when the prompt comes in chunks, so that it solves for the whole prompt.
        """
        registry = registry or default_registry()
        layers = [
            PolyLayer(
                layer.index,
                layer.prefill.rule(registry),
                layer.decode.rule(registry) if layer.decode else None,
                sliding_window=layer.sliding_window,
            )
            for layer in self.layers
        ]
        if self.resolver is None:
            return PolyCache(layers)
        cache = PolyCache(layers, resolve=lambda length: self.rules_for(length, registry))
        if prompt_length is not None:
            cache.resolve(prompt_length)
        return cache

    def resolved(self, prompt_length: int, registry: Registry | None = None) -> Plan:
        """This plan with every layer decided for a prompt of ``prompt_length`` tokens."""
        if self.resolver is None:
            return self
        decisions = self.resolver.decide(prompt_length, registry or default_registry())
        layers = [
            attrs.evolve(
                layer, prefill=PhasePlan(d.policy, dict(d.params), d.budget), measurements=dict(d.measurements)
            )
            for layer, d in zip(self.layers, decisions)
        ]
        return attrs.evolve(self, layers=layers, context_length=prompt_length)

    def rules_for(self, prompt_length: int, registry: Registry) -> list[tuple[PhaseRule, PhaseRule | None]]:
        """Every layer's rules for a prompt of ``prompt_length`` tokens."""
        resolved = self.resolved(prompt_length, registry)
        return [
            (layer.prefill.rule(registry), layer.decode.rule(registry) if layer.decode else None)
            for layer in resolved.layers
        ]

    def cache_from(self, captured: Capture, registry: Registry | None = None) -> PolyCache:
        """The cache ``make_cache()`` would hold after prefilling the captured prompt, without a prefill.

        ``captured`` must have recorded what this plan's policies need (``capture(..., needs=plan.needs())``).
        """
        registry = registry or default_registry()
        keep, decode = {}, {}
        for layer in self.resolved(captured.seen, registry).layers:
            rule = layer.prefill.rule(registry)
            budget = captured.budget(layer.index, rule)
            if budget is not None:
                keep[layer.index] = captured.select(layer.index, rule.policy, budget).indices
            if layer.decode is not None:
                decode[layer.index] = layer.decode.rule(registry)
        return captured.cache(keep, decode)

    def needs(self, registry: Registry | None = None) -> Needs:
        """What a capture must record for this plan's prefill policies (any routing may choose)."""
        registry = registry or default_registry()
        names = {(layer.prefill.policy, tuple(layer.prefill.params.items())) for layer in self.layers}
        if self.resolver is not None:
            for request in self.resolver.requests:
                for name in request.candidates:
                    params = request.params if request.policy != "auto" else self.resolver.policy_params.get(name, {})
                    names.add((name, tuple(params.items())))
        needs = [registry.create(name, dict(params)).needs() for name, params in names]
        return Needs(
            window=max(n.window for n in needs),
            window_attention=any(n.window_attention for n in needs),
            accumulated_attention=any(n.accumulated_attention for n in needs),
        )

    def apply(self, model: torch.nn.Module) -> Applied:
        """Prepare ``model`` for this plan's caches, after checking the plan was made for its geometry.

        The model is prepared at once; used as ``with plan.apply(model): ...`` it gets its own
        attention implementation back on exit (if this call was the one that changed it).
        """
        info, placement = describe_model(model)
        ours = (self.model.layers, self.model.query_heads, self.model.kv_heads, self.model.head_dim)
        if ours != (info.layers, info.query_heads, info.kv_heads, info.head_dim):
            raise ModelError(
                f"this plan was compiled for {self.model.name} ({self.model.geometry()}), "
                f"but the model is {info.name} ({info.geometry()}): compile the spec against this model"
            )
        windows = [placement[layer.index].sliding_window for layer in self.layers]
        if windows != [layer.sliding_window for layer in self.layers]:
            raise ModelError("this plan's sliding windows differ from the model's: compile the spec against it")
        return Applied(model, prepare_model(model))

    def runs(self) -> list[tuple[list[int], str]]:
        """(layer indices, what they do) for each run of consecutive layers that do the same."""
        return layer_runs([layer.describe() for layer in self.layers])

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "spec": self.spec,
            "model": attrs.asdict(self.model),
            "context_length": self.context_length,
            "layers": [layer.to_dict() for layer in self.layers],
            "resolver": self.resolver.to_dict() if self.resolver else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"plan format {data.get('format')!r} is not {FORMAT_VERSION}, the one this polykv reads")
        return cls(
            data["spec"],
            ModelInfo(**data["model"]),
            [LayerPlan.from_dict(d) for d in data["layers"]],
            Resolver.from_dict(data["resolver"]) if data.get("resolver") else None,
            data.get("context_length"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


class Applied:
    """A model prepared for a plan; as a context manager it restores the model's attention on exit."""

    def __init__(self, model: torch.nn.Module, changed: bool):
        self.model = model
        self.changed = changed

    def __enter__(self) -> torch.nn.Module:
        return self.model

    def __exit__(self, *exc) -> None:
        if self.changed:
            restore_model(self.model)


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
            needed = registry.create(phase.policy, dict(phase.params)).min_budget()
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

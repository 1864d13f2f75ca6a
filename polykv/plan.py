"""A plan: a spec resolved against a model, ready to make caches from, and serialisable.

``compile`` checks a spec against a model's layer count, resolves every layer's policy and
budget, records each layer's geometry, and prepares the model's attention. A plan is reusable
(one cache per request) and round-trips through JSON, so it can be computed once and shipped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import attrs
import torch

from polykv.cache import PhaseRule, PolyCache, PolyLayer, prepare_model
from polykv.lang import ast
from polykv.lang.check import PhaseChoice, check
from polykv.lang.diagnostics import Diagnostic, SpecError
from polykv.lang.parse import load, parse
from polykv.lang.printer import print_spec
from polykv.model import ModelInfo, describe_model
from polykv.registry import Registry, default_registry

FORMAT_VERSION = 1


@attrs.frozen
class LayerPlan:
    """What one layer does, where it lives, and (for routing) what was measured about it."""

    index: int
    prefill: PhaseChoice
    decode: PhaseChoice | None
    device: str
    dtype: str
    signals: Mapping[str, float] = attrs.field(factory=dict)

    def to_dict(self) -> dict:
        return {
            "index": self.index,
            "prefill": self.prefill.to_dict(),
            "decode": self.decode.to_dict() if self.decode else None,
            "device": self.device,
            "dtype": self.dtype,
            "signals": dict(self.signals),
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> LayerPlan:
        return cls(
            data["index"],
            PhaseChoice.from_dict(data["prefill"]),
            PhaseChoice.from_dict(data["decode"]) if data.get("decode") else None,
            data["device"],
            data["dtype"],
            dict(data.get("signals", {})),
        )


@attrs.frozen
class Plan:
    """Every layer's policy and budget for one model. ``make_cache`` gives a fresh PolyCache."""

    spec: str
    model: ModelInfo
    layers: tuple[LayerPlan, ...] = attrs.field(converter=tuple)

    def make_cache(self, registry: Registry | None = None) -> PolyCache:
        registry = registry or default_registry()

        def rule(choice: PhaseChoice | None) -> PhaseRule | None:
            if choice is None:
                return None
            return PhaseRule(registry.create(choice.policy, dict(choice.params)), choice.budget)

        return PolyCache([PolyLayer(layer.index, rule(layer.prefill), rule(layer.decode)) for layer in self.layers])

    def runs(self) -> list[tuple[list[int], str]]:
        """(layer indices, what they do) for each run of consecutive layers that do the same."""
        runs: list[tuple[list[int], str]] = []
        for layer in self.layers:
            text = layer.prefill.describe() + (f" decode {layer.decode.describe()}" if layer.decode else "")
            if runs and runs[-1][1] == text:
                runs[-1][0].append(layer.index)
            else:
                runs.append(([layer.index], text))
        return runs

    def to_dict(self) -> dict:
        return {
            "format": FORMAT_VERSION,
            "spec": self.spec,
            "model": attrs.asdict(self.model),
            "layers": [layer.to_dict() for layer in self.layers],
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> Plan:
        if data.get("format") != FORMAT_VERSION:
            raise ValueError(f"plan format {data.get('format')!r} is not {FORMAT_VERSION}, the one this polykv reads")
        return cls(data["spec"], ModelInfo(**data["model"]), [LayerPlan.from_dict(d) for d in data["layers"]])

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        return cls.from_dict(json.loads(text))


def compile(
    spec: ast.Spec | str | Path,
    model: torch.nn.Module,
    *,
    budget: int | str | None = None,
    registry: Registry | None = None,
) -> Plan:
    """Resolve ``spec`` against ``model`` into a Plan, and prepare the model's attention for it.

    ``spec`` is a Spec, spec text (``"layers 0-1: full; *: snapkv@256"``) or the path of a
    ``.pkv`` file. ``budget`` is the total budget for a spec without a ``budget`` line: tokens per
    layer on average (512), or the text after ``budget`` (``"total 16384"``, ``"10%"``).
    Raises SpecError with every problem found.
    """
    registry = registry or default_registry()
    spec = as_spec(spec)
    if budget is not None:
        spec = with_total_budget(spec, budget)
    info, placement = describe_model(model)
    checked = check(spec, layers=info.layers, layers_from=f"the model ({info.name})", registry=registry)
    _refuse_auto(checked.spec)
    prepare_model(model)
    layers = [
        LayerPlan(entry.index, entry.prefill, entry.decode, *placement[entry.index], signals=entry.signals)
        for entry in checked.layers
    ]
    return Plan(print_spec(spec), info, layers)


def as_spec(spec: ast.Spec | str | Path, source: str = "<string>") -> ast.Spec:
    """A Spec from a Spec, a ``.pkv`` path, or spec text (named ``source`` in messages)."""
    if isinstance(spec, ast.Spec):
        return spec
    if isinstance(spec, Path) or spec.endswith(".pkv"):
        return load(spec)
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


def _refuse_auto(spec: ast.Spec) -> None:
    """Routing and budget solving arrive later; until then `auto` cannot compile."""
    problems = []
    for rule in spec.rules:
        for use in filter(None, (rule.prefill, rule.decode)):
            if use.is_auto:
                problems.append(
                    Diagnostic(
                        "auto-not-available",
                        "this polykv cannot route `auto` layers yet: signal-driven routing is not built",
                        use.name_span or use.span,
                        hint="name a policy, for example snapkv",
                    )
                )
            if isinstance(use.budget, ast.AutoBudget):
                problems.append(
                    Diagnostic(
                        "auto-not-available",
                        "this polykv cannot solve @auto budgets yet: the budget solver is not built",
                        use.budget.span,
                        hint="give a fixed budget such as @256 or @10%",
                    )
                )
    if problems:
        raise SpecError(problems)

"""A plan: a spec resolved against a model, ready to make caches from, and serialisable.

``compile`` checks a spec against a model's layer count, resolves every layer's policy and
budget into plain values, records each layer's device, dtype and sliding window, and prepares the
model's attention. A plan is reusable (one cache per request) and round-trips through JSON, so it
can be computed once and shipped; ``plan.apply(model)`` prepares a model for it (and, used as a
context manager, gives the model back its own attention afterwards).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import attrs
import torch

from polykv.budget import Budget, budget_from_dict, budget_to_dict
from polykv.cache import PhaseRule, PolyCache, PolyLayer
from polykv.cache.attention import prepare_model, restore_model
from polykv.errors import ModelError
from polykv.language.printer import layer_runs
from polykv.model import ModelInfo, describe_model
from polykv.policy import Needs
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import Resolver
from polykv.values import Value, format_use

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
        entry = registry.policies.get(self.policy)
        return PhaseRule(entry.cls(**self.params), self.budget, entry.distribution)

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

    def needs(self, registry: Registry | None = None) -> Needs:
        """What a capture must record for this plan's prefill policies (any routing may choose)."""
        registry = registry or default_registry()
        names = {(layer.prefill.policy, tuple(layer.prefill.params.items())) for layer in self.layers}
        if self.resolver is not None:
            for request in self.resolver.requests:
                for name in request.candidates:
                    params = request.params if request.policy != "auto" else self.resolver.policy_params.get(name, {})
                    names.add((name, tuple(params.items())))
        needs = [registry.policies.create(name, dict(params)).needs() for name, params in names]
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

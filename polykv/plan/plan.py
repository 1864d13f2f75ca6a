"""A plan: a spec resolved against a model, ready to make caches from, and serialisable.

``compile`` checks a spec against a model's layer count, resolves every layer's policy and
budget into plain values, records each layer's device, dtype and sliding window, and prepares the
model's attention. A plan is reusable (one cache per request) and round-trips through JSON, so it
can be computed once and shipped; ``plan.apply(model)`` prepares a model for it (and, used as a
context manager, gives the model back its own attention afterwards).
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
import torch

from polykv import serialization
from polykv.cache import PhaseRule, PolyCache, PolyLayer
from polykv.cache.preparation import Prepared, prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.choice import Choice
from polykv.errors import ArgumentError, ArgumentTypeError, ModelError
from polykv.language.printer import layer_runs
from polykv.model import ModelInfo, describe_model
from polykv.policy import Needs
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import Resolver
from polykv.serialization import FormatError

#: The plan JSON this polykv writes and reads (3: decided choices and requests with ``auto`` budgets).
FORMAT_VERSION = 3


@attrs.frozen
class LayerPlan:
    """What one layer does in each phase, where it lives, what it can see, and the measurements that decided it."""

    index: int
    prefill: Choice
    decode: Choice | None
    device: str
    dtype: str
    sliding_window: int | None = None
    measurements: Mapping[str, float] = attrs.field(factory=dict)

    def describe(self) -> str:
        return self.prefill.describe() + (f" decode {self.decode.describe()}" if self.decode else "")


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
    reconstruction: Reconstruction | None = None  # how to ask the model to repeat a prompt (kvzip)

    def __attrs_post_init__(self) -> None:
        indices = [layer.index for layer in self.layers]
        if indices != list(range(self.model.layers)):
            raise FormatError(
                f"$.layers: a plan has one entry per layer of the model, in order (0 to {self.model.layers - 1}), "
                f"got the layers {indices[:12]}{'...' if len(indices) > 12 else ''}"
            )
        if self.resolver is not None and len(self.resolver.requests) != self.model.layers:
            raise FormatError(
                f"$.resolver.requests: one request per layer ({self.model.layers}), got {len(self.resolver.requests)}"
            )
        if self.context_length is not None and self.context_length < 1:
            raise FormatError(f"$.context_length: a prompt length of at least 1 token, got {self.context_length}")

    def make_cache(
        self, registry: Registry | None = None, *, prompt_length: int | None = None, compress_chunks: bool = False
    ) -> PolyCache:
        """A new, empty cache for one request (a batch of prompts) with this plan.

        ``prompt_length`` says how long the prompt is: forwards outside ``generate`` then make one
        prompt until that many tokens came, and a plan that solves per prompt length solves for it
        (otherwise for the first forward's length). ``compress_chunks`` compresses each chunk of a
        prompt as it comes, so memory stays bounded while a long prompt streams in, instead of once
        when the prompt ends (query-aware policies then score each chunk with its own last queries).
        """
        registry = default_registry() if registry is None else registry
        if not isinstance(registry, Registry):
            raise ArgumentTypeError(f"registry is a polykv.Registry (or None for the default one), got {registry!r}")
        if compress_chunks and self.needs(registry).reconstruction:
            raise ArgumentError(
                "compress_chunks compresses each chunk as it comes, but a policy of this plan scores by letting "
                "the model repeat the whole prompt: make the cache without compress_chunks"
            )
        layers = [
            PolyLayer(
                layer.index,
                PhaseRule.of(layer.prefill, registry),
                PhaseRule.of(layer.decode, registry) if layer.decode else None,
                sliding_window=layer.sliding_window,
                compress_chunks=bool(compress_chunks),
            )
            for layer in self.layers
        ]
        if self.resolver is None:
            return PolyCache(layers, prompt_length=prompt_length, reconstruction=self.reconstruction)
        return PolyCache(
            layers,
            resolve=lambda length: self.rules_for(length, registry),
            prompt_length=prompt_length,
            reconstruction=self.reconstruction,
        )

    def resolved(self, prompt_length: int, registry: Registry | None = None) -> Plan:
        """This plan with every layer decided for a prompt of ``prompt_length`` tokens."""
        if self.resolver is None:
            return self
        decisions = self.resolver.decide(prompt_length, default_registry() if registry is None else registry)
        layers = [
            attrs.evolve(layer, prefill=d.choice, measurements=dict(d.measurements))
            for layer, d in zip(self.layers, decisions)
        ]
        return attrs.evolve(self, layers=layers, context_length=prompt_length)

    def rules_for(self, prompt_length: int, registry: Registry) -> list[tuple[PhaseRule, PhaseRule | None]]:
        """Every layer's rules for a prompt of ``prompt_length`` tokens."""
        resolved = self.resolved(prompt_length, registry)
        return [
            (PhaseRule.of(layer.prefill, registry), PhaseRule.of(layer.decode, registry) if layer.decode else None)
            for layer in resolved.layers
        ]

    def needs(self, registry: Registry | None = None) -> Needs:
        """What a capture must record for this plan's prefill policies (any routing may choose)."""
        registry = default_registry() if registry is None else registry
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
            reconstruction=any(n.reconstruction for n in needs),
        )

    def apply(self, model: torch.nn.Module) -> Prepared:
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
        return prepared(model)

    def runs(self) -> list[tuple[list[int], str]]:
        """(layer indices, what they do) for each run of consecutive layers that do the same."""
        return layer_runs([layer.describe() for layer in self.layers])

    def to_dict(self) -> dict:
        """The plan as a JSON-ready dict (what ``to_json`` writes)."""
        return serialization.document(self, format=FORMAT_VERSION)

    def to_json(self) -> str:
        """The plan as JSON (``Plan.from_json`` reads it back)."""
        return serialization.dumps(self, format=FORMAT_VERSION)

    @classmethod
    def from_json(cls, text: str | bytes, *, source: str = "<plan>") -> Plan:
        """A plan from ``to_json``'s text; FormatError names the field that is wrong."""
        return serialization.loads(text, cls, format=FORMAT_VERSION, what="plan", source=source)

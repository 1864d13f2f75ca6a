"""A plan: a spec resolved against a model, ready to make caches from, and serialisable.

``compile`` checks a spec against a model's layer count, resolves every layer's policy and
budget into plain values, records each layer's device, dtype and sliding window, and prepares the
model's attention. A plan is reusable (one cache per request) and round-trips through JSON, so it
can be computed once and shipped; ``plan.apply(model)`` prepares a model for it (and, used as a
context manager, gives the model back its own attention afterwards).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import attrs

from polykv import serialization
from polykv.cache import PhaseRule, PolyCache, PolyLayer
from polykv.cache.preparation import Prepared, prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.cache.split import HeadGroup, SplitLayer
from polykv.choice import Choice
from polykv.errors import ArgumentError, ArgumentTypeError, ModelError
from polykv.language.printer import layer_ranges, layer_runs
from polykv.model import ModelInfo, describe_model
from polykv.policy import Needs
from polykv.registry import Registry, default_registry
from polykv.resolution.resolve import Resolver
from polykv.serialization import FormatError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The plan JSON this polykv writes and reads (3: decided choices and requests with ``auto`` budgets).
FORMAT_VERSION = 3


@attrs.frozen
class HeadPlan:
    """What one KV head of a layer does in each phase."""

    prefill: Choice
    decode: Choice | None = None

    def describe(self) -> str:
        return self.prefill.describe() + (f" decode {self.decode.describe()}" if self.decode else "")


# Typed converters, as polykv.converters says why.
def _head_plans(items: Iterable[HeadPlan]) -> tuple[HeadPlan, ...]:
    return tuple(items)


def _layer_plans(items: Iterable[LayerPlan]) -> tuple[LayerPlan, ...]:
    return tuple(items)


@attrs.frozen
class LayerPlan:
    """What one layer does in each phase, where it lives, what it can see, and the measurements that decided it.

    ``heads`` has one entry per KV head where the layer's heads do different things (``prefill`` and
    ``decode`` are then its first head's); it is empty when every head does what the layer does.
    """

    index: int
    prefill: Choice
    decode: Choice | None
    device: str
    dtype: str
    sliding_window: int | None = None
    measurements: Mapping[str, float] = attrs.field(factory=dict)
    heads: tuple[HeadPlan, ...] = attrs.field(default=(), converter=_head_plans)
    #: The layer's budget is shared among its KV heads at prefill by its policy's scores (``heads adaptive``).
    adaptive_heads: bool = False

    @property
    def split(self) -> bool:
        """Whether the layer's cache is a SplitLayer: its heads keep different counts."""
        return bool(self.heads) or self.adaptive_heads

    def describe(self) -> str:
        if self.heads:
            return "; ".join(
                f"heads {layer_ranges(heads)}: {what}" for heads, what in layer_runs([h.describe() for h in self.heads])
            )
        return self.prefill.describe() + (f" decode {self.decode.describe()}" if self.decode else "")

    def head_groups(self) -> list[tuple[tuple[int, ...], HeadPlan]]:
        """The KV heads that do the same, with what they do (in order of their first head)."""
        groups: list[tuple[list[int], HeadPlan]] = []
        for head, plan in enumerate(self.heads):
            found = next((group for group in groups if group[1] == plan), None)
            if found is None:
                groups.append(([head], plan))
            else:
                found[0].append(head)
        return [(tuple(heads), plan) for heads, plan in groups]

    def tokens(self, prompt_length: int) -> float:
        """Tokens the layer keeps per row and KV head (the mean over heads), a head kept whole counting the prompt."""
        choices = [h.prefill for h in self.heads] or [self.prefill]
        return sum(min(c.tokens(prompt_length) or prompt_length, prompt_length) for c in choices) / len(choices)


@attrs.frozen
class Plan:
    """Every layer's policy and budget for one model. ``make_cache`` gives a fresh PolyCache.

    A plan that routes or solves (``auto``, ``@auto``) keeps its ``resolver``: ``layers`` shows the
    decisions for ``context_length`` tokens, and each cache is solved again for its own prompt.
    """

    spec: str
    model: ModelInfo
    layers: tuple[LayerPlan, ...] = attrs.field(converter=_layer_plans)
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
        (otherwise for the length ``generate`` or ``cache.prompt(length=...)`` gives, or the first
        forward's when that forward is the whole prompt). ``compress_chunks`` compresses each chunk of a
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
            SplitLayer(
                layer.index,
                head_groups(layer, registry, self.model.kv_heads),
                sliding_window=layer.sliding_window,
                compress_chunks=bool(compress_chunks),
                adaptive=layer.adaptive_heads,
            )
            if layer.split
            else PolyLayer(
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
            attrs.evolve(
                layer,
                prefill=d.choice,
                measurements=dict(d.measurements),
                heads=[attrs.evolve(head, prefill=choice) for head, choice in zip(layer.heads, d.heads)] or layer.heads,
            )
            for layer, d in zip(self.layers, decisions)
        ]
        return attrs.evolve(self, layers=layers, context_length=prompt_length)

    def rules_for(self, prompt_length: int, registry: Registry) -> list[tuple]:
        """Every layer's rules for ``prompt_length`` tokens, as its cache layer's ``set_rules`` takes them."""
        resolved = self.resolved(prompt_length, registry)
        return [
            (head_groups(layer, registry, self.model.kv_heads),)
            if layer.split
            else (PhaseRule.of(layer.prefill, registry), PhaseRule.of(layer.decode, registry) if layer.decode else None)
            for layer in resolved.layers
        ]

    def needs(self, registry: Registry | None = None) -> Needs:
        """What a capture must record for this plan's prefill policies (any routing may choose)."""
        registry = default_registry() if registry is None else registry
        names = {
            (choice.policy, tuple(choice.params.items()))
            for layer in self.layers
            for choice in [layer.prefill, *(head.prefill for head in layer.heads)]
        }
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

    def head_budgets(self, prompt_length: int | None = None) -> list[list[int]]:
        """Tokens each KV head keeps, per layer (a head kept whole counting the prompt), for ``prompt_length``
        tokens (default: the plan's context length)."""
        length = prompt_length or self.context_length
        if length is None:
            raise ArgumentError("head_budgets needs a prompt length: head_budgets(prompt_length=...)")
        layers = self.resolved(length).layers if self.resolver is not None else self.layers
        return [
            [min(choice.tokens(length) or length, length) for choice in _head_choices(layer, self.model.kv_heads)]
            for layer in layers
        ]

    def apply(self, model: PreTrainedModel) -> Prepared:
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


def _head_choices(layer: LayerPlan, kv_heads: int) -> list[Choice]:
    return [head.prefill for head in layer.heads] if layer.heads else [layer.prefill] * kv_heads


def head_groups(layer: LayerPlan, registry: Registry, kv_heads: int) -> list[HeadGroup]:
    """The groups of a layer whose heads do different things, with the rules the cache runs (with adaptive heads,
    every head its own group: the budget each keeps is decided at prefill)."""
    if layer.adaptive_heads:
        prefill = PhaseRule.of(layer.prefill, registry)
        decode = PhaseRule.of(layer.decode, registry) if layer.decode else None
        return [((head,), prefill, decode) for head in range(kv_heads)]
    return [
        (heads, PhaseRule.of(plan.prefill, registry), PhaseRule.of(plan.decode, registry) if plan.decode else None)
        for heads, plan in layer.head_groups()
    ]

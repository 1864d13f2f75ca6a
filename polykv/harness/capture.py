"""One full prefill, captured, so that many compressed caches can be built from it without another prefill.

A policy compresses a layer after the prefill's attention has run on every token, from the layer's
keys and values and a few queries. So one prefill with every layer kept whole can record all of
that for every layer (``capture``), and the cache any plan would have made from the same prompt is
then a matter of choosing indices (``Capture.cache``): calibration measures one compressed layer
at a time this way, and the evaluation shares one prefill across many methods.

Exactness: ``Capture.cache(plan_selections(...))`` holds the same tokens as ``plan.make_cache()``
after an unchunked prefill of the same prompt, because both run the same policy on the same view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, cast

import torch

from polykv.cache.adaptive import share
from polykv.cache.cache import PolyCache
from polykv.cache.inputs import grouped, window_attention
from polykv.cache.layer import Lease, PhaseRule, PolyLayer
from polykv.cache.reconstruction import Reconstruction
from polykv.cache.selection import Selection, choose
from polykv.cache.split import SplitLayer
from polykv.choice import Choice
from polykv.model.describe import cache_argument
from polykv.plan.plan import Plan, head_groups
from polykv.policy import NOTHING_MORE, LayerView, Needs, Policy, ScoringPolicy
from polykv.registry import Registry, default_registry

if TYPE_CHECKING:
    from polykv.signals import LayerObservation, Projection


#: One group of heads of a split layer built from a capture: its KV heads, the indices they keep
#: ((B, len(heads), K), None: all) and their decode rule.
SplitKeep = tuple[tuple[int, ...], torch.Tensor | None, PhaseRule | None]


class Capture:
    """Every layer of one prefilled batch, kept whole, with the queries and attention policies need."""

    def __init__(
        self,
        cache: PolyCache,
        logits: torch.Tensor,
        hidden: Mapping[int, tuple[torch.Tensor, torch.Tensor]] | None = None,
        modules: Mapping[int, torch.nn.Module] | None = None,
    ):
        self._cache = cache
        self.logits = logits  # (B, V) the prefill's last-position logits
        self.layers = cast("list[PolyLayer]", list(cache.layers))  # capture() keeps every layer whole: none is split
        # Per layer: the residual stream entering it and its attention block's output, (B, W, E) each.
        self.hidden = dict(hidden or {})
        self.modules = dict(modules or {})
        self._leases = [0]

    def observation(self, layer: int) -> LayerObservation:
        """What a signal sees of ``layer`` (the capture must have been made with ``hidden=True``)."""
        from polykv.signals import LayerObservation

        if layer not in self.hidden:
            raise ValueError("this capture recorded no hidden states: make it with capture(..., hidden=True)")
        captured = self.layers[layer]
        keys, values = captured.storage.keys, captured.storage.values
        recent, recent_positions = captured.recent_queries, captured.recent_query_positions
        assert keys is not None and values is not None  # the prefill stored every token
        assert recent is not None and recent_positions is not None  # and kept the window's queries
        positions = captured.storage.positions_or_slots()
        window = recent.shape[-2]
        queries = grouped(recent, captured.kv_heads)
        token_mask = captured.token_mask(positions)
        hidden, output = self.hidden[layer]
        return LayerObservation(
            index=layer,
            keys=keys,
            values=values,
            token_mask=token_mask,
            positions=positions,
            queries=queries,
            window_attention=window_attention(
                queries,
                recent_positions[-window:],
                keys,
                positions,
                token_mask,
                captured.scaling,
                captured.visibility,
            ),
            scaling=captured.scaling,
            hidden=hidden,
            attention_output=output,
            # A module's attribute is typed Tensor | Module in torch; an attention module's o_proj has a weight.
            output_projection=cast("Projection", self.modules[layer].o_proj),
        )

    @property
    def seen(self) -> int:
        return self.layers[0].seen

    def view(self, layer: int, policy: Policy, budget: int, heads: tuple[int, ...] | None = None) -> LayerView:
        """What ``policy`` would see compressing ``layer`` (only its KV ``heads``, if given) to ``budget`` tokens
        after this prefill."""
        captured = self.layers[layer]
        positions = captured.storage.positions_or_slots()
        rule = PhaseRule(policy, None)
        view = captured.view(rule, budget, positions, captured.scaling, captured.visibility)
        return view if heads is None else view.of_heads(heads)

    def select(
        self, layer: int, policy: Policy, budget: int, *, heads: tuple[int, ...] | None = None, where: str = ""
    ) -> Selection:
        """The tokens ``policy`` keeps in ``layer`` at ``budget`` (checked as the cache checks them); with ``heads``,
        what it keeps in those KV heads when they form a group of their own (indices (B, len(heads), K))."""
        view = self.view(layer, policy, budget, heads)
        return choose(policy, view, where=where or f"policy {policy!r} on layer {layer} (captured prefill)")

    def budget(self, layer: int, rule: PhaseRule) -> int | None:
        """The tokens ``rule`` keeps in ``layer`` after this prefill (None: it keeps everything there)."""
        return self.layers[layer].budget_for(rule)

    def cache_for(self, plan: Plan, registry: Registry | None = None, dtype: torch.dtype | None = None) -> PolyCache:
        """The cache ``plan.make_cache()`` would hold after prefilling the captured prompt, without a prefill;
        with ``dtype``, holding its keys and values in it (``PolyCache.cast``), for a model run in that dtype.

        The capture must have recorded what the plan's policies need (``capture(..., needs=plan.needs())``).
        """
        registry = default_registry() if registry is None else registry
        keep, decode, split, hidden = {}, {}, {}, {}
        for layer in plan.resolved(self.seen, registry).layers:
            if layer.split:
                groups = head_groups(layer, registry, self.layers[layer.index].kv_heads)
                if layer.adaptive_heads:
                    split[layer.index], hidden[layer.index] = self._adaptive(layer.index, *groups[0][1:])
                else:
                    split[layer.index] = [
                        (heads, self._kept(layer.index, prefill, heads), decode) for heads, prefill, decode in groups
                    ]
                continue
            found = self._kept(layer.index, PhaseRule.of(layer.prefill, registry))
            if found is not None:
                keep[layer.index] = found
            if layer.decode is not None:
                decode[layer.index] = PhaseRule.of(layer.decode, registry)
        cache = self.cache(keep, decode, split=split)
        for index, hides in hidden.items():
            split_layer = cache.layers[index]
            assert isinstance(split_layer, SplitLayer)  # its heads share the budget: split above
            for (_heads, part), hide in zip(split_layer.groups, hides):
                part.hide(hide)
        if dtype is not None:
            cache.cast(dtype)
        return cache

    def _adaptive(
        self, layer: int, rule: PhaseRule, decode: PhaseRule | None
    ) -> tuple[list[SplitKeep], list[torch.Tensor]]:
        """What a layer whose heads share its budget keeps: one group per head, each storing its largest row's
        share, and what each head hides from each row ((B, K) over what it stores; none where the budget covers
        the prompt), as ``SplitLayer`` shares it when the prompt ends."""
        heads = range(self.layers[layer].kv_heads)
        budget = self.budget(layer, rule)
        if budget is None:
            return [((head,), None, decode) for head in heads], []
        assert isinstance(rule.policy, ScoringPolicy)  # adaptive heads share by scores, as the check made sure
        shares = share(rule.policy, [self.view(layer, rule.policy, budget, (head,)) for head in heads], budget)
        kept = [self.select(layer, rule.policy, shares.largest(head), heads=(head,)).indices for head in heads]
        hidden = [shares.hidden(head, indices[:, 0]) for head, indices in zip(heads, kept)]
        return [((head,), indices, decode) for head, indices in zip(heads, kept)], hidden

    def _kept(self, layer: int, rule: PhaseRule, heads: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """The indices ``rule`` keeps in ``layer`` (its KV ``heads``, as a group), or None where it keeps all."""
        budget = self.budget(layer, rule)
        return None if budget is None else self.select(layer, rule.policy, budget, heads=heads).indices

    def cache(
        self,
        keep: Mapping[int, torch.Tensor] | None = None,
        decode: Mapping[int, PhaseRule] | None = None,
        *,
        share_room: bool = False,
        split: Mapping[int, Sequence[SplitKeep]] | None = None,
    ) -> PolyCache:
        """A cache in its decoding phase: every layer whole, except those in ``keep`` (sorted indices (B, H, K)).

        The captured tensors are shared, not copied, and the capture stays usable for the next
        cache: appending allocates new storage, or with ``share_room`` writes into the spare room
        the capture reserved (no copy, for one cache at a time: an older cache that appends after
        a newer one was made raises). ``decode`` gives layers a decode-time rule. ``split`` makes
        layers whose KV heads keep differently (a SplitLayer): per group of heads, the indices its
        heads keep (B, len(heads), K) or None for all, and its decode rule; those heads are copied.
        """
        keep, decode, split = keep or {}, decode or {}, split or {}
        lease = Lease(self._leases) if share_room else None
        layers: list[PolyLayer | SplitLayer] = []
        for captured in self.layers:
            groups = split.get(captured.index)
            if groups is not None:
                layers.append(self._split_layer(captured, groups))
                continue
            rule = decode.get(captured.index)
            layer = PolyLayer(captured.index, captured.prefill, rule, sliding_window=captured.sliding_window)
            layer.adopt(captured, keep.get(captured.index), lease)
            layers.append(layer)
        return PolyCache(layers, holding_prompt=True)

    @staticmethod
    def _split_layer(captured: PolyLayer, groups: Sequence[SplitKeep]) -> SplitLayer:
        rules = [(heads, captured.prefill, rule) for heads, _kept, rule in groups]
        layer = SplitLayer(captured.index, rules, sliding_window=captured.sliding_window)
        for (heads, kept, _rule), part in zip(groups, layer.parts):
            part.adopt(captured, kept, heads=heads)
        return layer


def capture(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    needs: Needs = NOTHING_MORE,
    room: int = 0,
    hidden: bool = False,
    reconstruction: Reconstruction | None = None,
) -> Capture:
    """Prefill ``input_ids`` once with every layer whole, recording what policies with ``needs`` use.

    ``needs.window`` queries are kept per layer (the most any policy to be tried looks at), and
    attention accumulated over every query when ``needs.accumulated_attention``. ``room`` reserves
    space for that many more tokens, which caches made with ``share_room`` append into. ``hidden``
    also records, at the last ``needs.window`` positions, the residual stream entering each layer
    and its attention block's output, which signals read. ``reconstruction`` lets the model repeat
    the prompt after the prefill, for ``needs.reconstruction`` (kvzip). The model must be prepared
    (``polykv.prepare_model``).
    """
    from polykv.model import attention_modules, describe_model

    whole = PhaseRule.of(Choice.whole(), default_registry())
    _info, placement = describe_model(model)
    layers = [
        PolyLayer(index, whole, sliding_window=where.sliding_window, observe=needs)
        for index, where in sorted(placement.items())
    ]
    cache = PolyCache(layers, reconstruction=reconstruction)
    modules = attention_modules(model)
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    recording = _recording_hidden(model, modules, needs.window, recorded) if hidden else contextlib.nullcontext()
    positions = None if attention_mask is None else (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    # One prompt, ended (and repeated, for reconstruction) after the recording of hidden states stops.
    with torch.no_grad(), cache.prompt(), recording:  # positions from the mask, as generate gives padded rows
        output = model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            **cache_argument(model, cache),
            logits_to_keep=1,
        )
    for layer in layers:
        layer.storage.reserve(room)
    return Capture(cache, output.logits[:, -1], recorded, modules)


@contextlib.contextmanager
def _recording_hidden(
    model: torch.nn.Module,
    modules: Mapping[int, torch.nn.Module],
    window: int,
    into: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> Iterator[None]:
    """Record each decoder layer's input and its attention block's output at the last ``window`` positions."""
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    entering: dict[int, torch.Tensor] = {}
    hooks = []
    for index, attention in modules.items():
        layer = parents[id(attention)]

        def before_layer(_module, args, kwargs, index=index):
            hidden = args[0] if args else kwargs["hidden_states"]
            entering[index] = hidden[:, -window:].detach()

        def after_attention(_module, _args, output, index=index):
            block = output[0] if isinstance(output, tuple) else output
            into[index] = (entering.pop(index), block[:, -window:].detach())

        hooks.append(layer.register_forward_pre_hook(before_layer, with_kwargs=True))
        hooks.append(attention.register_forward_hook(after_attention))
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()

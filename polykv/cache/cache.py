"""PolyCache: a transformers ``Cache`` whose layers each keep their own budget of tokens.

A cache's life is a small state machine, and it always knows which state it is in (``state``):

- ``FRESH``: nothing stored. The next forward starts a prompt.
- ``PROMPT``: a prompt is arriving in chunks: inside ``model.generate`` (chunked or not), inside
  ``with cache.prompt(): ...``, or until the length given to ``plan.make_cache(prompt_length=L)``
  is reached. The prompt is compressed when it ends; a chunk's size never decides it.
- ``DECODING``: the prompt is compressed; forwards append (decoding steps, or a question about a
  compressed context), bounded only by a decode policy.

A forward on a fresh cache outside all three is the whole prompt: it is compressed at once (a
prefill with ``model(ids)`` followed by decoding steps needs no call). ``end_prefill`` ends a
prompt; ``rewind(n)`` forgets everything after the first n tokens (``rewind(0)`` makes the cache
fresh again, so that a new prompt is compressed like the first); ``reset`` empties it.

A policy that scores by reconstruction (``Needs.reconstruction``) needs one more thing when the
prompt ends: the model repeats the prompt (see ``reconstruction``). The cache learns its model and
the prompt's token ids from the forwards it serves (a prepared model tells it), so this happens in
``end_prefill``, or right after the forward that was the whole prompt.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers.cache_utils import Cache

from polykv.arguments import whole_number
from polykv.cache.attention import hand_over
from polykv.cache.checks import raise_pending
from polykv.cache.layer import PhaseRule, PolyLayer
from polykv.cache.reconstruction import Reconstruction
from polykv.cache.split import HeadGroup, SplitLayer
from polykv.errors import ArgumentError, ArgumentTypeError, CacheError
from polykv.model.describe import cache_argument
from polykv.policy import Phase

#: What a layer's ``set_rules`` takes: (prefill, decode) for a PolyLayer, (groups,) for a SplitLayer.
LayerRules = tuple[PhaseRule, PhaseRule | None] | tuple[Sequence[HeadGroup]]


class CacheState(enum.Enum):
    """Where a PolyCache is in its life (see the module docstring)."""

    FRESH = "fresh"
    PROMPT = "taking a prompt"
    DECODING = "decoding"


class PolyCache(Cache):
    """A per-layer compressed KV cache for ``model.generate(..., cache=cache)`` (``past_key_values=`` before
    transformers 5.24; ``polykv.cache_argument`` picks the keyword).

    Make one per request with ``plan.make_cache()``; the model must be prepared (``plan.apply``
    or ``polykv.compile``). ``get_seq_length`` counts every token seen, so positions stay those of
    the full cache, while each layer stores only what its policy kept. Its states are described
    in ``polykv.cache.cache``.
    """

    # transformers types Cache.layers as a list of its own layer mixins (list is invariant); a PolyCache's layers
    # are all PolyLayer or SplitLayer, both CacheLayerMixin subclasses.
    layers: list[PolyLayer | SplitLayer]  # type: ignore[assignment]

    def __init__(
        self,
        layers: Sequence[PolyLayer | SplitLayer],
        resolve: Callable[[int], Sequence[LayerRules]] | None = None,
        *,
        prompt_length: int | None = None,
        holding_prompt: bool = False,
        reconstruction: Reconstruction | None = None,
    ):
        """``resolve`` gives every layer's rules for a prompt length (what its ``set_rules`` takes); it is
        called once per prompt, before the first layer of its first forward runs (a plan whose budgets
        depend on the prompt length).
        ``prompt_length`` says how long the prompt will be: the prompt ends when that many tokens came.
        ``holding_prompt`` makes a cache of layers that already hold a compressed prompt (built from a
        capture): it starts in DECODING. ``reconstruction`` says how to ask the model to repeat its
        prompt, for policies that score that way."""
        super().__init__(layers=list(layers))
        self._awaiting: PolyLayer | SplitLayer | None = None  # updated, not yet attended
        self._static = False  # between begin_static and end_static: layers take the traced path (update)
        self._resolve = resolve
        self._resolved = resolve is None
        self._resolved_for_a_chunk: int | None = None  # resolved from a first chunk's length: the prompt's is unknown
        self.state = CacheState.DECODING if holding_prompt else CacheState.FRESH
        if prompt_length is not None:
            prompt_length = whole_number(prompt_length, "prompt_length", least=1)
        self._prompt_length = prompt_length
        self._open_prompt = False  # inside generate's prefill or ``with cache.prompt()``
        self._announced_length: int | None = None  # the open prompt's length, where its opener knows it
        self.reconstruction = reconstruction
        self._model: weakref.ref | None = None  # the model whose forwards this cache serves
        self._prompt_ids: list[tuple[torch.Tensor, torch.Tensor]] = []  # the prompt, for its repeat
        self._scoring = False  # the model is repeating the prompt
        self._finish_after_forward = False  # the forward that is the whole prompt ends it when it returns
        if self._prompt_length is not None and resolve is not None:
            self.resolve(self._prompt_length)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Take a layer's new keys and values; return what its attention reads.

        A layer in static decoding writes its slots in code ``torch.compile`` traces, and its attention finds
        it through the cache, which ``cache_argument`` also names by ``STATIC_CACHE_KEYWORD`` in static decoding
        (``static_attention``): a compiled static step then runs whole layers in one graph
        (``polykv.decoding.compiled``). Every other update is bookkeeping that stays eager, and hands the layer
        to polykv's attention function through a context variable, which torch.compile cannot read."""
        if self._static and layer_idx < len(self.layers):
            self._check_attended()
            layer = self.layers[layer_idx]
            slots = layer.static_decoding.append(key_states, value_states)
            self._awaiting = layer
            return slots
        return self._update_eagerly(key_states, value_states, layer_idx, *args, **kwargs)

    @torch.compiler.disable  # polykv.decoding.compiled: bookkeeping stays eager
    def _update_eagerly(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if layer_idx >= len(self.layers):
            raise CacheError(
                f"the model has a layer {layer_idx}, but this cache was planned for {len(self.layers)} layers; "
                "compile the spec against this model"
            )
        self._check_attended()
        if layer_idx == 0:
            self.check()
            self._start_forward(key_states.shape[-2])
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._awaiting = self.layers[layer_idx]
        hand_over(self, self.layers[layer_idx], keys)
        return keys, values

    def _check_attended(self) -> None:
        """Raise if the layer updated before did not go through polykv's attention function."""
        if self._awaiting is not None:
            waiting, self._awaiting = self._awaiting, None
            raise CacheError(
                f"layer {waiting.index}'s attention did not go through polykv, so it could not fit its mask or "
                "compress: prepare the model first (with plan.apply(model): ..., or polykv.prepare_model(model); "
                "polykv.compile does it); in static decoding, give the forward its cache with "
                "**polykv.cache_argument(model, cache), which names it for polykv's attention too"
            )

    @property
    def in_static_decoding(self) -> bool:
        """Between ``begin_static`` and ``end_static``."""
        return self._static

    # In static decoding the layers attend their slots by stored positions and never read the mask transformers
    # builds. Sizes that do not depend on the tokens seen let transformers skip it (a query as long as its keys
    # needs none), and keep a compiled step from specialising on them: dynamo guards on every int a forward reads,
    # so a count of tokens seen would compile the step anew for every prompt's length.
    def get_query_offset(self, layer_idx: int = 0) -> int:
        return 0 if self._static else super().get_query_offset(layer_idx)

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        return (query_length, 0) if self._static else super().get_mask_sizes(query_length, layer_idx)

    def static_attention(self, index: int) -> PolyLayer | SplitLayer | None:
        """Layer ``index``, taken from the cache, if its update in static decoding awaits polykv's attention in the
        traced path (``update``); else None."""
        layer = self._awaiting
        if layer is None or layer.index != index or not self._static:
            return None
        self._awaiting = None
        return layer

    def _start_forward(self, new: int) -> None:
        """Decide what this forward is to the layers: part of the prompt (its last part?) or decoding."""
        if self._scoring:
            return
        if new == 0:
            raise CacheError("the prompt is empty: a cache needs at least one token to compress")
        if self.state is CacheState.DECODING:
            return
        seen = self.get_seq_length() + new
        if self.state is CacheState.FRESH:
            self.state = CacheState.PROMPT
            if not self._resolved:
                known = self._prompt_length or self._announced_length
                self.resolve(known or new)
                self._resolved_for_a_chunk = None if known or not self._open_prompt else new
        elif self._resolved_for_a_chunk is not None and seen > self._resolved_for_a_chunk:
            raise CacheError(
                f"this plan solves its budgets for the prompt's length (auto or a share of it), and it solved them "
                f"for the first chunk's {self._resolved_for_a_chunk} tokens, not knowing the prompt goes on: give "
                "the prompt's length with cache.prompt(length=...) or plan.make_cache(prompt_length=...)"
            )
        if self._prompt_length is not None and seen > self._prompt_length:
            raise CacheError(
                f"this cache was made for a prompt of {self._prompt_length} tokens (make_cache(prompt_length=...)), "
                f"but its forwards brought {seen}: give the prompt's whole length, or none"
            )
        # A declared length ends the prompt; without one, a forward outside generate or prompt() is all of it.
        closing = seen == self._prompt_length if self._prompt_length is not None else not self._open_prompt
        if closing and self._reconstructs():  # the model must repeat the prompt first, after this forward
            self._finish_after_forward = True
            return
        for layer in self.layers:
            layer.closing = closing
        if closing:
            self.state = CacheState.DECODING  # the layers compress as this forward reaches them

    def _reconstructs(self) -> bool:
        return any(layer.reconstructs for layer in self.layers)

    @torch.compiler.disable  # polykv.decoding.compiled: bookkeeping stays eager
    def before_forward(self, model: torch.nn.Module, input_ids: torch.Tensor | None, attention_mask) -> None:
        """Called by a prepared model before each forward with this cache: remember the model, and the
        prompt's tokens while a prompt comes in (a policy that scores by reconstruction repeats them)."""
        self._model = weakref.ref(model)
        if self._scoring or self.state is CacheState.DECODING or self.reconstruction is None:
            return
        if input_ids is None:
            raise CacheError("a cache that may score by reconstruction needs the prompt's input_ids, not embeddings")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask[:, -input_ids.shape[1] :]
        self._prompt_ids.append((input_ids, mask))

    @torch.compiler.disable  # polykv.decoding.compiled: bookkeeping stays eager
    def after_forward(self) -> None:
        """Called by a prepared model after each forward with this cache."""
        self._check_attended()  # the last layer's attention, which no later update checks
        if self._finish_after_forward:
            self._finish_after_forward = False
            self.end_prefill()

    def _reconstruct(self) -> None:
        """Let the model repeat the prompt, chunk by chunk, while the layers that need it score its tokens."""
        model = self._model() if self._model is not None else None
        if model is None or not self._prompt_ids:
            raise CacheError("a policy scores by reconstruction, but this cache never saw its model run the prompt")
        if self.reconstruction is None:
            raise CacheError(
                "a policy scores by reconstruction, but this cache has no reconstruction request: compile the "
                "spec with its tokenizer (polykv.compile(spec, model, tokenizer=tokenizer))"
            )
        prompt = torch.cat([ids for ids, _ in self._prompt_ids], dim=1)
        mask = torch.cat([mask for _, mask in self._prompt_ids], dim=1)
        self._scoring = True
        try:
            for start, end in self.reconstruction.chunks(prompt.shape[1]):
                for layer in self.layers:
                    layer.begin_scoring(start, end)
                ids, attention, positions = self.reconstruction.inputs(prompt, mask, start, end)
                with torch.no_grad():
                    model(ids, attention_mask=attention, position_ids=positions, logits_to_keep=1,
                          **cache_argument(model, self))  # fmt: skip
                for layer in self.layers:
                    layer.end_scoring()
            for layer in self.layers:
                layer.end_repeat()
        finally:
            self._scoring = False
            self._prompt_ids = []

    def resolve(self, prompt_length: int) -> None:
        """Set every layer's rules for a prompt of ``prompt_length`` tokens (once per prompt, before it starts).

        Called by the first forward of a prompt with its own length, or with the length given to
        ``make_cache(prompt_length=...)``.
        """
        if self._resolve is None:
            return
        prompt_length = whole_number(prompt_length, "prompt_length", least=1)
        if any(layer.is_initialized for layer in self.layers):
            raise CacheError("a cache is resolved for its prompt before the first forward pass, not after")
        for layer, rules in zip(self.layers, self._resolve(prompt_length)):
            layer.set_rules(*rules)
        self._resolved = True

    @contextlib.contextmanager
    def prompt(self, length: int | None = None) -> Iterator[PolyCache]:
        """``with cache.prompt(): model(chunk) ...``: the forwards inside are one prompt, which ends (and is
        compressed) when the block ends. ``model.generate`` wraps its prefill this way. On a cache that
        already decodes (a question about a compressed context), the forwards inside simply append.
        ``length``, the prompt's length in tokens, is what a plan that solves its budgets per prompt length
        (``auto``, a share of the prompt) solves for; such a plan refuses a second chunk without it."""
        if self._open_prompt:
            raise CacheError("a prompt is already open on this cache")
        if length is not None:
            length = whole_number(length, "length", least=1)
        self._open_prompt, self._announced_length = True, length
        try:
            yield self
        finally:
            self._open_prompt, self._announced_length = False, None
        self.end_prefill()

    def attended(self, layer: PolyLayer) -> None:
        """Called by polykv's attention function once ``layer`` has attended."""
        if self._awaiting is layer:
            self._awaiting = None

    def check(self) -> None:
        """Raise the problems that device-side checks found since the last check (see ``checks``)."""
        pending = [found for layer in self.layers for found in layer.problems]
        for layer in self.layers:
            layer.problems = []
        raise_pending(pending)

    def begin_static(self, room: int, slack: int | None = 0, holes: bool = False, per_check: int = 0) -> None:
        """Decode with fixed shapes (``polykv.cache.static``) for up to ``room`` tokens; see ``polykv.decoding``.

        ``slack``: a layer bounded by a decode policy evicts ``slack + 1`` tokens at a time (None: the
        default slack, ``polykv.cache.static.DEFAULT_SLACK``). ``holes``:
        steps may bring tokens that are not real and refuse tokens already taken (``StaticDecoding``);
        bounded layers then evict once per speculative check of ``per_check`` tokens.
        """
        if self.state is not CacheState.DECODING:
            raise CacheError(f"static decoding starts after the prefill, but this cache is {self.state.value}")
        self.check()
        for layer in self.layers:
            layer.begin_static(room, slack, holes, per_check)
        self._static = True

    def compile_static_refusals(self) -> None:
        """Have every layer refuse a check's tokens with a compiled function (``StaticDecoding.compile_refusals``);
        a compiled forward traces a step's writes."""
        for layer in self.layers:
            layer.static_decoding.compile_refusals()

    def static_incoming(self, real: torch.Tensor | None) -> None:
        """Whether each of the coming static steps' tokens (B, n) is real; None: all are."""
        for layer in self.layers:
            layer.static_decoding.incoming = real

    def static_refuse(self, refused: torch.Tensor) -> None:
        """Make holes of the last n tokens every layer took where ``refused`` (B, n) says so."""
        for layer in self.layers:
            layer.static_decoding.refuse(refused)

    def plan_static_step(self) -> tuple:
        """Prepare the coming static step; the layers that evict in it, each with which of its groups of heads
        do (each set of them is its own graph)."""
        return tuple((layer.index, evicts) for layer in self.layers if (evicts := layer.static_decoding.plan_step()))

    def plan_static_check(self) -> tuple:
        """Prepare the coming speculative check; the layers that evict at its end, each with which of its groups
        of heads do (each set is its own graph)."""
        return tuple((layer.index, evicts) for layer in self.layers if (evicts := layer.static_decoding.plan_check()))

    def static_evict_for_check(self) -> None:
        """At the end of a check: the layers planned to evict make room for the next check's tokens."""
        for layer in self.layers:
            layer.static_decoding.evict_for_check()

    def static_stepped(self, tokens: int = 1) -> None:
        """Count a static step that ran, of ``tokens`` tokens."""
        for layer in self.layers:
            layer.static_decoding.stepped(tokens)

    def end_static(self, tokens: int) -> None:
        """Back to ordinary decoding after static steps that brought ``tokens`` tokens: every layer holds its
        tokens by position again."""
        self._static = False
        for layer in self.layers:
            layer.end_static(tokens)

    def end_prefill(self) -> None:
        """End the prompt: compress it, and let later forwards append (to ask several questions about one
        compressed context). Nothing to do on a fresh cache or one that already decodes."""
        if self.state is CacheState.FRESH:
            return
        if self.state is CacheState.PROMPT and self._reconstructs():
            self._reconstruct()
        for layer in self.layers:
            layer.end_prefill()
        self.state = CacheState.DECODING

    def rewind(self, length: int) -> None:
        """Forget everything after the first ``length`` tokens, e.g. an answer, to ask again.

        ``rewind(0)`` makes the cache fresh: the next forward starts a new prompt.
        """
        length = whole_number(length, "length", least=0)
        if length == 0:
            self.reset()
            return
        for layer in self.layers:
            layer.rewind(length)
        if self.state is CacheState.PROMPT:
            self.end_prefill()

    def crop(self, max_length: int) -> None:
        """transformers' crop: ``crop(-n)`` removes the newest n tokens, ``crop(0)`` keeps them all (a sliding
        window that recorded its past since ``activate_past_recording`` drops what it no longer needs).

        The cache is then exactly as it was before those tokens came, where ``is_croppable`` says so
        (assisted decoding checks it); a crop that could not leave the cache consistent is refused
        before anything changes.
        """
        count = whole_number(max_length, "crop's count")
        if count > 0:
            raise ArgumentError(
                f"crop takes the number of newest tokens to remove as a negative count (crop(-3)), as transformers' "
                f"caches do, got {count}: to keep the first {count} tokens, call rewind({count})"
            )
        length = max(0, self.get_seq_length() + count)
        for layer in self.layers:
            problem = layer.crop_problem(length)
            if problem is not None:
                raise CacheError(f"cannot crop the newest {-count} tokens: {problem}")
        if length == 0 and count < 0:
            self.reset()
            return
        for layer in self.layers:
            layer.crop(count)
        if count < 0 and self.state is CacheState.PROMPT:
            self.end_prefill()

    def fork(self) -> PolyCache:
        """A cache in this one's state that shares its stored tokens until either appends (each then copies
        its buffers once): transformers' prefix recipe, prefill a shared prefix once and give every request
        its own cache, without copying the prefix per request. ``copy.deepcopy`` copies everything now."""
        if self._open_prompt:
            raise CacheError("a prompt is open on this cache (inside cache.prompt()): fork it after the block")
        twin = copy.copy(self)
        twin.layers = [layer.fork() for layer in self.layers]
        twin._prompt_ids = list(self._prompt_ids)
        return twin

    def cast(self, dtype: torch.dtype) -> None:
        """Store every layer's keys and values in ``dtype`` from now on (a copy of what each holds now): for a
        model run in ``dtype`` after a prefill in another, as a speculative draft in a lower precision is."""
        if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ArgumentTypeError(f"a cache holds keys and values of a floating dtype, got {dtype!r}")
        for layer in self.layers:
            layer.cast(dtype)

    def prefetch(self, layer_idx: int, only_non_sliding: bool = True) -> None:
        """transformers' prefetch: bring back the first offloaded layer from ``layer_idx`` on (circling back to the
        first layer), skipping sliding-window layers if ``only_non_sliding``."""
        count = len(self.layers)
        for index in [(layer_idx + step) % count for step in range(count)]:
            layer = self.layers[index]
            if layer.offloaded and not (only_non_sliding and layer.is_sliding):
                layer.prefetch()
                return

    def reset(self) -> None:
        self._awaiting = None
        self._prompt_ids, self._finish_after_forward = [], False
        self._resolved, self._resolved_for_a_chunk = self._resolve is None, None
        self._open_prompt = False
        self.state = CacheState.FRESH
        super().reset()

    def layer_lengths(self) -> list[int | float]:
        """Tokens stored per row and KV head in each layer (the mean over its KV heads where they differ)."""
        self._check_lengths()
        return [
            layer.storage.size
            if isinstance(layer, PolyLayer)
            else layer.head_lengths().float().mean().item()
            if layer.is_initialized
            else 0
            for layer in self.layers
        ]

    def head_lengths(self) -> list[torch.Tensor]:
        """Tokens stored in each layer per batch row and KV head: one (B, H) tensor per layer (rows of a
        layer keep equal counts; heads differ where a spec gives them different budgets)."""
        self._check_lengths()
        if not all(layer.is_initialized for layer in self.layers):
            raise CacheError("the lengths of a cache's heads are known once a prompt went through every layer")
        return [
            torch.full((layer.batch_size, layer.kv_heads), layer.storage.size, dtype=torch.long)
            if isinstance(layer, PolyLayer)
            else layer.head_lengths()
            for layer in self.layers
        ]

    def _check_lengths(self) -> None:
        if any(layer.static for layer in self.layers):
            raise CacheError("the lengths of a cache in static decoding are known after end_static")
        self.check()

    def nbytes(self) -> int:
        """Bytes the cache holds: keys, values, positions of evicted layers, and headroom for appending."""
        return sum(
            layer.static.nbytes() if layer.static else layer.nbytes() if isinstance(layer, SplitLayer)
            else layer.storage.nbytes()
            for layer in self.layers
        )  # fmt: skip

    def full_nbytes(self) -> int:
        """Bytes transformers' own cache would hold for the same tokens (a sliding layer keeps its window)."""
        total = 0
        for layer in self.layers:
            if layer.is_initialized:
                tokens = layer.seen if layer.sliding_window is None else min(layer.seen, layer.sliding_window - 1)
                total += 2 * layer.batch_size * layer.kv_heads * tokens * layer.head_dim * layer.dtype.itemsize
        return total


__all__ = ["CacheState", "Phase", "PolyCache"]

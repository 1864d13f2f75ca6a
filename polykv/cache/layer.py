"""One layer of a PolyCache: its own policy and budget per phase, and only the tokens it keeps.

The layer keeps two lengths apart, as transformers' sliding-window layer does: ``seen`` (tokens
that went through the layer, which gives new tokens their positions) and the stored tokens (what
memory holds, see ``Storage``).

A forward pass goes: ``update`` appends the new keys and values; polykv's attention function then
attends with a mask fitted to this layer (``attention_mask``) and calls ``after_attention``, which
drops what the model can no longer see (sliding-window layers) and, when the layer holds more than
its budget, runs the policy with the queries at hand and keeps the chosen tokens.

Phases: the cache says which forwards carry the prompt (see ``PolyCache``); the layer never
guesses from a chunk's size. A prompt is compressed when it ends (``closing`` marks its last
forward, or ``end_prefill`` is called), with the queries and attention it kept along the way, so
a prompt that came in chunks keeps what it would keep whole. With ``compress_chunks`` the layer
is compressed after every chunk instead, so memory stays bounded while a long prompt streams in.
After the prompt, new tokens are appended, and a decode policy, if the layer has one, bounds the
layer.
"""

from __future__ import annotations

import copy

import attrs
import torch
from transformers.cache_utils import CacheLayerMixin

from polykv.budget import Budget
from polykv.cache import inputs
from polykv.cache.checks import RIGHT_PADDING, raise_for
from polykv.cache.inputs import Visibility
from polykv.cache.kernels import column_sums
from polykv.cache.reconstruction import Scoring
from polykv.cache.selection import Selection, choose
from polykv.cache.static import StaticDecoding
from polykv.cache.storage import Storage
from polykv.choice import Choice
from polykv.errors import ArgumentError, CacheError
from polykv.parameters import ParameterError
from polykv.policy import NOTHING_MORE, LayerView, Needs, Phase, Policy
from polykv.registry import Registry
from polykv.values import format_use

#: The layer's tensors, besides its storage, that have a batch dimension.
_ROW_TENSORS = ("real", "hidden", "recent_queries", "accumulated")


@attrs.frozen
class PhaseRule:
    """A choice as the layer runs it: the policy made from it, its budget (None: keep everything), and
    ``provider``, the distribution the policy comes from (for error messages)."""

    policy: Policy
    budget: Budget | None
    provider: str = ""

    @classmethod
    def of(cls, choice: Choice, registry: Registry) -> PhaseRule:
        """The rule that runs ``choice``, its policy made by ``registry``."""
        if choice.policy not in registry.policies:
            installed = ", ".join(registry.policies.names()) or "none"
            raise ArgumentError(
                f"the registry has no policy {choice.policy!r}, which the plan's {choice.describe()} uses "
                f"(installed: {installed})"
            )
        entry = registry.policies.get(choice.policy)
        try:
            policy = entry.cls(**choice.params)
        except ParameterError as error:
            raise ArgumentError(f"the plan's {choice.describe()}: {error}") from None
        return cls(policy, choice.budget, entry.distribution)

    def tokens(self, prompt_length: int) -> int | None:
        """The budget in tokens for a prompt of ``prompt_length`` (None: no limit)."""
        if self.budget is None or not self.policy.budgeted:
            return None
        return self.budget.tokens(prompt_length)

    def describe(self) -> str:
        budget = None if self.budget is None else str(self.budget)
        return format_use(self.policy.name, budget, self.policy.values)


class Lease:
    """The right to append into a capture's spare room; issuing a new lease ends the previous one."""

    def __init__(self, owner: list[int]):
        self._owner = owner
        owner[0] += 1
        self._number = owner[0]

    def held(self) -> bool:
        return self._owner[0] == self._number


class PolyLayer(CacheLayerMixin):
    """A cache layer that keeps at most its budget of tokens, chosen by its own policy."""

    is_compileable = False

    def __init__(
        self,
        index: int,
        prefill: PhaseRule,
        decode: PhaseRule | None = None,
        *,
        sliding_window: int | None = None,
        observe: Needs = NOTHING_MORE,
        compress_chunks: bool = False,
    ):
        """``observe`` asks the layer to keep more queries and attention than its own policies need
        (a capture records what other policies would need, see ``polykv.harness.capture``).
        ``compress_chunks`` compresses every chunk of a prompt as it comes (see the module docstring)."""
        super().__init__()
        self.index = index
        self.compress_chunks = compress_chunks
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self._observe = observe
        # Keep what the sliding window drops until the next crop, so that a crop rolls back exactly.
        self.record_past = False
        self.set_rules(prefill, decode)
        self._clear()

    def set_rules(self, prefill: PhaseRule, decode: PhaseRule | None) -> None:
        """Give the layer its policies (a plan that solves per prompt length does it before the first forward)."""
        self.prefill, self.decode = prefill, decode
        needs = [rule.policy.needs() for rule in (prefill, decode) if rule is not None] + [self._observe]
        self._query_window = max(n.window for n in needs)
        # Decoding steps keep no queries unless a decode policy scores with them (a cost every step).
        self._decode_keeps_queries = decode is not None and decode.policy.needs().window > 0
        self._accumulates = prefill.policy.needs().accumulated_attention or self._observe.accumulated_attention
        self.reconstructs = prefill.policy.needs().reconstruction or self._observe.reconstruction

    def _clear(self) -> None:
        self.storage = Storage()
        self.is_initialized = False
        self.seen = 0
        self.prompt_length = 0
        self.phase = Phase.PREFILL
        self.closing = False  # set by the cache when the current forward is the prompt's last
        self.lease: Lease | None = None  # set when the storage shares a capture's spare room
        self.static: StaticDecoding | None = None  # set between begin_static and end_static
        # Which positions hold real tokens (False: padding), (B, seen); None while all are real.
        self.real: torch.Tensor | None = None
        # Prompt positions a row never sees again (B, prompt): tokens the layer stores for other rows of the
        # batch (adaptive heads, ``hide``); None while a row sees all it stores.
        self.hidden: torch.Tensor | None = None
        # The last queries, for policies that look at a window of them, and their positions.
        self.recent_queries: torch.Tensor | None = None  # (B, Hq, n, D)
        self.recent_query_positions: torch.Tensor | None = None  # (n,)
        # Attention each stored token received from every prefill query so far (B, H, G, S), for H2O.
        self.accumulated: torch.Tensor | None = None
        # While the model repeats the prompt: whether it does, the chunk being scored (on layers whose policy
        # scores that way), and the scores by position (B, H, prompt).
        self.repeating = False
        self.scoring: Scoring | None = None
        self.reconstruction_scores: torch.Tensor | None = None
        # Problems found by checks that run on the device, read at the cache's next check.
        self.problems: list[tuple[torch.Tensor, str]] = []
        # How the last forward attended (softmax scale, window, soft-cap), to score as the model does.
        self.scaling = 1.0
        self.visibility = Visibility()

    def __repr__(self) -> str:
        decode = f" decode {self.decode.describe()}" if self.decode else ""
        window = f", sliding window {self.sliding_window}" if self.sliding_window else ""
        return f"PolyLayer({self.index}: {self.prefill.describe()}{decode}{window})"

    # --- transformers' layer interface ----------------------------------------------------------

    @property
    def keys(self) -> torch.Tensor | None:
        return self.storage.keys

    @keys.setter
    def keys(self, value) -> None:  # CacheLayerMixin.__init__ assigns None; storage owns the tensors
        if value is not None:
            raise AttributeError("a PolyLayer's keys live in its storage")

    @property
    def values(self) -> torch.Tensor | None:
        return self.storage.values

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("a PolyLayer's values live in its storage")

    @property
    def positions(self) -> torch.Tensor | None:
        """(B, H, S) int32 positions of the stored tokens, or None while they are exactly 0..seen-1."""
        return self.storage.positions

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.kv_heads, _, self.head_dim = key_states.shape
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.static is not None:
            return self.static.append(key_states, value_states)
        if self.is_initialized and self.storage.device not in (None, self.device):
            self.prefetch()  # offloaded, and not brought back ahead of this forward: bring it back now
        if self.repeating:  # the repeat of the prompt: held until end_scoring, never the prompt
            self.storage.append(key_states, value_states, self.seen)
            self.seen += key_states.shape[-2]
            return self.storage.keys, self.storage.values
        new = key_states.shape[-2]
        if not self.is_initialized:
            if new == 0:
                raise CacheError("the prompt is empty: a cache needs at least one token to compress")
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_same_model(key_states)
            if self.lease is not None and not self.lease.held():
                raise CacheError(
                    "this cache shares its capture's spare room with a newer cache made from the same capture; "
                    "use one such cache at a time, or make it with capture.cache(..., share_room=False)"
                )
        self.storage.append(key_states, value_states, self.seen, limit=self._memory_limit(new))
        self.seen += new
        if self.phase is Phase.PREFILL:
            self.prompt_length = self.seen
        return self.storage.keys, self.storage.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask transformers builds is the full cache's; attention_mask() fits it to this layer.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    # transformers declares is_croppable a plain class attribute; a PolyLayer computes it.
    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Whether ``crop`` puts the layer back exactly as it was before the removed tokens came: true unless
        a decode policy evicts while decoding (what it evicted to make room for them cannot come back)."""
        return not self._evicts_while_decoding()

    def _evicts_while_decoding(self) -> bool:
        return self.decode is not None and self.decode.budget is not None and self.decode.policy.budgeted

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        """Keep what the sliding window would drop until the next ``crop`` (transformers asks before assisted
        decoding), so that removing the newest tokens leaves the window the earlier tokens need.
        ``recurrent_states_to_keep`` (transformers 5.25 passes it to every layer) concerns recurrent layers'
        states, which an attention layer has none of."""
        self.record_past = True

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: remove the ``-tokens_to_remove`` newest tokens, then let a sliding window drop what
        no later token can see. The cache checks the count and ``crop_problem`` first."""
        if not self.is_initialized:
            return
        if tokens_to_remove < 0:
            self.rewind(max(0, self.seen + tokens_to_remove))
        if self.sliding_window and self.storage.size > self.sliding_window - 1:
            self._keep_newest(self.sliding_window - 1)

    def crop_problem(self, length: int) -> str | None:
        """Why cropping this layer to its first ``length`` tokens could not leave it as it was then, if so."""
        if not self.is_initialized or length >= self.seen:
            return None
        if self.static is not None:
            return f"layer {self.index} is in static decoding: end it (end_static) before cropping"
        if self.sliding_window and not self.record_past and self.seen >= self.sliding_window:
            return (
                f"layer {self.index}'s sliding window of {self.sliding_window} already dropped tokens that the "
                f"{length}th would see again; call cache.activate_past_recording() before the forwards to roll back, "
                "as transformers' assisted decoding does"
            )
        return self._rewind_problem(length)

    def _rewind_problem(self, length: int) -> str | None:
        positions = self.storage.positions
        if positions is None:
            return None
        counts = (positions < length).sum(dim=-1)
        if not (counts == counts.flatten()[0]).all():
            return (
                f"layer {self.index}: cannot rewind to {length} tokens because its rows and heads kept different "
                "numbers of them"
            )
        return None

    def rewind(self, length: int) -> None:
        """Forget every token at position ``length`` or later (stored tokens before it stay)."""
        if not self.is_initialized or length >= self.seen:
            return
        if length < 0:
            raise CacheError(f"cannot rewind to {length} tokens")
        problem = self._rewind_problem(length)
        if problem is not None:
            raise CacheError(problem)
        positions = self.storage.positions
        kept = length if positions is None else int((positions[0, 0] < length).sum())
        self.storage.truncate(kept)
        if self.accumulated is not None:
            self.accumulated = self.accumulated[..., :kept]
        self.seen = length
        self.prompt_length = min(self.prompt_length, length)
        if self.real is not None:
            self.real = self.real[:, :length]
        if self.hidden is not None:
            self.hidden = self.hidden[:, :length]
        if self.recent_query_positions is not None:
            assert self.recent_queries is not None  # kept with their positions
            still = self.recent_query_positions < length
            self.recent_queries = self.recent_queries[:, :, still]
            self.recent_query_positions = self.recent_query_positions[still]

    def offload(self) -> None:
        """Move what the layer stores to the CPU until ``prefetch`` (or its next forward) brings it back."""
        self._move("cpu", "offload")

    def prefetch(self) -> None:
        """Bring what the layer stores back to the device it computes on."""
        if self.offloaded:
            self._move(self.device, "prefetch")

    @property
    def offloaded(self) -> bool:
        """Whether what the layer stores lies away from the device it computes on."""
        return self.is_initialized and self.storage.device not in (None, self.device)

    def _move(self, device: torch.device | str, action: str) -> None:
        if not self.is_initialized:
            return
        if self.static is not None:
            raise CacheError(
                f"cannot {action} layer {self.index}: in static decoding its buffers stay where the captured steps "
                "read them; end static decoding first"
            )
        self.storage.to(device)
        for name in (*_ROW_TENSORS, "recent_query_positions", "reconstruction_scores"):
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, tensor.to(device, non_blocking=True))

    def cast(self, dtype: torch.dtype) -> None:
        """Store keys and values in ``dtype`` from now on: a speculative draft running in a lower precision than the
        prefill it was chosen from (``polykv.decoding.precision``)."""
        if self.static is not None:
            raise CacheError(f"layer {self.index} is in static decoding: end it before casting the cache")
        if not self.is_initialized or self.dtype == dtype:
            return
        self.storage.cast(dtype)
        if self.recent_queries is not None:
            self.recent_queries = self.recent_queries.to(dtype)
        self.dtype = dtype
        self.lease = None  # its buffers are its own now: the capture's spare room is not written

    def fork(self) -> PolyLayer:
        """A layer in this state that shares its stored tokens until either appends (see ``Storage.fork``)."""
        if self.static is not None:
            raise CacheError(f"layer {self.index} is in static decoding: end it before forking the cache")
        twin = copy.copy(self)
        twin.storage = self.storage.fork()
        twin.problems = list(self.problems)
        twin.lease = None  # the capture's spare room stays this layer's; the twin copies before it appends
        return twin

    def adopt(
        self,
        other: PolyLayer,
        keep: torch.Tensor | None = None,
        lease: Lease | None = None,
        heads: tuple[int, ...] | None = None,
    ) -> None:
        """Take over ``other``'s tokens (shared, not copied) in the decoding phase, keeping ``keep`` if given.

        With a ``lease`` the layer appends into ``other``'s spare room, which the next holder of
        the lease reuses: using this layer after the lease passed on is an error. ``heads`` takes
        only those KV heads of ``other`` (copied; ``keep`` then indexes them), as a group of a SplitLayer.
        """
        self.dtype, self.device = other.dtype, other.device
        self.batch_size, self.head_dim = other.batch_size, other.head_dim
        self.kv_heads = other.kv_heads if heads is None else len(heads)
        self.is_initialized = True
        self.seen, self.prompt_length, self.real = other.seen, other.prompt_length, other.real
        self.scaling, self.visibility = other.scaling, other.visibility
        self.phase = Phase.DECODE
        self.lease = lease
        self.storage.adopt(other.storage, share_room=lease is not None and keep is None, heads=heads)
        if keep is not None:
            positions = self.storage.positions_or_slots()
            self.storage.keep(keep, positions.gather(-1, keep))

    def begin_static(
        self, room: int, slack: int | None = 0, holes: bool = False, per_check: int = 0, buffers=None
    ) -> None:
        """Decode with fixed shapes from now on (see ``StaticDecoding``), with room for ``room`` more tokens; in
        ``buffers`` (``SlotBuffers``, a pool's views) if given."""
        if self.phase is not Phase.DECODE:
            raise CacheError("static decoding starts after the prefill: run one ordinary decoding step first")
        self.static = StaticDecoding(self, room, slack, holes, per_check, buffers)

    @property
    def static_decoding(self) -> StaticDecoding:
        """The static decoding this layer is in: the static steps' calls come between begin_static and end_static."""
        assert self.static is not None, "called between begin_static and end_static"
        return self.static

    def end_static(self, tokens: int) -> None:
        """Back to ordinary decoding after static steps that brought ``tokens`` tokens."""
        static, self.static = self.static, None
        assert static is not None, "end_static follows begin_static"
        static.finish(tokens)

    def begin_scoring(self, start: int, end: int) -> None:
        """The coming forward is the model repeating prompt positions ``start:end``: score them with its queries
        (if this layer's policy scores that way)."""
        self.repeating = True
        if not self.reconstructs:
            return
        if self.reconstruction_scores is None:
            shape = (self.batch_size, self.kv_heads, self.prompt_length)
            self.reconstruction_scores = torch.zeros(shape, dtype=torch.float32, device=self.device)
        self.scoring = Scoring(self.prompt_length, start, end, self.reconstruction_scores)

    def end_scoring(self) -> None:
        """Forget the repeat: the layer holds the prompt again."""
        self.repeating, self.scoring = False, None
        self.rewind(self.prompt_length)

    def end_repeat(self) -> None:
        """After the whole repeat: give back the room it grew the storage by (a layer kept whole would hold it
        for good, about the prompt's size again)."""
        self.storage.fit()

    def end_prefill(self) -> None:
        """End the prompt: compress it to its budget (with the queries and attention it kept), then decode:
        later forwards append tokens (bounded only by a decode policy)."""
        if self.phase is Phase.PREFILL and self.is_initialized:
            self._compress(self.prefill)
        self.phase = Phase.DECODE
        self.closing = False
        if not self._observe.accumulated_attention:  # a capture keeps them for the policies it serves
            self.accumulated = None  # prefill attention totals mean nothing to decoding
        if not self._observe.reconstruction:
            self.reconstruction_scores = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.storage.select_rows(indices)
        self._map_rows(lambda t: t.index_select(0, indices.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.storage.repeat_rows(repeats)
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def _map_rows(self, change) -> None:
        for name in _ROW_TENSORS:
            tensor = getattr(self, name)
            if tensor is not None:
                setattr(self, name, change(tensor))
        keys = self.storage.keys
        assert keys is not None  # called on an initialized layer
        self.batch_size = keys.shape[0]

    # --- what polykv's attention function calls -----------------------------------------------

    def attention_mask(
        self, full_mask: torch.Tensor | None, query_length: int, query_heads: int
    ) -> torch.Tensor | None:
        """The mask for this layer's stored tokens, from the mask of the full cache.

        ``full_mask`` (B, 1, q, seen) is what transformers built for an uncompressed cache (or None
        for plain causal attention without padding). A stored token's column is the full mask's
        column at its position, so padding, causality and sliding windows carry over exactly.
        """
        positions = self.storage.positions
        mask = full_mask if positions is None else self._fitted_mask(positions, full_mask, query_length, query_heads)
        if self.hidden is None:
            return mask
        # Tokens hidden from a row: the full cache's mask does not know them.
        hidden = self._hidden_at(self.storage.positions_or_slots())
        seen = ~hidden[:, :, None, :].repeat_interleave(query_heads // hidden.shape[1], dim=1)
        if mask is None:
            return seen
        if mask.dtype == torch.bool:
            return mask & seen
        return mask.masked_fill(~seen, torch.finfo(mask.dtype).min)

    @staticmethod
    def _fitted_mask(
        positions: torch.Tensor, full_mask: torch.Tensor | None, query_length: int, query_heads: int
    ) -> torch.Tensor | None:
        stored = positions.shape[-1]
        if full_mask is None:  # no padding: stored tokens are all visible, the new ones causally
            if query_length == 1:
                return None
            rows = torch.arange(query_length, device=positions.device)[:, None]
            columns = torch.arange(stored, device=positions.device)[None, :]
            return (columns <= stored - query_length + rows)[None, None]
        batch, heads, _ = positions.shape
        columns = positions.long()[:, :, None, :].expand(batch, heads, query_length, stored)
        fitted = full_mask.expand(batch, heads, query_length, full_mask.shape[-1]).gather(-1, columns)
        return fitted.repeat_interleave(query_heads // heads, dim=1)

    def wants_log_normalisers(self, queries: torch.Tensor) -> bool:
        """Whether this forward's attention should hand ``after_attention`` each query's log-normaliser:
        a whole unpadded prompt at once, on a device where accumulated attention is one fused kernel."""
        return (
            self.phase is Phase.PREFILL
            and self._accumulates
            and self.storage.positions is None
            and self.storage.size == queries.shape[-2]
            and self.real is None
            and not self.sliding_window
            and column_sums.available(queries.device)
        )

    def after_attention(
        self,
        queries: torch.Tensor,
        full_mask: torch.Tensor | None,
        scaling: float,
        visibility: Visibility,
        lse: torch.Tensor | None = None,
    ) -> None:
        """Drop what no later query can see, and evict down to the budget with this forward's queries.

        ``lse`` (B, Hq, n) are the log-normalisers of this forward's attention, where
        ``wants_log_normalisers`` asked for them. While the model repeats the prompt, the forward only
        scores the prompt's tokens (on layers whose policy asks for it)."""
        if self.repeating:
            if self.scoring is not None:
                self._score_reconstruction(queries, full_mask, scaling)
            return
        new = queries.shape[-2]
        self.scaling, self.visibility = scaling, visibility
        self._note_real_tokens(full_mask, new)
        self._remember_queries(queries)
        if self.phase is Phase.PREFILL and self._accumulates:
            self._accumulate(queries, scaling, visibility, lse)
        if self.sliding_window and not self.record_past and self.storage.size > self.sliding_window - 1:
            self._keep_newest(self.sliding_window - 1)
        if self.phase is Phase.DECODE:
            self._compress(self.decode)
        elif self.closing:
            self.end_prefill()
        elif self.compress_chunks:
            self._compress(self.prefill)

    def budget_for(self, rule: PhaseRule | None) -> int | None:
        """The tokens ``rule`` keeps of what the layer holds now (for the prompt so far, within a sliding window),
        or None where it keeps everything."""
        budget = rule.tokens(self.prompt_length) if rule is not None else None
        if budget is not None and self.sliding_window:
            budget = min(budget, self.sliding_window - 1)
        return budget if budget is not None and budget < self.storage.size else None

    def evict_to(self, budget: int) -> None:
        """Evict down to ``budget`` tokens now with the decode policy (a draft's layer before its first check)."""
        if self.storage.size > budget:
            assert self.decode is not None  # a layer bounded by a decode policy (StaticDecoding)
            self._evict(self.decode, budget, self.scaling, self.visibility)

    def _compress(self, rule: PhaseRule | None) -> None:
        """Evict down to ``rule``'s budget (for the prompt so far), if the layer holds more."""
        budget = self.budget_for(rule)
        if budget is not None:
            assert rule is not None  # budget_for gives None without a rule
            self._check_budget(rule, budget)
            self._evict(rule, budget, self.scaling, self.visibility)

    def _score_reconstruction(self, queries: torch.Tensor, full_mask: torch.Tensor | None, scaling: float) -> None:
        """Add this forward's queries (the model repeating the prompt) to the prompt tokens' scores."""
        new = queries.shape[-2]
        prompt = self.real if self.real is not None else queries.new_ones(self.batch_size, self.prompt_length)
        if full_mask is None:
            repeat = torch.ones(self.batch_size, new, dtype=torch.bool, device=queries.device)
        else:
            block = full_mask[:, 0, -new:, self.seen - new : self.seen].diagonal(dim1=-2, dim2=-1)
            repeat = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
        real = torch.cat([prompt[:, : self.prompt_length].bool(), repeat], dim=1)
        assert self.scoring is not None and self.storage.keys is not None  # after_attention checks; it stored the keys
        self.scoring.add(queries, self.storage.keys, self.storage.positions_or_slots(), real, scaling)

    # --- eviction -------------------------------------------------------------------------------

    def _memory_limit(self, new: int) -> int | None:
        """The most slots a growth may allocate: a decode budget bounds the layer's memory."""
        if self.phase is Phase.DECODE and self.decode is not None:
            budget = self.decode.tokens(self.prompt_length)
            return None if budget is None else budget + new
        return None

    def _check_same_model(self, key_states: torch.Tensor) -> None:
        batch, heads, _, dim = key_states.shape
        if (heads, dim) != (self.kv_heads, self.head_dim) or key_states.device != self.device:
            raise CacheError(
                f"layer {self.index}: this cache holds {self.kv_heads} KV heads of size {self.head_dim} on "
                f"{self.device}, but received {heads} of size {dim} on {key_states.device}; a cache serves "
                "one request of one model: make a new one with plan.make_cache()"
            )
        if batch != self.batch_size:
            raise CacheError(
                f"layer {self.index}: this cache holds {self.batch_size} batch rows but received {batch}; "
                "make a new cache for a new batch"
            )

    def _check_budget(self, rule: PhaseRule, budget: int) -> None:
        needed = rule.policy.min_budget()
        if budget < needed:
            where = f"a sliding window of {self.sliding_window}" if self.sliding_window else "this"
            raise CacheError(
                f"layer {self.index}: {rule.describe()} gives {budget} tokens for {where} "
                f"{self.prompt_length}-token prompt, fewer than the {needed} {rule.policy.name} needs"
            )

    def _note_real_tokens(self, full_mask: torch.Tensor | None, new: int) -> None:
        """Record which new positions are real tokens: the diagonal of the mask (a token sees itself)."""
        if full_mask is None:
            if self.real is not None:
                self.real = torch.cat([self.real, self.real.new_ones(self.real.shape[0], new)], dim=1)
            return
        block = full_mask[:, 0, -new:, self.seen - new : self.seen]  # (B, new, new)
        diagonal = block.diagonal(dim1=-2, dim2=-1)
        real = diagonal if diagonal.dtype == torch.bool else diagonal > torch.finfo(diagonal.dtype).min / 2
        if self.real is None:
            if self.phase is Phase.DECODE and new == 1:
                return  # a decoding step's token is real; nothing to record while everything is
            self.real = torch.ones(real.shape[0], self.seen - new, dtype=torch.bool, device=real.device)
        self.real = torch.cat([self.real, real], dim=1)
        if self.phase is Phase.PREFILL:
            right_padding = (self.real[:, 1:] < self.real[:, :-1]).any()
            self._record(right_padding.int() * RIGHT_PADDING, "the prompt")

    def token_mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Which stored tokens are real and seen by their row (not padding, not hidden), (B, H, S)."""
        batch, heads, _ = positions.shape
        if self.real is None:
            mask = torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        else:
            mask = self.real[:, None, :].expand(batch, heads, self.real.shape[-1]).gather(-1, positions)
        return mask if self.hidden is None else mask & ~self._hidden_at(positions)

    def _hidden_at(self, positions: torch.Tensor) -> torch.Tensor:
        """Whether each stored token (positions (B, H, S)) is hidden from its row; later tokens never are."""
        batch, heads, _ = positions.shape
        assert self.hidden is not None  # called only where something is hidden
        prompt = self.hidden.shape[-1]
        hidden = self.hidden[:, None, :].expand(batch, heads, prompt).gather(-1, positions.clamp(max=prompt - 1))
        return hidden & (positions < prompt)

    def hide(self, hidden: torch.Tensor) -> None:
        """Hide stored tokens from their rows for good, ``hidden`` (B, S) over what this one-head layer stores:
        tokens kept for other rows of the batch (``polykv.cache.adaptive``). Attention and policies skip them."""
        positions = self.storage.positions_or_slots()[:, 0]
        if self.hidden is None:
            self.hidden = torch.zeros(self.batch_size, self.prompt_length, dtype=torch.bool, device=hidden.device)
        self.hidden = self.hidden.scatter(1, positions, self.hidden.gather(1, positions) | hidden)

    def visible_lengths(self) -> torch.Tensor:
        """(B,) tokens each row sees of what the layer stores: all of them but those hidden from it."""
        lengths = torch.full((self.batch_size,), self.storage.size, dtype=torch.long)
        if self.hidden is None or not self.storage.size:
            return lengths
        return lengths - self._hidden_at(self.storage.positions_or_slots())[:, 0].sum(dim=-1).cpu()

    def _remember_queries(self, queries: torch.Tensor) -> None:
        if self._query_window == 0 or (self.phase is Phase.DECODE and not self._decode_keeps_queries):
            return
        new = queries.shape[-2]
        positions = torch.arange(self.seen - new, self.seen, device=queries.device)
        if self.recent_queries is not None and new < self._query_window:
            assert self.recent_query_positions is not None  # kept with the queries
            queries = torch.cat([self.recent_queries, queries], dim=-2)
            positions = torch.cat([self.recent_query_positions, positions])
        recent = queries[:, :, -self._query_window :]
        # A view of a long forward's queries would keep all of them alive (twice the keys and values of a
        # layer with four query heads per KV head), until the prompt ends or for good.
        self.recent_queries = recent.clone() if new > self._query_window else recent
        self.recent_query_positions = positions[-self._query_window :]

    def _accumulate(
        self, queries: torch.Tensor, scaling: float, visibility: Visibility, lse: torch.Tensor | None
    ) -> None:
        """Add this forward's attention to the running total of every stored token (prefill only)."""
        if lse is not None:  # the whole unpadded prompt, normalised by the attention that just ran
            grouped = inputs.grouped(queries, self.kv_heads)
            real = torch.ones(queries.shape[0], queries.shape[-2], dtype=torch.bool, device=queries.device)
            assert self.storage.keys is not None  # this forward stored its keys
            self.accumulated = column_sums.column_sums(grouped, self.storage.keys, lse, real, scaling)
            return
        new = queries.shape[-2]
        positions = self.storage.positions_or_slots()
        query_positions = torch.arange(self.seen - new, self.seen, device=queries.device)
        real_queries = (
            torch.ones(queries.shape[0], new, dtype=torch.bool, device=queries.device)
            if self.real is None
            else self.real[:, -new:]
        )
        assert self.storage.keys is not None  # this forward stored its keys
        received = inputs.accumulated_attention(
            inputs.grouped(queries, self.kv_heads),
            query_positions,
            real_queries,
            self.storage.keys,
            positions,
            self.token_mask(positions),
            scaling,
            visibility,
        )
        if self.accumulated is not None:
            old = self.accumulated.shape[-1]
            received[..., :old] += self.accumulated
        self.accumulated = received

    def _keep_newest(self, count: int) -> None:
        self.storage.keep_newest(count)
        if self.accumulated is not None:
            self.accumulated = self.accumulated[..., -count:].contiguous()

    def _evict(self, rule: PhaseRule, budget: int, scaling: float, visibility: Visibility) -> None:
        positions = self.storage.positions_or_slots()
        view = self.view(rule, budget, positions, scaling, visibility)
        where = f"policy {rule.policy!r}" + (f" (from {rule.provider})" if rule.provider else "")
        where += f" on layer {self.index} ({self.phase.value})"
        selection = choose(rule.policy, view, where=where)
        self._record(selection.problems, where)
        self._keep(selection, positions)

    def _keep(self, selection: Selection, positions: torch.Tensor) -> None:
        indices = selection.indices
        self.storage.keep(indices, positions.gather(-1, indices))
        if self.accumulated is not None:
            groups = self.accumulated.shape[2]
            self.accumulated = self.accumulated.gather(-1, indices[:, :, None, :].expand(-1, -1, groups, -1))

    def view(
        self, rule: PhaseRule, budget: int, positions: torch.Tensor, scaling: float, visibility: Visibility
    ) -> LayerView:
        """What ``rule``'s policy sees of this layer now: stored tokens and the inputs it needs."""
        needs = rule.policy.needs()
        token_mask = self.token_mask(positions)
        keys, values = self.storage.keys, self.storage.values
        assert keys is not None and values is not None  # a policy chooses among stored tokens
        found: dict[str, torch.Tensor] = {}
        if needs.window:
            # A policy that needs queries made the layer keep them (set_rules), with their positions.
            assert self.recent_queries is not None and self.recent_query_positions is not None
            window = min(needs.window, self.recent_queries.shape[-2])
            recent = inputs.grouped(self.recent_queries[:, :, -window:], self.kv_heads)
            found["queries"] = recent
            if needs.window_attention:
                found["window_attention"] = inputs.window_attention(
                    recent,
                    self.recent_query_positions[-window:],
                    keys,
                    positions,
                    token_mask,
                    scaling,
                    visibility,
                )
        if needs.accumulated_attention:
            if self.accumulated is None:
                raise CacheError(f"layer {self.index}: accumulated attention exists only at prefill")
            found["accumulated_attention"] = self.accumulated
        if needs.reconstruction:
            if self.reconstruction_scores is None:
                raise CacheError(f"layer {self.index}: reconstruction scores exist only after a prompt was repeated")
            index = positions.clamp(max=self.reconstruction_scores.shape[-1] - 1)
            found["reconstruction_attention"] = self.reconstruction_scores.gather(-1, index)
        return LayerView(
            layer=self.index,
            phase=self.phase,
            budget=budget,
            keys=keys,
            values=values,
            token_mask=token_mask,
            positions=positions,
            **found,
        )

    def _record(self, problems: torch.Tensor, where: str) -> None:
        """Keep a device-side problem flag for the cache's next check (read at once on the CPU)."""
        if problems.device.type == "cpu":
            raise_for(problems, where)
        else:
            self.problems.append((problems, where))

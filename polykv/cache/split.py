"""A cache layer whose KV heads keep different numbers of tokens, each group of heads in its own storage.

A spec can give heads of one layer different policies or budgets (``layers 18 heads 0: full``). A
dense (B, H, S, D) buffer would then hold the largest head's count for every head; this layer
stores the sum instead: the heads that share a choice form a group, and each group is an ordinary
``PolyLayer`` over its heads (its own storage, positions, queries and eviction), so a group behaves
for its heads exactly as a whole layer with its choice would. Memory is the sum over groups, that
is the sum of the heads' budgets.

Attention runs the model's kernel once per group, on the query heads that read the group's KV heads
(``query_heads``), and puts each group's output in its place: a head attends to exactly its own
stored tokens, which is what full attention with its evicted tokens masked out computes. Groups that
are runs of heads in order (heads 0-3, then 4-7) take their heads as views and join their outputs by
concatenation; other groupings index. In static decoding the groups' slots lie in one pool
(``polykv.cache.pool``), written and attended for every head at once.

With ``adaptive`` heads (``heads adaptive``) every head is a group of its own, and how many tokens
each keeps is decided when the prompt ends: the layer's budget is shared among them by the
policy's scores (``polykv.cache.adaptive``), before any of them compresses.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import attrs
import torch
from transformers.cache_utils import CacheLayerMixin

from polykv.budget import Tokens
from polykv.cache.adaptive import Shares, share
from polykv.cache.layer import PhaseRule, PolyLayer
from polykv.cache.pool import SlotPool
from polykv.cache.static import static_slots, tracks_real_tokens
from polykv.errors import CacheError
from polykv.policy import Phase, ScoringPolicy

#: One group of heads: the KV heads it holds (ascending) and their prefill and decode rules.
HeadGroup = tuple[tuple[int, ...], PhaseRule, PhaseRule | None]


class SplitLayer(CacheLayerMixin):
    """A layer of a PolyCache whose KV heads are grouped by what they keep; see the module docstring."""

    is_compileable = False
    static: GroupsInStatic | None = None  # set between begin_static and end_static

    def __init__(
        self,
        index: int,
        groups: Sequence[HeadGroup],
        *,
        sliding_window: int | None = None,
        compress_chunks: bool = False,
        adaptive: bool = False,
    ):
        """``adaptive``: every group is one head, and the budget each keeps is decided when the prompt ends, by
        sharing the layer's budget among them (``polykv.cache.adaptive``)."""
        super().__init__()
        self.index = index
        self.sliding_window = sliding_window
        self.is_sliding = sliding_window is not None
        self.compress_chunks = compress_chunks
        self.adaptive = adaptive
        self._closing = False
        if adaptive and (compress_chunks or any(len(heads) != 1 for heads, _p, _d in groups)):
            raise CacheError(
                f"layer {self.index}: adaptive heads share the whole prompt's budget among single heads when the "
                "prompt ends: make the cache without compress_chunks"
            )
        self._form(groups)

    def _form(self, groups: Sequence[HeadGroup]) -> None:
        """Make one empty part per group."""
        heads = sorted(head for group, _prefill, _decode in groups for head in group)
        if heads != list(range(len(heads))):
            raise CacheError(f"layer {self.index}: head groups cover every KV head once")
        self.kv_heads = len(heads)
        self._shared = groups[0][1]  # with adaptive heads: the layer's rule, whose budget the heads share
        self.groups: list[tuple[tuple[int, ...], PolyLayer]] = [
            (tuple(group), PolyLayer(self.index, prefill, decode, sliding_window=self.sliding_window,
                                     compress_chunks=self.compress_chunks))
            for group, prefill, decode in groups
        ]  # fmt: skip
        self._selectors: dict[object, list[torch.Tensor]] = {}  # per device: the groups' KV heads, query heads
        # When the groups are runs of heads in order (heads 0-3, then 4-7), a group's heads of a tensor are a view and
        # the groups' outputs join by concatenation: no kernel where an index_select or index_copy_ launches one
        # (each group, each step).
        in_order = [head for group, _prefill, _decode in groups for head in group] == heads
        self._runs = [(group[0], len(group)) for group, _p, _d in groups] if in_order else None

    def __repr__(self) -> str:
        parts = "; ".join(f"heads {','.join(map(str, heads))}: {part!r}" for heads, part in self.groups)
        return f"SplitLayer({self.index}: {parts})"

    # --- the parts ------------------------------------------------------------------------------

    @property
    def parts(self) -> list[PolyLayer]:
        return [part for _heads, part in self.groups]

    def query_heads(self, heads: tuple[int, ...], query_heads: int) -> list[int]:
        """The query heads that read KV ``heads`` (each KV head serves ``query_heads / kv_heads`` in a row)."""
        per = query_heads // self.kv_heads
        return [head * per + offset for head in heads for offset in range(per)]

    def heads_of(self, states: torch.Tensor, number: int) -> torch.Tensor:
        """Group ``number``'s KV heads of ``states`` (B, H, n, D)."""
        if self._runs is not None:
            first, count = self._runs[number]
            return states.narrow(1, first, count)
        return states.index_select(1, self._selector(number, states.device))

    def queries_of(self, query: torch.Tensor, number: int) -> torch.Tensor:
        """The heads of ``query`` (B, Hq, n, D) that read group ``number``'s KV heads."""
        if self._runs is not None:
            per = query.shape[1] // self.kv_heads
            first, count = self._runs[number]
            return query.narrow(1, first * per, count * per)
        return query.index_select(1, self._query_selector(number, query.shape[1], query.device))

    def join(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The attention output (B, n, Hq, D) of the groups' outputs (B, n, their query heads, D), in group order."""
        if self._runs is not None:
            return torch.cat(outputs, dim=2)
        batch, length, _heads, dim = outputs[0].shape
        query_heads = sum(found.shape[2] for found in outputs)
        joined = outputs[0].new_empty(batch, length, query_heads, dim)
        for number, found in enumerate(outputs):
            joined.index_copy_(2, self._query_selector(number, query_heads, found.device), found)
        return joined

    def _query_selector(self, number: int, query_heads: int, device: torch.device) -> torch.Tensor:
        """Group ``number``'s query heads as an index on ``device``, made once (a step replayed as a CUDA graph
        cannot copy one from the host)."""
        key = ("query", query_heads, device)
        if key not in self._selectors:
            self._selectors[key] = [
                torch.tensor(self.query_heads(heads, query_heads), device=device) for heads, _part in self.groups
            ]
        return self._selectors[key][number]

    def _selector(self, number: int, device: torch.device) -> torch.Tensor:
        if device not in self._selectors:
            self._selectors[device] = [torch.tensor(heads, device=device) for heads, _part in self.groups]
        return self._selectors[device][number]

    def set_rules(self, groups: Sequence[HeadGroup]) -> None:
        """Give each group its rules (a plan that solves per prompt length does it before the first forward; heads
        solved one by one may then group differently, which forms the parts anew while they hold nothing)."""
        if [tuple(heads) for heads, _p, _d in groups] != [heads for heads, _part in self.groups]:
            if self.is_initialized:
                raise CacheError(f"layer {self.index}: new rules must group the heads as the layer does")
            self._form(groups)
            return
        self._shared = groups[0][1]
        for (_heads, prefill, decode), part in zip(groups, self.parts):
            part.set_rules(prefill, decode)

    # --- transformers' layer interface ----------------------------------------------------------

    @property
    def is_initialized(self) -> bool:
        return self.groups[0][1].is_initialized

    @is_initialized.setter
    def is_initialized(self, value: bool) -> None:  # CacheLayerMixin.__init__ assigns False
        if value:
            raise AttributeError("a SplitLayer is initialised by its parts")

    @property
    def keys(self) -> None:
        return None

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("a SplitLayer's keys live in its parts")

    @property
    def values(self) -> None:
        return None

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("a SplitLayer's values live in its parts")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Nothing to do: each part initialises itself from its heads."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Give each group its heads of the new tokens (in static decoding, one write into the pool). Returns the
        new tokens themselves: polykv's attention function reads the groups, and recognises this layer by them."""
        if key_states.shape[1] != self.kv_heads:
            raise CacheError(
                f"layer {self.index}: this cache holds {self.kv_heads} KV heads but received {key_states.shape[1]}"
            )
        if self.static is not None:
            return self.static.append(key_states, value_states)
        for number, (_heads, part) in enumerate(self.groups):
            part.update(self.heads_of(key_states, number), self.heads_of(value_states, number))
        return key_states, value_states

    def get_seq_length(self) -> int:
        return self.parts[0].seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.parts[0].get_mask_sizes(query_length)

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._closing = False
        for part in self.parts:
            part.reset()

    # transformers declares is_croppable a plain class attribute; a SplitLayer computes it.
    @property
    def is_croppable(self) -> bool:  # type: ignore[override]
        """Whether ``crop`` puts every group of heads back as it was (``PolyLayer.is_croppable``)."""
        return all(part.is_croppable for part in self.parts)

    def crop(self, tokens_to_remove: int) -> None:
        for part in self.parts:
            part.crop(tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for part in self.parts:
            part.reorder_cache(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for part in self.parts:
            part.batch_select_indices(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        for part in self.parts:
            part.batch_repeat_interleave(repeats)

    # --- what the cache asks of every layer -------------------------------------------------------

    @property
    def seen(self) -> int:
        return self.parts[0].seen

    @property
    def batch_size(self) -> int:
        return self.parts[0].batch_size

    @property
    def head_dim(self) -> int:
        return self.parts[0].head_dim

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0].dtype

    @property
    def closing(self) -> bool:
        return self._closing if self.adaptive else self.parts[0].closing

    @closing.setter
    def closing(self, value: bool) -> None:
        if self.adaptive:  # the parts must not compress alone: end_prefill shares the budget first
            self._closing = value
            return
        for part in self.parts:
            part.closing = value

    @property
    def reconstructs(self) -> bool:
        return any(part.reconstructs for part in self.parts)

    @property
    def problems(self) -> list:
        return [found for part in self.parts for found in part.problems]

    @problems.setter
    def problems(self, value: list) -> None:
        if value:
            raise AttributeError("problems are found by the parts")
        for part in self.parts:
            part.problems = []

    def head_lengths(self) -> torch.Tensor:
        """(B, H) tokens kept per row and KV head (with adaptive heads, a head stores its largest row's count
        for every row, and each row sees its own)."""
        lengths = torch.zeros(self.batch_size, self.kv_heads, dtype=torch.long)
        for heads, part in self.groups:
            lengths[:, list(heads)] = part.visible_lengths()[:, None]
        return lengths

    def nbytes(self) -> int:
        return sum(part.storage.nbytes() for part in self.parts)

    def begin_scoring(self, start: int, end: int) -> None:
        for part in self.parts:
            part.begin_scoring(start, end)

    def end_scoring(self) -> None:
        for part in self.parts:
            part.end_scoring()

    def end_repeat(self) -> None:
        for part in self.parts:
            part.end_repeat()

    def end_prefill(self) -> None:
        shares = None
        if self.adaptive:
            shares = self._share_budget()
            self._closing = False
        for part in self.parts:
            part.end_prefill()
        if shares is not None:  # each head stores its largest row's share: the other rows hide the rest
            for head, part in enumerate(self.parts):
                part.hide(shares.hidden(head, part.storage.positions_or_slots()[:, 0]))

    def after_groups(self) -> None:
        """Called once every group attended in a forward: the prompt's last forward ends the prefill here when
        the heads share their budget (they could not compress one by one)."""
        if self.adaptive and self._closing:
            self.end_prefill()

    def _share_budget(self) -> Shares | None:
        """Give each head its part of the layer's budget by the policy's scores (Ada-KV), before they compress:
        the most any row keeps of it (the shares say what each row keeps). None where nothing is shared."""
        first = self.parts[0]
        if first.phase is not Phase.PREFILL or not first.is_initialized:
            return None
        rule = self._shared
        budget = first.budget_for(rule)
        if budget is None:
            return None
        if not isinstance(rule.policy, ScoringPolicy):
            raise CacheError(
                f"layer {self.index}: adaptive heads share the budget by the scores of the layer's policy, and "
                f"{rule.policy.name} gives none"
            )
        views = [part.view(rule, budget, part.storage.positions_or_slots(), part.scaling, part.visibility)
                 for part in self.parts]  # fmt: skip
        shares = share(rule.policy, views, budget)
        for head, part in enumerate(self.parts):
            part.set_rules(attrs.evolve(rule, budget=Tokens(shares.largest(head))), part.decode)
        return shares

    def rewind(self, length: int) -> None:
        for part in self.parts:
            part.rewind(length)

    def activate_past_recording(self, recurrent_states_to_keep: int | None = None) -> None:
        for part in self.parts:
            part.activate_past_recording(recurrent_states_to_keep)

    def crop_problem(self, length: int) -> str | None:
        """Why cropping to the first ``length`` tokens could not leave some group as it was then, if so."""
        return next((found for found in (part.crop_problem(length) for part in self.parts) if found), None)

    def fork(self) -> SplitLayer:
        """A layer in this state whose groups share their stored tokens until either appends (``PolyLayer.fork``)."""
        twin = copy.copy(self)
        twin.groups = [(heads, part.fork()) for heads, part in self.groups]
        twin._selectors = dict(self._selectors)
        return twin

    @property
    def device(self) -> torch.device:
        return self.parts[0].device

    @property
    def offloaded(self) -> bool:
        return any(part.offloaded for part in self.parts)

    def offload(self) -> None:
        for part in self.parts:
            part.offload()

    def prefetch(self) -> None:
        for part in self.parts:
            part.prefetch()

    def cast(self, dtype: torch.dtype) -> None:
        for part in self.parts:
            part.cast(dtype)

    def begin_static(self, room: int, slack: int | None = 0, holes: bool = False, per_check: int = 0) -> None:
        """Decode with fixed shapes: each group's part gets its slots (``polykv.cache.static``) in one pool
        (``polykv.cache.pool``), which attention reads in one launch where the kernels run."""
        if self.parts[0].phase is not Phase.DECODE:
            raise CacheError("static decoding starts after the prefill: run one ordinary decoding step first")
        groups = [(heads, static_slots(part, room, holes, per_check)) for heads, part in self.groups]
        first = self.parts[0]
        tracks_real = any(tracks_real_tokens(part, holes) for part in self.parts)
        keys = first.storage.keys
        assert keys is not None  # a layer in its decoding phase stores tokens
        pool = SlotPool(groups, first.batch_size, keys, real=tracks_real)
        for number, part in enumerate(self.parts):
            part.begin_static(room, slack, holes, per_check, buffers=pool.buffers(number))
        pool.share([part.static_decoding for part in self.parts])
        self.static = GroupsInStatic(self.parts, pool)

    @property
    def static_decoding(self) -> GroupsInStatic:
        """The static decoding this layer is in: the static steps' calls come between begin_static and end_static."""
        assert self.static is not None, "called between begin_static and end_static"
        return self.static

    def end_static(self, tokens: int) -> None:
        for part in self.parts:
            part.end_static(tokens)
        self.static = None


class GroupsInStatic:
    """The static decodings of a SplitLayer's parts, driven as one: what the cache asks of a layer's
    ``static`` reaches every part, and their slots, free lists and position live in one ``pool``, which a
    step writes and attention reads for every head at once."""

    def __init__(self, parts: Sequence[PolyLayer], pool: SlotPool):
        self.parts = list(parts)
        self.pool = pool

    @property
    def position(self) -> torch.Tensor:
        """The position of the step's first token (the pool's, which every part shares)."""
        assert self.pool.position is not None  # set by SlotPool.share, in SplitLayer.begin_static
        return self.pool.position

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the step's tokens (B, H, n, D) of every head into the pool; return them (see ``SplitLayer.update``)."""
        for part in self.parts:
            part.static_decoding.take(keys.shape[-2])
        self.pool.write(keys, values)
        return keys, values

    def after_attention(self) -> None:
        """Move past the step's tokens (once: the parts share the position), and let each part evict as planned."""
        assert self.pool.position is not None  # set by SlotPool.share, in SplitLayer.begin_static
        self.pool.position += self.parts[0].static_decoding.tokens
        for part in self.parts:
            part.static_decoding.evict_if_planned()

    @property
    def incoming(self) -> torch.Tensor | None:
        return self.parts[0].static_decoding.incoming

    @incoming.setter
    def incoming(self, real: torch.Tensor | None) -> None:
        self.pool.real_tokens = real
        for part in self.parts:
            part.static_decoding.incoming = real

    def refuse(self, refused: torch.Tensor) -> None:
        for part in self.parts:
            part.static_decoding.refuse(refused)

    def plan_step(self) -> tuple[int, ...]:
        """The parts that evict in the coming step (every part plans it): parts of different bounds evict in
        different steps, and each set of them is a graph of its own."""
        return tuple(number for number, part in enumerate(self.parts) if part.static_decoding.plan_step())

    def plan_check(self) -> tuple[int, ...]:
        """The parts that evict at the end of the coming check (every part plans it)."""
        return tuple(number for number, part in enumerate(self.parts) if part.static_decoding.plan_check())

    def evict_for_check(self) -> None:
        for part in self.parts:
            part.static_decoding.evict_for_check()

    def compile_refusals(self) -> None:
        for part in self.parts:
            part.static_decoding.compile_refusals()

    def stepped(self, tokens: int = 1) -> None:
        for part in self.parts:
            part.static_decoding.stepped(tokens)

    def nbytes(self) -> int:
        return self.pool.nbytes()

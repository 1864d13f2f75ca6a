"""One layer of a PolyCache: its own policy and budget per phase, and only the tokens it keeps.

The layer keeps two lengths apart, as transformers' sliding-window layer does: ``seen`` (tokens
that went through the layer, which gives new tokens their positions) and the stored tokens (what
memory holds). After an eviction ``positions`` records each stored token's position per row and
head; before any eviction it is None and the stored tokens are exactly positions 0..seen-1.

A forward pass goes: ``update`` appends the new keys and values and notes whether compression is
due; polykv's attention function then attends with a mask fitted to this layer
(``attention_mask``) and calls ``after_attention``, which runs the policy with the queries it has
at hand and keeps the chosen tokens.
"""

from __future__ import annotations

import math

import attrs
import torch
from transformers.cache_utils import CacheLayerMixin

from polykv.cache import inputs
from polykv.cache.selection import choose
from polykv.errors import CacheError
from polykv.lang import ast
from polykv.lang.printer import format_budget
from polykv.policy import LayerView, Needs, Phase, Policy

#: Stored positions take 4 bytes per token and head (2**31 positions is ample); indexing uses long.
POSITION = torch.int32


@attrs.frozen
class PhaseRule:
    """A policy and its budget for one phase; ``budget`` None means keep everything."""

    policy: Policy
    budget: ast.Tokens | ast.Percent | None

    def tokens(self, prompt_length: int) -> int | None:
        """The budget in tokens for a prompt of ``prompt_length`` (None: no limit)."""
        if self.budget is None or not self.policy.budgeted:
            return None
        if isinstance(self.budget, ast.Tokens):
            return self.budget.count
        if isinstance(self.budget, ast.Percent):
            return max(1, math.ceil(self.budget.value * prompt_length / 100))
        raise CacheError(f"{self.policy!r}@auto has no budget yet: compile the spec with polykv.compile")

    def describe(self) -> str:
        return repr(self.policy) + ("" if self.budget is None else "@" + format_budget(self.budget))


class PolyLayer(CacheLayerMixin):
    """A cache layer that keeps at most its budget of tokens, chosen by its own policy."""

    is_sliding = False
    is_compileable = False
    is_croppable = False  # evicted tokens cannot come back, so generation must not rely on rollbacks

    def __init__(self, index: int, prefill: PhaseRule, decode: PhaseRule | None = None):
        super().__init__()
        self.index = index
        self.prefill = prefill
        self.decode = decode
        self._clear()

    def _clear(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False
        self.positions: torch.Tensor | None = None  # (B, H, S) int32 once something was evicted
        self.seen = 0
        self.prompt_length = 0
        self.pending: Phase | None = None
        # Queries of the last steps, for decode policies that look at a window of them.
        self.recent_queries: torch.Tensor | None = None  # (B, Hq, n, D)
        self.recent_query_positions: torch.Tensor | None = None  # (n,)

    def __repr__(self) -> str:
        decode = f" decode {self.decode.describe()}" if self.decode else ""
        return f"PolyLayer({self.index}: {self.prefill.describe()}{decode})"

    # --- transformers' layer interface ----------------------------------------------------------

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:
            raise CacheError(
                f"layer {self.index}: the {self.pending.value} eviction of the last forward pass never ran, "
                "because the model's attention does not go through polykv; prepare the model with "
                "polykv.prepare_model(model) (polykv.compile does this)"
            )
        new = key_states.shape[-2]
        if not self.is_initialized:
            if new == 0:
                raise CacheError("the prompt is empty: a cache needs at least one token to compress")
            self.lazy_initialization(key_states, value_states)
            self.keys, self.values = key_states, value_states
            self.prompt_length = new
            budget = self.prefill.tokens(new)
            if budget is not None and budget < new:
                self._check_budget(self.prefill, budget)
                self.pending = Phase.PREFILL
        else:
            self.keys = torch.cat([self.keys, key_states], dim=-2)
            self.values = torch.cat([self.values, value_states], dim=-2)
            if self.positions is not None:
                batch, heads = self.positions.shape[:2]
                fresh = torch.arange(self.seen, self.seen + new, device=self.positions.device, dtype=POSITION)
                self.positions = torch.cat([self.positions, fresh.expand(batch, heads, new)], dim=-1)
            budget = self.decode.tokens(self.prompt_length) if self.decode else None
            if budget is not None and self.keys.shape[-2] > budget:
                self._check_budget(self.decode, budget)
                self.pending = Phase.DECODE
        self.seen += new
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask transformers builds is the full cache's; attention_mask() fits it to this layer.
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def crop(self, tokens_to_remove: int) -> None:
        """transformers' crop: a negative count removes the newest tokens; a positive one is a length."""
        self.rewind(self.seen + tokens_to_remove if tokens_to_remove < 0 else tokens_to_remove)

    def rewind(self, length: int) -> None:
        """Forget every token at position ``length`` or later (stored tokens before it stay)."""
        if length >= self.seen or not self.is_initialized:
            return
        if length < 0:
            raise CacheError(f"cannot rewind to {length} tokens")
        if self.positions is None:
            kept = length
        else:
            counts = (self.positions < length).sum(dim=-1)
            if not (counts == counts.flatten()[0]).all():
                raise CacheError(
                    f"layer {self.index}: cannot rewind to {length} tokens because its heads kept "
                    "different numbers of them"
                )
            kept = int(counts.flatten()[0])
            self.positions = self.positions[..., :kept]
        self.keys = self.keys[..., :kept, :]
        self.values = self.values[..., :kept, :]
        self.seen = length
        if self.recent_query_positions is not None:
            still = self.recent_query_positions < length
            self.recent_queries = self.recent_queries[:, :, still]
            self.recent_query_positions = self.recent_query_positions[still]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[indices], self.values[indices]
        if self.positions is not None:
            self.positions = self.positions[indices]
        if self.recent_queries is not None:
            self.recent_queries = self.recent_queries[indices]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        if self.recent_queries is not None:
            self.recent_queries = self.recent_queries.repeat_interleave(repeats, dim=0)

    # --- what polykv's attention function calls -----------------------------------------------

    def attention_mask(
        self, full_mask: torch.Tensor | None, query_length: int, query_heads: int
    ) -> torch.Tensor | None:
        """The mask for this layer's stored tokens, from the mask of the full cache.

        ``full_mask`` (B, 1, q, seen) is what transformers built for an uncompressed cache (or None
        for plain causal attention without padding). A stored token's column is the full mask's
        column at its position, so padding and causality carry over exactly.
        """
        if self.positions is None:
            return full_mask
        stored = self.keys.shape[-2]
        if full_mask is None:  # no padding: stored tokens are all visible, the new ones causally
            if query_length == 1:
                return None
            rows = torch.arange(query_length, device=self.keys.device)[:, None]
            columns = torch.arange(stored, device=self.keys.device)[None, :]
            return (columns <= stored - query_length + rows)[None, None]
        batch, heads, _ = self.positions.shape
        columns = self.positions.long()[:, :, None, :].expand(batch, heads, query_length, stored)
        fitted = full_mask.expand(batch, heads, query_length, full_mask.shape[-1]).gather(-1, columns)
        return fitted.repeat_interleave(query_heads // heads, dim=1)

    def after_attention(self, queries: torch.Tensor, full_mask: torch.Tensor | None, scaling: float) -> None:
        """Evict what the phase calls for, with the queries of this forward pass at hand."""
        phase, self.pending = self.pending, None
        if phase is Phase.PREFILL:
            self._evict(self.prefill, Phase.PREFILL, queries, full_mask, scaling)
        elif phase is Phase.DECODE:
            self._remember_queries(queries)
            self._evict(self.decode, Phase.DECODE, self.recent_queries, full_mask, scaling)
        if self.decode is not None and phase is not Phase.DECODE:
            self._remember_queries(queries)

    # --- eviction -------------------------------------------------------------------------------

    def _check_budget(self, rule: PhaseRule, budget: int) -> None:
        needed = rule.policy.min_budget()
        if budget < needed:
            raise CacheError(
                f"layer {self.index}: {rule.describe()} gives {budget} tokens for this "
                f"{self.prompt_length}-token prompt, fewer than the {needed} {rule.policy.name} needs"
            )

    def _remember_queries(self, queries: torch.Tensor) -> None:
        window = self.decode.policy.needs().window
        if window == 0:
            return
        positions = torch.arange(self.seen - queries.shape[-2], self.seen, device=queries.device)
        if self.recent_queries is not None:
            queries = torch.cat([self.recent_queries, queries], dim=-2)
            positions = torch.cat([self.recent_query_positions, positions])
        self.recent_queries = queries[:, :, -window:]
        self.recent_query_positions = positions[-window:]

    def _evict(
        self,
        rule: PhaseRule,
        phase: Phase,
        queries: torch.Tensor,
        full_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        keys, values = self.keys, self.values
        batch, heads, length, _ = keys.shape
        if self.positions is None:
            positions = torch.arange(length, device=keys.device).expand(batch, heads, length)
        else:
            positions = self.positions.long()
        token_mask = self._token_mask(full_mask, positions, check_padding=phase is Phase.PREFILL)
        policy = rule.policy
        needs = policy.needs()
        view = LayerView(
            layer=self.index,
            phase=phase,
            budget=rule.tokens(self.prompt_length),
            keys=keys,
            values=values,
            token_mask=token_mask,
            positions=positions,
            **self._attention_inputs(needs, phase, queries, positions, token_mask, scaling),
        )
        keep = choose(policy, view)
        gather = keep[..., None].expand(-1, -1, -1, keys.shape[-1])
        self.keys = keys.gather(2, gather)
        self.values = values.gather(2, gather)
        self.positions = positions.gather(2, keep).to(POSITION)

    def _attention_inputs(
        self,
        needs: Needs,
        phase: Phase,
        queries: torch.Tensor,
        positions: torch.Tensor,
        token_mask: torch.Tensor,
        scaling: float,
    ) -> dict[str, torch.Tensor]:
        if needs.window == 0 and not needs.accumulated_attention:
            return {}
        heads = self.keys.shape[1]
        found: dict = {}
        if needs.window:
            window = min(needs.window, queries.shape[-2])
            recent = inputs.grouped(queries[:, :, -window:], heads)
            if phase is Phase.PREFILL:
                query_positions = torch.arange(self.seen - window, self.seen, device=queries.device)
            else:
                query_positions = self.recent_query_positions[-window:]
            found["queries"] = recent
            if needs.window_attention:
                found["window_attention"] = inputs.window_attention(
                    recent, query_positions, self.keys, positions, token_mask, scaling
                )
        if needs.accumulated_attention:
            if phase is not Phase.PREFILL:
                raise CacheError(f"layer {self.index}: accumulated attention exists only at prefill")
            found["accumulated_attention"] = inputs.accumulated_attention(
                inputs.grouped(queries, heads), self.keys, token_mask, scaling
            )
        return found

    def _token_mask(
        self, full_mask: torch.Tensor | None, positions: torch.Tensor, *, check_padding: bool
    ) -> torch.Tensor:
        """Which stored tokens are real (not padding), (B, H, L), read off the full mask's last row."""
        if full_mask is None:
            return torch.ones(positions.shape, dtype=torch.bool, device=positions.device)
        last_row = full_mask[:, 0, -1, :]
        real = last_row if last_row.dtype == torch.bool else last_row > torch.finfo(last_row.dtype).min / 2
        if check_padding and (real[:, 1:] < real[:, :-1]).any():
            raise CacheError(
                "a batch row has padding after its tokens; polykv needs left padding "
                "(tokenizer.padding_side = 'left'), as generation does"
            )
        batch, heads, _length = positions.shape
        return real[:, None, :].expand(batch, heads, real.shape[-1]).gather(-1, positions)

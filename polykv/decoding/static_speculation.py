"""Self-speculation with fixed shapes: on CUDA each check of the full cache is one CUDA graph replay.

``polykv.decoding.speculative`` drives every draft step and every check from Python, reading
how many proposals each row kept before it plans the next forward; on a GPU the host then sets
the pace, as it does for ordinary decoding (``polykv.decoding.static``). Here both caches are in
static decoding (``polykv.cache.static``: fixed slots, visibility from stored positions) and a
check is a fixed sequence of forwards whose shapes never change:

1. the draft takes two tokens: the last proposal of the check before (a hole where the full cache
   refused it, so the draft never sees it) and the full cache's own token after what it kept;
2. the draft takes each of its next ``lookahead - 1`` proposals, one token a step;
3. the full cache takes its newest token and the ``lookahead`` proposals in one step, and each row
   keeps the proposals up to the first it would not have chosen, plus its own choice after them.

What a row refused stays in its slots as a hole the attention never sees again. The full cache's
slots are not reused, so it has room for a check's tokens times the checks that can come; a draft
layer bounded while decoding (a ``decode`` policy) holds at most its bound instead: at the end of a
check it evicts down to its bound minus the next check's tokens, holes first (each pattern of
evicting layers is a graph of its own). Which row keeps what, the tokens made so far and the
statistics all stay on the device: the host only replays the check and now and then reads how many
checks every row still needs at the least (without end tokens, no check runs after the last row has
finished; with them, the host looks every ``check_every`` checks at most). The first check of each
pattern runs for real and is captured; the later ones replay it. On the CPU the same check runs
eagerly, which is how it is tested against greedy full-cache decoding.

Greedy or sampled (``Sampling``: a proposal drawn from the draft's q is kept with probability
min(1, p/q), and a row that refuses one draws from what p has beyond q, all on the device), on
models without sliding windows (a window counts slots, so its slots cannot hold holes), with decode
policies that rank in a static step. ``speculative_generate`` takes the ordinary path otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from polykv.cache.cache import PolyCache
from polykv.decoding.compiled import compiled_forward
from polykv.decoding.ends import device_time, end_tokens, padded_after_end
from polykv.decoding.precision import tf32_matmuls
from polykv.decoding.static import Sampling, captured_replay
from polykv.model.describe import cache_argument

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: How a profile names a check's forwards: the full cache's (False) and the draft's (True).
FORWARDS = {False: "polykv: full cache forward", True: "polykv: draft forward"}


class StaticChecks:
    """The state of a speculative generation whose checks have fixed shapes, all of it on the device."""

    def __init__(
        self,
        model: PreTrainedModel,
        full: PolyCache,
        draft: PolyCache,
        newest: torch.Tensor,
        next_positions: torch.Tensor,
        *,
        lookahead: int,
        max_new_tokens: int,
        eos_token_id: int | Sequence[int] | None,
        pad_token_id: int | None,
        graph: bool,
        sampling: Sampling | None = None,
        check_every: int = 4,
        compile_step: bool = False,
        draft_tf32: bool = False,
        draft_model: PreTrainedModel | None = None,
    ):
        """``newest`` (B,): each row's token after the prompt, in neither cache yet (it is the first new
        token); ``next_positions`` (B,): its position (the row's real prompt tokens). ``sampling``: draw
        instead of choosing greedily; ``compile_step``: run the forwards compiled (``polykv.decoding.compiled``);
        ``draft_tf32``: the draft's products in TF32; ``draft_model``: the model the draft runs, in the dtype of
        its cache (default: ``model``; ``polykv.decoding.precision``)."""
        self.model, self.full, self.draft, self.sampling = model, full, draft, sampling
        self.draft_tf32 = draft_tf32
        drafter = model if draft_model is None else draft_model
        self._runs = {
            False: compiled_forward(model) if compile_step else model,
            True: compiled_forward(drafter) if compile_step else drafter,
        }
        self.lookahead, self.max_new_tokens, self.graph, self.check_every = (
            lookahead,
            max_new_tokens,
            graph,
            check_every,
        )
        rows, device = newest.shape[0], newest.device
        self.eos, self.pad = end_tokens(eos_token_id, pad_token_id, newest)
        checks = max_new_tokens + check_every  # a row gains a token or more per check, and the host looks late
        full.begin_static(room=checks * (lookahead + 1), holes=True)
        if lookahead:  # two tokens, then lookahead - 1
            draft.begin_static(room=checks * (lookahead + 1), holes=True, per_check=lookahead + 1)
        if compile_step:
            for cache in (full, draft) if lookahead else (full,):
                cache.compile_static_refusals()
        self.newest = newest.clone()
        self.full_next, self.draft_next = next_positions.clone(), next_positions.clone()
        # The draft's first two tokens: nothing (a hole) and the newest token.
        self.behind = torch.stack([newest, newest], dim=1)
        self.behind_real = torch.tensor([[False, True]], device=device).expand(rows, 2).clone()
        # Made tokens, with a last column that takes what falls past max_new_tokens.
        self.generated = newest.new_full((rows, max_new_tokens + 1), self.pad)
        self.generated[:, 0] = newest
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.ended = torch.isin(newest, self.eos)
        self.counts = torch.zeros(5, dtype=torch.long, device=device)  # drafted, accepted, alone, row checks, checks
        self.per_check = torch.zeros(checks, dtype=torch.long, device=device)
        self.check_index = torch.zeros(1, dtype=torch.long, device=device)
        self._graphs: dict[tuple[int, ...], Callable[[], None]] = {}  # by the draft layers that evict at the end

    # --- one check --------------------------------------------------------------------------------

    def _forward(self, cache: PolyCache, ids: torch.Tensor, positions: torch.Tensor, keep: int) -> torch.Tensor:
        """The logits (B, keep, V) after the last ``keep`` of ``ids``. Named in profiles (``FORWARDS``)."""
        drafting = cache is self.draft
        with torch.profiler.record_function(FORWARDS[drafting]), tf32_matmuls(self.draft_tf32 and drafting):
            output = self._runs[drafting](
                input_ids=ids,
                position_ids=positions,
                logits_to_keep=keep,
                use_cache=True,
                **cache_argument(self.model, cache),
            )
        return output.logits

    def _proposal(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's token after ``logits`` (B, 1, V), and (when sampling) the distribution it was drawn from."""
        if self.sampling is None:
            return logits[:, 0].argmax(dim=-1), None
        drawn_from = self.sampling.probabilities(logits[:, 0])
        return self.sampling.draw(drawn_from), drawn_from

    def _propose(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The draft's ``lookahead`` proposals (B, lookahead), and (when sampling) their distributions
        (B, lookahead, V)."""
        self.draft.static_incoming(self.behind_real)
        positions = (self.draft_next[:, None] + self.behind_real.long().cumsum(dim=1) - 1).clamp(min=0)
        made = [self._proposal(self._forward(self.draft, self.behind, positions, 1))]
        self.draft_next += self.behind_real.sum(dim=1)
        self.draft.static_incoming(None)
        for _ in range(self.lookahead - 1):
            made.append(self._proposal(self._forward(self.draft, made[-1][0][:, None], self.draft_next[:, None], 1)))
            self.draft_next += 1
        proposals = torch.stack([token for token, _ in made], dim=1)
        if self.sampling is None:
            return proposals, None
        distributions = [q for _, q in made if q is not None]  # sampling: every proposal has its own
        return proposals, torch.stack(distributions, dim=1)

    def _verdict(
        self, proposals: torch.Tensor, drawn_from: torch.Tensor | None, logits: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """How many proposals each row accepts (B,), and the token each row has after its accepted ones
        (B,), from the full cache's ``logits`` (B, count + 1, V) after the newest token and each proposal."""
        count = proposals.shape[1]
        if self.sampling is None:
            chosen = logits.argmax(dim=-1)
            alone = (proposals == chosen[:, :count]).long().cumprod(dim=1).sum(dim=1)
            return alone, chosen.gather(1, alone[:, None])[:, 0]
        target = self.sampling.probabilities(logits)
        vocabulary = target.shape[-1]
        if not count:
            return proposals.new_zeros(proposals.shape[0]), self.sampling.draw(target[:, 0])
        assert drawn_from is not None  # sampled proposals come with their distributions
        alone = Sampling.accepts(target[:, :count], drawn_from, proposals).long().cumprod(dim=1).sum(dim=1)
        after = target.gather(1, alone[:, None, None].expand(-1, 1, vocabulary))[:, 0]
        # A row that refused a proposal draws from what the full cache has beyond the draft there.
        at = drawn_from.gather(1, alone.clamp(max=count - 1)[:, None, None].expand(-1, 1, vocabulary))[:, 0]
        return alone, self.sampling.draw(torch.where((alone < count)[:, None], Sampling.beyond(after, at), after))

    def _check(self) -> None:
        count = self.lookahead
        if count:
            proposals, drawn_from = self._propose()
        else:
            proposals, drawn_from = self.newest.new_zeros(self.newest.shape[0], 0), None
        fed = torch.cat([self.newest[:, None], proposals], dim=1)
        offsets = torch.arange(count + 1, device=fed.device)
        logits = self._forward(self.full, fed, self.full_next[:, None] + offsets, count + 1)
        active = ~self.ended & (self.lengths < self.max_new_tokens)
        alone, newest = self._verdict(proposals, drawn_from, logits)
        kept = alone.masked_fill(~active, 0)
        self.full.static_refuse(offsets[None, :] > kept[:, None])
        self.full_next += kept + 1
        if count:
            if count > 1:  # of the proposals the draft took, it keeps what the full cache kept
                self.draft.static_refuse(offsets[None, : count - 1] >= kept[:, None])
                self.draft_next -= count - 1 - kept.clamp(max=count - 1)
            self.behind[:, 0] = proposals[:, -1]
            self.behind_real[:, 0] = kept == count
            self.behind[:, 1] = newest
            self.draft.static_evict_for_check()
        self._record(torch.cat([proposals, newest[:, None]], dim=1), kept, newest, active)
        rows = active.sum()
        found = torch.stack([count * rows, kept.sum(), alone.masked_fill(~active, 0).sum(), rows, active.any().long()])
        self.counts += found
        self.per_check.index_copy_(0, self.check_index, kept.sum()[None])
        self.check_index += 1
        self.newest.copy_(newest)

    def _record(self, tokens: torch.Tensor, kept: torch.Tensor, newest: torch.Tensor, active: torch.Tensor) -> None:
        """Row b gains its first ``kept[b]`` proposals and then ``newest[b]`` (up to max_new_tokens), if active."""
        offsets = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        tokens = torch.where(offsets == kept[:, None], newest[:, None], tokens)  # its own token after the kept
        columns = self.lengths[:, None] + offsets
        valid = (offsets <= kept[:, None]) & active[:, None] & (columns < self.max_new_tokens)
        self.generated.scatter_(1, torch.where(valid, columns, self.max_new_tokens), tokens)
        self.lengths += valid.sum(dim=1)
        if len(self.eos):
            self.ended |= (torch.isin(tokens, self.eos) & valid).any(dim=1)

    # --- the host's loop --------------------------------------------------------------------------

    def run(self) -> tuple[float, int]:
        """Check until every row has finished; the first check's wall time and the new tokens it made."""
        start = device_time(self.newest.device)
        first_tokens = int(self.lengths.sum())
        self._run_check()
        first_seconds = device_time(self.newest.device) - start
        first_tokens = int(self.lengths.sum()) - first_tokens
        while checks := self.checks_certainly_needed():
            for _ in range(checks):
                self._run_check()
        return first_seconds, first_tokens

    def _run_check(self) -> None:
        evicting = self.draft.plan_static_check() if self.lookahead else ()
        if not self.graph:
            self._check()
        elif evicting in self._graphs:
            self._graphs[evicting]()
        else:
            self._graphs[evicting] = captured_replay(self._check)
        self.full.static_stepped(self.lookahead + 1)
        if self.lookahead:
            self.draft.static_stepped(self.lookahead + 1)

    def checks_certainly_needed(self) -> int:
        """How many checks to run before the host looks again (reads the device): as many as the row furthest
        from max_new_tokens needs at the least, as a check gives a row at most lookahead + 1 tokens, so that no
        check runs once every row has finished; at most ``check_every`` where an end token may end a row sooner.
        0 once every row has finished."""
        left = int((self.max_new_tokens - self.lengths).masked_fill(self.ended, 0).max().clamp(min=0))
        checks = -(-left // (self.lookahead + 1))
        return min(checks, self.check_every) if len(self.eos) else checks

    def tokens(self) -> torch.Tensor:
        """The made tokens (B, new): the pad token after each row's end, cut where the last row ended."""
        return padded_after_end(self.generated[:, : self.max_new_tokens], self.eos, self.pad)

    def statistics(self) -> tuple[int, int, int, int, tuple[int, ...], int]:
        """Drafted, accepted, accepted by rows alone, row checks, the accepted per check while any row was
        active, and the checks that ran after every row had finished."""
        drafted, accepted, alone, row_checks, active_checks = self.counts.tolist()
        idle = int(self.check_index) - active_checks
        return drafted, accepted, alone, row_checks, tuple(self.per_check[:active_checks].tolist()), idle

"""Self-speculative decoding: the model drafts with a compressed cache and checks with its full one.

A compressed cache makes a decoding step cheaper at some cost in quality. As a draft it costs no
quality at all: the model proposes ``lookahead`` tokens reading the compressed cache, then reads
the full cache once for all of them (one forward of lookahead + 1 tokens, which costs about what
one step costs where reading the cache dominates) and keeps the proposals up to the first it would
not have chosen, plus its own choice after them. Greedy output is the full cache's greedy output
token for token; sampled output has the full cache's distribution (speculative sampling: a
proposal drawn from q is kept with probability min(1, p/q), otherwise the token is drawn from
what p has beyond q).

Both caches come from one prefill (``polykv.harness.capture``): every layer is kept whole, and the
draft's policies choose their tokens from it as ``draft.make_cache()`` would after the same
prefill. In a batch every row keeps the proposals that all rows kept, then its own next token, so
each row's output is still exactly its own; the statistics say how much the batch gave up.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
import torch

from polykv.cache.cache import PolyCache
from polykv.decoding.static import Sampling
from polykv.errors import ArgumentError, ArgumentTypeError
from polykv.harness.capture import capture
from polykv.model.describe import cache_argument
from polykv.plan.plan import Plan
from polykv.registry import Registry


@attrs.frozen
class Speculation:
    """What ``speculative_generate`` produced, and how well the draft guessed.

    ``tokens``: the prompt and its continuation (B, L + new). ``drafted``: proposals made (per row),
    ``accepted``: proposals the batch kept; ``accepted_per_step``: kept at each verification.
    ``row_accepted``: proposals each row would have kept alone, summed over rows (what a batch of
    one would have kept; equal to ``accepted`` for a single row). ``full_nbytes`` and
    ``draft_nbytes``: what the two caches held after the prefill. ``prefill_seconds`` and
    ``decode_seconds``: wall time of the prefill (both caches) and of the rest, the device synchronised.
    """

    tokens: torch.Tensor
    drafted: int
    accepted: int
    accepted_per_step: tuple[int, ...]
    row_accepted: int
    rows: int
    full_nbytes: int
    draft_nbytes: int
    prefill_seconds: float
    decode_seconds: float

    @property
    def steps(self) -> int:
        """Verification forwards of the full cache (each gives one token beyond the proposals it kept)."""
        return len(self.accepted_per_step)

    @property
    def acceptance(self) -> float:
        """The share of proposals the batch kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def row_acceptance(self) -> float:
        """The share of proposals a row kept on its own."""
        return self.row_accepted / (self.drafted * self.rows) if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per verification forward (1 means the draft never helped)."""
        return (self.accepted + self.steps) / self.steps if self.steps else 0.0


@torch.no_grad()
def speculative_generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    *,
    draft: Plan,
    max_new_tokens: int,
    lookahead: int = 4,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    sampling: Sampling | None = None,
    registry: Registry | None = None,
) -> Speculation:
    """Continue ``input_ids`` (B, L, left-padded as ``attention_mask`` says) by ``max_new_tokens`` tokens,
    drafting ``lookahead`` at a time with ``draft``'s compressed cache and keeping what the full cache
    confirms (see the module docstring). ``draft`` is a plan for this model (``polykv.compile``); the
    model is prepared for it while this runs. Greedy unless ``sampling`` is given. A row that produced
    an end-of-sequence token continues with ``pad_token_id``; generation stops when every row has.
    """
    if not isinstance(draft, Plan):
        raise ArgumentTypeError(f"draft is a polykv.Plan (polykv.compile(spec, model)), got {type(draft).__name__}")
    for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("lookahead", lookahead, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ArgumentError(f"{name} is a whole number of at least {least}, got {value!r}")
    clock = _Clock(input_ids.device)
    with draft.apply(model):
        captured = capture(
            model,
            input_ids,
            attention_mask,
            needs=draft.needs(registry),
            room=max_new_tokens + lookahead + 1,
            reconstruction=draft.reconstruction,
        )
        full = captured.cache(share_room=True)  # appends go into the capture's spare room
        drafting = captured.cache_for(draft, registry)
        for cache in (full, drafting):
            cache.activate_past_recording()  # sliding windows keep what a crop needs
        run = _Run(model, input_ids, attention_mask, eos_token_id, pad_token_id, sampling)
        generated = run.choose(captured.logits[:, None])[:, 0][:, None]
        statistics = _Statistics(full.nbytes(), drafting.nbytes(), clock.lap())
        in_draft = 0  # generated tokens the draft cache holds
        while generated.shape[1] < max_new_tokens and not run.all_ended(generated):
            count = min(lookahead, max_new_tokens - generated.shape[1] - 1)
            proposals, draft_probabilities = run.propose(drafting, generated[:, in_draft:], count)
            verified = run.forward(full, torch.cat([generated[:, -1:], proposals], dim=1), count + 1)
            new, kept, alone = run.accept(proposals, draft_probabilities, verified, run.active(generated))
            full.crop(-(count - kept))
            if count:
                held = min(kept, count - 1)  # the last proposal never went into the draft cache
                drafting.crop(-(count - 1 - held))
                in_draft = generated.shape[1] + held
            generated = torch.cat([generated, new], dim=1)
            statistics.add(count, kept, alone)
    tokens = torch.cat([input_ids, run.finished(generated)], dim=1)
    return statistics.result(tokens, clock.lap())


class _Clock:
    """Wall time between laps, the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = self._now()

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self) -> float:
        now = self._now()
        seconds, self.last = now - self.last, now
        return seconds


class _Statistics:
    def __init__(self, full_nbytes: int, draft_nbytes: int, prefill_seconds: float):
        self.drafted = self.accepted = self.row_accepted = 0
        self.per_step: list[int] = []
        self.rows = 1
        self.nbytes = (full_nbytes, draft_nbytes)
        self.prefill_seconds = prefill_seconds

    def add(self, drafted: int, kept: int, alone: torch.Tensor) -> None:
        self.drafted += drafted
        self.accepted += kept
        self.per_step.append(kept)
        self.row_accepted += int(alone.sum())
        self.rows = alone.shape[0]

    def result(self, tokens: torch.Tensor, decode_seconds: float) -> Speculation:
        return Speculation(
            tokens,
            self.drafted,
            self.accepted,
            tuple(self.per_step),
            self.row_accepted,
            self.rows,
            *self.nbytes,
            self.prefill_seconds,
            decode_seconds,
        )


class _Run:
    """The forwards of one speculative generation: positions and masks as tokens come, proposals, acceptance."""

    def __init__(self, model, input_ids, attention_mask, eos_token_id, pad_token_id, sampling):
        self.model = model
        self.sampling = sampling
        self.prompt_length = input_ids.shape[1]
        self.mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self.first_position = self.mask.long().sum(dim=-1, keepdim=True)  # of the first generated token
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.eos = torch.tensor(eos, dtype=input_ids.dtype, device=input_ids.device)
        self.pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)

    def forward(self, cache: PolyCache, ids: torch.Tensor, keep: int) -> torch.Tensor:
        """Logits (B, keep, V) of the last ``keep`` of ``ids``, which follow what ``cache`` holds."""
        start, count = cache.get_seq_length(), ids.shape[1]
        generated = start + count - self.prompt_length
        mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], generated)], dim=1)
        positions = self.first_position + torch.arange(start - self.prompt_length, generated, device=ids.device)
        output = self.model(
            ids, attention_mask=mask, position_ids=positions, logits_to_keep=keep, **cache_argument(self.model, cache)
        )
        return output.logits

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The token the full cache picks after each of ``logits`` (B, n, V)."""
        return logits.argmax(dim=-1) if self.sampling is None else self.sampling.choose(logits)

    def propose(self, cache: PolyCache, behind: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``count`` proposals (B, count) after feeding ``behind`` to the draft cache, and (when sampling) the
        draft's distribution at each (B, count, V)."""
        proposals, probabilities = [], []
        feed = behind
        for _ in range(count):
            logits = self.forward(cache, feed, 1)[:, -1]
            if self.sampling is None:
                token = logits.argmax(dim=-1)
            else:
                probabilities.append(self.sampling.probabilities(logits))
                token = torch.multinomial(probabilities[-1], 1)[:, 0]
            proposals.append(token)
            feed = token[:, None]
        stacked = torch.stack(proposals, dim=1) if proposals else behind.new_zeros(behind.shape[0], 0)
        return stacked, torch.stack(probabilities, dim=1) if probabilities else None

    def accept(
        self, proposals: torch.Tensor, draft: torch.Tensor | None, logits: torch.Tensor, active: torch.Tensor
    ) -> tuple[torch.Tensor, int, torch.Tensor]:
        """The new tokens (B, kept + 1), how many proposals the batch kept, and how many each row would keep.

        ``logits`` (B, count + 1, V) are the full cache's after the last generated token and each
        proposal; rows that already ended (not ``active``) do not hold the batch back.
        """
        count = proposals.shape[1]
        if self.sampling is None:
            chosen = logits.argmax(dim=-1)
            agrees = proposals == chosen[:, :count]
        else:
            target = self.sampling.probabilities(logits)
            agrees = proposals.new_zeros(proposals.shape, dtype=torch.bool)
            if count:
                offered = proposals[..., None]
                ratio = target[:, :count].gather(-1, offered)[..., 0] / draft.gather(-1, offered)[..., 0]
                agrees = torch.rand_like(ratio) < ratio
        alone = agrees.int().cumprod(dim=1).sum(dim=1)
        kept = int(alone[active].min()) if bool(active.any()) else count
        if self.sampling is None:
            return chosen[:, : kept + 1], kept, alone
        # At the first place some row refused: rows that kept the proposal there keep it; the others draw
        # from what the full cache's distribution has beyond the draft's (all of it after the last proposal).
        after = target[:, kept]
        if kept < count:
            beyond = (after - draft[:, kept]).clamp(min=0)
            mass = beyond.sum(dim=-1, keepdim=True)
            after = torch.where(mass > 0, beyond / mass.clamp(min=torch.finfo(mass.dtype).tiny), after)
        drawn = torch.multinomial(after, 1)[:, 0]
        if kept < count:
            drawn = torch.where(alone > kept, proposals[:, kept], drawn)
        return torch.cat([proposals[:, :kept], drawn[:, None]], dim=1), kept, alone

    def active(self, generated: torch.Tensor) -> torch.Tensor:
        """Rows that have not produced an end-of-sequence token, (B,)."""
        if not len(self.eos):
            return torch.ones(generated.shape[0], dtype=torch.bool, device=generated.device)
        return ~torch.isin(generated, self.eos).any(dim=1)

    def all_ended(self, generated: torch.Tensor) -> bool:
        return bool(len(self.eos)) and not bool(self.active(generated).any())

    def finished(self, generated: torch.Tensor) -> torch.Tensor:
        """``generated`` with the pad token after each row's end, cut where the last row ended."""
        if not len(self.eos):
            return generated
        ends = torch.isin(generated, self.eos)
        after = (ends.int().cumsum(dim=1) - ends.int()) > 0
        generated = generated.masked_fill(after, self.pad)
        if bool(ends.any(dim=1).all()):
            generated = generated[:, : int(ends.int().argmax(dim=1).max()) + 1]
        return generated

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
prefill. In a batch each row keeps what it accepted: a proposal another row kept and this one
refused stays in the caches as a hole that the attention mask hides (slots no row kept are
cropped). Sliding windows count slots, not tokens, so where the model has them every row keeps
what all rows kept instead; each row's output is still exactly its own, and the statistics say
what the batch gave up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from polykv.cache.cache import PolyCache
from polykv.cache.layer import PhaseRule
from polykv.decoding.ends import device_time, end_tokens, padded_after_end
from polykv.decoding.precision import draft_model, tf32_matmuls
from polykv.decoding.static import Sampling
from polykv.decoding.static_speculation import StaticChecks
from polykv.errors import ArgumentError, ArgumentTypeError
from polykv.harness.capture import capture
from polykv.model.describe import cache_argument
from polykv.plan.plan import Plan
from polykv.registry import Registry, default_registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@attrs.frozen
class Speculation:
    """What ``speculative_generate`` produced, and how well the draft guessed.

    ``tokens``: the prompt and its continuation (B, L + new). Counts are summed over the rows still
    generating at each check: ``drafted`` proposals made, ``accepted`` proposals kept (per check in
    ``accepted_per_step``), ``row_accepted`` proposals each row would have kept alone (more than
    ``accepted`` only where rows keep what all rows kept), ``row_steps`` checks. ``full_nbytes``
    and ``draft_nbytes``: what the two caches held after the prefill. ``prefill_seconds`` and
    ``decode_seconds``: wall time of the prefill (both caches) and of the rest, the device synchronised.
    ``idle_checks``: checks of fixed shapes that ran after every row had finished (the host reads the rows
    only now and then; none without end tokens).
    """

    tokens: torch.Tensor
    drafted: int
    accepted: int
    accepted_per_step: tuple[int, ...]
    row_accepted: int
    row_steps: int
    full_nbytes: int
    draft_nbytes: int
    prefill_seconds: float
    decode_seconds: float
    warmup_seconds: float
    warmup_tokens: int
    new_tokens: int
    static: bool
    idle_checks: int = 0

    @property
    def tokens_per_second(self) -> float:
        """New tokens per second of decoding after the first check (all rows)."""
        seconds = self.decode_seconds - self.warmup_seconds
        tokens = self.new_tokens - self.tokens.shape[0] - self.warmup_tokens
        return tokens / seconds if seconds > 0 else 0.0

    @property
    def steps(self) -> int:
        """Forwards over the full cache after the prefill while any row was generating (checks; ``idle_checks``
        ran besides)."""
        return len(self.accepted_per_step)

    @property
    def acceptance(self) -> float:
        """The share of proposals kept."""
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def row_acceptance(self) -> float:
        """The share of proposals a row would have kept alone."""
        return self.row_accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_step(self) -> float:
        """New tokens per row and check (1 means the draft never helped)."""
        return (self.accepted + self.row_steps) / self.row_steps if self.row_steps else 0.0


#: Tokens the draft proposes per check when none is asked for.
DEFAULT_LOOKAHEAD = 4


@torch.no_grad()
def speculative_generate(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    *,
    draft: Plan,
    max_new_tokens: int,
    lookahead: int = DEFAULT_LOOKAHEAD,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    sampling: Sampling | None = None,
    registry: Registry | None = None,
    static: bool | None = None,
    compile_step: bool = False,
    draft_tf32: bool = False,
    draft_dtype: torch.dtype | None = None,
) -> Speculation:
    """Continue ``input_ids`` (B, L, left-padded as ``attention_mask`` says) by ``max_new_tokens`` tokens,
    drafting ``lookahead`` at a time with ``draft``'s compressed cache and keeping what the full cache
    confirms (see the module docstring). ``draft`` is a plan for this model (``polykv.compile``); the
    model is prepared for it while this runs. Greedy unless ``sampling`` is given. A row that produced
    an end-of-sequence token continues with ``pad_token_id``; generation stops when every row has.

    ``static`` runs the checks with fixed shapes, each one CUDA graph replay on CUDA (eagerly on the
    CPU), greedy or sampled, on a model without sliding windows, with decode policies that rank in a
    static step (``static_problem`` says why not). Default: wherever it can (ordinary forwards cannot take back
    the newest tokens of a draft layer that ranks them away per head while decoding). ``compile_step`` runs
    the static checks' forwards through ``torch.compile`` (``polykv.decoding.compiled``); it needs ``static``.
    ``draft_tf32`` has a float32 model draft with TF32 matrix products on CUDA, and check in float32: the
    output is unchanged, the draft's steps cheaper (``polykv.decoding.precision``). ``draft_dtype`` (such as
    ``torch.bfloat16``) has the draft run a twin of the model with its weights in that dtype, and its cache hold
    keys and values in it, while the checks run the model as it is: the same output, draft steps that read half
    the bytes, and the twin's weights in memory besides.
    """
    if not isinstance(draft, Plan):
        raise ArgumentTypeError(f"draft is a polykv.Plan (polykv.compile(spec, model)), got {type(draft).__name__}")
    for name, value, least in (("max_new_tokens", max_new_tokens, 1), ("lookahead", lookahead, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ArgumentError(f"{name} is a whole number of at least {least}, got {value!r}")
    if not isinstance(draft_tf32, bool):
        raise ArgumentTypeError(f"draft_tf32 is True or False, got {draft_tf32!r}")
    if draft_dtype is not None:
        _check_floating(draft_dtype)
    if draft_tf32 and draft_dtype not in (None, torch.float32):
        raise ArgumentError(
            f"draft_tf32 has a float32 draft's products use TF32, and this draft runs in {draft_dtype}: "
            "give one of draft_tf32 and draft_dtype"
        )
    drafter = draft_model(model, draft_dtype)
    problem = static_problem(draft, registry, lookahead, input_ids.shape[-1])
    if static and problem:
        raise ArgumentError(f"static speculation cannot run here: {problem}")
    static = not problem if static is None else static
    if compile_step and not static:
        raise ArgumentError(
            f"compile_step compiles the static checks, which cannot run here: {problem or 'static=False was given'}"
        )
    clock = _Clock(input_ids.device)
    with draft.apply(model), draft.apply(drafter):
        captured = capture(
            model,
            input_ids,
            attention_mask,
            needs=draft.needs(registry),
            room=0 if static else max_new_tokens + lookahead + 1,
            reconstruction=draft.reconstruction,
        )
        if static:
            return _speculate_statically(
                model, captured, draft, registry, input_ids, attention_mask, clock,
                lookahead=lookahead, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                pad_token_id=pad_token_id, sampling=sampling, compile_step=compile_step, draft_tf32=draft_tf32,
                draft_model=drafter,
            )  # fmt: skip
        full = _Track(captured.cache(share_room=True), input_ids, attention_mask)  # appends into spare room
        drafting = _Track(captured.cache_for(draft, registry, drafter.dtype), input_ids, attention_mask)
        ragged = not any(layer.sliding_window for layer in draft.layers)
        run = _Run(input_ids, max_new_tokens, eos_token_id, pad_token_id, sampling)
        newest = run.choose(captured.logits)  # each row's newest token, in neither cache yet
        run.record(newest[:, None], torch.zeros_like(newest))
        behind, behind_real = newest[:, None], torch.ones_like(newest[:, None], dtype=torch.bool)  # not in the draft
        statistics = _Statistics(full.cache.nbytes(), drafting.cache.nbytes(), clock.lap())
        warmup = None
        while run.active().any():
            active = run.active()
            count = min(lookahead, run.most_remaining() - 1)
            with tf32_matmuls(draft_tf32):
                proposals, draft_probabilities = run.propose(drafter, drafting, behind, behind_real, count)
            verified = full.forward(model, torch.cat([newest[:, None], proposals], dim=1), count + 1)
            kept, alone, newest = run.accept(proposals, draft_probabilities, verified, active, ragged)
            full.keep(kept + 1, count + 1)  # the previous newest token and the proposals kept
            if count:
                drafting.keep(kept.clamp(max=count - 1), count - 1)  # the last proposal never went in
                waiting = kept == count  # the last proposal was kept: the draft still needs it
                behind = torch.stack([proposals[:, -1], newest], dim=1)
                behind_real = torch.stack([waiting, torch.ones_like(waiting)], dim=1)
                if not bool(waiting.any()):
                    behind, behind_real = behind[:, 1:], behind_real[:, 1:]
            else:
                behind = torch.cat([behind, newest[:, None]], dim=1)
                behind_real = torch.cat([behind_real, torch.ones_like(behind_real[:, :1])], dim=1)
            statistics.add(count, kept, alone, active)
            tokens = torch.cat([proposals, proposals.new_zeros(proposals.shape[0], 1)], dim=1)
            made = int(run.lengths.sum())
            run.record(tokens.scatter(1, kept[:, None], newest[:, None]), kept, active)
            if warmup is None:
                warmup = (clock.elapsed(), int(run.lengths.sum()) - made)
    tokens = torch.cat([input_ids, run.finished()], dim=1)
    return statistics.result(tokens, clock.lap(), *(warmup or (0.0, 0)), int(run.lengths.sum()), static=False)


def _check_floating(dtype: object) -> None:
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ArgumentTypeError(f"draft_dtype is a floating torch dtype (such as torch.bfloat16), got {dtype!r}")


def static_problem(draft: Plan, registry: Registry | None, lookahead: int, prompt_length: int) -> str | None:
    """Why speculation with ``draft``, ``lookahead`` tokens a check, cannot run with fixed shapes after a prompt
    of ``prompt_length`` tokens, or None where it can."""
    registry = default_registry() if registry is None else registry
    for layer in draft.layers:
        if layer.sliding_window:
            return f"layer {layer.index} has a sliding window, which counts slots, so its slots cannot hold holes"
        for decode in [layer.decode, *(head.decode for head in layer.heads)]:
            if decode is None:
                continue
            rule = PhaseRule.of(decode, registry)
            bound = rule.tokens(prompt_length)
            if bound is None:
                continue
            if not rule.policy.static_decoding:
                return (
                    f"layer {layer.index} evicts while decoding with {decode.describe()}, which cannot rank its "
                    "tokens in a static step (the policy does not declare static_decoding = True)"
                )
            if lookahead and bound - (lookahead + 1) < rule.policy.min_budget():
                return (
                    f"layer {layer.index} keeps {bound} tokens while decoding, too few to take checks of "
                    f"{lookahead + 1} tokens and keep the {rule.policy.min_budget()} its policy needs"
                )
    return None


def _speculate_statically(
    model, captured, draft: Plan, registry, input_ids, attention_mask, clock: _Clock, **options
) -> Speculation:
    """``speculative_generate`` with checks of fixed shapes (``StaticChecks``), after the capture."""
    full = captured.cache(share_room=True)
    drafting = captured.cache_for(draft, registry, options["draft_model"].dtype)
    statistics = _Statistics(full.nbytes(), drafting.nbytes(), 0.0)
    sampling = options["sampling"]
    newest = captured.logits.argmax(dim=-1) if sampling is None else sampling.choose(captured.logits)
    real = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    checks = StaticChecks(model, full, drafting, newest, real.sum(dim=-1), graph=input_ids.is_cuda, **options)
    statistics.prefill_seconds = clock.lap()
    warmup = checks.run()
    made = checks.tokens()
    new_tokens = int(checks.lengths.sum())  # a row never records past max_new_tokens
    (
        statistics.drafted,
        statistics.accepted,
        statistics.row_accepted,
        statistics.row_steps,
        per_check,
        statistics.idle_checks,
    ) = checks.statistics()
    statistics.per_step = list(per_check)
    return statistics.result(torch.cat([input_ids, made], dim=1), clock.lap(), *warmup, new_tokens, static=True)


class _Clock:
    """Wall time between laps, the device's queued work included."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last = device_time(device)

    def lap(self) -> float:
        now = device_time(self.device)
        seconds, self.last = now - self.last, now
        return seconds

    def elapsed(self) -> float:
        """Since the last lap."""
        return device_time(self.device) - self.last


class _Statistics:
    def __init__(self, full_nbytes: int, draft_nbytes: int, prefill_seconds: float):
        self.drafted = self.accepted = self.row_accepted = self.row_steps = 0
        self.per_step: list[int] = []
        self.idle_checks = 0
        self.nbytes = (full_nbytes, draft_nbytes)
        self.prefill_seconds = prefill_seconds

    def add(self, count: int, kept: torch.Tensor, alone: torch.Tensor, active: torch.Tensor) -> None:
        rows = int(active.sum())
        self.drafted += count * rows
        self.per_step.append(int(kept[active].sum()))
        self.accepted += self.per_step[-1]
        self.row_accepted += int(alone[active].sum())
        self.row_steps += rows

    def result(
        self,
        tokens: torch.Tensor,
        decode_seconds: float,
        warmup_seconds: float,
        warmup_tokens: int,
        new_tokens: int,
        *,
        static: bool,
    ) -> Speculation:
        return Speculation(
            tokens,
            self.drafted,
            self.accepted,
            tuple(self.per_step),
            self.row_accepted,
            self.row_steps,
            *self.nbytes,
            self.prefill_seconds,
            decode_seconds,
            warmup_seconds,
            warmup_tokens,
            new_tokens,
            static,
            self.idle_checks,
        )


class _Track:
    """A cache, and which of its slots hold the row's tokens (not padding, nor a proposal the row refused)."""

    def __init__(self, cache: PolyCache, input_ids: torch.Tensor, attention_mask: torch.Tensor | None):
        self.cache = cache
        self.real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        cache.activate_past_recording()  # sliding windows keep what a crop needs

    def forward(self, model, ids: torch.Tensor, keep: int, real: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, keep, V) of the last ``keep`` of ``ids``; ``real`` (B, n) marks holes among them."""
        real = torch.ones_like(ids, dtype=torch.bool) if real is None else real
        before = self.real.sum(dim=-1, keepdim=True)  # a token's position: the row's tokens before it
        positions = (before + real.long().cumsum(dim=-1) - 1).clamp(min=0)
        self.real = torch.cat([self.real, real], dim=1)
        output = model(
            ids,
            attention_mask=self.real.long(),
            position_ids=positions,
            logits_to_keep=keep,
            **cache_argument(model, self.cache),
        )
        return output.logits

    def keep(self, kept: torch.Tensor, fed: int) -> None:
        """Of the last ``fed`` slots, row b keeps the first ``kept[b]``: the others become holes, and the
        slots no row keeps are cropped."""
        if fed == 0:
            return
        slots = self.real.shape[1]
        refused = torch.arange(fed, device=kept.device)[None, :] >= kept[:, None]
        self.real[:, slots - fed :] &= ~refused
        unused = fed - int(kept.max())
        if unused:
            self.cache.crop(-unused)
            self.real = self.real[:, : slots - unused]


class _Run:
    """The rows' generated tokens, the choice of tokens, and what each row accepts."""

    def __init__(self, input_ids, max_new_tokens: int, eos_token_id, pad_token_id, sampling: Sampling | None):
        self.sampling = sampling
        self.eos, self.pad = end_tokens(eos_token_id, pad_token_id, input_ids)
        rows = input_ids.shape[0]
        self.generated = input_ids.new_full((rows, max_new_tokens), self.pad)
        self.lengths = input_ids.new_zeros(rows)
        self.ended = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The full cache's token after ``logits`` (B, V)."""
        return logits.argmax(dim=-1) if self.sampling is None else self.sampling.choose(logits)

    def active(self) -> torch.Tensor:
        """Rows still generating: no end-of-sequence token yet, and room for more, (B,)."""
        return ~self.ended & (self.lengths < self.generated.shape[1])

    def most_remaining(self) -> int:
        return int((self.generated.shape[1] - self.lengths)[self.active()].max())

    def record(self, tokens: torch.Tensor, kept: torch.Tensor, active: torch.Tensor | None = None) -> None:
        """Row b gains ``tokens[b, : kept[b] + 1]`` (as far as ``max_new_tokens`` reaches), if ``active``."""
        active = self.active() if active is None else active
        limit = self.generated.shape[1]
        offsets = torch.arange(tokens.shape[1], device=tokens.device)[None, :]
        columns = self.lengths[:, None] + offsets
        valid = (offsets <= kept[:, None]) & (columns < limit) & active[:, None]
        rows = torch.arange(tokens.shape[0], device=tokens.device)[:, None].expand_as(columns)
        self.generated[rows[valid], columns[valid]] = tokens[valid]
        self.lengths += valid.sum(dim=1)
        if len(self.eos):
            self.ended |= (torch.isin(tokens, self.eos) & valid).any(dim=1)

    def propose(
        self, model, track: _Track, behind: torch.Tensor, real: torch.Tensor | None, count: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``count`` proposals (B, count) after feeding ``behind`` (``real`` marks its holes) to the draft
        cache, and (when sampling) the draft's distribution at each (B, count, V)."""
        proposals, probabilities = [], []
        for _ in range(count):
            logits = track.forward(model, behind, 1, real)[:, -1]
            if self.sampling is None:
                token = logits.argmax(dim=-1)
            else:
                probabilities.append(self.sampling.probabilities(logits))
                token = torch.multinomial(probabilities[-1], 1)[:, 0]
            proposals.append(token)
            behind, real = token[:, None], None
        stacked = torch.stack(proposals, dim=1) if proposals else behind.new_zeros(behind.shape[0], 0)
        return stacked, torch.stack(probabilities, dim=1) if probabilities else None

    def accept(
        self,
        proposals: torch.Tensor,
        draft: torch.Tensor | None,
        logits: torch.Tensor,
        active: torch.Tensor,
        ragged: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """How many proposals each row keeps, how many it would keep alone, and its next token (each (B,)).

        ``logits`` (B, count + 1, V) are the full cache's after the newest token and each proposal.
        Rows keep what they accepted (``ragged``) or what every active row accepted; rows that no
        longer generate keep nothing and hold nobody back.
        """
        count = proposals.shape[1]
        if self.sampling is None:
            chosen = logits.argmax(dim=-1)
            agrees = proposals == chosen[:, :count]
        else:
            target = self.sampling.probabilities(logits)
            agrees = torch.zeros_like(proposals, dtype=torch.bool)
            if count:
                assert draft is not None  # sampled proposals come with the draft's distribution
                agrees = Sampling.accepts(target[:, :count], draft, proposals)
        alone = agrees.int().cumprod(dim=1).sum(dim=1)
        kept = alone if ragged or not bool(active.any()) else torch.full_like(alone, int(alone[active].min()))
        kept = kept.masked_fill(~active, 0)
        if self.sampling is None:
            return kept, alone, chosen.gather(1, kept[:, None])[:, 0]
        # Where a row refused a proposal it draws from what the full cache has beyond the draft there; a row that
        # accepted it (kept short by the others) keeps it; after the last proposal it draws from the full cache.
        vocabulary = target.shape[-1]
        after = target.gather(1, kept[:, None, None].expand(-1, 1, vocabulary))[:, 0]
        if count:
            assert draft is not None  # as above
            at = kept.clamp(max=count - 1)
            offered = draft.gather(1, at[:, None, None].expand(-1, 1, vocabulary))[:, 0]
            after = torch.where((kept < count)[:, None], Sampling.beyond(after, offered), after)
        drawn = torch.multinomial(after, 1)[:, 0]
        if count:
            drawn = torch.where(alone > kept, proposals.gather(1, at[:, None])[:, 0], drawn)
        return kept, alone, drawn

    def finished(self) -> torch.Tensor:
        """The generated tokens, the pad token after each row's end, cut where the last row ended."""
        return padded_after_end(self.generated, self.eos, self.pad)

"""Generation whose decoding steps are one CUDA graph replay each.

``model.generate`` drives every decoding step from Python: on an 8B model that is some 1,500
kernel launches per token, and a compressed cache that reads 64x fewer keys decodes no faster,
because the host, not the GPU, sets the pace (docs/performance.md). ``static_generate`` runs the
prefill and one ordinary decoding step (which brings decode-bounded layers within their bounds and
warms the kernels up), switches the cache to static decoding (``polykv.cache.static``: fixed slots,
masks from stored positions, no host round trip), captures the step in CUDA graphs (one per set
of layers that evict in it) and replays them for every later token. The slots are reserved in stages,
each with room for as many tokens as were made before it (from FIRST_ROOM, doubling), so a step
costs what the cache holds and a large ``max_new_tokens`` costs nothing until it is used; each
stage captures its own graphs. On the CPU the same static
step runs eagerly, which is how its exactness is tested against ``model.generate``.

The next token is the most likely one, or sampled (``Sampling``: temperature, top-k, top-p). A row
that produced an end-of-sequence token continues with the pad token; the host reads the tokens
every ``check_every`` steps to stop once every row has ended.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from polykv.cache.cache import CacheState, PolyCache
from polykv.cache.positions import prompt_positions
from polykv.decoding.compiled import compiled_forward
from polykv.decoding.ends import end_tokens
from polykv.errors import ArgumentError, CacheError
from polykv.model.describe import cache_argument

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: Tokens the first static stage has room for; each later stage has twice the room of the one before.
FIRST_ROOM = 256


@torch.no_grad()
def static_generate(
    model: PreTrainedModel,
    cache: PolyCache,
    input_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    graph: bool | None = None,
    check_every: int = 32,
    eviction_slack: int | None = None,
    on_token: Callable[[], None] | None = None,
    sampling: Sampling | None = None,
    compile_step: bool = False,
) -> torch.Tensor:
    """The continuation of ``input_ids`` (B, L), left-padded as ``attention_mask`` says: (B, L + new).

    ``cache`` is a fresh ``plan.make_cache()`` and the model is prepared (``plan.apply``). ``graph``
    chooses CUDA-graph replay (default: on CUDA); without it the static step runs eagerly.
    ``eviction_slack`` trades exactness for speed with decode policies (by default; 0 decodes exactly
    as ``model.generate``): see ``StaticDecoder``.
    ``on_token`` is called on the host after each token is queued (for progress; it reads nothing
    from the device). ``sampling`` samples instead of choosing greedily (see ``Sampling``).
    ``compile_step`` runs the static step's forward through ``torch.compile`` (``polykv.decoding.compiled``):
    fewer, fused kernels per step, after compiling each new input shape first.
    """
    on_token = on_token or (lambda: None)
    if cache.state is not CacheState.FRESH:
        raise CacheError(
            f"static_generate needs a fresh cache (this one is {cache.state.value}): make one with plan.make_cache()"
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ArgumentError(f"max_new_tokens is a whole number of at least 1, got {max_new_tokens!r}")
    if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
        raise ArgumentError(f"check_every is a whole number of steps of at least 1, got {check_every!r}")
    stops = _Stops(eos_token_id, pad_token_id, input_ids, sampling)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    positions = prompt_positions(attention_mask)

    generated = [_next_token(model, cache, stops, input_ids, positions, attention_mask)]
    on_token()
    if max_new_tokens >= 2:
        # One ordinary step: it ends the prefill and evicts decode-bounded layers down to their bound.
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
        generated.append(_next_token(model, cache, stops, generated[-1][:, None], positions, attention_mask))
        on_token()
    later: list[torch.Tensor] = []  # (B, n) tokens of each static stage
    remaining, room, positions = max_new_tokens - len(generated), FIRST_ROOM, positions + 1
    while remaining and not stops.all_ended():
        # A static step attends over every slot, so each stage has room for as many tokens as were made
        # before it (doubling), not for max_new_tokens: the cost follows the tokens held.
        stage = min(remaining, room)
        with StaticDecoder(
            model,
            cache,
            later[-1][:, -1] if later else generated[-1],
            positions,
            room=stage,
            graph=graph,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            ended=stops.ended,
            eviction_slack=eviction_slack,
            sampling=sampling,
            compile_step=compile_step,
        ) as decoder:
            decoder.run(stage, check_every, on_step=on_token)
        later.append(decoder.tokens)
        stops.ended = decoder.stops.ended
        remaining, room, positions = remaining - decoder.produced, room * 2, positions + decoder.produced
    new = torch.cat([torch.stack(generated, dim=1), *later], dim=1)
    return torch.cat([input_ids, stops.trimmed(new)], dim=1)


class StaticDecoder:
    """Static decoding steps after a prefill and one ordinary step: on CUDA each step is one graph replay.

    Holds the cache in static decoding from construction to ``close`` (or the end of a ``with``
    block), with room for ``room`` tokens; ``produced`` counts the steps run. Which layers evict in a
    step is known on the host in advance (counts do not depend on the data), and each set of them
    gets its own graph, captured the first time it comes: that step runs for real on a side stream
    (the warm-up a capture needs), and the capture serves the later ones. ``eviction_slack`` lets
    decode-bounded layers evict ``slack + 1`` tokens at once, so that most steps evict nothing
    (they then hold between bound - slack and bound tokens). By default (None) the slack is 31
    tokens, at most a sixteenth of the bound, which makes eviction cost about 1% of a step where
    evicting at every step costs 44% (docs/performance.md); 0 evicts at every step, exactly as
    ``model.generate`` does, and is what the tests compare with it.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        cache: PolyCache,
        last_tokens: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        room: int,
        graph: bool | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        ended: torch.Tensor | None = None,
        eviction_slack: int | None = None,
        sampling: Sampling | None = None,
        compile_step: bool = False,
    ):
        """``last_tokens`` (B,) are fed first, at ``position_ids`` (B, 1); ``ended`` (B,) marks rows that
        already produced an end-of-sequence token; ``compile_step`` runs the step's forward compiled."""
        self.graph = last_tokens.is_cuda if graph is None else graph
        if self.graph and not last_tokens.is_cuda:
            raise CacheError("CUDA-graph decoding needs the model and the prompt on a CUDA device")
        self._model, self._cache = model, cache
        self._forward = compiled_forward(model) if compile_step else model
        self.stops = _Stops(eos_token_id, pad_token_id, last_tokens, sampling)
        if ended is not None:
            self.stops.ended |= ended
        self._ids = last_tokens[:, None].clone()
        self._position_ids = position_ids.clone()
        self._tokens = torch.full(
            (self._ids.shape[0], room), self.stops.pad, dtype=self._ids.dtype, device=self._ids.device
        )
        self._written = torch.zeros(1, dtype=torch.long, device=self._ids.device)
        self.room, self.produced, self.closed = room, 0, False
        cache.begin_static(room=room, slack=eviction_slack)
        self._graphs: dict[tuple[int, ...], Callable[[], None]] = {}  # by the layers that evict in the step

    def _step(self) -> None:
        token = _next_token(self._model, self._cache, self.stops, self._ids, self._position_ids, forward=self._forward)
        self._tokens.index_copy_(1, self._written, token[:, None])
        self._written.add_(1)
        self._ids.copy_(token[:, None])
        self._position_ids.add_(1)

    @torch.no_grad()
    def run(self, steps: int, check_every: int = 32, on_step: Callable[[], None] | None = None) -> None:
        """Run up to ``steps`` more steps, stopping early once every row has ended (checked every
        ``check_every``); ``on_step`` is called on the host after each step is queued."""
        if self.closed:
            raise CacheError(
                "this decoder is closed: its cache went back to ordinary decoding; make a new StaticDecoder"
            )
        if self.produced + steps > self.room:
            raise CacheError(f"the decoder has room for {self.room} tokens; {self.produced} are made")
        for done in range(1, steps + 1):
            evicting = self._cache.plan_static_step()
            if not self.graph:
                self._step()
            elif evicting in self._graphs:
                self._graphs[evicting]()
            else:
                self._graphs[evicting] = captured_replay(self._step)
            self._cache.static_stepped()
            self.produced += 1
            if on_step is not None:
                on_step()
            if done % check_every == 0 and self.stops.all_ended():
                break

    @property
    def tokens(self) -> torch.Tensor:
        """(B, produced) the tokens made so far."""
        return self._tokens[:, : self.produced]

    def close(self) -> None:
        """Hand the cache back to ordinary decoding, holding every token fed so far."""
        if not self.closed:
            self._cache.end_static(self.produced)
            self.closed = True

    def __enter__(self) -> StaticDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _next_token(model, cache: PolyCache, stops: _Stops, ids, position_ids, mask=None, forward=None) -> torch.Tensor:
    """One forward of ``ids`` (B, n) at ``position_ids`` through ``cache``: the next token of each row (B,).
    ``forward`` runs the model (default: the model itself; ``compiled_forward(model)`` fuses its kernels)."""
    output = (forward or model)(
        input_ids=ids,
        attention_mask=mask,
        position_ids=position_ids,
        **cache_argument(model, cache),
        use_cache=True,
        logits_to_keep=1,
    )
    return stops.next_token(output.logits[:, -1])


def captured_replay(step: Callable[[], None]) -> Callable[[], None]:
    """Run ``step`` once for real on a side stream (warm-up), capture it, and return the graph's replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


@attrs.frozen
class Sampling:
    """Sampling instead of greedy choice: ``temperature``, then the ``top_k`` most likely tokens and
    the smallest set whose probability reaches ``top_p`` (each off when None).

    Draws with the Gumbel-max trick from the default generator (``torch.manual_seed``), on the
    device and inside a captured step.
    """

    temperature: float = attrs.field(default=1.0, validator=attrs.validators.gt(0.0))
    top_k: int | None = attrs.field(default=None, validator=attrs.validators.optional(attrs.validators.ge(1)))
    top_p: float | None = attrs.field(
        default=None, validator=attrs.validators.optional([attrs.validators.gt(0.0), attrs.validators.le(1.0)])
    )

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """One token per row of ``logits`` (B, V)."""
        return _gumbel_max(self.scores(logits))

    @staticmethod
    def draw(probabilities: torch.Tensor) -> torch.Tensor:
        """One token per row of ``probabilities`` (..., V), drawn from them (Gumbel-max, as ``choose``)."""
        return _gumbel_max(probabilities.log())

    @staticmethod
    def accepts(target: torch.Tensor, drafted: torch.Tensor, proposals: torch.Tensor) -> torch.Tensor:
        """Speculative sampling's test: whether each of ``proposals`` (B, n), drawn from ``drafted`` (B, n, V), is
        kept under ``target`` (B, n, V): with probability min(1, p/q) of the proposed token."""
        offered = proposals[..., None]
        ratio = target.gather(-1, offered)[..., 0] / drafted.gather(-1, offered)[..., 0]
        return torch.rand_like(ratio) < ratio

    @staticmethod
    def beyond(target: torch.Tensor, drafted: torch.Tensor) -> torch.Tensor:
        """What ``target`` has beyond ``drafted`` (each (..., V)), normalised: where a proposal was refused, the
        token is drawn from it, so the output has ``target``'s distribution (``target`` where nothing is beyond)."""
        excess = (target - drafted).clamp(min=0)
        mass = excess.sum(dim=-1, keepdim=True)
        return torch.where(mass > 0, excess / mass.clamp(min=torch.finfo(mass.dtype).tiny), target)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution ``choose`` draws from, over the last dimension of ``logits``."""
        return self.scores(logits).softmax(dim=-1)

    def scores(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` tempered, with the tokens outside top-k and top-p at minus infinity."""
        scores = logits.float() / self.temperature
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            kth = scores.topk(self.top_k, dim=-1).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -math.inf)
        if self.top_p is not None:
            ordered, order = scores.sort(dim=-1, descending=True)
            before = ordered.softmax(dim=-1).cumsum(dim=-1) - ordered.softmax(dim=-1)  # mass of likelier tokens
            outside = (before >= self.top_p).scatter(-1, order, before >= self.top_p)
            scores = scores.masked_fill(outside, -math.inf)
        return scores


def _gumbel_max(log_weights: torch.Tensor) -> torch.Tensor:
    """One index per row of ``log_weights`` (..., V), drawn in proportion to their exponentials: the argmax
    after adding Gumbel noise from the default generator (no host round trip, so it runs in a captured step)."""
    uniform = torch.rand_like(log_weights).clamp(min=torch.finfo(torch.float32).tiny)
    return (log_weights - torch.log(-torch.log(uniform))).argmax(dim=-1)


class _Stops:
    """The choice of the next token (greedy or sampled), and which rows have ended (on the device)."""

    def __init__(self, eos_token_id, pad_token_id, input_ids: torch.Tensor, sampling: Sampling | None = None):
        self.sampling = sampling
        self.eos, self.pad = end_tokens(eos_token_id, pad_token_id, input_ids)
        self.ended = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def next_token(self, logits: torch.Tensor) -> torch.Tensor:
        token = logits.argmax(dim=-1) if self.sampling is None else self.sampling.choose(logits)
        if not len(self.eos):
            return token
        token = token.masked_fill(self.ended, self.pad)
        self.ended |= torch.isin(token, self.eos)
        return token

    def trimmed(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` (B, n) without the columns after every row's first end-of-sequence token."""
        if not len(self.eos):
            return tokens
        ends = torch.isin(tokens, self.eos)
        first = torch.where(ends.any(dim=1), ends.int().argmax(dim=1), tokens.shape[1] - 1)
        return tokens[:, : int(first.max()) + 1]

    def all_ended(self) -> bool:
        return bool(len(self.eos)) and bool(self.ended.all())

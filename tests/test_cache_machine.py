"""The cache as a state machine: any sequence of operations keeps it equal to a simple reference.

Operations: prefill (whole or in chunks), decoding steps (with decode-time eviction), rewind, crop,
reset, beam reorder, and a new question about the same compressed context. The reference says
which positions each layer holds, using policies whose choice is a function of positions alone
(full, streaming), and after each forward the logits must equal full attention with exactly the
positions the reference says are gone masked out.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from test_cache import _masked_reference_model, hide_evicted
from transformers import DynamicCache

import polykv
from polykv import cache_argument
from polykv.testing import tiny_model

SINK, PREFILL_BUDGET, DECODE_BUDGET = 2, 10, 16
SPEC = (
    f"layers 0: full; 1: full decode streaming@{DECODE_BUDGET}(sink={SINK}); "
    f"*: streaming@{PREFILL_BUDGET}(sink={SINK}) decode streaming@{DECODE_BUDGET}(sink={SINK})"
)


class Reference:
    """Which positions each layer holds: the whole sequence, or sinks and the most recent tokens."""

    def __init__(self):
        self.seen, self.prefilling = 0, True
        self.held: list[list[int]] = [[], [], [], []]

    def forward(self, new: int, *, ends_prompt: bool) -> None:
        """``new`` tokens: of the prompt (compressed when it ends) or, after it, decoded."""
        added = list(range(self.seen, self.seen + new))
        self.seen += new
        for layer in range(4):
            self.held[layer] += added
        if self.prefilling and not ends_prompt:
            return
        for layer in range(1, 4):
            bound = PREFILL_BUDGET if self.prefilling and layer >= 2 else (None if self.prefilling else DECODE_BUDGET)
            if bound is not None and len(self.held[layer]) > bound:
                self.held[layer] = self.held[layer][:SINK] + self.held[layer][-(bound - SINK) :]
        self.prefilling = False

    def rewind(self, length: int) -> None:
        self.seen = min(self.seen, length)
        self.held = [[p for p in layer if p < length] for layer in self.held]


class CacheMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.model = tiny_model("llama", "eager", seed=3)
        self.reference_model = _masked_reference_model()
        self.plan = polykv.compile(SPEC, self.model)

    @initialize(batch=st.integers(1, 2))
    def start(self, batch):
        self.batch = batch
        self.cache = self.plan.make_cache()
        self.full = DynamicCache()
        self.tokens = torch.zeros(batch, 0, dtype=torch.long)
        self.reference = Reference()
        self.step = 0

    def _forward(self, new: torch.Tensor, *, ends_prompt: bool = True) -> None:
        """One forward of both models; the reference (with its own full cache) hides what ours evicted."""
        self.tokens = torch.cat([self.tokens, new], dim=1)
        with hide_evicted(self.cache, new.shape[1]), torch.no_grad():
            ours = self.model(new, **cache_argument(self.model, self.cache)).logits
            theirs = self.reference_model(new, **cache_argument(self.reference_model, self.full)).logits
        self.reference.forward(new.shape[1], ends_prompt=ends_prompt)
        torch.testing.assert_close(ours[:, -1], theirs[:, -1], rtol=1e-4, atol=1e-5)

    def _new(self, count: int) -> torch.Tensor:
        self.step += 1
        return torch.randint(3, 128, (self.batch, count), generator=torch.Generator().manual_seed(self.step))

    @precondition(lambda self: self.reference.seen == 0)
    @rule(length=st.integers(1, 30), chunk=st.sampled_from([None, 1, 7, 12]))
    def prefill(self, length, chunk):
        ids = self._new(length)
        if chunk is None:  # one forward on a fresh cache: the whole prompt
            self._forward(ids)
            return
        with self.cache.prompt():  # chunks of any size, the last one included, make one prompt
            for start in range(0, length, chunk):
                self._forward(ids[:, start : start + chunk], ends_prompt=start + chunk >= length)

    @precondition(lambda self: self.reference.seen > 0)
    @rule()
    def decode(self):
        self._forward(self._new(1))

    @precondition(lambda self: self.reference.seen > 0)
    @rule(back=st.integers(1, 4))
    def rewind_the_last_tokens(self, back):
        length = max(1, self.reference.seen - back)
        if not self._rewindable(length):
            return
        self.cache.crop(length - self.reference.seen)  # transformers' meaning: the newest tokens to remove
        self._crop_reference(length)
        self.reference.rewind(length)
        self.tokens = self.tokens[:, :length]

    @precondition(lambda self: self.reference.seen > 0)
    @rule()
    def reset(self):
        self.cache.reset()
        self.full = DynamicCache()
        self.reference = Reference()
        self.tokens = self.tokens[:, :0]

    @precondition(lambda self: self.reference.seen > 0 and self.batch == 2)
    @rule()
    def beam_reorder(self):
        order = torch.tensor([1, 0])
        self.cache.reorder_cache(order)
        self.full.reorder_cache(order)
        self.tokens = self.tokens[order]

    @precondition(lambda self: self.reference.seen > 0 and self.reference.prefilling)
    @rule(question=st.integers(2, 6))
    def ask_a_question_then_forget_it(self, question):
        self.cache.end_prefill()
        self.reference.prefilling = False
        context = self.reference.seen
        self._forward(self._new(question))
        self._forward(self._new(1))
        self.cache.rewind(context)
        self._crop_reference(context)
        self.reference.rewind(context)
        self.tokens = self.tokens[:, :context]

    def _crop_reference(self, length: int) -> None:
        remove = self.full.get_seq_length() - length
        if remove > 0:
            self.full.crop(-remove)  # transformers' own cache takes the number of tokens to remove

    def _rewindable(self, length: int) -> bool:
        return all(
            len({int(n) for n in (layer.positions < length).sum(-1).flatten()}) == 1
            for layer in self.cache.layers
            if layer.positions is not None
        )

    @invariant()
    def holds_what_the_reference_holds(self):
        if self.reference.seen == 0:
            assert self.cache.get_seq_length() == 0
            return
        assert self.cache.get_seq_length() == self.reference.seen
        for layer, expected in zip(self.cache.layers, self.reference.held):
            held = list(range(layer.seen)) if layer.positions is None else layer.positions[0, 0].tolist()
            assert held == expected, (layer.index, held, expected)
            assert layer.keys.shape[2] == len(expected)


CacheMachine.TestCase.settings = settings(
    max_examples=25, stateful_step_count=12, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestCache = CacheMachine.TestCase

"""A state machine that uses a PolyCache every way a user can, and checks it keeps its plan's promise.

``cache_machine(policy)`` builds a hypothesis ``RuleBasedStateMachine`` for one policy on a tiny
model. It drives two caches through the same random story (prompts whole, in chunks, through
``generate`` with any ``prefill_chunk_size`` or ``static_generate``; decoding steps; questions about
a compressed context; ``end_prefill``; ``rewind``) and checks after every step:

- the compressing plan (``layers 0: full; 1: POLICY@b decode streaming@d; *: POLICY@b``) holds what
  it promises: the prompt's length in layer 0, ``min(b, prompt)`` plus what came since in the
  others, at most ``d`` in layer 1 (whose decode-time eviction keeps exactly the sinks and the
  newest tokens), positions sorted, distinct and seen;
- a plan whose budget covers everything gives, step for step, the full cache's outputs.

The contract (``PolicyContract``) runs it on the policy under test; the suite runs it on every
built-in.
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from polykv.cache.cache import CacheState
from polykv.model.describe import cache_argument
from polykv.policy import Policy
from polykv.registry import Registry
from polykv.testing.models import WordTokenizer, prompt, tiny_model

#: Layer 1's decoding bound and its attention sinks (streaming keeps them, and the newest tokens).
DECODE_BOUND, SINKS = 20, 2


def cache_machine(policy: Policy, registry: Registry) -> type[RuleBasedStateMachine]:
    """The state machine class for ``policy`` (an instance), whose plans are compiled with ``registry``."""
    import polykv

    budget = max(policy.min_budget(), 6)
    use = polykv.Choice(policy.name, dict(policy.values), polykv.Tokens(budget) if policy.budgeted else None)
    whole = polykv.Choice(policy.name, dict(policy.values), polykv.Tokens(4096) if policy.budgeted else None)
    decode = f"streaming@{DECODE_BOUND}(sink={SINKS})"
    compressing = f"layers 0: full; 1: {use.describe()} decode {decode}; *: {use.describe()}"
    covering = f"layers *: {whole.describe()}"

    class CacheMachine(RuleBasedStateMachine):
        def __init__(self):
            super().__init__()
            self.model = tiny_model("llama", seed=5)
            self.plan = polykv.compile(compressing, self.model, registry=registry, tokenizer=WordTokenizer())
            self.covering = polykv.compile(covering, self.model, registry=registry, tokenizer=WordTokenizer())
            self.budget = budget if policy.budgeted else None

        # --- the story ------------------------------------------------------------------------------

        @initialize()
        def start(self):
            self.fresh()

        def fresh(self) -> None:
            from transformers import DynamicCache

            self.cache = self.plan.make_cache(registry)
            self.whole = self.covering.make_cache(registry)
            self.full = DynamicCache(config=self.model.config)
            self.tokens = torch.zeros(1, 0, dtype=torch.long)
            self.prompt_length = 0
            self.layer_one: list[int] | None = None  # layer 1's positions, known once the prompt is compressed
            self.draws = 0

        def _new(self, count: int) -> torch.Tensor:
            self.draws += 1
            return prompt(count, seed=1000 * len(self.tokens[0]) + self.draws)

        def _forward(self, ids: torch.Tensor) -> None:
            """One forward of every cache; the covering cache must give the full cache's logits."""
            with torch.no_grad():
                self.model(ids, **cache_argument(self.model, self.cache))
                ours = self.model(ids, **cache_argument(self.model, self.whole)).logits
                theirs = self.model(ids, **cache_argument(self.model, self.full)).logits
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
            self.tokens = torch.cat([self.tokens, ids], dim=1)

        def _generate(self, ids: torch.Tensor, new: int, chunk: int | None) -> None:
            options = {"max_new_tokens": new, "min_new_tokens": new, "do_sample": False, "prefill_chunk_size": chunk}
            self.model.generate(ids, **cache_argument(self.model, self.cache), **options)
            ours = self.model.generate(ids, **cache_argument(self.model, self.whole), **options)
            theirs = self.model.generate(ids, **cache_argument(self.model, self.full), **options)
            assert torch.equal(ours, theirs), "a covering budget generated other tokens than the full cache"
            self.tokens = ours[:, :-1]  # the last token is generated, not yet seen by the caches

        def _prompt_ended(self, length: int) -> None:
            self.prompt_length = length
            layer = self.cache.layers[1]
            self.layer_one = list(range(layer.seen)) if layer.positions is None else layer.positions[0, 0].tolist()

        @precondition(lambda self: self.cache.state is CacheState.FRESH)
        @rule(length=st.integers(1, 48))
        def a_whole_prompt(self, length):
            self._forward(self._new(length))
            self._prompt_ended(length)

        @precondition(lambda self: self.cache.state is CacheState.FRESH)
        @rule(length=st.integers(2, 48), chunk=st.integers(1, 20))
        def a_prompt_in_chunks(self, length, chunk):
            ids = self._new(length)
            with self.cache.prompt(), self.whole.prompt():
                for start in range(0, length, chunk):
                    self._forward(ids[:, start : start + chunk])
            self._prompt_ended(length)

        @precondition(lambda self: self.cache.state is CacheState.FRESH)
        @rule(length=st.integers(1, 48), chunk=st.none() | st.integers(1, 20), new=st.integers(1, 4))
        def generate(self, length, chunk, new):
            ids = self._new(length)
            self.layer_one = None
            self._generate(ids, new, chunk)
            self.prompt_length = length
            self._decoded_after_prompt(new - 1)

        @precondition(lambda self: self.cache.state is CacheState.FRESH)
        @rule(length=st.integers(1, 40), new=st.integers(2, 5))
        def static_generate(self, length, new):
            ids = self._new(length)
            # Both decode ``new`` tokens whatever they are: static_generate is given no end token, nor is generate
            # (min_new_tokens would instead forbid the end token, which static decoding may choose).
            options = {"max_new_tokens": new, "eos_token_id": None, "do_sample": False}
            out = polykv.static_generate(self.model, self.cache, ids, max_new_tokens=new, eviction_slack=0)
            ordinary = self.model.generate(ids, **options, **cache_argument(self.model, self.plan.make_cache(registry)))
            assert torch.equal(out, ordinary), (
                "static decoding generated other tokens than ordinary decoding (or the policy chose differently in two "
                "runs of the same prompt: test_is_deterministic_and_leaves_the_view_unchanged says which)"
            )
            covered = polykv.static_generate(self.model, self.whole, ids, max_new_tokens=new, eviction_slack=0)
            theirs = self.model.generate(ids, **options, **cache_argument(self.model, self.full))
            assert torch.equal(covered, theirs), "a covering budget decoded other tokens than the full cache"
            self.tokens = out[:, :-1]
            self.layer_one = None
            self.prompt_length = length
            self._decoded_after_prompt(new - 1)

        def _decoded_after_prompt(self, steps: int) -> None:
            """After generate's prompt and ``steps`` decoding steps: layer 1's positions, from the prompt's."""
            layer = self.cache.layers[1]
            held = layer.positions[0, 0].tolist() if layer.positions is not None else list(range(layer.seen))
            prompt_part = [p for p in held if p < self.prompt_length]
            decoded = list(range(self.prompt_length, len(self.tokens[0])))
            self.layer_one = self._bounded(prompt_part + decoded) if steps else prompt_part
            assert len(prompt_part) <= (self.budget or self.prompt_length)

        def _bounded(self, positions: list[int]) -> list[int]:
            """What streaming keeps of ``positions`` after a decoding forward: the sinks and the newest (a
            decode policy bounds decoding forwards; the prompt keeps what its own budget says)."""
            if len(positions) <= DECODE_BOUND:
                return positions
            return positions[:SINKS] + positions[-(DECODE_BOUND - SINKS) :]

        @precondition(lambda self: self.cache.state is CacheState.DECODING)
        @rule(count=st.integers(1, 6))
        def decode_or_ask(self, count):
            first = len(self.tokens[0])
            self._forward(self._new(count))
            self.layer_one = self._bounded(self.layer_one + list(range(first, first + count)))

        @precondition(lambda self: self.cache.state is CacheState.DECODING)
        @rule(question=st.integers(1, 6), new=st.integers(1, 3))
        def ask_with_generate(self, question, new):
            first = len(self.tokens[0])
            self._generate(torch.cat([self.tokens, self._new(question)], dim=1), new, None)
            self.layer_one = self._bounded(self.layer_one + list(range(first, len(self.tokens[0]))))

        @rule()
        def end_prefill(self):
            self.cache.end_prefill()
            self.whole.end_prefill()

        @precondition(lambda self: self.cache.state is CacheState.DECODING and len(self.tokens[0]) > self.prompt_length)
        @rule(back=st.integers(1, 8))
        def rewind_the_answer(self, back):
            length = max(self.prompt_length, len(self.tokens[0]) - back)
            for cache in (self.cache, self.whole):
                cache.rewind(length)
            self.full.crop(length - self.full.get_seq_length())
            self.tokens = self.tokens[:, :length]
            self.layer_one = [p for p in self.layer_one if p < length]

        @precondition(lambda self: self.cache.state is not CacheState.FRESH)
        @rule()
        def rewind_to_nothing(self):
            self.cache.rewind(0)
            assert self.cache.state is CacheState.FRESH
            self.fresh()

        # --- the promise ----------------------------------------------------------------------------

        @invariant()
        def holds_what_the_plan_says(self):
            seen = len(self.tokens[0])
            assert self.cache.get_seq_length() == seen
            if self.cache.state is CacheState.FRESH:
                assert all(not layer.is_initialized or layer.storage.size == 0 for layer in self.cache.layers)
                return
            after = seen - self.prompt_length
            kept = self.prompt_length if self.budget is None else min(self.budget, self.prompt_length)
            lengths = self.cache.layer_lengths()
            assert lengths[0] == seen, lengths
            assert lengths[2:] == [kept + after] * (len(lengths) - 2), (lengths, kept, after)
            held = self.cache.layers[1].positions
            held = list(range(seen)) if held is None else held[0, 0].tolist()
            assert held == self.layer_one, (held, self.layer_one)
            for layer in self.cache.layers:
                if layer.positions is not None:
                    positions = layer.positions.long()
                    assert bool((positions[..., 1:] > positions[..., :-1]).all()), "positions out of order"
                    assert bool(((positions >= 0) & (positions < seen)).all()), "a position never seen"

    CacheMachine.__name__ = f"CacheMachine_{policy.name}"
    return CacheMachine

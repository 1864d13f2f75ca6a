"""The contract every policy honours, as tests a policy package runs on its own policy.

    from polykv.testing import PolicyContract
    from my_package import MyPolicy

    class TestMyPolicy(PolicyContract):
        policy = MyPolicy

That class runs every property below on ``MyPolicy`` (with its defaults, or ``parameters``),
through the same checks the cache applies, on random views of realistic shapes and on tiny real
models, and checks that the installed package's entry point loads it next to polykv's built-ins
(as ``polykv policies`` would: no name clash, no import error, no missing entry point). Set
``expected_failures`` to the names of tests known to fail while you work on them (they are marked
xfail, strictly: a fixed one reminds you to take it off the list).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import run_state_machine_as_test

from polykv.cache.checks import raise_for
from polykv.cache.selection import choose
from polykv.hooks import hookimpl
from polykv.model.describe import cache_argument
from polykv.parameters import ParameterError
from polykv.policy import NOTHING_MORE, LayerView, Phase, Policy, ScoringPolicy
from polykv.registry import Registry
from polykv.testing.installed import installation_problem
from polykv.testing.machine import cache_machine
from polykv.testing.models import WordTokenizer, greedy_by_forwards, prompt, prompt_lengths, tiny_model
from polykv.testing.views import random_view

#: How much longer than the policy's least budget a long random view is.
LONG = 1024
_PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.differing_executors])


@st.composite
def view_shapes(draw, policy: Policy) -> dict:
    """Shapes of a random view for ``policy``: batch, heads, GQA group, length, budget, padding, seed, and whether
    earlier evictions left gaps in its positions. Most views are short (quick to shrink a failure to); some are
    up to ``LONG`` tokens longer than the policy's least budget, as prompts are."""
    least = policy.min_budget()
    length = draw(st.integers(least + 1, least + 48) | st.integers(least + 49, least + LONG))
    batch = draw(st.integers(1, 3))
    return {
        "batch": batch,
        "heads": draw(st.integers(1, 3)),
        "groups": draw(st.integers(1, 3)),
        "dim": draw(st.sampled_from([4, 8, 16])),
        "length": length,
        "budget": draw(st.integers(least, length - 1)),
        "pads": draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)),
        "seed": draw(st.integers(0, 2**16)),
        "evicted": draw(st.booleans()),
    }


class PolicyContract:
    """Subclass it as ``TestSomething`` and set ``policy``; see the module docstring."""

    policy: ClassVar[type[Policy]]
    parameters: ClassVar[dict] = {}
    expected_failures: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls.expected_failures:  # marked xfail when collected (polykv.testing.plugin)
            if not name.startswith("test_") or getattr(cls, name, None) is None:
                raise TypeError(f"{cls.__name__}.expected_failures names {name!r}, which is no test of the contract")

    def make(self) -> Policy:
        return self.policy(**self.parameters)

    def choose(self, view: LayerView) -> torch.Tensor:
        """What the cache keeps with this policy: checked as the cache checks it, sorted, (B, H, budget)."""
        policy = self.make()
        where = f"policy {policy!r} on layer {view.layer} ({view.phase.value})"
        chosen = choose(policy, view, where=where)
        raise_for(chosen.problems, where)
        return chosen.indices

    # --- installed ----------------------------------------------------------------------------------

    def test_its_entry_point_loads_it_next_to_the_builtins(self):
        """What users get after ``pip install``: the package's entry point loads this very class into polykv's
        registry beside the built-ins; a failure reads as the line every ``polykv`` command would print."""
        problem = installation_problem(self.policy)
        if problem:
            pytest.fail(problem, pytrace=False)

    # --- selection --------------------------------------------------------------------------------

    @_PROPERTY
    @given(data=st.data())
    def test_keeps_its_budget_and_every_real_token_it_can(self, data):
        """Exactly ``budget`` slots per row and KV head, of which min(budget, real tokens) are real."""
        shape = data.draw(view_shapes(self.make()))
        view = random_view(self.make(), **shape)
        kept = self.choose(view)
        assert kept.shape == (shape["batch"], shape["heads"], shape["budget"])
        assert kept.dtype == torch.long
        real = view.token_mask.gather(-1, kept).sum(-1)
        expected = view.token_mask.sum(-1).clamp(max=shape["budget"])
        assert torch.equal(real, expected), "padding was kept in place of a real token"

    @_PROPERTY
    @given(data=st.data())
    def test_choices_are_distinct_and_in_range(self, data):
        shape = data.draw(view_shapes(self.make()))
        view = random_view(self.make(), **{**shape, "pads": [0] * shape["batch"]})
        raw = self.make().select(view)
        wanted = (shape["batch"], shape["heads"], shape["budget"])
        assert raw.shape == wanted, f"select returned shape {tuple(raw.shape)}, not (batch, heads, budget) {wanted}"
        assert ((raw >= 0) & (raw < shape["length"])).all(), f"select chose slots outside 0..{shape['length'] - 1}"
        ordered = raw.sort(dim=-1).values
        assert not (ordered[..., 1:] == ordered[..., :-1]).any(), "the same token was chosen twice"

    @_PROPERTY
    @given(data=st.data())
    def test_a_padded_row_keeps_what_it_keeps_alone(self, data):
        shape = data.draw(view_shapes(self.make()))
        padded = self.choose(random_view(self.make(), **{**shape, "batch": 1, "pads": shape["pads"][:1]}))
        pad = shape["pads"][0]
        if shape["length"] - pad <= shape["budget"]:
            return  # a short row keeps everything it has: nothing to compare
        alone = random_view(self.make(), **{**shape, "batch": 1, "length": shape["length"] - pad, "pads": [0]})
        assert torch.equal(padded - pad, self.choose(alone)), "left padding changed which real tokens are kept"

    @_PROPERTY
    @given(data=st.data())
    def test_rows_are_chosen_independently(self, data):
        shape = data.draw(view_shapes(self.make()))
        together = self.choose(random_view(self.make(), **shape))
        full = random_view(self.make(), **shape)
        for row in range(shape["batch"]):
            alone = _row(full, row)
            assert torch.equal(together[row : row + 1], self.choose(alone)), f"row {row} depends on other rows"

    @_PROPERTY
    @given(data=st.data())
    def test_is_deterministic_and_leaves_the_view_unchanged(self, data):
        shape = data.draw(view_shapes(self.make()))
        view = random_view(self.make(), **shape)
        before = {name: value.clone() for name, value in _tensors(view).items()}
        first = self.choose(view)
        for name, value in _tensors(view).items():
            assert torch.equal(value, before[name]), f"the policy modified view.{name}"
        again = self.choose(random_view(self.make(), **shape))
        assert torch.equal(first, again), "the same view gave other choices the second time"

    def test_scores_are_real_numbers(self):
        policy = self.make()
        if not isinstance(policy, ScoringPolicy):
            pytest.skip("not a scoring policy")
        view = random_view(policy, budget=policy.min_budget(), length=policy.min_budget() + 24, pads=[0, 5])
        scores = policy.score(view)
        assert scores.shape == view.token_mask.shape
        assert not scores[view.token_mask].isnan().any()

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
    def test_works_in_every_dtype_and_device(self, dtype, device):
        if device == "cuda" and not torch.cuda.is_available():
            pytest.skip("needs a CUDA device")
        policy = self.make()
        least = policy.min_budget()
        view = random_view(policy, budget=least, length=least + 20, dtype=dtype, device=device)
        kept = self.choose(view)
        assert kept.device.type == device and kept.shape[-1] == policy.min_budget()

    def test_works_at_decode_time_where_it_can(self):
        policy = self.make()
        if policy.needs().prefill_only:
            pytest.skip("needs what exists only at prefill (accumulated attention, or the prompt repeated)")
        view = random_view(policy, budget=policy.min_budget(), length=policy.min_budget() + 9, phase=Phase.DECODE)
        assert self.choose(view).shape[-1] == policy.min_budget()

    # --- static decoding: policies that declare ``static_decoding = True`` ------------------------------

    def _static_policy(self) -> Policy:
        policy = self.make()
        if not getattr(self.policy, "static_decoding", False):
            pytest.skip("does not declare static_decoding = True")
        assert isinstance(policy, ScoringPolicy), "static decoding runs ScoringPolicy.score; this is no ScoringPolicy"
        assert policy.needs() == NOTHING_MORE, "a static decoding step hands a policy no queries or attention"
        return policy

    @_PROPERTY
    @given(data=st.data())
    def test_static_scores_do_not_depend_on_slot_order(self, data):
        """Static decoding reuses slots in any order: shuffling the slots shuffles the scores, no more."""
        policy = self._static_policy()
        shape = data.draw(view_shapes(policy))
        view = random_view(policy, **shape, phase=Phase.DECODE)
        order = torch.randperm(shape["length"], generator=torch.Generator().manual_seed(shape["seed"]))
        shuffled = attrs.evolve(
            view,
            keys=view.keys[:, :, order],
            values=view.values[:, :, order],
            token_mask=view.token_mask[..., order],
            positions=view.positions[..., order],
        )
        expected = policy.score(view)[..., order]
        got = policy.score(shuffled)
        real = shuffled.token_mask
        assert torch.allclose(got[real], expected[real], atol=1e-5), "the scores depend on the order of slots"

    def test_static_decoding_gives_the_tokens_and_cache_of_ordinary_decoding(self):
        from polykv.decoding import static_generate

        policy = self._static_policy()
        budget = max(policy.min_budget(), 6)
        model = tiny_model("llama")
        plan, registry = self._plan(model, f"layers 0: full; *: {self._use(budget)} decode {self._use(budget + 4)}")
        ids = prompt(budget + 12, batch=2, seed=3)
        expected_cache, cache = plan.make_cache(registry), plan.make_cache(registry)
        expected = greedy_by_forwards(model, expected_cache, ids, 14)
        with torch.no_grad():
            tokens = static_generate(model, cache, ids, max_new_tokens=14, graph=False, eviction_slack=0)
        assert torch.equal(tokens, expected), "static decoding chose other tokens than ordinary decoding"
        assert cache.layer_lengths() == expected_cache.layer_lengths()
        for layer, reference in zip(cache.layers, expected_cache.layers):
            kept, expected_kept = layer.storage.positions_or_slots(), reference.storage.positions_or_slots()
            assert torch.equal(kept, expected_kept), f"layer {layer.index} kept other tokens than ordinary decoding"

    # --- parameters -----------------------------------------------------------------------------------

    def test_parameters_are_validated(self):
        for param in self.policy.parameters:
            wrong_type = "text" if param.type is not str else 3
            with pytest.raises(ParameterError):
                self.policy(**{param.name: wrong_type})
            if param.max is not None:
                with pytest.raises(ParameterError, match="must be"):
                    self.policy(**{param.name: param.type(param.max + 1)})
            if param.min is not None:
                with pytest.raises(ParameterError, match="must be"):
                    self.policy(**{param.name: param.type(param.min - 1)})
            if param.choices:
                with pytest.raises(ParameterError, match="is one of"):
                    self.policy(**{param.name: param.choices[0] + "-not-a-choice"})
        with pytest.raises(ParameterError, match="has no parameter"):
            self.policy(no_such_parameter=1)

    # --- in a cache, on tiny real models --------------------------------------------------------------

    def _registry(self) -> Registry:
        """The policy under test, with the built-ins the tests combine it with (full, streaming)."""
        from polykv.registry import default_registry

        registry = Registry()
        registry.add_plugin(_Offering(self.policy), name="contract", distribution="under-test")
        builtins = [default_registry().policies.get(name).cls for name in ("full", "streaming")]
        others = [cls for cls in builtins if cls.name != self.policy.name]
        registry.add_plugin(_Offering(*others), name="contract-builtins", distribution="polykv-core")
        return registry

    def _plan(self, model, spec: str):
        import polykv

        registry = self._registry()
        return polykv.compile(spec, model, registry=registry, tokenizer=WordTokenizer()), registry

    def _use(self, budget: int | None) -> str:
        from polykv.values import format_use

        values = dict(self.make().values)
        if not self.policy.budgeted:
            return format_use(self.policy.name, None, values)
        return format_use(self.policy.name, str(budget), values)

    @pytest.mark.parametrize("family", ["llama", "mistral-sliding"])
    def test_a_budget_over_the_prompt_is_the_full_cache(self, family):
        from transformers import DynamicCache

        window = max(8, self.make().min_budget() + 1)  # a sliding layer must hold what the policy needs
        model = tiny_model(family, **({"sliding_window": window} if family.endswith("sliding") else {}))
        plan, registry = self._plan(model, f"layers *: {self._use(500)}")
        ids = prompt(30, batch=2, seed=1)
        options = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
        theirs = model.generate(ids, **cache_argument(model, DynamicCache(config=model.config)), **options)
        ours = model.generate(ids, **cache_argument(model, plan.make_cache(registry)), **options)
        assert torch.equal(ours.sequences, theirs.sequences)

    @pytest.mark.parametrize("attention", ["sdpa", "eager"])
    def test_compresses_inside_generate(self, attention):
        policy = self.make()
        budget = max(policy.min_budget(), 4)
        evicts_in_decode = self.policy.budgeted and not policy.needs().prefill_only
        decode = f" decode {self._use(budget + 3)}" if evicts_in_decode else ""
        model = tiny_model("llama", attention)
        plan, registry = self._plan(model, f"layers 0: full; *: {self._use(budget)}{decode}")
        for length in prompt_lengths(budget + 8):
            cache = plan.make_cache(registry)
            ids = prompt(length, batch=2)
            out = model.generate(
                ids, max_new_tokens=5, min_new_tokens=5, do_sample=False, **cache_argument(model, cache)
            )
            assert out.shape == (2, length + 5)
            stored = cache.layer_lengths()
            assert stored[0] == length + 4
            if self.policy.budgeted:
                bound = budget + 3 if decode else min(length, budget) + 4
                assert all(n <= bound for n in stored[1:]), stored

    def test_keeps_its_budget_on_the_heads_it_is_given(self):
        """A statement that names KV heads (``layers 1 heads 1: POLICY``): those heads keep the budget, the layer's
        other heads everything, inside ``generate``; a budget over the prompt is the full cache there too."""
        from transformers import DynamicCache

        policy = self.make()
        budget = max(policy.min_budget(), 4)
        model = tiny_model("llama")  # 2 KV heads per layer
        ids = prompt(budget + 12, batch=2, seed=5)
        length = ids.shape[1]
        for tokens in (budget, 500):
            plan, registry = self._plan(
                model, f"layers 1 heads 0: full; layers 1 heads 1: {self._use(tokens)}; *: full"
            )
            cache = plan.make_cache(registry)
            options = {"max_new_tokens": 4, "min_new_tokens": 4, "do_sample": False, "output_logits": True}
            ours = model.generate(ids, **cache_argument(model, cache), return_dict_in_generate=True, **options)
            kept = cache.head_lengths()[1][0].tolist()
            kept_by_policy = min(length, tokens) if self.policy.budgeted else length
            assert kept == [length + 3, kept_by_policy + 3], kept
            if tokens == 500:
                full = DynamicCache(config=model.config)
                theirs = model.generate(ids, **cache_argument(model, full), return_dict_in_generate=True, **options)
                assert torch.equal(ours.sequences, theirs.sequences)

    def test_compresses_every_chunk_of_a_chunked_prefill(self):
        policy = self.make()
        if not self.policy.budgeted:
            pytest.skip("keeps everything: nothing to bound")
        if policy.needs().reconstruction:
            pytest.skip("scores by repeating the whole prompt: cannot compress chunk by chunk")
        budget = max(policy.min_budget(), 4)
        model = tiny_model("llama")
        plan, registry = self._plan(model, f"layers *: {self._use(budget)}")
        cache = plan.make_cache(registry, compress_chunks=True)
        stored = []
        hook = model.register_forward_hook(lambda *_: stored.append(max(cache.layer_lengths())))
        try:
            ids = prompt(3 * (budget + 10))
            model.generate(
                ids, max_new_tokens=2, do_sample=False, prefill_chunk_size=budget + 10, **cache_argument(model, cache)
            )
        finally:
            hook.remove()
        assert stored[:3] == [budget] * 3

    def test_the_cache_keeps_its_promise_in_every_use(self):
        """Prompts whole, chunked, through generate or static_generate; decoding; questions; rewinds (see
        ``polykv.testing.machine``): the cache holds what its plan says, and a covering budget is the full cache."""
        machine = cache_machine(self.make(), self._registry())
        options = settings(_PROPERTY, max_examples=12, stateful_step_count=8)
        run_state_machine_as_test(machine, settings=options)

    @settings(_PROPERTY, max_examples=8)
    @given(chunk=st.integers(1, 40), extra=st.integers(0, 3))
    def test_a_prompt_in_chunks_keeps_what_the_whole_prompt_keeps(self, chunk, extra):
        """Chunks of any size, the last one of a single token included: the prompt's end is known."""
        policy = self.make()
        budget = max(policy.min_budget(), 4)
        model = tiny_model("llama")
        plan, registry = self._plan(model, f"layers 0: full; *: {self._use(budget)}")
        ids = prompt(2 * budget + 12 + extra, batch=2)
        whole, chunked = plan.make_cache(registry), plan.make_cache(registry)
        options = {"max_new_tokens": 2, "do_sample": False}
        expected = model.generate(ids, **options, **cache_argument(model, whole))
        got = model.generate(ids, prefill_chunk_size=chunk, **options, **cache_argument(model, chunked))
        assert torch.equal(expected, got), f"a prompt in chunks of {chunk} generated other tokens than the whole prompt"
        for a, b in zip(whole.layers, chunked.layers):
            kept = f"layer {a.index} kept other tokens from a prompt in chunks of {chunk} than from the whole prompt"
            assert (a.positions is None) == (b.positions is None), kept
            if a.positions is not None:
                assert torch.equal(a.positions, b.positions), kept


class _Offering:
    """A plugin that registers policies, for a contract's own registry."""

    def __init__(self, *policies: type[Policy]):
        self.policies = policies

    @hookimpl
    def register_policies(self, register):
        for policy in self.policies:
            register(policy)


def _tensors(view: LayerView) -> dict[str, torch.Tensor]:
    names = (
        "keys", "values", "token_mask", "positions", "queries", "window_attention", "accumulated_attention",
        "reconstruction_attention",
    )  # fmt: skip
    return {name: getattr(view, name) for name in names if getattr(view, name) is not None}


def _row(view: LayerView, row: int) -> LayerView:
    # attrs' mypy plugin checks **changes against every field's type, not only the tensor fields named here.
    return attrs.evolve(view, **{name: value[row : row + 1] for name, value in _tensors(view).items()})  # type: ignore[arg-type]

"""Ragged heads' static slots in one pool: the groups' views tile it, memory stays the sum of the heads' slots, and
one attention launch over it (the ragged kernels, in triton's interpreter here) decodes the tokens of ordinary
decoding. The kernels themselves are tested against per-head attention in test_decode_attention."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from interpreter import interpreted, parent_only, run_interpreted
from test_static_decoding import both_ways, padded_prompt

import polykv
from polykv.cache import pool as pool_module
from polykv.cache.pool import SlotPool
from polykv.cache.static import FREE
from polykv.decoding import static_generate
from polykv.testing import prompt, tiny_model

RAGGED_SPECS = [
    "layers 1 heads 0: full; layers 1 heads 1: snapkv@8(window=4); *: snapkv@16(window=4)",
    "layers 1 heads 0: full decode streaming@24(sink=2); layers 1 heads 1: snapkv@8(window=4) decode "
    "streaming@20; *: knorm@12",
    "layers 1 heads 1,3: snapkv@8(window=4); layers 1 heads 0,2: full; *: knorm@12",  # interleaved groups
    "layers 0: full; layers * heads adaptive: snapkv@8(window=4)",  # each row hides its own share
]


@st.composite
def groupings(draw):
    """KV heads split into groups (in any order), each with its own slots per head."""
    heads = draw(st.integers(1, 6))
    order = draw(st.permutations(range(heads)))
    cuts = sorted(draw(st.sets(st.integers(1, heads - 1), max_size=heads - 1))) if heads > 1 else []
    bounds = [0, *cuts, heads]
    return [(tuple(sorted(order[a:b])), draw(st.integers(1, 9))) for a, b in itertools.pairwise(bounds)]


@parent_only
@settings(max_examples=60, deadline=None)
@given(groups=groupings(), batch=st.integers(1, 3), real=st.booleans())
def test_the_groups_views_tile_the_pool_and_each_head_starts_where_the_kernel_reads(groups, batch, real):
    like = torch.zeros(1, 1, 1, 4)
    pool = SlotPool(groups, batch, like, real)
    heads = sum(len(group) for group, _slots in groups)
    total = sum(len(group) * slots for group, slots in groups)
    assert pool.keys.shape == (batch, total, 4) and pool.positions.shape == (batch, total)
    assert (pool.positions == FREE).all() and (pool.real is None) == (not real)
    assert pool.largest == max(slots for _group, slots in groups)
    written = torch.zeros(batch, total, dtype=torch.long)
    for number, (group, slots) in enumerate(groups):
        buffers = pool.buffers(number)
        assert buffers.keys.shape == (batch, len(group), slots, 4) and buffers.positions.shape[-1] == slots
        for place, head in enumerate(group):  # a head's slots in its group's view are where the kernel reads them
            start, count = pool.starts[head].item(), pool.counts[head].item()
            assert count == slots
            buffers.positions[:, place] = torch.arange(slots, dtype=buffers.positions.dtype) + 100 * head
            assert torch.equal(pool.positions[:, start : start + count], buffers.positions[:, place])
            written[:, start : start + count] += 1
    assert (written == 1).all()  # every slot of the pool belongs to exactly one head of one group
    assert len(pool.starts) == heads
    element = 2 * 4 * like.element_size() + 4 + (1 if real else 0)
    assert pool.nbytes() == batch * total * element


@parent_only
def test_a_ragged_layer_in_static_decoding_holds_its_groups_slots_in_one_pool():
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8)
    plan = polykv.compile(RAGGED_SPECS[2], model)
    ids = torch.randint(0, 100, (2, 30))
    with plan.apply(model), torch.no_grad():
        cache = plan.make_cache()
        model(ids, **polykv.cache_argument(model, cache))
        model(ids[:, :1], **polykv.cache_argument(model, cache))
        cache.begin_static(room=5)
        layer = cache.layers[1]
        pool = layer.static.pool
        base = pool.keys.untyped_storage().data_ptr()
        for part in layer.parts:
            assert part.static.keys.untyped_storage().data_ptr() == base
        slots = [part.static.keys.shape[2] for part in layer.parts]  # heads 0,2 (full), 1,3 (snapkv@8): held + 5
        assert slots == [31 + 5, 9 + 5]
        assert pool.keys.shape[1] == 2 * sum(slots)  # two heads per group: the sum, not 4 x the largest
        assert layer.static.nbytes() == pool.nbytes()
        cache.end_static(0)
        assert [part.storage.size for part in layer.parts] == [31, 9]


@parent_only
def test_groups_that_evict_in_different_steps_make_different_graphs():
    """A step's graph is chosen by which layers evict in it, and, in a ragged layer, which of its groups: groups of
    different bounds evict in different steps, and replaying one's graph for the other's step
    would free the wrong slots."""
    model = tiny_model("llama")
    plan = polykv.compile(RAGGED_SPECS[1], model)
    with plan.apply(model), torch.no_grad():
        cache = plan.make_cache()
        model(torch.randint(3, 100, (1, 30)), **polykv.cache_argument(model, cache))
        model(torch.tensor([[5]]), **polykv.cache_argument(model, cache))
        cache.begin_static(room=16, slack=0)
        layer = cache.layers[1]
        keys = []
        for step in range(14):
            keys.append(dict(cache.plan_static_step()).get(1, ()))
            model(torch.tensor([[7]]), position_ids=torch.tensor([[31 + step]]), **polykv.cache_argument(model, cache))
            cache.static_stepped()
        assert [part.static.bound for part in layer.parts] == [24, 20]
        # The full group held 24 after the ordinary step (its bound): it evicts at every step; the snapkv group
        # held 9 and evicts from its twelfth step on.
        assert keys == [(0,)] * 11 + [(0, 1)] * 3
        cache.end_static(14)


@parent_only
def test_a_step_writes_every_head_of_a_ragged_layer_in_one_write(monkeypatch):
    """The groups share their free lists, cursors and position in the pool: one write per ragged layer and step,
    and the tokens land where each group's own view reads them."""
    writes = []
    monkeypatch.setattr(
        SlotPool, "write", lambda pool, k, v, write=SlotPool.write: writes.append(pool) or write(pool, k, v)
    )
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8)
    (expected, _), (tokens, _) = both_ways(model, RAGGED_SPECS[2], [30, 22], 6)
    assert torch.equal(tokens, expected)
    assert len(writes) == 4  # the static steps after the ordinary ones: one write each, for the one ragged layer


@parent_only
@pytest.mark.slow
@pytest.mark.heavy  # compiles the tiny model's step: some 15 s on two cores
def test_a_compiled_step_writes_the_pool_as_the_eager_step_does():
    """The pooled write compiled (one fused kernel), with interleaved groups (the heads reordered into the pool's
    order first) and a group that evicts while decoding."""
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8)
    ids, mask = padded_prompt([30, 22])
    plan = polykv.compile("layers 1 heads 1,3: snapkv@8(window=4) decode streaming@12; layers 1 heads 0,2: full; "
                          "*: knorm@12", model)  # fmt: skip
    with plan.apply(model):
        runs = [
            static_generate(
                model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=12, graph=False,
                eviction_slack=0, compile_step=compile_step,
            )
            for compile_step in (False, True)
        ]  # fmt: skip
    assert torch.equal(*runs)


# --- one launch over the pool, in triton's interpreter --------------------------------------------------------------


@parent_only
def test_interpreted_tests_pass():
    """This file's interpreted tests, in a child process whose triton interprets."""
    run_interpreted(__file__)


@interpreted
@pytest.mark.parametrize("spec", RAGGED_SPECS)
def test_one_launch_over_the_pool_decodes_the_tokens_of_ordinary_decoding(spec, monkeypatch):
    launches = []
    attend = SlotPool.attend
    monkeypatch.setattr(SlotPool, "attend", lambda pool, *a: launches.append(pool) or attend(pool, *a))
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8) if "1,3" in spec else tiny_model("llama")
    (expected, expected_cache), (tokens, cache) = both_ways(model, spec, [30, 22], 12)
    assert launches  # the pooled path ran
    assert torch.equal(tokens, expected)
    for ours, theirs in zip(cache.head_lengths(), expected_cache.head_lengths(), strict=True):
        assert torch.equal(ours, theirs)


@interpreted
@pytest.mark.parametrize("decode", ["", " decode streaming@14(sink=2)"])
def test_speculative_checks_through_the_pool_give_greedy_decoding(decode, monkeypatch):
    """A ragged draft in checks of fixed shapes: proposals its rows refuse become holes in the pool (its real
    mask), left-padded rows included; the output is greedy decoding's."""
    from test_speculative import _greedy

    launches, attend = [], SlotPool.attend
    monkeypatch.setattr(SlotPool, "attend", lambda pool, *a: launches.append(pool) or attend(pool, *a))

    model = tiny_model("llama")
    ids = prompt(24, batch=2, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    expected = _greedy(model, ids, 10, attention_mask=mask)
    draft = polykv.compile(f"layers 1 heads 0: full; layers 1 heads 1: knorm@6; *: snapkv@8(window=4){decode}", model)
    result = polykv.speculative_generate(
        model, ids, draft=draft, static=True, attention_mask=mask, max_new_tokens=10, lookahead=3
    )
    assert result.static and torch.equal(result.tokens, expected)
    assert launches and any(pool.real is not None for pool in launches)  # the pool's kernels saw the holes


@interpreted
def test_the_pool_is_the_kernels_path_here():
    assert pool_module.suits_kernels(torch.zeros(1, 2, 1, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 2)


# --- on CUDA ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", RAGGED_SPECS)
@pytest.mark.parametrize("graph", [False, True])
def test_one_launch_over_the_pool_gives_the_tokens_of_attending_group_by_group(spec, graph, monkeypatch):
    """The compiled ragged kernels, replayed in a CUDA graph or not, against each group attending to its own view
    (the path where the kernels do not run), in float32."""
    heads = {"num_key_value_heads": 4, "num_attention_heads": 8} if "1,3" in spec else {}
    model = tiny_model("llama", device="cuda", **heads)
    ids, mask = (t.cuda() for t in padded_prompt([30, 22]))
    plan = polykv.compile(spec, model)
    runs = []
    with plan.apply(model):
        for pooled in (True, False):
            if not pooled:
                monkeypatch.setattr(SlotPool, "attends", lambda pool, query: False)
            cache = plan.make_cache()
            tokens = static_generate(model, cache, ids, attention_mask=mask, max_new_tokens=24, graph=graph)
            runs.append((tokens, [lengths.tolist() for lengths in cache.head_lengths()]))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]

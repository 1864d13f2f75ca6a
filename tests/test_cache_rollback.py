"""The rest of transformers' cache contract: crop, copies, offloading, and what a cache refuses.

Assisted decoding and prompt lookup verify several drafted tokens in one forward and crop the
rejected ones; the prefix recipe deep-copies a prefilled cache per request. A PolyCache must serve
both exactly as transformers' DynamicCache does at full budget, and say so in words where it cannot.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import polykv
from polykv import cache_argument
from polykv.cache.cache import CacheState
from polykv.testing import prompt, tiny_model

FAMILIES = ["llama", "qwen2-sliding", "mistral-sliding", "gemma3"]
COMPRESSED = "layers 0: full; *: snapkv@16(window=4)"


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = tiny_model(request.param)
    polykv.prepare_model(model)
    return model, tiny_model(request.param, seed=1)


def _generate(model, cache, ids, **options):
    arguments = {} if cache is None else cache_argument(model, cache)
    return model.generate(ids, max_new_tokens=12, do_sample=False, **arguments, **options)


@pytest.mark.parametrize("drafting", ["assistant", "prompt lookup"])
def test_assisted_generation_at_full_budget_is_the_dynamic_cache(family, drafting):
    model, assistant = family
    options = {"assistant_model": assistant} if drafting == "assistant" else {"prompt_lookup_num_tokens": 3}
    ids = torch.cat([prompt(20), prompt(20)], dim=1)  # repeats, so prompt lookup finds drafts
    expected = _generate(model, DynamicCache(), ids, **options)
    cache = polykv.compile("*: full", model).make_cache()
    assert torch.equal(_generate(model, cache, ids, **options), expected)
    assert cache.get_seq_length() == expected.shape[1] - 1


HEADS = ["layers 1 heads 0: full; layers 1 heads 1: snapkv@500(window=4); *: full", "* heads adaptive: snapkv@500"]


@pytest.mark.parametrize("spec", HEADS, ids=["heads-named", "heads-adaptive"])
def test_assisted_generation_with_kv_heads_apart_at_full_budget_is_the_dynamic_cache(spec):
    """A layer whose KV heads keep apart (groups of heads, each a layer of its own) crops as its groups do."""
    model = tiny_model("llama")
    ids = torch.cat([prompt(20), prompt(20)], dim=1)
    expected = _generate(model, DynamicCache(), ids, prompt_lookup_num_tokens=3)
    cache = polykv.compile(spec, model).make_cache()
    assert cache.is_croppable
    assert torch.equal(_generate(model, cache, ids, prompt_lookup_num_tokens=3), expected)


def test_assisted_generation_keeps_a_compressed_plan(family):
    """Compressed at prefill, appended while decoding: the layers stay croppable and within their budget plus
    the accepted tokens. (transformers' first verification forward carries the prompt and the first draft
    together, so that draft is compressed with the prompt, and its rejected tokens cropped from it.)"""
    model, assistant = family
    if any(layer.sliding_window for layer in polykv.compile("*: full", model).layers):
        pytest.skip("a sliding layer holds its window, whatever the budget")
    cache = polykv.compile(COMPRESSED, model).make_cache()
    out = _generate(model, cache, prompt(40), assistant_model=assistant)
    generated = out.shape[1] - 40
    assert cache.is_croppable and cache.state is CacheState.DECODING
    assert cache.layer_lengths()[0] == out.shape[1] - 1
    assert all(generated <= length < 16 + generated for length in cache.layer_lengths()[1:])


def test_a_decode_policy_that_evicts_is_not_croppable_and_assisted_generation_says_so():
    model = tiny_model("llama")
    plan = polykv.compile("*: full decode streaming@24(sink=2)", model)
    cache = plan.make_cache()
    assert not cache.is_croppable
    with pytest.raises(ValueError, match="cache that can be cropped"):
        _generate(model, cache, prompt(30), prompt_lookup_num_tokens=3)
    assert polykv.compile("*: snapkv@16(window=4)", model).make_cache().is_croppable


# --- crop --------------------------------------------------------------------------------------------------


def _forward(model, cache, ids):
    with torch.no_grad():
        return model(ids, **cache_argument(model, cache)).logits[:, -1]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(st.integers(1, 5), st.integers(0, 5)), min_size=1, max_size=6))
def test_forwards_and_crops_follow_the_dynamic_cache_exactly(family, steps):
    """Any sequence of verification forwards (k tokens) and crops (the newest r) on a cache that records
    its past, as assisted decoding uses it: logits equal DynamicCache's, sliding windows included."""
    model, _ = family
    ours, theirs = polykv.compile("*: full", model).make_cache(), DynamicCache(config=model.config)
    for cache in (ours, theirs):
        _forward(model, cache, prompt(12))
        cache.activate_past_recording()
    for number, (forward, back) in enumerate(steps):
        ids = prompt(forward, seed=number + 1)
        torch.testing.assert_close(_forward(model, ours, ids), _forward(model, theirs, ids), rtol=0, atol=0)
        back = min(back, forward)
        ours.crop(-back)
        theirs.crop(-back)
        assert ours.get_seq_length() == theirs.get_seq_length()
    ids = prompt(1, seed=99)
    torch.testing.assert_close(_forward(model, ours, ids), _forward(model, theirs, ids), rtol=0, atol=0)


def test_crop_zero_keeps_everything_and_a_positive_count_is_refused():
    model = tiny_model("llama")
    cache = polykv.compile(COMPRESSED, model).make_cache()
    _generate(model, cache, prompt(30))
    lengths = cache.layer_lengths()
    cache.crop(0)
    assert cache.layer_lengths() == lengths and cache.get_seq_length() == 41
    with pytest.raises(ValueError, match="negative count"):
        cache.crop(5)
    cache.crop(-2)
    assert cache.get_seq_length() == 39 and cache.layer_lengths() == [n - 2 for n in lengths]
    cache.crop(-100)  # everything: a fresh cache, like rewind(0)
    assert cache.state is CacheState.FRESH and cache.get_seq_length() == 0


def test_a_sliding_window_that_dropped_what_a_crop_needs_refuses_it_and_changes_nothing():
    model = tiny_model("mistral-sliding")
    cache = polykv.compile("*: full", model).make_cache()
    _forward(model, cache, prompt(20))
    _forward(model, cache, prompt(3, seed=1))
    with pytest.raises(polykv.CacheError, match="activate_past_recording"):
        cache.crop(-3)
    assert cache.get_seq_length() == 23 and cache.layer_lengths() == [7] * 4
    cache.crop(0)  # nothing to roll back: always possible


# --- copies ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [copy.deepcopy, polykv.PolyCache.fork], ids=["deepcopy", "fork"])
def test_a_copy_goes_on_exactly_like_its_original_and_alone(make):
    """The prefix recipe: prefill a prefix once, copy it per request; the original stays as it was."""
    model = tiny_model("llama")
    plan = polykv.compile(COMPRESSED, model)
    assert make(plan.make_cache()).state is CacheState.FRESH
    prefix = prompt(30)
    base = plan.make_cache()
    _forward(model, base, prefix)
    lengths = base.layer_lengths()
    for seed in (1, 2):
        ids = torch.cat([prefix, prompt(5, seed=seed)], dim=1)
        alone = plan.make_cache()
        _forward(model, alone, prefix)
        expected = _generate(model, alone, ids)
        assert torch.equal(_generate(model, make(base), ids), expected)
    assert base.layer_lengths() == lengths and base.get_seq_length() == 30
    # The original changes after the copy; the copy holds what it held (a fork's shared buffers included).
    twin = make(base)
    before = _forward(model, make(twin), prompt(1, seed=7))
    base.crop(-4)
    _forward(model, base, prompt(6, seed=8))
    torch.testing.assert_close(_forward(model, twin, prompt(1, seed=7)), before, rtol=0, atol=0)


def test_a_fork_copies_nothing_until_it_appends():
    model = tiny_model("llama")
    base = polykv.compile("*: full", model).make_cache()
    _forward(model, base, prompt(30))
    twin = base.fork()
    assert all(a.storage.keys.data_ptr() == b.storage.keys.data_ptr() for a, b in zip(base.layers, twin.layers))
    _forward(model, twin, prompt(1, seed=1))
    assert all(a.storage.keys.data_ptr() != b.storage.keys.data_ptr() for a, b in zip(base.layers, twin.layers))


@pytest.mark.parametrize("spec", [COMPRESSED, "layers * heads 0: snapkv@16(window=4); layers * heads 1: full"])
def test_a_cast_cache_holds_what_it_held_in_the_new_dtype(spec):
    """What a draft in a lower precision does with the cache chosen from a float64 prefill (``PolyCache.cast``)."""
    model = tiny_model("llama", dtype=torch.float64)
    cache = polykv.compile(spec, model).make_cache()
    _forward(model, cache, prompt(30))
    before = [(part.storage.keys, part.storage.positions) for part in _parts(cache)]
    cache.cast(torch.float32)
    for part, (keys, positions) in zip(_parts(cache), before):
        assert part.storage.keys.dtype == torch.float32 and torch.equal(part.storage.keys, keys.float())
        assert part.storage.capacity == part.storage.size  # exactly what is stored, in buffers of its own
        assert positions is None or torch.equal(part.storage.positions, positions)
    reference = polykv.compile(spec, model).make_cache()
    _forward(model, reference, prompt(30))
    ids = prompt(2, seed=1)
    lower = _forward(copy.deepcopy(model).to(torch.float32), cache, ids)
    torch.testing.assert_close(lower.double(), _forward(model, reference, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(polykv.ArgumentTypeError, match=r"floating dtype, got torch\.int32"):
        cache.cast(torch.int32)


def _parts(cache):
    return [part for layer in cache.layers for part in getattr(layer, "parts", [layer])]


# --- offloading and refusals ------------------------------------------------------------------------------


def test_offload_and_prefetch_keep_the_output():
    model = tiny_model("llama")
    plan = polykv.compile(COMPRESSED, model)
    cache, reference = plan.make_cache(), plan.make_cache()
    for c in (cache, reference):
        _forward(model, c, prompt(30))
    for index in range(4):
        cache.offload(index, only_non_sliding=False)
    cache.prefetch(0)
    cache.prefetch(2, only_non_sliding=True)
    ids = prompt(3, seed=1)
    torch.testing.assert_close(_forward(model, cache, ids), _forward(model, reference, ids), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offload_moves_a_layer_to_the_cpu_and_back():
    model = tiny_model("llama", device="cuda")
    cache = polykv.compile(COMPRESSED, model).make_cache()
    _forward(model, cache, prompt(30).cuda())
    cache.offload(1)
    assert cache.layers[1].storage.device.type == "cpu" and cache.layers[0].storage.device.type == "cuda"
    cache.prefetch(1)
    assert cache.layers[1].storage.device.type == "cuda"
    cache.offload(2)
    _forward(model, cache, prompt(1).cuda())  # a forward brings back what was not prefetched
    assert cache.layers[2].storage.device.type == "cuda"


def test_a_layer_in_static_decoding_is_neither_offloaded_nor_cropped_nor_cast():
    model = tiny_model("llama")
    cache = polykv.compile(COMPRESSED, model).make_cache()
    _forward(model, cache, prompt(30))
    _forward(model, cache, prompt(1, seed=1))
    cache.begin_static(4)
    with pytest.raises(polykv.CacheError, match="static decoding"):
        cache.offload(1)
    with pytest.raises(polykv.CacheError, match="static decoding"):
        cache.crop(-1)
    with pytest.raises(polykv.CacheError, match="static decoding: end it before casting"):
        cache.cast(torch.bfloat16)


def test_use_cache_false_with_a_cache_is_refused():
    model = tiny_model("llama")
    cache = polykv.compile(COMPRESSED, model).make_cache()
    with pytest.raises(polykv.CacheError, match="use_cache=False"):
        _generate(model, cache, prompt(20), use_cache=False)


# --- the bundled model -------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "drafting",
    [pytest.param("assistant", marks=pytest.mark.heavy), "prompt lookup"],  # 7 s; the tiny models' assistant runs
)
def test_assisted_generation_on_the_bundled_model_is_the_dynamic_cache(real_model, drafting):
    model, tokenizer = real_model
    text = "The days of the week are Monday, Tuesday, Wednesday, Thursday, Friday. Again: Monday, Tuesday,"
    ids = torch.tensor([tokenizer.encode(text)])
    options = {"assistant_model": _truncated(model, 8)} if drafting == "assistant" else {"prompt_lookup_num_tokens": 3}
    with polykv.prepared(model):
        expected = _generate(model, DynamicCache(), ids, **options)
        cache = polykv.compile("*: full", model).make_cache()
        assert torch.equal(_generate(model, cache, ids, **options), expected)


def _truncated(model, layers: int):
    """The model's first ``layers`` layers as a cheap draft (a real assistant would be a smaller model)."""
    draft = copy.deepcopy(model)
    draft.model.layers = draft.model.layers[:layers]
    draft.config.num_hidden_layers = layers
    return draft

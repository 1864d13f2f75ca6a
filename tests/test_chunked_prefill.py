"""Chunked prefill: a prompt in chunks keeps what the whole prompt keeps; or, asked for, memory stays bounded.

``model.generate(..., prefill_chunk_size=N)`` feeds the prompt N tokens at a time; the cache knows
the prompt's end (generate says so; by hand, ``with cache.prompt(): ...``), and compresses it then,
with the queries and attention it kept: the same tokens as an unchunked prefill, whatever the
chunks (the contract checks it for every policy). With ``make_cache(compress_chunks=True)`` each
chunk attends to what the earlier chunks left, then the layer is compressed back to its budget
with that chunk's queries, so memory stays bounded.

Where bounded chunks and an unchunked prefill must agree: with budgets that cover the prompt nothing
is evicted, so they are the same computation; and a layer whose inputs do not depend on an
eviction (layer 0's keys come straight from the embeddings, and every layer's when all earlier
layers keep everything) keeps the same tokens under a policy whose choice decomposes over chunks
(the most recent tokens, the lowest key norms).
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import polykv
from polykv import cache_argument

COMPRESSING = ["streaming@16", "snapkv@16(window=4)", "pyramidkv@16", "h2o@16", "tova@16", "knorm@16", "random@16"]


def _prompt(length: int, batch: int = 1, seed: int = 5) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _lengths_after_each_forward(model, cache) -> list[list[int]]:
    seen = []
    hook = model.register_forward_hook(lambda *_: seen.append(cache.layer_lengths()))
    return seen, hook


@pytest.mark.parametrize("spec", COMPRESSING)
def test_every_chunk_is_compressed_to_the_budget(spec):
    model = tiny_llama("sdpa")
    plan = polykv.compile(f"layers *: {spec}", model)
    cache = plan.make_cache(compress_chunks=True)
    seen, hook = _lengths_after_each_forward(model, cache)
    try:
        model.generate(
            _prompt(96), max_new_tokens=3, do_sample=False, prefill_chunk_size=32, **cache_argument(model, cache)
        )
    finally:
        hook.remove()
    # Three prefill chunks of 32 and two decoding steps: after every chunk each layer holds its budget.
    assert seen[:3] == [[16] * 4] * 3
    assert seen[3:] == [[17] * 4, [18] * 4]


def test_the_issue_example_keeps_17_tokens_not_81():
    model = tiny_llama("sdpa")
    for bounded in (False, True):
        cache = polykv.compile("layers *: snapkv@16(window=8)", model).make_cache(compress_chunks=bounded)
        model.generate(
            _prompt(96), max_new_tokens=2, do_sample=False, prefill_chunk_size=32, **cache_argument(model, cache)
        )
        assert cache.layer_lengths() == [17] * 4


@pytest.mark.parametrize("chunk", [1, 7, 8, 39])
def test_chunks_of_any_size_keep_what_the_whole_prompt_keeps(chunk):
    """The issue's cases: chunks of one token, and a last chunk of one token (40 = 8 * 5, 39 + 1)."""
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers 0: full; *: snapkv@16(window=4)", model)
    ids = _prompt(40)
    whole, chunked = plan.make_cache(), plan.make_cache()
    options = {"max_new_tokens": 2, "do_sample": False}
    expected = model.generate(ids, **cache_argument(model, whole), **options)
    assert torch.equal(
        model.generate(ids, **cache_argument(model, chunked), prefill_chunk_size=chunk, **options), expected
    )
    assert chunked.layer_lengths() == whole.layer_lengths() == [41, 17, 17, 17]
    for a, b in zip(whole.layers[1:], chunked.layers[1:]):
        assert torch.equal(a.positions, b.positions)


SOLVED_PER_LENGTH = ["budget 20; solver uniform; *: knorm@auto", "budget 30%; solver pyramid; *: tova@auto"]


@pytest.mark.parametrize("spec", SOLVED_PER_LENGTH)
@pytest.mark.parametrize("chunk", [7, 25])
def test_budgets_solved_for_the_prompts_length_are_solved_for_all_of_it(spec, chunk):
    """A plan that solves its budgets per prompt length solves them for the whole prompt however generate chunks
    it (they were solved for the first chunk's length)."""
    model = tiny_llama("sdpa")
    plan = polykv.compile(spec, model)
    ids = _prompt(60, batch=2)
    whole, chunked = plan.make_cache(), plan.make_cache()
    options = {"max_new_tokens": 2, "do_sample": False}
    expected = model.generate(ids, **cache_argument(model, whole), **options)
    got = model.generate(ids, **cache_argument(model, chunked), prefill_chunk_size=chunk, **options)
    assert torch.equal(got, expected)
    assert chunked.layer_lengths() == whole.layer_lengths() and max(whole.layer_lengths()) < 61


def test_a_prompt_in_chunks_by_hand_says_its_length_to_a_plan_that_solves_for_it():
    model = tiny_llama("sdpa")
    plan = polykv.compile("budget 20; solver uniform; *: knorm@auto", model)
    ids = _prompt(60)
    whole = plan.make_cache()
    with torch.no_grad():
        model(ids, **cache_argument(model, whole))
        unknown = plan.make_cache()
        refused = r"solved them for the first chunk's 30 tokens.*prompt\(length="
        with pytest.raises(polykv.CacheError, match=refused), unknown.prompt():
            for start in (0, 30):
                model(ids[:, start : start + 30], **cache_argument(model, unknown))
        said = plan.make_cache()
        with said.prompt(length=60):
            for start in (0, 30):
                model(ids[:, start : start + 30], **cache_argument(model, said))
    assert said.layer_lengths() == whole.layer_lengths()
    for a, b in zip(whole.layers, said.layers):
        assert torch.equal(a.positions, b.positions)


@pytest.mark.parametrize("spec", ["full", "snapkv@200", "h2o@200", "tova@200", "streaming@200", "knorm@200"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_budgets_that_cover_the_prompt_give_the_unchunked_result(spec, attention):
    model = tiny_llama(attention)
    plan = polykv.compile(f"layers *: {spec}", model)
    ids = _prompt(96, batch=2)
    options = {"max_new_tokens": 6, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    whole = model.generate(ids, **cache_argument(model, plan.make_cache()), **options)
    chunked = model.generate(ids, **cache_argument(model, plan.make_cache()), prefill_chunk_size=20, **options)
    assert torch.equal(whole.sequences, chunked.sequences)
    for a, b in zip(whole.logits, chunked.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("policy", ["streaming@24(sink=4)", "knorm@24"])
@pytest.mark.parametrize("spec", ["layers 0: {policy}; *: full", "layers 0-2: full; 3: {policy}"])
def test_a_decomposable_policy_keeps_the_same_tokens_chunk_by_chunk(policy, spec):
    """Layer 0's inputs, and the last layer's when every earlier one is full, do not depend on eviction."""
    model = tiny_llama("sdpa")
    plan = polykv.compile(spec.format(policy=policy), model)
    compressed = 0 if spec.startswith("layers 0:") else 3
    ids = _prompt(90, batch=2)
    whole, chunked = plan.make_cache(), plan.make_cache(compress_chunks=True)
    with torch.no_grad():
        model(ids, **cache_argument(model, whole))
        with chunked.prompt():
            for start in range(0, 90, 25):
                model(ids[:, start : start + 25], **cache_argument(model, chunked))
    a, b = whole.layers[compressed], chunked.layers[compressed]
    assert torch.equal(a.positions, b.positions)
    torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-6)


def test_percent_budgets_follow_the_tokens_seen_so_far():
    model = tiny_llama("sdpa")
    cache = polykv.compile("layers *: knorm@25%", model).make_cache(prompt_length=100, compress_chunks=True)
    seen, hook = _lengths_after_each_forward(model, cache)
    try:
        with torch.no_grad():
            for start in range(0, 100, 40):
                model(_prompt(100)[:, start : start + 40], **cache_argument(model, cache))
    finally:
        hook.remove()
    assert [lengths[0] for lengths in seen] == [10, 20, 25]


def test_h2o_adds_up_attention_across_chunks():
    """With a budget that only binds at the last chunk, H2O sees every query's attention, as unchunked."""
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers 0: h2o@40; *: full", model)
    ids = _prompt(60)
    whole, chunked = plan.make_cache(), plan.make_cache(compress_chunks=True)
    with torch.no_grad():
        model(ids, **cache_argument(model, whole))
        with chunked.prompt():
            model(ids[:, :30], **cache_argument(model, chunked))
            model(ids[:, 30:], **cache_argument(model, chunked))
    assert torch.equal(whole.layers[0].positions, chunked.layers[0].positions)


def test_a_left_padded_batch_streams_in_like_each_prompt_alone():
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers 0: full; *: snapkv@14(window=4)", model)
    prompts = [_prompt(n, seed=n)[0] for n in (70, 45)]
    width = 70
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    options = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}
    together = model.generate(batch, attention_mask=mask, **cache_argument(model, plan.make_cache()), **options)
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **cache_argument(model, plan.make_cache()), **options)
        assert torch.equal(together[row, -5:], alone[0, -5:])
    chunked = model.generate(
        batch, attention_mask=mask, **cache_argument(model, plan.make_cache()), prefill_chunk_size=16, **options
    )
    assert chunked.shape == together.shape

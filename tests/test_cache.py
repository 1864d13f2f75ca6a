"""The cache engine on tiny random Llama models: exactness, real eviction, masks, padding, decoding, errors."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from conftest import DEVICES, tiny_llama
from transformers import AttentionInterface, DynamicCache, StaticCache
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.models.llama.modeling_llama import repeat_kv

import polykv
from polykv import cache_argument
from polykv.cache import inputs

BUILTIN = ["full", "streaming@200", "snapkv@200", "pyramidkv@200", "h2o@200", "tova@200", "knorm@200", "random@200"]
COMPRESSING = ["streaming@12", "snapkv@12(window=4)", "pyramidkv@12", "h2o@12", "tova@12", "knorm@12", "random@12"]


def _prompt(batch: int = 1, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _greedy(model, cache, ids, attention_mask=None, steps: int = 6) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding by hand, with positions from the attention mask as generate computes them."""
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    logits_per_step, tokens = [], ids
    new = ids
    for _ in range(steps):
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
        with torch.no_grad():
            logits = model(
                new, attention_mask=attention_mask, position_ids=positions, **cache_argument(model, cache)
            ).logits
        logits_per_step.append(logits[:, -1].float())
        new = logits[:, -1:].argmax(-1)
        tokens = torch.cat([tokens, new], 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(new)], 1)
    return tokens, logits_per_step


# --- a cache that covers the whole context is the full cache ---------------------------------------


@pytest.mark.parametrize("policy", BUILTIN)
def test_full_budget_equals_the_full_cache(tiny_model, policy):
    ids = _prompt(batch=2)
    expected = tiny_model.generate(ids, max_new_tokens=8, do_sample=False, **cache_argument(tiny_model, DynamicCache()))
    expected_logits = tiny_model(ids).logits
    plan = polykv.compile(f"layers *: {policy} decode streaming@500", tiny_model)
    assert torch.equal(
        tiny_model.generate(ids, max_new_tokens=8, do_sample=False, **cache_argument(tiny_model, plan.make_cache())),
        expected,
    )
    assert torch.equal(tiny_model(ids, **cache_argument(tiny_model, plan.make_cache())).logits, expected_logits)


def test_preparing_a_model_leaves_its_outputs_alone(tiny_model):
    ids = _prompt()
    before = tiny_model(ids).logits
    polykv.prepare_model(tiny_model)
    assert tiny_model.config._attn_implementation.startswith("polykv_")
    assert torch.equal(tiny_model(ids).logits, before)
    assert torch.equal(tiny_model(ids, **cache_argument(tiny_model, DynamicCache())).logits, before)


def test_a_prepared_model_still_compiles_whole_with_transformers_caches(tiny_model):
    """generate compiles a StaticCache's steps as one graph: polykv's attention, eager for its own caches,
    must trace as the wrapped kernel for others, also after a PolyCache has been used."""
    ids = _prompt()
    plan = polykv.compile("layers *: snapkv@12(window=4)", tiny_model)
    tiny_model.generate(ids, max_new_tokens=2, do_sample=False, **cache_argument(tiny_model, plan.make_cache()))

    def run(forward):
        cache = StaticCache(config=tiny_model.config, max_cache_len=48)
        with torch.no_grad():
            return forward(ids, **cache_argument(tiny_model, cache)).logits

    torch._dynamo.reset()
    whole = torch.compile(tiny_model.forward, fullgraph=True, backend="eager")  # a graph break raises
    assert torch.equal(run(whole), run(tiny_model.forward))


# --- real memory savings -----------------------------------------------------------------------------


def test_an_open_prompt_holds_only_the_queries_its_policies_look_at(tiny_model):
    """generate leaves the prompt open until prefill ends; meanwhile a layer keeps the window of queries
    SnapKV scores with, not the memory of every query of the prompt's forward."""
    plan = polykv.compile("layers *: snapkv@12(window=4)", tiny_model)
    cache = plan.make_cache()
    with torch.no_grad(), cache.prompt():
        tiny_model(_prompt(batch=2, length=400), **cache_argument(tiny_model, cache))
        for layer in cache.layers:
            window = layer.recent_queries
            assert window.shape[-2] == 4
            assert window.untyped_storage().nbytes() == window.numel() * window.element_size()


@pytest.mark.parametrize("policy", COMPRESSING)
def test_each_layer_stores_exactly_its_budget(tiny_model, policy):
    plan = polykv.compile(f"layers 0: full; 1: streaming@30; 2: {policy}; 3: knorm@50%", tiny_model)
    cache = plan.make_cache()
    ids = _prompt(batch=3, length=40)
    with torch.no_grad():
        tiny_model(ids, **cache_argument(tiny_model, cache))
    assert cache.layer_lengths() == [40, 30, 12, 20]
    for layer, length in zip(cache.layers, [40, 30, 12, 20]):
        assert layer.keys.shape == layer.values.shape == (3, 2, length, 16)  # dense, nothing masked
        assert layer.positions is None or layer.positions.shape == (3, 2, length)
    assert cache.get_seq_length() == 40
    element = 4  # float32
    kv_bytes = sum(2 * 3 * 2 * n * 16 * element for n in [40, 30, 12, 20])
    position_bytes = sum(3 * 2 * n * 4 for n in [30, 12, 20])  # int32 positions of evicted layers
    assert cache.nbytes() == kv_bytes + position_bytes
    assert cache.full_nbytes() == 4 * 2 * 3 * 2 * 40 * 16 * element


def test_a_prompt_shorter_than_the_budget_keeps_everything(tiny_model):
    cache = polykv.compile("layers *: snapkv@64(window=4)", tiny_model).make_cache()
    with torch.no_grad():
        tiny_model(_prompt(length=20), **cache_argument(tiny_model, cache))
    assert cache.layer_lengths() == [20, 20, 20, 20]
    assert all(layer.positions is None for layer in cache.layers)


def test_percent_budgets_follow_the_prompt(tiny_model):
    cache = polykv.compile("layers *: knorm@25%", tiny_model).make_cache()
    with torch.no_grad():
        tiny_model(_prompt(length=41), **cache_argument(tiny_model, cache))
    assert cache.layer_lengths() == [math.ceil(41 / 4)] * 4


# --- eviction is exact: real eviction equals masking the evicted tokens out -----------------------

_HIDDEN: dict[int, torch.Tensor] = {}


def _masked_reference(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Eager attention over the full cache with the tokens in _HIDDEN[layer] (B, H, seen) masked out."""
    hidden = _HIDDEN.get(module.layer_idx)
    keys, values = repeat_kv(key, module.num_key_value_groups), repeat_kv(value, module.num_key_value_groups)
    weights = torch.matmul(query, keys.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    if hidden is not None:
        hidden = hidden.repeat_interleave(module.num_key_value_groups, dim=1)[:, :, None, :]
        weights = weights.masked_fill(hidden, torch.finfo(weights.dtype).min)
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    return torch.matmul(weights, values).transpose(1, 2).contiguous(), weights


AttentionInterface.register("masked_reference", _masked_reference)
AttentionMaskInterface.register("masked_reference", ALL_MASK_ATTENTION_FUNCTIONS["eager"])


def _hidden_from(cache: polykv.PolyCache, new_tokens: int) -> dict[int, torch.Tensor]:
    """Which logical positions each layer no longer stores, as seen by the next forward of `new_tokens`."""
    hidden = {}
    for layer in cache.layers:
        batch, heads = layer.keys.shape[:2]
        stored = torch.zeros(batch, heads, layer.seen + new_tokens, dtype=torch.bool)
        if layer.positions is None:
            stored[..., : layer.seen] = True
        else:
            stored.scatter_(-1, layer.positions, True)
        stored[..., layer.seen :] = True
        hidden[layer.index] = ~stored
    return hidden


def _masked_reference_model(seed: int = 3):
    """The tiny Llama of polykv.testing with attention that hides what _HIDDEN says a layer evicted."""
    from polykv.testing import tiny_model

    model = tiny_model("llama", "eager", seed=seed)
    model.set_attn_implementation("masked_reference")
    return model


@contextlib.contextmanager
def hide_evicted(cache: polykv.PolyCache, new_tokens: int):
    """While inside, the masked reference hides exactly what ``cache``'s layers no longer hold."""
    _HIDDEN.clear()
    if cache.get_seq_length():
        _HIDDEN.update(_hidden_from(cache, new_tokens))
    try:
        yield
    finally:
        _HIDDEN.clear()


@pytest.mark.parametrize("policy", COMPRESSING)
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left-padded"])
def test_real_eviction_equals_masking_the_evicted_tokens(policy, padded):
    """Step by step, PolyCache's logits equal full attention with exactly the evicted tokens hidden."""
    model = tiny_llama("eager", seed=3)
    reference = tiny_llama("eager", seed=3)
    reference.set_attn_implementation("masked_reference")
    plan = polykv.compile(f"layers 0: full; 1: {policy} decode streaming@16(sink=2); *: {policy}", model)
    cache, full = plan.make_cache(), DynamicCache()
    ids = _prompt(batch=2, length=36, seed=4)
    mask = torch.ones_like(ids)
    if padded:
        mask[0, :7] = 0
    new, step_mask = ids, mask
    _HIDDEN.clear()
    try:
        for step in range(8):
            positions = (step_mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1] :]
            if step:
                _HIDDEN.update(_hidden_from(cache, new.shape[1]))
            with torch.no_grad():
                ours = model(
                    new, attention_mask=step_mask, position_ids=positions, **cache_argument(model, cache)
                ).logits
                theirs = reference(
                    new, attention_mask=step_mask, position_ids=positions, **cache_argument(reference, full)
                ).logits
            torch.testing.assert_close(ours[:, -1], theirs[:, -1], rtol=1e-4, atol=1e-5)
            new = ours[:, -1:].argmax(-1)
            step_mask = torch.cat([step_mask, torch.ones_like(new)], 1)
    finally:
        _HIDDEN.clear()
    assert cache.layer_lengths()[1] == 16 and cache.layer_lengths()[2] == 12 + 7


def test_padding_is_never_kept_in_place_of_real_tokens(tiny_model):
    cache = polykv.compile("layers *: knorm@10", tiny_model).make_cache()
    ids = _prompt(batch=3, length=30)
    mask = torch.ones_like(ids)
    mask[1, :12] = 0  # 18 real tokens: compressed to 10 real ones
    mask[2, :25] = 0  # 5 real tokens: all kept, plus the 5 latest padding tokens (masked)
    with torch.no_grad():
        tiny_model(ids, attention_mask=mask, **cache_argument(tiny_model, cache))
    for layer in cache.layers:
        assert (layer.positions[1] >= 12).all()
        assert (layer.positions[2] == torch.arange(20, 30)).all()


def test_right_padding_is_refused(tiny_model):
    cache = polykv.compile("layers *: knorm@10", tiny_model).make_cache()
    ids = _prompt(batch=2, length=30)
    mask = torch.ones_like(ids)
    mask[0, -5:] = 0
    with pytest.raises(polykv.CacheError, match="left padding"):
        tiny_model(ids, attention_mask=mask, **cache_argument(tiny_model, cache))


def test_a_padded_batch_answers_like_each_prompt_alone(tiny_model):
    plan = polykv.compile("layers 0: full; *: snapkv@14(window=4) decode streaming@20(sink=2)", tiny_model)
    prompts = [_prompt(length=n, seed=n)[0] for n in (40, 25, 12)]
    width = max(len(p) for p in prompts)
    batch = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([torch.arange(width) >= width - len(p) for p in prompts]).long()
    _, batched = _greedy(tiny_model, plan.make_cache(), batch, mask, steps=10)
    for row, prompt in enumerate(prompts):
        _, alone = _greedy(tiny_model, plan.make_cache(), prompt[None], steps=10)
        for step, (together, single) in enumerate(zip(batched, alone)):
            torch.testing.assert_close(together[row], single[0], rtol=1e-4, atol=1e-4, msg=f"row {row} step {step}")


# --- decoding ----------------------------------------------------------------------------------------


def test_a_decode_policy_bounds_memory_during_long_generation(tiny_model):
    plan = polykv.compile("layers 0: full decode streaming@30(sink=4); *: knorm@12 decode streaming@24", tiny_model)
    cache = plan.make_cache()
    ids = _prompt(length=40)
    out = tiny_model.generate(
        ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, **cache_argument(tiny_model, cache)
    )
    assert out.shape[1] == 100
    assert cache.get_seq_length() == 99  # the last token is never fed back
    assert cache.layer_lengths() == [30, 24, 24, 24]
    streamed = cache.layers[0].positions[0, 0]
    assert streamed.tolist() == [0, 1, 2, 3, *range(73, 99)]  # 4 sinks and the most recent tokens


def test_query_aware_decode_policies_see_recent_queries(tiny_model):
    plan = polykv.compile("layers *: snapkv@10(window=4) decode snapkv@16(window=6)", tiny_model)
    cache = plan.make_cache()
    tiny_model.generate(_prompt(length=30), max_new_tokens=20, do_sample=False, **cache_argument(tiny_model, cache))
    assert cache.layer_lengths() == [16] * 4
    assert all(layer.recent_queries.shape[2] == 6 for layer in cache.layers)
    assert cache.layers[0].recent_query_positions.tolist() == list(range(43, 49))


def test_decoding_keeps_no_queries_when_no_decode_policy_scores_with_them(tiny_model):
    plan = polykv.compile("layers *: snapkv@10(window=4)", tiny_model)
    cache = plan.make_cache()
    tiny_model.generate(_prompt(length=30), max_new_tokens=20, do_sample=False, **cache_argument(tiny_model, cache))
    assert cache.layers[0].recent_query_positions.tolist() == list(range(26, 30))  # the prompt's last window


def test_one_compressed_context_answers_several_questions(tiny_model):
    plan = polykv.compile("layers 0-1: full; *: snapkv@16(window=4)", tiny_model)
    context, questions = _prompt(length=50, seed=7), [_prompt(length=n, seed=n) for n in (5, 9, 3)]
    cache = plan.make_cache()
    with torch.no_grad():
        tiny_model(context, **cache_argument(tiny_model, cache))
    cache.end_prefill()  # the questions are appended, not compressed with the context
    compressed = cache.layer_lengths()
    for question in questions:
        ids = torch.cat([context, question], 1)
        answer = tiny_model.generate(ids, max_new_tokens=5, do_sample=False, **cache_argument(tiny_model, cache))
        cache.rewind(context.shape[1])
        assert cache.layer_lengths() == compressed and cache.get_seq_length() == 50
        fresh = plan.make_cache()
        with torch.no_grad():
            tiny_model(context, **cache_argument(tiny_model, fresh))
        fresh.end_prefill()
        assert torch.equal(
            tiny_model.generate(ids, max_new_tokens=5, do_sample=False, **cache_argument(tiny_model, fresh)), answer
        )


def test_crop_follows_transformers_convention(tiny_model):
    cache = polykv.compile("layers *: knorm@10", tiny_model).make_cache()
    tiny_model.generate(_prompt(length=30), max_new_tokens=6, do_sample=False, **cache_argument(tiny_model, cache))
    assert cache.get_seq_length() == 35
    cache.crop(-3)
    assert cache.get_seq_length() == 32 and cache.layer_lengths() == [12] * 4


def test_rewinding_into_the_compressed_context(tiny_model):
    cache = polykv.compile("layers *: streaming@10(sink=2)", tiny_model).make_cache()
    with torch.no_grad():
        tiny_model(_prompt(length=30), **cache_argument(tiny_model, cache))
    cache.rewind(25)  # streaming kept 0, 1 and 22-29: heads agree, so 5 remain
    assert cache.layer_lengths() == [5] * 4 and cache.get_seq_length() == 25


# --- query-aware policies at prefill -------------------------------------------------------------------


def test_query_aware_scoring_keeps_sdpa_and_computes_attention_in_chunks(monkeypatch):
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers *: h2o@10", model)
    ids = _prompt(batch=2, length=50)
    cache = plan.make_cache()
    with torch.no_grad():
        model(ids, **cache_argument(model, cache))
    assert model.config._attn_implementation == "polykv_sdpa"
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", 2 * 6 * 50 * 3)  # three queries per chunk
    chunked = plan.make_cache()
    with torch.no_grad():
        model(ids, **cache_argument(model, chunked))
    for whole, pieces in zip(cache.layers, chunked.layers):
        assert torch.equal(whole.positions, pieces.positions)


# --- errors ----------------------------------------------------------------------------------------------


def test_an_empty_prompt_is_an_error(tiny_model):
    cache = polykv.compile("layers *: knorm@10", tiny_model).make_cache()
    with pytest.raises(polykv.CacheError, match="the prompt is empty"):
        cache.update(torch.zeros(1, 2, 0, 16), torch.zeros(1, 2, 0, 16), 0)


def test_an_unprepared_model_fails_in_the_very_forward_that_should_compress():
    model = tiny_llama("sdpa")
    plan = polykv.Plan.from_json(polykv.compile("layers *: knorm@10", model).to_json())
    unprepared = tiny_llama("sdpa")
    expected = r"layer 0's attention did not go through polykv.*plan.apply\(model\)"
    with pytest.raises(polykv.CacheError, match=expected), torch.no_grad():
        unprepared(_prompt(length=30), **cache_argument(unprepared, plan.make_cache()))  # a lone prefill


def test_apply_prepares_and_restores_the_model():
    model = tiny_llama("sdpa")
    plan = polykv.Plan.from_json(polykv.compile("layers *: knorm@10", tiny_llama("eager")).to_json())
    assert model.config._attn_implementation == "sdpa"
    with plan.apply(model) as prepared:
        assert prepared is model and model.config._attn_implementation == "polykv_sdpa"
        cache = plan.make_cache()
        with torch.no_grad():
            model(_prompt(length=30), **cache_argument(model, cache))
        assert cache.layer_lengths() == [10] * 4
    assert model.config._attn_implementation == "sdpa"
    polykv.prepare_model(model)
    with plan.apply(model):  # already prepared: left prepared on exit
        pass
    assert model.config._attn_implementation == "polykv_sdpa"
    polykv.restore_model(model)
    assert model.config._attn_implementation == "sdpa"


def test_a_plan_for_another_model_is_refused():
    plan = polykv.compile("layers *: knorm@10", tiny_llama("sdpa", layers=4))
    with pytest.raises(polykv.ModelError, match=r"compiled for .*4 layers.*but the model is .*3 layers"):
        plan.apply(tiny_llama("sdpa", layers=3))


def test_a_cache_serves_one_model_and_one_batch():
    model = tiny_llama("sdpa")
    cache = polykv.compile("layers *: knorm@10", model).make_cache()
    with torch.no_grad():
        model(_prompt(length=30), **cache_argument(model, cache))
        with pytest.raises(polykv.CacheError, match="holds 1 batch rows but received 2"):
            model(_prompt(batch=2, length=3), **cache_argument(model, cache))
    cache.reset()
    with torch.no_grad():
        model(_prompt(batch=2, length=30), **cache_argument(model, cache))
    assert cache.layer_lengths() == [10] * 4


def test_a_percent_budget_below_the_policy_minimum_is_caught_at_prefill(tiny_model):
    cache = polykv.compile("layers *: streaming@10%(sink=4)", tiny_model).make_cache()
    with pytest.raises(polykv.CacheError, match=r"streaming@10%\(sink=4\) gives 3 tokens for this 30-token prompt"):
        tiny_model(_prompt(length=30), **cache_argument(tiny_model, cache))


def test_unsupported_attention_is_refused():
    model = tiny_llama("sdpa")
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(polykv.ModelError, match="polykv works with sdpa or eager"):
        polykv.prepare_model(model)


# --- devices and precisions --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_devices_and_dtypes(device, dtype):
    model = tiny_llama("sdpa", dtype=dtype, device=device)
    ids = _prompt(batch=2, length=40).to(device)
    plan = polykv.compile("layers 0: full; 1: snapkv@12(window=4); 2: h2o@12; *: tova@12 decode streaming@20", model)
    assert plan.layers[1].device.startswith(device) and plan.layers[1].dtype == str(dtype).removeprefix("torch.")
    full = plan.make_cache() if dtype is torch.float32 else None
    cache = plan.make_cache()
    out = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_argument(model, cache))
    assert out.shape == (2, 52)
    assert cache.layer_lengths() == [51, 23, 23, 20]  # only the `*` rule bounds decoding
    assert all(layer.keys.dtype == dtype and layer.keys.device.type == device for layer in cache.layers)
    if full is not None:
        wide = polykv.compile("layers *: snapkv@100(window=4)", model).make_cache()
        expected = model.generate(ids, max_new_tokens=12, do_sample=False, **cache_argument(model, DynamicCache()))
        assert torch.equal(
            model.generate(ids, max_new_tokens=12, do_sample=False, **cache_argument(model, wide)), expected
        )


# --- plans, and what generate asks of a cache ----------------------------------------------------------


def test_a_plan_round_trips_through_json_and_generates_the_same_tokens(tiny_model):
    plan = polykv.compile("layers 0: full; 1: snapkv@12(window=4) decode streaming@20; *: knorm@25%", tiny_model)
    loaded = polykv.Plan.from_json(plan.to_json())
    assert loaded == plan
    ids = _prompt(batch=2)
    options = {"max_new_tokens": 10, "do_sample": False}
    expected = tiny_model.generate(ids, **cache_argument(tiny_model, plan.make_cache()), **options)
    assert torch.equal(tiny_model.generate(ids, **cache_argument(tiny_model, loaded.make_cache()), **options), expected)


def test_compile_takes_a_total_budget(tiny_model):
    plan = polykv.compile("layers 0: full; *: knorm@8", tiny_model, budget=64)
    assert "budget 64" in plan.spec
    with pytest.raises(polykv.SpecError, match="the spec sets its own budget"):
        polykv.compile("budget 32; layers *: knorm@8", tiny_model, budget=64)


@pytest.mark.parametrize("spec", ["layers *: full", "layers 0: full; *: snapkv@12(window=4) decode streaming@16"])
def test_beam_search_and_several_returned_sequences(tiny_model, spec):
    plan = polykv.compile(spec, tiny_model)
    ids = _prompt(batch=2, length=30)
    options = {"max_new_tokens": 8, "num_beams": 3, "num_return_sequences": 2, "do_sample": False}
    out = tiny_model.generate(ids, **cache_argument(tiny_model, plan.make_cache()), **options)
    assert out.shape == (4, 38)
    if spec == "layers *: full":
        assert torch.equal(out, tiny_model.generate(ids, **options))
    sampled = tiny_model.generate(
        ids, **cache_argument(tiny_model, plan.make_cache()), max_new_tokens=4, do_sample=True, num_return_sequences=3
    )
    assert sampled.shape == (6, 34)
    assert torch.equal(sampled[0::3, :30], ids) and torch.equal(sampled[2::3, :30], ids)


def test_reset_makes_the_cache_new_again(tiny_model):
    cache = polykv.compile("layers *: knorm@10", tiny_model).make_cache()
    ids = _prompt(length=30)
    first = tiny_model.generate(ids, max_new_tokens=5, do_sample=False, **cache_argument(tiny_model, cache))
    cache.reset()
    assert cache.get_seq_length() == 0 and cache.layer_lengths() == [0] * 4
    assert torch.equal(
        tiny_model.generate(ids, max_new_tokens=5, do_sample=False, **cache_argument(tiny_model, cache)), first
    )


def test_decoding_appends_in_place_with_headroom(tiny_model):
    """Decoding does not copy the whole layer each step: storage grows in steps, and nbytes counts it."""
    cache = polykv.compile("layers 0: full; *: knorm@10", tiny_model).make_cache()
    tiny_model.generate(
        _prompt(length=30), max_new_tokens=20, min_new_tokens=20, do_sample=False, **cache_argument(tiny_model, cache)
    )
    full, compressed = cache.layers[0].storage, cache.layers[1].storage
    assert (full.size, compressed.size) == (49, 29)
    # The headroom is one aligned step (64 tokens) at these sizes: a compressed layer's saving outlives decoding.
    assert (full.capacity, compressed.capacity) == (64, 64)
    element = 4
    assert cache.nbytes() == sum(
        2 * 2 * layer.storage.capacity * 16 * element
        + (layer.storage.capacity * 2 * 4 if layer.positions is not None else 0)
        for layer in cache.layers
    )


def test_a_decode_budget_bounds_the_memory_allocated(tiny_model):
    cache = polykv.compile("layers *: knorm@12 decode streaming@24", tiny_model).make_cache()
    tiny_model.generate(
        _prompt(length=40), max_new_tokens=50, min_new_tokens=50, do_sample=False, **cache_argument(tiny_model, cache)
    )
    assert all(layer.storage.capacity <= 25 for layer in cache.layers)

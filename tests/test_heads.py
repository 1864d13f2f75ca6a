"""Head granularity: statements that name KV heads, plans that carry a choice per head, and a cache that stores
only what each head keeps (the sum of the heads' budgets, not the largest) and attends as full attention with
each head's evicted tokens masked out."""

from __future__ import annotations

import attrs
import pytest
import torch
import transformers
from transformers import DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import polykv
from polykv.cache.split import SplitLayer
from polykv.cli.main import main
from polykv.language.check import check_text
from polykv.testing import prompt, tiny_model

#: Layer 1's KV head 0 keeps everything, head 1 runs snapkv: the tiny models have 2 KV heads per layer.
SPLIT = "layers 1 heads 0: full; layers 1 heads 1: snapkv@{budget}(window=4); *: snapkv@{other}(window=4)"


def _errors(text: str, **options) -> list[tuple[str, str]]:
    with pytest.raises(polykv.SpecError) as raised:
        check_text(text, "spec.pkv", **options)
    return [(d.code, d.message) for d in raised.value.diagnostics]


# --- the language -------------------------------------------------------------------------------------


def test_heads_print_back_as_written():
    text = "model layers 4 heads 2\nlayers 1 heads 0: full\nlayers 1 heads -1: snapkv@64\nlayers *: full\n"
    assert polykv.print_spec(polykv.parse(text)) == text


def test_each_head_gets_its_statement_and_star_fills_the_rest():
    checked = check_text("layers 1 heads 0,-1: full; 1 heads 1-2: snapkv@64; *: snapkv@32", layers=3, heads=4)
    layer = checked.layers[1]
    assert [h.prefill.policy for h in layer.heads] == ["full", "snapkv", "snapkv", "full"]
    assert [h.prefill.budget.count for h in layer.heads[1:3]] == [64, 64]
    assert checked.layers[0].heads == () and checked.layers[0].prefill.policy == "snapkv"


def test_heads_that_all_do_the_same_make_an_ordinary_layer():
    checked = check_text("layers 1 heads 0: snapkv@64; 1 heads 1: snapkv@64; *: full", layers=2, heads=2)
    assert checked.layers[1].heads == () and checked.layers[1].prefill.budget.count == 64


def test_star_statements_share_out_the_heads():
    checked = check_text("layers * heads 0: full; * heads 1-3: streaming@8; 2: snapkv@32", layers=3, heads=4)
    assert [h.prefill.policy for h in checked.layers[0].heads] == ["full", "streaming", "streaming", "streaming"]
    assert checked.layers[2].heads == ()


def test_a_head_that_does_not_exist_is_reported_with_the_count():
    assert _errors("layers 0 heads 4: full; *: full", layers=2, heads=4) == [
        (
            "head-out-of-range",
            "KV head 4 does not exist: the model has 4 KV heads per layer (0-3, or -4--1 from the end)",
        )
    ]


def test_heads_named_twice_are_an_overlap():
    found = _errors("layers 0 heads 0-1: full; 0 heads 1: snapkv@32; *: full", layers=2, heads=2)
    assert found == [("overlap", "layer 0 head 1 is already given a policy by an earlier statement")]
    found = _errors("layers 0 heads 0: full; 0: snapkv@32; *: full", layers=2, heads=2)
    assert found == [("overlap", "heads of layer 0 are already given a policy by an earlier statement")]


def test_heads_no_statement_covers_are_reported():
    assert _errors("layers 0 heads 0: full; 1: full", layers=2, heads=4) == [
        ("uncovered-heads", "heads 1-3 of layer 0 have no policy (4 KV heads per layer)")
    ]


def test_the_spec_can_declare_its_head_count():
    assert _errors("model layers 2 heads 2\nlayers 0 heads 2: full; *: full") == [
        (
            "head-out-of-range",
            "KV head 2 does not exist: this spec (`model ... heads H`) has 2 KV heads per layer (0-1, or -2--1 from "
            "the end)",
        )
    ]
    assert _errors("model layers 2 heads 2\n*: full", layers=2, heads=4)[0][0] == "head-count-mismatch"


def test_validate_prints_what_each_head_does(tmp_path, capsys):
    path = tmp_path / "heads.pkv"
    path.write_text("layers 1 heads 0: full; 1 heads 1: snapkv@64; *: snapkv@32\n")
    assert main(["validate", "--layers", "2", "--heads", "2", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("ok (2 layers, 2 KV heads each)")
    assert out[2:] == ["  layers 1 heads 0: full", '  layers 1 heads 1: snapkv@64(window=32, kernel=7, pooling="max")']


# --- plans --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def test_a_plan_carries_each_heads_choice_and_round_trips(model):
    plan = polykv.compile(SPLIT.format(budget=8, other=16), model)
    layer = plan.layers[1]
    assert [h.prefill.describe() for h in layer.heads] == ["full", 'snapkv@8(window=4, kernel=7, pooling="max")']
    assert plan.layers[0].heads == () and plan.head_budgets(40)[1] == [40, 8]
    assert polykv.Plan.from_json(plan.to_json()) == plan
    assert isinstance(plan.make_cache().layers[1], SplitLayer)


def test_head_choices_cannot_be_left_to_routing_yet(model):
    with pytest.raises(polykv.SpecError) as raised:
        polykv.compile("layers 1 heads 0: snapkv@auto; *: full", model, budget=32, profile=None)
    assert raised.value.diagnostics[0].code == "open-head-choice"


# --- the cache ----------------------------------------------------------------------------------------


def _padded(batch: int = 3, length: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch: row r has r * 5 padding tokens."""
    ids = prompt(length, batch=batch, seed=7)
    mask = torch.ones_like(ids)
    for row in range(batch):
        mask[row, : row * 5] = 0
        ids[row, : row * 5] = 0
    return ids, mask


def _steps(model, cache, ids, mask, new: int = 4) -> list[torch.Tensor]:
    """The logits of the prompt's last token and of ``new`` greedy steps, one forward at a time."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    found = []
    with torch.no_grad():
        for _ in range(new + 1):
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **polykv.cache_argument(model, cache)
            ).logits[:, -1]
            found.append(logits)
            ids = logits.argmax(-1, keepdim=True)
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            positions = positions[:, -1:] + 1
    return found


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_budgets_that_cover_the_prompt_give_the_full_cache_logits_bit_for_bit(attention):
    """Bit for bit with SDPA on one thread. The split layer runs the kernel once per group of heads, and with
    several threads (or eager attention's batched matmul) a few heads are reduced in another order than in one
    call over all of them: a float32 ulp, so there the logits agree to rounding."""
    model = tiny_model("llama", attention)
    ids, mask = _padded()
    plan = polykv.compile(SPLIT.format(budget=64, other=64) + " decode streaming@100", model)
    assert plan.layers[1].heads
    full = _steps(model, DynamicCache(), ids, mask)
    ours = _steps(model, plan.make_cache(), ids, mask)
    for step_ours, step_full in zip(ours, full, strict=True):
        if attention == "sdpa" and torch.get_num_threads() == 1:
            assert torch.equal(step_ours, step_full)
        else:
            torch.testing.assert_close(step_ours, step_full, rtol=0, atol=1e-6)


class _MaskedReference:
    """Full attention (a DynamicCache) with each KV head's evicted prompt tokens masked out: what a layer whose
    heads keep different tokens must compute."""

    def __init__(self, kept: dict[int, torch.Tensor], prompt_length: int):
        self.kept, self.prompt_length = kept, prompt_length  # layer -> (B, Hkv, prompt_length) bool

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.dtype != torch.bool:  # an additive mask: 0 where visible
            attention_mask = attention_mask == 0
        kept = self.kept.get(module.layer_idx)
        if kept is not None and key.shape[-2] > self.prompt_length:  # decoding: hide what each head evicted
            groups = query.shape[1] // kept.shape[1]
            columns = torch.ones(*kept.shape[:2], key.shape[-2], dtype=torch.bool)
            columns[..., : self.prompt_length] = kept
            visible = columns.repeat_interleave(groups, dim=1)[:, :, None, :]
            attention_mask = visible & attention_mask if attention_mask is not None else visible
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def test_ragged_heads_attend_as_full_attention_with_evicted_tokens_masked_in_a_padded_batch():
    model = tiny_model("llama")
    reference = tiny_model("llama")  # the same weights, its own attention
    ids, mask = _padded()
    plan = polykv.compile(SPLIT.format(budget=8, other=12), model)
    cache = plan.make_cache()
    ours = _steps(model, cache, ids, mask)
    assert [lengths[0].tolist() for lengths in cache.head_lengths()] == [[16, 16], [44, 12], [16, 16], [16, 16]]
    kept = {}
    for index, layer in enumerate(cache.layers):
        parts = layer.groups if isinstance(layer, SplitLayer) else [(tuple(range(2)), layer)]
        found = torch.zeros(3, 2, ids.shape[1], dtype=torch.bool)
        for heads, part in parts:
            positions = part.storage.positions_or_slots()
            for slot, head in enumerate(heads):
                prompt_positions = positions[:, slot][positions[:, slot] < ids.shape[1]].view(3, -1)
                found[:, head].scatter_(-1, prompt_positions, True)
        kept[index] = found
    transformers.AttentionInterface.register("polykv_test_masked", _MaskedReference(kept, ids.shape[1]))
    AttentionMaskInterface.register("polykv_test_masked", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    reference.config._attn_implementation = "polykv_test_masked"
    expected = _steps(reference, DynamicCache(), ids, mask)
    assert torch.equal(ours[0], expected[0])  # the prompt attends to everything
    for step_ours, step_expected in zip(ours[1:], expected[1:], strict=True):
        torch.testing.assert_close(step_ours, step_expected, rtol=1e-5, atol=1e-5)


def test_a_layer_stores_the_sum_of_its_heads_budgets():
    model = tiny_model("llama", layers=2)
    ids = prompt(300, seed=3)
    plan = polykv.compile("layers 0-1 heads 0: full; layers 0-1 heads 1: snapkv@32(window=4)", model)
    cache = plan.make_cache()
    with torch.no_grad():
        model(ids, **polykv.cache_argument(model, cache))
    head_dim = 16
    per_token = 2 * head_dim * 4  # keys and values, float32
    expected = sum(
        tokens * per_token + (tokens * 4 if tokens < 300 else 0)  # positions where a head evicted
        for layer in plan.head_budgets(300)
        for tokens in layer
    )
    assert plan.head_budgets(300) == [[300, 32], [300, 32]]
    assert abs(cache.nbytes() - expected) <= 0.02 * expected
    assert cache.layer_lengths() == [166.0, 166.0]
    assert cache.nbytes() < 0.6 * cache.full_nbytes()


@pytest.mark.slow
def test_the_bundled_model_gives_the_full_cache_logits_with_covering_head_budgets(real_model):
    model, tokenizer = real_model
    ids = tokenizer("The capital of France is Paris. The capital of Italy is", return_tensors="pt").input_ids
    plan = polykv.compile("layers 18 heads 0: full; layers 18 heads 1-2: snapkv@4000; *: full", model)
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    full = model.generate(ids, **polykv.cache_argument(model, DynamicCache()), **options)
    ours = model.generate(ids, **polykv.cache_argument(model, plan.make_cache()), **options)
    assert torch.equal(ours.sequences, full.sequences)
    for step_ours, step_full in zip(ours.logits, full.logits, strict=True):
        assert torch.equal(step_ours, step_full)


def test_plan_text_writes_a_statement_per_run_of_heads(model):
    from polykv.cli.commands.plan import plan_text

    plan = attrs.evolve(polykv.compile(SPLIT.format(budget=8, other=16), model), context_length=100)
    lines = plan_text(plan).splitlines()
    assert "layers 1 heads 0: full" in lines
    assert 'layers 1 heads 1: snapkv@8(window=4, kernel=7, pooling="max")' in lines
    assert "# stored tokens: 102 in all, 25.5 per layer on average" in lines

"""Head granularity: statements that name KV heads, plans that carry a choice per head, and a cache that stores
only what each head keeps (the sum of the heads' budgets, not the largest) and attends as full attention with
each head's evicted tokens masked out."""

from __future__ import annotations

import attrs
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
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


def test_every_heads_named_twice_point_at_the_first_statement():
    with pytest.raises(polykv.SpecError) as raised:
        check_text("layers * heads 0-1: full; * heads 1: streaming@8", "spec.pkv", layers=3, heads=2)
    (error,) = raised.value.diagnostics
    assert error.code == "overlap" and "by an earlier `*` statement" in error.message
    assert (error.span.start, [(note.message, note.span.start) for note in error.notes]) == (
        28,
        [("first given here", 9)],
    )


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


@pytest.mark.parametrize("groups", [("0,2", "1,3"), ("0-1", "2-3")])
def test_groups_of_heads_interleaved_or_in_runs_give_the_full_cache_logits(groups):
    """Heads taken by index (groups interleaved) and as views (runs of heads in order) attend alike."""
    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8)
    first, second = groups
    spec = f"layers 1 heads {first}: snapkv@64(window=4) decode streaming@100; layers 1 heads {second}: full; *: full"
    ids, mask = _padded()
    full = _steps(model, DynamicCache(), ids, mask)
    ours = _steps(model, polykv.compile(spec, model).make_cache(), ids, mask)
    for step_ours, step_full in zip(ours, full, strict=True):
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


# --- routing and budgets per head -----------------------------------------------------------------


def test_heads_star_names_every_head_and_keeps_open_heads_apart():
    text = "layers * heads *: auto@auto\n"
    assert polykv.print_spec(polykv.parse(text)) == text
    checked = check_text("budget 64; layers * heads *: auto@auto", "spec.pkv", layers=3, heads=2)
    assert all(len(entry.heads) == 2 for entry in checked.layers)  # open heads are decided one by one
    fixed = check_text("layers * heads *: snapkv@64", "spec.pkv", layers=3, heads=2)
    assert all(entry.heads == () for entry in fixed.layers)  # decided alike: an ordinary layer


def _kl_by_hand(model, sample, spec: str) -> float:
    """KL of the continuation under ``spec``'s cache against the full cache's, through plain forwards."""
    caches = [polykv.compile("layers *: full", model).make_cache(), polykv.compile(spec, model).make_cache()]
    inputs = torch.tensor(sample.target)[None, :-1]
    logits = []
    with torch.no_grad():
        for cache in caches:
            model(torch.tensor(sample.prompt)[None], **polykv.cache_argument(model, cache))
            logits.append(torch.log_softmax(model(inputs, **polykv.cache_argument(model, cache)).logits.float(), -1))
    return float((logits[0].exp() * (logits[0] - logits[1])).sum(-1).mean())


def test_a_head_entry_is_the_kl_with_only_that_head_compressed():
    from test_measure import _samples

    from polykv.calibration.measure import measure

    model = tiny_model("llama")
    sample = _samples(count=1)[0]
    measured = measure(model, [sample], policies={"knorm": {}}, grid=[8, 64], progress=False, heads=True)
    table = measured.head_losses[sample.group]
    assert [len(table), len(table[0]), len(table[0][0]), len(table[0][0][0])] == [4, 2, 1, 2]
    for layer, head in ((0, 1), (2, 0)):
        spec = f"layers {layer} heads {head}: knorm@8; layers {layer} heads {1 - head}: full; *: full"
        assert table[layer][head][0][0] == pytest.approx(_kl_by_hand(model, sample, spec), abs=1e-6)
    assert all(table[layer][head][0][1] == 0.0 for layer in range(4) for head in range(2))  # 64 covers the prompt


@pytest.fixture(scope="module")
def head_profile(model):
    from test_measure import _samples

    from polykv.calibration.calibrate import calibrate

    return calibrate(model, _samples(), policies=["knorm", "tova"], grid=[8, 16, 32], progress=False, heads=True)


HEADS_AUTO = "budget 16\nlayers * heads *: auto@auto"


def test_heads_are_budgeted_one_by_one_under_the_total(model, head_profile):
    assert head_profile.measures_heads
    plan = polykv.compile(HEADS_AUTO, model, profile=head_profile, context_length=48)
    budgets = plan.head_budgets(48)
    assert sum(map(sum, budgets)) == 16 * 4 * 2  # the spec's budget per layer and head, over every head
    assert all(len(layer.heads) == 2 for layer in plan.layers)
    assert polykv.Plan.from_json(plan.to_json()) == plan
    cache = plan.make_cache()
    with torch.no_grad():
        model.generate(prompt(48, batch=2, seed=5), **polykv.cache_argument(model, cache), max_new_tokens=3)
    stored = [lengths[0].tolist() for lengths in cache.head_lengths()]
    assert stored == [[min(b, 48) + 2 for b in layer] for layer in budgets]  # each head holds its budget


def test_the_solver_keeps_whole_the_head_its_table_says_suffers(model, head_profile):
    suffering = [[10.0] * len(head_profile.grid)] * len(head_profile.policies)
    tables = {
        task: [[suffering if (layer, head) == (2, 1) else table for head, table in enumerate(heads)]
               for layer, heads in enumerate(per_task)]
        for task, per_task in head_profile.head_losses.items()
    }  # fmt: skip
    sensitive = attrs.evolve(head_profile, head_losses=tables, regimes=())
    plan = polykv.compile(HEADS_AUTO, model, profile=sensitive, context_length=48)
    assert plan.layers[2].heads[1].prefill.describe() == "full"
    assert plan.layers[2].heads[0].prefill.describe() != "full"


def test_heads_left_open_need_a_profile_that_measured_heads(model, head_profile):
    layers_only = attrs.evolve(head_profile, head_losses={})
    with pytest.raises(polykv.SpecError) as raised:
        polykv.compile(HEADS_AUTO, model, profile=layers_only)
    assert [d.code for d in raised.value.diagnostics] == ["no-head-calibration"]
    assert "polykv calibrate --heads" in raised.value.diagnostics[0].hint


def test_budgets_are_solved_per_layer_or_per_head_not_both(model, head_profile):
    with pytest.raises(polykv.SpecError) as raised:
        polykv.compile("budget 16; layers 0 heads *: auto@auto; *: knorm@auto", model, profile=head_profile)
    assert [d.code for d in raised.value.diagnostics] == ["mixed-granularity"]


def test_a_capture_builds_the_cache_a_per_head_plan_makes(model, head_profile):
    from polykv.harness.capture import capture

    plan = polykv.compile(HEADS_AUTO, model, profile=head_profile, context_length=40)
    ids, mask = _padded(batch=2, length=40)
    captured = capture(model, ids, mask, needs=plan.needs())
    ours, theirs = captured.cache_for(plan), plan.make_cache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, **polykv.cache_argument(model, theirs))
    assert all(torch.equal(a, b) for a, b in zip(ours.head_lengths(), theirs.head_lengths()))
    step = prompt(1, batch=2, seed=9)
    step_mask = torch.cat([mask, torch.ones_like(step)], 1)
    logits = []
    with torch.no_grad():
        for cache in (ours, theirs):
            output = model(step, attention_mask=step_mask, position_ids=mask.sum(-1, keepdim=True),
                           **polykv.cache_argument(model, cache))  # fmt: skip
            logits.append(output.logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-6)


# --- static decoding ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        SPLIT.format(budget=8, other=16),
        "layers 1 heads 0: full decode streaming@24(sink=2); layers 1 heads 1: snapkv@8(window=4) decode "
        "streaming@20; *: knorm@12",
        "layers 1 heads 1,3: snapkv@8(window=4); layers 1 heads 0,2: full; *: knorm@12",  # interleaved groups
    ],
)
def test_static_decoding_of_ragged_heads_gives_the_tokens_and_heads_of_ordinary_decoding(spec):
    from test_static_decoding import both_ways

    model = tiny_model("llama", num_key_value_heads=4, num_attention_heads=8) if "1,3" in spec else tiny_model("llama")
    (expected, expected_cache), (tokens, cache) = both_ways(model, spec, [30, 22], 16)
    assert torch.equal(tokens, expected)
    for ours, theirs in zip(cache.head_lengths(), expected_cache.head_lengths(), strict=True):
        assert torch.equal(ours, theirs)
    split = cache.layers[1]
    for (_heads, part), (_same, expected_part) in zip(split.groups, expected_cache.layers[1].groups, strict=True):
        assert torch.equal(part.storage.positions_or_slots(), expected_part.storage.positions_or_slots())
        torch.testing.assert_close(part.storage.keys, expected_part.storage.keys, rtol=0, atol=1e-6)


def test_the_plan_drawing_has_a_heat_map_of_the_heads_budgets(model, head_profile, tmp_path, monkeypatch):
    import matplotlib.figure

    from polykv.cli.commands.plan import draw

    plan = polykv.compile(HEADS_AUTO, model, profile=head_profile, context_length=48)
    drawn, save = [], matplotlib.figure.Figure.savefig
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda figure, *a, **k: drawn.append(figure) or save(figure, *a, **k)
    )
    draw(plan, tmp_path / "plan.png")
    assert (tmp_path / "plan.png").stat().st_size > 0
    heat = drawn[0].axes[1].images[0].get_array()
    assert heat.shape == (2, 4)  # KV heads x layers
    assert heat.T.tolist() == plan.head_budgets(48)


# --- adaptive heads (Ada-KV) ----------------------------------------------------------------------------


ADAPTIVE = "layers 0: full; layers * heads adaptive: snapkv@{budget}(window=4)"


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 4),
    length=st.integers(2, 30),
    data=st.data(),
)
def test_shared_counts_sum_to_the_layers_budget_and_respect_the_floor(batch, heads, length, data):
    from polykv.cache.adaptive import shared_counts

    budget = data.draw(st.integers(1, length - 1))
    floor = data.draw(st.integers(0, budget))
    seed = data.draw(st.integers(0, 2**16))
    scores = torch.randn(batch, heads, length, generator=torch.Generator().manual_seed(seed))
    counts = shared_counts(scores, budget, floor)
    assert counts.shape == (batch, heads) and (counts.sum(dim=1) == heads * budget).all()  # each row its own
    assert ((floor <= counts) & (counts <= length)).all()


def test_the_head_whose_scores_stand_out_keeps_more():
    from polykv.cache.adaptive import shared_counts

    scores = torch.zeros(1, 3, 20)
    scores[0, 1] = 5.0  # every token of head 1 outranks the others'
    assert shared_counts(scores, budget=6, floor=2).tolist() == [[2, 14, 2]]


def test_adaptive_heads_share_each_layers_budget_at_prefill():
    model = tiny_model("llama")
    plan = polykv.compile(ADAPTIVE.format(budget=8), model)
    assert [layer.adaptive_heads for layer in plan.layers] == [False, True, True, True]
    assert polykv.Plan.from_json(plan.to_json()) == plan
    cache = plan.make_cache()
    with torch.no_grad():
        model(prompt(40, batch=2, seed=3), **polykv.cache_argument(model, cache))
    lengths = [layer[0].tolist() for layer in cache.head_lengths()]
    assert lengths[0] == [40, 40]
    assert all(sum(layer) == 2 * 8 and min(layer) >= 4 for layer in lengths[1:])  # snapkv needs its window
    assert any(layer[0] != layer[1] for layer in lengths[1:])
    assert cache.nbytes() < 0.6 * cache.full_nbytes()


@pytest.mark.parametrize("decode", ["", " decode streaming@12(sink=2)"])
def test_each_row_of_a_batch_keeps_what_it_keeps_alone(decode):
    """Ada-KV decides per sequence: every row shares its own budget among the heads, and sees exactly what it
    would keep alone (a head stores its largest row's share; the other rows hide the rest), while decoding
    too, padded rows included."""
    model = tiny_model("llama", dtype=torch.float64)
    plan = polykv.compile(ADAPTIVE.format(budget=8) + decode, model)
    ids = prompt(40, batch=3, seed=3)
    mask = torch.ones_like(ids)
    mask[2, :6] = 0
    options = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    together = model.generate(ids, attention_mask=mask, **polykv.cache_argument(model, plan.make_cache()), **options)
    shares = []
    for row in range(3):
        alone = ids[row : row + 1, mask[row].bool()]
        found = model.generate(alone, **polykv.cache_argument(model, plan.make_cache()), **options)
        assert torch.equal(together.sequences[row, -8:], found.sequences[0, -8:])
        for ours, theirs in zip(together.logits, found.logits, strict=True):
            torch.testing.assert_close(ours[row], theirs[0], rtol=0, atol=1e-9)
        prefilled = plan.make_cache()
        with torch.no_grad():
            model(alone, **polykv.cache_argument(model, prefilled))
        shares.append(torch.stack([layer[0] for layer in prefilled.head_lengths()[1:]]))  # (layers, heads)
    assert len({str(share.tolist()) for share in shares}) > 1  # the rows shared their budgets differently
    cache = plan.make_cache()
    with torch.no_grad():
        model(ids, attention_mask=mask, **polykv.cache_argument(model, cache))
    assert torch.equal(torch.stack(cache.head_lengths()[1:], dim=1), torch.stack(shares))  # (rows, layers, heads)
    stored = torch.tensor([[part.storage.size for _heads, part in layer.groups] for layer in cache.layers[1:]])
    assert torch.equal(stored, torch.stack(shares).amax(dim=0))  # a head stores its largest row's share


def test_adaptive_heads_with_a_covering_budget_are_the_full_cache():
    model = tiny_model("llama")
    ids = prompt(30, batch=2, seed=4)
    options = {"max_new_tokens": 5, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    plan = polykv.compile(ADAPTIVE.format(budget=64), model)
    ours = model.generate(ids, **polykv.cache_argument(model, plan.make_cache()), **options)
    theirs = model.generate(ids, **polykv.cache_argument(model, DynamicCache()), **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for step_ours, step_theirs in zip(ours.logits, theirs.logits, strict=True):
        assert torch.equal(step_ours, step_theirs)


def test_a_capture_shares_the_budget_as_the_cache_does():
    from polykv.harness.capture import capture

    model = tiny_model("llama")
    plan = polykv.compile(ADAPTIVE.format(budget=8), model)
    ids, mask = _padded(batch=2, length=40)
    ours, theirs = capture(model, ids, mask, needs=plan.needs()).cache_for(plan), plan.make_cache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=positions, **polykv.cache_argument(model, theirs))
    assert all(torch.equal(a, b) for a, b in zip(ours.head_lengths(), theirs.head_lengths(), strict=True))
    for layer, expected in zip(ours.layers[1:], theirs.layers[1:], strict=True):
        for (_h, part), (_same, expected_part) in zip(layer.groups, expected.groups, strict=True):
            positions = part.storage.positions_or_slots()
            assert torch.equal(positions, expected_part.storage.positions_or_slots())
            assert torch.equal(part.token_mask(positions), expected_part.token_mask(positions))  # rows hide alike


def test_adaptive_heads_need_a_policy_that_scores():
    assert _errors("layers * heads adaptive: full", layers=2)[0][0] == "adaptive-heads-without-scores"
    text = "layers * heads adaptive: snapkv@64\n"
    assert polykv.print_spec(polykv.parse(text)) == text


def test_validate_prints_the_layers_whose_heads_share_their_budget(tmp_path, capsys):
    path = tmp_path / "adaptive.pkv"
    path.write_text("layers 0: full\nlayers * heads adaptive: snapkv@64\n")
    assert main(["validate", str(path), "--layers", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  layers 0: full",
        '  layers 1-3 heads adaptive: snapkv@64(window=32, kernel=7, pooling="max")',
    ]


def test_adaptive_heads_share_the_layers_budget_again_for_the_next_prompt():
    model = tiny_model("llama")
    cache = polykv.compile(ADAPTIVE.format(budget=8), model).make_cache()
    kept = []
    for seed in (3, 9):
        cache.reset()
        with torch.no_grad():
            model(prompt(40, batch=1, seed=seed), **polykv.cache_argument(model, cache))
        kept.append([layer[0].tolist() for layer in cache.head_lengths()][1:])
    assert all(sum(layer) == 16 for run in kept for layer in run)  # each prompt shares the layer's 8 per head


def test_a_total_the_heads_cannot_fit_says_it_counts_per_head(model, head_profile):
    from polykv.solver import InfeasibleError

    spec = "budget 16; layers 0: full; layers 1-3 heads *: knorm@auto"  # layer 0 whole takes 96 of 128
    with pytest.raises(InfeasibleError, match=r"^counting tokens per KV head \(2 per layer\), the layers need at"):
        polykv.compile(spec, model, profile=head_profile, context_length=48)

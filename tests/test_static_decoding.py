"""Static decoding (fixed slots, masks from positions) and ``static_generate``: the tokens and the
cache of ordinary decoding, exactly, including decode-time eviction, left padding and sliding windows."""

from __future__ import annotations

import pytest
import torch
from conftest import CUDA, requires_real_model
from hypothesis import given, settings
from hypothesis import strategies as st

import polykv
from polykv import cache_argument
from polykv.decoding import Sampling, static, static_generate
from polykv.errors import CacheError
from polykv.model.describe import STATIC_CACHE_KEYWORD
from polykv.testing.models import greedy_by_forwards, tiny_model


def padded_prompt(lengths: list[int], seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded random prompts of ``lengths`` and their attention mask."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.randint(3, 128, (length,), generator=generator)
        mask[row, width - length :] = 1
    return ids, mask


def both_ways(model, spec: str, lengths: list[int], new: int):
    """(tokens, cache) of ordinary decoding and of static decoding (eager) of the same padded prompts."""
    ids, mask = padded_prompt(lengths)
    plan = polykv.compile(spec, model)
    with plan.apply(model):
        expected_cache = plan.make_cache()
        expected = greedy_by_forwards(model, expected_cache, ids, new, mask)
        cache = plan.make_cache()
        tokens = static_generate(
            model, cache, ids, attention_mask=mask, max_new_tokens=new, graph=False, eviction_slack=0
        )
    return (expected, expected_cache), (tokens, cache)


def stored(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.storage.keys, layer.storage.positions_or_slots()) for layer in cache.layers]


SPECS = [
    "*: full",
    "layers 0: full; *: snapkv@16(window=4)",
    "*: snapkv@16(window=4) decode streaming@20",  # evicts from the fifth static step on
    "*: full decode streaming@24(sink=2)",  # the ordinary first step evicts the prompt down to 24
    "*: knorm@12 decode knorm@14",
]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_gives_the_tokens_and_cache_of_ordinary_decoding(spec, attention):
    (expected, expected_cache), (tokens, cache) = both_ways(tiny_model("llama", attention), spec, [30, 22], 16)
    assert torch.equal(tokens, expected)
    # 14 static steps ran; the cache holds what ordinary decoding holds, sorted by position again.
    assert cache.layer_lengths() == expected_cache.layer_lengths()
    for (keys, positions), (expected_keys, expected_positions) in zip(stored(cache), stored(expected_cache)):
        assert torch.equal(positions, expected_positions)
        assert torch.allclose(keys, expected_keys, atol=1e-6)
    assert [layer.seen for layer in cache.layers] == [layer.seen for layer in expected_cache.layers]


@pytest.mark.parametrize("spec", SPECS)
def test_static_decoding_in_stages_of_growing_room_gives_the_tokens_of_ordinary_decoding(spec, monkeypatch):
    """The slots follow the tokens made (3, then 6, then what is left), not max_new_tokens; nothing changes."""
    rooms = []
    original = static.StaticDecoder.__init__

    def recording(self, *arguments, room, **options):
        rooms.append(room)
        original(self, *arguments, room=room, **options)

    monkeypatch.setattr(static, "FIRST_ROOM", 3)
    monkeypatch.setattr(static.StaticDecoder, "__init__", recording)
    (expected, expected_cache), (tokens, cache) = both_ways(tiny_model("llama"), spec, [30, 22], 16)
    assert rooms == [3, 6, 5]
    assert torch.equal(tokens, expected)
    assert cache.layer_lengths() == expected_cache.layer_lengths()
    assert [layer.seen for layer in cache.layers] == [layer.seen for layer in expected_cache.layers]


@pytest.mark.parametrize("lengths", [[30, 30, 30], [30, 22, 27]])
@pytest.mark.parametrize("decode", ["", " decode streaming@20(sink=2)"])
def test_static_decoding_hides_what_adaptive_heads_hide_from_a_row(decode, lengths):
    """Rows of a batch share each layer's budget among the heads on their own (each head stores its largest
    row's share): the static step's slots hide from each row what ordinary decoding hides."""
    spec = "layers 0: full; layers * heads adaptive: snapkv@8(window=4)" + decode
    (expected, expected_cache), (tokens, cache) = both_ways(tiny_model("llama"), spec, lengths, 16)
    assert torch.equal(tokens, expected)
    assert all(torch.equal(a, b) for a, b in zip(cache.head_lengths(), expected_cache.head_lengths(), strict=True))
    assert any((layer[0] != layer[1]).any() for layer in cache.head_lengths()[1:])  # rows shared differently


@pytest.mark.parametrize("family", ["mistral-sliding", "gemma2"])
def test_sliding_window_layers_reuse_their_slots_in_static_decoding(family):
    (expected, expected_cache), (tokens, cache) = both_ways(tiny_model(family), "*: snapkv@6(window=2)", [20, 13], 14)
    assert torch.equal(tokens, expected)
    for layer, expected_layer in zip(cache.layers, expected_cache.layers):
        assert torch.equal(layer.storage.positions_or_slots(), expected_layer.storage.positions_or_slots())


def test_a_decoding_step_keeps_its_shapes_in_static_decoding():
    """What makes a step capturable: the same tensors, of the same shapes, at every step."""
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 30])
    plan = polykv.compile("*: snapkv@16(window=4) decode streaming@18", model)
    with plan.apply(model):
        cache = plan.make_cache()
        greedy_by_forwards(model, cache, ids, 2, mask)
        cache.begin_static(room=8)
        slots = [(layer.static.keys.data_ptr(), layer.static.keys.shape) for layer in cache.layers]
        token = torch.tensor([[5], [6]])
        position_ids = torch.tensor([[32], [32]])
        evicting = []
        for _ in range(5):
            evicting.append(cache.plan_static_step())
            model(input_ids=token, position_ids=position_ids, **cache_argument(model, cache))
            cache.static_stepped()
            position_ids += 1
        # Held 17 after the ordinary step: the second step fills the last free slot and evicts, and so on.
        assert evicting == [()] + [tuple((layer, True) for layer in range(4))] * 4
        assert [(layer.static.keys.data_ptr(), layer.static.keys.shape) for layer in cache.layers] == slots
        assert all(layer.static.keys.shape[2] == 19 for layer in cache.layers)  # the bound plus one
        cache.end_static(5)
    assert cache.layer_lengths() == [18] * 4


@pytest.mark.parametrize(("slack", "effective"), [(1, 1), (3, 3), (None, 1)])
def test_eviction_slack_evicts_several_tokens_every_few_steps(slack, effective):
    """With slack s a decode-bounded layer goes over its bound every s + 1 steps and drops to bound - s;
    streaming then holds its sinks and the newest tokens. By default the slack is at most a sixteenth of the
    bound (here 20 // 16 = 1)."""
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 30])
    plan = polykv.compile("*: snapkv@16(window=4) decode streaming@20(sink=2)", model)
    with plan.apply(model):
        cache = plan.make_cache()
        tokens = static_generate(
            model, cache, ids, attention_mask=mask, max_new_tokens=30, graph=False, eviction_slack=slack
        )
    held = 17  # after the ordinary first step
    for _ in range(28):  # the static steps
        held = 20 - effective if held + 1 > 20 else held + 1
    assert tokens.shape == (2, 60)
    assert cache.layer_lengths() == [held] * 4
    seen = cache.layers[0].seen
    for layer in cache.layers:
        positions = layer.storage.positions_or_slots()
        sinks = positions[..., :2]
        assert (sinks < 30).all()  # the first two tokens snapkv kept
        newest = torch.arange(seen - (held - 2), seen).expand_as(positions[..., 2:])
        assert torch.equal(positions[..., 2:], newest)


@pytest.mark.parametrize("first_room", [256, 3])
def test_eos_ends_rows_and_generation_stops(first_room, monkeypatch):
    monkeypatch.setattr(static, "FIRST_ROOM", first_room)  # 3: the rows end in a later stage
    model = tiny_model("llama")
    ids, mask = padded_prompt([12, 9])
    plan = polykv.compile("*: full", model)
    with plan.apply(model):
        free = static_generate(model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=12, graph=False)
        eos = int(free[0, ids.shape[1] + 3])  # the fourth token row 0 generates
        stopped = static_generate(
            model,
            plan.make_cache(),
            ids,
            attention_mask=mask,
            max_new_tokens=12,
            eos_token_id=eos,
            pad_token_id=0,
            graph=False,
            check_every=1,
        )
    row = stopped[0, ids.shape[1] :]
    first = int((row == eos).nonzero()[0])
    assert first <= 3 and (row[first + 1 :] == 0).all()
    if (stopped[1, ids.shape[1] :] == eos).any():
        assert stopped.shape[1] < free.shape[1]  # every row ended: generation stopped early


def test_policies_that_cannot_run_in_a_static_step_are_refused():
    model = tiny_model("llama")
    ids, mask = padded_prompt([20, 20])
    plan = polykv.compile("*: snapkv@8(window=2) decode tova@10", model)
    with (
        plan.apply(model),
        pytest.raises(CacheError, match="decode policy 'tova' cannot run in a static decoding step"),
    ):
        static_generate(model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=4, graph=False)


def test_static_decoding_starts_after_the_prefill():
    model = tiny_model("llama")
    plan = polykv.compile("*: full", model)
    with plan.apply(model):
        cache = plan.make_cache()
        with pytest.raises(CacheError, match="after the prefill"):
            cache.begin_static(room=4)  # fresh
        with cache.prompt():
            model(input_ids=torch.tensor([[5, 6, 7]]), **cache_argument(model, cache))
            with pytest.raises(CacheError, match="after the prefill"):
                cache.begin_static(room=4)  # taking a prompt


def test_a_closed_decoder_refuses_to_step_and_leaves_its_cache_as_closing_left_it():
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 30])
    plan = polykv.compile("*: full", model)
    with plan.apply(model):
        cache = plan.make_cache()
        greedy_by_forwards(model, cache, ids, 1, mask)
        decoder = static.StaticDecoder(
            model, cache, torch.tensor([5, 6]), torch.tensor([[30], [30]]), room=4, graph=False
        )
        decoder.run(2)
        decoder.close()
        decoder.close()  # closing twice hands the cache back once
        assert cache.layer_lengths() == [32] * 4  # the prompt's 30 and the two tokens fed
        with pytest.raises(CacheError, match="closed"):
            decoder.run(1)
        assert cache.layer_lengths() == [32] * 4


@requires_real_model
@pytest.mark.slow
@pytest.mark.heavy  # 13 s; the tiny models' static decoding runs in the quick tier
def test_static_generate_answers_as_generate_does_on_the_real_model(real_model):
    model, tokenizer = real_model
    from pathlib import Path

    text = (Path(__file__).parents[1] / "examples" / "prompts" / "passkey-1k.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids
    plan = polykv.compile("budget 128; layers *: auto@auto", model, tokenizer=tokenizer)
    with plan.apply(model):
        expected = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            **cache_argument(model, plan.make_cache(prompt_length=ids.shape[1])),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
        tokens = static_generate(
            model,
            plan.make_cache(prompt_length=ids.shape[1]),
            ids,
            max_new_tokens=12,
            eos_token_id=model.generation_config.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            graph=False,
        )
    assert torch.equal(tokens, expected)  # the same tokens, and it stops where generate stops
    assert "72514" in tokenizer.decode(tokens[0, ids.shape[1] :])


def test_a_compiled_step_gives_the_tokens_and_cache_of_the_eager_step():
    """torch.compile fuses the model's kernels around polykv's eager bookkeeping; in float32 nothing changes."""
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 22])
    plan = polykv.compile("layers 0: full; *: knorm@12 decode knorm@14", model)
    runs = []
    with plan.apply(model):
        for compile_step in (False, True):
            cache = plan.make_cache()
            tokens = static_generate(
                model, cache, ids, attention_mask=mask, max_new_tokens=12, graph=False, eviction_slack=0,
                compile_step=compile_step,
            )  # fmt: skip
            runs.append((tokens, cache))
    (expected, expected_cache), (tokens, cache) = runs
    assert torch.equal(tokens, expected)
    assert cache.layer_lengths() == expected_cache.layer_lengths()
    for (keys, positions), (expected_keys, expected_positions) in zip(stored(cache), stored(expected_cache)):
        assert torch.equal(positions, expected_positions)
        assert torch.allclose(keys, expected_keys, atol=1e-6)


@pytest.mark.parametrize(
    ("spec", "graphs_for_more_slots"),
    [("*: streaming@16", 0), ("layers 1 heads 1: snapkv@8(window=4); layers 1 heads 0: full; *: knorm@12", 1)],
)
def test_a_compiled_step_traces_the_caches_writes_and_attention_with_the_model(spec, graphs_for_more_slots):
    """Layers in static decoding write and attend inside the compiled graph (no graph break at a layer), so their
    kernels fuse with the model's, and one compilation serves every number of slots, but where heads keep
    different counts (a pool, whose attention takes its longest head's count from the host), and every prompt's
    length."""
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 22])
    plan = polykv.compile(spec, model)
    with plan.apply(model):
        expected = static_generate(model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=6, graph=False)
        torch._dynamo.reset()  # compiled code of an earlier test's model of these shapes would serve it unseen
        torch._dynamo.utils.counters.clear()
        tokens = static_generate(
            model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=6, graph=False, compile_step=True
        )
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        longer = static_generate(
            model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=9, graph=False, compile_step=True
        )
        # Room for more tokens is more slots: a size the compiled step does not specialise on.
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + graphs_for_more_slots
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        other_ids, other_mask = padded_prompt([41, 35])  # nor on the tokens seen (a pool: its longest head again)
        static_generate(
            model, plan.make_cache(), other_ids, attention_mask=other_mask, max_new_tokens=9, graph=False,
            compile_step=True,
        )  # fmt: skip
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + graphs_for_more_slots
    assert torch.equal(tokens, expected)
    assert torch.equal(longer[:, : tokens.shape[1]], tokens)
    breaks = " ".join(torch._dynamo.utils.counters["graph_break"])
    assert "before_forward" in breaks  # the prepared model's hooks stay eager: the counter does see breaks
    assert "_update_eagerly" not in breaks and "serve" not in breaks


def test_a_static_step_must_name_its_cache_for_polykvs_attention():
    """In static decoding the attention finds a layer through the forward's keyword that cache_argument adds;
    a forward given the cache some other way is refused, not attended over free slots."""
    model = tiny_model("llama")
    ids, mask = padded_prompt([30, 30])
    plan = polykv.compile("*: streaming@16", model)
    with plan.apply(model):
        cache = plan.make_cache()
        greedy_by_forwards(model, cache, ids, 2, mask)
        cache.begin_static(room=4)
        arguments = cache_argument(model, cache)
        assert arguments.pop(STATIC_CACHE_KEYWORD) is cache
        with pytest.raises(CacheError, match=r"layer 0's attention did not go through polykv.*cache_argument"):
            model(input_ids=torch.tensor([[5], [6]]), position_ids=torch.tensor([[32], [32]]), **arguments)


@pytest.mark.slow
@pytest.mark.heavy  # compiles four models: some 35 s on two cores
@pytest.mark.parametrize("family", ["qwen3", "gemma2", "gemma3", "mistral-sliding"])
def test_a_compiled_step_gives_the_eager_tokens_in_other_families(family):
    """q/k norms, soft-capping and sliding windows go through the compiled parts and polykv's eager ones alike."""
    model = tiny_model(family)
    ids, mask = padded_prompt([30, 22])
    plan = polykv.compile("layers 0: full; *: snapkv@16(window=4)", model)
    with plan.apply(model):
        runs = [
            static_generate(
                model,
                plan.make_cache(),
                ids,
                attention_mask=mask,
                max_new_tokens=10,
                graph=False,
                compile_step=compile_step,
            )
            for compile_step in (False, True)
        ]
    assert torch.equal(*runs)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
@pytest.mark.parametrize(
    ("spec", "slack"),
    [
        ("*: full", 0),
        ("*: snapkv@16(window=4) decode streaming@20", 0),
        ("*: knorm@12 decode streaming@20", 3),
        ("layers 1 heads 0: full; layers 1 heads 1: snapkv@8(window=4) decode streaming@20; *: knorm@12", 0),
    ],
)
@pytest.mark.parametrize("compile_step", [False, True])
def test_cuda_graph_replay_gives_the_tokens_of_the_eager_static_step(spec, slack, compile_step):
    """Steps that evict and steps that do not are different graphs; replaying them gives the eager tokens
    (compiled or not)."""
    model = tiny_model("llama", device="cuda")
    ids, mask = (t.cuda() for t in padded_prompt([30, 22]))
    plan = polykv.compile(spec, model)
    runs = {}
    with plan.apply(model):
        for graph in (False, True):
            cache = plan.make_cache()
            tokens = static_generate(
                model, cache, ids, attention_mask=mask, max_new_tokens=40, graph=graph, eviction_slack=slack,
                compile_step=compile_step,
            )  # fmt: skip
            runs[graph] = tokens, cache.layer_lengths()
    assert torch.equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]


@settings(max_examples=20, deadline=None)
@given(
    logits=st.lists(st.floats(-4, 4), min_size=2, max_size=6),
    temperature=st.sampled_from([0.5, 1.0, 2.0]),
)
def test_sampling_draws_tokens_as_often_as_their_probability(logits, temperature):
    torch.manual_seed(0)
    row = torch.tensor(logits)
    drawn = Sampling(temperature=temperature).choose(row.expand(20000, -1))
    frequency = torch.bincount(drawn, minlength=len(logits)) / 20000
    assert torch.allclose(frequency, (row / temperature).softmax(-1), atol=0.02)


def test_top_k_and_top_p_never_draw_outside_their_set():
    torch.manual_seed(1)
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0]).expand(5000, -1)  # probabilities 0.64, 0.24, 0.09, 0.03
    assert set(Sampling(top_k=2).choose(logits).tolist()) == {0, 1}
    assert set(Sampling(top_p=0.7).choose(logits).tolist()) == {0, 1}  # 0.64 < 0.7 <= 0.64 + 0.24
    assert set(Sampling(top_p=0.5).choose(logits).tolist()) == {0}
    with pytest.raises(ValueError):
        Sampling(temperature=0.0)


def test_static_generate_samples_reproducibly_and_top_k_1_is_greedy():
    model = tiny_model("llama")
    ids, mask = padded_prompt([20, 14])
    plan = polykv.compile("*: snapkv@12(window=4) decode streaming@16", model)
    with plan.apply(model):

        def generate(sampling, seed=0):
            torch.manual_seed(seed)
            return static_generate(
                model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=12, graph=False, sampling=sampling
            )

        greedy = generate(None)
        assert torch.equal(generate(Sampling(top_k=1)), greedy)
        sampled = generate(Sampling(temperature=1.5))
        assert torch.equal(generate(Sampling(temperature=1.5)), sampled)
        assert not torch.equal(sampled, greedy)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_sampling_inside_a_cuda_graph_is_reproducible():
    model = tiny_model("llama", device="cuda")
    ids, mask = (t.cuda() for t in padded_prompt([30, 22]))
    plan = polykv.compile("*: snapkv@16(window=4) decode streaming@20", model)
    runs = []
    with plan.apply(model):
        for _ in range(2):
            torch.manual_seed(5)
            runs.append(
                static_generate(
                    model, plan.make_cache(), ids, attention_mask=mask, max_new_tokens=30, sampling=Sampling(top_p=0.9)
                )
            )
    assert torch.equal(runs[0], runs[1])
    assert ((runs[0] >= 0) & (runs[0] < model.config.vocab_size)).all()


@settings(max_examples=50, deadline=None)
@given(
    ranks=st.lists(st.integers(0, 3), min_size=2, max_size=12),
    seed=st.integers(0, 1000),
    count=st.integers(1, 3),
)
def test_the_freed_slots_are_the_lowest_ranked_and_of_equal_ranks_the_newest(ranks, seed, count):
    from polykv.cache.static import _lowest_ranked

    count = min(count, len(ranks))
    ranked = torch.tensor(ranks, dtype=torch.float32)[None, None]
    positions = torch.randperm(len(ranks), generator=torch.Generator().manual_seed(seed))[None, None]
    freed = _lowest_ranked(ranked, positions.to(torch.int32), count)[0, 0].tolist()
    # By rank, then newest first: what ScoringPolicy.select would drop.
    expected = sorted(range(len(ranks)), key=lambda slot: (ranks[slot], -int(positions[0, 0, slot])))[:count]
    assert sorted(freed) == sorted(expected)


@pytest.mark.parametrize("spec", ["*: full", "layers 0: full; *: snapkv@16(window=4)"])
def test_a_step_of_several_tokens_with_holes_is_attention_without_them(spec):
    """A speculative check's step: three tokens in one static step, the second brought as a hole and the third
    refused afterwards. The logits of the step's real tokens, and of an ordinary step after end_static, equal
    those of a cache that never saw the holes."""
    model = tiny_model("llama", dtype=torch.float64)
    ids, mask = padded_prompt([20, 14])
    plan = polykv.compile(spec, model)
    a, hole, c, d = (torch.tensor([[t], [t + 1]]) for t in (11, 23, 35, 47))
    real_count = mask.sum(dim=-1, keepdim=True)

    def forward(cache, tokens, positions, attention_mask=None):
        output = model(tokens, position_ids=positions, attention_mask=attention_mask, **cache_argument(model, cache))
        return output.logits

    with plan.apply(model):
        expected_cache = plan.make_cache()
        forward(expected_cache, ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
        grown = torch.cat([mask, torch.ones_like(a)], dim=1)
        forward(expected_cache, a, real_count, grown)
        grown = torch.cat([grown, torch.ones_like(a)], dim=1)
        expected_c = forward(expected_cache, c, real_count + 1, grown)
        grown = torch.cat([grown, torch.ones_like(a)], dim=1)
        expected_d = forward(expected_cache, d, real_count + 2, grown)

        cache = plan.make_cache()
        forward(cache, ids, (mask.cumsum(-1) - 1).clamp(min=0), mask)
        forward(cache, a, real_count, torch.cat([mask, torch.ones_like(a)], dim=1))
        cache.begin_static(room=4, holes=True)
        cache.static_incoming(torch.tensor([[True, False, True]]).expand(2, 3))
        positions = real_count + torch.tensor([[1, 1, 2]])  # the hole's own position is never read
        logits = forward(cache, torch.cat([c, hole, d], dim=1), positions)
        cache.static_stepped(3)
        cache.static_incoming(None)
        cache.static_refuse(torch.tensor([[False, False, True]]).expand(2, 3))  # d is refused after all
        torch.testing.assert_close(logits[:, 0], expected_c[:, 0])
        torch.testing.assert_close(logits[:, 2], expected_d[:, 0])
        cache.end_static(3)
        holes = torch.cat([mask, torch.tensor([[1, 1, 0, 0]]).expand(2, 4)], dim=1)  # a, c, the hole, d refused
        again = forward(cache, d, real_count + 2, torch.cat([holes, torch.ones_like(a)], dim=1))
    torch.testing.assert_close(again, expected_d)
    assert cache.layer_lengths()[0] == ids.shape[1] + 5  # layer 0 is whole: holes stay held, as padding does


def test_a_layer_that_evicts_while_decoding_takes_holes_only_in_checks():
    """Holes in a bounded layer come with speculative checks, whose size its evictions are planned for."""
    model = tiny_model("llama")
    plan = polykv.compile("*: full decode streaming@24(sink=2)", model)
    ids, mask = padded_prompt([30])
    with plan.apply(model):
        cache = plan.make_cache()
        model(ids, attention_mask=mask, **cache_argument(model, cache))
        model(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], dim=1), **cache_argument(model, cache))
        with pytest.raises(CacheError, match=r"evicts while decoding: it takes holes only in checks"):
            cache.begin_static(room=4, holes=True)

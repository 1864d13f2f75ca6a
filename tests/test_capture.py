"""A captured prefill builds the same caches as prefilling with each plan, without prefilling again."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama
from test_families import build

import polykv
from polykv import cache_argument
from polykv.harness.capture import capture

SPECS = [
    "layers 0: full; 1: snapkv@12(window=4); 2: h2o@10; *: tova@9",
    "layers *: knorm@25% decode streaming@30",
    "layers 0-1: pyramidkv@16; *: streaming@12(sink=2)",
    "layers *: random@7(seed=3)",
]


@pytest.mark.parametrize("spec", SPECS)
def test_a_cache_from_a_capture_equals_the_plans_own(spec):
    model = tiny_llama("sdpa")
    plan = polykv.compile(spec, model)
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    captured = capture(model, ids, mask, needs=plan.needs())
    ours = captured.cache_for(plan)
    theirs = plan.make_cache()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as generate (and capture) count padded rows
    with torch.no_grad():
        reference = model(ids, attention_mask=mask, position_ids=positions, **cache_argument(model, theirs)).logits[
            :, -1
        ]
    torch.testing.assert_close(captured.logits, reference, rtol=1e-5, atol=1e-6)
    assert ours.layer_lengths() == theirs.layer_lengths()
    for a, b in zip(ours.layers, theirs.layers):
        assert (a.positions is None) == (b.positions is None)
        if a.positions is not None:
            assert torch.equal(a.positions, b.positions)
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    # And they go on alike: decoding from either gives the same tokens.
    step = torch.randint(3, 128, (2, 1), generator=torch.Generator().manual_seed(3))
    full_mask = torch.cat([mask, torch.ones_like(step)], 1)
    step_positions = mask.sum(-1, keepdim=True)
    with torch.no_grad():
        for cache in (ours, theirs):
            cache.logits = model(
                step, attention_mask=full_mask, position_ids=step_positions, **cache_argument(model, cache)
            ).logits
    torch.testing.assert_close(ours.logits, theirs.logits, rtol=1e-5, atol=1e-6)


def test_one_capture_serves_many_caches_and_is_left_untouched():
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers *: knorm@8", model)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(4))
    captured = capture(model, ids, needs=plan.needs())
    before = [layer.keys.clone() for layer in captured.layers]
    continuation = torch.randint(3, 128, (1, 5), generator=torch.Generator().manual_seed(6))
    for _ in range(2):
        cache = captured.cache_for(plan)
        with torch.no_grad():
            model(continuation, **cache_argument(model, cache))  # teacher-forced, as calibration and evaluation do
        assert cache.layer_lengths() == [8 + 5] * 4 and cache.get_seq_length() == 35
    whole = captured.cache()
    assert whole.layer_lengths() == [30] * 4
    for layer, keys in zip(captured.layers, before):
        assert torch.equal(layer.keys, keys)


def test_a_capture_of_a_sliding_window_model_keeps_the_windows():
    model = build("gemma2")
    plan = polykv.compile("layers *: snapkv@5(window=2)", model)
    ids = torch.randint(3, 128, (1, 30), generator=torch.Generator().manual_seed(5))
    captured = capture(model, ids, needs=plan.needs())
    assert captured.cache_for(plan).layer_lengths() == plan_lengths(model, plan, ids)


def plan_lengths(model, plan, ids) -> list[int]:
    cache = plan.make_cache()
    with torch.no_grad():
        model(ids, **cache_argument(model, cache))
    return cache.layer_lengths()


def test_caches_sharing_the_spare_room_compute_the_same_and_only_one_at_a_time():
    model = tiny_llama("sdpa")
    plan = polykv.compile("layers 0: snapkv@10(window=4); *: full", model)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(7))
    continuation = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(8))
    captured = capture(model, ids, needs=plan.needs(), room=6)
    with torch.no_grad():
        copied = model(continuation, **cache_argument(model, captured.cache_for(plan))).logits
        first = captured.cache(share_room=True)
        shared = model(continuation, **cache_argument(model, first)).logits
        whole = model(continuation, **cache_argument(model, captured.cache())).logits
        torch.testing.assert_close(shared, whole, rtol=0, atol=0)
        assert not torch.equal(copied, whole)  # layer 0 compressed changes the output
        second = captured.cache(share_room=True)
        model(continuation, **cache_argument(model, second))
        with pytest.raises(polykv.CacheError, match="shares its capture's spare room with a newer cache"):
            model(continuation[:, :1], **cache_argument(model, first))
    assert captured.layers[1].storage.capacity == 36 and captured.layers[1].storage.size == 30

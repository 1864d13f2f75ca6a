"""The built-in policies' selection rules, the checks of `choose`, and the attention inputs.

Views are built by hand. Shapes: B batch rows, H KV heads, G query heads per KV head, W window
queries, L tokens, D head dimension. Padding is on the left, as the cache sees it at prefill, and
``positions`` are slot indices (padding included), as the cache gives them before any eviction.
"""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import polykv
import polykv.cache.inputs as inputs
from polykv import LayerView, Needs, Phase, Policy, cache_argument
from polykv.cache import selection
from polykv.cache.checks import raise_for
from polykv.policy import first_tokens, most_recent

REGISTRY = polykv.default_registry()
BUDGETED = sorted(entry.name for entry in REGISTRY.policies if entry.cls.budgeted)
DEVICES = ["cpu", "meta", pytest.param("cuda", marks=pytest.mark.gpu)]


def mask_for(pads, heads: int, length: int, device="cpu") -> torch.Tensor:
    """(B, H, L) token mask with ``pads[b]`` padding tokens on the left of row b."""
    pads = torch.as_tensor(pads, device=device)
    row = torch.arange(length, device=device)[None, :] >= pads[:, None]
    return row[:, None, :].expand(len(pads), heads, length).contiguous()


def view(
    *,
    length: int,
    budget: int,
    batch: int = 1,
    heads: int = 1,
    dim: int = 4,
    pads=None,
    keys=None,
    layer: int = 0,
    device="cpu",
    **extra,
) -> LayerView:
    pads = [0] * batch if pads is None else pads
    if keys is None:
        keys = torch.randn(batch, heads, length, dim, generator=torch.Generator().manual_seed(1)).to(device)
    return LayerView(
        layer=layer,
        phase=Phase.PREFILL,
        budget=budget,
        keys=keys,
        values=torch.zeros_like(keys),
        token_mask=mask_for(pads, heads, length, device=keys.device),
        positions=torch.arange(length, device=keys.device).expand(batch, heads, length),
        **extra,
    )


def choose(policy: Policy, layer_view: LayerView) -> torch.Tensor:
    """What the cache keeps: the policy's checked choice, its problems raised as the cache raises them."""
    where = f"policy {policy!r} on layer {layer_view.layer} ({layer_view.phase.value})"
    chosen = selection.choose(policy, layer_view, where=where)
    raise_for(chosen.problems, where)
    return chosen.indices


def kept(policy: Policy, layer_view: LayerView) -> list:
    """What ``choose`` keeps, as nested Python lists (B, H, budget)."""
    return choose(policy, layer_view).tolist()


def accumulated(queries, keys, mask, scaling):
    """Accumulated attention at prefill: query i at position i, padding queries counting for nothing."""
    batch, heads, length, _ = keys.shape
    positions = torch.arange(length)
    return inputs.accumulated_attention(
        queries, positions, mask[:, 0], keys, positions.expand(batch, heads, length), mask, scaling
    )


def create(name: str, **values) -> Policy:
    return REGISTRY.policies.create(name, values)


# --- streaming -----------------------------------------------------------------------------------


def test_streaming_keeps_sinks_and_recent_tokens():
    streaming = create("streaming", sink=4)
    layer_view = view(length=30, budget=10, batch=2, heads=2)
    expected = [0, 1, 2, 3, *range(24, 30)]
    assert kept(streaming, layer_view) == [[expected] * 2] * 2
    assert sorted(streaming.select(layer_view)[0, 0].tolist()) == expected


def test_streaming_sinks_are_the_first_real_tokens():
    streaming = create("streaming", sink=4)
    layer_view = view(length=30, budget=10, batch=2, heads=2, pads=[0, 5])
    result = kept(streaming, layer_view)
    assert result[0] == [[0, 1, 2, 3, *range(24, 30)]] * 2
    assert result[1] == [[5, 6, 7, 8, *range(24, 30)]] * 2


def test_streaming_without_sinks_is_a_recent_window():
    assert kept(create("streaming", sink=0), view(length=12, budget=3, pads=[2])) == [[[9, 10, 11]]]
    assert create("streaming", sink=6).min_budget() == 7


@given(sink=st.integers(0, 6), data=st.data())
def test_streaming_property(sink, data):
    streaming = create("streaming", sink=sink)
    length = data.draw(st.integers(streaming.min_budget() + 1, 40))
    budget = data.draw(st.integers(streaming.min_budget(), length - 1))
    pad = data.draw(st.integers(0, length))
    real = list(range(pad, length))
    result = kept(streaming, view(length=length, budget=budget, pads=[pad]))[0][0]
    if len(real) <= budget:
        assert set(real) <= set(result)
    else:
        sinks = real[:sink]
        recent = real[len(real) - (budget - len(sinks)) :]
        assert result == sinks + recent


# --- snapkv and pyramidkv ---------------------------------------------------------------------------


def snap_view(attention: torch.Tensor, budget: int, pads=None) -> LayerView:
    """A view whose window attention is ``attention`` (B, H, G, W, L)."""
    batch, heads, _groups, _window, length = attention.shape
    return view(length=length, budget=budget, batch=batch, heads=heads, pads=pads, window_attention=attention)


def test_snapkv_keeps_the_window_even_without_attention():
    snapkv = create("snapkv", window=4, kernel=1)
    attention = torch.zeros(1, 1, 1, 4, 16)
    attention[..., :12] = torch.rand(1, 1, 1, 4, 12) + 0.1  # the window itself gets no attention at all
    result = kept(snapkv, snap_view(attention, budget=4))
    assert result == [[[12, 13, 14, 15]]]


def test_snapkv_keeps_the_prefix_token_with_the_most_window_attention():
    snapkv = create("snapkv", window=4, kernel=1)
    attention = torch.full((1, 1, 1, 4, 16), 0.01)
    attention[..., 6] = torch.tensor([0.1, 0.1, 0.1, 0.1])  # summed over the window: 0.40
    attention[..., 2] = torch.tensor([0.0, 0.1, 0.1, 0.15])  # 0.35, and the most from the last query
    attention[..., 9] = torch.tensor([0.30, 0.0, 0.0, 0.0])  # the largest single weight, but 0.30 in total
    assert kept(snapkv, snap_view(attention, budget=5)) == [[[6, 12, 13, 14, 15]]]
    assert kept(snapkv, snap_view(attention, budget=6)) == [[[2, 6, 12, 13, 14, 15]]]
    assert kept(snapkv, snap_view(attention, budget=7)) == [[[2, 6, 9, 12, 13, 14, 15]]]


def test_snapkv_window_counts_real_tokens_only():
    snapkv = create("snapkv", window=3, kernel=1)
    attention = torch.zeros(2, 1, 1, 3, 12)
    attention[..., 1] = 1.0  # padding in row 1: must never be kept there
    attention[..., 5] = 0.5
    result = kept(snapkv, snap_view(attention, budget=4, pads=[0, 3]))
    assert result == [[[1, 9, 10, 11]], [[5, 9, 10, 11]]]


def spike_and_plateau() -> torch.Tensor:
    """Window attention (1, 1, 1, 2, 24): a spike of 1 at token 5, a plateau of 0.5 over tokens 13-17."""
    attention = torch.zeros(1, 1, 1, 2, 24)
    attention[..., 0, 5] = 1.0
    attention[..., 1, 13:18] = 0.5
    attention[..., 22:] = 3.0  # the window: masked out before pooling, so it spreads nowhere
    return attention


def test_snapkv_max_pooling_spreads_a_spike_to_its_neighbours():
    attention = spike_and_plateau()
    scores = create("snapkv", window=2, kernel=5, pooling="max").score(snap_view(attention, budget=7))[0, 0]
    assert scores[3:8].tolist() == [1.0] * 5  # kernel // 2 = 2 neighbours on each side
    assert scores[2].item() == 0.0
    assert scores[8].item() == 0.0
    assert scores[11:20].tolist() == [0.5] * 9
    assert scores[20:22].tolist() == [0.0, 0.0]  # the window's own attention was not pooled in
    assert scores[22:].tolist() == [math.inf, math.inf]


def test_snapkv_avg_pooling_averages_over_the_kernel():
    attention = spike_and_plateau()
    scores = create("snapkv", window=2, kernel=5, pooling="avg").score(snap_view(attention, budget=7))[0, 0]
    expected = torch.zeros(24)
    expected[3:8] = 0.2
    expected[11:20] = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.4, 0.3, 0.2, 0.1])
    expected[22:] = math.inf
    assert torch.allclose(scores, expected)


def test_snapkv_max_and_avg_pooling_keep_different_tokens():
    attention = spike_and_plateau()
    window = [22, 23]
    by_max = kept(create("snapkv", window=2, kernel=5, pooling="max"), snap_view(attention, budget=7))
    by_avg = kept(create("snapkv", window=2, kernel=5, pooling="avg"), snap_view(attention, budget=7))
    assert by_max == [[[3, 4, 5, 6, 7, *window]]]  # the spike and its neighbours
    assert by_avg == [[[13, 14, 15, 16, 17, *window]]]  # the plateau
    no_pooling = kept(create("snapkv", window=2, kernel=1), snap_view(attention, budget=3))
    assert no_pooling == [[[5, *window]]]


def test_snapkv_averages_scores_over_the_query_group():
    # Query head 0 alone prefers token 2; the group mean prefers token 5 (0.433 against 0.3).
    attention = torch.zeros(1, 1, 3, 1, 8)
    attention[0, 0, 0, 0, 2], attention[0, 0, 0, 0, 5] = 0.9, 0.1
    attention[0, 0, 1, 0, 5] = 0.6
    attention[0, 0, 2, 0, 5] = 0.6
    snapkv = create("snapkv", window=1, kernel=1)
    layer_view = snap_view(attention, budget=2)
    assert kept(snapkv, layer_view) == [[[5, 7]]]
    assert kept(snapkv, snap_view(attention[:, :, :1], budget=2)) == [[[2, 7]]]
    scores = snapkv.score(layer_view)[0, 0]
    assert scores[2].item() == pytest.approx(0.3)
    assert scores[5].item() == pytest.approx(1.3 / 3)


def pooled_reference(raw: list[float], kernel: int, pooling: str) -> list[float]:
    """Pooling along the sequence as a loop: the window [j - kernel//2, j - kernel//2 + kernel)."""
    length = len(raw)
    out = []
    for j in range(length):
        start = j - kernel // 2
        inside = [raw[i] for i in range(start, start + kernel) if 0 <= i < length]
        out.append(max(inside) if pooling == "max" else sum(inside) / kernel)
    return out


@given(
    batch=st.integers(1, 2),
    heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    length=st.integers(4, 24),
    kernel=st.integers(1, 7),
    pooling=st.sampled_from(["max", "avg"]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_snapkv_property(batch, heads, groups, length, kernel, pooling, seed, data):
    window = data.draw(st.integers(1, length - 1))
    budget = data.draw(st.integers(window, length - 1))
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    mask = mask_for(pads, heads, length)
    attention = torch.rand(batch, heads, groups, window, length, generator=torch.Generator().manual_seed(seed))
    attention = attention.masked_fill(~mask[:, :, None, None, :], 0.0)
    snapkv = create("snapkv", window=window, kernel=kernel, pooling=pooling)
    result = kept(snapkv, snap_view(attention, budget=budget, pads=pads))
    for b in range(batch):
        real = list(range(pads[b], length))
        for h in range(heads):
            chosen = set(result[b][h])
            if len(real) <= budget:
                assert set(real) <= chosen
                continue
            recent = set(real[-window:])
            raw = [
                0.0 if j in recent else sum(attention[b, h, g, :, j].sum().item() for g in range(groups)) / groups
                for j in range(length)
            ]
            pooled = pooled_reference(raw, kernel, pooling)
            assert recent <= chosen
            assert chosen <= set(real)
            others = [j for j in real if j not in recent]
            worst_kept = min((pooled[j] for j in others if j in chosen), default=math.inf)
            best_dropped = max((pooled[j] for j in others if j not in chosen), default=-math.inf)
            assert worst_kept >= best_dropped - 1e-5


def test_snapkv_ties_after_max_pooling_go_to_the_earlier_token():
    attention = spike_and_plateau()
    snapkv = create("snapkv", window=2, kernel=5, pooling="max")
    assert kept(snapkv, snap_view(attention, budget=3)) == [[[3, 22, 23]]]
    assert kept(snapkv, snap_view(attention, budget=9)) == [[[3, 4, 5, 6, 7, 11, 12, 22, 23]]]


@pytest.mark.parametrize("name", ["snapkv", "streaming", "knorm", "tova", "h2o"])
@settings(max_examples=50)
@given(seed=st.integers(0, 2**16), pad=st.integers(1, 6), ties=st.booleans(), data=st.data())
def test_left_padding_does_not_change_what_a_row_keeps(name, seed, pad, ties, data):
    """A padded row keeps the same real tokens as the same row alone, shifted by its padding."""
    policy = create(name, window=4) if name == "snapkv" else create(name)
    length = data.draw(st.integers(policy.min_budget() + 2, policy.min_budget() + 16))
    budget = data.draw(st.integers(policy.min_budget(), length - 1))
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(1, 2, length, 4, generator=generator)
    attention = torch.softmax(torch.randn(1, 2, 2, 4, length, generator=generator), dim=-1)
    accumulated = torch.rand(1, 2, 2, length, generator=generator)
    if ties:  # coarse values: many equal scores, so the order of ties decides
        keys, attention, accumulated = keys.round(), (attention * 4).round() / 4, (accumulated * 2).round()

    def padded(tensor, dim):
        shape = list(tensor.shape)
        shape[dim] = pad
        return torch.cat([torch.zeros(shape), tensor], dim=dim)

    def inputs_of(k, a, acc):
        window = policy.needs().window
        return {
            "keys": k,
            "window_attention": a[..., -window:, :] if window else None,
            "accumulated_attention": acc if policy.needs().accumulated_attention else None,
        }

    alone = view(length=length, budget=budget, heads=2, **inputs_of(keys, attention, accumulated))
    shifted = view(
        length=length + pad,
        budget=budget,
        heads=2,
        pads=[pad],
        **inputs_of(padded(keys, 2), padded(attention, 4), padded(accumulated, 3)),
    )
    assert torch.equal(choose(policy, shifted), choose(policy, alone) + pad)


def test_pyramidkv_is_snapkv_with_its_own_defaults():
    pyramidkv = create("pyramidkv")
    assert dict(pyramidkv.values) == {"window": 8, "kernel": 7, "pooling": "max"}
    assert pyramidkv.needs() == Needs(window=8, window_attention=True)
    assert pyramidkv.min_budget() == 8
    assert create("snapkv").values["window"] == 32
    generator = torch.Generator().manual_seed(3)
    attention = torch.rand(2, 2, 3, 8, 40, generator=generator) ** 4
    snapkv = create("snapkv", window=8, kernel=7, pooling="max")
    for budget in (8, 12, 20):
        layer_view = snap_view(attention, budget=budget, pads=[0, 6])
        assert torch.equal(pyramidkv.score(layer_view), snapkv.score(layer_view))
        assert kept(pyramidkv, layer_view) == kept(snapkv, layer_view)
    # Its parameters are SnapKV's: avg pooling gives SnapKV's avg-pooled scores.
    layer_view = snap_view(attention, budget=12)
    assert torch.equal(
        create("pyramidkv", window=4, pooling="avg").score(layer_view),
        create("snapkv", window=4, pooling="avg").score(layer_view),
    )


# --- h2o ---------------------------------------------------------------------------------------------


def h2o_view(base: torch.Tensor, budget: int, groups: int = 2, pads=None) -> LayerView:
    """Accumulated attention (1, 1, G, L) whose group mean is ``base`` but whose query heads disagree."""
    length = base.shape[-1]
    spread = torch.linspace(-1.0, 1.0, length).roll(length // 3) * 10
    accumulated = torch.stack([base + spread, base - spread])[None, None]
    assert torch.allclose(accumulated.mean(dim=2)[0, 0], base, atol=1e-5)
    return view(length=length, budget=budget, pads=pads, accumulated_attention=accumulated)


def test_h2o_keeps_recent_tokens_and_heavy_hitters():
    base = torch.randperm(30, generator=torch.Generator().manual_seed(0)).float() + 1.0
    base[25:] = 0.0  # the most recent tokens received the least attention
    layer_view = h2o_view(base, budget=10)
    heavy = sorted(base[:25].topk(5).indices.tolist())
    assert kept(create("h2o"), layer_view) == [[[*heavy, 25, 26, 27, 28, 29]]]
    assert create("h2o").values["recent"] == 0.5


def test_h2o_without_recent_share_keeps_by_score_alone():
    base = torch.randperm(30, generator=torch.Generator().manual_seed(0)).float() + 1.0
    base[25:] = 0.0
    result = kept(create("h2o", recent=0), h2o_view(base, budget=10))
    assert result == [[sorted(base.topk(10).indices.tolist())]]
    assert not set(result[0][0]) & {25, 26, 27, 28, 29}


def test_h2o_all_recent_is_a_recent_window():
    base = torch.arange(30, 0, -1).float()  # attention favours the oldest tokens
    assert kept(create("h2o", recent=1.0), h2o_view(base, budget=10)) == [[list(range(20, 30))]]


def test_h2o_needs_accumulated_attention():
    assert create("h2o").needs() == Needs(accumulated_attention=True)


@given(
    length=st.integers(3, 30),
    recent=st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0]),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_h2o_property(length, recent, seed, data):
    budget = data.draw(st.integers(1, length - 1))
    pad = data.draw(st.integers(0, length))
    base = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    layer_view = h2o_view(base, budget=budget, pads=[pad])
    chosen = set(kept(create("h2o", recent=recent), layer_view)[0][0])
    real = list(range(pad, length))
    if len(real) <= budget:
        assert set(real) <= chosen
        return
    protected = real[len(real) - round(recent * budget) :] if round(recent * budget) else []
    assert set(protected) <= chosen <= set(real)
    scores = layer_view.accumulated_attention.mean(dim=2)[0, 0]
    others = [j for j in real if j not in protected]
    worst_kept = min((scores[j].item() for j in others if j in chosen), default=math.inf)
    best_dropped = max((scores[j].item() for j in others if j not in chosen), default=-math.inf)
    assert worst_kept >= best_dropped


# --- tova ----------------------------------------------------------------------------------------------


def tova_attention() -> torch.Tensor:
    """Last-query attention (1, H=2, G=2, 1, 8): KV head 0 prefers tokens 1 and 2, head 1 tokens 6 and 7."""
    head0 = torch.tensor([0.0, 0.5, 0.3, 0.0, 0.0, 0.0, 0.1, 0.1])
    head1 = torch.tensor([0.0, 0.1, 0.1, 0.0, 0.0, 0.0, 0.6, 0.2])
    twist = torch.tensor([0.0, 0.2, -0.2, 0.0, 0.0, 0.0, 0.0, 0.0])  # query heads differ, groups average out
    groups = torch.stack([torch.stack([head0 + twist, head0 - twist]), torch.stack([head1, head1])])
    return groups[None, :, :, None, :]


def test_observed_divides_accumulated_attention_by_the_queries_that_saw_each_token():
    """A late token with a little attention outranks an early one that was seen by many queries."""
    length = 10
    base = torch.ones(length)
    base[0], base[8] = 5.0, 0.9  # token 0: 5 over 10 queries (0.5 each); token 8: 0.9 over 2 (0.45 each)
    scores = create("observed").score(h2o_view(base, budget=3))
    per_query = base / torch.arange(length, 0, -1)
    assert torch.allclose(scores[0, 0], per_query)
    assert kept(create("observed"), h2o_view(base, budget=3)) == [[sorted(per_query.topk(3).indices.tolist())]]
    assert create("h2o", recent=0).score(h2o_view(base, budget=3)).argmax() == 0  # the sum favours the early token


def test_observed_counts_the_real_queries_of_a_padded_row():
    base = torch.ones(8)
    scores = create("observed").score(h2o_view(base, budget=3, pads=[3]))
    assert torch.allclose(scores[0, 0, 3:], 1 / torch.arange(5, 0, -1).float())


def test_expected_attention_keeps_the_keys_recent_queries_point_at():
    length, dim = 24, 8
    keys = torch.randn(1, 1, length, dim, generator=torch.Generator().manual_seed(3))
    direction = keys[0, 0, 15] / keys[0, 0, 15].norm()
    queries = direction * 6 + 0.1 * torch.randn(1, 1, 2, 4, dim, generator=torch.Generator().manual_seed(4))
    layer_view = view(length=length, budget=6, keys=keys, dim=dim, queries=queries)
    layer_view = attrs.evolve(layer_view, values=torch.ones_like(keys))
    chosen = kept(create("expected", window=4, sink=2), layer_view)[0][0]
    assert {0, 1, 15} <= set(chosen)  # the sinks, and the key the queries point at
    assert create("expected").needs() == Needs(window=64)


def test_tova_default_keeps_the_same_tokens_on_every_kv_head():
    attention = tova_attention()
    layer_view = view(length=8, budget=2, heads=2, window_attention=attention)
    # Mean over all heads: token 1 0.3, token 2 0.2, token 6 0.35, token 7 0.15.
    assert kept(create("tova"), layer_view) == [[[1, 6], [1, 6]]]


def test_tova_per_head_lets_kv_heads_differ():
    attention = tova_attention()
    layer_view = view(length=8, budget=2, heads=2, window_attention=attention)
    assert kept(create("tova", per_head=True), layer_view) == [[[1, 2], [6, 7]]]


def test_tova_uses_the_last_query():
    assert create("tova").needs() == Needs(window=1, window_attention=True)


@given(heads=st.integers(2, 4), groups=st.integers(1, 3), length=st.integers(3, 20), seed=st.integers(0, 2**16))
def test_tova_default_heads_always_agree(heads, groups, length, seed):
    generator = torch.Generator().manual_seed(seed)
    attention = torch.softmax(torch.randn(1, heads, groups, 1, length, generator=generator) * 3, dim=-1)
    layer_view = view(length=length, budget=length // 2 + 1, heads=heads, window_attention=attention)
    result = choose(create("tova"), layer_view)[0]
    assert (result == result[:1]).all()
    mean = attention[0, :, :, 0].mean(dim=(0, 1))
    assert result[0].tolist() == sorted(mean.topk(length // 2 + 1).indices.tolist())


# --- knorm, random, full --------------------------------------------------------------------------------


@given(length=st.integers(2, 24), dim=st.integers(1, 8), seed=st.integers(0, 2**16), data=st.data())
def test_knorm_keeps_the_lowest_norm_keys(length, dim, seed, data):
    budget = data.draw(st.integers(1, length - 1))
    generator = torch.Generator().manual_seed(seed)
    norms = torch.randperm(length, generator=generator).float() + 1.0
    directions = torch.nn.functional.normalize(torch.randn(1, 1, length, dim, generator=generator), dim=-1)
    keys = directions * norms[:, None]
    result = kept(create("knorm"), view(length=length, budget=budget, keys=keys))
    assert result == [[sorted(norms.argsort()[:budget].tolist())]]


def test_random_is_seeded_by_seed_and_layer():
    def pick(seed, layer):
        return choose(create("random", seed=seed), view(length=64, budget=16, batch=2, heads=2, layer=layer))

    assert torch.equal(pick(0, 3), pick(0, 3))
    assert not torch.equal(pick(0, 3), pick(0, 4))
    assert not torch.equal(pick(0, 3), pick(1, 3))
    assert not torch.equal(pick(0, 3)[0, 0], pick(0, 3)[0, 1])  # heads draw separately
    assert torch.equal(pick(0, 3)[0], pick(0, 3)[1])  # rows share a draw: a row keeps what it keeps alone


@pytest.mark.parametrize("device", DEVICES)
def test_random_result_is_on_the_keys_device(device):
    keys = torch.zeros(1, 2, 12, 4, device=device)
    layer_view = view(length=12, budget=5, heads=2, keys=keys)
    policy = create("random", seed=7)
    assert policy.score(layer_view).device == keys.device
    assert policy.select(layer_view).device == keys.device
    if device != "meta":
        cpu = view(length=12, budget=5, heads=2, keys=keys.cpu())
        assert torch.equal(policy.select(layer_view).cpu(), policy.select(cpu))


def test_full_keeps_everything():
    full = create("full")
    assert not full.budgeted
    result = full.select(view(length=9, budget=3, batch=2, heads=3, pads=[0, 4]))
    assert result.shape == (2, 3, 9)
    assert result.dtype == torch.long
    assert (result == torch.arange(9)).all()


# --- every budgeted built-in under `choose` ---------------------------------------------------------------


def value_strategy(param: polykv.Param):
    if param.type is bool:
        drawn = st.booleans()
    elif param.choices:
        drawn = st.sampled_from(param.choices)
    elif param.type is int:
        low = int(param.min) if param.min is not None else 0
        high = int(param.max) if param.max is not None else low + 6
        drawn = st.integers(low, min(high, low + 6))
    elif param.type is float:
        low = param.min if param.min is not None else -2.0
        high = param.max if param.max is not None else low + 2.0
        drawn = st.floats(low, high)
    else:
        drawn = st.text(max_size=3)
    return st.one_of(st.just(param.default), drawn)


def random_view(policy: Policy, data, seed: int) -> LayerView:
    """Random keys, values and whatever ``policy.needs()`` asks for, with random left padding."""
    draw = data.draw
    batch, heads, groups, dim = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 3)), 4
    length = draw(st.integers(policy.min_budget() + 1, policy.min_budget() + 24))
    budget = draw(st.integers(policy.min_budget(), length - 1))
    pads = draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    generator = torch.Generator().manual_seed(seed)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    mask = mask_for(pads, heads, length)
    positions = torch.arange(length).expand(batch, heads, length)
    scaling = dim**-0.5
    needs = policy.needs()
    extra = {}
    if needs.window:
        queries = torch.randn(batch, heads, groups, needs.window, dim, generator=generator)
        extra["queries"] = queries
        if needs.window_attention:
            query_positions = torch.arange(length - needs.window, length)
            extra["window_attention"] = inputs.window_attention(
                queries, query_positions, keys, positions, mask, scaling
            )
    if needs.accumulated_attention:
        all_queries = torch.randn(batch, heads, groups, length, dim, generator=generator)
        extra["accumulated_attention"] = accumulated(all_queries, keys, mask, scaling)
    if needs.reconstruction:  # any non-negative score per token; padding scores nothing
        scores = torch.rand(batch, heads, length, generator=generator)
        extra["reconstruction_attention"] = scores * mask
    return LayerView(
        layer=draw(st.integers(0, 40)),
        phase=Phase.PREFILL,
        budget=budget,
        keys=keys,
        values=torch.randn(batch, heads, length, dim, generator=generator),
        token_mask=mask,
        positions=positions,
        **extra,
    )


@pytest.mark.parametrize("name", BUDGETED)
@given(seed=st.integers(0, 2**32 - 1), data=st.data())
def test_every_policy_keeps_a_valid_selection(name, seed, data):
    parameters = REGISTRY.policies.get(name).cls.parameters
    values = {p.name: data.draw(value_strategy(p), label=p.name) for p in parameters}
    policy = create(name, **values)
    layer_view = random_view(policy, data, seed)
    batch, heads, length = layer_view.token_mask.shape
    budget = layer_view.budget
    result = choose(policy, layer_view)
    assert result.shape == (batch, heads, budget)
    assert result.dtype == torch.long
    assert (result[..., 1:] > result[..., :-1]).all()  # sorted and distinct
    assert result.min() >= 0
    assert result.max() < length
    for b in range(batch):
        for h in range(heads):
            real = set(torch.nonzero(layer_view.token_mask[b, h]).flatten().tolist())
            chosen = set(result[b, h].tolist())
            if len(real) <= budget:
                assert real <= chosen
            else:
                assert chosen <= real


def test_the_builtins_are_covered():
    expected = {"streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "random", "observed", "expected", "kvzip"}
    assert set(BUDGETED) == expected


# --- choose rejects what it cannot use ------------------------------------------------------------------


class _Bad(Policy):
    description = "A broken policy for the tests."

    def select(self, view):
        batch, heads, _ = view.token_mask.shape
        return self.indices(view).expand(batch, heads, -1)


class WrongShape(_Bad):
    name = "wrong_shape"

    def indices(self, view):
        return torch.arange(view.budget + 1)


class FloatIndices(_Bad):
    name = "float_indices"

    def indices(self, view):
        return torch.arange(view.budget).float()


class IntIndices(_Bad):
    name = "int_indices"

    def indices(self, view):
        return torch.arange(view.budget, dtype=torch.int32)


class PastTheEnd(_Bad):
    name = "past_the_end"

    def indices(self, view):
        return torch.arange(view.length - view.budget + 1, view.length + 1)


class Negative(_Bad):
    name = "negative"

    def indices(self, view):
        return torch.arange(-1, view.budget - 1)


class Twice(_Bad):
    name = "twice"

    def indices(self, view):
        return torch.tensor([view.length - 1] * 2 + list(range(view.length - view.budget, view.length - 2)))


class Oldest(_Bad):
    """Keeps the first slots: padding, with left padding."""

    name = "oldest"

    def indices(self, view):
        return torch.arange(view.budget)


class NotATensor(Policy):
    name = "not_a_tensor"
    description = "Returns a list."

    def select(self, view):
        return [[list(range(view.budget))]]


@pytest.mark.parametrize(
    ("policy", "problem"),
    [
        (WrongShape(), "select() returned (1, 2, 5), expected a tensor of shape (1, 2, 4)"),
        (NotATensor(), "select() returned list, expected a tensor of shape (1, 2, 4)"),
        (FloatIndices(), "select() returned torch.float32 indices, expected torch.long"),
        (IntIndices(), "select() returned torch.int32 indices, expected torch.long"),
        (PastTheEnd(), "select() returned indices outside the layer's tokens"),
        (Negative(), "select() returned indices outside the layer's tokens"),
        (Twice(), "select() returned the same token twice in a row and head"),
        (Oldest(), "select() kept padding although enough real tokens were there"),
    ],
    ids=lambda p: getattr(p, "name", None),
)
def test_choose_rejects_a_bad_selection(policy, problem):
    layer_view = view(length=12, budget=4, heads=2, pads=[3], layer=7)
    with pytest.raises(polykv.PolicyError) as raised:
        choose(policy, layer_view)
    assert str(raised.value) == f"policy {policy.name} on layer 7 (prefill): {problem}"


def test_choose_tolerates_padding_in_short_rows_and_keeps_their_tail():
    # Row 0 has 9 real tokens for a budget of 4, row 1 only 3: what Oldest says for row 1 is replaced.
    layer_view = view(length=12, budget=4, heads=2, batch=2, pads=[3, 9])
    with pytest.raises(polykv.PolicyError, match="kept padding"):
        choose(Oldest(), layer_view)
    layer_view = view(length=12, budget=4, heads=2, batch=2, pads=[0, 9])
    assert kept(Oldest(), layer_view) == [[[0, 1, 2, 3]] * 2, [[8, 9, 10, 11]] * 2]


def test_choose_sorts_the_policy_answer():
    class Backwards(_Bad):
        name = "backwards"

        def indices(self, view):
            return torch.arange(view.length - 1, view.length - 1 - view.budget, -1)

    assert kept(Backwards(), view(length=10, budget=3)) == [[[7, 8, 9]]]


# --- the attention inputs ---------------------------------------------------------------------------------


@given(
    batch=st.integers(1, 3),
    heads=st.integers(1, 2),
    groups=st.integers(1, 3),
    length=st.integers(1, 16),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_window_attention_is_a_softmax_over_visible_tokens(batch, heads, groups, length, seed, data):
    pads = data.draw(st.lists(st.integers(0, length), min_size=batch, max_size=batch))
    query_positions = data.draw(st.lists(st.integers(0, length - 1), min_size=1, max_size=4))
    generator = torch.Generator().manual_seed(seed)
    dim = 3
    queries = torch.randn(batch, heads, groups, len(query_positions), dim, generator=generator)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    mask = mask_for(pads, heads, length)
    positions = torch.arange(length).expand(batch, heads, length)
    weights = inputs.window_attention(queries, torch.tensor(query_positions), keys, positions, mask, 0.7)
    assert weights.shape == (batch, heads, groups, len(query_positions), length)
    assert weights.dtype == torch.float32
    for b in range(batch):
        for n, position in enumerate(query_positions):
            visible = [j for j in range(pads[b], length) if j <= position]
            hidden = [j for j in range(length) if j not in visible]
            row = weights[b, :, :, n]
            assert (row[..., hidden] == 0).all()
            if not visible:
                assert (row == 0).all()
                continue
            assert torch.allclose(row[..., visible].sum(-1), torch.ones(heads, groups))
            logits = torch.einsum("hgd,hld->hgl", queries[b, :, :, n], keys[b, :, visible]) * 0.7
            assert torch.allclose(row[..., visible], torch.softmax(logits, dim=-1), atol=1e-6)


def test_window_attention_of_a_query_before_every_real_token_is_zero():
    keys = torch.randn(1, 1, 6, 2)
    queries = torch.randn(1, 1, 1, 2, 2)
    mask = mask_for([4], 1, 6)
    weights = inputs.window_attention(queries, torch.tensor([2, 5]), keys, torch.arange(6).expand(1, 1, 6), mask, 1.0)
    assert (weights[..., 0, :] == 0).all()
    assert not torch.isnan(weights).any()
    assert weights[..., 1, :4].eq(0).all()
    assert weights[..., 1, :].sum().item() == pytest.approx(1.0)


def brute_force_accumulated(queries, keys, mask, scaling):
    batch, heads, groups, length, _ = queries.shape
    total = torch.zeros(batch, heads, groups, length)
    for b in range(batch):
        for h in range(heads):
            for g in range(groups):
                for i in range(length):
                    if not mask[b, h, i]:
                        continue  # a padding query adds nothing
                    seen = [j for j in range(i + 1) if mask[b, h, j]]
                    logits = torch.stack([queries[b, h, g, i] @ keys[b, h, j] for j in seen]) * scaling
                    total[b, h, g, seen] += torch.softmax(logits, dim=0)
    return total


@pytest.fixture
def accumulated_case():
    generator = torch.Generator().manual_seed(11)
    batch, heads, groups, length, dim = 3, 2, 2, 9, 4
    queries = torch.randn(batch, heads, groups, length, dim, generator=generator)
    keys = torch.randn(batch, heads, length, dim, generator=generator)
    mask = mask_for([0, 3, 9], heads, length)  # no padding, some, and a row that is all padding
    return queries, keys, mask, 0.5


def test_accumulated_attention_matches_a_loop_over_every_query(accumulated_case):
    queries, keys, mask, scaling = accumulated_case
    result = accumulated(queries, keys, mask, scaling)
    expected = brute_force_accumulated(queries, keys, mask, scaling)
    assert result.shape == expected.shape
    assert torch.allclose(result, expected, atol=1e-5)
    # Each real query spreads exactly one unit of attention; padding receives none.
    real = mask[:, 0].sum(-1).float()
    assert torch.allclose(result.sum(-1), real[:, None, None].expand(3, 2, 2))
    assert (result.masked_fill(mask[:, :, None, :], 0) == 0).all()


@pytest.mark.parametrize("elements", [1, 7, 3 * 2 * 2 * 9 * 4, 3 * 2 * 2 * 9 * 9])
def test_accumulated_attention_does_not_depend_on_the_chunk_size(accumulated_case, monkeypatch, elements):
    queries, keys, mask, scaling = accumulated_case
    whole = accumulated(queries, keys, mask, scaling)
    monkeypatch.setattr(inputs, "CHUNK_ELEMENTS", elements)
    chunked = accumulated(queries, keys, mask, scaling)
    assert torch.allclose(chunked, whole, atol=1e-6)


def test_helpers_count_real_tokens():
    layer_view = view(length=8, budget=2, batch=2, pads=[0, 3])
    assert most_recent(layer_view, 2)[:, 0].tolist() == [[False] * 6 + [True] * 2, [False] * 6 + [True] * 2]
    assert first_tokens(layer_view, 2)[:, 0].tolist() == [
        [True, True] + [False] * 6,
        [False, False, False, True, True, False, False, False],
    ]
    assert not first_tokens(layer_view, 0).any()


@pytest.mark.parametrize("pads", [[0, 0], [0, 5], [3, 17]])
def test_fused_accumulated_attention_equals_the_chunked_sum(monkeypatch, pads):
    """The fused path (two attention passes, no L x L matrix) is the chunked computation to rounding."""
    generator = torch.Generator().manual_seed(12)
    batch, heads, groups, length, dim = 2, 2, 3, 40, 16
    queries = torch.randn(batch, heads, groups, length, dim, generator=generator) * 2
    keys = torch.randn(batch, heads, length, dim, generator=generator) * 2
    mask = mask_for(pads, heads, length)
    fused = accumulated(queries, keys, mask, 0.3)
    monkeypatch.setattr(inputs, "_attention_with_lse", lambda device: None)
    chunked = accumulated(queries, keys, mask, 0.3)
    torch.testing.assert_close(fused, chunked, rtol=1e-4, atol=1e-5)
    assert (fused.masked_fill(mask[:, :, None, :], 0) == 0).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_h2o_takes_the_prefill_attention_normalisers_on_cuda(monkeypatch):
    """In half precision on CUDA, accumulated attention comes from the fused kernel fed by the
    attention's own log-normalisers; it agrees with the float32 chunked computation."""
    import polykv.cache.kernels.column_sums as column_sums

    if not column_sums.available(torch.device("cuda")):
        pytest.skip("triton is not installed")
    from conftest import tiny_llama

    model = tiny_llama(dtype=torch.bfloat16, device="cuda")
    ids = torch.randint(3, 128, (2, 300), generator=torch.Generator().manual_seed(4)).cuda()
    plan = polykv.compile("layers *: h2o@64", model)
    calls, original = [], column_sums.column_sums
    monkeypatch.setattr(column_sums, "column_sums", lambda *args: calls.append(1) or original(*args))
    totals = {}
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(column_sums, "available", lambda device: False)
        calls.clear()
        with plan.apply(model), torch.no_grad():
            cache = plan.make_cache()
            model(ids, **cache_argument(model, cache))
        assert len(calls) == (4 if fused else 0)
        totals[fused] = [layer.storage.positions.sort(dim=-1).values for layer in cache.layers]
    for fused, chunked in zip(totals[True], totals[False]):
        agreement = (fused[..., :, None] == chunked[..., None, :]).any(-1).float().mean()
        assert agreement > 0.9  # bf16 keys: a few near-ties may fall the other way

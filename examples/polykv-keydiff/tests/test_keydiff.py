"""Tests of the keydiff policy: on hand-made keys, with padding, and in a spec on a tiny model."""

import pytest
import torch
from polykv_keydiff import KeyDiff

import polykv
from polykv import cache_argument
from polykv.policy import LayerView, Phase
from polykv.testing import PolicyContract, prompt, tiny_model

# Four keys point roughly along x, like the mean; token 1 points the other way, token 2 sideways.
KEYS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.9, 0.0], [1.0, 0.0]])


def layer_view(keys: torch.Tensor, budget: int, token_mask: torch.Tensor | None = None) -> LayerView:
    """A one-row, one-head view of ``keys`` (L, D), as the cache would hand it to the policy."""
    length = keys.shape[0]
    if token_mask is None:
        token_mask = torch.ones(length, dtype=torch.bool)
    return LayerView(
        layer=0,
        phase=Phase.PREFILL,
        budget=budget,
        keys=keys[None, None],
        values=torch.zeros_like(keys)[None, None],
        token_mask=token_mask[None, None],
        positions=torch.arange(length)[None, None],
    )


def kept(policy: KeyDiff, view: LayerView) -> list[int]:
    return sorted(policy.select(view).flatten().tolist())


def test_keeps_the_keys_least_like_the_mean():
    assert kept(KeyDiff(window=0), layer_view(KEYS, budget=2)) == [1, 2]


def test_always_keeps_the_recent_window():
    # The last two tokens are as ordinary as keys get, yet kept; the one slot left goes to token 1.
    assert kept(KeyDiff(window=2), layer_view(KEYS, budget=3)) == [1, 4, 5]


def test_padding_is_neither_kept_nor_part_of_the_mean():
    padding = torch.full((3, 2), -5.0)  # far from every real key: it would win if it were scored
    keys = torch.cat([padding, KEYS])
    token_mask = torch.tensor([False] * 3 + [True] * len(KEYS))
    policy = KeyDiff(window=1)

    assert kept(policy, layer_view(keys, budget=3, token_mask=token_mask)) == [4, 5, 8]
    padded_scores = policy.score(layer_view(keys, budget=3, token_mask=token_mask))[..., 3:]
    torch.testing.assert_close(padded_scores, policy.score(layer_view(KEYS, budget=3)))


def test_budget_must_cover_the_window():
    assert KeyDiff(window=8).min_budget() == 8
    assert KeyDiff(window=0).min_budget() == 1
    with pytest.raises(polykv.ParameterError):
        KeyDiff(window=-1)


def test_runs_in_a_spec_during_generation():
    """In a spec, installed: keydiff layers hold their 16 tokens after prefill, decoding appends."""
    model = tiny_model("llama")
    plan = polykv.compile("layers 0: full; *: keydiff@16", model)
    cache = plan.make_cache()
    output = model.generate(
        prompt(40), max_new_tokens=4, min_new_tokens=4, do_sample=False, **cache_argument(model, cache)
    )
    assert output.shape == (1, 44)
    assert cache.layer_lengths() == [43, 19, 19, 19]


class TestKeyDiffContract(PolicyContract):
    """polykv's contract for policies, run on keydiff: one class, every property."""

    policy = KeyDiff

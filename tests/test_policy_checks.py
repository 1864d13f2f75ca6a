"""A policy that misbehaves is caught and named: bad scores, bad indices, exceptions.

On the CPU the checks are read at once, so the error comes from the forward pass that ran the
policy. On a GPU they are read at the start of the next forward pass (one host round trip for all
layers); ``PolyCache.check`` is that point, tested here with flags planted by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

import polykv
from polykv import cache_argument
from polykv.cache.checks import DUPLICATE, NAN_SCORE, raise_pending
from polykv.registry import Registry, default_registry


def _registry_with(*policies) -> Registry:
    registry = Registry()
    for entry in default_registry().policies:
        registry.add_plugin(_Offers(entry.cls), name=f"builtin-{entry.name}", distribution="polykv-core")

    registry.add_plugin(_Offers(*policies), name="test-plugin", distribution="polykv-misbehaving")
    return registry


class _Offers:
    def __init__(self, *policies):
        self.policies = policies

    @polykv.hookimpl
    def register_policies(self, register):
        for policy in self.policies:
            register(policy)


class NaNScores(polykv.ScoringPolicy):
    name = "nanscores"
    description = "Scores every other token NaN."

    def score(self, view):
        scores = view.positions.float()
        scores[..., ::2] = math.nan
        return scores


class WrongShape(polykv.ScoringPolicy):
    name = "wrongshape"
    description = "Returns one score per token, not per row and head."

    def score(self, view):
        return view.positions[0, 0].float()


class OutOfRange(polykv.Policy):
    name = "outofrange"
    description = "Keeps indices past the end."

    def select(self, view):
        batch, heads, length = view.token_mask.shape
        return torch.arange(length, length + view.budget).expand(batch, heads, view.budget)


class Duplicates(polykv.Policy):
    name = "duplicates"
    description = "Keeps token 0 again and again."

    def select(self, view):
        batch, heads, _ = view.token_mask.shape
        return torch.zeros(batch, heads, view.budget, dtype=torch.long)


class KeepsPadding(polykv.Policy):
    name = "keepspadding"
    description = "Keeps the first tokens, padding or not."

    def select(self, view):
        batch, heads, _ = view.token_mask.shape
        return torch.arange(view.budget).expand(batch, heads, view.budget)


class Raises(polykv.ScoringPolicy):
    name = "raises"
    description = "Fails on purpose."

    def score(self, view):
        raise ZeroDivisionError("scores over nothing")


def _run(policy: str, *, padded: bool = False):
    model = tiny_llama("sdpa")
    registry = _registry_with(NaNScores, WrongShape, OutOfRange, Duplicates, KeepsPadding, Raises)
    plan = polykv.compile(f"layers 0-1: full; *: {policy}@8", model, registry=registry)
    ids = torch.randint(3, 128, (2, 30), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, :10] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask, **cache_argument(model, plan.make_cache(registry)))


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("nanscores", r"score\(\) gave NaN for a real token"),
        ("wrongshape", r"score\(\) returned \(30,\), expected a tensor of shape \(2, 2, 30\) \(B, H, L\)"),
        ("outofrange", r"select\(\) returned indices outside the layer's tokens"),
        ("duplicates", r"select\(\) returned the same token twice in a row and head"),
        ("raises", r"raised ZeroDivisionError: scores over nothing"),
    ],
)
def test_a_misbehaving_policy_is_named_with_its_plugin_and_layer(policy, message):
    with pytest.raises(
        polykv.PolicyError, match=rf"policy {policy} \(from polykv-misbehaving\) on layer 2 \(prefill\)"
    ):
        _run(policy)
    with pytest.raises(polykv.PolicyError, match=message):
        _run(policy)


def test_keeping_padding_in_place_of_real_tokens_is_caught():
    _run("keepspadding")  # no padding: keeping the first tokens is a fine choice
    with pytest.raises(polykv.PolicyError, match="kept padding although enough real tokens were there"):
        _run("keepspadding", padded=True)


def test_the_original_exception_is_kept_as_the_cause():
    with pytest.raises(polykv.PolicyError) as raised:
        _run("raises")
    assert isinstance(raised.value.__cause__, ZeroDivisionError)


def test_flags_left_on_the_device_are_raised_at_the_next_check():
    cache = polykv.compile("layers *: knorm@8", tiny_llama("sdpa")).make_cache()
    cache.layers[2].problems.append((torch.tensor(0, dtype=torch.int32), "policy knorm on layer 2 (prefill)"))
    cache.check()  # a zero flag is no problem, and is consumed
    cache.layers[3].problems.append((torch.tensor(DUPLICATE, dtype=torch.int32), "policy x on layer 3 (decode)"))
    with pytest.raises(polykv.PolicyError, match=r"policy x on layer 3 \(decode\): select\(\) returned the same"):
        cache.layer_lengths()
    assert all(layer.problems == [] for layer in cache.layers)


def test_pending_flags_are_read_in_one_round_trip_and_the_first_problem_wins():
    flags = [(torch.tensor(0), "a"), (torch.tensor(NAN_SCORE), "b"), (torch.tensor(DUPLICATE), "c")]
    with pytest.raises(polykv.PolicyError, match=r"^b: score\(\) gave NaN"):
        raise_pending(flags)
    raise_pending([])

"""Resolution on a tiny model with hand-made profiles: routing, budget solving, totals and errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_llama

import polykv
from polykv import cache_argument
from polykv.model import describe_model
from polykv.profile import Profile, ProfileError, fingerprint
from polykv.resolution.resolve import dense_grid, interpolate

GRID = (16, 32, 64, 128)


def profile_for(model, losses: dict[str, list[tuple[float, ...]]], **extra) -> Profile:
    """A profile whose table is ``losses[policy][layer]`` over GRID, for one task."""
    info, _ = describe_model(model)
    names = list(losses)
    table = [[list(losses[name][layer]) for name in names] for layer in range(info.layers)]
    return Profile(
        model=info,
        fingerprint=fingerprint(model),
        settings={"prompt_length": 200},
        grid=GRID,
        policies={name: dict(polykv.default_registry().policies.create(name).values) for name in names},
        losses={"task": table},
        signals={"entropy": {"task": [1.0, 2.0, 3.0, 4.0]}, "variance": {"task": [1.0, 1.0, 1.0, 1.0]}},
        **extra,
    )


STEEP = (0.8, 0.4, 0.1, 0.0)
FLAT = (0.02, 0.01, 0.005, 0.0)


@pytest.fixture
def model():
    return tiny_llama("sdpa")


def _stored(plan) -> list[int]:
    return [
        layer.prefill.budget.tokens(plan.context_length) if layer.prefill.budget else plan.context_length
        for layer in plan.layers
    ]


def test_auto_routes_each_layer_to_the_policy_that_loses_least(model):
    profile = profile_for(model, {"tova": [STEEP, FLAT, STEEP, FLAT], "knorm": [FLAT, STEEP, FLAT, STEEP]})
    plan = polykv.compile("layers *: auto@32", model, profile=profile)
    assert [layer.prefill.policy for layer in plan.layers] == ["knorm", "tova", "knorm", "tova"]
    assert all(layer.prefill.budget == polykv.budget.Tokens(32) for layer in plan.layers)


def test_auto_at_auto_solves_budgets_to_the_total_and_spends_where_it_hurts(model):
    profile = profile_for(model, {"tova": [STEEP, FLAT, FLAT, FLAT], "knorm": [STEEP] * 4})
    plan = polykv.compile("budget 48\nlayers *: auto@auto", model, profile=profile, context_length=200)
    assert sum(_stored(plan)) == 4 * 48
    assert _stored(plan)[0] == max(_stored(plan))  # the steep layer gets the most
    assert {layer.prefill.policy for layer in plan.layers[1:]} == {"tova"}
    assert plan.layers[0].measurements["loss"] >= 0


def test_a_rule_solver_predicts_no_loss_for_a_policy_the_profile_never_measured(model):
    """`polykv plan` shows a layer's predicted loss: none where the profile has no table for its policy."""
    profile = profile_for(model, {"tova": [STEEP, FLAT, FLAT, FLAT]})
    plan = polykv.compile(
        "budget 48; solver uniform; layers 0-1: knorm@auto; *: tova@auto", model, profile=profile, context_length=200
    )
    assert [layer.prefill.policy for layer in plan.layers] == ["knorm", "knorm", "tova", "tova"]
    assert ["loss" in layer.measurements for layer in plan.layers] == [False, False, True, True]
    assert plan.layers[2].measurements["loss"] > 0


def test_a_layer_kept_whole_counts_the_prompt_length(model):
    profile = profile_for(model, {"tova": [(9.0, 9.0, 9.0, 9.0), FLAT, FLAT, FLAT]})
    plan = polykv.compile("budget 100\nlayers *: auto@auto", model, profile=profile, context_length=200)
    assert plan.layers[0].prefill.policy == "full" and plan.layers[0].prefill.budget is None
    assert sum(_stored(plan)) <= 400 and _stored(plan)[0] == 200


def test_full_layers_count_in_the_total(model):
    profile = profile_for(model, {"tova": [FLAT] * 4})
    plan = polykv.compile("budget 64\nlayers 0: full\nlayers *: tova@auto", model, profile=profile, context_length=100)
    assert _stored(plan)[0] == 100 and sum(_stored(plan)) == 4 * 64


def test_budgets_only_keeps_the_named_policy(model):
    profile = profile_for(model, {"tova": [STEEP, FLAT, FLAT, FLAT], "knorm": [FLAT] * 4})
    plan = polykv.compile("budget 40\nlayers *: tova@auto", model, profile=profile, context_length=200)
    assert {layer.prefill.policy for layer in plan.layers} == {"tova"}
    assert sum(_stored(plan)) == 160 and _stored(plan)[0] == max(_stored(plan))


def test_a_share_total_is_solved_for_each_prompt_length(model):
    profile = profile_for(model, {"tova": [STEEP, FLAT, FLAT, FLAT]})
    plan = polykv.compile("budget 25%\nlayers *: tova@auto", model, profile=profile, context_length=200)
    assert sum(_stored(plan)) == 4 * 50
    for length in (80, 160):
        cache = plan.make_cache()
        with torch.no_grad():
            model(torch.randint(3, 128, (1, length)), **cache_argument(model, cache))
        assert sum(cache.layer_lengths()) <= 4 * math.ceil(length / 4)
        assert sum(cache.layer_lengths()) >= 4 * math.ceil(length / 4) - 16 * 4


def test_a_solved_plan_round_trips_and_its_caches_solve_for_their_prompt(model):
    profile = profile_for(model, {"tova": [STEEP, FLAT, FLAT, FLAT], "knorm": [FLAT] * 4})
    plan = polykv.compile("budget 32\nlayers *: auto@auto", model, profile=profile, context_length=200)
    loaded = polykv.Plan.from_json(plan.to_json())
    assert loaded.to_dict() == plan.to_dict()
    ids = torch.randint(3, 128, (2, 90), generator=torch.Generator().manual_seed(1))
    caches = [plan.make_cache(), loaded.make_cache()]
    with torch.no_grad():
        for cache in caches:
            model(ids, **cache_argument(model, cache))
    assert caches[0].layer_lengths() == caches[1].layer_lengths()
    assert sum(caches[0].layer_lengths()) <= 4 * 32
    policies = [[layer.prefill.policy for layer in p.resolved(90).layers] for p in (plan, loaded)]
    assert policies[0] == policies[1]


def test_a_published_rule_needs_no_table(model):
    plan = polykv.compile("budget 64\nsolver pyramid\nlayers *: tova@auto", model, context_length=1000)
    tokens = _stored(plan)
    assert tokens == sorted(tokens, reverse=True) and sum(tokens) == 256


def test_cake_reads_the_profile_signals(model):
    profile = profile_for(model, {"tova": [FLAT] * 4})
    plan = polykv.compile("budget 64\nsolver cake\nlayers *: tova@auto", model, profile=profile, context_length=1000)
    tokens = _stored(plan)
    assert tokens == sorted(tokens) and sum(tokens) == 256  # entropy 1, 2, 3, 4


def test_errors_name_what_is_missing(model):
    with pytest.raises(polykv.SpecError, match="routing and polykv's solver need a calibration profile"):
        polykv.compile("budget 64\nlayers *: auto@auto", model)
    profile = profile_for(model, {"tova": [FLAT] * 4})
    with pytest.raises(polykv.SpecError, match="the profile has no measurements for knorm"):
        polykv.compile("budget 64\nlayers *: knorm@auto", model, profile=profile)
    with pytest.raises(polykv.SpecError, match="the profile measured tova with per_head=False; this layer asks"):
        polykv.compile("budget 64\nlayers *: tova@auto(per_head=true)", model, profile=profile)
    with pytest.raises(ProfileError, match=r"this profile was measured on .*not on .*with other weights"):
        polykv.compile("budget 64\nlayers *: auto@auto", tiny_llama("sdpa", seed=9), profile=profile)


def test_a_profile_round_trips_through_a_file(model, tmp_path):
    profile = profile_for(model, {"tova": [(math.inf, 0.4, 0.1, 0.0)] * 4})
    path = tmp_path / "profile.json"
    profile.save(path)
    assert Profile.load(path) == profile
    path.write_text("{\n  nope")
    with pytest.raises(ProfileError, match=r"profile.json:2:3: not JSON"):
        Profile.load(path)
    path.write_text('{"format": 99}')
    with pytest.raises(ProfileError, match="not a polykv profile of format 1"):
        Profile.load(path)


def test_interpolation_is_log_linear_between_measured_budgets_and_unknown_below():
    grid = dense_grid((16, 64))
    assert grid == (16, 32, 48, 64)
    values = interpolate((16, 64), (1.0, 0.0), grid)
    assert values[0] == 1.0 and values[-1] == 0.0
    assert values[1] == pytest.approx(0.5)  # 32 is halfway between 16 and 64 in log(budget)
    assert interpolate((32, 64), (1.0, 0.5), (16, 32))[0] == math.inf


def test_a_prefill_limit_routes_around_costly_policies(model):
    """tova loses least everywhere but costs 2x; under `prefill <= 1.5x` the solver may use it on half the layers."""
    losses = {"tova": [FLAT] * 4, "knorm": [STEEP] * 4}
    profile = profile_for(model, losses, costs={"tova": 2.0, "knorm": 1.0})
    free = polykv.compile("layers *: auto@32", model, profile=profile)
    assert [layer.prefill.policy for layer in free.layers] == ["tova"] * 4
    assert free.resolver.prefill_cost([layer.prefill for layer in free.layers]) == pytest.approx(2.0)
    limited = polykv.compile("prefill <= 1.5x; layers *: auto@32", model, profile=profile)
    chosen = [layer.prefill.policy for layer in limited.layers]
    assert chosen == ["knorm"] * 4  # tova is taken from every auto layer's candidates once it overspends
    assert limited.resolver.prefill_cost([layer.prefill for layer in limited.layers]) <= 1.5
    assert polykv.compile("layers *: auto@32", model, profile=profile, prefill_limit=1.5).layers == limited.layers


def test_a_reconstruction_pass_costs_once_however_many_layers_use_it(model):
    losses = {"kvzip": [FLAT] * 4, "knorm": [STEEP] * 4}
    profile = profile_for(model, losses, costs={"kvzip": 1.8, "knorm": 1.0})
    plan = polykv.compile(
        "layers 0: kvzip@32; *: auto@32", model, profile=profile, tokenizer=polykv.testing.WordTokenizer()
    )
    assert plan.resolver.passes == ("kvzip",)
    assert plan.resolver.prefill_cost([layer.prefill for layer in plan.layers]) == pytest.approx(1.8)
    limited = polykv.compile(
        "prefill <= 1.9x; layers 0: kvzip@32; *: auto@32", model, profile=profile,
        tokenizer=polykv.testing.WordTokenizer(),
    )  # fmt: skip
    assert [layer.prefill.policy for layer in limited.layers] == ["kvzip"] * 4  # the pass is paid already


def test_a_prefill_limit_that_cannot_be_met_or_checked_is_an_error(model):
    profile = profile_for(model, {"tova": [FLAT] * 4}, costs={"tova": 2.0})
    with pytest.raises(polykv.SpecError, match=r"prefill <= 1.2x cannot be met: the cheapest routing .* 2.00x"):
        polykv.compile("prefill <= 1.2x; layers 0-1: tova@32; *: auto@32", model, profile=profile)
    unmeasured = profile_for(model, {"tova": [FLAT] * 4})
    with pytest.raises(polykv.SpecError, match="the profile has no prefill cost of tova"):
        polykv.compile("prefill <= 1.2x; layers *: auto@32", model, profile=unmeasured)
    with pytest.raises(polykv.SpecError, match="sets its own prefill limit, and prefill_limit= sets another"):
        polykv.compile("prefill <= 1.2x; layers *: auto@32", model, profile=profile, prefill_limit=2)
    with pytest.raises(polykv.SpecError, match="has nothing to decide"):
        polykv.compile("prefill <= 1.2x; layers *: tova@32", model, profile=profile)
    with pytest.raises(ProfileError, match=r"\$.costs\['knorm'\]: a cost of a policy that was not measured"):
        profile_for(model, {"tova": [FLAT] * 4}, costs={"knorm": 1.0})

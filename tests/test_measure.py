"""Measuring the loss table on a tiny model: what an entry means, the shortcut's exactness, signals."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import tiny_llama
from polykv_plugins import BUILTIN_SIGNALS

import polykv
from polykv import cache_argument
from polykv.calibration.calibrate import calibrate
from polykv.calibration.measure import measure
from polykv.calibration.samples import read_samples
from polykv.errors import PolykvError
from polykv.harness import scorer as scorer_module
from polykv.tasks.tasks import Sample


def _sample(task: str, seed: int, length: int, generator: torch.Generator, target: int = 6) -> Sample:
    """A sample of random tokens: ``length`` of prompt and ``target`` scored after it."""
    prompt = torch.randint(3, 128, (length,), generator=generator).tolist()
    return Sample(task, "raw", seed, "calibration", prompt, torch.randint(3, 128, (target,), generator=generator), ())


def _samples(count: int = 4, length: int = 48) -> list[Sample]:
    generator = torch.Generator().manual_seed(3)
    return [_sample("a" if n % 2 else "b", n, length, generator) for n in range(count)]


def _entry_by_hand(model, sample: Sample, layer: int, spec_policy: str, budget: int) -> float:
    """KL of the continuation with only ``layer`` compressed, through plan caches and plain forwards."""
    spec = f"layers {layer}: {spec_policy}@{budget}; *: full"
    plan = polykv.compile(spec, model)
    full, compressed = polykv.compile("layers *: full", model).make_cache(), plan.make_cache()
    inputs = torch.tensor(sample.target)[None, :-1]
    with torch.no_grad():
        logits = []
        for cache in (full, compressed):
            model(torch.tensor(sample.prompt)[None], **cache_argument(model, cache))
            logits.append(torch.log_softmax(model(inputs, **cache_argument(model, cache)).logits.float(), -1))
    return float((logits[0].exp() * (logits[0] - logits[1])).sum(-1).mean())


def test_an_entry_is_the_kl_with_only_that_layer_compressed():
    model = tiny_llama("sdpa")
    samples = _samples(count=1)
    measured = measure(model, samples, policies={"knorm": {}, "tova": {}}, grid=[8, 16, 64], progress=False)
    task = samples[0].group
    table = measured.losses[task]
    assert len(table) == 4 and len(table[0]) == 2 and len(table[0][0]) == 3
    for layer in (0, 2):
        assert table[layer][0][0] == pytest.approx(_entry_by_hand(model, samples[0], layer, "knorm", 8), abs=1e-6)
    assert all(table[layer][p][2] == 0.0 for layer in range(4) for p in range(2))  # 64 covers the 48-token prompt


def test_starting_at_the_compressed_layer_gives_the_full_pass_result(monkeypatch):
    model = tiny_llama("sdpa")
    policies = {"tova": {}}
    shortcut = measure(model, _samples(), policies=policies, grid=[8], batch_size=2, progress=False)
    monkeypatch.setattr(scorer_module._LayerSkipper, "__init__", _no_skipping)
    full_passes = measure(model, _samples(), policies=policies, grid=[8], batch_size=2, progress=False)
    for task in shortcut.losses:
        for a, b in zip(shortcut.losses[task], full_passes.losses[task]):
            assert a[0] == pytest.approx(b[0], rel=1e-4, abs=1e-7)


def _no_skipping(self, model):
    self.owner, self.attribute, self.layers, self.possible = None, "", None, False


def test_a_policy_below_its_minimum_budget_is_marked_infinite_and_signals_are_recorded():
    model = tiny_llama("sdpa")
    signals = [cls() for cls in BUILTIN_SIGNALS]
    measured = measure(
        model, _samples(2), policies={"snapkv": {"window": 12}}, grid=[8, 16], signals=signals, progress=False
    )
    for task in measured.losses:
        assert all(math.isinf(layer[0][0]) and not math.isinf(layer[0][1]) for layer in measured.losses[task])
        assert set(measured.signals) == {s.name for s in signals if not s.curve}
        assert set(measured.curves) == {"output_deviation"}
        assert all(value >= 0 for value in measured.signals["entropy"][task])


def test_calibrate_makes_a_profile_the_resolver_can_use(tmp_path):
    model = tiny_llama("sdpa")
    profile = calibrate(model, _samples(), policies=["knorm", "tova"], grid=[8, 16, 32], progress=False)
    assert profile.tasks == ("a:raw", "b:raw") and profile.settings["prompt_length"] == 48
    path = tmp_path / "profile.json"
    profile.save(path)
    plan = polykv.compile("budget 16\nlayers *: auto@auto", model, profile=path, context_length=48)
    assert sum(layer.prefill.budget.tokens(48) if layer.prefill.budget else 48 for layer in plan.layers) <= 64
    assert plan.resolver.policy_params == {"knorm": {}, "tova": {"per_head": False}}


class _Words:
    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [3 + len(word) for word in text.split()]
        return type("Encoded", (), {"input_ids": torch.tensor([ids])})()


def test_calibration_data_from_json_lines(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"task": "qa", "context": "one two three", "continuation": "four five"}) + "\n")
    [sample] = read_samples(path, _Words())
    assert sample.task == "qa" and sample.prompt == (6, 6, 8) and sample.target == (7, 7)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"task": "qa", "context": "x"}', "data.jsonl:1: missing `continuation`; a line has `task`, `context` and"),
        ('["qa", "x", "y"]', "data.jsonl:1: expected a JSON object, got list"),
        ('{"task": "qa", "context": 3, "continuation": "a b"}', "data.jsonl:1: `context` must be text"),
        ('{"task": "qa",', "data.jsonl:1:15: not JSON: Expecting property name"),
    ],
)
def test_calibration_data_names_the_line_and_what_is_wrong(tmp_path, line, message):
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(PolykvError, match=re.escape(message)):
        read_samples(path, _Words())


def test_tuning_picks_per_budget_the_candidate_that_loses_least_on_held_out_prompts():
    model = tiny_model_for_tuning()
    generator = torch.Generator().manual_seed(9)
    held_out = [
        Sample(task, "raw", seed, "calibration", torch.randint(3, 128, (300,), generator=generator).tolist(),
               torch.randint(3, 128, (6,), generator=generator).tolist(), ())
        for task in ("a", "b") for seed in range(2)
    ]  # fmt: skip
    samples = [_sample(task, seed, 300, generator) for task in ("a", "b") for seed in range(2)]
    profile = calibrate(model, samples, policies=["knorm", "tova"], grid=[8, 16, 32], tune_on=held_out, progress=False)
    assert [regime.budget for regime in profile.regimes] == [32, 64, 128, 256]
    for regime in profile.regimes:
        candidates = {k: v for k, v in regime.measured.items() if not k.startswith("uniform")}
        chosen = f"{'equal' if set(regime.weights.values()) == {1.0} else 'composition'} weights, floor {regime.floor}"
        assert candidates[chosen] == min(candidates.values())
    plan = polykv.compile("budget 40\nlayers *: auto@auto", model, profile=profile, context_length=300)
    assert plan.resolver.regime(300).ratio == pytest.approx(32 / 300)  # 40 is nearest to 32 of the tuned budgets


def tiny_model_for_tuning():
    from polykv.testing import tiny_model

    return tiny_model("llama")


def _rejection_by_hand(model, sample: Sample, layer: int, spec_policy: str, budget: int) -> float:
    """The share of proposals speculative sampling refuses, 1 - sum min(p, q), with only ``layer`` compressed."""
    spec = f"layers {layer}: {spec_policy}@{budget}; *: full"
    caches = [polykv.compile("layers *: full", model).make_cache(), polykv.compile(spec, model).make_cache()]
    inputs = torch.tensor(sample.target)[None, :-1]
    distributions = []
    with torch.no_grad():
        for cache in caches:
            model(torch.tensor(sample.prompt)[None], **cache_argument(model, cache))
            distributions.append(torch.softmax(model(inputs, **cache_argument(model, cache)).logits.float(), -1))
    p, q = distributions
    return float(1 - torch.minimum(p, q).sum(-1).mean())


def test_an_acceptance_entry_is_the_share_of_proposals_refused_with_only_that_layer_compressed():
    model = tiny_llama("sdpa")
    samples = _samples(count=1)
    measured = measure(model, samples, policies={"knorm": {}}, grid=[8, 64], progress=False, objective="acceptance")
    table = measured.losses[samples[0].group]
    for layer in (0, 3):
        expected = _rejection_by_hand(model, samples[0], layer, "knorm", 8)
        assert table[layer][0][0] == pytest.approx(expected, abs=1e-6) and 0 < expected < 1
    assert all(table[layer][0][1] == 0.0 for layer in range(4))


def test_a_profile_for_acceptance_routes_only_when_asked_for(tmp_path):
    model = tiny_llama("sdpa")
    profile = calibrate(model, _samples(), policies=["knorm", "tova"], grid=[8, 16, 32], progress=False,
                        objective="acceptance")  # fmt: skip
    assert profile.objective == "acceptance"
    plan = polykv.compile("budget 16; *: auto@auto", model, profile=profile, objective="acceptance", context_length=48)
    assert all(layer.prefill.policy in ("knorm", "tova", "full") for layer in plan.layers)
    with pytest.raises(polykv.ProfileError, match="calibrate for it with `polykv calibrate --objective kl`"):
        polykv.compile("budget 16; *: auto@auto", model, profile=profile)
    with pytest.raises(polykv.ArgumentError, match="objective is one of kl, acceptance"):
        polykv.compile("*: full", model, objective="speed")

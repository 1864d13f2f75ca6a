"""The cache keeps its promise in every use, and the public API says what a caller did wrong.

Each case here was found by using polykv carelessly: a cache that silently stopped compressing, or
a call that failed with an error about something else. The cache must hold what its plan says,
or raise a polykv error that names the real problem (also a TypeError or ValueError where that
fits, so existing ``except`` clauses keep working).
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polykv
from polykv.cache.cache import CacheState
from polykv.testing import prompt, tiny_model

SPEC = "layers 0: full; *: snapkv@16(window=4)"


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def plan(model):
    return polykv.compile(SPEC, model)


def _generate(model, cache, ids, **options):
    return model.generate(ids, max_new_tokens=2, do_sample=False, **polykv.cache_argument(model, cache), **options)


# --- the prompt's end is known, not guessed -------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 8, 13, 40])
def test_generate_compresses_a_prompt_in_chunks_of_any_size(model, plan, chunk):
    cache = plan.make_cache()
    _generate(model, cache, prompt(40), prefill_chunk_size=chunk)
    assert cache.layer_lengths() == [41, 17, 17, 17]
    assert cache.state is CacheState.DECODING


def test_end_prefill_before_any_prompt_changes_nothing(model, plan):
    cache = plan.make_cache()
    cache.end_prefill()
    assert cache.state is CacheState.FRESH
    with torch.no_grad():
        model(prompt(40), **polykv.cache_argument(model, cache))
    assert cache.layer_lengths() == [40, 16, 16, 16]


def test_after_rewind_to_zero_a_new_prompt_is_compressed_like_the_first(model, plan):
    cache = plan.make_cache()
    with torch.no_grad():
        model(prompt(40), **polykv.cache_argument(model, cache))
        cache.end_prefill()
        cache.rewind(0)
        assert cache.state is CacheState.FRESH
        model(prompt(30, seed=2), **polykv.cache_argument(model, cache))
    assert cache.layer_lengths() == [30, 16, 16, 16]


def test_a_declared_prompt_length_ends_the_prompt_there(model, plan):
    cache = plan.make_cache(prompt_length=40)
    with torch.no_grad():
        model(prompt(25), **polykv.cache_argument(model, cache))
        assert cache.state is CacheState.PROMPT and cache.layer_lengths() == [25, 25, 25, 25]
        model(prompt(15, seed=1), **polykv.cache_argument(model, cache))
    assert cache.state is CacheState.DECODING and cache.layer_lengths() == [40, 16, 16, 16]
    overshooting = plan.make_cache(prompt_length=10)
    with pytest.raises(polykv.CacheError, match="made for a prompt of 10 tokens"), torch.no_grad():
        model(prompt(12), **polykv.cache_argument(model, overshooting))


def test_a_question_after_the_prompt_appends_and_rewind_forgets_it(model, plan):
    cache = plan.make_cache()
    with torch.no_grad():
        model(prompt(40), **polykv.cache_argument(model, cache))
        model(prompt(5, seed=3), **polykv.cache_argument(model, cache))  # several tokens: a question, not a prompt
    assert cache.layer_lengths() == [45, 21, 21, 21]
    cache.rewind(40)
    assert cache.layer_lengths() == [40, 16, 16, 16] and cache.state is CacheState.DECODING


def test_static_generate_needs_a_fresh_cache(model, plan):
    cache = plan.make_cache()
    _generate(model, cache, prompt(40))
    with pytest.raises(polykv.CacheError, match=r"static_generate needs a fresh cache .*plan.make_cache\(\)"):
        polykv.static_generate(model, cache, prompt(40), max_new_tokens=4)


# --- policies see read-only views -------------------------------------------------------------------------


class Vandal(polykv.ScoringPolicy):
    name = "vandal"
    description = "Zeroes the keys it is shown."

    def score(self, view):
        view.keys.zero_()
        return view.positions.float()


class Quitter(polykv.ScoringPolicy):
    name = "quitter"
    description = "Exits the interpreter."

    def score(self, view):
        raise SystemExit(3)


class Elsewhere(polykv.Policy):
    name = "elsewhere"
    description = "Answers on the meta device."

    def select(self, view):
        return torch.zeros(*view.token_mask.shape[:2], view.budget, dtype=torch.long, device="meta")


class _Offering:
    def __init__(self, *policies):
        self.policies = policies

    @polykv.hookimpl
    def register_policies(self, register):
        for policy in self.policies:
            register(policy)


@pytest.fixture(scope="module")
def misbehaving():
    registry = polykv.Registry.from_environment()
    registry.add_plugin(_Offering(Vandal, Quitter, Elsewhere), name="misbehaving", distribution="polykv-bad")
    return registry


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        ("vandal", r"policy vandal \(from polykv-bad\) on layer 1 \(prefill\) changed the view's keys in place"),
        ("quitter", r"policy quitter \(from polykv-bad\) on layer 1 \(prefill\) raised SystemExit"),
        ("elsewhere", r"policy elsewhere \(from polykv-bad\) on layer 1 \(prefill\): select\(\) returned .*meta"),
    ],
)
def test_a_misbehaving_policy_is_named_with_its_package_and_layer(model, misbehaving, policy, message):
    plan = polykv.compile(f"layers 0: full; *: {policy}@16", model, registry=misbehaving)
    with pytest.raises(polykv.PolicyError, match=message), torch.no_grad():
        model(prompt(40), **polykv.cache_argument(model, plan.make_cache(misbehaving)))


# --- plans ----------------------------------------------------------------------------------------------------


def test_an_empty_registry_is_used_not_replaced_by_the_default(plan):
    with pytest.raises(polykv.ArgumentError, match=r"the registry has no policy 'full'.*installed: none"):
        plan.make_cache(polykv.Registry())


def _mutated_json(plan, change) -> str:
    data = plan.to_dict()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["layers"][1]["prefill"].update(budget={"tokens": 8.9}), r"\$\.layers\[1\]\.prefill\.budget"),
        (lambda d: d["layers"].reverse(), r"\$\.layers: a plan has one entry per layer of the model, in order"),
        (lambda d: d["layers"][1].update(index=0), r"\$\.layers: .*got the layers \[0, 0, 2, 3\]"),
        (lambda d: d["layers"][1].update(index="1"), r"\$\.layers\[1\]\.index: expected a whole number"),
        (lambda d: d["layers"][1]["prefill"].update(params=None), r"\$\.layers\[1\]\.prefill\.params"),
        (lambda d: d.pop("layers"), r"\$\.layers: required field missing"),
        (lambda d: d.update(format=2), r"not a polykv plan of format 3.*\(found format 2\)"),
    ],
)
def test_a_damaged_plan_is_refused_with_the_fields_path(plan, change, message):
    with pytest.raises(polykv.FormatError, match=message):
        polykv.Plan.from_json(_mutated_json(plan, change))


@pytest.mark.parametrize("text", ["null", "[]", '"plan"', "{", ""])
def test_what_is_not_a_plan_is_refused(text):
    with pytest.raises(polykv.FormatError, match="<plan>"):
        polykv.Plan.from_json(text)


def _paths(value, prefix=()):
    """Every (path, leaf) of a JSON document."""
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for number, item in enumerate(value):
            yield from _paths(item, (*prefix, number))
    else:
        yield prefix, value


def _mutations():
    values = st.one_of(
        st.none(), st.booleans(), st.integers(-3, 100), st.floats(allow_nan=False), st.text(max_size=4), st.just([])
    )
    return st.tuples(st.sampled_from(["replace", "delete", "add"]), st.integers(0, 10_000), values)


def _apply(document: dict, mutation) -> dict:
    kind, at, value = mutation
    paths = [path for path, _ in _paths(document) if path]
    path = paths[at % len(paths)]
    target = document
    for key in path[:-1]:
        target = target[key]
    if kind == "replace":
        target[path[-1]] = value
    elif kind == "delete" and isinstance(target, dict):
        del target[path[-1]]
    elif kind == "add" and isinstance(target, dict):
        target["surprise"] = value
    return document


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_any_damage_to_a_plan_is_read_back_equal_or_refused_with_a_path(plan, mutation):
    document = _apply(plan.to_dict(), mutation)
    try:
        loaded = polykv.Plan.from_json(json.dumps(document))
    except polykv.FormatError as error:
        assert "$" in str(error) or "format" in str(error), error
        return
    assert _holds(loaded.to_dict(), document)  # what it read is what it writes (a deleted field takes its default)


def _holds(written, read) -> bool:
    """Whether ``written`` has every value of ``read`` at the same place (and maybe defaults beside)."""
    if isinstance(read, dict):
        return isinstance(written, dict) and all(k in written and _holds(written[k], v) for k, v in read.items())
    if isinstance(read, list):
        return isinstance(written, list) and len(written) == len(read) and all(map(_holds, written, read))
    return written == read


# --- profiles -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def profile_document():
    return polykv.default_profile().to_dict()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d["grid"].reverse(), r"\$\.grid: budgets are strictly ascending"),
        (lambda d: d["grid"].__setitem__(1, d["grid"][0]), r"\$\.grid: budgets are strictly ascending"),
        (lambda d: d["grid"].clear(), r"\$\.grid: budgets are strictly ascending"),
        (lambda d: d["losses"]["passkey:raw"].pop(), r"\$\.losses\['passkey:raw'\]: 29 layers of losses for a model"),
        (lambda d: d["losses"]["passkey:raw"][3][0].pop(), r"\$\.losses\['passkey:raw'\]\[3\]\[0\]: 6 losses for 7"),
        (lambda d: d["losses"]["passkey:raw"][3][0].__setitem__(2, -1.0), r"non-negative numbers"),
        (lambda d: d["settings"].pop("prompt_length"), r"\$\.settings\.prompt_length"),
        (lambda d: d["settings"].update(prompt_length="long"), r"\$\.settings\.prompt_length"),
        (lambda d: d["settings"].update(prompt_length=0), r"\$\.settings\.prompt_length"),
        (lambda d: d["regimes"][0].update(budget=0), r"\$\.regimes\[0\]: budget and floor are at least 1"),
        (lambda d: d.update(signals="oops"), r"\$\.signals"),
        (lambda d: d.update(weights=dict.fromkeys(d["losses"], 0.0)), r"\$\.weights: .*not all zero"),
    ],
)
def test_a_damaged_profile_is_refused_with_the_fields_path(profile_document, change, message):
    document = json.loads(json.dumps(profile_document))
    change(document)
    with pytest.raises(polykv.ProfileError, match=message):
        polykv.Profile.from_json(json.dumps(document))


def test_a_nan_loss_is_refused(profile_document):
    document = json.loads(json.dumps(profile_document))
    document["losses"]["passkey:raw"][2][1][3] = math.nan
    field = re.escape("$.losses['passkey:raw'][2][1][3]")
    with pytest.raises(polykv.ProfileError, match=field + ": expected a finite number"):
        polykv.Profile.from_json(json.dumps(document))


def _profile(model, policies: dict) -> polykv.Profile:
    from polykv.model import describe_model
    from polykv.profile import fingerprint

    info, _ = describe_model(model)
    table = [[[0.4, 0.1] for _ in policies] for _ in range(info.layers)]
    return polykv.Profile(
        model=info,
        fingerprint=fingerprint(model),
        settings={"prompt_length": 60},
        grid=(8, 16),
        policies=policies,
        losses={"task:raw": table},
    )


def test_a_profile_of_an_uninstalled_policy_says_so_instead_of_routing_elsewhere(model):
    profile = _profile(model, {"tova": {"per_head": False}, "ghost": {}})
    with pytest.raises(polykv.ProfileError, match="the profile measured ghost, which is not installed here"):
        polykv.compile("budget 16; *: auto@auto", model, profile=profile)


# --- the public API says what the caller did wrong -------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "kind", "message"),
    [
        (lambda m: polykv.compile(SPEC, "not a model"), TypeError, "model is a transformers model"),
        (lambda m: polykv.compile(123, m), TypeError, "spec is spec text"),
        (lambda m: polykv.compile(b"*: full", m), TypeError, "spec is text .str., not bytes"),
        (lambda m: polykv.compile(SPEC, m, context_length=-1), ValueError, "context_length is a whole number"),
        (lambda m: polykv.compile(SPEC, m, registry="x"), TypeError, "registry is a polykv.Registry"),
        (lambda m: polykv.compile(SPEC, m, profile=3), TypeError, "profile is a Profile"),
        (lambda m: polykv.compile("*: full", m, budget=2.5), TypeError, "budget is tokens per layer"),
        (lambda m: polykv.parse(None), TypeError, "text is spec text"),
        (lambda m: polykv.parse(b"*: full"), TypeError, "not bytes"),
        (lambda m: polykv.check("*: full", layers=30), TypeError, "spec is a polykv.Spec: parse the text first"),
        (lambda m: polykv.check(polykv.parse("*: full"), layers="30"), TypeError, "layers is a whole number"),
        (lambda m: polykv.check(polykv.parse("*: full"), layers=0), ValueError, "layers is a whole number from 1"),
        (lambda m: polykv.load(3), TypeError, "path is the path of a spec file"),
    ],
)
def test_a_wrong_argument_is_named(model, call, kind, message):
    with pytest.raises(kind, match=message) as raised:
        call(model)
    assert isinstance(raised.value, polykv.PolykvError)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda c, p: c.rewind("5"), r"length is a whole number, got '5'"),
        (lambda c, p: c.rewind(None), r"length is a whole number, got NoneType None"),
        (lambda c, p: c.rewind(20.5), r"length is a whole number, got 20.5"),
        (lambda c, p: c.rewind(-1), r"length is a whole number at least 0, got -1"),
        (lambda c, p: c.crop(3), r"crop takes the number of newest tokens to remove as a negative count"),
        (lambda c, p: p.make_cache("x"), r"registry is a polykv.Registry"),
        (lambda c, p: p.make_cache(prompt_length=0), r"prompt_length is a whole number at least 1, got 0"),
        (lambda c, p: p.make_cache(prompt_length=100.5), r"prompt_length is a whole number, got 100.5"),
    ],
)
def test_a_wrong_argument_to_a_cache_or_plan_is_named(plan, call, message):
    with pytest.raises(polykv.ArgumentError, match=message):
        call(plan.make_cache(), plan)


@pytest.mark.parametrize("length", [0, -5, 100.5])
def test_an_auto_plan_refuses_a_prompt_length_that_is_not_one(model, length):
    routed = polykv.compile("budget 16; *: auto@auto", model, profile=_profile(model, {"tova": {"per_head": False}}))
    with pytest.raises(polykv.ArgumentError, match="prompt_length is a whole number"):
        routed.make_cache(prompt_length=length)


@pytest.mark.parametrize(("chunk", "message"), [(0, "got 0"), (-1, "got -1"), (2.5, "got 2.5"), ("8", "got '8'")])
def test_generate_names_a_bad_prefill_chunk_size(model, plan, chunk, message):
    with pytest.raises(polykv.ArgumentError, match=f"prefill_chunk_size is a whole number.*{message}"):
        _generate(model, plan.make_cache(), prompt(40), prefill_chunk_size=chunk)


def test_static_generate_names_a_bad_check_every(model, plan):
    with pytest.raises(polykv.ArgumentError, match="check_every is a whole number of steps of at least 1, got 0"):
        polykv.static_generate(model, plan.make_cache(), prompt(40), max_new_tokens=4, check_every=0)


def test_calibration_refuses_a_policy_that_takes_no_budget(model):
    from polykv.calibration.calibrate import calibrate

    with pytest.raises(polykv.ArgumentError, match="full keeps every token and takes no budget"):
        calibrate(model, [], policies=["full"], grid=[8, 16], progress=False)


def test_null_is_read_as_a_loss_a_policy_cannot_reach(profile_document):
    document = json.loads(json.dumps(profile_document))
    document["losses"]["passkey:raw"][2][1][3] = None
    assert math.isinf(polykv.Profile.from_json(json.dumps(document)).losses["passkey:raw"][2][1][3])


@pytest.mark.parametrize(("ids", "message"), [(torch.zeros(1, 0, dtype=torch.long), "the prompt is empty"),
                                              (torch.zeros(0, 5, dtype=torch.long), "the batch is empty")])  # fmt: skip
def test_generate_names_an_empty_prompt_or_batch(model, plan, ids, message):
    with pytest.raises(polykv.CacheError, match=message):
        _generate(model, plan.make_cache(), ids)

"""Every decoder family polykv wraps, on tiny random configs: exact at full budgets, bounded when compressing.

Sliding-window layers (Mistral, Phi-3 and Qwen2 with a window, Gemma 2 and 3 mixing sliding and
full layers) see only their last ``window`` tokens: polykv keeps at most ``window - 1`` of them, as
transformers' own cache does, scores with the same visibility, and Gemma 2's soft-capped logits
are scored as the eager kernel caps them.
"""

from __future__ import annotations

import pytest
import torch

import polykv
from polykv import cache_argument
from polykv.testing.models import FAMILIES, SLIDING_WINDOW, tiny_model

WINDOW = SLIDING_WINDOW


def build(family: str, attention: str = "sdpa"):
    return tiny_model(family, attention)


def windows(model) -> list[int | None]:
    return [placement.sliding_window for _, placement in sorted(polykv.model.describe_model(model)[1].items())]


def _prompt(length: int = 40, batch: int = 2) -> torch.Tensor:
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(11))


def test_layers_are_classified_as_transformers_does():
    assert windows(build("llama")) == [None] * 4
    assert windows(build("qwen2-sliding")) == [None, None, WINDOW, WINDOW]
    assert windows(build("mistral-sliding")) == [WINDOW] * 4
    assert windows(build("gemma2")) == [WINDOW, None, WINDOW, None]


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("spec", ["layers *: full", "layers *: snapkv@500(window=4) decode tova@500"])
def test_full_budgets_equal_the_models_own_cache(family, attention, spec):
    model = build(family, attention)
    ids = _prompt()
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # one left-padded row
    options = {
        "attention_mask": mask,
        "max_new_tokens": 6,
        "do_sample": False,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": 0,
    }
    theirs = model.generate(ids, **options)  # transformers' own cache for this config
    plan = polykv.compile(spec, model)
    ours = model.generate(ids, **cache_argument(model, plan.make_cache()), **options)
    assert torch.equal(ours.sequences, theirs.sequences)
    for a, b in zip(ours.logits, theirs.logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_compressing_spec_stores_what_the_budget_says(family):
    model = build(family)
    cache = polykv.compile("layers 0: full; *: snapkv@12(window=3) decode streaming@20(sink=2)", model).make_cache()
    prompt = _prompt(40)
    model.generate(prompt, max_new_tokens=16, min_new_tokens=16, do_sample=False, **cache_argument(model, cache))
    expected_prefill = [
        (40 if w is None else w - 1) if i == 0 else (12 if w is None else min(12, w - 1))
        for i, w in enumerate(windows(model))
    ]
    expected = [
        (40 + 15 if w is None else w - 1) if i == 0 else (20 if w is None else min(20, w - 1))
        for i, w in enumerate(windows(model))
    ]
    assert cache.layer_lengths() == expected, expected_prefill
    for layer, window in zip(cache.layers, windows(model)):
        if window is not None and layer.positions is not None:
            assert (layer.positions > cache.get_seq_length() - window).all()  # nothing the window cannot see


def test_sliding_layers_score_only_what_the_window_sees():
    """A query-aware policy on a sliding layer never keeps a token outside the window, even at prefill."""
    model = build("mistral-sliding")
    cache = polykv.compile("layers *: tova@4", model).make_cache()
    with torch.no_grad():
        model(_prompt(40), **cache_argument(model, cache))
    for layer in cache.layers:
        assert (layer.positions >= 40 - (WINDOW - 1)).all()


def test_gemma2_eager_scoring_uses_the_soft_capped_logits():
    """Scores come from attention as the kernel computes it: Gemma 2's eager kernel soft-caps the logits."""
    model = build("gemma2")
    for attention in polykv.model.attention_modules(model).values():
        attention.attn_logit_softcapping = 0.5  # small, so that capping changes the weights a lot
    module = polykv.model.attention_modules(model)[1]
    with torch.no_grad():  # random weights give tiny logits: sharpen them so that capping matters
        module.q_proj.weight.mul_(30)
        module.k_proj.weight.mul_(30)
    cache = polykv.compile("layers *: tova@5(per_head=true)", model).make_cache()
    views = {}
    tova = type(cache.layers[1].prefill.policy)
    score = tova.score
    tova.score = lambda self, view: (views.setdefault(view.layer, view), score(self, view))[1]
    try:
        with torch.no_grad():
            model(_prompt(30, batch=1), **cache_argument(model, cache))
    finally:
        tova.score = score
    view = views[1]  # a full-attention layer: the last query sees all 30 tokens
    logits = torch.einsum("bhgnd,bhld->bhgnl", view.queries.float(), view.keys.float()) * module.scaling
    capped = torch.softmax(torch.tanh(logits / 0.5) * 0.5, dim=-1)
    uncapped = torch.softmax(logits, dim=-1)
    torch.testing.assert_close(view.window_attention, capped, rtol=1e-5, atol=1e-6)
    assert (capped - uncapped).abs().max() > 1e-2

"""Self-speculation: whatever the draft, the output is the full cache's.

The tiny models run in float64, so that a forward of several tokens and several forwards of one
token agree to far below any gap between two logits, and greedy outputs can be compared exactly.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import DynamicCache

import polykv
from polykv import cache_argument
from polykv.cache.static import FREE, StaticDecoding
from polykv.decoding.precision import draft_model
from polykv.testing import prompt, tiny_model

SPECS = [
    "*: streaming@8(sink=2)",
    "layers 0: full; *: snapkv@12(window=4)",
    "*: h2o@10(recent=0.4)",
    "layers 0: full; *: streaming@10(sink=2) decode streaming@14(sink=2)",
]


@pytest.fixture(scope="module", params=["llama", "qwen2-sliding", "mistral-sliding"])
def model(request):
    return tiny_model(request.param, dtype=torch.float64)


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", dtype=torch.float64, seed=2)


def _greedy(model, ids, new, **options):
    mask = options.pop("attention_mask", torch.ones_like(ids))
    return model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        **cache_argument(model, DynamicCache()),
        **options,
    )


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("lookahead", [1, 4])
def test_the_output_is_greedy_full_cache_decoding(model, spec, lookahead):
    ids = prompt(40, batch=2)
    plan = polykv.compile(spec, model)
    result = polykv.speculative_generate(model, ids, draft=plan, max_new_tokens=16, lookahead=lookahead)
    assert torch.equal(result.tokens, _greedy(model, ids, 16))
    assert result.accepted == sum(result.accepted_per_step) <= result.row_accepted <= result.drafted
    if not any(layer.sliding_window for layer in plan.layers):
        assert result.accepted == result.row_accepted  # each row keeps what it accepted


_POLICIES = st.sampled_from(["streaming@{b}(sink=2)", "snapkv@{b}(window=4)", "tova@{b}", "knorm@{b}", "h2o@{b}"])


@st.composite
def draft_specs(draw) -> str:
    """A draft spec for the tiny models: some layers whole, the rest compressed, perhaps bounded while decoding."""
    whole = draw(st.sampled_from(["", "layers 0: full; ", "layers 0-1: full; "]))
    policy = draw(_POLICIES).format(b=draw(st.integers(6, 40)))
    decode = draw(st.sampled_from(["", " decode streaming@{b}(sink=2)"])).format(b=draw(st.integers(8, 48)))
    return f"{whole}*: {policy}{decode}"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=draft_specs(), lookahead=st.integers(0, 7), length=st.integers(1, 48), batch=st.integers(1, 3))
def test_any_draft_and_lookahead_give_the_full_caches_output(llama, spec, lookahead, length, batch):
    ids = prompt(length, batch=batch, seed=length)
    result = polykv.speculative_generate(
        llama, ids, draft=polykv.compile(spec, llama), max_new_tokens=12, lookahead=lookahead
    )
    assert torch.equal(result.tokens, _greedy(llama, ids, 12))


_STATIC_POLICIES = st.sampled_from(["streaming@{b}(sink=2)", "snapkv@{b}(window=4)", "tova@{b}", "full"])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    policy=_STATIC_POLICIES,
    budget=st.integers(6, 40),
    whole=st.sampled_from(["", "layers 0: full; ", "layers 1 heads 0: full; layers 1 heads 1: knorm@6; "]),
    decode=st.sampled_from(["", " decode streaming@{d}(sink=2)", " decode knorm@{d}"]),
    bound=st.integers(10, 30),
    lookahead=st.integers(0, 6),
    length=st.integers(1, 40),
    batch=st.integers(1, 3),
    padded=st.booleans(),
)
def test_checks_of_fixed_shapes_give_the_full_caches_output(
    llama, policy, budget, whole, decode, bound, lookahead, length, batch, padded
):
    """The static path (run eagerly here, replayed as a CUDA graph on a GPU): any draft, bounded while decoding
    or not, any lookahead, left-padded rows that end at different steps."""
    ids = prompt(length, batch=batch, seed=length)
    mask = torch.ones_like(ids)
    if padded and batch > 1:
        mask[1:, : length // 2] = 0
    free = _greedy(llama, ids, 12, attention_mask=mask)
    eos = int(free[0, length + 4])
    expected = _greedy(llama, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    draft = polykv.compile(f"{whole}*: {policy.format(b=budget)}{decode.format(d=bound)}", llama)
    options = dict(attention_mask=mask, max_new_tokens=12, lookahead=lookahead, eos_token_id=eos, pad_token_id=0)
    result = polykv.speculative_generate(llama, ids, draft=draft, static=True, **options)
    assert result.static and torch.equal(result.tokens, expected)
    assert result.accepted == sum(result.accepted_per_step) == result.row_accepted <= result.drafted
    assert result.idle_checks < 4  # an end token may end the rows between two looks of the host, 4 checks apart
    if not decode:  # a bounded draft evicts once per check here, at every step in ordinary forwards
        ordinary = polykv.speculative_generate(llama, ids, draft=draft, static=False, **options)
        assert result.steps == ordinary.steps  # the same checks (the last ones may draft more than they need)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lookahead=st.integers(1, 5), batch=st.integers(1, 3), new=st.integers(2, 16))
def test_checks_of_fixed_shapes_stop_when_the_last_row_has_its_tokens(llama, lookahead, batch, new):
    """Without end tokens the host runs as many checks as the furthest-behind row needs at the least, so no
    check runs after every row has made its tokens (in a batch the rows accept at different rates)."""
    ids = prompt(12, batch=batch, seed=new)
    draft = polykv.compile("*: streaming@6(sink=2)", llama)
    result = polykv.speculative_generate(llama, ids, draft=draft, static=True, max_new_tokens=new, lookahead=lookahead)
    assert result.static and result.idle_checks == 0
    assert torch.equal(result.tokens, _greedy(llama, ids, new))


@pytest.mark.parametrize("decode", ["streaming@12(sink=2)", "knorm@12"])
@pytest.mark.parametrize("lookahead", [1, 4])
def test_a_draft_bounded_while_decoding_holds_its_bound_and_evicts_holes_first(llama, monkeypatch, decode, lookahead):
    """In checks of fixed shapes a draft layer with a decode bound has slots for its bound and no more; a check
    that would take it over its bound ends by evicting down to the bound minus the next check's tokens, the
    proposals its rows refused (holes) first."""
    evictions, evict = [], StaticDecoding.evict_for_check

    def holes(static) -> torch.Tensor:
        return ((static.positions != FREE) & ~static.real).sum(dim=-1)  # (B, H)

    def observed(static):
        before, count = holes(static), static.held + static.per_check - static.target
        evict(static)
        stored = (static.positions != FREE).sum(dim=-1)
        evictions.append((static.evicting, static.keys.shape[2], before, count, holes(static), stored, static.target))

    monkeypatch.setattr(StaticDecoding, "evict_for_check", observed)
    ids = prompt(30, batch=3)
    draft = polykv.compile(f"*: snapkv@8(window=4) decode {decode}", llama)
    result = polykv.speculative_generate(llama, ids, draft=draft, max_new_tokens=40, lookahead=lookahead)
    assert result.static and torch.equal(result.tokens, _greedy(llama, ids, 40))
    evicting = [found for found in evictions if found[0]]
    assert evicting and all(slots == 12 for _, slots, *_ in evictions)
    for _, _, before, count, after, stored, target in evicting:
        assert (stored == target).all()
        assert torch.equal(after, (before - count).clamp(min=0))  # holes go first
    assert any((before > 0).any() for _, _, before, *_ in evicting)  # rows refused proposals: there were holes


def test_static_checks_say_when_they_cannot_run(llama):
    bounded = polykv.compile("*: full decode tova@16", llama)
    with pytest.raises(
        polykv.ArgumentError, match="static speculation cannot run here: layer 0 evicts while decoding "
    ):
        polykv.speculative_generate(llama, prompt(8), draft=bounded, max_new_tokens=4, static=True)
    result = polykv.speculative_generate(llama, prompt(8), draft=bounded, max_new_tokens=4)  # ordinary forwards
    assert not result.static
    sliding = tiny_model("mistral-sliding", dtype=torch.float64)
    with pytest.raises(polykv.ArgumentError, match="sliding window, which counts slots"):
        polykv.speculative_generate(
            sliding, prompt(8), draft=polykv.compile("*: full", sliding), max_new_tokens=4, static=True
        )
    tight = polykv.compile("*: full decode knorm@4", llama)
    with pytest.raises(polykv.ArgumentError, match="keeps 4 tokens while decoding, too few to take checks of 6"):
        polykv.speculative_generate(llama, prompt(8), draft=tight, max_new_tokens=4, lookahead=5, static=True)
    assert not polykv.speculative_generate(llama, prompt(8), draft=tight, max_new_tokens=4, lookahead=5).static


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "spec", ["layers 0: full; *: snapkv@12(window=4)", "*: full", "*: snapkv@12(window=4) decode streaming@16(sink=2)"]
)
@pytest.mark.parametrize("compile_step", [False, True])
@pytest.mark.parametrize("precision", [{}, {"draft_tf32": True}, {"draft_dtype": torch.bfloat16}])
def test_checks_replayed_as_cuda_graphs_give_the_full_caches_output(spec, compile_step, precision):
    model = tiny_model("llama", dtype=torch.float32, seed=2, device="cuda")
    ids = prompt(30, batch=3).cuda()
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    expected = _greedy(model, ids, 20, attention_mask=mask)
    result = polykv.speculative_generate(
        model, ids, attention_mask=mask, draft=polykv.compile(spec, model), max_new_tokens=20, lookahead=3,
        compile_step=compile_step, **precision,
    )  # fmt: skip
    assert result.static and torch.equal(result.tokens, expected)
    assert result.tokens_per_second > 0 and result.warmup_seconds > 0


@pytest.mark.slow
@pytest.mark.heavy  # compiling takes some 25 s on two cores
def test_compiled_checks_give_the_full_caches_output(llama):
    ids = prompt(24, batch=2)
    expected = _greedy(llama, ids, 10)
    draft = polykv.compile("*: snapkv@12(window=4) decode streaming@16(sink=2)", llama)
    result = polykv.speculative_generate(llama, ids, draft=draft, max_new_tokens=10, lookahead=3, compile_step=True)
    assert result.static and torch.equal(result.tokens, expected)
    # The draft's forwards compiled under TF32 anew (dynamo guards on the flag), the checks' as they were.
    options = dict(draft=draft, max_new_tokens=10, lookahead=3, compile_step=True, draft_tf32=True)
    assert torch.equal(polykv.speculative_generate(llama, ids, **options).tokens, expected)
    with pytest.raises(polykv.ArgumentError, match=r"compile_step compiles the static checks.*static=False was given"):
        polykv.speculative_generate(llama, ids, draft=draft, max_new_tokens=4, static=False, compile_step=True)


@pytest.mark.parametrize("static", [True, False])
def test_a_draft_in_tf32_drafts_with_it_and_checks_without(llama, static):
    """``draft_tf32`` sets TF32 for the draft's forwards only (on the CPU the flag changes no product, so what this
    checks is where it is set): the checks run as the caller's setting says, and the setting is restored."""
    seen = []

    def record(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append((id(cache), ids.shape[1], torch.backends.cuda.matmul.allow_tf32))

    ids = prompt(20, batch=2)
    draft = polykv.compile("*: streaming@8(sink=2)", llama)
    hook = llama.register_forward_pre_hook(record, with_kwargs=True)
    try:
        result = polykv.speculative_generate(
            llama, ids, draft=draft, max_new_tokens=9, lookahead=3, static=static, draft_tf32=True
        )
    finally:
        hook.remove()
    assert torch.equal(result.tokens, _greedy(llama, ids, 9))
    assert not torch.backends.cuda.matmul.allow_tf32
    by_cache = {}
    for cache, tokens, tf32 in seen:
        by_cache.setdefault(cache, []).append((tokens, tf32))
    # The prefill's, the full cache's (its checks take the newest token and 3 proposals) and the draft's forwards.
    drafts = [forwards for forwards in by_cache.values() if all(tf32 for _, tf32 in forwards)]
    others = [forwards for forwards in by_cache.values() if not any(tf32 for _, tf32 in forwards)]
    assert len(drafts) == 1 and len(drafts) + len(others) == len(by_cache), by_cache
    assert max(tokens for tokens, _ in drafts[0]) <= 2 and any(tokens == 4 for f in others for tokens, _ in f)


@pytest.mark.parametrize("static", [True, False])
@pytest.mark.parametrize("spec", ["*: streaming@8(sink=2)", "layers 0: full; *: tova@12 decode streaming@16"])
def test_a_draft_in_a_lower_dtype_gives_the_full_caches_output(llama, spec, static):
    """The draft runs a twin of the model in ``draft_dtype`` over a cache held in it; the checks run the model."""
    ids = prompt(30, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    draft = polykv.compile(spec, llama)
    expected = _greedy(llama, ids, 12, attention_mask=mask)
    options = dict(attention_mask=mask, draft=draft, max_new_tokens=12, lookahead=3, static=static)
    same = polykv.speculative_generate(llama, ids, **options)
    for dtype in (torch.float32, torch.bfloat16):
        lower = polykv.speculative_generate(llama, ids, **options, draft_dtype=dtype)
        assert lower.static == static and torch.equal(lower.tokens, expected)
        assert lower.draft_nbytes < same.draft_nbytes and lower.full_nbytes == same.full_nbytes
    assert next(llama.parameters()).dtype == torch.float64  # the model itself is left as it was


def test_a_draft_in_a_lower_dtype_runs_a_twin_made_once_while_the_weights_stay():
    model = tiny_model("llama", dtype=torch.float32, seed=3)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as the bundled model's are
    twin = draft_model(model, torch.bfloat16)
    assert draft_model(model, torch.float32) is model and draft_model(model, None) is model
    assert twin is not model and twin.dtype == torch.bfloat16 and model.dtype == torch.float32
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    assert torch.equal(twin.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))
    assert draft_model(model, torch.bfloat16) is twin
    with torch.no_grad():
        model.model.norm.weight.mul_(2)  # the weights changed in place: the twin is made again
    again = draft_model(model, torch.bfloat16)
    assert again is not twin and torch.equal(again.model.norm.weight, model.model.norm.weight.to(torch.bfloat16))


def test_a_draft_dtype_is_a_floating_dtype_and_excludes_tf32(llama):
    plan = polykv.compile("*: streaming@8(sink=2)", llama)
    with pytest.raises(polykv.ArgumentTypeError, match=r"draft_dtype is a floating torch dtype.*torch\.int8"):
        polykv.speculative_generate(llama, prompt(8), draft=plan, max_new_tokens=4, draft_dtype=torch.int8)
    with pytest.raises(polykv.ArgumentError, match=r"draft_tf32 .* this draft runs in torch\.bfloat16"):
        polykv.speculative_generate(
            llama, prompt(8), draft=plan, max_new_tokens=4, draft_dtype=torch.bfloat16, draft_tf32=True
        )


def test_a_whole_draft_is_always_right():
    model = tiny_model("llama", dtype=torch.float64)
    result = polykv.speculative_generate(
        model, prompt(30), draft=polykv.compile("*: full", model), max_new_tokens=21, lookahead=4
    )
    assert result.acceptance == 1.0 and result.accepted_per_step == (4, 4, 4, 4)
    assert result.tokens_per_step == 5.0 and result.row_acceptance == 1.0


def test_a_left_padded_batch_with_an_end_token_is_generates(llama):
    ids = prompt(30, batch=3)
    mask = torch.ones_like(ids)
    mask[1, :7], mask[2, :19] = 0, 0
    ids = ids.masked_fill(mask == 0, 0)
    free = _greedy(llama, ids, 16, attention_mask=mask)
    eos = int(free[0, 30 + 5])  # a token row 0 produces midway: rows end at different steps
    expected = _greedy(llama, ids, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    result = polykv.speculative_generate(
        llama,
        ids,
        attention_mask=mask,
        draft=polykv.compile("layers 0: full; *: snapkv@12(window=4)", llama),
        max_new_tokens=16,
        lookahead=3,
        eos_token_id=eos,
        pad_token_id=0,
    )
    assert torch.equal(result.tokens, expected)


@pytest.mark.parametrize(
    ("family", "static", "lookahead", "draft_dtype"),
    # rows keep what each accepted, or what all did (sliding windows); in ordinary forwards or checks of fixed shapes
    [
        pytest.param("llama", False, 1, None, marks=pytest.mark.heavy),  # 8 s; ordinary forwards: mistral-sliding
        ("mistral-sliding", False, 1, None),
        pytest.param("llama", True, 1, None, marks=pytest.mark.heavy),  # 8 s; checks of fixed shapes: lookahead 3
        ("llama", True, 3, None),
        ("llama", True, 3, torch.bfloat16),  # q from the draft's bfloat16 logits: the rule still gives p
    ],
)
def test_sampling_follows_the_full_caches_distribution(family, static, lookahead, draft_dtype):
    """The first drafted tokens of many rows, drawn from a poor draft, are distributed as the full cache says."""
    model = tiny_model(family, dtype=torch.float64, seed=5)
    rows = 3000
    ids = prompt(24).expand(rows, -1)
    sampling = polykv.Sampling(temperature=0.5, top_k=8)
    torch.manual_seed(0)
    result = polykv.speculative_generate(
        model, ids, draft=polykv.compile("*: random@3", model), max_new_tokens=4, lookahead=lookahead,
        sampling=sampling, static=static, draft_dtype=draft_dtype,
    )  # fmt: skip
    assert result.static == static
    assert 0.2 < result.row_acceptance < 0.8  # rows that kept the proposal and rows that drew again
    for position in (25, 26):  # the token after each row's own prefix: its mean is the expected frequency
        with torch.no_grad():
            logits = model(result.tokens[:, :position]).logits[:, -1]
        expected = sampling.probabilities(logits).mean(dim=0)
        observed = torch.bincount(result.tokens[:, position], minlength=expected.shape[0]).double() / rows
        # Sampling noise alone is about 0.03 in total variation here; the draft's own distribution is 0.48 away.
        assert (observed - expected).abs().sum() / 2 < 0.08


def test_arguments_are_named(llama):
    plan = polykv.compile("*: full", llama)
    with pytest.raises(polykv.ArgumentTypeError, match=r"draft is a polykv\.Plan"):
        polykv.speculative_generate(llama, prompt(8), draft="*: full", max_new_tokens=4)
    with pytest.raises(polykv.ArgumentError, match="lookahead"):
        polykv.speculative_generate(llama, prompt(8), draft=plan, max_new_tokens=4, lookahead=-1)
    with pytest.raises(polykv.ArgumentError, match="max_new_tokens"):
        polykv.speculative_generate(llama, prompt(8), draft=plan, max_new_tokens=0)


@pytest.mark.slow
@pytest.mark.parametrize("spec", ["layers 0-1: full; *: streaming@32", "layers 0-1: full; *: snapkv@32"])
def test_on_the_bundled_model_the_output_is_greedy_decoding(real_model, spec):
    model, tokenizer = real_model
    text = "Write a short story about a robot who learns to paint. Once upon a time, in a small town by the sea,"
    ids = torch.tensor([tokenizer.encode(text)])
    with polykv.prepared(model):
        expected = _greedy(model, ids, 24)
    result = polykv.speculative_generate(model, ids, draft=polykv.compile(spec, model), max_new_tokens=24)
    assert torch.equal(result.tokens, expected)
    assert result.accepted > 0


@pytest.mark.slow
def test_on_the_bundled_model_a_draft_routed_for_acceptance_reads_the_shipped_profile(real_model):
    model, tokenizer = real_model
    shipped = polykv.default_profile(objective="acceptance")
    assert shipped.objective == "acceptance" and shipped.model.name == "SmolLM2-135M-Instruct"
    draft = polykv.compile("budget 64; *: auto@auto", model, tokenizer=tokenizer, objective="acceptance")
    assert (
        draft.resolved(1024).runs()
        != polykv.compile("budget 64; *: auto@auto", model, tokenizer=tokenizer).resolved(1024).runs()
    )  # the two objectives route differently
    ids = torch.tensor([tokenizer.encode("The capital of France is Paris. The capital of Italy is")])
    with polykv.prepared(model):
        expected = _greedy(model, ids, 12)
    result = polykv.speculative_generate(model, ids, draft=draft, max_new_tokens=12, static=True)
    assert torch.equal(result.tokens, expected)

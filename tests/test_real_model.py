"""The cache engine on the real bundled model (SmolLM2-135M-Instruct, 30 layers, 9 query / 3 KV heads)."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.attention
from transformers import DynamicCache

import polykv
from polykv import cache_argument
from polykv.tasks.tasks import passkey_prompt

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
POLICIES = [
    "full",
    "streaming@2000",
    "snapkv@2000",
    "pyramidkv@2000",
    "h2o@2000",
    "tova@2000",
    "knorm@2000",
    "random@2000",
]


def _ids(tokenizer, text: str) -> torch.Tensor:
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("policy", POLICIES)
def test_full_budget_gives_the_full_cache_logits_exactly(real_model, policy):
    """Prefill and every decoding step: bit for bit the logits of the full cache (float32, CPU)."""
    model, tokenizer = real_model
    ids = _ids(tokenizer, passkey_prompt(8, 0.5, 31337))
    plan = polykv.compile(f"layers *: {policy} decode streaming@4000", model)
    options = {"max_new_tokens": 4, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    full = model.generate(ids, **cache_argument(model, DynamicCache()), **options)
    ours = model.generate(ids, **cache_argument(model, plan.make_cache()), **options)
    assert torch.equal(ours.sequences, full.sequences)
    for step_ours, step_full in zip(ours.logits, full.logits, strict=True):
        assert torch.equal(step_ours, step_full)


@pytest.mark.parametrize("depth", [0.1, 0.5, 0.9])
def test_passkey_at_1k_tokens_with_snapkv_256(real_model, depth):
    model, tokenizer = real_model
    key = 40000 + int(depth * 10000) + 517
    ids = _ids(tokenizer, passkey_prompt(40, depth, key))
    assert 1000 < ids.shape[1] < 1100
    plan = polykv.compile("layers 0-1: full; *: snapkv@256", model)
    cache = plan.make_cache()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **cache_argument(model, cache))
    assert str(key) in tokenizer.decode(out[0, ids.shape[1] :])
    assert cache.layer_lengths()[:3] == [ids.shape[1] + 7, ids.shape[1] + 7, 256 + 7]


@pytest.mark.heavy  # 11 s; tests/test_cache.py checks padded batches on tiny models in the quick tier
def test_a_left_padded_batch_answers_like_each_prompt_alone(real_model):
    model, tokenizer = real_model
    texts = [
        passkey_prompt(repeats, depth, key)
        for repeats, depth, key in ((30, 0.3, 11111), (18, 0.6, 22222), (8, 0.5, 33333))
    ]
    plan = polykv.compile("layers 0-1: full; *: snapkv@128 decode streaming@132", model)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and (batch.attention_mask[1:, 0] == 0).all()
    together = model.generate(**batch, max_new_tokens=8, do_sample=False, **cache_argument(model, plan.make_cache()))
    for row, text in enumerate(texts):
        ids = _ids(tokenizer, text)
        alone = model.generate(ids, max_new_tokens=8, do_sample=False, **cache_argument(model, plan.make_cache()))
        assert torch.equal(together[row, -8:], alone[0, -8:]), (
            tokenizer.decode(together[row, -8:]),
            tokenizer.decode(alone[0, -8:]),
        )


@pytest.mark.heavy  # 7 s; decode budgets on the tiny models run in the quick tier
def test_a_long_generation_stays_within_its_decode_budget(real_model):
    model, tokenizer = real_model
    ids = _ids(tokenizer, passkey_prompt(10, 0.5, 12345))
    plan = polykv.compile("layers 0-1: full decode streaming@280; *: snapkv@128 decode streaming@150(sink=4)", model)
    cache = plan.make_cache()
    model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False, **cache_argument(model, cache))
    lengths = cache.layer_lengths()
    assert ids.shape[1] + 59 > 280
    assert lengths[:2] == [280, 280] and set(lengths[2:]) == {150}
    assert cache.get_seq_length() == ids.shape[1] + 59
    assert cache.nbytes() < cache.full_nbytes() / 2


def test_validate_against_the_model_directory():
    location = polykv.model.default_model_location()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "polykv.cli",
            "validate",
            str(ROOT / "examples/llama-3.1-8b-512.pkv"),
            "--model",
            str(location.directory),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    assert "this spec is written for 32 layers, but the model (SmolLM2-135M-Instruct) has 30" in result.stderr


@pytest.mark.heavy
def test_the_main_command_with_and_without_static_decoding(real_model):
    """The main job with a fixed spec (28 of 30 layers at 256 tokens), then with ``--static``, which decodes
    with fixed-shape steps (eager on the CPU): the same answer and report. (The README's own command, a
    routed spec, is run by the docs' tests, and routed static decoding by test_static_decoding.)"""
    command = [sys.executable, "-m", "polykv.cli", "generate", "--spec", "layers 0-1: full; *: snapkv@256"]
    command += ["--prompt-file", str(ROOT / "examples/prompts/passkey-1k.txt"), "--max-new-tokens", "8"]
    runs = [
        subprocess.run(command + extra, capture_output=True, text=True, timeout=600) for extra in ([], ["--static"])
    ]
    for result in runs:
        assert result.returncode == 0, result.stderr
    (answer, _, report), (static_answer, _, static_report) = (run.stdout.partition("\n\n") for run in runs)
    assert "72514" in answer
    assert '2-29    snapkv@256(window=32, kernel=7, pooling="max")  256 of 1027' in report
    assert "0-1     full" in report and "1027 of 1027" in report
    assert "% saved)" in report and "time: load" in report
    assert "prefill 1027 tokens" in runs[0].stderr  # the progress bar
    assert static_answer == answer
    kept = [text.partition("\ntime: ")[0] for text in (report, static_report)]
    assert kept[0] == kept[1]  # kept tokens and memory
    generated = [re.search(r"\((\d+) tokens", text).group(1) for text in (report, static_report)]
    assert generated[0] == generated[1]  # both stop at the end-of-sequence token
    assert ("static decoding: set-up " in static_report) == (int(generated[1]) > 3)  # replayed steps, if any


@pytest.fixture(scope="module", params=["float32", "bfloat16", "float16"])
def cuda_model(real_model, request):
    model, tokenizer = real_model
    on_gpu = copy.deepcopy(model).to("cuda", getattr(torch, request.param))
    yield on_gpu, tokenizer
    del on_gpu
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_on_cuda_a_full_budget_is_the_full_cache_and_a_small_one_still_answers(cuda_model):
    model, tokenizer = cuda_model
    ids = _ids(tokenizer, passkey_prompt(40, 0.3, 60221)).to("cuda")
    options = {"max_new_tokens": 8, "do_sample": False, "output_logits": True, "return_dict_in_generate": True}
    full = model.generate(ids, **cache_argument(model, DynamicCache()), **options)
    wide = model.generate(
        ids, **cache_argument(model, polykv.compile("layers *: snapkv@2000", model).make_cache()), **options
    )
    if model.dtype == torch.float32:
        assert torch.equal(wide.sequences, full.sequences)
        for ours, theirs in zip(wide.logits, full.logits, strict=True):
            assert torch.equal(ours, theirs)
    else:
        # In half precision, kernels round differently and are not run-to-run deterministic, and polykv
        # decodes without cuDNN (attention.CUDA_BACKENDS): compare with the full cache's own spread
        # between two runs and between those SDPA backends.
        again = model.generate(ids, **cache_argument(model, DynamicCache()), **options)
        with torch.nn.attention.sdpa_kernel(list(polykv.cache.attention.CUDA_BACKENDS)):
            other_kernel = model.generate(ids, **cache_argument(model, DynamicCache()), **options)

        def spread(run) -> float:
            return max((a - b).abs().max().item() for a, b in zip(run.logits, full.logits, strict=True))

        noise = max(spread(again), spread(other_kernel))
        drift = spread(wide)
        assert drift <= 2 * noise + 0.02, (drift, noise)
    cache = polykv.compile("layers 0-1: full; *: snapkv@256", model).make_cache()
    out = model.generate(ids, max_new_tokens=8, do_sample=False, **cache_argument(model, cache))
    assert "60221" in tokenizer.decode(out[0, ids.shape[1] :])
    assert cache.layer_lengths()[2] == 256 + 7
    assert all(layer.keys.is_cuda and layer.keys.dtype == model.dtype for layer in cache.layers)

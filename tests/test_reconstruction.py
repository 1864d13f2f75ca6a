"""Reconstruction scoring (kvzip): the scores of the published method, from any way a prompt arrives.

The reference below recomputes KVzip's scores the way its authors' code does, from outside polykv:
the model runs the prompt and then each repeat chunk on transformers' own cache, an attention
function records every layer's rotated queries and keys, and each repeating query's softmax over
the sinks, the chunk and the repeat so far gives the weights whose maximum (over queries and the
KV head's query heads) is a token's score.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

import polykv
from polykv import cache_argument
from polykv.cache.reconstruction import SINKS, Reconstruction
from polykv.harness.capture import capture
from polykv.policy import Needs
from polykv.testing import prompt, tiny_model

REQUEST = Reconstruction(first=(5, 6, 7), later=(8, 9), turn=(10,), chunk=16, overlap=4)
_SEEN: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _recording(module, query, key, value, attention_mask, **kwargs):
    _SEEN[module.layer_idx] = (query.detach(), key.detach())
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register("recording_reference", _recording)
AttentionMaskInterface.register("recording_reference", ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class Words:
    """A tokenizer stand-in: one id per word, no chat template."""

    chat_template = None

    def encode(self, text, add_special_tokens=False):
        return [3 + len(word) for word in text.split()]


def reference_scores(model, ids: torch.Tensor, request: Reconstruction) -> list[torch.Tensor]:
    """KVzip's scores per layer (1, H, L), as the published method computes them, on a DynamicCache."""
    reference = tiny_model("llama", seed=7)
    reference.load_state_dict(model.state_dict())
    reference.set_attn_implementation("recording_reference")
    length = ids.shape[1]
    layers = reference.config.num_hidden_layers
    kv_heads, groups = reference.config.num_key_value_heads, reference.config.num_attention_heads // 2
    scores = [torch.zeros(1, kv_heads, length) for _ in range(layers)]
    with torch.no_grad():
        cache = DynamicCache(config=reference.config)
        reference(ids, **cache_argument(reference, cache))
        for start, end in request.chunks(length):
            repeat, mask, positions = request.inputs(ids, torch.ones_like(ids), start, end)
            reference(repeat, attention_mask=mask, position_ids=positions, **cache_argument(reference, cache))
            new = repeat.shape[1]
            for layer in range(layers):
                query, key = _SEEN[layer]
                sink = min(SINKS, start)
                chosen = torch.cat([key[:, :, :sink], key[:, :, start:end], key[:, :, -new:]], dim=2)
                grouped = query.view(1, kv_heads, groups, new, -1)
                logits = torch.einsum("bhgnd,bhkd->bhgnk", grouped, chosen) / math.sqrt(query.shape[-1])
                causal = torch.ones(new, new, dtype=torch.bool).tril()
                logits[..., -new:] = logits[..., -new:].masked_fill(~causal, float("-inf"))
                weights = torch.softmax(logits, dim=-1)[..., sink : sink + end - start]
                scores[layer][..., start:end] = weights.amax(dim=(2, 3))
            cache.crop(-new)
    return scores


def test_the_scores_are_the_published_methods():
    model = tiny_model("llama", seed=7)
    polykv.prepare_model(model)
    ids = prompt(40, seed=3)
    captured = capture(model, ids, needs=Needs(reconstruction=True), reconstruction=REQUEST)
    expected = reference_scores(model, ids, REQUEST)
    for layer, scores in zip(captured.layers, expected):
        torch.testing.assert_close(layer.reconstruction_scores, scores, rtol=1e-4, atol=1e-6)
    assert all(bool((layer.reconstruction_scores > 0).all()) for layer in captured.layers)


@pytest.mark.parametrize("way", ["generate", "chunked generate", "forward", "prompt in chunks", "declared length"])
def test_kvzip_keeps_the_same_tokens_however_the_prompt_arrives(way):
    model = tiny_model("llama", seed=7)
    plan = polykv.compile("layers 0: full; *: kvzip@12", model, tokenizer=Words())
    ids = prompt(40, seed=3)
    whole = plan.make_cache()
    with torch.no_grad():
        model(ids, **polykv.cache_argument(model, whole))
    cache = plan.make_cache(prompt_length=40) if way == "declared length" else plan.make_cache()
    options = polykv.cache_argument(model, cache)
    with torch.no_grad():
        if way.endswith("generate"):
            chunk = 7 if way.startswith("chunked") else None
            model.generate(ids, max_new_tokens=1, do_sample=False, prefill_chunk_size=chunk, **options)
        elif way == "forward":
            model(ids, **options)
        elif way == "prompt in chunks":
            with cache.prompt():
                for start in range(0, 40, 13):
                    model(ids[:, start : start + 13], **options)
        else:
            for start in range(0, 40, 13):
                model(ids[:, start : start + 13], **options)
    assert cache.layer_lengths() == whole.layer_lengths() == [40, 12, 12, 12]
    for ours, theirs in zip(cache.layers[1:], whole.layers[1:]):
        assert torch.equal(ours.positions, theirs.positions)


def test_kvzip_scores_a_padded_row_as_it_scores_it_alone():
    model = tiny_model("llama", seed=7)
    plan = polykv.compile("layers 0: full; *: kvzip@12", model, tokenizer=Words())
    long, short = prompt(40, seed=3)[0], prompt(30, seed=4)[0]
    batch = torch.stack([long, torch.cat([torch.zeros(10, dtype=torch.long), short])])
    mask = torch.stack([torch.ones(40), torch.cat([torch.zeros(10), torch.ones(30)])]).long()
    together = plan.make_cache()
    model.generate(batch, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0,
                   **polykv.cache_argument(model, together))  # fmt: skip
    alone = plan.make_cache()
    model.generate(short[None], max_new_tokens=1, do_sample=False, **polykv.cache_argument(model, alone))
    for ours, theirs in zip(together.layers[1:], alone.layers[1:]):
        assert torch.equal(ours.positions[1] - 10, theirs.positions[0])


def test_the_repeat_leaves_the_cache_holding_the_prompt():
    model = tiny_model("llama", seed=7)
    plan = polykv.compile("layers 0: full; *: kvzip@12", model, tokenizer=Words())
    cache = plan.make_cache()
    ids = prompt(40, seed=3)
    out = model.generate(ids, max_new_tokens=5, do_sample=False, **polykv.cache_argument(model, cache))
    assert cache.get_seq_length() == 44 and cache.layer_lengths() == [44, 16, 16, 16]
    assert out.shape == (1, 45)


def test_the_repeat_leaves_no_room_behind_in_a_layer_kept_whole():
    """The repeat grows every layer's storage by a chunk of the prompt; a layer kept whole gives it back."""
    model = tiny_model("llama", seed=7)
    plan = polykv.compile("layers 0: full; *: kvzip@12", model, tokenizer=Words())
    cache = plan.make_cache()
    with torch.no_grad():
        model(prompt(300, seed=3), **polykv.cache_argument(model, cache))
    assert cache.layers[0].storage.capacity == cache.layers[0].storage.size == 300


def test_kvzip_without_a_tokenizer_says_what_it_needs():
    with pytest.raises(polykv.ArgumentError, match="tokenizer=tokenizer"):
        polykv.compile("*: kvzip@12", tiny_model("llama"))


def test_the_request_follows_kvzips_wording_and_the_chat_template():
    class Chat(Words):
        chat_template = "set"

        def apply_chat_template(self, messages, add_generation_prompt, tokenize):
            return f"<user>{messages[0]['content']}</user><assistant>"

    request = Reconstruction.for_tokenizer(Chat())
    assert request.first == tuple(Words().encode("\n\nRepeat the previous context exactly."))
    assert request.turn == tuple(Words().encode("</user><assistant>"))
    assert Reconstruction.for_tokenizer(Words()).turn == tuple(Words().encode("\n"))

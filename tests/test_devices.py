"""A model split across devices: each layer's plan and cache storage live on that layer's device."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import polykv
from polykv import cache_argument
from polykv.testing import prompt, tiny_model

SPEC = "layers 0: full; *: snapkv@12(window=4)"


def test_a_plan_records_each_layers_own_device():
    model = tiny_model("llama", layers=4)
    model.model.layers[2:].to("meta")  # placed elsewhere, as device_map places a split model
    plan = polykv.compile(SPEC, model)
    assert [layer.device for layer in plan.layers] == ["cpu", "cpu", "meta", "meta"]
    assert polykv.Plan.from_json(plan.to_json()).layers[3].device == "meta"


def test_a_cache_layer_refuses_keys_from_another_device_than_its_own():
    model = tiny_model("llama", layers=2)
    plan = polykv.compile(SPEC, model)
    cache = plan.make_cache()
    ids = prompt(20)
    model(ids, **cache_argument(model, cache))
    layer = cache.layers[1]
    keys = torch.zeros(1, model.config.num_key_value_heads, 1, layer.head_dim, device="meta")
    with pytest.raises(
        polykv.CacheError, match="holds 2 KV heads of size 16 on cpu, but received 2 of size 16 on meta"
    ):
        layer.update(keys, keys, {})


def test_hooks_that_run_a_layer_elsewhere_decide_where_its_cache_lives():
    from accelerate import cpu_offload

    reference = tiny_model("llama", layers=4)
    hooked = tiny_model("llama", layers=4)
    cpu_offload(hooked.model.layers[1], execution_device=torch.device("cpu"))  # weights on meta, runs on the CPU
    plan = polykv.compile(SPEC, hooked)
    assert [layer.device for layer in plan.layers] == ["cpu"] * 4
    ids = prompt(40, batch=2, seed=1)
    options = {"max_new_tokens": 6, "do_sample": False}
    cache = plan.make_cache()
    ours = hooked.generate(ids, **cache_argument(hooked, cache), **options)
    assert torch.equal(
        ours,
        reference.generate(ids, **cache_argument(reference, polykv.compile(SPEC, reference).make_cache()), **options),
    )
    assert cache.layer_lengths() == [45, 17, 17, 17]


@pytest.mark.gpu
def test_layers_offloaded_to_the_cpu_keep_their_cache_where_they_compute():
    from accelerate import dispatch_model

    reference = tiny_model("llama", layers=4)
    split = tiny_model("llama", layers=4)
    device_map = {
        "model.embed_tokens": 0,
        "model.layers.0": "cpu",
        "model.layers.1": "cpu",
        "model.layers.2": 0,
        "model.layers.3": 0,
        "model.norm": 0,
        "model.rotary_emb": 0,
        "lm_head": 0,
    }
    split = dispatch_model(split, device_map=device_map)
    plan = polykv.compile(SPEC, split)
    # accelerate keeps the weights of "cpu" layers on the host and runs them on the GPU: so does the cache
    assert [layer.device for layer in plan.layers] == ["cuda:0"] * 4
    ids = prompt(40, batch=2, seed=1)
    options = {"max_new_tokens": 6, "do_sample": False}
    cache = plan.make_cache()
    ours = split.generate(ids.to("cuda"), **cache_argument(split, cache), **options)
    theirs = reference.generate(
        ids, **cache_argument(reference, polykv.compile(SPEC, reference).make_cache()), **options
    )
    assert torch.equal(ours.cpu(), theirs)
    assert [layer.keys.device.type for layer in cache.layers] == ["cuda"] * 4
    assert cache.layer_lengths() == [45, 17, 17, 17]
    full = split.generate(ids.to("cuda"), **cache_argument(split, DynamicCache(config=split.config)), **options)
    assert full.shape == ours.shape

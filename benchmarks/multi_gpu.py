"""A model split across GPUs: each layer's cache on its layer's device, no cache copies between them.

    python benchmarks/multi_gpu.py                 # needs two or more CUDA devices

1. Exactness: a small Llama-shaped model (random weights, fp32) split layer-wise over the GPUs with
   ``device_map`` generates the same tokens with a compressing spec as on one GPU.
2. Copies: the CUDA copies between devices during decoding steps, counted with the profiler, with
   polykv's cache and with transformers' DynamicCache (the hidden state crosses at each split; the
   cache adds nothing if the counts match).
3. Routing: ``budget 128; layers *: auto@auto`` on the bundled model (float32) split over the
   GPUs: the same tokens as on one GPU, and each device's cache bytes as the resolved plan says.
4. Memory: an 8B-shaped model (LLaMA-3.1-8B geometry, random weights, bf16) split with
   ``device_map="auto"``, a 32k-token prompt and ``layers 0-1: full; *: snapkv@512``: each device's
   cache bytes against what the plan predicts for the layers placed there.

Prints what it measured and writes benchmarks/results/multi_gpu.json (the kept run: multi_gpu_2xh200.json).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import torch
from shapes import LLAMA_8B, llama_8b
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import polykv
from polykv.model.describe import cache_argument

RESULTS = Path(__file__).parent / "results"
SPEC = "layers 0-1: full; *: snapkv@512"


def split_map(layers: int, devices: int) -> dict[str, int]:
    """Layer i on device i * devices // layers; embeddings on the first device, the head on the last."""
    mapping = {"model.embed_tokens": 0, "model.rotary_emb": 0}
    mapping.update({f"model.layers.{i}": i * devices // layers for i in range(layers)})
    mapping.update({"model.norm": devices - 1, "lm_head": devices - 1})
    return mapping


def small_model(seed: int = 0) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=256, intermediate_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def exactness(devices: int) -> dict:
    from accelerate import dispatch_model

    spec = "layers 0-1: full; *: snapkv@64(window=8)"
    ids = torch.randint(1, 1000, (2, 600), generator=torch.Generator().manual_seed(1))
    options = {"max_new_tokens": 16, "do_sample": False}
    single = small_model().to("cuda:0")
    plan = polykv.compile(spec, single)
    expected = single.generate(ids.to("cuda:0"), **cache_argument(single, plan.make_cache()), **options).cpu()
    split = dispatch_model(small_model(), device_map=split_map(8, devices))
    plan = polykv.compile(spec, split)
    cache = plan.make_cache()
    got = split.generate(ids.to("cuda:0"), **cache_argument(split, cache), **options).cpu()
    placed = [str(layer.keys.device) for layer in cache.layers]
    return {
        "same_tokens": bool(torch.equal(got, expected)),
        "plan_devices": [layer.device for layer in plan.layers],
        "cache_devices": placed,
        "cache_where_planned": placed == [layer.device for layer in plan.layers],
        "copies": copies_per_step(split, plan, ids),
    }


def copies_per_step(model, plan, ids, steps: int = 8) -> dict:
    """Cross-device CUDA copies per decoding step, with polykv's cache and with DynamicCache."""
    from torch.profiler import ProfilerActivity, profile

    found = {}
    for name, make in (("polykv", plan.make_cache), ("DynamicCache", lambda: DynamicCache(config=model.config))):
        cache = make()
        with torch.no_grad():
            logits = model(ids.to("cuda:0"), **cache_argument(model, cache)).logits
            token = logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as profiler:
                for _ in range(steps):
                    token = model(token.to("cuda:0"), **cache_argument(model, cache)).logits[:, -1:].argmax(-1)
                torch.cuda.synchronize()
        kinds = Counter(event.name for event in profiler.events() if "Memcpy" in event.name)
        found[name] = {kind: count / steps for kind, count in kinds.items()}
    return found


def memory(devices: int, context: int) -> dict:
    mapping = split_map(LLAMA_8B["num_hidden_layers"], devices)
    model = llama_8b(mapping)
    config = model.config
    plan = polykv.compile(SPEC, model)
    ids = torch.randint(1, config.vocab_size, (1, context), generator=torch.Generator().manual_seed(2))
    cache = plan.make_cache()
    with torch.no_grad():
        model(ids.to("cuda:0"), **cache_argument(model, cache), logits_to_keep=1)
    per_token = kv_bytes_per_token(config, bytes_per_value=2)  # bf16
    predicted, stored = kv_bytes_by_device(plan, cache, context, per_token)
    return {
        "context": context,
        "predicted_kv_bytes": predicted,
        "stored_kv_bytes": stored,
        "full_cache_kv_bytes": context * per_token * config.num_hidden_layers,
        "peak_allocated": {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(devices)},
    }


def routed(devices: int) -> dict:
    """``budget 128; layers *: auto@auto`` on the bundled model (its profile ships with polykv), split."""
    from accelerate import dispatch_model

    from polykv.tasks.tasks import passkey_prompt

    spec = "budget 128\nlayers *: auto@auto"
    single, tokenizer = polykv.load_default_model(device="cuda:0")
    ids = tokenizer(passkey_prompt(40, 0.4, 72514), return_tensors="pt").input_ids.to("cuda:0")
    options = {"max_new_tokens": 12, "do_sample": False}
    expected = single.generate(
        ids, **cache_argument(single, polykv.compile(spec, single).make_cache()), **options
    ).cpu()
    del single
    split, _ = polykv.load_default_model()
    mapping = split_map(split.config.num_hidden_layers, devices)
    mapping["lm_head"] = 0  # tied to the embeddings, which live on the first device
    split = dispatch_model(split, device_map=mapping)
    plan = polykv.compile(spec, split)
    cache = plan.make_cache()
    got = split.generate(ids, **cache_argument(split, cache), **options).cpu()
    predicted, stored = kv_bytes_by_device(
        plan,
        cache,
        ids.shape[1],
        kv_bytes_per_token(split.config, bytes_per_value=4),  # float32
        appended=options["max_new_tokens"] - 1,  # tokens generated after the prefill
    )
    return {
        "spec": spec,
        "same_tokens": bool(torch.equal(got, expected)),
        "answer": tokenizer.decode(got[0, ids.shape[1] :]),
        "plan_devices": sorted(Counter(layer.device for layer in plan.layers).items()),
        "predicted_kv_bytes": predicted,
        "stored_kv_bytes": stored,
    }


def kv_bytes_per_token(config, bytes_per_value: int) -> int:
    """Keys and values of one token in one layer, from the model's geometry."""
    return 2 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * bytes_per_value


def kv_bytes_by_device(plan, cache, prompt_length: int, per_token: int, appended: int = 0) -> tuple[dict, dict]:
    """Per device: the key/value bytes the plan (resolved for the prompt) gives its layers, and what the
    cache's layers hold (batch 1)."""
    predicted, stored = Counter(), Counter()
    for layer_plan, layer in zip(plan.resolved(prompt_length).layers, cache.layers):
        budget = layer_plan.prefill.budget
        kept = prompt_length if budget is None else min(prompt_length, budget.tokens(prompt_length))
        predicted[layer_plan.device] += (kept + appended) * per_token
        stored[str(layer.keys.device)] += layer.keys.nbytes + layer.values.nbytes
    return dict(predicted), dict(stored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    devices = torch.cuda.device_count()
    if devices < 2:
        raise SystemExit(f"needs two or more CUDA devices, found {devices}")
    result = {"devices": [torch.cuda.get_device_name(i) for i in range(devices)], "torch": torch.__version__}
    result["exactness"] = exactness(devices)
    print(json.dumps(result["exactness"], indent=1))
    result["routed"] = routed(devices)
    print(json.dumps(result["routed"], indent=1))
    result["memory"] = memory(devices, args.context)
    print(json.dumps(result["memory"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multi_gpu.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out / 'multi_gpu.json'}")


if __name__ == "__main__":
    main()

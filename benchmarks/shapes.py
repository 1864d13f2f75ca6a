"""Models for the GPU benchmarks: published shapes with random weights built directly on the GPU,
the bundled model, and a tiny random model for the test suite's smoke runs on the CPU."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

#: LLaMA-3.1-8B's geometry: 32 layers, 32 query / 8 KV heads of 128, 128k vocabulary.
LLAMA_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
}


def llama_8b(
    device_map: dict[str, int] | None = None, attention: str = "sdpa", layers: int | None = None
) -> LlamaForCausalLM:
    """An 8B-shaped Llama with random bf16 weights; ``device_map`` (module prefix -> GPU) splits it; ``layers``
    keeps that many of its 32 layers (a step's cost grows linearly with them)."""
    config = LlamaConfig(**{**LLAMA_8B, "num_hidden_layers": layers or LLAMA_8B["num_hidden_layers"]})
    config._attn_implementation = attention
    with torch.device("meta"):  # no weights yet: they are made on their devices below
        model = LlamaForCausalLM(config)
    device_map = device_map or {"": 0}
    torch.manual_seed(0)
    for name, module in model.named_modules():
        owners = [prefix for prefix in device_map if prefix in ("", name) or name.startswith(prefix + ".")]
        if not owners:
            continue
        device = f"cuda:{device_map[max(owners, key=len)]}"  # the most specific entry decides
        for key, parameter in list(module.named_parameters(recurse=False)):
            data = torch.empty(parameter.shape, dtype=torch.bfloat16, device=device).normal_(0, 0.02)
            setattr(module, key, torch.nn.Parameter(data, requires_grad=False))
    first = device_map.get("model.rotary_emb", device_map.get("", 0))
    # Made on the CPU and moved: transformers 5.17 warns about its device argument (a FutureWarning gone in 5.18).
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(f"cuda:{first}")
    if set(device_map) != {""}:
        from accelerate import dispatch_model

        model = dispatch_model(model, device_map=device_map)
    return model.eval()


#: What ``load`` and the scripts' ``--model`` accept.
MODELS = ("llama-8b", "bundled", "tiny")


def load(name: str) -> torch.nn.Module:
    """``llama-8b`` (random bf16 weights, on the GPU), ``bundled`` (the real small model, float32, on the
    GPU if there is one) or ``tiny`` (4 random layers of width 64 on the CPU: a script's smoke run in
    seconds), prepared for polykv by the benchmarks' ``compile`` calls."""
    if name == "llama-8b":
        return llama_8b()
    import polykv

    if name == "tiny":
        return polykv.testing.tiny_model("llama", max_position_embeddings=8192)

    model, _ = polykv.load_default_model(device="cuda" if torch.cuda.is_available() else "cpu")
    return model

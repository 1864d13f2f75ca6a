"""Tiny random models of every decoder family polykv wraps: real architectures, seconds to run.

Random weights (seeded), a vocabulary of 128, 4 layers, 4 query heads over 2 KV heads (GQA).
Families with sliding-window layers get a window of 8, so prompts of a few dozen tokens already
exercise it.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from polykv.model.describe import cache_argument

if TYPE_CHECKING:
    from transformers import PreTrainedModel

#: The window of every sliding-window layer of these models.
SLIDING_WINDOW = 8
#: Family -> (config class, model class, extra config) in transformers.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2-sliding": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 2},
    ),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": SLIDING_WINDOW}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "phi3-sliding": ("Phi3Config", "Phi3ForCausalLM", {"sliding_window": SLIDING_WINDOW}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {"sliding_window": SLIDING_WINDOW, "head_dim": 16}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {"sliding_window": SLIDING_WINDOW, "head_dim": 16}),
}
#: Families that transformers runs only with eager attention (Gemma 2 soft-caps its logits).
EAGER_ONLY = frozenset({"gemma2"})
SHAPE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_model(
    family: str = "llama",
    attention: str = "sdpa",
    *,
    layers: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    **config: object,
) -> PreTrainedModel:
    """A tiny random ``family`` model in eval mode (``attention`` is sdpa or eager); ``config`` overrides sizes."""
    import transformers

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; families: {', '.join(FAMILIES)}")
    config_name, model_name, extra = FAMILIES[family]
    model_config = getattr(transformers, config_name)(**{**SHAPE, "num_hidden_layers": layers, **extra, **config})
    model_config._attn_implementation = "eager" if family in EAGER_ONLY else attention
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(model_config).to(device=device, dtype=dtype).eval()


class WordTokenizer:
    """A stand-in tokenizer for tiny models: one id per word (3 + its length), no chat template.

    Enough for what polykv asks of a tokenizer when a policy scores by reconstruction.
    """

    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [3 + min(len(word), 100) for word in text.split()]


def saved_small_model(folder: Path, *, layers: int) -> Path:
    """A random Llama of ``layers`` layers and 512 positions with the bundled model's tokenizer (and chat
    template), saved in ``folder``: a model the CLI loads in a second. Needs the bundled model installed."""
    from transformers import AutoTokenizer

    from polykv.model.load import default_model_location

    location = default_model_location()
    tokenizer = AutoTokenizer.from_pretrained(location.directory, **location.loading_arguments())
    model = tiny_model(
        "llama",
        layers=layers,
        max_position_embeddings=512,
        hidden_size=96,
        intermediate_size=128,
        num_attention_heads=6,
        vocab_size=len(tokenizer),
    )
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def prompt_lengths(budget: int) -> list[int]:
    """Prompt lengths at the edges of ``budget``: 1, budget - 1, budget and budget + 1 (those >= 1)."""
    return sorted({length for length in (1, budget - 1, budget, budget + 1) if length >= 1})


def prompt(length: int, *, batch: int = 1, seed: int = 0, vocabulary: int = 128) -> torch.Tensor:
    """Random token ids (B, length), avoiding the special ids 0-2."""
    return torch.randint(3, vocabulary, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def greedy_by_forwards(
    model: torch.nn.Module, cache, ids: torch.Tensor, new: int, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``ids`` (B, L) and ``new`` greedy tokens, one ordinary forward at a time: what ``model.generate``
    does, without stopping at an end-of-sequence token (a reference for other decoding paths)."""
    from polykv.cache.positions import prompt_positions

    mask = torch.ones_like(ids) if attention_mask is None else attention_mask
    positions = prompt_positions(mask)
    out = ids
    for _ in range(new):
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, **cache_argument(model, cache)
        ).logits
        ids = logits[:, -1:].argmax(-1)
        out = torch.cat([out, ids], dim=1)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        positions = positions[:, -1:] + 1
    return out

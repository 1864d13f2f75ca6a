"""Where H2O's prefill time goes: one layer's attention kernels at a long prompt, against the full cache's.

    python benchmarks/h2o_prefill.py                       # one CUDA GPU: LLaMA-3.1-8B's attention shape, 32k tokens
    python benchmarks/h2o_prefill.py --lengths 8192,32768

A layer that accumulates attention (H2O, observed attention) needs each query's log-normaliser, so its
prefill runs an attention kernel that returns them, then a second pass over the query-key products
(``polykv/cache/kernels/column_sums.py``). The full cache's layer runs SDPA as transformers calls it.
For one layer (batch 1, 32 query / 8 KV heads of 128, bf16, random inputs), side by side, medians of
``--repeats`` synchronised runs:

- ``sdpa``: the full cache's attention (SDPA, causal, grouped-query; PyTorch picks the kernel);
- ``expand``: repeating the KV heads for the kernels that return log-normalisers;
- ``cudnn+lse`` and ``flash+lse``: those kernels, where they apply;
- ``column sums``: the fused column sums given the log-normalisers;
- ``polykv``: what the layer runs now (``attention_with_lse`` after the expansion, then the column sums).

The column sums need every causal query-key product once more, half an attention pass of work, so
a layer that accumulates costs at least 1.5 times ``sdpa``; over a whole prefill the floor is
1 + 0.5 x (the attention's share of the full cache's prefill).

Prints a table and writes benchmarks/results/h2o_prefill_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_speed import milliseconds

from polykv.cache.kernels import column_sums

RESULTS = Path(__file__).parent / "results"
QUERY_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128


def median_ms(function, repeats: int, device: torch.device) -> float:
    function()  # warm-up: first calls plan and compile
    return statistics.median(milliseconds(function, device)[1] for _ in range(repeats))


def kernel_with_lse(name: str, query, key, value, scaling):
    """``column_sums.attention_with_lse`` held to one kernel (cuDNN's or flash's), or None where it does not apply."""
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn" and enabled)
    try:
        params = torch.backends.cuda.SDPAParams(query, key, value, None, 0.0, True, False)
        backends = torch.backends.cuda
        usable = backends.can_use_cudnn_attention if name == "cudnn" else backends.can_use_flash_attention
        return column_sums.attention_with_lse(query, key, value, scaling) if usable(params) else None
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def layer_row(length: int, repeats: int, device: torch.device) -> dict:
    generator = torch.Generator(device=device).manual_seed(length)
    shape = (1, QUERY_HEADS, length, HEAD_DIM)

    def random(heads: int) -> torch.Tensor:
        return torch.randn(*shape[:1], heads, *shape[2:], generator=generator, device=device, dtype=torch.bfloat16)

    query, key, value = random(QUERY_HEADS), random(KV_HEADS), random(KV_HEADS)
    scaling, groups = HEAD_DIM**-0.5, QUERY_HEADS // KV_HEADS
    expanded_key, expanded_value = (t.repeat_interleave(groups, dim=1) for t in (key, value))
    row = {"length": length}
    row["sdpa"] = median_ms(
        lambda: F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True),
        repeats,
        device,
    )
    row["expand"] = median_ms(lambda: [t.repeat_interleave(groups, dim=1) for t in (key, value)], repeats, device)
    lse = None
    for name in ("cudnn", "flash"):
        found = kernel_with_lse(name, query, expanded_key, expanded_value, scaling)
        row[f"{name}+lse"] = None
        if found is not None:
            lse = found[1] if lse is None else lse
            row[f"{name}+lse"] = median_ms(
                lambda name=name: kernel_with_lse(name, query, expanded_key, expanded_value, scaling), repeats, device
            )
    grouped = query.view(1, KV_HEADS, groups, length, HEAD_DIM)
    real = torch.ones(1, length, dtype=torch.bool, device=device)
    row["column sums"] = median_ms(lambda: column_sums.column_sums(grouped, key, lse, real, scaling), repeats, device)
    chosen = row["cudnn+lse"] if row["cudnn+lse"] is not None else row["flash+lse"]
    row["polykv"] = row["expand"] + chosen + row["column sums"]
    row["ratio"] = row["polykv"] / row["sdpa"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="32768", help="comma-separated prompt lengths")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("h2o_prefill.py times CUDA kernels: run it on a GPU")
    device = torch.device("cuda")
    rows = [layer_row(int(length), args.repeats, device) for length in args.lengths.split(",")]
    name = torch.cuda.get_device_name(device)
    shape = f"{QUERY_HEADS}/{KV_HEADS} heads of {HEAD_DIM}"
    print(f"\none layer, batch 1, {shape}, bf16, {name}, torch {torch.__version__}\n")
    columns = ["sdpa", "expand", "cudnn+lse", "flash+lse", "column sums", "polykv"]
    print("| tokens | " + " | ".join(f"{c} ms" for c in columns) + " | polykv / sdpa |")
    print("| ---: " * (len(columns) + 2) + "|")
    for row in rows:
        cells = ["-" if row[c] is None else f"{row[c]:.2f}" for c in columns]
        print(f"| {row['length']} | " + " | ".join(cells) + f" | {row['ratio']:.2f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"h2o_prefill_{name.replace(' ', '-')}.json"
    meta = {"device": name, "torch": torch.__version__, "heads": [QUERY_HEADS, KV_HEADS, HEAD_DIM]}
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

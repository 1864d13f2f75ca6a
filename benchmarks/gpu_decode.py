"""Decoding on a GPU with static, graph-replayed steps: an 8B-shaped model, polykv against the full cache.

    python benchmarks/gpu_decode.py            # one CUDA device with 80 GB or more
    python benchmarks/gpu_decode.py --model tiny --length 640 --steps 2 --repeats 1 --batches 1,2
                                               # a smoke run on the CPU (the test suite's; no largest batch)

Every row is measured side by side in one run (warmed up, synchronised timers, medians):

- the memory bandwidth the device reaches (a large copy), and from it the bound of a step: the
  bytes it must read (weights but the input embedding, plus the keys and values it attends) over
  that bandwidth;
- decoding per token at batch 1 and 8 after 32k-token prompts (prefilled in chunks of 4k):
  transformers' DynamicCache driven by plain forwards (today's default), the full cache run by the
  same graph-replayed static step (``*: full``), and ``*: snapkv@512``;
- the same static step with a decode-time policy that evicts (``decode streaming@520``) and without,
  evicting one token at every step and (``eviction_slack`` 31) 32 tokens every 32 steps;
- the same static step with its forward compiled (``compile_step``: ``torch.compile`` fuses the
  kernels around the cache's), against the step as it is, for the full cache and ``*: snapkv@512``;
- the largest batch of 32k-token prompts that fits, for the full cache and for ``*: snapkv@512``
  prefilled in chunks: peak memory is measured at two batch sizes and the batch extrapolated
  linearly; decoding tokens/s is then measured at that batch. A compressed layer's decoding cost
  depends only on what it keeps, so its large batch is decoded after prompts of 1k tokens (kept: 512,
  as after 32k) to save the device time of a prefill of hundreds of 32k prompts.

``--rows`` picks parts (decode, eviction, compiled, largest). Prints a markdown table and writes
benchmarks/results/gpu_decode_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # big batches fragment less

import torch  # imported after the allocator setting
from gpu_speed import CHUNK, decode, machine, milliseconds, prefill, prompt
from shapes import MODELS, load

import polykv
from polykv.decoding import StaticDecoder
from polykv.model.describe import cache_argument

RESULTS = Path(__file__).parent / "results"


def bandwidth(device: torch.device) -> float:
    """Bytes per second a large copy on ``device`` moves (read plus write), median of 10."""
    source = torch.empty(1 << (31 if device.type == "cuda" else 28), dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    walls = [milliseconds(lambda: target.copy_(source), device)[0] for _ in range(12)]
    return 2 * source.nbytes / statistics.median(walls[2:]) * 1e3


def weight_bytes(model) -> int:
    """Bytes a decoding step reads of the weights: all but the input embedding (one row per token)."""
    embedding = model.get_input_embeddings().weight
    return sum(p.nbytes for p in model.parameters()) - embedding.nbytes


def static_decode(
    model, cache, batch: int, prompt_length: int, steps: int, repeats: int, slack: int = 0, compile_step: bool = False
) -> dict:
    """Per-step wall and GPU milliseconds (None on the CPU) of static decoding (graph-replayed on
    CUDA; its forward compiled with ``compile_step``), and the bytes it attends."""
    device = model.device
    token = torch.ones(batch, dtype=torch.long, device=device)
    with torch.no_grad():
        model(token[:, None], **cache_argument(model, cache), logits_to_keep=1)  # the ordinary first step
    positions = torch.full((batch, 1), prompt_length + 1, device=device)
    walls, gpus = [], []
    room = 1 + steps * (repeats + 1)
    with StaticDecoder(
        model, cache, token, positions, room=room, eviction_slack=slack, compile_step=compile_step
    ) as decoder:
        decoder.run(steps)  # warm-up
        attended = cache.nbytes()
        for _ in range(repeats):
            wall, gpu = milliseconds(lambda: decoder.run(steps, check_every=steps + 1), device)
            walls.append(wall / steps)
            gpus.append(None if gpu is None else gpu / steps)
    gpu_ms = None if gpus[0] is None else statistics.median(gpus)
    return {"wall_ms": statistics.median(walls), "gpu_ms": gpu_ms, "cache_bytes": attended}


def peak_gib(function) -> float:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    function()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def largest_batches(model, plans: dict, large_chunk: int) -> list[dict]:
    """The largest batch of 32k-token prompts for the full cache and snapkv@512, and tokens/s there."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    vocabulary = model.config.vocab_size
    entries = []
    for name, chunk in (("full", CHUNK), ("snapkv@512", large_chunk)):
        plan = plans[name]

        def run(batch: int, length: int = 32768, plan=plan, chunk=chunk) -> None:
            cache = prefill(model, plan, prompt(batch, length, vocabulary, model.device, seed=batch), chunk=chunk)
            static_decode(model, cache, batch, length, 4, 1)

        small, large = 1, 4
        peaks = {batch: peak_gib(lambda batch=batch: run(batch)) for batch in (small, large)}
        per_row = (peaks[large] - peaks[small]) / (large - small)
        fixed = peaks[small] - per_row * small
        fits = int((0.9 * total - fixed) // per_row)  # 10% left to the allocator
        length = 32768 if name == "full" else 1024
        ids = prompt(fits, length, vocabulary, model.device, seed=7)
        cache = prefill(model, plan, ids, chunk=chunk)
        speed = static_decode(model, cache, fits, length, 16, 2)  # little room: the batch fills the device
        del cache
        torch.cuda.empty_cache()
        entry = {
            "cache": name,
            "prefill_chunk": chunk,
            "peak_gib": peaks,
            "per_row_gib": per_row,
            "fixed_gib": fixed,
            "largest_batch": fits,
            "decoded_after_prompts_of": length,
            "step_ms": speed["wall_ms"],
            "tokens_per_s": fits / speed["wall_ms"] * 1e3,
            "device_memory_gib": total,
        }
        entries.append(entry)
        print(entry, flush=True)

    return entries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-chunk", type=int, default=512, help="prefill chunk of the compressed large batch")
    parser.add_argument("--model", choices=MODELS, default="llama-8b")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the decoding rows")
    parser.add_argument("--length", type=int, default=32768, help="prompt length")
    parser.add_argument("--rows", default="decode,eviction,compiled,largest", help="which parts to run")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = load(args.model)
    device, vocabulary, length = model.device, model.config.vocab_size, args.length
    plans = {
        name: polykv.compile(f"layers *: {name}", model)
        for name in ("full", "snapkv@512", "snapkv@512 decode streaming@520")
    }
    measured_bandwidth = bandwidth(device)
    weights = weight_bytes(model)
    result = {"bandwidth_gb_s": measured_bandwidth / 1e9, "weight_bytes": weights, "decode": [], "largest_batch": []}
    print(f"bandwidth {measured_bandwidth / 1e9:.0f} GB/s, weights read per step {weights / 1e9:.2f} GB", flush=True)

    def bound_ms(cache_bytes: int) -> float:
        return (weights + cache_bytes) / measured_bandwidth * 1e3

    rows = args.rows.split(",")
    for batch in map(int, args.batches.split(",")) if "decode" in rows else ():
        ids = prompt(batch, length, vocabulary, device, seed=batch)
        row = {"batch": batch}
        cache = prefill(model, None, ids, chunk=CHUNK)
        row["dynamic_wall_ms"], row["dynamic_gpu_ms"] = decode(model, cache, batch, args.steps)
        del cache
        for name in ("full", "snapkv@512"):
            cache = prefill(model, plans[name], ids, chunk=CHUNK)
            row[name] = static_decode(model, cache, batch, length, args.steps, args.repeats)
            row[name]["bound_ms"] = bound_ms(row[name]["cache_bytes"])
            del cache
        result["decode"].append(row)
        print(row, flush=True)

    ids = prompt(1, length, vocabulary, device, seed=3)
    evicting = {}
    runs = (("snapkv@512", 0), ("snapkv@512 decode streaming@520", 0), ("snapkv@512 decode streaming@520", 31))
    for name, slack in runs if "eviction" in rows else ():
        cache = prefill(model, plans[name], ids, chunk=CHUNK)
        key = name if not slack else f"{name}, eviction_slack {slack}"
        evicting[key] = static_decode(model, cache, 1, length, 2 * args.steps, args.repeats, slack)
    result["decode_eviction"] = evicting
    print(evicting, flush=True)

    compiled = []
    for batch in map(int, args.batches.split(",")) if "compiled" in rows else ():
        ids = prompt(batch, length, vocabulary, device, seed=batch)
        for name in ("full", "snapkv@512"):
            row = {"batch": batch, "cache": name}
            for compile_step in (False, True):
                cache = prefill(model, plans[name], ids, chunk=CHUNK)
                measured = static_decode(model, cache, batch, length, args.steps, args.repeats, 0, compile_step)
                measured["bound_ms"] = bound_ms(measured["cache_bytes"])
                row["compiled" if compile_step else "eager"] = measured
                del cache
            compiled.append(row)
            print(row, flush=True)
    result["compiled_step"] = compiled

    if device.type == "cuda" and "largest" in rows:
        result["largest_batch"] = largest_batches(model, plans, args.large_chunk)
    else:
        print("largest batch: measured on CUDA only (it reads the device's memory statistics)")

    device_name = machine(device, args.model)
    result.update({"device": device_name, "torch": torch.__version__, "prompt_length": length})
    print(f"\n{device_name}, torch {torch.__version__}, {measured_bandwidth / 1e9:.0f} GB/s measured\n")
    print(
        f"| decoding per token, {length}-token prompts | DynamicCache | full, static | snapkv@512, static "
        "| speed-up vs full static / vs DynamicCache | GPU ms vs bound |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in result["decode"]:
        full, snap = row["full"], row["snapkv@512"]
        against_bound = (
            "-"
            if snap["gpu_ms"] is None
            else (f"{snap['gpu_ms']:.2f} / {snap['bound_ms']:.2f} ({snap['gpu_ms'] / snap['bound_ms']:.2f}x)")
        )
        print(
            f"| batch {row['batch']} | {row['dynamic_wall_ms']:.1f} ms | {full['wall_ms']:.1f} ms | "
            f"{snap['wall_ms']:.1f} ms | {full['wall_ms'] / snap['wall_ms']:.2f}x / "
            f"{row['dynamic_wall_ms'] / snap['wall_ms']:.2f}x | {against_bound} |"
        )
    if evicting:
        without = evicting["snapkv@512"]["wall_ms"]
        for name, measured in evicting.items():
            if name != "snapkv@512":
                ratio = measured["wall_ms"] / without
                print(f"{name} vs without: {measured['wall_ms']:.2f} / {without:.2f} ms = {ratio:.3f}")
    if compiled:
        print(
            "\n| static step, compiled or not | step ms | compiled | speed-up | GPU ms vs bound, step "
            "| compiled |\n| --- | ---: | ---: | ---: | ---: | ---: |"
        )
    for row in compiled:
        eager, fused = row["eager"], row["compiled"]

        def against(measured: dict) -> str:
            gpu = measured["gpu_ms"]
            return "-" if gpu is None else f"{gpu:.2f} / {measured['bound_ms']:.2f} ({gpu / measured['bound_ms']:.2f}x)"

        print(
            f"| batch {row['batch']}, {row['cache']} | {eager['wall_ms']:.2f} | {fused['wall_ms']:.2f} "
            f"| {eager['wall_ms'] / fused['wall_ms']:.2f}x | {against(eager)} | {against(fused)} |"
        )
    if result["largest_batch"]:
        full, snap = result["largest_batch"]
        print(
            f"largest batch of 32k prompts: full {full['largest_batch']}, snapkv@512 {snap['largest_batch']} "
            f"({snap['largest_batch'] / full['largest_batch']:.1f}x); tokens/s {full['tokens_per_s']:.0f} vs "
            f"{snap['tokens_per_s']:.0f} ({snap['tokens_per_s'] / full['tokens_per_s']:.1f}x)"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_decode_{device_name.replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

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
- what users run, ``model.generate`` (greedy, the prompt prefilled at once), timed per step inside it:
  with transformers' DynamicCache (its default), with its StaticCache (``cache_implementation="static"``,
  which generate compiles with ``torch.compile``, mode ``reduce-overhead``, transformers' documented
  convention for fast decoding), and with a polykv cache (``*: snapkv@512``); against polykv's compiled
  static step with ``*: snapkv@512`` (the prompt prefilled in chunks);
- the largest batch of 32k-token prompts that fits, for the full cache and for ``*: snapkv@512``
  prefilled in chunks, each compressed as it comes (``compress_chunks=True``: memory bounded by the
  budget; by default a chunked prompt keeps what the whole prompt keeps, so it holds the whole prompt
  until its end): peak memory is measured at two batch sizes and the batch extrapolated
  linearly; decoding tokens/s is then measured at that batch. A compressed layer's decoding cost
  depends only on what it keeps, so its large batch is decoded after prompts of 1k tokens (kept: 512,
  as after 32k) to save the device time of a prefill of hundreds of 32k prompts.
- ``real`` (not run by default): a real batch of ``--real-rows`` 32k-token prompts for ``*: snapkv@512``,
  prefilled the same way and decoded: its peak memory against one row's (so the memory a row adds,
  measured rather than extrapolated), the prefill's wall time, and tokens/s after 32k-token prompts.

``--rows`` picks parts (decode, eviction, compiled, generate, largest, real). Prints a markdown table and writes
benchmarks/results/gpu_decode_<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import time
from pathlib import Path

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # big batches fragment less

import torch  # imported after the allocator setting
from gpu_speed import CHUNK, decode, machine, milliseconds, prefill, prompt, synchronize
from shapes import MODELS, load
from transformers import StoppingCriteria, StoppingCriteriaList

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


class StepClock(StoppingCriteria):
    """Notes when each of ``generate``'s steps ends (the device synchronised), and never stops it: a stopping
    criterion is called once per generated token, after the step's forward and token choice."""

    def __init__(self, device: torch.device):
        self.device = device
        self.ends: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        synchronize(self.device)
        self.ends.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_step_ms(model, ids: torch.Tensor, steps: int, warm_up: int = 8, **options) -> float:
    """Median milliseconds of one of ``model.generate``'s decoding steps, over ``steps`` steps after ``warm_up``
    (a compiled cache compiles and captures in its first steps)."""
    clock = StepClock(model.device)
    tokens = 1 + warm_up + steps
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=tokens,
            min_new_tokens=tokens,  # no early end at an end-of-sequence token
            do_sample=False,
            pad_token_id=0,
            stopping_criteria=StoppingCriteriaList([clock]),
            **options,
        )
    ends = clock.ends[warm_up:]  # the first end is the prefill's: from the last warm-up step's end on
    return statistics.median(later - earlier for earlier, later in itertools.pairwise(ends)) * 1e3


def forget_compiled_generate(model) -> None:
    """Free what a compiled StaticCache ``generate`` keeps: the cache (transformers before 5.2x keeps it on the
    model for the next call) and the CUDA graphs of its compiled forward, which hold their memory pool."""
    model.__dict__.pop("_cache", None)
    model.__dict__.pop("_compiled_call", None)
    torch._dynamo.reset()
    torch.cuda.empty_cache()  # a no-op on the CPU


def generate_rows(model, plans: dict, batches: list[int], length: int, steps: int, repeats: int) -> list[dict]:
    """Per batch: ``model.generate``'s step with a polykv cache, DynamicCache and StaticCache (compiled by
    generate, run last and then freed), and polykv's compiled static step, all after the same prompts. A
    ``generate`` that runs out of device memory (it prefills its prompts at once) is noted as None."""
    generate_step_ms(model, prompt(1, 128, model.config.vocab_size, model.device), 2, warm_up=2)  # warms the kernels
    rows = []
    for batch in batches:
        ids = prompt(batch, length, model.config.vocab_size, model.device, seed=batch)
        options = {  # generate's keywords, made when the run starts (a polykv cache is made fresh)
            "generate_polykv_ms": lambda: cache_argument(model, plans["snapkv@512"].make_cache()),
            "generate_dynamic_ms": dict,
            "generate_static_compiled_ms": lambda: {"cache_implementation": "static"},
        }
        row = {"batch": batch}
        for key, make_options in options.items():
            try:
                row[key] = generate_step_ms(model, ids, steps, **make_options())
            except torch.OutOfMemoryError:
                row[key] = None
                print(f"batch {batch}, {key}: out of device memory", flush=True)
            torch.cuda.empty_cache()  # the run's cache back to the device (a no-op on the CPU)
        forget_compiled_generate(model)
        cache = prefill(model, plans["snapkv@512"], ids, chunk=CHUNK)
        measured = static_decode(model, cache, batch, length, steps, repeats, compile_step=True)
        row["polykv_static_compiled_ms"] = measured["wall_ms"]
        del cache
        rows.append(row)
        print(row, flush=True)
    return rows


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
        compress_chunks = name != "full"  # what fits the most rows: each chunk compressed as it comes

        def run(batch: int, length: int = 32768, plan=plan, chunk=chunk, compress_chunks=compress_chunks) -> None:
            ids = prompt(batch, length, vocabulary, model.device, seed=batch)
            cache = prefill(model, plan, ids, chunk=chunk, compress_chunks=compress_chunks)
            static_decode(model, cache, batch, length, 4, 1)

        small, large = 1, 4
        peaks = {batch: peak_gib(lambda batch=batch: run(batch)) for batch in (small, large)}
        per_row = (peaks[large] - peaks[small]) / (large - small)
        fixed = peaks[small] - per_row * small
        fits = int((0.9 * total - fixed) // per_row)  # 10% left to the allocator
        length = 32768 if name == "full" else 1024
        ids = prompt(fits, length, vocabulary, model.device, seed=7)
        cache = prefill(model, plan, ids, chunk=chunk, compress_chunks=compress_chunks)
        speed = static_decode(model, cache, fits, length, 16, 2)  # little room: the batch fills the device
        del cache
        torch.cuda.empty_cache()
        entry = {
            "cache": name,
            "prefill_chunk": chunk,
            "compress_chunks": compress_chunks,
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


def real_batch(model, plan, rows: int, chunk: int) -> dict:
    """``rows`` prompts of 32k tokens prefilled for real (chunks compressed as they come) and decoded: the peak
    memory against one row's, and tokens/s (see the module docstring)."""
    length = 32768

    def prefilled(batch: int):
        ids = prompt(batch, length, model.config.vocab_size, model.device, seed=batch)
        return prefill(model, plan, ids, chunk=chunk, compress_chunks=True)

    one = peak_gib(lambda: static_decode(model, prefilled(1), 1, length, 4, 1))
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    cache = prefilled(rows)
    synchronize(model.device)
    prefill_s = time.perf_counter() - began
    speed = static_decode(model, cache, rows, length, 16, 2)
    synchronize(model.device)
    peak = torch.cuda.max_memory_allocated() / 2**30
    entry = {
        "cache": "snapkv@512",
        "rows": rows,
        "prompt_tokens": length,
        "prefill_chunk": chunk,
        "prefill_s": prefill_s,
        "peak_gib": peak,
        "one_row_peak_gib": one,
        "per_row_gib": (peak - one) / (rows - 1),
        "cache_gib": cache.nbytes() / 2**30,
        "step_ms": speed["wall_ms"],
        "tokens_per_s": rows / speed["wall_ms"] * 1e3,
    }
    print(entry, flush=True)
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timed block")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--large-chunk", type=int, default=512, help="prefill chunk of the compressed large batch")
    parser.add_argument("--model", choices=MODELS, default="llama-8b")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the decoding rows")
    parser.add_argument("--length", type=int, default=32768, help="prompt length")
    parser.add_argument("--rows", default="decode,eviction,compiled,generate,largest", help="which parts to run")
    parser.add_argument("--real-rows", type=int, default=128, help="rows of the real batch (--rows real)")
    parser.add_argument("--label", help="appended to the result's file name")
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
    result["generate"] = []
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

    batches = list(map(int, args.batches.split(",")))
    if "generate" in rows:
        result["generate"] = generate_rows(model, plans, batches, length, args.steps, args.repeats)

    if device.type == "cuda" and "largest" in rows:
        result["largest_batch"] = largest_batches(model, plans, args.large_chunk)
    elif "largest" in rows:
        print("largest batch: measured on CUDA only (it reads the device's memory statistics)")
    if device.type == "cuda" and "real" in rows:
        result["real_batch"] = real_batch(model, plans["snapkv@512"], args.real_rows, args.large_chunk)
    elif "real" in rows:
        print("real batch: measured on CUDA only (it reads the device's memory statistics)")

    device_name = machine(device, args.model)
    result.update({"device": device_name, "torch": torch.__version__, "prompt_length": length})
    print(f"\n{device_name}, torch {torch.__version__}, {measured_bandwidth / 1e9:.0f} GB/s measured\n")
    if result["decode"]:
        print(
            f"| decoding per token, {length}-token prompts | DynamicCache | full, static | snapkv@512, static "
            "| speed-up vs full static / vs DynamicCache | GPU ms vs bound |"
            "\n| --- | ---: | ---: | ---: | ---: | ---: |"
        )
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
    if result["generate"]:
        print(
            "\n| per token, batch | generate, DynamicCache | generate, StaticCache compiled | generate, polykv "
            "snapkv@512 | polykv static step compiled, snapkv@512 | faster than DynamicCache / StaticCache |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: |"
        )
    for row in result["generate"]:
        ours = row["polykv_static_compiled_ms"]
        runs = [row[key] for key in ("generate_dynamic_ms", "generate_static_compiled_ms", "generate_polykv_ms")]
        shown = ["out of memory" if ms is None else f"{ms:.2f} ms" for ms in runs]
        faster = ["-" if ms is None else f"{ms / ours:.2f}x" for ms in runs[:2]]
        print(f"| {row['batch']} | {' | '.join(shown)} | {ours:.2f} ms | {' / '.join(faster)} |")
    if result["largest_batch"]:
        full, snap = result["largest_batch"]
        print(
            f"largest batch of 32k prompts: full {full['largest_batch']}, snapkv@512 {snap['largest_batch']} "
            f"({snap['largest_batch'] / full['largest_batch']:.1f}x); tokens/s {full['tokens_per_s']:.0f} vs "
            f"{snap['tokens_per_s']:.0f} ({snap['tokens_per_s'] / full['tokens_per_s']:.1f}x)"
        )
    if "real_batch" in result:
        real = result["real_batch"]
        print(
            f"real batch of {real['rows']} 32k prompts, snapkv@512: peak {real['peak_gib']:.1f} GiB (one row "
            f"{real['one_row_peak_gib']:.1f}; {real['per_row_gib']:.3f} GiB a row), prefilled in "
            f"{real['prefill_s']:.0f} s, {real['tokens_per_s']:.0f} tokens/s"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_decode_{device_name.replace(' ', '-')}{f'_{args.label}' if args.label else ''}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

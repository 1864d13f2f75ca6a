"""Prefill and decoding on a GPU: an 8B-shaped model (random bf16 weights, SDPA), polykv against the full cache.

    python benchmarks/gpu_speed.py                       # one CUDA device, about 80 GB
    python benchmarks/gpu_speed.py --model tiny --lengths 640 --length 640 --steps 2 --repeats 1 --batches 1,2
                                                         # a smoke run on the CPU (the test suite's)

Rows, each measured side by side with the full cache (transformers' DynamicCache) in one run,
warmed up, synchronised timers, medians:

- prefill, ``*: snapkv@512`` and ``*: h2o@512`` at 8k and 32k tokens, batch 1, the runs taking
  turns (``--prefill-only`` stops after these);
- decoding per token, ``*: snapkv@512``, at batch 1 and batch 8 with 32k-token prompts (prefilled
  in chunks of 4k so the full cache's activations fit), against DynamicCache and against the full
  cache through polykv (``*: full``, the same decode machinery), and the GPU time of a step;
- decoding with a decode-time policy that evicts, ``*: snapkv@512 decode streaming@520``, against
  the same spec without it. These decoding rows use ``model`` forwards as ``generate`` does;
``gpu_decode.py`` measures graph-replayed static decoding.

Prints a markdown table and writes benchmarks/results/gpu_speed_<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import torch
from shapes import MODELS, load
from transformers import DynamicCache

import polykv
from polykv.model.describe import cache_argument

RESULTS = Path(__file__).parent / "results"
CHUNK = 4096


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU, where work is done when a call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device, model: str) -> str:
    """What a result file is named after: the GPU, or the model run on the CPU (a smoke run)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"{model}-cpu"


def milliseconds(function, device: torch.device) -> tuple[float, float | None]:
    """Wall and GPU milliseconds of ``function()`` (the GPU's by CUDA events; None on the CPU), the device
    synchronised before and after."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)] if device.type == "cuda" else None
    synchronize(device)
    began = time.perf_counter()
    if events:
        events[0].record()
    function()
    if events:
        events[1].record()
    synchronize(device)
    wall = (time.perf_counter() - began) * 1e3
    return wall, events[0].elapsed_time(events[1]) if events else None


def interleaved(runs: dict, repeats: int, device: torch.device) -> dict[str, float]:
    """Median wall seconds of each run, the runs taking turns (one warm-up round first), so that
    drifts of clock and temperature fall on all of them alike."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats + 1):
        for name, function in runs.items():
            wall, _ = milliseconds(function, device)
            if round_:
                seconds[name].append(wall / 1e3)
    return {name: statistics.median(values) for name, values in seconds.items()}


def prompt(batch: int, length: int, vocabulary: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(1, vocabulary, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids.to(device)


def prefill(model, plan, ids, chunk: int | None = None, compress_chunks: bool = False):
    """A cache holding the prompts ``ids``, fed in chunks of ``chunk`` tokens; ``compress_chunks`` compresses each
    chunk as it comes (memory bounded by the budget, not the prompt) instead of the whole prompt at its end."""
    if plan is None:
        cache = DynamicCache(config=model.config)
    else:
        cache = plan.make_cache(prompt_length=ids.shape[1], compress_chunks=compress_chunks)
    with torch.no_grad():
        step = chunk or ids.shape[1]
        for start in range(0, ids.shape[1], step):
            model(ids[:, start : start + step], **cache_argument(model, cache), logits_to_keep=1)
    return cache


def decode(model, cache, batch: int, steps: int) -> tuple[float, float | None]:
    """Median wall and GPU milliseconds (None on the CPU) of one greedy decoding step (after prefill)."""
    token = torch.ones(batch, 1, dtype=torch.long, device=model.device)

    def step() -> None:
        nonlocal token
        token = model(token, **cache_argument(model, cache)).logits[:, -1:].argmax(-1)

    with torch.no_grad():
        for _ in range(2):  # the first steps meet new shapes
            step()
        walls, gpus = zip(*(milliseconds(step, model.device) for _ in range(steps)))
    return statistics.median(walls), None if gpus[0] is None else statistics.median(gpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=32, help="decoding steps timed per row")
    parser.add_argument("--prefill-only", action="store_true", help="skip the ordinary decoding rows")
    parser.add_argument("--model", choices=MODELS, default="llama-8b")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the decoding rows")
    parser.add_argument("--lengths", default="8192,32768", help="prompt lengths of the prefill rows")
    parser.add_argument("--length", type=int, default=32768, help="prompt length of the decoding rows")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = load(args.model)
    device, vocabulary = model.device, model.config.vocab_size
    plans = {
        "full": polykv.compile("layers *: full", model),  # the full cache through polykv's decode machinery
        "snapkv@512": polykv.compile("layers *: snapkv@512", model),
        "h2o@512": polykv.compile("layers *: h2o@512", model),
        "snapkv@512 decode streaming@520": polykv.compile("layers *: snapkv@512 decode streaming@520", model),
    }
    rows = []

    for length in map(int, args.lengths.split(",")):
        ids = prompt(1, length, vocabulary, device)
        names = ("snapkv@512", "h2o@512")
        seconds = interleaved(
            {name: functools.partial(prefill, model, plans.get(name), ids) for name in ("full", *names)},
            args.repeats,
            device,
        )
        for name in names:
            rows.append(
                {"row": f"prefill {name}, {length} tokens", "full_s": seconds["full"], "polykv_s": seconds[name]}
            )
            print(rows[-1], flush=True)

    for batch in () if args.prefill_only else map(int, args.batches.split(",")):
        ids = prompt(batch, args.length, vocabulary, device, seed=batch)
        results = {}
        for name, plan in (("full", None), ("full via polykv", plans["full"]), ("snapkv@512", plans["snapkv@512"])):
            cache = prefill(model, plan, ids, chunk=CHUNK)
            results[name] = decode(model, cache, batch, args.steps)
            del cache
            if device.type == "cuda":
                torch.cuda.empty_cache()
        rows.append(
            {
                "row": f"decode snapkv@512, batch {batch}, {args.length} tokens",
                "full_ms": results["full"][0],
                "polykv_ms": results["snapkv@512"][0],
                "full_gpu_ms": results["full"][1],
                "polykv_gpu_ms": results["snapkv@512"][1],
                "full_via_polykv_ms": results["full via polykv"][0],
            }
        )
        print(rows[-1], flush=True)

    if not args.prefill_only:
        ids = prompt(1, args.length, vocabulary, device, seed=3)
        steps = {}
        for name in ("snapkv@512", "snapkv@512 decode streaming@520"):
            cache = prefill(model, plans[name], ids, chunk=CHUNK)
            steps[name] = decode(model, cache, 1, 2 * args.steps)
        rows.append(
            {
                "row": f"decode with streaming@520 eviction vs without, batch 1, {args.length} tokens",
                "without_ms": steps["snapkv@512"][0],
                "with_ms": steps["snapkv@512 decode streaming@520"][0],
                "without_gpu_ms": steps["snapkv@512"][1],
                "with_gpu_ms": steps["snapkv@512 decode streaming@520"][1],
            }
        )
        print(rows[-1], flush=True)

    device_name = machine(device, args.model)
    print(f"\n{device_name}, torch {torch.__version__}\n")
    print("| row | full cache | polykv | ratio |\n| --- | ---: | ---: | ---: |")
    for row in rows:
        if "full_s" in row:
            ratio = row["polykv_s"] / row["full_s"]
            print(f"| {row['row']} | {row['full_s']:.3f} s | {row['polykv_s']:.3f} s | {ratio:.2f} |")
        elif "full_ms" in row:
            print(
                f"| {row['row']} (wall) | {row['full_ms']:.1f} ms | {row['polykv_ms']:.1f} ms | "
                f"{row['polykv_ms'] / row['full_ms']:.2f} |"
            )
            if row["full_gpu_ms"] is not None:
                print(
                    f"| {row['row']} (GPU) | {row['full_gpu_ms']:.1f} ms | {row['polykv_gpu_ms']:.1f} ms | "
                    f"{row['polykv_gpu_ms'] / row['full_gpu_ms']:.2f} |"
                )
            print(
                f"| {row['row']} (wall), full cache through polykv | {row['full_via_polykv_ms']:.1f} ms | "
                f"{row['polykv_ms']:.1f} ms | {row['polykv_ms'] / row['full_via_polykv_ms']:.2f} |"
            )
        else:
            print(
                f"| {row['row']} (wall) | {row['without_ms']:.1f} ms | {row['with_ms']:.1f} ms | "
                f"{row['with_ms'] / row['without_ms']:.2f} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"gpu_speed_{device_name.replace(' ', '-')}.json"
    path.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

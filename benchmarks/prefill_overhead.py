"""Prefill time, decoding speed and cache memory: compressed caches against the full cache, in one run.

Runs the bundled model on passkey prompts of several lengths. For each prompt length and spec it
times the prefill (median of --repeats runs) and the generation of --new-tokens tokens, and
records the cache's bytes after prefill and the prefill's peak memory above what was held before it
(the CUDA allocator's peak on a GPU; the process's peak resident memory, reset before each prefill,
on the CPU). kvzip's row is the reconstruction pass: the prompt repeated against the whole cache
before eviction. Times are ratios to the full cache measured in the same run; quote absolute times
only from a GPU.

    python benchmarks/prefill_overhead.py                       # CPU, float32
    python benchmarks/prefill_overhead.py --device cuda --dtype bfloat16

Writes benchmarks/results/prefill_overhead_<device>.json and the PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import DynamicCache

import polykv
from polykv.model.describe import cache_argument
from polykv.tasks.tasks import passkey_prompt

SPECS = {
    "full cache": None,
    "snapkv@256": "layers 0-1: full; *: snapkv@256",
    "knorm@256": "layers 0-1: full; *: knorm@256",
    "h2o@256": "layers 0-1: full; *: h2o@256",
    "streaming@256": "layers 0-1: full; *: streaming@256",
    "observed@256": "layers 0-1: full; *: observed@256",
    "expected@256": "layers 0-1: full; *: expected@256",
    "kvzip@256": "layers 0-1: full; *: kvzip@256",
    "polykv, budget 128": "budget 128; layers *: auto@auto",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed runs per cell (the median is kept)")
    parser.add_argument("--filler", type=int, nargs="+", default=[20, 40, 80], help="passkey filler repeats")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()

    model, tokenizer = polykv.load_default_model(dtype=args.dtype, device=args.device)
    plans = {name: polykv.compile(spec, model, tokenizer=tokenizer) if spec else None for name, spec in SPECS.items()}
    rows = []
    for repeats in args.filler:
        ids = tokenizer(passkey_prompt(repeats, 0.5, 27182), return_tensors="pt").input_ids.to(model.device)
        _prefill(model, None, ids)  # warm-up
        timings = {name: {"prefill": [], "decode": [], "peak": []} for name in plans}
        for _ in range(args.repeats):  # specs interleaved, so drift in the machine's speed hits all alike
            for name, plan in plans.items():
                seconds, cache, peak = _prefill(model, plan, ids)
                timings[name]["prefill"].append(seconds)
                timings[name]["peak"].append(peak)
                timings[name]["bytes"] = _cache_bytes(cache)
                timings[name]["decode"].append(_decode(model, cache, ids, args.new_tokens))
        baseline = None
        for name, measured in timings.items():
            row = {
                "spec": name,
                "prompt_tokens": ids.shape[1],
                "prefill_s": statistics.median(measured["prefill"]),
                "decode_s": statistics.median(measured["decode"]),
                "cache_bytes": measured["bytes"],
                "prefill_peak_bytes": statistics.median(measured["peak"]),
            }
            baseline = baseline or row
            row["prefill_ratio"] = row["prefill_s"] / baseline["prefill_s"]
            row["decode_ratio"] = row["decode_s"] / baseline["decode_s"]
            row["memory_ratio"] = row["cache_bytes"] / baseline["cache_bytes"]
            row["peak_ratio"] = row["prefill_peak_bytes"] / baseline["prefill_peak_bytes"]
            rows.append(row)
            print(_line(row), flush=True)

    args.out.mkdir(exist_ok=True)
    meta = {
        "device": str(model.device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "new_tokens": args.new_tokens,
    }
    path = args.out / f"prefill_overhead_{args.device}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {path}")
    _plot(rows, path.with_suffix(".png"))


# Timed with synchronised perf_counter rather than torch.utils.benchmark: its timeit() warms up by
# running the statement twice more, and a prefill or a decoding step changes the cache it runs on.
def _prefill(model, plan, ids):
    """Seconds, the filled cache, and the peak memory the prefill took above what was held before it."""
    cache = plan.make_cache() if plan else DynamicCache()
    _sync(model)
    held = _reset_peak(model)
    started = time.perf_counter()
    with torch.no_grad():
        model(ids, **cache_argument(model, cache))
    _sync(model)
    seconds = time.perf_counter() - started
    return seconds, cache, _peak(model) - held


def _reset_peak(model) -> int:
    """Start a new peak-memory reading; returns what is held now."""
    if model.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident size restarts from now
    return _status_bytes("VmRSS")


def _peak(model) -> int:
    if model.device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return _status_bytes("VmHWM")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _decode(model, cache, ids, steps: int) -> float:
    """Seconds for ``steps`` greedy decoding steps on an already prefilled cache."""
    token = ids[:, -1:]
    _sync(model)
    started = time.perf_counter()
    with torch.no_grad():
        for _ in range(steps):
            token = model(token, **cache_argument(model, cache)).logits[:, -1:].argmax(-1)
    _sync(model)
    return time.perf_counter() - started


def _cache_bytes(cache) -> int:
    if isinstance(cache, polykv.PolyCache):
        return cache.nbytes()
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


def _sync(model) -> None:
    if model.device.type == "cuda":
        torch.cuda.synchronize()


def _line(row: dict) -> str:
    return (
        f"{row['prompt_tokens']:>6} tokens  {row['spec']:<18} "
        f"prefill {row['prefill_s']:7.3f} s (x{row['prefill_ratio']:.2f}, peak x{row['peak_ratio']:.2f})  "
        f"decode x{row['decode_ratio']:.2f}  cache {row['cache_bytes'] / 2**20:7.2f} MiB (x{row['memory_ratio']:.2f})"
    )


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (prefill, peak, memory) = plt.subplots(1, 3, figsize=(15, 4))
    for spec in dict.fromkeys(r["spec"] for r in rows):
        mine = [r for r in rows if r["spec"] == spec]
        lengths = [r["prompt_tokens"] for r in mine]
        prefill.plot(lengths, [r["prefill_ratio"] for r in mine], marker="o", label=spec)
        peak.plot(lengths, [r["peak_ratio"] for r in mine], marker="o", label=spec)
        memory.plot(lengths, [r["memory_ratio"] for r in mine], marker="o", label=spec)
    prefill.set(title="prefill time / full cache", xlabel="prompt tokens")
    peak.set(title="prefill peak memory / full cache", xlabel="prompt tokens")
    memory.set(title="cache memory / full cache", xlabel="prompt tokens")
    prefill.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

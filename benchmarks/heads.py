"""KV heads that keep different counts: memory and decoding speed against a layer-uniform plan of equal tokens.

    python benchmarks/heads.py                  # one CUDA GPU: the 8B shape (32 layers), 32k-token prompts
    python benchmarks/heads.py --model tiny --length 600 --average 64 --steps 2 --repeats 1
                                                # a smoke run on the CPU (the test suite's)

Two plans keep the same tokens per layer on average over its KV heads (``--average``, 512 by default):

- uniform: ``layers *: snapkv@A`` (every head keeps A);
- ragged: half the KV heads of every layer keep 1.5 A and the others 0.5 A, so each layer is a
  SplitLayer of two groups of heads.

Measured side by side in one run, at batch 1 and 8 (``--batches``):

- memory: the cache's bytes after prefill against the sum of the heads' budgets (keys, values and
  their positions) and against the uniform cache's bytes;
- decoding per token: median milliseconds of a greedy step through each cache, with plain forwards
  (the runs taking turns) and with static decoding (``StaticDecoder``: fixed shapes, each step a
  CUDA graph replay on a GPU; a ragged layer's groups keep their slots in one pool, which attention
  reads in one launch where the Triton kernels run), and with ``--compile-step`` also with the
  step's forward compiled.

Prints a markdown table and writes benchmarks/results/heads_<device>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from gpu_decode import static_decode
from gpu_speed import CHUNK, interleaved, machine, prefill, prompt
from shapes import MODELS, load

import polykv
from polykv.cache.kernels.decode_attention import available as kernels_available
from polykv.model.describe import cache_argument

RESULTS = Path(__file__).parent / "results"


def specs(average: int, kv_heads: int) -> dict[str, str]:
    """The two plans of equal stored tokens (see the module docstring)."""
    half = kv_heads // 2
    return {
        "uniform": f"layers *: snapkv@{average}",
        "ragged": f"layers * heads 0-{half - 1}: snapkv@{average * 3 // 2}; "
        f"layers * heads {half}-{kv_heads - 1}: snapkv@{average // 2}",
    }


def expected_bytes(plan: polykv.Plan, length: int, batch: int, head_dim: int, element: int) -> int:
    """What the heads' budgets cost: keys and values, and a 4-byte position per token of a head that evicted."""
    return sum(
        batch * tokens * (2 * head_dim * element + (4 if tokens < length else 0))
        for layer in plan.head_budgets(length)
        for tokens in layer
    )


def step_function(model, cache, batch: int):
    token = torch.ones(batch, 1, dtype=torch.long, device=model.device)

    def step() -> None:
        nonlocal token
        with torch.no_grad():
            token = model(token, **cache_argument(model, cache)).logits[:, -1:].argmax(-1)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="llama-8b")
    parser.add_argument("--length", type=int, default=32768, help="prompt tokens")
    parser.add_argument("--average", type=int, default=512, help="tokens per KV head on average")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps per timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile-step", action="store_true", help="also time the static step compiled")
    parser.add_argument("--label", default="", help="a suffix for the result's file name")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    model = load(args.model)
    device, config = model.device, model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    element = next(model.parameters()).element_size()
    plans = {name: polykv.compile(spec, model) for name, spec in specs(args.average, kv_heads).items()}
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        ids = prompt(batch, args.length, config.vocab_size, device)
        caches = {name: prefill(model, plan, ids, chunk=CHUNK) for name, plan in plans.items()}
        memory = {name: cache.nbytes() for name, cache in caches.items()}
        expected = {name: expected_bytes(plan, args.length, batch, head_dim, element) for name, plan in plans.items()}
        steps = {name: step_function(model, cache, batch) for name, cache in caches.items()}
        runs = {name: (lambda step=step: [step() for _ in range(args.steps)]) for name, step in steps.items()}
        seconds = interleaved(runs, args.repeats, device)
        del caches, steps, runs
        modes = {"static": False, "compiled": True} if args.compile_step else {"static": False}
        static = {
            (mode, name): static_decode(model, prefill(model, plan, ids, chunk=CHUNK), batch, args.length, args.steps,
                                        args.repeats, compile_step=compiled)["wall_ms"]
            for mode, compiled in modes.items()
            for name, plan in plans.items()
        }  # fmt: skip
        for name in plans:
            row = {
                "batch": batch,
                "plan": name,
                "spec": plans[name].spec.strip(),
                "cache_bytes": memory[name],
                "head_budget_bytes": expected[name],
                "over_budgets": memory[name] / expected[name] - 1,
                "over_uniform": memory[name] / memory["uniform"] - 1,
                "ms_per_token": seconds[name] / args.steps * 1e3,
                "vs_uniform": seconds[name] / seconds["uniform"],
            }
            for mode in modes:
                row[f"{mode}_ms_per_token"] = static[mode, name]
                row[f"{mode}_vs_uniform"] = static[mode, name] / static[mode, "uniform"]
            rows.append(row)
    columns = "".join(f" {mode} ms/token | vs uniform |" for mode in modes)
    print(f"| batch | plan | cache MiB | vs head budgets | vs uniform bytes | ms/token | vs uniform |{columns}")
    print("|---" * (7 + 2 * len(modes)) + "|")
    for row in rows:
        timed = "".join(f" {row[f'{mode}_ms_per_token']:.2f} | {row[f'{mode}_vs_uniform']:.3f}x |" for mode in modes)
        print(
            f"| {row['batch']} | {row['plan']} | {row['cache_bytes'] / 2**20:.1f} | {row['over_budgets']:+.2%} "
            f"| {row['over_uniform']:+.2%} | {row['ms_per_token']:.2f} | {row['vs_uniform']:.3f}x |{timed}"
        )
    meta = {
        "model": args.model,
        "device": machine(device, args.model),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "layers": config.num_hidden_layers,
        "kv_heads": kv_heads,
        "prompt_tokens": args.length,
        "average": args.average,
        "steps": args.steps,
        "repeats": args.repeats,
        "one_launch": kernels_available(device),  # ragged layers attend in one launch, else group by group
    }
    args.out.mkdir(parents=True, exist_ok=True)
    label = f"_{args.label}" if args.label else ""
    path = args.out / f"heads_{meta['device'].replace(' ', '-')}{label}.json"
    path.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

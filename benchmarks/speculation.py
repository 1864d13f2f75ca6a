"""Self-speculation: the bundled model drafts with a compressed cache and keeps what its full cache confirms.

    python benchmarks/speculation.py            # one CUDA device: 8k-token prompts, batches 1 to 64
    python benchmarks/speculation.py --quick    # a smoke run on the CPU (short prompts, batches 1 and 2)

For every batch, side by side in one run, greedy, after the same prompts (prose of the ``continue``
task, one document per row):

- plain full-cache decoding: ``speculative_generate`` with lookahead 0, so the same forwards and
  the same full cache, with no draft;
- self-speculation with each draft spec (``*: streaming@B`` against ``budget B; *: auto@auto``,
  the routed draft, at the same budget B) and each lookahead.

Each row gives decoding tokens/s (all rows of the batch, prefill excluded) and the speed-up over
plain decoding; the share of drafted tokens kept by the batch and by each row alone; tokens per
check of the full cache; whether the output is plain decoding's (rows equal); and the bound
speed-up: what a step that only reads memory would give at this acceptance, from the bytes each
step reads (weights, and the draft's or the full cache's keys and values). These forwards are
ordinary ones, so a small model's steps are mostly launch overhead and the measured speed-up sits
below the bound (see ``gpu_decode.py`` for what fixed-shape steps save).

Prints a markdown table; writes benchmarks/results/speculation_<machine>.json and a PNG.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import polykv
from polykv.tasks.tasks import make

RESULTS = Path(__file__).parent / "results"
SPECS = ("*: streaming@{budget}", "budget {budget}; *: auto@auto")


def prompts(tokenizer, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``batch`` documents of prose, ``length`` tokens each (the ``continue`` task's prompts)."""
    rows = [make("continue", tokenizer, length=length, seed=seed).prompt for seed in range(batch)]
    return torch.tensor(rows, device=device)


def weight_bytes(model) -> int:
    """Bytes a decoding step reads of the weights: all but the input embedding (one row per token)."""
    return sum(p.nbytes for p in model.parameters()) - model.get_input_embeddings().weight.nbytes


def run(model, ids, plan, lookahead: int, new_tokens: int) -> polykv.Speculation:
    return polykv.speculative_generate(model, ids, draft=plan, max_new_tokens=new_tokens, lookahead=lookahead)


def measure(model, tokenizer, args, device) -> list[dict]:
    weights = weight_bytes(model)
    plans = {spec.format(budget=args.budget): None for spec in args.specs}
    plans = {spec: polykv.compile(spec, model, tokenizer=tokenizer) for spec in plans}
    whole = polykv.compile("*: full", model)
    run(model, prompts(tokenizer, 1, 128, device), whole, 2, 4)  # warm-up
    rows = []
    for batch in args.batches:
        ids = prompts(tokenizer, batch, args.length, device)
        plain = run(model, ids, whole, 0, args.new_tokens)
        plain_rate = batch * (plain.tokens.shape[1] - ids.shape[1]) / plain.decode_seconds
        rows.append({"batch": batch, "spec": "plain", "lookahead": 0, "tokens_per_s": plain_rate, "speedup": 1.0})
        print(f"batch {batch}: plain {plain_rate:.1f} tokens/s", flush=True)
        for spec, plan in plans.items():
            for lookahead in args.lookaheads:
                result = run(model, ids, plan, lookahead, args.new_tokens)
                rate = batch * (result.tokens.shape[1] - ids.shape[1]) / result.decode_seconds
                full, draft = weights + result.full_nbytes, weights + result.draft_nbytes
                bound = result.tokens_per_step * full / (lookahead * draft + full)
                equal = (result.tokens == plain.tokens).all(dim=1).float().mean().item()
                row = {
                    "batch": batch,
                    "spec": spec,
                    "lookahead": lookahead,
                    "tokens_per_s": rate,
                    "speedup": rate / plain_rate,
                    "acceptance": result.acceptance,
                    "row_acceptance": result.row_acceptance,
                    "tokens_per_check": result.tokens_per_step,
                    "bound_speedup": bound,
                    "rows_equal": equal,
                    "full_cache_bytes": result.full_nbytes,
                    "draft_cache_bytes": result.draft_nbytes,
                }
                rows.append(row)
                print(
                    f"batch {batch}: {spec}, lookahead {lookahead}: {rate:.1f} tokens/s ({rate / plain_rate:.2f}x), "
                    f"accepted {result.acceptance:.2f} (rows alone {result.row_acceptance:.2f}), "
                    f"{result.tokens_per_step:.2f} per check, bound {bound:.2f}x, rows equal {equal:.2f}",
                    flush=True,
                )
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | draft | lookahead | tokens/s | speed-up | kept (batch / row) | tokens per check | bound | equal |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["spec"] == "plain":
            lines.append(f"| {row['batch']} | plain, full cache | 0 | {row['tokens_per_s']:.1f} | 1.00x | | 1.00 | | |")
            continue
        lines.append(
            f"| {row['batch']} | `{row['spec']}` | {row['lookahead']} | {row['tokens_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['acceptance']:.2f} / {row['row_acceptance']:.2f} | "
            f"{row['tokens_per_check']:.2f} | {row['bound_speedup']:.2f}x | {row['rows_equal']:.2f} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drafted = [row for row in rows if row["spec"] != "plain"]
    specs = list(dict.fromkeys(row["spec"] for row in drafted))
    figure, (speed, kept) = plt.subplots(1, 2, figsize=(11, 4))
    for spec in specs:
        mine = [row for row in drafted if row["spec"] == spec]
        batches = sorted({row["batch"] for row in mine})
        best = [max(r["speedup"] for r in mine if r["batch"] == b) for b in batches]
        bound = [max(r["bound_speedup"] for r in mine if r["batch"] == b) for b in batches]
        line = speed.plot(batches, best, marker="o", label=f"{spec} (measured)")[0]
        speed.plot(batches, bound, linestyle="--", color=line.get_color(), label=f"{spec} (bound)")
        lookaheads = sorted({row["lookahead"] for row in mine})
        smallest = min(batches)
        kept.plot(
            lookaheads,
            [
                next(r["row_acceptance"] for r in mine if r["batch"] == smallest and r["lookahead"] == k)
                for k in lookaheads
            ],
            marker="o",
            label=spec,
        )
    speed.set(xscale="log", xlabel="batch", ylabel="speed-up over the full cache (best lookahead)")
    speed.axhline(1.0, color="grey", linewidth=0.8)
    kept.set(xlabel="lookahead", ylabel="share of drafted tokens kept (a row alone)", ylim=(0, 1.05))
    speed.legend(fontsize=7)
    kept.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on the CPU: short prompts, small batches")
    parser.add_argument("--length", type=int, help="prompt tokens (default 8000; --quick 384)")
    parser.add_argument("--budget", type=int, help="the drafts' budget (default 256; --quick 64)")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,8,32,64; --quick 1,2)")
    parser.add_argument("--lookaheads", help="comma-separated lookaheads (default 2,4,6; --quick 2,4)")
    parser.add_argument("--new-tokens", type=int, help="tokens generated per row (default 48; --quick 16)")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), help="draft specs; {budget} is replaced")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    quick = {"length": 384, "budget": 64, "batches": "1,2", "lookaheads": "2,4", "new_tokens": 16}
    full = {"length": 8000, "budget": 256, "batches": "1,8,32,64", "lookaheads": "2,4,6", "new_tokens": 48}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.lookaheads = [int(k) for k in args.lookaheads.split(",")]

    device = torch.device(args.device)
    model, tokenizer = polykv.load_default_model()
    model = model.to(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    machine = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    rows = measure(model, tokenizer, args, device)
    text = table(rows)
    heading = f"bundled model, {args.length}-token prompts, {args.new_tokens} new tokens, {machine}"
    heading += f", torch {torch.__version__}"
    print(f"\n{heading}\n\n{text}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"speculation_{machine}"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    (args.out / f"{name}.json").write_text(
        json.dumps({"settings": settings, "machine": machine, "rows": rows}, indent=1)
    )
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()

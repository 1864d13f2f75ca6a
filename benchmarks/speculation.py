"""Self-speculation: the bundled model drafts with a compressed cache and keeps what its full cache confirms.

    python benchmarks/speculation.py            # one CUDA device: 8k-token prompts, batches 1 to 64, and the 8B shape
    python benchmarks/speculation.py --quick    # a smoke run on the CPU (short prompts, batches 1 and 2)

For every batch, side by side in one run, greedy, after the same prompts (prose of the ``continue``
task, one document per row):

- plain full-cache decoding through the static step (``StaticDecoder``: one CUDA graph replay per
  token, the fastest way polykv decodes without a draft);
- self-speculation with each draft spec (``*: streaming@B`` against ``budget B; *: auto@auto``,
  the routed draft, at the same budget B, routed by the bundled profile for KL and by the one
  calibrated for acceptance, shown as ``[acceptance]``) and each lookahead, its checks of fixed
  shapes (one CUDA graph replay per check: ``polykv.decoding.static_speculation``).

With ``--profile-checks``, each draft and lookahead also runs its checks eagerly under the profiler
(``check_kernels``): per check, the kernels and their device time in the draft's forwards, in the
full cache's forward, and in the rest of the check (on the CPU, operators and their CPU time), and
the most frequent kernels of each by name (the JSON's ``check_kernels.kernels``).

With ``--freeze``, the compiled forwards treat the weights as constants (inductor's ``freezing``),
which joins the q/k/v products and the gate/up products of each layer: fewer matrix products a step,
for a small model's steps, whose small products cost their launch more than their bytes.

With ``--compile-cache FILE``, inductor's compiled kernels are loaded from FILE before the first
compile and saved there after each row (``compile_cache``): a second run of a quick CPU command
took 78 s where the first took 308 s (``results/speculation_cpu_compile-cache.txt``). Inductor
does not cache graphs whose weights are frozen, so it refuses ``--freeze``.

With ``--step-costs``, each batch also times the static steps a check is made of (the full cache's
step of 1 and of lookahead + 1 tokens, a draft's of 1 and 2), and each row compares its check's wall
time with what those steps add up to.

Each row gives decoding tokens/s (all rows of the batch, after the first check or step, which
captures the graphs) and the speed-up over plain decoding; the share of drafted tokens kept by the
batch and by each row alone; tokens per check of the full cache; whether the output is plain
decoding's (rows equal); and the bound speed-up: what a step that only reads memory would give at
this acceptance, from the bytes each step reads (weights, and the draft's or the full cache's keys
and values).

Then the 8B shape (``--shape-layers``; LLaMA-3.1-8B's layers with random weights, batch 32 after
32k-token prompts): the wall time of a static step of the full cache (1 token, and lookahead + 1
tokens: a check) and of a draft holding B tokens (1 and 2 tokens), measured with 4 and 8 of its 32
layers (32 at batch 32 do not fit one device beside a 137 GB cache) and extrapolated linearly to
32, and the speed-up those costs give at the tokens per check measured on the bundled model.

Prints markdown tables; writes benchmarks/results/speculation_<machine>.json and a PNG.

    python benchmarks/speculation.py --combine BUNDLED.json SHAPE.json

gives the 8B shape's speed-ups from two kept results, the step costs of one at the tokens per check
of the other (for the bundled model and the 8B shape measured in separate processes).
"""

from __future__ import annotations

import argparse
import gc
import json
from collections import Counter, defaultdict
from collections.abc import Callable
from pathlib import Path

import compile_cache
import torch
from gpu_speed import CHUNK, milliseconds, prefill, synchronize
from gpu_speed import prompt as random_prompt
from shapes import llama_8b
from step_kernels import is_view
from torch.profiler import ProfilerActivity, profile

import polykv
from polykv.decoding import StaticDecoder
from polykv.decoding.compiled import compiled_forward
from polykv.decoding.precision import draft_model, tf32_matmuls
from polykv.decoding.static import captured_replay
from polykv.decoding.static_speculation import FORWARDS, StaticChecks
from polykv.harness.capture import capture
from polykv.model.describe import cache_argument
from polykv.tasks.tasks import make

RESULTS = Path(__file__).parent / "results"
SPECS = ("*: streaming@{budget}", "budget {budget}; *: auto@auto")
#: Draft specs routed by the profile calibrated for acceptance, and how their rows are labelled.
ACCEPTANCE_SPECS, ACCEPTANCE = ("budget {budget}; *: auto@auto",), " [acceptance]"
#: Kernel names kept per region of a profiled check (``--profile-checks``), the most frequent first.
KERNEL_NAMES = 40
#: The 8B shape's decoding batch and prompt length, and the layer counts its step costs are measured with.
SHAPE_BATCH, SHAPE_LENGTH = 32, 32768


def prompts(tokenizer, batch: int, length: int, device: torch.device) -> torch.Tensor:
    """``batch`` documents of prose, ``length`` tokens each (the ``continue`` task's prompts)."""
    rows = [make("continue", tokenizer, length=length, seed=seed).prompt for seed in range(batch)]
    return torch.tensor(rows, device=device)


def weight_bytes(model) -> int:
    """Bytes a decoding step reads of the weights: all but the input embedding (one row per token)."""
    return sum(p.nbytes for p in model.parameters()) - model.get_input_embeddings().weight.nbytes


def repeat_heads_in_float32_prefill() -> None:
    """In float32 on CUDA, transformers asks SDPA for grouped-query attention whenever no mask is given, which only
    PyTorch's math kernel does in float32: it holds a prompt's whole attention logits (69 GiB at batch 32 of 8k
    tokens). Telling transformers not to lets it repeat the KV heads, and the memory-efficient kernel runs. Plain
    decoding and speculation both prefill this way."""
    from transformers.integrations import sdpa_attention

    sdpa_attention.use_gqa_in_sdpa = lambda *args, **kwargs: False


def run(
    model, ids, plan, lookahead: int, new_tokens: int, compile_step: bool = False, **precision
) -> polykv.Speculation:
    """Speculation with checks of fixed shapes; ``precision``: the draft's (``draft_tf32``, ``draft_dtype``)."""
    return polykv.speculative_generate(
        model, ids, draft=plan, max_new_tokens=new_tokens, lookahead=lookahead, static=True,
        compile_step=compile_step, **precision,
    )  # fmt: skip


def check_milliseconds(result: polykv.Speculation) -> float:
    """A check's wall time: decoding's after the first check (which captures), over the checks after it."""
    timed = result.steps + result.idle_checks - 1
    return (result.decode_seconds - result.warmup_seconds) / timed * 1e3 if timed > 0 else 0.0


@torch.no_grad()
def plain_decoding(model, ids, whole, new_tokens: int, compile_step: bool = False) -> tuple[torch.Tensor, float]:
    """Greedy full-cache decoding through the static step: the tokens (B, L + new) and tokens/s after the first
    static step (which captures the graph)."""
    batch, length = ids.shape
    with whole.apply(model):
        cache = whole.make_cache()
        arguments = cache_argument(model, cache)
        first = model(ids, **arguments, logits_to_keep=1).logits[:, -1].argmax(dim=-1)
        positions = torch.full((batch, 1), length, device=ids.device)
        second = model(first[:, None], position_ids=positions, **arguments, logits_to_keep=1).logits[:, -1].argmax(-1)
        with StaticDecoder(
            model, cache, second, positions + 1, room=new_tokens - 2, compile_step=compile_step
        ) as decoder:
            decoder.run(1)
            wall, _ = milliseconds(lambda: decoder.run(new_tokens - 3, check_every=new_tokens), ids.device)
            tokens = torch.cat([ids, first[:, None], second[:, None], decoder.tokens], dim=1)
    return tokens, batch * (new_tokens - 3) / wall * 1e3


def measure(model, tokenizer, args, device, measured: Callable[[list[dict]], None]) -> list[dict]:
    """Every batch's plain decoding and each draft's speculation; ``measured`` sees the rows after each one."""
    weights = weight_bytes(model)
    precision = {"draft_tf32": args.draft_tf32, "draft_dtype": args.draft_dtype and getattr(torch, args.draft_dtype)}
    draft_weights = weights * (precision["draft_dtype"] or model.dtype).itemsize // model.dtype.itemsize
    plans = {spec: polykv.compile(spec, model, tokenizer=tokenizer) for spec in args.specs}
    for spec in args.acceptance_specs:
        plans[spec + ACCEPTANCE] = polykv.compile(
            spec, model, tokenizer=tokenizer, objective="acceptance", profile=args.acceptance_profile
        )
    whole = polykv.compile("*: full", model)
    # A warm-up of short prompts in the first batch's shapes: with --compile-step what it compiles serves that batch
    # (a compiled step specialises on the batch and the tokens a step takes, not on how many slots a cache has).
    warm = prompts(tokenizer, args.batches[0], 128, device)
    run(model, warm, whole, args.lookaheads[0], 8, args.compile_step, **precision)
    plain_decoding(model, warm, whole, 8, args.compile_step)
    rows = []
    for batch in args.batches:
        ids = prompts(tokenizer, batch, args.length, device)
        plain, plain_rate = plain_decoding(model, ids, whole, args.new_tokens, args.compile_step)
        rows.append({"batch": batch, "spec": "plain", "lookahead": 0, "tokens_per_s": plain_rate, "speedup": 1.0})
        measured(rows)
        print(f"batch {batch}: plain {plain_rate:.1f} tokens/s", flush=True)
        costs = (
            step_costs(model, ids, args.budget, args.lookaheads, args.compile_step, **precision)
            if args.step_costs
            else None
        )
        if costs:
            rows[-1]["step_costs"] = costs
            measured(rows)
            print(f"batch {batch}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items()), flush=True)
        for spec, plan in plans.items():
            for lookahead in args.lookaheads:
                result = run(model, ids, plan, lookahead, args.new_tokens, args.compile_step, **precision)
                rate = result.tokens_per_second
                full, draft = weights + result.full_nbytes, draft_weights + result.draft_nbytes
                bound = result.tokens_per_step * full / (lookahead * draft + full)
                equal = (result.tokens == plain).all(dim=1).float().mean().item()
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
                    # The batch checks until its slowest row is done: checks run, against what a row needed.
                    "checks": result.steps + result.idle_checks,
                    "idle_checks": result.idle_checks,
                    "row_checks": result.row_steps / batch,
                    "check_ms": check_milliseconds(result),
                }
                if costs:  # a check's wall time, against what its steps cost alone
                    row["predicted_check_ms"] = predicted_check_ms(costs, lookahead)
                if args.profile_checks:
                    row["check_kernels"] = check_kernels(model, ids, plan, lookahead, args.compile_step, **precision)
                    print(f"batch {batch}: {spec}, lookahead {lookahead}: per check " + ", ".join(
                        f"{region} {row['check_kernels']['count'][region]:.0f} kernels, "
                        f"{row['check_kernels']['ms'][region]:.2f} ms" for region in row["check_kernels"]["count"]
                    ), flush=True)  # fmt: skip
                    for region, named in row["check_kernels"]["kernels"].items():
                        print(f"  {region}, most frequent: " + "; ".join(
                            f"{name[:60]} x{count:.0f} {ms:.2f} ms" for name, count, ms in named[:8]
                        ), flush=True)  # fmt: skip
                rows.append(row)
                measured(rows)
                print(
                    f"batch {batch}: {spec}, lookahead {lookahead}: {rate:.1f} tokens/s ({rate / plain_rate:.2f}x), "
                    f"accepted {result.acceptance:.2f} (rows alone {result.row_acceptance:.2f}), "
                    f"{result.tokens_per_step:.2f} per check, bound {bound:.2f}x, rows equal {equal:.2f}, "
                    f"{row['checks']} checks ({row['row_checks']:.1f} a row), check {row['check_ms']:.2f} ms"
                    + (f" (steps {row['predicted_check_ms']:.2f})" if costs else ""),
                    flush=True,
                )
    return rows


@torch.no_grad()
def step_milliseconds(model, cache, tokens: int, replays: int, compile_step: bool = False) -> float:
    """Wall milliseconds of one static step of ``tokens`` tokens through ``cache`` (a CUDA graph replayed; run
    eagerly on the CPU)."""
    batch, device = cache.layers[0].batch_size, model.device
    cache.begin_static(room=(replays + 1) * tokens, holes=True)
    forward = compiled_forward(model) if compile_step else model
    ids = torch.ones(batch, tokens, dtype=torch.long, device=device)
    positions = (cache.layers[0].seen + torch.arange(tokens, device=device)).expand(batch, tokens)

    def step() -> None:
        forward(input_ids=ids, position_ids=positions, logits_to_keep=tokens, **cache_argument(model, cache))

    if device.type == "cuda":
        replay = captured_replay(step)  # runs the step once (the warm-up a capture needs), then captures it
    else:  # run eagerly, after one warm-up step
        step()
        replay = step
    wall, _ = milliseconds(lambda: [replay() for _ in range(replays)], device)
    for _ in range(replays + 1):
        cache.static_stepped(tokens)
    cache.end_static((replays + 1) * tokens)
    return wall / replays


def step_costs(
    model,
    ids,
    budget: int,
    lookaheads: list[int],
    compile_step: bool = False,
    chunk: int | None = None,
    draft_tf32: bool = False,
    draft_dtype: torch.dtype | None = None,
) -> dict:
    """Milliseconds of the static steps a check is made of, after the prompts ``ids`` (prefilled in chunks of
    ``chunk``): the full cache's step of 1 token and of lookahead + 1 (a check), and a draft's of 1 and 2 tokens (a
    draft holding ``budget`` tokens, in the draft's precision)."""
    whole = polykv.compile("*: full", model)
    drafter = draft_model(model, draft_dtype)
    with whole.apply(model), whole.apply(drafter):
        full = prefill(model, whole, ids, chunk=chunk)
        draft = prefill(drafter, whole, ids[:, -budget:])  # a draft's cost is the tokens it holds
        costs = {"full 1": step_milliseconds(model, full, 1, 20, compile_step)}
        with tf32_matmuls(draft_tf32):
            costs["draft 1"] = step_milliseconds(drafter, draft, 1, 20, compile_step)
            costs["draft 2"] = step_milliseconds(drafter, draft, 2, 20, compile_step)
        for lookahead in lookaheads:
            costs[f"full {lookahead + 1}"] = step_milliseconds(model, full, lookahead + 1, 20, compile_step)
    return costs


def predicted_check_ms(costs: dict, lookahead: int) -> float:
    """What a check should cost from its steps: the draft's first step of 2 tokens, lookahead - 1 steps of one, and
    the full cache's step of lookahead + 1 tokens."""
    return costs["draft 2"] + (lookahead - 1) * costs["draft 1"] + costs[f"full {lookahead + 1}"]


@torch.no_grad()
def check_kernels(
    model, ids, plan, lookahead: int, compile_step: bool, checks: int = 4, *, draft_tf32=False, draft_dtype=None
) -> dict:
    """What one check runs, per check: the kernels (the CPU's operators) and their device time (CPU time) in the
    draft's forwards, in the full cache's forward, and in the rest (the check's own bookkeeping). Checks run
    eagerly, so the profiler sees each kernel a captured check replays; a first run compiles, the second is
    profiled."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    registry = polykv.default_registry()
    drafter = draft_model(model, draft_dtype)
    with plan.apply(model), plan.apply(drafter):
        for profiled_run in (False, True):
            captured = capture(model, ids, needs=plan.needs(registry), reconstruction=plan.reconstruction)
            newest = captured.logits.argmax(dim=-1)
            full, draft = captured.cache(share_room=True), captured.cache_for(plan, registry, drafter.dtype)
            run = StaticChecks(
                model, full, draft, newest, torch.full_like(newest, ids.shape[1]), lookahead=lookahead,
                max_new_tokens=checks * (lookahead + 1), eos_token_id=None, pad_token_id=None, graph=False,
                compile_step=compile_step, draft_tf32=draft_tf32, draft_model=drafter,
            )  # fmt: skip
            if not profiled_run:
                run.run()
                continue
            with profile(activities=activities) as profiled:
                run.run()
                synchronize(ids.device)
    ran = int(run.check_index)
    count, took = defaultdict(Counter), defaultdict(Counter)  # region -> kernel name -> count, microseconds
    for event in profiled.events():  # the forwards' ranges, and the check's other top-level operators
        if event.cpu_parent is None and event.device_type.name == "CPU":
            region = event.name if event.name in FORWARDS.values() else "the rest"
            for name, microseconds in _kernels_under(event, ids.is_cuda):
                count[region][name] += 1
                took[region][name] += microseconds
    regions = sorted(count)
    return {
        "count": {region: count[region].total() / ran for region in regions},
        "ms": {region: took[region].total() / ran / 1e3 for region in regions},
        # The most frequent kernels of each region, per check: [name, count, ms], so a profile says what to fuse.
        "kernels": {
            region: [
                [name, n / ran, took[region][name] / ran / 1e3] for name, n in count[region].most_common(KERNEL_NAMES)
            ]
            for region in regions
        },
    }


def _kernels_under(event, cuda: bool) -> list[tuple[str, float]]:
    """The kernels ``event`` and what it called launched, each with its device microseconds; on the CPU, the
    operators that compute (no views, no operator's inner calls), each with its CPU microseconds."""
    if cuda:
        launched = [(kernel.name, kernel.duration) for kernel in event.kernels]
        return launched + [found for child in event.cpu_children for found in _kernels_under(child, cuda)]
    if event.name.startswith("aten::"):
        return [] if is_view(event.name) else [(event.name, event.cpu_time_total)]
    return [found for child in event.cpu_children for found in _kernels_under(child, cuda)]


def shape_step_costs(args) -> dict:
    """The 8B shape's static step costs at batch SHAPE_BATCH after SHAPE_LENGTH-token prompts, per layer count,
    and extrapolated to 32 layers."""
    measured = {}
    for layers in args.shape_layers:
        model = llama_8b(layers=layers)
        ids = random_prompt(SHAPE_BATCH, SHAPE_LENGTH, model.config.vocab_size, model.device)
        costs = step_costs(model, ids, args.budget, args.lookaheads, chunk=CHUNK)
        measured[layers] = costs
        print(f"8B shape, {layers} layers: " + ", ".join(f"{k} {v:.2f} ms" for k, v in costs.items()), flush=True)
        del model
        torch.cuda.empty_cache()
    few, many = sorted(measured)
    whole_model = {
        name: measured[few][name] + (measured[many][name] - measured[few][name]) * (32 - few) / (many - few)
        for name in measured[few]
    }
    return {
        "batch": SHAPE_BATCH,
        "length": SHAPE_LENGTH,
        "budget": args.budget,
        "measured": measured,
        "32": whole_model,
    }


def shape_speedups(costs: dict, rows: list[dict]) -> list[dict]:
    """What the 8B shape's step costs give at each draft's and lookahead's tokens per check on the bundled model
    (at the 8B shape's batch where it was measured, else at its largest)."""
    step = costs["32"]
    batches = {row["batch"] for row in rows}
    largest = SHAPE_BATCH if SHAPE_BATCH in batches else max(batches)
    found = []
    for row in rows:
        if row["spec"] == "plain" or row["batch"] != largest:
            continue
        lookahead = row["lookahead"]
        check = predicted_check_ms(step, lookahead)
        speedup = row["tokens_per_check"] * step["full 1"] / check
        found.append({"spec": row["spec"], "lookahead": lookahead, "tokens_per_check": row["tokens_per_check"],
                      "check_ms": check, "speedup": speedup})  # fmt: skip
    return found


def table(rows: list[dict]) -> str:
    lines = [
        "| batch | draft | lookahead | tokens/s | speed-up | kept (batch / row) | tokens per check | checks "
        "(batch / row) | check ms | bound | equal |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        if row["spec"] == "plain":
            lines.append(
                f"| {row['batch']} | plain, full cache | 0 | {row['tokens_per_s']:.1f} | 1.00x | | 1.00 | | | | |"
            )
            continue
        lines.append(
            f"| {row['batch']} | `{row['spec']}` | {row['lookahead']} | {row['tokens_per_s']:.1f} | "
            f"{row['speedup']:.2f}x | {row['acceptance']:.2f} / {row['row_acceptance']:.2f} | "
            f"{row['tokens_per_check']:.2f} | {row['checks']} / {row['row_checks']:.1f} | {row['check_ms']:.2f} | "
            f"{row['bound_speedup']:.2f}x | {row['rows_equal']:.2f} |"
        )
    return "\n".join(lines)


def shape_table(costs: dict, speedups: list[dict]) -> str:
    step = costs["32"]
    lines = ["| 8B shape, 32 layers (extrapolated), batch 32 / 32k | ms |", "| --- | ---: |"]
    lines += [f"| static step: {name} token(s) | {ms:.2f} |" for name, ms in step.items()]
    lines += [
        "",
        "| draft | lookahead | tokens per check (bundled model, same batch) | check ms | speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| `{row['spec']}` | {row['lookahead']} | {row['tokens_per_check']:.2f} | {row['check_ms']:.2f} | "
        f"{row['speedup']:.2f}x |"
        for row in speedups
    ]
    return "\n".join(lines)


def combine(bundled: Path, shape: Path, out: Path) -> None:
    """The 8B shape's speed-ups: the step costs kept in ``shape`` at the tokens per check kept in ``bundled``."""
    rows = json.loads(bundled.read_text())
    costs = json.loads(shape.read_text())["shape"]["costs"]
    speedups = shape_speedups(costs, rows["rows"])
    print(shape_table(costs, speedups))
    path = out / f"speculation_{rows['machine']}_8b-speedup.json"
    sources = {"bundled": bundled.name, "shape": shape.name}
    path.write_text(json.dumps({"sources": sources, "costs": costs, "speedups": speedups}, indent=1))
    print(f"wrote {path}")


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
    parser.add_argument(
        "--acceptance-specs", nargs="*", default=list(ACCEPTANCE_SPECS), help="draft specs routed for acceptance"
    )
    parser.add_argument(
        "--acceptance-profile", type=Path, help="the profile they route by (default: the bundled model's)"
    )
    parser.add_argument("--shape-layers", default="4,8", help="8B-shape layer counts to measure (none: skip it)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--dtype", choices=("bfloat16", "float32"), help="the bundled model's (default: bfloat16 on CUDA, else float32)"
    )
    parser.add_argument(
        "--combine", nargs=2, type=Path, metavar=("BUNDLED", "SHAPE"), help="speed-ups from two kept results"
    )
    parser.add_argument(
        "--compile-step", action="store_true", help="compile the forwards of steps and checks (torch.compile)"
    )
    parser.add_argument(
        "--step-costs", action="store_true", help="also time the steps a check is made of, at each batch"
    )
    parser.add_argument(
        "--draft-tf32",
        action="store_true",
        help="a float32 model drafts with TF32 matrix products on CUDA, and checks in float32 (same output)",
    )
    parser.add_argument(
        "--draft-dtype",
        choices=("bfloat16", "float16"),
        help="drafts run a copy of the model's weights, and a draft cache, in this dtype; checks run the model",
    )
    parser.add_argument(
        "--freeze", action="store_true", help="compile with the weights frozen: q/k/v and gate/up products joined"
    )
    parser.add_argument(
        "--compile-cache",
        type=Path,
        metavar="FILE",
        help="load inductor's compiled kernels from FILE first (where it exists) and save them there after each row",
    )
    parser.add_argument(
        "--profile-checks",
        action="store_true",
        help="also profile each draft's checks: kernels and their time in the draft's and the full cache's forwards",
    )
    parser.add_argument("--label", help="appended to the results' file names")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.combine:
        combine(*args.combine, args.out)
        return
    quick = {"length": 384, "budget": 64, "batches": "1,2", "lookaheads": "2,4", "new_tokens": 16}
    full = {"length": 8000, "budget": 256, "batches": "1,8,32,64", "lookaheads": "2,4,6", "new_tokens": 128}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = [int(b) for b in args.batches.split(",")]
    args.specs = [spec.format(budget=args.budget) for spec in args.specs]
    args.acceptance_specs = [spec.format(budget=args.budget) for spec in args.acceptance_specs]
    args.lookaheads = [int(k) for k in args.lookaheads.split(",")]
    args.shape_layers = [int(n) for n in args.shape_layers.split(",")] if args.shape_layers != "none" else []
    if args.quick or args.device == "cpu":
        args.shape_layers = []  # the 8B shape lives on a GPU

    if args.freeze and args.compile_cache:
        parser.error("--compile-cache keeps nothing with --freeze: inductor does not cache graphs with frozen weights")
    if args.freeze:
        torch._inductor.config.freezing = True
    compile_cache.load(args.compile_cache)
    device = torch.device(args.device)
    model, tokenizer = polykv.load_default_model()
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = model.to(device, dtype)
    if dtype == torch.float32 and device.type == "cuda":
        repeat_heads_in_float32_prefill()
    args.dtype = str(dtype).removeprefix("torch.")  # kept with the results
    machine = torch.cuda.get_device_name(device).replace(" ", "-") if device.type == "cuda" else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"speculation_{machine}" + (f"_{args.label}" if args.label else "")
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "out"}

    def save(rows: list[dict], shape: dict) -> None:  # after every row too: a run cut short keeps what it measured
        found = {"settings": settings, "machine": machine, "rows": rows, "shape": shape}
        (args.out / f"{name}.json").write_text(json.dumps(found, indent=1))
        compile_cache.save(args.compile_cache)

    rows = measure(model, tokenizer, args, device, lambda rows: save(rows, {}))
    text = table(rows)
    heading = f"bundled model ({dtype}), {args.length}-token prompts, {args.new_tokens} new tokens, {machine}"
    heading += f", torch {torch.__version__}" + (", forwards compiled" if args.compile_step else "")
    heading += ", drafts in TF32" if args.draft_tf32 else ""
    heading += f", drafts in {args.draft_dtype}" if args.draft_dtype else ""
    print(f"\n{heading}\n\n{text}")
    shape = {}
    if args.shape_layers:
        del model
        gc.collect()  # the checks' CUDA graphs and their memory pools go with their last references
        torch.cuda.empty_cache()
        costs = shape_step_costs(args)
        shape = {"costs": costs, "speedups": shape_speedups(costs, rows)}
        print("\n" + shape_table(costs, shape["speedups"]))
    save(rows, shape)
    plot(rows, args.out / f"{name}.png")
    print(f"wrote {args.out / name}.json and .png")


if __name__ == "__main__":
    main()

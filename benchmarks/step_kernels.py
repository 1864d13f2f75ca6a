"""Where a static decoding step's time goes: its kernels, as it runs and with its forward compiled.

    python benchmarks/step_kernels.py                                  # one CUDA device: the bundled model
    python benchmarks/step_kernels.py --model llama-8b --length 32768 --batch 8
    python benchmarks/step_kernels.py --model tiny --length 520 --batch 2 --steps 2   # a smoke run on the CPU
    python benchmarks/step_kernels.py --table benchmarks/results/step_kernels_NVIDIA-H200.json
    python benchmarks/step_kernels.py --model llama-8b --gemm-autotune   # compiled matrix products autotuned
    python benchmarks/step_kernels.py --model llama-8b --freeze          # weights frozen: q/k/v and gate/up fused
    python benchmarks/step_kernels.py --dtype float32 --freeze --tf32 --specs "*: streaming@256"   # a TF32 draft's step
    python benchmarks/step_kernels.py --specs "layers *: snapkv@512" "layers * heads 0-3: snapkv@768; \
        layers * heads 4-7: snapkv@256" --model llama-8b --label heads        # ragged heads against uniform ones

For each cache (``*: full``, and ``*: streaming@256``, a draft's cache) and each way of running the
step (as it is, and ``compile_step``: the model's forward through ``torch.compile``, the cache's
writes and attention traced with it), side by side in one run:

- the step's wall time replayed as a CUDA graph (``StaticDecoder``; on the CPU, run eagerly);
- the kernels one step launches and their summed GPU time, from the profiler over eager static steps
  (the kernels a graph replays are these), split into the cache's (attention, slot writes: launched
  from polykv) and the model's; the rest of a replayed step's wall time is the gaps between kernels
  (on the CPU: what a step launches, ``is_cpu_launch``: operators run by themselves but views,
  inductor's fused kernels and polykv's attention operators);
- the compiled graphs a step runs (one per stretch between graph breaks);
- the kernels that take the most GPU time.

``--gemm-autotune`` compiles with inductor's ``max_autotune_gemm``: each matrix product of the compiled
parts is timed against Triton's templates and the fastest kept (the weight products hold most of an 8B
step's gap to the bandwidth bound). Its result is written with the suffix ``_gemm-autotune``.

``--freeze`` compiles with inductor's ``freezing``: the weights become constants of the compiled parts,
and products that share an input are joined into one (q, k and v; gate and up), so a layer reads its
input once per group and runs two products fewer. The joined weights are copies (the model keeps its
own for the eager prefill): an 8B model holds about 9 GB more. Suffix ``_freeze``.

``--tf32`` runs float32 products on TF32 tensor cores throughout, as a speculative draft's run with
``draft_tf32`` (``polykv.decoding.precision``): with ``--dtype float32 --specs "*: streaming@256"``
it shows where a TF32 draft step's time goes. Suffix ``_tf32``.

Prints a markdown table and writes benchmarks/results/step_kernels_<device>.json.
"""

from __future__ import annotations

import argparse
import functools
import json
from collections import Counter
from pathlib import Path

import torch
import torch._inductor.config
from gpu_decode import static_decode
from gpu_speed import CHUNK, machine, prefill, prompt
from shapes import MODELS, load
from torch.profiler import ProfilerActivity, profile, record_function

import polykv
from polykv.decoding import StaticDecoder
from polykv.model.describe import cache_argument

RESULTS = Path(__file__).parent / "results"
ANNOTATION = "steps"
#: How the profiler names the run of one compiled graph.
COMPILED_REGION = "Torch-Compiled Region"
SPECS = ("*: full", "*: streaming@256")
#: Kernel names (lower case) that belong to polykv's side of a step: its attention and its slot writes.
#: (The model's embedding lookup is an index kernel too: one per step counted on the cache's side.)
CACHE_KERNELS = ("decode", "index", "gather", "scatter", "arange")


def decoder(model, plan, ids, compile_step: bool, room: int) -> StaticDecoder:
    """A StaticDecoder after the prefill of ``ids`` and one ordinary step."""
    cache = prefill(model, plan, ids, chunk=CHUNK)
    batch, length = ids.shape
    token = torch.ones(batch, dtype=torch.long, device=ids.device)
    with torch.no_grad():
        model(token[:, None], **cache_argument(model, cache), logits_to_keep=1)
    positions = torch.full((batch, 1), length + 1, device=ids.device)
    return StaticDecoder(model, cache, token, positions, room=room, compile_step=compile_step, eviction_slack=0)


def kernels(model, plan, ids, compile_step: bool, steps: int) -> dict:
    """Kernels per eager static step: their count and GPU time, the cache's and the model's."""
    with decoder(model, plan, ids, compile_step, room=2 + steps) as run:
        run.graph = False  # eager steps: the profiler sees each kernel
        run.run(1)  # compiles
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
        with profile(activities=activities) as profiled:
            with record_function(ANNOTATION):
                run.run(steps, check_every=steps + 1)
            if ids.is_cuda:
                torch.cuda.synchronize()
    device_events = [
        e for e in profiled.events() if e.device_type == torch.autograd.DeviceType.CUDA and e.name != ANNOTATION
    ]  # the annotation spans the steps on the GPU's timeline too: it is not a kernel
    if not device_events:  # the CPU: the operators run and the compiled kernels instead, but views (nothing)
        device_events = [e for e in profiled.events() if is_cpu_launch(e)]
    count, time_us, names = Counter(), Counter(), Counter()
    for event in device_events:
        side = "cache" if any(part in event.name.lower() for part in CACHE_KERNELS) else "model"
        count[side] += 1
        took = event.device_time if ids.is_cuda else event.cpu_time
        time_us[side] += took
        names[event.name[:70]] += took
    regions = sum(event.name.startswith(COMPILED_REGION) for event in profiled.events())
    return {
        "graphs_per_step": regions / steps,
        "kernels_per_step": {side: count[side] / steps for side in ("cache", "model")},
        "kernel_ms_per_step": {side: time_us[side] / steps / 1e3 for side in ("cache", "model")},
        "top": [(name, took / steps / 1e3) for name, took in names.most_common(8)],
    }


def is_cpu_launch(event) -> bool:
    """Whether a CPU profile's ``event`` is what a GPU would launch as a kernel: an operator run by itself (not
    inside another operator, nor a view), one of inductor's fused kernels (``enable_kernel_profile``) or one of
    polykv's operators (whose inside is two kernels on a GPU, many operators on the CPU)."""
    parent = event.cpu_parent.name if event.cpu_parent else ""
    if parent.startswith(("aten::", "polykv::")):
        return False
    return (
        "cpp_fused" in event.name
        or event.name.startswith("polykv::")
        or (event.name.startswith("aten::") and not is_view(event.name))
    )


@functools.cache
def is_view(name: str) -> bool:
    """Whether the aten operator ``name`` returns a view of its input (its schema's result aliases it, unwritten)."""
    packet = getattr(torch.ops.aten, name.removeprefix("aten::"), None)
    if packet is None:
        return False
    for overload in packet.overloads():
        returns = getattr(packet, overload)._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return True
    return False


def table(rows: list[dict], unit: str) -> str:
    """The markdown table of ``rows``. A row measured before the profiler's annotation of the steps was left out
    (its ``top`` lists it) gets it taken out of the model's time and count here."""
    lines = [
        f"| cache | forward | step ms (replayed) | {unit} per step: cache / model | their time ms: cache / model "
        "| gaps ms | compiled graphs per step |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        (cache_n, model_n), (cache_ms, model_ms) = row["kernels_per_step"].values(), row["kernel_ms_per_step"].values()
        for name, took in row["top"]:
            if name == ANNOTATION:
                model_ms, model_n = model_ms - took, model_n - 1 / row.get("profiled_steps", 8)
        gaps = row["replayed_ms"] - cache_ms - model_ms
        graphs = f"{row['graphs_per_step']:.0f}" if "graphs_per_step" in row else ""  # kept before it was counted
        lines.append(
            f"| `{row['spec']}` | {'compiled' if row['compiled'] else 'as it is'} | {row['replayed_ms']:.2f} "
            f"| {cache_n:.0f} / {model_n:.0f} | {cache_ms:.2f} / {model_ms:.2f} | {gaps:.2f} | {graphs} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="bundled")
    parser.add_argument("--length", type=int, default=8000, help="prompt tokens")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per timed or profiled run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bfloat16 on CUDA, else the model's")
    parser.add_argument("--specs", nargs="+", default=list(SPECS), help="the caches' specs")
    parser.add_argument("--gemm-autotune", action="store_true", help="autotune the compiled matrix products")
    parser.add_argument("--freeze", action="store_true", help="freeze the weights: q/k/v and gate/up products joined")
    parser.add_argument("--tf32", action="store_true", help="float32 products in TF32, as a draft's (--draft-tf32)")
    parser.add_argument("--label", help="appended to the result's file name")
    parser.add_argument("--table", type=Path, metavar="JSON", help="print the table of a kept result, and stop")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.table:
        kept = json.loads(args.table.read_text())
        print(table(kept["rows"], "kernels" if kept["device"] != f"{kept['model']}-cpu" else "operators (CPU)"))
        return
    if args.gemm_autotune:
        torch._inductor.config.max_autotune_gemm = True
    if args.freeze:
        torch._inductor.config.freezing = True
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    model = load(args.model)
    device = model.device
    torch._inductor.config.cpp.enable_kernel_profile = device.type == "cpu"  # the profiler sees fused kernels
    if args.dtype or device.type == "cuda":
        model = model.to(getattr(torch, args.dtype or "bfloat16"))
    ids = prompt(args.batch, args.length, model.config.vocab_size, device)
    rows = []
    for spec in args.specs:
        plan = polykv.compile(spec, model)
        for compile_step in (False, True):
            row = {"spec": spec, "compiled": compile_step, "profiled_steps": args.steps}
            cache = prefill(model, plan, ids, chunk=CHUNK)
            timed = static_decode(model, cache, *ids.shape, args.steps, args.repeats, 0, compile_step)
            row["replayed_ms"] = timed["wall_ms"]
            del cache
            row.update(kernels(model, plan, ids, compile_step, args.steps))
            rows.append(row)
            print(row, flush=True)
    name = machine(device, args.model)
    settings = f"batch {args.batch}, {args.length}-token prompts, {name}, torch {torch.__version__}"
    print(f"\n{args.model} ({next(model.parameters()).dtype}), {settings}\n")
    print(table(rows, "kernels" if device.type == "cuda" else "operators (CPU)"))
    args.out.mkdir(parents=True, exist_ok=True)
    levers = (("gemm-autotune", args.gemm_autotune), ("freeze", args.freeze), ("tf32", args.tf32))
    suffix = "".join(f"_{lever}" for lever, on in levers if on)
    suffix += f"_{args.label}" if args.label else ""
    path = args.out / f"step_kernels_{name.replace(' ', '-')}{suffix}.json"
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    meta = {"model": args.model, "dtype": dtype, "batch": args.batch, "length": args.length, "device": name}
    meta.update(torch=torch.__version__, gemm_autotune=args.gemm_autotune, freeze=args.freeze, tf32=args.tf32)
    path.write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

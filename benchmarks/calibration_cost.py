"""What calibrating a model costs: per table entry, per batch of prompts, and for a whole profile, on one device.

    python benchmarks/calibration_cost.py            # LLaMA-3.1-8B's shape, random bf16 weights, one CUDA device
    python benchmarks/calibration_cost.py --quick    # a tiny random model on the CPU (the test suite's)
    torchrun --nproc-per-node 2 benchmarks/calibration_cost.py --whole   # the whole profile for real, on 2 GPUs

``polykv calibrate`` with its defaults works through batches of 4 prompts of one task (1024 tokens,
16 scored tokens each): per batch one captured prefill, the scalar signals of every layer, and one
table entry per layer, policy and budget (the policy's selection, a teacher-forced pass over the
scored tokens from that layer on, the curve signals): 32 x 6 x 7 = 1344 entries for an 8B model.
Then it times each policy's prefill (``cost.py``) and tunes the solver on 2 held-out prompts per
task. The weights are random: what a pass costs does not depend on them, and the prompts are
random tokens for the same reason.

This script times, side by side and synchronised:

- a batch's capture, and every entry of a few layers (``--layers``; an entry costs more the lower
  its layer, as its pass runs through the layers above it, so the layers between are interpolated);
- one whole batch through ``measure`` itself, which checks the extrapolation of a batch;
- the prefill costs as calibration times them, once;
- tuning: one held-out batch captured and scored under uniform plans, extrapolated to the 28 plans
  (4 budgets, each uniform and 2 weightings x 3 floors) and 7 batches it scores;

and extrapolates to a profile with the default policies and grid, ``--prompts`` per task (16) of
the 7 calibration tasks, on 1 process and shared over several (``torchrun``: batches are shared,
prefill costs are timed on the first process). Prints a table and writes
benchmarks/results/calibration_cost_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from polykv.cache.preparation import prepared
from polykv.cache.reconstruction import Reconstruction
from polykv.calibration.cost import prefill_costs
from polykv.calibration.measure import SIGNAL_WINDOW, measure
from polykv.calibration.samples import GRID, POLICIES, SCORED, TASKS, TUNE_SAMPLES
from polykv.calibration.tune import TUNE_BUDGETS
from polykv.harness.scorer import Scorer, needs_of
from polykv.plan import compile
from polykv.registry import default_registry
from polykv.tasks.tasks import Sample
from polykv.testing import WordTokenizer, tiny_model

#: Processes the whole profile is extrapolated to (each on its own GPU).
PROCESSES = (1, 2, 4, 8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny random model on the CPU, short prompts")
    parser.add_argument("--prompts", type=int, default=16, help="calibration prompts per task (default 16)")
    parser.add_argument("--length", type=int, help="prompt tokens (default 1024; --quick 96)")
    parser.add_argument("--batch", type=int, default=4, help="prompts per captured prefill (default 4)")
    parser.add_argument("--layers", type=int, nargs="+", help="layers whose entries are timed (default: 5, spread)")
    parser.add_argument("--no-check", action="store_true", help="skip timing one whole batch through measure")
    parser.add_argument(
        "--whole",
        action="store_true",
        help="calibrate the whole profile for real and time it (under torchrun, shared over the processes)",
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if args.whole:
        whole_profile(args)
        return

    if args.quick:
        model, name = tiny_model("llama", layers=4, max_position_embeddings=1024), "tiny-llama"
    else:
        from shapes import llama_8b

        model, name = llama_8b(), "llama-8b"
    device = next(model.parameters()).device
    length = args.length or (96 if args.quick else 1024)
    layers = model.config.num_hidden_layers
    timed_layers = sorted(set(args.layers or _spread(layers, 5)))
    registry = default_registry()
    tokenizer = WordTokenizer()  # what reconstruction scoring (kvzip) asks of a tokenizer
    policies = {policy: registry.policies.create(policy) for policy in POLICIES}
    signals = [entry.cls() for entry in registry.signals]
    scalar, curve = [s for s in signals if not s.curve], [s for s in signals if s.curve]
    reconstruction = Reconstruction.for_tokenizer(tokenizer)
    needs = needs_of([policy.needs() for policy in policies.values()], window=SIGNAL_WINDOW)
    vocabulary = model.config.vocab_size
    samples = _samples(args.prompts, length, vocabulary, seed=0)
    batch = samples[: args.batch]
    print(f"{name} on {device}: {layers} layers, prompts of {length} tokens, batches of {len(batch)}", flush=True)

    with prepared(model), torch.no_grad():
        warm = Scorer(model, batch, needs, hidden=True, reconstruction=reconstruction)
        for policy in policies.values():  # kernels, allocator
            warm.layer_loss(0, policy, GRID[0])
        del warm
        with _Stopwatch(device) as capture:
            scorer = Scorer(model, batch, needs, hidden=True, reconstruction=reconstruction)
        per_layer, per_policy = {}, {policy: [] for policy in policies}
        for layer in timed_layers:
            observation = scorer.captured.observation(layer)
            with _Stopwatch(device) as watch:
                for signal in scalar:
                    signal.measure(observation)
            total = watch.seconds
            for policy_name, policy in policies.items():
                for budget in GRID:
                    with _Stopwatch(device) as watch:
                        _, kept = scorer.layer_loss(layer, policy, budget)
                        for signal in curve if kept is not None else ():
                            signal.measure(observation, kept)
                    per_policy[policy_name].append(watch.seconds)
                    total += watch.seconds
            per_layer[layer] = total
            print(f"  layer {layer:>2}: {total * 1e3 / (len(policies) * len(GRID)):8.1f} ms per entry", flush=True)
        del scorer
        entries_s = sum(_interpolate(per_layer, layer) for layer in range(layers))
        capture_s = capture.seconds
        batch_s = capture_s + entries_s

        measured_batch_s = None
        if not args.no_check:
            with _Stopwatch(device) as watch:
                measure(
                    model, batch, policies={p: {} for p in policies}, grid=GRID, signals=signals,
                    batch_size=len(batch), registry=registry, progress=False, reconstruction=reconstruction,
                )  # fmt: skip
            measured_batch_s = watch.seconds

        with _Stopwatch(device) as watch:
            prefill_costs(model, samples, list(policies), registry=registry, tokenizer=tokenizer)
        costs_s = watch.seconds

        held_out = _samples(TUNE_SAMPLES, length, vocabulary, seed=10_000)[:TUNE_SAMPLES]
        uniform = [compile(f"layers *: pyramidkv@{b}", model, registry=registry) for b in TUNE_BUDGETS]
        tune_needs = needs_of(uniform)
        with _Stopwatch(device) as watch:
            tuning = Scorer(model, held_out, tune_needs)
        tune_capture_s, plan_seconds = watch.seconds, []
        for plan in uniform:
            with _Stopwatch(device) as watch:
                list(tuning.records("", 0, plan))
            plan_seconds.append(watch.seconds)
        plan_s = statistics.mean(plan_seconds)
    plans = sum(1 + 2 * len([floor for floor in GRID[:3] if floor <= budget]) for budget in TUNE_BUDGETS)
    tune_batch_s = tune_capture_s + plans * plan_s

    batches = len(TASKS) * math.ceil(args.prompts / args.batch)
    table_entries = batches * layers * len(policies) * len(GRID)
    profile = {
        n: math.ceil(batches / n) * batch_s + costs_s + math.ceil(len(TASKS) / n) * tune_batch_s for n in PROCESSES
    }
    entry_ms = entries_s * 1e3 / (layers * len(policies) * len(GRID))
    result = {
        "meta": {
            "model": name,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "torch": torch.__version__,
            "layers": layers,
            "prompt_tokens": length,
            "scored_tokens": SCORED,
            "batch": len(batch),
            "prompts_per_task": args.prompts,
            "tasks": len(TASKS),
            "policies": list(policies),
            "grid": list(GRID),
            "timed_layers": timed_layers,
        },
        "capture_s": capture_s,
        "entry_ms": {"all": entry_ms, **{p: statistics.mean(s) * 1e3 for p, s in per_policy.items()}},
        "layer_ms_per_entry": {layer: s * 1e3 / (len(policies) * len(GRID)) for layer, s in per_layer.items()},
        "batch_s": {"extrapolated": batch_s, "measured": measured_batch_s},
        "prefill_costs_s": costs_s,
        "tuning": {"capture_s": tune_capture_s, "plan_s": plan_s, "plans": plans, "batch_s": tune_batch_s},
        "profile": {"batches": batches, "entries": table_entries, "seconds_by_processes": profile},
    }
    if device.type == "cuda":
        result["meta"]["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    print(_table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"calibration_cost_{'quick' if args.quick else result['meta']['device'].replace(' ', '-')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {path}")


def whole_profile(args: argparse.Namespace) -> None:
    """``--whole``: ``polykv.calibration.calibrate`` with its defaults (the policies, the grid, ``--prompts`` per task,
    tuning on held-out prompts), timed from the first prompt to the profile. Started by torchrun, each process
    takes its own GPU (or the CPU with ``--quick``) and a share of the prompts, as ``polykv calibrate`` does.
    The first process writes the time and the profile (``calibration_whole_<device>_<N>p``), so that runs on
    different numbers of processes can be compared: their profiles are equal but for the prefill costs."""
    from polykv.calibration.calibrate import calibrate
    from polykv.harness.processes import joined

    with joined("cpu" if args.quick else "cuda") as (processes, place):
        device = torch.device(place)
        if args.quick:
            model, name = tiny_model("llama", layers=4, max_position_embeddings=1024), "tiny-llama"
        else:
            from shapes import llama_8b

            model, name = llama_8b(device_map={"": device.index or 0}), "llama-8b"
        length = args.length or (96 if args.quick else 1024)
        vocabulary = model.config.vocab_size
        samples = _samples(args.prompts, length, vocabulary, seed=0)
        held_out = _samples(TUNE_SAMPLES, length, vocabulary, seed=10_000)
        if processes.main:
            print(f"{name}: the whole profile on {processes.size} process(es)", flush=True)
        with _Stopwatch(device) as watch:
            profile = calibrate(
                model, samples, batch_size=args.batch, tune_on=held_out, tokenizer=WordTokenizer(),
                processes=processes, progress=processes.main,
            )  # fmt: skip
    if not processes.main:
        return
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    batch = "" if args.batch == 4 else f"_batch{args.batch}"
    stem = f"calibration_whole_{'quick' if args.quick else where.replace(' ', '-')}_{processes.size}p{batch}"
    args.out.mkdir(parents=True, exist_ok=True)
    profile.save(args.out / f"{stem}.profile.json")
    result = {
        "model": name, "device": where, "processes": processes.size, "prompts_per_task": args.prompts,
        "batch": args.batch, "tasks": len(TASKS), "prompt_tokens": length, "seconds": watch.seconds,
        "torch": torch.__version__,
    }  # fmt: skip
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"the whole profile took {watch.seconds:.1f} s on {processes.size} process(es); wrote {args.out / stem}.json")


def _samples(per_task: int, length: int, vocabulary: int, seed: int) -> list[Sample]:
    """``per_task`` random prompts of each calibration task (the tokens do not change what a pass costs)."""
    generator = torch.Generator().manual_seed(seed)
    found = []
    for task, form in TASKS:
        for n in range(per_task):
            prompt = torch.randint(3, vocabulary, (length,), generator=generator).tolist()
            target = torch.randint(3, vocabulary, (SCORED,), generator=generator).tolist()
            found.append(Sample(task, form, seed + n, "calibration", prompt, target, ()))
    return found


class _Stopwatch:
    """Wall seconds of a ``with`` block, the device synchronised at both ends."""

    def __init__(self, device: torch.device):
        self.device, self.seconds, self._began = device, 0.0, 0.0

    def __enter__(self) -> _Stopwatch:
        _synchronize(self.device)
        self._began = time.perf_counter()
        return self

    def __exit__(self, *exception) -> None:
        _synchronize(self.device)
        self.seconds = time.perf_counter() - self._began


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _spread(layers: int, count: int) -> list[int]:
    """``count`` layers from the first to the last, evenly apart."""
    return [round(i * (layers - 1) / (count - 1)) for i in range(count)] if layers > count else list(range(layers))


def _interpolate(measured: dict[int, float], layer: int) -> float:
    """A layer's seconds, linearly between the nearest measured layers (the nearest one beyond them)."""
    known = sorted(measured)
    below = max((k for k in known if k <= layer), default=known[0])
    above = min((k for k in known if k >= layer), default=known[-1])
    if below == above:
        return measured[below]
    share = (layer - below) / (above - below)
    return measured[below] * (1 - share) + measured[above] * share


def _table(result: dict) -> str:
    meta, profile = result["meta"], result["profile"]
    batch = result["batch_s"]
    timed = "-" if batch["measured"] is None else f"{batch['measured']:.1f} s"
    lines = [
        "",
        f"| {meta['model']} ({meta['dtype']}) on {meta['device']} | |",
        "| --- | --- |",
        f"| capture of a batch ({meta['batch']} x {meta['prompt_tokens']} tokens) | {result['capture_s']:.2f} s |",
        f"| table entry, all policies, layers interpolated | {result['entry_ms']['all']:.1f} ms |",
        *(f"| table entry, {p} (timed layers) | {ms:.1f} ms |" for p, ms in result["entry_ms"].items() if p != "all"),
        f"| batch ({meta['layers']} x {len(meta['policies'])} x {len(meta['grid'])} entries), extrapolated "
        f"| {batch['extrapolated']:.1f} s |",
        f"| batch through measure, timed | {timed} |",
        f"| prefill costs (timed once, on the first process) | {result['prefill_costs_s']:.1f} s |",
        f"| tuning batch ({result['tuning']['plans']} plans) | {result['tuning']['batch_s']:.1f} s |",
        f"| profile: {profile['batches']} batches, {profile['entries']} entries, {meta['prompts_per_task']} prompts "
        f"x {meta['tasks']} tasks | |",
        *(
            f"| ... on {n} process{'es' if n > 1 else ''} | {seconds / 60:.1f} min ({seconds:.0f} s) |"
            for n, seconds in profile["seconds_by_processes"].items()
        ),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

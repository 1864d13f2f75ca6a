"""``polykv calibrate``: measure a model's per-layer sensitivity and save it as a profile."""

from __future__ import annotations

import argparse
import sys

from polykv.calibration.calibrate import calibrate, check_policies
from polykv.calibration.samples import GRID, POLICIES, TASKS, calibration_samples, read_samples, tuning_samples
from polykv.cli.commands import setup
from polykv.errors import PolykvError
from polykv.harness.processes import joined
from polykv.registry import default_registry
from polykv.tasks.tasks import CONTINUATION


def run(args: argparse.Namespace) -> int:
    from polykv.model import load_model

    registry = default_registry()
    policies = args.policies or list(POLICIES)
    check_policies(policies, registry, "--policies")
    if args.data and args.tasks:
        raise PolykvError("--tasks picks generated tasks and --data brings samples of your own: give one of them")
    tasks = setup.task_formats(args.tasks) if args.tasks else TASKS  # before the model loads
    if args.length < 64:
        raise PolykvError("--length: generated prompts are at least 64 tokens")
    if args.grid and not args.data and max(args.grid) > args.length:
        above = " ".join(str(budget) for budget in args.grid if budget > args.length)
        raise PolykvError(
            f"--grid {above}: a budget above --length {args.length} keeps the whole prompt, so it measures nothing "
            f"(and would tell auto that such a budget loses nothing at any length): give budgets up to {args.length}"
        )
    setup.writable(args.out, "--out")
    with joined(setup.device(args)) as (processes, device):  # torchrun: each process takes a share of the prompts
        location = setup.model_location(args)
        if processes.main:
            print(f"loading {location.name}", file=sys.stderr)
        model, tokenizer = load_model(location, device=device)
        if not args.data:
            extra = CONTINUATION + 2  # the scored tokens after a prompt, and a little for answers
            setup.within_positions(
                model, args.length + extra, f"--length {args.length:,}: prompts and {extra} tokens after them"
            )
        tune_on = []
        if args.data:
            samples, data = read_samples(args.data, tokenizer), str(args.data)
        else:
            options = {"length": args.length, "seed": args.seed, "tasks": tasks}
            samples = calibration_samples(tokenizer, count=args.samples, **options)
            if args.tune_samples:
                tune_on = tuning_samples(tokenizer, count=args.tune_samples, **options)
            data = f"generated: {', '.join(f'{t}:{f}' for t, f in tasks)}, {args.samples} each, seed {args.seed}"
        profile = calibrate(
            model,
            samples,
            policies=policies,
            grid=args.grid or GRID,
            registry=registry,
            batch_size=args.batch,
            tune_on=tune_on,
            pad_token_id=tokenizer.pad_token_id,
            settings={"data": data, "model": location.name, "command": setup.command_line()},
            setting=args.setting,
            objective=args.objective,
            heads=args.heads,
            tokenizer=tokenizer,
            processes=processes,
        )
        if processes.main:
            profile.save(args.out)
            counts = f"{len(profile.tasks)} tasks, {len(profile.policies)} policies"
            counts += ", each KV head measured" if profile.measures_heads else ""
            print(f"wrote {args.out}: {counts}, grid {list(profile.grid)}")
    return 0

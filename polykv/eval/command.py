"""``polykv eval``: compare methods at equal stored tokens on generated tasks, and report gap recovery."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from polykv.errors import PolykvError

#: What the bundled model solves with the full cache (benchmarks/results/task_capability_*.json).
DEFAULT_TASKS = ("niah", "niah:chat", "multikey", "multikey:chat", "passkey", "continue")
DEFAULT_METHODS = (
    "full",
    "streaming",
    "snapkv",
    "pyramidkv",
    "h2o",
    "tova",
    "knorm",
    "pyramid",
    "cake",
    "polykv",
    "polykv-budgets",
)
DEFAULT_BUDGETS = (32, 64, 128, 256)
QUICK = {
    "tasks": ("passkey", "continue"),
    "methods": ("full", "snapkv", "tova", "polykv"),
    "budgets": (64, 128),
    "count": 2,
    "length": 512,
}


def add_eval_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="compare methods at equal stored tokens on generated tasks; report gap recovery",
        description=__doc__,
    )
    parser.add_argument("--model", metavar="DIR", help="a local model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"names or spec templates with {{budget}} (default: {' '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument(
        "--budgets", nargs="+", type=int, metavar="N", help="average tokens per layer (default: 32 64 128 256)"
    )
    parser.add_argument(
        "--tasks", nargs="+", metavar="TASK", help="task or task:chat (default: " + " ".join(DEFAULT_TASKS) + ")"
    )
    parser.add_argument("--count", type=int, default=20, help="samples per task (default 20)")
    parser.add_argument("--length", type=int, default=1024, help="prompt tokens (default 1024)")
    parser.add_argument("--seed", type=int, default=0, help="first sample seed (default 0)")
    parser.add_argument(
        "--profile", metavar="FILE", help="calibration profile for auto methods (default: the bundled model's)"
    )
    parser.add_argument("--batch", type=int, default=8, help="samples per shared prefill (default 8)")
    parser.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for results.jsonl, report.md, plots"
    )
    parser.add_argument("--graded-only", action="store_true", help="skip greedy answers (accuracy): graded scores only")
    parser.add_argument("--quick", action="store_true", help="a small run (2 tasks, 4 methods, 2 budgets, 2 samples)")
    parser.set_defaults(run=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from polykv.eval.report import markdown, plots, summary
    from polykv.eval.runner import method, run
    from polykv.eval.tasks import FORMATS, TASKS, samples
    from polykv.model import default_model_location, load_model, locate

    chosen_tasks = args.tasks or (QUICK["tasks"] if args.quick else DEFAULT_TASKS)
    parsed = []
    for text in chosen_tasks:
        task, _, form = text.partition(":")
        if task not in TASKS or (form or "raw") not in FORMATS:
            raise PolykvError(f"--tasks {text}: tasks are {', '.join(TASKS)}, optionally :chat (or :raw)")
        parsed.append((task, form or "raw"))
    methods = [method(m) for m in (args.methods or (QUICK["methods"] if args.quick else DEFAULT_METHODS))]
    budgets = args.budgets or (QUICK["budgets"] if args.quick else DEFAULT_BUDGETS)
    if any(b < 1 for b in budgets) or args.count < 1 or args.length < 16:
        raise PolykvError("budgets and --count are at least 1, --length at least 16")
    count = QUICK["count"] if args.quick else args.count
    length = QUICK["length"] if args.quick else args.length
    location = locate(args.model) if args.model else default_model_location()
    print(f"loading {location}", file=sys.stderr)
    model, tokenizer = load_model(location)
    chosen = [
        sample
        for task, form in parsed
        for sample in samples([task], tokenizer, length=length, count=count, formats=(form,), first_seed=args.seed)
    ]
    records = run(
        model,
        tokenizer,
        chosen,
        methods,
        budgets,
        args.out,
        profile=args.profile,
        batch_size=args.batch,
        answers=not args.graded_only,
    )
    data = summary(records)
    data["settings"] = {
        "model": str(location),
        "tasks": [f"{t}:{f}" for t, f in parsed],
        "count": count,
        "length": length,
        "seed": args.seed,
        "profile": args.profile or "bundled",
        "command": " ".join(["polykv", *sys.argv[1:]]) if sys.argv[0].endswith("polykv") else None,
    }
    text = markdown(data)
    (args.out / "report.md").write_text(text, encoding="utf-8")
    (args.out / "summary.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    written = plots(data, args.out)
    print(text)
    print(f"wrote {args.out / 'report.md'}, {args.out / 'summary.json'}" + "".join(f", {p}" for p in written))
    return 0

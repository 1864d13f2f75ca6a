"""``polykv eval``: compare methods at equal stored tokens on generated tasks, and report gap recovery.

The default tasks are those the bundled model solves with the full cache
(benchmarks/results/task_capability_*.json): single-needle and multi-key retrieval in both prompt
formats, the raw passkey, and plain continuation; variable tracking is left out (the model
answers it at chance).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from polykv.cli.commands import setup
from polykv.cli.main import EVAL_BUDGETS, EVAL_DEFAULTS, EVAL_METHODS, EVAL_SETTINGS, EVAL_TASKS
from polykv.files import write_text


class QuickRun(TypedDict):
    """What ``--quick`` scores in place of the defaults (typed per key: the values differ in type)."""

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[int, ...]
    count: int
    length: int
    settings: tuple[str, ...]


#: A small run, for the test suite and a first look.
QUICK: QuickRun = {
    "tasks": ("passkey", "continue"),
    "methods": ("full", "snapkv", "tova", "polykv"),
    "budgets": (64, 128),
    "count": 2,
    "length": 256,
    "settings": ("question",),
}


def run(args: argparse.Namespace) -> int:
    if args.report_only:
        return _report_again(args)
    from polykv.evaluation.runner import method
    from polykv.evaluation.runner import run as evaluate
    from polykv.harness.processes import joined
    from polykv.model import load_model
    from polykv.tasks.loader import read_jsonl
    from polykv.tasks.tasks import CONTINUATION, samples

    parsed = setup.task_formats(args.tasks or (QUICK["tasks"] if args.quick else EVAL_TASKS))
    methods = [method(m) for m in (args.methods or (QUICK["methods"] if args.quick else EVAL_METHODS))]
    budgets = args.budgets or (QUICK["budgets"] if args.quick else EVAL_BUDGETS)
    count = QUICK["count"] if args.quick else args.count
    length = QUICK["length"] if args.quick else args.length
    chosen_settings = args.settings or (QUICK["settings"] if args.quick else EVAL_SETTINGS)
    for each in methods:  # a template's mistakes before the model loads
        each.check(budgets[0])
    setup.writable(args.out, "--out", folder=True)  # the folder itself is made when missing
    _same_run_as_before(args.out, args, length)
    with joined(setup.device(args)) as (processes, device):  # torchrun: each process takes a share of the batches
        location = setup.model_location(args)
        if processes.main:
            print(f"loading {location.name}", file=sys.stderr)
        model, tokenizer = load_model(location, device=device)
        extra = CONTINUATION + 2  # the scored tokens after a prompt, and a little for answers
        setup.within_positions(model, length + extra, f"--length {length:,}: prompts and {extra} tokens after them")
        if args.data:
            chosen = read_jsonl(args.data, tokenizer, max_length=length)
            parsed = sorted({(s.task, s.format) for s in chosen})
        else:
            chosen = [
                sample
                for task, form in parsed
                for sample in samples(
                    [task], tokenizer, length=length, count=count, formats=(form,), first_seed=args.seed
                )
            ]
        records = evaluate(
            model,
            tokenizer,
            chosen,
            methods,
            budgets,
            args.out,
            profile=args.profile,
            batch_size=args.batch,
            answers=not args.graded_only,
            settings=chosen_settings,
            processes=processes,
        )
        if not processes.main:
            return 0
    # --out may hold other tasks, methods or budgets from earlier runs: this report is of this run's.
    asked = {(s.task, s.format, s.seed) for s in chosen}
    names, every_budget = {m.name for m in methods}, {*budgets, 0}  # the full cache is scored at budget 0
    records = [
        r for r in records if (r.task, r.format, r.seed) in asked and r.method in names and r.budget in every_budget
    ]
    settings = {
        "model": location.name,
        "tasks": [f"{t}:{f}" for t, f in parsed],
        "count": count,
        "length": length,
        "seed": args.seed,
        "profile": args.profile or "bundled",
        "command": setup.command_line(),
    }
    _report(records, settings, chosen_settings, args.out)
    return 0


#: What a resumed run must share with the run that began its --out folder: results are keyed by task, seed, method
#: and budget, so a run with another prompt length, model, profile or data file would take the old scores as its own.
RUN_FILE = "run.json"


def _same_run_as_before(out: Path, args: argparse.Namespace, length: int) -> None:
    """Begin ``out``'s record of what its results were scored with, or refuse a run that differs from it."""
    from polykv.errors import ArgumentError

    run = {
        "model": str(args.model or "default"),
        "length": length,
        "profile": str(args.profile) if args.profile else None,
        "data": str(Path(args.data).resolve()) if args.data else None,
    }
    path = out / RUN_FILE
    if not path.exists():
        if (out / "results.jsonl").exists():
            return  # results from before run.json: nothing to compare with
        out.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(run, indent=1) + "\n")
        return
    before = json.loads(path.read_text(encoding="utf-8"))
    differ = [f"{key} {before.get(key)} there, {value} now" for key, value in run.items() if before.get(key) != value]
    if differ:
        raise ArgumentError(
            f"--out {out} holds results scored with other settings ({'; '.join(differ)}), which this run would "
            "take as its own: name another --out folder, or move that one away"
        )


def _report_again(args: argparse.Namespace) -> int:
    """``--report-only``: the report of what ``--out`` holds, as the run that scored it wrote it (for a report
    whose tables changed since)."""
    from polykv.errors import ArgumentError
    from polykv.evaluation.runner import read

    scoring = {
        "--methods": args.methods, "--budgets": args.budgets, "--tasks": args.tasks, "--data": args.data,
        "--profile": args.profile, "--model": args.model, "--device": args.device,
        "--graded-only": args.graded_only or None, "--quick": args.quick or None,
        **{f"--{name}": getattr(args, name) if getattr(args, name) != value else None
           for name, value in EVAL_DEFAULTS.items()},
    }  # fmt: skip
    given = [option for option, value in scoring.items() if value is not None]
    if given:
        raise ArgumentError(
            f"--report-only scores nothing, so {', '.join(given)} would change nothing: drop "
            f"{'it' if len(given) == 1 else 'them'} (the report is of every result --out holds; --settings "
            "picks the settings it shows)"
        )
    path = args.out / "results.jsonl"
    records = read(path)
    if not records:
        raise ArgumentError(f"--report-only: {path} holds no results; run polykv eval with --out {args.out} first")
    found = sorted({record.setting for record in records}, key=EVAL_SETTINGS.index)
    chosen = [setting for setting in args.settings or found if setting in found]
    if not chosen:
        raise ArgumentError(f"--report-only: {path} holds results of {', '.join(found)} only")
    settings = {}
    for setting in chosen:
        kept = args.out / f"summary{_suffix(setting)}.json"
        if kept.exists():  # the scoring run's settings (model, tasks, command); absent in older summaries
            settings = {k: v for k, v in json.loads(kept.read_text()).get("settings", {}).items() if k != "setting"}
            break
    _report(records, settings, chosen, args.out)
    return 0


def _report(records: list, settings: dict, chosen_settings: Sequence[str], out: Path) -> None:
    """Write report.md (a section per setting), and per setting its summary JSON and plots, into ``out``."""
    from polykv.evaluation.report import markdown, plots, summary

    sections, written = [], []
    for setting in chosen_settings:  # one report per setting: question inside the compressed prompt, or after
        data = summary([r for r in records if r.setting == setting])
        data["settings"] = {**settings, "setting": setting}
        suffix = _suffix(setting)
        sections.append(f"## {SETTING_TITLES[setting]}\n\n{markdown(data)}")
        write_text(out / f"summary{suffix}.json", json.dumps(data, indent=1) + "\n")
        written.append(out / f"summary{suffix}.json")
        written += plots(data, out, suffix=suffix)
    text = "\n".join(sections)
    write_text(out / "report.md", text)
    print(text)
    print(f"wrote {out / 'report.md'}" + "".join(f", {p}" for p in written))


def _suffix(setting: str) -> str:
    """What a setting's summary and plots add to their names: nothing for the question inside the prompt."""
    return "" if setting == "question" else f"-{setting}"


#: How the report names each setting.
SETTING_TITLES = {
    "question": "Question inside the compressed prompt",
    "context": "Context compressed first, question asked after it",
}

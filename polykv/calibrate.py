"""``polykv calibrate``: measure a model's per-layer sensitivity and save it as a profile.

The calibration set mixes retrieval (passkey, multi-key, span copy) with natural-text
continuation, generated offline from a seed and from the calibration half of the text
(``polykv.eval.text``), so a profile never sees the evaluation's prompts. Or bring your own with
``--data``: JSON lines ``{"task": ..., "context": ..., "continuation": ...}`` (texts; the
continuation is scored, teacher-forced).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from polykv.errors import PolykvError
from polykv.measure import CalibrationSample, measure
from polykv.profile import Profile, fingerprint
from polykv.registry import Registry, default_registry
from polykv.values import Value

#: The default calibration: tasks (with their formats), samples of each, prompt tokens, policies, budgets.
TASKS = (("passkey", "raw"), ("passkey", "chat"), ("multikey", "raw"), ("copy", "raw"), ("continue", "raw"))
SAMPLES, LENGTH = 4, 1024
POLICIES = ("pyramidkv", "snapkv", "tova", "h2o", "streaming")
GRID = (16, 32, 64, 128, 256, 512)


def calibration_samples(
    tokenizer, *, count: int = SAMPLES, length: int = LENGTH, seed: int = 0
) -> list[CalibrationSample]:
    """The default calibration set: ``count`` samples of each task, from the calibration text."""
    from polykv.eval.tasks import make

    return [
        CalibrationSample(f"{task}:{form}", torch.tensor(s.prompt), torch.tensor(s.target))
        for task, form in TASKS
        for s in (
            make(task, tokenizer, length=length, seed=seed + n, split="calibration", format=form) for n in range(count)
        )
    ]


def read_samples(path: Path, tokenizer) -> list[CalibrationSample]:
    """Calibration samples from JSON lines with ``task``, ``context`` and ``continuation`` texts."""
    found = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise PolykvError(f"{path}: cannot read the calibration data: {error}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            task, context, continuation = record["task"], record["context"], record["continuation"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise PolykvError(
                f"{path}:{number}: expected a JSON object with task, context and continuation ({error})"
            ) from None
        ids = tokenizer(context, return_tensors="pt").input_ids[0]
        scored = tokenizer(continuation, add_special_tokens=False, return_tensors="pt").input_ids[0]
        if len(scored) < 2:
            raise PolykvError(f"{path}:{number}: the continuation needs at least 2 tokens, it has {len(scored)}")
        found.append(CalibrationSample(str(task), ids, scored))
    if not found:
        raise PolykvError(f"{path}: no calibration samples")
    return found


def calibrate(
    model: torch.nn.Module,
    samples: Sequence[CalibrationSample],
    *,
    policies: Sequence[str] = POLICIES,
    grid: Sequence[int] = GRID,
    registry: Registry | None = None,
    batch_size: int = 4,
    settings: dict | None = None,
    progress: bool = True,
) -> Profile:
    """Measure ``model`` on ``samples`` and return the profile (tables, signals, and where they came from)."""
    from polykv.model import describe_model

    registry = registry or default_registry()
    chosen: dict[str, dict[str, Value]] = {name: dict(registry.create(name).values) for name in policies}
    signals = [entry.cls() for entry in registry.signals()]
    measured = measure(
        model,
        samples,
        policies=chosen,
        grid=grid,
        signals=signals,
        batch_size=batch_size,
        registry=registry,
        progress=progress,
    )
    info, _ = describe_model(model)
    return Profile(
        model=info,
        fingerprint=fingerprint(model),
        settings={
            "prompt_length": measured.prompt_length,
            "continuation_length": measured.continuation_length,
            "samples": dict(measured.samples),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "python": platform.python_version(),
            "torch": torch.__version__,
            **(settings or {}),
        },
        grid=measured.grid,
        policies=chosen,
        losses=measured.losses,
        signals=measured.signals,
        curves=measured.curves,
    )


def add_calibrate_command(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="measure a model's per-layer sensitivity to each policy and budget; save a profile",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", metavar="DIR", help="a local model (default: the bundled SmolLM2-135M-Instruct)")
    parser.add_argument("--out", type=Path, required=True, metavar="PROFILE.json", help="where to write the profile")
    parser.add_argument("--data", type=Path, metavar="FILE", help="JSON lines of task, context, continuation")
    parser.add_argument("--samples", type=int, default=SAMPLES, help=f"generated samples per task (default {SAMPLES})")
    parser.add_argument("--length", type=int, default=LENGTH, help=f"generated prompt tokens (default {LENGTH})")
    parser.add_argument("--seed", type=int, default=0, help="first seed of the generated samples (default 0)")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), help=f"default: {' '.join(POLICIES)}")
    parser.add_argument(
        "--grid", nargs="+", type=int, default=list(GRID), help=f"budgets (default: {' '.join(map(str, GRID))})"
    )
    parser.add_argument("--batch", type=int, default=4, help="prompts per captured prefill (default 4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.set_defaults(run=run_calibrate)


def run_calibrate(args: argparse.Namespace) -> int:
    from polykv.model import default_model_location, load_model, locate

    registry = default_registry()
    unknown = [name for name in args.policies if name not in registry]
    if unknown:
        raise PolykvError(f"--policies: unknown policy {unknown[0]!r}; installed: {', '.join(registry.names())}")
    if any(b < 1 for b in args.grid) or args.samples < 1 or args.length < 64:
        raise PolykvError("--grid budgets and --samples are at least 1, --length at least 64")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise PolykvError("--device cuda: no CUDA device is available")
    if not args.out.parent.exists():
        raise PolykvError(f"--out {args.out}: no folder {args.out.parent}")
    location = locate(args.model) if args.model else default_model_location()
    print(f"loading {location}", file=sys.stderr)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(location, device=device)
    if args.data:
        samples, data = read_samples(args.data, tokenizer), str(args.data)
    else:
        samples = calibration_samples(tokenizer, count=args.samples, length=args.length, seed=args.seed)
        data = f"generated: {', '.join(f'{t}:{f}' for t, f in TASKS)}, {args.samples} each, seed {args.seed}"
    profile = calibrate(
        model,
        samples,
        policies=args.policies,
        grid=args.grid,
        registry=registry,
        batch_size=args.batch,
        settings={"data": data, "model_path": str(location), "command": "polykv " + " ".join(sys.argv[1:])},
    )
    profile.save(args.out)
    print(f"wrote {args.out}: {len(profile.tasks)} tasks, {len(profile.policies)} policies, grid {list(profile.grid)}")
    return 0

"""The ``polykv`` command line: every command and its arguments; what each does is in ``polykv.cli.commands``.

Exit status: 0 on success, 1 when a spec or an input has errors (all of them are printed) or the
output cannot be written, 2 for a wrong command line, 130 when interrupted, 141 (as if killed by
SIGPIPE) when the reader of the output went away. Errors are messages, never tracebacks; set
``POLYKV_DEBUG=1`` to see the traceback of an internal error. Arguments are checked here, before
a command imports torch or loads a model. What polykv logs as a warning (a plugin it skipped) is
one line on standard error: ``polykv: skipped plugin polykv-x: why``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import math
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from polykv.errors import PolykvError
from polykv.language.diagnostics import SpecError
from polykv.limits import MAX_HEADS, MAX_LAYERS
from polykv.values import OBJECTIVES

#: Defaults of the evaluation (see polykv.cli.commands.eval for why these tasks).
EVAL_TASKS = ("niah", "niah:chat", "multikey", "multikey:chat", "passkey", "continue")
EVAL_METHODS = (
    "full", "streaming", "snapkv", "pyramidkv", "h2o", "tova", "knorm", "observed", "expected", "kvzip", "pyramid",
    "cake", "polykv", "polykv-budgets",
)  # fmt: skip
EVAL_BUDGETS = (32, 64, 128, 256)
EVAL_SETTINGS = ("question", "context")
#: The defaults of eval's other options that choose what is scored (which --report-only refuses when changed).
EVAL_DEFAULTS = {"count": 20, "length": 1024, "seed": 0, "batch": 8}
#: What --model takes, wherever it is taken.
MODEL_WORDS = "a folder, a .gguf file, or 'default' for the bundled SmolLM2-135M-Instruct"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logger = logging.getLogger("polykv")
    if _STDERR not in logger.handlers:
        logger.addHandler(_STDERR)
    stdout, sys.stdout = sys.stdout, _CheckedOutput(sys.stdout)
    try:
        module, _, function = args.run.partition(":")
        status = getattr(importlib.import_module(module), function)(args)
        sys.stdout.flush()  # a full disk shows here, while errors are still reported
        return status
    except BrokenPipeError:  # the reader went away (`polykv validate spec.pkv | head -1`): end quietly
        _discard_output(stdout)
        return 128 + signal.SIGPIPE
    except SpecError as error:
        print(error.format(), file=sys.stderr)
        return 1
    except PolykvError as error:
        print(f"polykv: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("polykv: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # the CLI reports internal errors, it does not crash
        if os.environ.get("POLYKV_DEBUG"):
            raise
        print(
            f"polykv: internal error: {type(error).__name__}: {error}\n"
            "  (run again with POLYKV_DEBUG=1 to see the traceback, and please report it)",
            file=sys.stderr,
        )
        return 2
    finally:
        sys.stdout = stdout


class OutputError(PolykvError):
    """Standard output cannot be written: a full disk, a closed stream."""


class _CheckedOutput:
    """Standard output whose failures are user errors: a full disk or a closed stream is an OutputError
    naming standard output; a closed pipe stays a BrokenPipeError, which ends the command quietly."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        return self._checked(lambda: self._stream.write(text))

    def flush(self) -> None:
        if self._stream is not None:  # a closed stream that was never written to is no error
            self._checked(lambda: self._stream.flush())

    def _checked(self, action):
        if self._stream is None:
            raise OutputError("cannot write to standard output: it is closed")
        try:
            return action()
        except BrokenPipeError:
            raise
        except (OSError, ValueError) as error:  # ValueError: writing to a closed file
            raise OutputError(f"cannot write to standard output: {getattr(error, 'strerror', None) or error}") from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _discard_output(stdout) -> None:
    """Point standard output at /dev/null, so that flushing it at exit fails no more."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # not a file (a test's capture): nothing to do
        os.dup2(os.open(os.devnull, os.O_WRONLY), stdout.fileno())


class _Stderr(logging.Handler):
    """polykv's log lines as ``polykv: message`` on the standard error of the moment (tests replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"polykv: {self.format(record)}", file=sys.stderr)


_STDERR = _Stderr(logging.WARNING)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polykv", description="Per-layer KV-cache compression for transformers.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check specs and print what each layer does")
    validate.add_argument("files", nargs="+", metavar="FILE", help="spec files (any suffix); - reads standard input")
    count = validate.add_mutually_exclusive_group()
    count.add_argument("--layers", type=_count(MAX_LAYERS), metavar="N", help="check against a model of N layers")
    count.add_argument(
        "--model", metavar="MODEL", help=f"check against the layer and KV head counts of a model ({MODEL_WORDS})"
    )
    validate.add_argument(
        "--heads", type=_count(MAX_HEADS), metavar="H", help="with --layers: check head selectors against H KV heads"
    )
    validate.add_argument("--json", action="store_true", help="print results as JSON")
    validate.set_defaults(run="polykv.cli.commands.language:validate")

    fmt = commands.add_parser("fmt", help="print specs in canonical form")
    fmt.add_argument("files", nargs="+", metavar="FILE", help="spec files; - reads standard input")
    fmt.add_argument(
        "--check",
        action="store_true",
        help="print no spec; name each file that is not canonical on stderr and exit 1 if any",
    )
    fmt.set_defaults(run="polykv.cli.commands.language:fmt")

    policies = commands.add_parser("policies", help="list installed policies, and the plugins skipped with why")
    policies.add_argument("--json", action="store_true", help="print as JSON (with signals and solvers)")
    policies.add_argument("--all", action="store_true", help="also list the signals and solvers")
    policies.set_defaults(run="polykv.cli.commands.language:policies")

    generate = commands.add_parser("generate", help="answer a prompt with a compressed cache and report its savings")
    spec = _spec_arguments(generate, "--spec", "spec text such as 'layers 0-1: full; *: snapkv@256'")
    spec.add_argument(
        "--draft-spec",
        metavar="SPEC",
        help="self-speculation: draft with a cache of this spec, keep what the full cache confirms (its exact output)",
    )
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the prompt text")
    prompt.add_argument("--prompt-file", type=Path, metavar="FILE", help="a file holding the prompt")
    _model_arguments(generate)
    generate.add_argument(
        "--budget", type=_budget, help="total budget for a spec without one (512, 'total 16384', '10%%')"
    )
    generate.add_argument(
        "--profile", metavar="FILE", help="calibration profile for auto (default: the bundled model's)"
    )
    generate.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    generate.add_argument(
        "--max-new-tokens", type=_count(100_000), default=32, metavar="N", help="tokens to generate (default 32)"
    )
    generate.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    generate.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa", help="attention kernel")
    generate.add_argument(
        "--static",
        action="store_true",
        help="decode with fixed-shape steps, replayed as CUDA graphs on a GPU (polykv.static_generate); "
        "with --draft-spec, checks of fixed shapes (the default where the draft allows)",
    )
    generate.add_argument(
        "--compile",
        action="store_true",
        help="with --static or --draft-spec: run the static steps' forwards through torch.compile (fewer, fused "
        "kernels per step, each new input shape compiled first; pays over long generations on a GPU)",
    )
    generate.add_argument(
        "--lookahead", type=_count(64), metavar="K", help="tokens drafted per check with --draft-spec (default 4)"
    )
    generate.add_argument(
        "--draft-tf32",
        action="store_true",
        help="with --draft-spec, float32 on CUDA: draft with TF32 matrix products, check in float32 (the same "
        "output; cheaper draft steps)",
    )
    generate.add_argument(
        "--draft-dtype",
        choices=("bfloat16", "float16"),
        help="with --draft-spec: draft with a copy of the model's weights, and a draft cache, in this dtype, and "
        "check with the model as loaded (the same output; draft steps that read half the bytes)",
    )
    sampling = generate.add_argument_group("sampling (any of these samples instead of choosing the likeliest token)")
    sampling.add_argument("--temperature", type=_temperature, metavar="T", help="divides the logits (default 1)")
    sampling.add_argument("--top-k", type=_count(1_000_000), metavar="K", help="draw among the K likeliest tokens")
    sampling.add_argument(
        "--top-p", type=_probability, metavar="P", help="draw among the likeliest tokens holding probability P"
    )
    sampling.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    generate.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="what auto routes for, and so which profile it reads: kl, or acceptance "
        "(default: acceptance for a --draft-spec, kl otherwise)",
    )
    generate.set_defaults(run="polykv.cli.commands.generate:run")

    calibrate = commands.add_parser(
        "calibrate",
        help="measure a model's per-layer sensitivity to each policy and budget; save a profile",
        description="Measure, for every layer, policy and budget, how far the model's next-token "
        "distributions move when only that layer is compressed; save it as a profile for auto.",
    )
    _model_arguments(calibrate)
    calibrate.add_argument("--out", type=Path, required=True, metavar="PROFILE.json", help="where to write the profile")
    calibrate.add_argument("--data", type=Path, metavar="FILE", help="JSON lines of task, context, continuation")
    calibrate.add_argument(
        "--tasks",
        nargs="+",
        metavar="TASK",
        help="generated tasks to measure on, task or task:chat (default: passkey passkey:chat niah multikey "
        "multikey:chat copy continue)",
    )
    calibrate.add_argument("--samples", type=_count(10_000), default=4, help="generated samples per task (default 4)")
    calibrate.add_argument(
        "--length", type=_count(1_000_000), default=1024, help="generated prompt tokens (default 1024)"
    )
    calibrate.add_argument("--seed", type=int, default=0, help="first seed of the generated samples (default 0)")
    calibrate.add_argument(
        "--tune-samples",
        type=_count(10_000, least=0),
        default=2,
        help="held-out samples per task that tune the solver (default 2; 0 skips tuning)",
    )
    calibrate.add_argument(
        "--policies", nargs="+", metavar="POLICY", help="default: pyramidkv tova h2o streaming observed kvzip"
    )
    calibrate.add_argument(
        "--grid", nargs="+", type=_count(1_000_000), metavar="N", help="budgets (default: 8 16 32 64 128 256 512)"
    )
    calibrate.add_argument(
        "--batch",
        type=_count(1024),
        default=4,
        help="prompts per captured prefill (default 4; on a GPU 16 costs little more a pass: an 8B profile took "
        "280 s on an H200 against 613 s estimated at 4)",
    )
    calibrate.add_argument(
        "--setting",
        choices=("question", "context"),
        default="question",
        help="measure with the question inside the compressed prompt (default), or asked after the compressed "
        "context; routing uses a profile of the setting it is asked for",
    )
    calibrate.add_argument(
        "--objective",
        choices=OBJECTIVES,
        default="kl",
        help="measure the KL divergence from the full cache (default), or the share of a speculative draft's "
        "proposals the full cache would refuse (acceptance); routing reads a profile of the objective it is asked for",
    )
    calibrate.add_argument(
        "--heads",
        action="store_true",
        help="also measure each KV head on its own, for specs that route and budget heads (`layers * heads *: "
        "auto@auto`); costs 1 + KV heads times the passes",
    )
    calibrate.set_defaults(run="polykv.cli.commands.calibrate:run")

    plan = commands.add_parser("plan", help="print (and draw) what a spec decides for each layer of a model")
    _spec_arguments(plan, "spec", "spec text such as 'budget 128; *: auto@auto'")
    _model_arguments(plan)
    plan.add_argument("--profile", metavar="FILE", help="calibration profile (default: the bundled model's)")
    plan.add_argument(
        "--context", type=_count(10_000_000), metavar="N", help="prompt length to plan for (default: the profile's)"
    )
    plan.add_argument("--budget", type=_budget, help="total budget for a spec without one (128, 'total 4096', '10%%')")
    plan.add_argument(
        "--prefill-limit",
        type=_factor,
        metavar="F",
        help="route auto layers so the prefill costs at most F times the full cache's (a spec without `prefill <=`)",
    )
    plan.add_argument("--png", type=Path, metavar="FILE", help="also draw the plan")
    plan.add_argument(
        "--setting",
        choices=("question", "context"),
        help="plan for the question inside the compressed prompt (default), or asked after the compressed context",
    )
    plan.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="route for outputs close to the full cache's (kl, default) or for a speculative draft (acceptance)",
    )
    plan.set_defaults(run="polykv.cli.commands.plan:run")

    evaluate = commands.add_parser("eval", help="compare methods at equal stored tokens on generated tasks")
    _model_arguments(evaluate)
    evaluate.add_argument(
        "--methods",
        nargs="+",
        metavar="METHOD",
        help=f"names or spec templates with {{budget}} (default: {' '.join(EVAL_METHODS)})",
    )
    evaluate.add_argument(
        "--budgets",
        nargs="+",
        type=_count(1_000_000),
        metavar="N",
        help="average tokens per layer (default: 32 64 128 256)",
    )
    evaluate.add_argument(
        "--tasks", nargs="+", metavar="TASK", help="task or task:chat (default: " + " ".join(EVAL_TASKS) + ")"
    )
    evaluate.add_argument(
        "--data", type=Path, metavar="FILE", help="JSON lines of your own samples (LongBench/RULER style)"
    )
    evaluate.add_argument(
        "--count", type=_count(100_000), default=EVAL_DEFAULTS["count"], help="samples per task (default 20)"
    )
    evaluate.add_argument(
        "--length",
        type=_count(1_000_000),
        default=EVAL_DEFAULTS["length"],
        help="prompt tokens of generated tasks; longer --data prompts keep their first and last halves (default 1024)",
    )
    evaluate.add_argument("--seed", type=int, default=EVAL_DEFAULTS["seed"], help="first sample seed (default 0)")
    evaluate.add_argument(
        "--profile", metavar="FILE", help="calibration profile for auto methods (default: the bundled model's)"
    )
    evaluate.add_argument(
        "--batch", type=_count(1024), default=EVAL_DEFAULTS["batch"], help="samples per shared prefill (default 8)"
    )
    evaluate.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="folder for results.jsonl, report.md, plots"
    )
    evaluate.add_argument(
        "--graded-only", action="store_true", help="skip greedy answers (accuracy): graded scores only"
    )
    evaluate.add_argument(
        "--settings",
        nargs="+",
        choices=EVAL_SETTINGS,
        help="where the question is when the cache is compressed: inside the prompt, or asked after the "
        "compressed context (default: both, reported apart; --quick: the question inside)",
    )
    evaluate.add_argument(
        "--quick",
        action="store_true",
        help="a small run (2 tasks, 4 methods, 2 budgets, 2 samples; the question inside the prompt)",
    )
    evaluate.add_argument(
        "--report-only",
        action="store_true",
        help="write the report, summaries and plots anew from --out's results.jsonl, scoring nothing",
    )
    evaluate.set_defaults(run="polykv.cli.commands.eval:run")
    return parser


def _spec_arguments(command: argparse.ArgumentParser, name: str, text: str) -> argparse._MutuallyExclusiveGroup:
    """The spec, as text (``name``) or a file (``--spec-file``): one of the two, never guessed from the text.
    Returns the group, for a command that takes its spec another way too."""
    given = command.add_mutually_exclusive_group(required=True)
    if name.startswith("--"):
        given.add_argument(name, dest="spec", metavar="SPEC", help=text)
    else:
        given.add_argument(name, nargs="?", metavar="SPEC", help=text)
    given.add_argument(
        "--spec-file", type=Path, metavar="FILE", help="a spec file (any suffix; - reads standard input)"
    )
    return given


def _model_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument("--model", metavar="MODEL", help=f"the model ({MODEL_WORDS}; default: default)")
    command.add_argument("--device", choices=("cpu", "cuda"), help="where the model runs (default: cuda when present)")


def _count(most: int, least: int = 1):
    """An argument type: a whole number from ``least`` to ``most``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"expected a number from {least} to {most:,}, got {text}")
        return value

    return parse


def _number(example: str, within: Callable[[float], bool], refusal: str, *, suffix: str = "") -> Callable[[str], float]:
    """An argument type: a finite number (``example`` shows one; ``suffix`` may follow it) for which ``within``
    holds, else the error ``refusal``."""

    def parse(text: str) -> float:
        try:
            value = float(text.removesuffix(suffix))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number such as {example}, got {text!r}") from None
        if not (math.isfinite(value) and within(value)):
            raise argparse.ArgumentTypeError(f"{refusal}, got {text}")
        return value

    return parse


_temperature = _number(
    "0.7", lambda value: value > 0, "a temperature is above 0 (for the likeliest token, leave it out)"
)
_probability = _number("0.9", lambda value: 0 < value <= 1, "expected a probability above 0 and at most 1")
#: --prefill-limit: a multiple of the full cache's prefill time (1.5 or 1.5x).
_factor = _number(
    "1.5", lambda value: value >= 1, "a prefill limit is at least 1 (the full cache's own prefill)", suffix="x"
)


def _budget(text: str) -> int | str:
    """--budget: tokens per layer (512), or budget text ('total 16384', '10%'), checked as the language checks it."""
    from polykv.language.check import check
    from polykv.language.parse import parse

    shown = text if len(text) <= 40 else f"{text[:30]}..."
    try:
        statements = parse(f"budget {text}", source="--budget").statements
    except SpecError as error:
        reason = error.diagnostics[0].message if error.diagnostics else ""
        raise argparse.ArgumentTypeError(f"expected 512, 'total 16384' or '10%', got {shown!r}: {reason}") from None
    if len(statements) != 1:
        raise argparse.ArgumentTypeError(f"expected one budget, got {text!r}")
    try:  # what the language refuses in a budget line (no tokens at all, a share past 100%)
        check(parse(f"budget {text}\nlayers *: full"))
    except SpecError as error:
        raise argparse.ArgumentTypeError(error.diagnostics[0].message) from None
    return int(text) if text.strip().isdigit() else text


if __name__ == "__main__":
    sys.exit(main())

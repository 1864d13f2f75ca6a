"""The ``polykv`` command: validate, fmt, policies and generate.

Exit status: 0 on success, 1 when a spec or an input has errors (all of them are printed),
2 for a wrong command line. Errors are messages, never tracebacks; set ``POLYKV_DEBUG=1`` to see
the traceback of an internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from polykv.calibrate import add_calibrate_command
from polykv.errors import PolykvError
from polykv.eval.command import add_eval_command
from polykv.generate import add_generate_command
from polykv.lang import ast
from polykv.lang.check import CheckedSpec, PhaseChoice, budget_to_dict, check_text, layer_ranges
from polykv.lang.diagnostics import SpecError
from polykv.lang.parse import parse_recovering
from polykv.lang.printer import format_budget, format_selector, print_spec
from polykv.plan_command import add_plan_command
from polykv.registry import Registry, default_registry
from polykv.values import format_value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polykv", description="Per-layer KV-cache compression for transformers.")
    commands = parser.add_subparsers(title="commands", required=True, metavar="COMMAND")

    validate = commands.add_parser("validate", help="check .pkv specs and summarise what each layer does")
    validate.add_argument("files", nargs="+", metavar="FILE", help="spec files; - reads standard input")
    count = validate.add_mutually_exclusive_group()
    count.add_argument("--layers", type=_positive, metavar="N", help="check against a model of N layers")
    count.add_argument("--model", metavar="DIR", help="check against the layer count of the model in DIR")
    validate.add_argument("--json", action="store_true", help="print results as JSON")
    validate.set_defaults(run=_validate)

    fmt = commands.add_parser("fmt", help="print a spec in canonical form")
    fmt.add_argument("files", nargs="+", metavar="FILE", help="spec files; - reads standard input")
    fmt.add_argument("--check", action="store_true", help="print nothing; exit 1 if a file is not canonical")
    fmt.set_defaults(run=_fmt)

    policies = commands.add_parser("policies", help="list installed policies and plugins that failed to load")
    policies.add_argument("--json", action="store_true", help="print as JSON")
    policies.set_defaults(run=_policies)

    add_generate_command(commands)
    add_calibrate_command(commands)
    add_plan_command(commands)
    add_eval_command(commands)
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected at least 1, got {value}")
    return value


def _read(name: str) -> str:
    if name == "-":
        return sys.stdin.read()
    try:
        return Path(name).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PolykvError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PolykvError(f"{name}: cannot read: {error}") from None


def _source_name(name: str) -> str:
    return "<stdin>" if name == "-" else name


# --- validate ----------------------------------------------------------------------------------


def _validate(args: argparse.Namespace) -> int:
    layers, layers_from = args.layers, "the model given by --layers"
    if args.model:
        from polykv.model import layer_count

        layers, layers_from = layer_count(args.model), f"the model in {args.model}"
    registry = default_registry()
    results = []
    failed = False
    for name in args.files:
        try:
            checked = check_text(
                _read(name), _source_name(name), layers=layers, layers_from=layers_from, registry=registry
            )
        except SpecError as error:
            failed = True
            results.append((name, None, error))
        else:
            results.append((name, checked, None))
    if args.json:
        print(json.dumps({"ok": not failed, "files": [_result_json(*r) for r in results]}, indent=2))
    else:
        for name, checked, error in results:
            if error is not None:
                print(error.format(), file=sys.stderr)
            else:
                print(_summary(_source_name(name), checked))
    return 1 if failed else 0


def _result_json(name: str, checked: CheckedSpec | None, error: SpecError | None) -> dict:
    if error is not None:
        return {"file": _source_name(name), "ok": False, "errors": [d.to_dict() for d in error.diagnostics]}
    result: dict = {"file": _source_name(name), "ok": True, "layer_count": checked.layer_count}
    decl = checked.budget
    result["budget"] = None if decl is None else {"total": decl.total, **budget_to_dict(decl.amount)}
    if checked.layers is not None:
        result["layers"] = [
            {"layer": e.index, "prefill": _choice_json(e.prefill), "decode": _choice_json(e.decode)}
            for e in checked.layers
        ]
    else:
        result["rules"] = [
            {
                "selector": format_selector(r.rule.selector),
                "prefill": _choice_json(r.prefill),
                "decode": _choice_json(r.decode),
            }
            for r in checked.rules
        ]
    return result


def _choice_json(choice: PhaseChoice | None) -> dict | None:
    return None if choice is None else choice.to_dict()


def _summary(name: str, checked: CheckedSpec) -> str:
    if checked.layers is not None:
        header = f"{name}: ok ({checked.layer_count} layers)"
        groups: list[tuple[list[int], PhaseChoice, PhaseChoice | None]] = []
        for entry in checked.layers:
            if groups and groups[-1][1:] == (entry.prefill, entry.decode) and groups[-1][0][-1] == entry.index - 1:
                groups[-1][0].append(entry.index)
            else:
                groups.append(([entry.index], entry.prefill, entry.decode))
        rows = [(layer_ranges(indices), prefill, decode) for indices, prefill, decode in groups]
        footer = []
    else:
        header = f"{name}: ok"
        rows = [(format_selector(r.rule.selector), r.prefill, r.decode) for r in checked.rules]
        footer = ["  layer count unknown: give --layers N or --model DIR to check coverage and ranges"]
    table = [("layers", "policy", "budget", "parameters", "decode")]
    for selector, prefill, decode in rows:
        table.append(
            (
                selector,
                prefill.policy + (f"[{', '.join(prefill.candidates)}]" if prefill.candidates else ""),
                "all" if prefill.budget is None else format_budget(prefill.budget),
                ", ".join(f"{k}={format_value(v)}" for k, v in prefill.params.items()),
                decode.describe() if decode is not None else "",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    lines = [header] + ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    decl = checked.budget
    if decl is not None:
        lines.append("  " + _budget_words(decl, checked.layer_count))
    return "\n".join(lines + footer)


def _budget_words(decl: ast.BudgetDecl, layer_count: int | None) -> str:
    amount = decl.amount
    if isinstance(amount, ast.Percent):
        return f"total budget: {format_budget(amount)} of the context per layer on average"
    if decl.total:
        return f"total budget: {amount.count} tokens"
    in_all = f" ({amount.count * layer_count} in all)" if layer_count else ""
    return f"total budget: {amount.count} tokens per layer on average{in_all}"


# --- fmt ---------------------------------------------------------------------------------------


def _fmt(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        text = _read(name)
        spec, diagnostics = parse_recovering(text, _source_name(name))
        if diagnostics:
            raise SpecError(diagnostics)
        canonical = print_spec(spec)
        if args.check:
            if canonical != text:
                print(f"{_source_name(name)}: not in canonical form (polykv fmt prints it)", file=sys.stderr)
                status = 1
        else:
            sys.stdout.write(canonical)
    return status


# --- policies ----------------------------------------------------------------------------------


def _policies(args: argparse.Namespace) -> int:
    registry = default_registry()
    if args.json:
        print(json.dumps(_policies_json(registry), indent=2))
        return 0
    lines = []
    for entry in registry:
        source = f"{entry.distribution} {entry.version}".strip()
        lines.append(f"{entry.name}  ({source})")
        lines.append(f"    {entry.policy.description}")
        for param in entry.policy.parameters:
            bounds = f", {param.range_words()}" if param.min is not None or param.max is not None else ""
            choices = f", one of {', '.join(param.choices)}" if param.choices else ""
            default = json.dumps(param.default)
            lines.append(f"    {param.name}: {param.type.__name__} = {default}{bounds}{choices}  {param.description}")
    if not len(registry):
        lines.append("no policies installed")
    if registry.failures:
        lines.append("")
        lines.append("failed to load:")
        lines.extend(f"    {failure}" for failure in registry.failures)
    print("\n".join(lines))
    return 0


def _policies_json(registry: Registry) -> dict:
    return {
        "policies": [
            {
                "name": entry.name,
                "description": entry.policy.description,
                "distribution": entry.distribution,
                "version": entry.version,
                "plugin": entry.plugin,
                "budgeted": entry.policy.budgeted,
                "parameters": [
                    {
                        "name": p.name,
                        "type": p.type.__name__,
                        "default": p.default,
                        "min": p.min,
                        "max": p.max,
                        "choices": list(p.choices),
                        "description": p.description,
                    }
                    for p in entry.policy.parameters
                ],
            }
            for entry in registry
        ],
        "failures": [
            {"distribution": f.distribution, "plugin": f.plugin, "reason": f.reason} for f in registry.failures
        ],
    }


if __name__ == "__main__":
    sys.exit(main())

"""``polykv validate``, ``polykv fmt`` and ``polykv policies``: the language and what is installed.

``validate`` prints what each layer does as statements of the language, every parameter written
out, so its output is itself a valid spec; ``--json`` is for machines.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, overload

from polykv.errors import PolykvError
from polykv.files import UnreadableFile
from polykv.language import ast
from polykv.language.diagnostics import Diagnostic, SpecError
from polykv.language.parse import parse_recovering
from polykv.language.printer import format_budget, format_selector, layer_ranges, layer_runs, print_spec
from polykv.language.source import read_source
from polykv.values import format_use

if TYPE_CHECKING:  # checking needs the installed policies, which import torch: fmt does without
    from polykv.language.check import CheckedSpec, PhaseChoice, SolverChoice
    from polykv.registry import Registry


def validate(args: argparse.Namespace) -> int:
    from polykv.language.check import check_text
    from polykv.registry import default_registry

    if args.heads is not None and args.layers is None:
        raise PolykvError(
            "--heads H checks head selectors against H KV heads of a model of --layers N layers: add --layers"
            + (" (--model gives the model's own KV heads: drop --heads)" if args.model else "")
        )
    layers, layers_from = args.layers, "the model given by --layers"
    heads = args.heads
    if args.model:
        from polykv.model import kv_head_count, layer_count, locate

        location = locate(args.model)
        layers, layers_from = layer_count(location), f"the model ({location.name})"
        heads = kv_head_count(location)
    registry = default_registry()
    results: list[tuple[str, CheckedSpec | None, SpecError | None]] = []
    for name in args.files:
        try:
            source = read_source(name)
            checked = check_text(
                source.text, source.name, layers=layers, layers_from=layers_from, registry=registry, heads=heads
            )
        except UnreadableFile as error:
            results.append((name, None, SpecError([Diagnostic("unreadable-file", str(error))])))
        except SpecError as error:
            results.append((source.name, None, error))
        else:
            results.append((source.name, checked, None))
    if args.json:
        failed = any(error is not None for _, _, error in results)
        print(json.dumps({"ok": not failed, "files": [_result_json(*r) for r in results]}, indent=2))
    else:
        for name, found, problem in results:
            if problem is not None:
                print(problem.format(), file=sys.stderr)
            else:
                assert found is not None  # a file without errors was checked
                print(summary(name, found))
    return 1 if any(error is not None for _, _, error in results) else 0


def summary(name: str, checked: CheckedSpec) -> str:
    """``NAME: ok (N layers)`` and what each run of layers does, as statements of the language."""
    if checked.layers is not None:
        header = f"{name}: ok ({checked.layer_count} layers" + (
            f", {checked.head_count} KV heads each)" if checked.selects_heads else ")"
        )
        runs = layer_runs([(entry.choices, entry.adaptive_heads) for entry in checked.layers])
        rules = [
            (layer_ranges(indices) + heads, prefill, decode)
            for indices, (choices, adaptive) in runs
            for heads, (prefill, decode) in _head_runs(choices, adaptive)
        ]
    else:
        unknown = "layer count" if checked.layer_count is None else "KV head count"
        give = "--layers N" if checked.layer_count is None else "--heads H"
        header = f"{name}: ok ({unknown} unknown: give {give} or --model MODEL to check coverage and ranges)"
        rules = [
            (format_selector(r.rule.selector) + _heads_words(r.rule.heads), r.prefill, r.decode) for r in checked.rules
        ]
    lines = [header]
    if checked.budget is not None:
        lines.append("  " + _budget_statement(checked.budget, checked.layer_count))
    if checked.prefill_limit is not None:
        lines.append(f"  prefill <= {checked.prefill_limit:g}x  # auto layers route within this prefill time")
    if checked.solver is not None:
        lines.append("  " + _solver_statement(checked.solver))
    for selector, prefill, decode in rules:
        statement = f"layers {selector}: {prefill.describe()}"
        lines.append("  " + statement + (f" decode {decode.describe()}" if decode is not None else ""))
    return "\n".join(lines)


def _head_runs(choices: tuple, adaptive: bool = False) -> list[tuple[str, tuple]]:
    """`` heads 0-1`` and what those heads do, for each run of heads doing the same ("" for a whole layer, `` heads
    adaptive`` for one whose heads share its budget)."""
    if adaptive:
        return [(" heads adaptive", choices[0])]
    if len(choices) == 1:
        return [("", choices[0])]
    return [(f" heads {layer_ranges(heads)}", choice) for heads, choice in layer_runs(list(choices))]


def _heads_words(heads: ast.HeadList | None) -> str:
    return "" if heads is None else f" heads {format_selector(heads)}"


def _budget_statement(decl: ast.BudgetDecl, layer_count: int | None) -> str:
    amount = decl.amount
    if isinstance(amount, ast.Percent):
        return f"budget {format_budget(amount)}  # of the prompt per layer on average"
    if decl.total:
        return f"budget total {amount.count}  # tokens over all layers"
    in_all = f", {amount.count * layer_count} in all" if layer_count else ""
    return f"budget {amount.count}  # tokens per layer on average{in_all}"


def _solver_statement(solver: SolverChoice) -> str:
    return "solver " + format_use(solver.name, None, solver.params)


def _result_json(name: str, checked: CheckedSpec | None, error: SpecError | None) -> dict:
    if error is not None:
        errors = [d.to_dict() for d in error.diagnostics]
        return {"file": name, "ok": False, "errors": errors, "unreported_errors": error.unreported}
    assert checked is not None  # a file without errors was checked
    result: dict = {"file": name, "ok": True, "layer_count": checked.layer_count}
    decl = checked.budget
    result["budget"] = None if decl is None else {"total": decl.total, **_budget_json(decl.amount)}
    result["prefill_limit"] = checked.prefill_limit
    result["solver"] = (
        None if checked.solver is None else {"name": checked.solver.name, "params": dict(checked.solver.params)}
    )
    if checked.layers is not None:
        result["head_count"] = checked.head_count
        result["layers"] = [
            {
                "layer": e.index,
                "prefill": _choice_json(e.prefill),
                "decode": _choice_json(e.decode),
                **({"adaptive_heads": True} if e.adaptive_heads else {}),
                **(
                    {
                        "heads": [
                            {"head": h.head, "prefill": _choice_json(h.prefill), "decode": _choice_json(h.decode)}
                            for h in e.heads
                        ]
                    }
                    if e.heads
                    else {}
                ),
            }
            for e in checked.layers
        ]
    else:
        result["rules"] = [
            {
                "selector": format_selector(r.rule.selector) + _heads_words(r.rule.heads),
                "prefill": _choice_json(r.prefill),
                "decode": _choice_json(r.decode),
            }
            for r in checked.rules
        ]
    return result


def _choice_json(choice: PhaseChoice | None) -> dict | None:
    if choice is None:
        return None
    return {
        "policy": choice.policy,
        "params": dict(choice.params),
        "budget": _budget_json(choice.budget),
        "candidates": list(choice.candidates),
        "text": choice.describe(),
    }


@overload
def _budget_json(budget: ast.Budget) -> dict: ...
@overload
def _budget_json(budget: None) -> None: ...
def _budget_json(budget: ast.Budget | None) -> dict | None:
    """A written budget as --json prints it: ``{"tokens": 64}``, ``{"percent": 10}``, ``{"auto": true}``."""
    if budget is None:
        return None
    if isinstance(budget, ast.Tokens):
        return {"tokens": budget.count}
    if isinstance(budget, ast.Percent):
        return {"percent": budget.value}
    return {"auto": True}


def fmt(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        try:
            source = read_source(name)
        except UnreadableFile as error:
            print(f"polykv: error: {error}", file=sys.stderr)
            status = 1
            continue
        spec, diagnostics = parse_recovering(source.text, source.name)
        if diagnostics:
            print(SpecError(diagnostics).format(), file=sys.stderr)
            status = 1
            continue
        canonical = print_spec(spec)
        if not args.check:
            sys.stdout.write(canonical)
        elif canonical != source.text:
            print(f"{source.name}: not in canonical form (polykv fmt prints it)", file=sys.stderr)
            status = 1
    return status


def policies(args: argparse.Namespace) -> int:
    from polykv.registry import default_registry

    registry = default_registry()
    if args.json:
        print(json.dumps(_listing_json(registry), indent=2))
        return 0
    lines = []
    for entry in registry.policies:
        lines.append(f"{entry.name}  ({entry.distribution} {entry.version})".replace("  ()", ""))
        lines.append(f"    {entry.cls.description}")
        for param in entry.cls.parameters:
            bounds = f", {param.range_words()}" if param.min is not None or param.max is not None else ""
            choices = f", one of {', '.join(param.choices)}" if param.choices else ""
            default = json.dumps(param.default)
            lines.append(f"    {param.name}: {param.type.__name__} = {default}{bounds}{choices}  {param.description}")
    if not len(registry.policies):
        lines.append("no policies installed")
    if args.all:
        for word, entries in (("signals", registry.signals), ("solvers", registry.solvers)):
            lines += ["", f"{word}:"]
            lines += [f"    {e.name}  ({e.distribution})  {e.cls.description}" for e in entries]
    if registry.failures:
        lines += ["", "skipped plugins:"]
        lines.extend(f"    {failure}" for failure in registry.failures)
    if registry.notes:
        lines += ["", "loaded, but should change:"]
        lines.extend(f"    {note}" for note in registry.notes)
    print("\n".join(lines))
    return 0


def _listing_json(registry: Registry) -> dict:
    def described(entry) -> dict:
        return {
            "name": entry.name,
            "description": entry.cls.description,
            "distribution": entry.distribution,
            "version": entry.version,
            "plugin": entry.plugin,
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
                for p in getattr(entry.cls, "parameters", ())
            ],
        }

    return {
        "policies": [{**described(e), "budgeted": e.cls.budgeted} for e in registry.policies],
        "signals": [described(e) for e in registry.signals],
        "solvers": [described(e) for e in registry.solvers],
        "failures": [
            {"distribution": f.distribution, "plugin": f.plugin, "entry_point": f.entry_point, "reason": f.reason}
            for f in registry.failures
        ],
        "notes": [{"distribution": n.distribution, "plugin": n.plugin, "reason": n.reason} for n in registry.notes],
    }

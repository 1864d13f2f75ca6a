"""``polykv plan``: what a spec decides for each layer of a model, printed as a spec and drawn.

The output is a spec that ``polykv validate`` accepts: one statement per layer with its policy,
budget and parameters, and a comment with the measurements that decided it (the predicted loss
at the chosen budget, the loss one step lower, the layer's signals).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polykv.cli.commands import setup
from polykv.files import writing
from polykv.language.printer import layer_ranges, layer_runs
from polykv.plan import Plan


def plan_text(plan: Plan) -> str:
    """``plan`` as spec text: a header, then one statement per layer with its measurements as a comment."""
    stored = sum(_tokens(layer, plan.context_length) for layer in plan.layers)
    length = plan.context_length
    lines = [
        f"# {plan.model.name}: the plan for a {length}-token prompt" if length else f"# {plan.model.name}",
        f"# spec: {' | '.join(line for line in plan.spec.splitlines() if line.strip() and not line.startswith('#'))}",
        f"# stored tokens: {stored:g} in all, {stored / len(plan.layers):.1f} per layer on average",
        *_prefill_notes(plan),
        f"model layers {len(plan.layers)}",
    ]
    for layer in plan.layers:
        notes = ", ".join(f"{k} {_number(v)}" for k, v in layer.measurements.items())
        for run, (heads, what) in enumerate(_head_runs(layer)):
            statement = f"layers {layer.index}{heads}: {what}"
            lines.append(f"{statement}  # {notes}" if notes and not run else statement)  # the layer's, once
    return "\n".join(lines) + "\n"


def _prefill_notes(plan: Plan) -> list[str]:
    """What the prefill costs: a reconstruction pass when a layer scores by it; the profile's estimate."""
    notes = []
    if plan.reconstruction is not None:
        notes.append("# prefill: the model also repeats the prompt once, for the scores of reconstruction")
    resolver = plan.resolver
    if resolver is not None:
        try:
            cost = resolver.prefill_cost([layer.prefill for layer in plan.layers])
        except KeyError:  # a policy whose cost the profile did not measure
            return notes
        limit = f" (limit {resolver.prefill_limit:g}x)" if resolver.prefill_limit is not None else ""
        notes.append(f"# prefill time: about {cost:.2f}x the full cache's, by the profile's costs{limit}")
    return notes


def draw(plan: Plan, path: Path, sensitivity: list[float] | None = None) -> None:
    """Budget per layer as bars coloured by policy; beneath, the layer's sensitivity, and for a plan whose heads
    keep different counts a heat map of the tokens each KV head keeps (layers x heads)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = plan.context_length is not None and any(layer.heads for layer in plan.layers)
    rows = 1 + bool(sensitivity) + heads
    figure, axes = plt.subplots(rows, 1, figsize=(10, 3.2 * rows), sharex=True, squeeze=False, layout="constrained")
    policies = sorted({layer.prefill.policy for layer in plan.layers})
    colours = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(policies)}
    top = axes[0][0]
    for name in policies:
        chosen = [layer for layer in plan.layers if layer.prefill.policy == name]
        top.bar(
            [layer.index for layer in chosen],
            [_tokens(layer, plan.context_length) for layer in chosen],
            color=colours[name],
            label=name,
        )
    top.set_ylabel("stored tokens")
    top.set_yscale("log", base=2)
    top.legend(fontsize=8, ncols=min(4, len(policies)))
    top.set_title(f"{plan.model.name}: {plan.context_length}-token prompt")
    if sensitivity:
        bottom = axes[1][0]
        bottom.bar(range(len(sensitivity)), sensitivity, color="grey")
        bottom.set_yscale("log")
        bottom.set_ylabel("loss at 32 tokens\n(best policy)")
    if heads:
        _heat_map(axes[-1][0], figure, plan, [row[0] for row in axes])
    axes[-1][0].set_xlabel("layer")
    with writing(path):
        figure.savefig(path, dpi=120)
    plt.close(figure)


def _heat_map(axis, figure, plan: Plan, beside: list) -> None:
    """Tokens each KV head keeps (a head kept whole counting the prompt), layers across and heads up; its colour
    bar takes room from every panel in ``beside``, so that their layers stay aligned."""
    from matplotlib.colors import LogNorm

    budgets = plan.head_budgets(plan.context_length)
    by_head = [[layer[head] for layer in budgets] for head in range(len(budgets[0]))]
    image = axis.imshow(
        by_head,
        aspect="auto",
        origin="lower",
        interpolation="nearest",
        cmap="viridis",
        norm=LogNorm(vmin=max(1, min(map(min, budgets))), vmax=plan.context_length),
    )
    figure.colorbar(image, ax=beside, label="tokens kept (heat map)", pad=0.01, fraction=0.03)
    axis.set_ylabel("KV head")
    axis.set_yticks(range(len(by_head)))


def run(args: argparse.Namespace) -> int:
    from polykv.language.check import check
    from polykv.model import load_model
    from polykv.plan import compile, with_prefill_limit, with_total_budget
    from polykv.profile import as_profile

    if args.png is not None:
        setup.writable(args.png, "--png", example="plan.png", suffix=".png")
    spec = setup.spec_argument(args, "spec")
    if args.budget is not None:
        spec = with_total_budget(spec, args.budget, given_as="--budget")
    if args.prefill_limit is not None:
        spec = with_prefill_limit(spec, args.prefill_limit)
    checked = check(spec)  # mistakes in the spec are reported before the model loads
    routing = {
        "--profile": args.profile,
        "--context": args.context,
        "--setting": args.setting,
        "--objective": args.objective,
    }
    setup.only_for_auto(checked, routing)
    profile = as_profile(args.profile) if args.profile else None
    device = setup.device(args)
    location = setup.model_location(args)
    print(f"loading {location.name}", file=sys.stderr)
    model, tokenizer = load_model(location, device=device)
    chosen = {"setting": args.setting, "objective": args.objective}  # compile's defaults where not given
    plan = compile(spec, model, profile=profile, context_length=args.context, tokenizer=tokenizer,
                   **{name: value for name, value in chosen.items() if value is not None})  # fmt: skip
    sys.stdout.write(plan_text(plan))
    if args.png is not None:
        draw(plan, args.png, _sensitivity(plan))
        print(f"# drawn in {args.png}")
    return 0


def _sensitivity(plan: Plan) -> list[float] | None:
    """Each layer's loss at 32 tokens with its best measured policy (from the plan's resolver)."""
    if plan.resolver is None:
        return None
    grid = plan.resolver.grid
    if 32 not in grid:
        return None
    position = grid.index(32)
    regime = plan.resolver.regime(plan.context_length or 1)
    return [min((table[position] for table in tables.values()), default=0.0) for tables in regime.tables]


def _head_runs(layer) -> list[tuple[str, str]]:
    """`` heads 0-1`` and what those heads do, per run of heads doing the same ("" and the layer's choice when
    its heads all do the same)."""
    if layer.adaptive_heads:
        return [(" heads adaptive", layer.describe())]
    if not layer.heads:
        return [("", layer.describe())]
    return [(f" heads {layer_ranges(heads)}", what) for heads, what in layer_runs([h.describe() for h in layer.heads])]


def _tokens(layer, length: int | None) -> float:
    if layer.heads and length:
        return layer.tokens(length)
    budget = layer.prefill.budget
    if budget is None:
        return length or 0
    return min(budget.tokens(length or 0), length) if length else budget.tokens(0)


def _number(value: float) -> str:
    return f"{value:.3g}"

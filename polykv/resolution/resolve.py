"""Resolution: every layer's choice made concrete — a policy, its parameters and a token budget.

``compile`` is check -> resolve -> plan. A checked spec says per layer what is fixed (a named
policy, a budget of tokens or of the prompt, or ``full``) and what is left open (``auto``
policies, ``@auto`` budgets). Resolution closes what is open, for a given prompt length:

- ``auto@256`` (routing only): the candidate policy whose calibrated loss is least at that budget;
- ``snapkv@auto`` (budgets only) and ``auto@auto`` (both): one budget problem for the whole model,
  solved by the spec's solver (polykv's exact knapsack by default): per layer, the candidate
  policies at every budget of the grid with their calibrated losses, keeping the layer whole, and
  the fixed layers, under the total number of stored tokens.

A statement that names heads and leaves them open (``layers * heads *: auto@auto``) makes each KV
head a unit of its own: routed with its own calibrated table (``polykv calibrate --heads``) and
budgeted in one problem over all heads, whose total is the spec's times the KV heads per layer.
Layers decided as a whole count as their heads, each doing what the layer does.

The total counts every layer's stored tokens, a layer kept whole counting the prompt length, so it
depends on the prompt length whenever some layer may be whole or a budget is a share of the
prompt: a plan that needs solving is solved again for each prompt length it meets (the cache asks
before its first layer runs; solving takes milliseconds).

A ``prefill <= Fx`` limit bounds the prefill time the calibrated costs predict (a multiple of the
full cache's): when the solution would cost more, the costliest policy auto layers were routed to
is taken from their candidates and the spec is solved again, until it fits.

Calibrated losses are measured at a few budgets; between them they are interpolated linearly in
log(budget) on tables first made non-increasing, and the solver works on the resulting grid of
``step``-token budgets.
"""

from __future__ import annotations

import bisect
import functools
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, cast

import attrs

from polykv.budget import Budget, Share, Tokens
from polykv.choice import WHOLE, Choice
from polykv.converters import ints, strings
from polykv.language import ast
from polykv.language.check import CheckedSpec, HeadEntry, LayerEntry, PhaseChoice
from polykv.language.diagnostics import Diagnostic, SpecError
from polykv.profile import Profile, ProfileError
from polykv.registry import Registry
from polykv.serialization import Loss, converter
from polykv.solver import BudgetProblem, InfeasibleError, LayerOptions, Solution, monotone
from polykv.values import AUTO, Value

#: Budgets the solver chooses among are multiples of this many tokens.
STEP = 16
#: The solver of a spec without a ``solver`` line: polykv's exact knapsack over the calibrated losses.
DEFAULT_SOLVER = "polykv"


#: What a request's budget may be: tokens or a share of the prompt, ``auto`` (the solver decides), or
#: None (keep everything).
RequestBudget = Budget | Literal["auto"] | None


# Typed converters, as polykv.converters says why.
def _requests(items: Iterable[Request]) -> tuple[Request, ...]:
    return tuple(items)


def _choices(items: Iterable[Choice]) -> tuple[Choice, ...]:
    return tuple(items)


def _loss_tables(items: Iterable[Mapping[str, tuple[Loss, ...]]]) -> tuple[Mapping[str, tuple[Loss, ...]], ...]:
    return tuple(items)


def _regimes(items: Iterable[Regime]) -> tuple[Regime, ...]:
    return tuple(items)


@attrs.frozen
class Request:
    """What the spec asks of one layer's prefill, as resolution reads it.

    ``policy`` is a policy name or ``auto``; ``candidates`` are the policies routing may choose (for
    a named policy with an @auto budget: that one). ``budget`` is fixed, ``auto``, or None.
    """

    policy: str
    params: Mapping[str, Value] = attrs.field(factory=dict)
    budget: RequestBudget = None
    candidates: tuple[str, ...] = ()
    #: One request per KV head, for a layer whose heads choose for themselves: each decided, or left open
    #: to be routed and budgeted on its own (the other fields are then the first head's).
    heads: tuple[Request, ...] = attrs.field(default=(), converter=_requests)

    @property
    def open_budget(self) -> bool:
        return self.budget == AUTO if not self.heads else any(head.open_budget for head in self.heads)

    @property
    def decided(self) -> bool:
        if self.heads:
            return all(head.decided for head in self.heads)
        return self.policy != AUTO and not self.open_budget

    @property
    def opens_heads(self) -> bool:
        """Whether some KV head of this layer is left to routing or budget solving."""
        return any(not head.decided for head in self.heads)

    def choice(self) -> Choice:
        """The choice of a decided request (its first head's, where heads differ)."""
        return Choice(self.policy, self.params, _fixed(self.budget))

    def tokens(self, prompt_length: int) -> int | None:
        """What a decided request stores per row and KV head (None: the whole prompt); where heads differ, the
        mean over heads rounded up, a head kept whole counting the prompt."""
        if not self.heads:
            return _tokens(_fixed(self.budget), prompt_length)
        kept = [min(head.tokens(prompt_length) or prompt_length, prompt_length) for head in self.heads]
        return -(-sum(kept) // len(kept))

    def without(self, name: str) -> Request:
        """This request with ``name`` taken from the candidates of its auto policy (of each auto head)."""
        if self.heads:
            return attrs.evolve(self, heads=[head.without(name) for head in self.heads])
        if self.policy == ast.AUTO and name in self.candidates and len(self.candidates) > 1:
            return attrs.evolve(self, candidates=tuple(c for c in self.candidates if c != name))
        return self

    def routes(self, name: str) -> bool:
        """Whether routing may still choose ``name`` here, and could do without it."""
        if self.heads:
            return any(head.routes(name) for head in self.heads)
        return self.policy == ast.AUTO and name in self.candidates and len(self.candidates) > 1


def _fixed(budget: RequestBudget) -> Budget | None:
    """The budget of a request that leaves none open (decided, or routed at its budget): never ``auto``."""
    assert budget != AUTO
    return budget


def _structure_request_budget(data: object, _type: object) -> RequestBudget:
    # cattrs types structure's class as type[T], which a union (Budget) is not, though cattrs structures it.
    return data if data is None or data == AUTO else converter.structure(data, Budget)  # type: ignore[arg-type]


converter.register_structure_hook(RequestBudget, _structure_request_budget)


@attrs.frozen
class Decision:
    """One layer resolved: its choice, and the measurements that decided it (for `polykv plan`); for a layer
    whose heads were decided one by one, each KV head's choice (``choice`` is then the first head's)."""

    choice: Choice
    measurements: Mapping[str, float] = attrs.field(factory=dict)
    heads: tuple[Choice, ...] = attrs.field(default=(), converter=_choices)

    def head_choices(self, kv_heads: int) -> tuple[Choice, ...]:
        """What each of the layer's ``kv_heads`` KV heads does."""
        return self.heads or (self.choice,) * kv_heads


@attrs.frozen
class Regime:
    """How to solve around one level of compression: per-layer loss tables and the smallest budget.

    Calibration tunes these on held-out prompts (``polykv.calibration.tune``): which task weights and
    which floor give the least measured loss when many layers are compressed together, for each
    of a few average budgets; ``ratio`` is that average over the prompt length.
    """

    ratio: float
    floor: int
    tables: tuple[Mapping[str, tuple[Loss, ...]], ...] = attrs.field(converter=_loss_tables)
    #: Per layer, per KV head: its table (from a profile that measured heads; empty otherwise).
    head_tables: tuple[tuple[Mapping[str, tuple[Loss, ...]], ...], ...] = attrs.field(
        default=(), converter=lambda tables: tuple(tuple(layer) for layer in tables)
    )


@attrs.frozen
class Resolver:
    """Everything needed to resolve a spec for any prompt length; plans carry it and it round-trips JSON.

    ``total`` is the spec's total budget: tokens over all layers, or a share of the prompt per layer.
    """

    requests: tuple[Request, ...] = attrs.field(converter=_requests)
    total: Budget | None
    solver: str
    solver_params: Mapping[str, Value]
    grid: tuple[int, ...] = attrs.field(converter=ints)
    regimes: tuple[Regime, ...] = attrs.field(converter=_regimes)
    policy_params: Mapping[str, Mapping[str, Value]]
    signals: Mapping[str, tuple[float, ...]]
    prefill_limit: float | None = None
    #: Calibrated prefill time per policy over the full cache's; ``passes`` cost a pass of the whole
    #: model (reconstruction), paid once however many layers use them.
    costs: Mapping[str, float] = attrs.field(factory=dict)
    passes: tuple[str, ...] = attrs.field(default=(), converter=strings)

    def decide(self, prompt_length: int, registry: Registry) -> tuple[Decision, ...]:
        """Every layer's decision for a prompt of ``prompt_length`` tokens."""
        return _decide(self, prompt_length, registry)

    @property
    def kv_heads(self) -> int:
        """KV heads per layer, as the spec's head statements name them (1 where none does)."""
        return next((len(request.heads) for request in self.requests if request.heads), 1)

    def prefill_cost(self, choices: Sequence[Choice]) -> float:
        """The prefill time ``choices`` (one per layer, or one per KV head of every layer) predict, as a
        multiple of the full cache's.

        Raises KeyError for a policy whose cost the profile did not measure."""
        running = [c.policy for c in choices if c.budget is not None]
        per_layer = sum(self.costs[name] - 1 for name in running if name not in self.passes) / len(choices)
        return 1 + per_layer + sum(self.costs[name] - 1 for name in set(running) & set(self.passes))

    def regime(self, prompt_length: int) -> Regime:
        """The regime tuned nearest (in log ratio) to this spec's compression for ``prompt_length`` tokens."""
        average = self.average_budget(prompt_length)
        if average is None or len(self.regimes) == 1:
            return self.regimes[0]
        ratio = max(average, 1) / prompt_length
        return min(self.regimes, key=lambda r: abs(math.log(r.ratio / ratio)))

    def average_budget(self, prompt_length: int) -> float | None:
        """Tokens per layer the spec allows on average for ``prompt_length`` tokens (None: not a budget spec)."""
        if self.total is None:
            # A request with heads or a budget stores a number of tokens (tokens() is None only without both).
            kept = [r for r in self.requests if r.heads or r.budget not in (None, AUTO)]
            fixed = [cast(int, r.tokens(prompt_length)) for r in kept]
            return sum(fixed) / len(fixed) if fixed else None
        return self.total_tokens(prompt_length) / len(self.requests)

    def total_tokens(self, prompt_length: int) -> int:
        """The total budget over all layers for ``prompt_length`` tokens (a share counts per layer)."""
        if self.total is None:
            raise ValueError("an @auto budget needs a total budget")
        if isinstance(self.total, Share):
            return len(self.requests) * self.total.tokens(prompt_length)
        return self.total.count


def requests(checked: CheckedSpec) -> list[Request]:
    """The per-layer requests of a checked spec (prefill phase)."""
    return [_request(entry.prefill, entry.heads) for entry in _layers(checked)]


def _request(choice: PhaseChoice, heads: Sequence[HeadEntry] = ()) -> Request:
    if heads:
        chosen = [_request(head.prefill) for head in heads]
        first = chosen[0]
        return Request(first.policy, first.params, first.budget, first.candidates, heads=chosen)
    budget: RequestBudget = AUTO if isinstance(choice.budget, ast.AutoBudget) else fixed_budget(choice.budget)
    if choice.policy == ast.AUTO:
        return Request(ast.AUTO, {}, budget, choice.candidates or ())
    return Request(choice.policy, dict(choice.params), budget, (choice.policy,) if budget == AUTO else ())


def fixed_budget(budget: ast.Budget | None) -> Budget | None:
    """A written budget as a resolved one: tokens or a share of the prompt; None for none or ``@auto``."""
    if budget is None or isinstance(budget, ast.AutoBudget):
        return None
    if isinstance(budget, ast.Tokens):
        return Tokens(budget.count)
    return Share(budget.value)


def resolver(
    checked: CheckedSpec,
    profile: Profile | None,
    registry: Registry,
    *,
    windows: Sequence[int | None] | None = None,
) -> Resolver:
    """A Resolver for ``checked`` (which leaves something open), reading losses and signals from ``profile``.

    ``windows`` are the layers' sliding windows: routing never picks a policy that needs more tokens
    than a sliding-window layer can hold.
    """
    found = requests(checked)
    solver = checked.solver.name if checked.solver else DEFAULT_SOLVER
    solver_params = dict(checked.solver.params) if checked.solver else {}
    solver_class = registry.solvers.get(solver).cls
    needs_tables = solver_class.reads_losses or any(r.policy == ast.AUTO for r in found)
    everything = tuple(sorted(registry.policies.names()))
    problems: list[Diagnostic] = []
    grid: tuple[int, ...]
    if profile is None:
        if needs_tables or solver_class.reads_signals:
            raise SpecError(
                [
                    Diagnostic(
                        "no-profile",
                        "routing and polykv's solver need a calibration profile of this model",
                        _first_open_span(checked),
                        hint="make one with `polykv calibrate --model DIR --out PROFILE.json` and pass "
                        "profile=PROFILE.json (or --profile), or choose `solver uniform` or `solver pyramid`",
                    )
                ]
            )
        grid, policy_params, signals = (STEP,), {}, {}
        regimes = [Regime(1.0, 1, [{} for _ in found])]
    else:
        missing: Sequence[str] | None = [name for name in profile.policies if name not in registry.policies]
        if missing:
            raise ProfileError(
                f"the profile measured {', '.join(missing)}, which is not installed here: install the plugin that "
                f"provides it, or calibrate with the installed policies ({', '.join(everything)})"
            )
        grid = dense_grid(profile.grid)
        regimes = [
            Regime(
                tuned.budget / profile.prompt_length,
                tuned.floor,
                _tables(profile, tuned.weights, grid, len(found)),
                _head_tables(profile, tuned.weights, grid) if profile.measures_heads else (),
            )
            for tuned in profile.solved_regimes()
        ]
        policy_params = {name: dict(params) for name, params in profile.policies.items()}
        signals = {name: tuple(profile.signal(name)) for name in profile.signals}
        problems += _parameter_mismatches(checked, found, profile)
    problems += _granularity_problems(checked, found, profile, needs_tables)
    if problems:
        raise SpecError(_unique(problems))
    for index, request in enumerate(found):
        window = windows[index] if windows else None
        if request.heads:
            heads = regimes[0].head_tables[index] if regimes[0].head_tables else [{}] * len(request.heads)
            candidates = [
                _candidates(head, tables, window, everything, policy_params, registry, needs_tables)
                for head, tables in zip(request.heads, heads)
            ]
            found[index] = attrs.evolve(request, heads=[head for head, _missing in candidates])
            missing = next((wanted for _head, wanted in candidates if wanted), None)
        else:
            found[index], missing = _candidates(
                request, regimes[0].tables[index], window, everything, policy_params, registry, needs_tables
            )
        if missing:
            problems.append(_unmeasured(checked, index, missing, profile))
    if problems:
        raise SpecError(_unique(problems))
    decl = checked.budget
    total: Budget | None = None
    if decl is not None:
        if isinstance(decl.amount, ast.Percent):
            total = Share(decl.amount.value)
        else:
            total = Tokens(decl.amount.count * (1 if decl.total else len(found)))
    built = Resolver(found, total, solver, solver_params, grid, regimes, policy_params, signals)
    return built if profile is None else _with_costs(built, checked, profile, registry)


def _candidates(
    request: Request,
    tables: Mapping[str, tuple[Loss, ...]],
    window: int | None,
    everything: tuple[str, ...],
    policy_params: Mapping,
    registry: Registry,
    needs_tables: bool,
) -> tuple[Request, tuple[str, ...]]:
    """``request`` (of a layer or a KV head) with the candidates routing may choose: those measured, and that fit a
    sliding ``window``; and the policies it wanted where none was measured (else empty)."""
    if request.decided:
        return request, ()
    wanted = request.candidates if request.policy != ast.AUTO else (request.candidates or everything)
    if request.policy == ast.AUTO and window is not None:
        wanted = _fitting(wanted, window - 1, policy_params, registry)
    measured = tuple(name for name in wanted if name in tables)
    missing = tuple(wanted) if not measured and (needs_tables or request.policy == ast.AUTO) else ()
    return attrs.evolve(request, candidates=measured if request.policy == ast.AUTO else request.candidates), missing


def _granularity_problems(
    checked: CheckedSpec, found: Sequence[Request], profile: Profile | None, needs_tables: bool
) -> list[Diagnostic]:
    """Heads left open need a profile that measured heads; and budgets are solved per layer or per head, not both."""
    open_heads = [
        (index, head)
        for index, request in enumerate(found)
        for head, head_request in enumerate(request.heads)
        if not head_request.decided
    ]
    if not open_heads:
        return []
    index, head = open_heads[0]
    use = _layers(checked)[index].heads[head].prefill.use
    span = use.span if use is not None else None
    problems = []
    if profile is not None and not profile.measures_heads and needs_tables:
        problems.append(
            Diagnostic(
                "no-head-calibration",
                "routing and budgets per KV head need a profile that measured each head, and this one measured "
                "whole layers",
                span,
                hint="calibrate with `polykv calibrate --heads` and pass that profile, or drop `heads *` to route "
                "and budget whole layers",
            )
        )
    solved_by_layer = next((i for i, r in enumerate(found) if not r.heads and r.open_budget), None)
    if solved_by_layer is not None and any(found[i].heads[h].open_budget for i, h in open_heads):
        layer_use = _layers(checked)[solved_by_layer].prefill.use
        problems.append(
            Diagnostic(
                "mixed-granularity",
                f"layer {solved_by_layer} leaves its budget to the solver as a whole layer while other statements "
                "leave it per KV head: one spec solves budgets per layer or per head",
                layer_use.span if layer_use is not None else None,
                hint="write `heads *` on every statement with an @auto budget, or on none",
            )
        )
    return problems


def _with_costs(built: Resolver, checked: CheckedSpec, profile: Profile, registry: Registry) -> Resolver:
    """``built`` with the profile's prefill costs and the spec's limit on them; SpecError if it cannot be met."""
    used = {name for r in built.requests for name in (*r.candidates, r.policy) if name not in (ast.AUTO, WHOLE)}
    costs = {name: profile.costs[name] for name in sorted(used) if name in profile.costs}
    passes = tuple(name for name in costs if registry.policies.create(name).needs().reconstruction)
    limited = attrs.evolve(built, prefill_limit=checked.prefill_limit, costs=costs, passes=passes)
    limit, decl = checked.prefill_limit, checked.spec.prefill_limit
    if limit is None:
        return limited
    assert decl is not None  # the limit is the declaration's
    unmeasured = sorted(used - set(costs))
    if unmeasured:
        raise SpecError(
            [
                Diagnostic(
                    "no-prefill-cost",
                    f"the profile has no prefill cost of {', '.join(unmeasured)}",
                    decl.span,
                    hint="calibrate with this polykv (`polykv calibrate` measures each policy's prefill), or drop "
                    "the limit",
                )
            ]
        )
    least = limited.prefill_cost([_cheapest_choice(limited, request) for request in limited.requests])
    if least > limit + 1e-9:
        raise SpecError(
            [
                Diagnostic(
                    "prefill-limit-unmet",
                    f"prefill <= {limit:g}x cannot be met: the cheapest routing this spec allows costs {least:.2f}x "
                    "by the profile's costs",
                    decl.span,
                    hint="raise the limit, or let more layers route (`auto`) or use cheaper named policies; "
                    f"the costs: {', '.join(f'{name} {cost:.2f}x' for name, cost in costs.items())}",
                )
            ]
        )
    return limited


def _cheapest_choice(resolver: Resolver, request: Request) -> Choice:
    """The least costly choice ``request`` allows (a layer whose budget is open may be kept whole)."""
    if request.decided:
        return request.choice()
    if request.open_budget:
        return Choice.whole()
    names = request.candidates if request.policy == ast.AUTO else (request.policy,)
    return Choice(min(names, key=lambda name: resolver.costs[name]), budget=Tokens(1))


def _fitting(names: Sequence[str], room: int, policy_params: Mapping, registry: Registry) -> tuple[str, ...]:
    """The policies among ``names`` that can work within ``room`` tokens (a sliding-window layer's)."""
    return tuple(
        name for name in names if registry.policies.create(name, dict(policy_params.get(name, {}))).min_budget() <= room
    )


def _tables(profile: Profile, weights: Mapping[str, float], grid: Sequence[int], layers: int) -> list[dict]:
    """Per-layer tables over ``grid`` from ``profile`` with task ``weights``: made monotone, interpolated."""
    combined = profile.table(weights)
    return [
        {name: interpolate(profile.grid, monotone(combined[layer][p]), grid) for p, name in enumerate(profile.policies)}
        for layer in range(layers)
    ]


def _head_tables(profile: Profile, weights: Mapping[str, float], grid: Sequence[int]) -> list[list[dict]]:
    """Per-layer, per-KV-head tables over ``grid``, made as ``_tables`` makes the layers'."""
    return [
        [
            {name: interpolate(profile.grid, monotone(head[p]), grid) for p, name in enumerate(profile.policies)}
            for head in layer
        ]
        for layer in profile.head_table(weights)
    ]


def dense_grid(measured: Sequence[int], step: int = STEP) -> tuple[int, ...]:
    """The measured budgets, and every ``step`` tokens from the smallest to the largest of them."""
    every = range(-(-measured[0] // step) * step, measured[-1] + 1, step)
    return tuple(sorted({*measured, *every}))


def interpolate(measured: Sequence[int], table: Sequence[float], grid: Sequence[int]) -> tuple[float, ...]:
    """``table`` (losses at ``measured`` budgets) at every budget of ``grid``, linear in log(budget)."""
    result = []
    for budget in grid:
        right = bisect.bisect_left(measured, budget)
        if right < len(measured) and measured[right] == budget:
            result.append(table[right])
        elif right == 0:
            result.append(math.inf)  # below what was measured: unknown, so not offered
        elif right == len(measured):
            result.append(table[-1])
        else:
            low, high = table[right - 1], table[right]
            if math.isinf(low) or math.isinf(high):  # the policy's minimum lies in between: not offered
                result.append(math.inf)
                continue
            share = math.log(budget / measured[right - 1]) / math.log(measured[right] / measured[right - 1])
            result.append(low + share * (high - low))
    return tuple(result)


def _decide(resolver: Resolver, prompt_length: int, registry: Registry) -> tuple[Decision, ...]:
    found = resolver.requests
    heads = resolver.kv_heads
    while True:
        decisions = _decide_requests(resolver, found, prompt_length, registry)
        limit = resolver.prefill_limit
        choices = [choice for d in decisions for choice in d.head_choices(heads)]
        if limit is None or resolver.prefill_cost(choices) <= limit + 1e-9:
            return decisions
        found = _without_costliest(resolver, found, decisions)


def _without_costliest(
    resolver: Resolver, found: tuple[Request, ...], decisions: Sequence[Decision]
) -> tuple[Request, ...]:
    """``found`` with the routed policy that adds most to the prefill taken from every auto layer's (and auto
    head's) candidates."""
    heads = resolver.kv_heads
    routed = [
        choice.policy
        for r, d in zip(found, decisions)
        for head, choice in zip(r.heads or (r,) * heads, d.head_choices(heads))
        if head.policy == ast.AUTO and choice.budget is not None
    ]
    share = {name: (resolver.costs[name] - 1) / (len(found) * heads) * routed.count(name) for name in set(routed)}
    share.update({name: resolver.costs[name] - 1 for name in share if name in resolver.passes})
    for name in sorted(share, key=lambda n: (-share[n], n)):
        if any(r.routes(name) for r in found):
            return tuple(r.without(name) for r in found)
    raise SpecError(
        [
            Diagnostic(
                "prefill-limit-unmet",
                f"prefill <= {resolver.prefill_limit:g}x cannot be met at this budget: every auto layer is down to "
                "one policy",
                None,
                hint="raise the limit or the budget",
            )
        ]
    )


def _decide_requests(
    resolver: Resolver, found: Sequence[Request], prompt_length: int, registry: Registry
) -> tuple[Decision, ...]:
    regime = resolver.regime(prompt_length)
    if any(request.opens_heads for request in found):
        return _decide_heads(resolver, found, prompt_length, registry, regime)
    decisions: list[Decision | None] = [None] * len(found)
    options: list[LayerOptions] = []
    open_layers = []
    for index, request in enumerate(found):
        table = regime.tables[index]
        if request.decided:
            decisions[index] = Decision(request.choice())
            options.append(LayerOptions(fixed=(request.policy, request.tokens(prompt_length))))
        elif not request.open_budget:  # auto@N: route at a fixed budget
            tokens = _tokens(_fixed(request.budget), prompt_length)
            decision = _route(resolver, request, table, tokens, prompt_length)
            decisions[index] = decision
            options.append(LayerOptions(fixed=(decision.choice.policy, tokens)))
        else:
            open_layers.append(index)
            options.append(_layer_options(resolver, request, table, regime.floor, registry))
    if open_layers:
        solution = _solve(resolver, options, prompt_length, registry)
        for index in open_layers:
            choice = solution.layers[index]
            request = found[index]
            if choice.whole:
                decisions[index] = Decision(Choice.whole(), {"loss": 0.0})
                continue
            params = request.params if request.policy != ast.AUTO else resolver.policy_params.get(choice.policy, {})
            decisions[index] = Decision(
                Choice(choice.policy, params, Tokens(choice.tokens)), _measured(resolver, regime, index, choice)
            )
    return tuple(cast("list[Decision]", decisions))  # every layer decided: as written, routed or solved


def _decide_heads(
    resolver: Resolver, found: Sequence[Request], prompt_length: int, registry: Registry, regime: Regime
) -> tuple[Decision, ...]:
    """Every layer's decision where KV heads are routed or budgeted one by one: one problem whose units are
    heads; a layer decided as a whole (or routed at a fixed budget) counts as its heads, each doing the same."""
    heads = resolver.kv_heads
    units: list[LayerOptions] = []
    decided: list[list[Decision | None]] = []
    open_units = []
    for index, request in enumerate(found):
        if not request.heads:
            whole = _fixed_decision(resolver, request, regime.tables[index], prompt_length)
            decided.append([whole] * heads)
            units += [LayerOptions(fixed=(whole.choice.policy, _tokens(whole.choice.budget, prompt_length)))] * heads
            continue
        decided.append([])
        for head, head_request in enumerate(request.heads):
            table = regime.head_tables[index][head] if regime.head_tables else {}
            if head_request.open_budget:
                open_units.append((index, head, len(units)))
                decided[index].append(None)
                units.append(_layer_options(resolver, head_request, table, regime.floor, registry))
                continue
            one = _fixed_decision(resolver, head_request, table, prompt_length)
            decided[index].append(one)
            units.append(LayerOptions(fixed=(one.choice.policy, _tokens(one.choice.budget, prompt_length))))
    if open_units:
        try:
            solution = _solve(resolver, units, prompt_length, registry, heads=heads)
        except InfeasibleError as error:
            raise InfeasibleError(f"counting tokens per KV head ({heads} per layer), {error}") from None
        for index, head, unit in open_units:
            request = found[index].heads[head]
            decided[index][head] = _solved(resolver, request, solution.layers[unit])
    decisions = []
    # Every head decided: as written, routed, or solved.
    for request, layer in zip(found, cast("list[list[Decision]]", decided)):
        if not request.heads:
            decisions.append(layer[0])
            continue
        loss = sum(d.measurements.get("loss", 0.0) for d in layer)
        decisions.append(Decision(layer[0].choice, {"loss": loss}, heads=[d.choice for d in layer]))
    return tuple(decisions)


def _fixed_decision(resolver: Resolver, request: Request, table, prompt_length: int) -> Decision:
    """A request without an open budget, decided: as written, or routed at its budget."""
    if request.decided:
        return Decision(request.choice())
    return _route(resolver, request, table, _tokens(_fixed(request.budget), prompt_length), prompt_length)


def _solved(resolver: Resolver, request: Request, choice) -> Decision:
    """A request with an open budget, as the solver decided it."""
    if choice.whole:
        return Decision(Choice.whole(), {"loss": 0.0})
    params = request.params if request.policy != ast.AUTO else resolver.policy_params.get(choice.policy, {})
    return Decision(Choice(choice.policy, params, Tokens(choice.tokens)), {"loss": choice.loss})


def _tokens(budget: Budget | None, prompt_length: int) -> int | None:
    return None if budget is None else budget.tokens(prompt_length)


def _route(resolver: Resolver, request: Request, table, tokens: int | None, prompt_length: int) -> Decision:
    """The candidate policy with the least loss at ``tokens`` (the first candidate on ties)."""
    if tokens is None or tokens >= prompt_length:
        name = request.candidates[0]
        return Decision(Choice(name, resolver.policy_params.get(name, {}), _fixed(request.budget)), {"loss": 0.0})
    options = LayerOptions({name: table[name] for name in request.candidates})
    losses = {name: options.loss_at(name, tokens, resolver.grid) for name in request.candidates}
    name = min(request.candidates, key=lambda n: (losses[n], request.candidates.index(n)))
    budget = _fixed(request.budget)
    return Decision(Choice(name, resolver.policy_params.get(name, {}), budget), {"loss": losses[name]})


def _layer_options(resolver: Resolver, request: Request, table, floor: int, registry: Registry) -> LayerOptions:
    losses = {}
    for name in request.candidates:
        params = request.params if request.policy != ast.AUTO else resolver.policy_params.get(name, {})
        minimum = registry.policies.create(name, dict(params)).min_budget()
        measured = table.get(name, tuple(0.0 for _ in resolver.grid))  # rule solvers need no table
        losses[name] = tuple(math.inf if budget < minimum else loss for budget, loss in zip(resolver.grid, measured))
    return LayerOptions(losses, whole=0.0, min_budget=floor)


@functools.lru_cache(maxsize=64)
def _solver(registry: Registry, name: str, params: tuple):
    return registry.solvers.create(name, dict(params))


def _solve(
    resolver: Resolver, options: list[LayerOptions], prompt_length: int, registry: Registry, heads: int = 1
) -> Solution:
    """The spec's solver on ``options`` (one per layer, or per KV head of every layer: ``heads`` per layer)."""
    total = resolver.total_tokens(prompt_length) * heads
    problem = BudgetProblem(resolver.grid, options, total, prompt_length, step=STEP)
    solver = _solver(registry, resolver.solver, tuple(sorted(resolver.solver_params.items())))
    signals = {name: tuple(v for v in values for _head in range(heads)) for name, values in resolver.signals.items()}
    return solver.solve(problem, signals)


def _measured(resolver: Resolver, regime: Regime, index: int, choice) -> dict[str, float]:
    """What decided a layer, for `polykv plan`: its predicted loss and the loss one grid step lower, where the
    profile measured its policy (a rule solver also budgets policies the profile never measured)."""
    found = {}
    table = regime.tables[index].get(choice.policy)
    if table:
        found["loss"] = choice.loss
        lower = choice.tokens - STEP
        if lower >= resolver.grid[0]:
            found["loss_one_step_less"] = LayerOptions({choice.policy: table}).loss_at(
                choice.policy, lower, resolver.grid
            )
    for name, values in resolver.signals.items():
        found[name] = values[index]
    return found


def _parameter_mismatches(checked: CheckedSpec, found: list[Request], profile: Profile) -> list[Diagnostic]:
    """A named policy solved from the profile must have the parameters the profile measured it with."""
    problems = []
    for entry, request in zip(_layers(checked), found):
        if not request.open_budget or request.policy == ast.AUTO or request.policy not in profile.policies:
            continue
        measured = dict(profile.policies[request.policy])
        if dict(request.params) != measured:
            shown = ", ".join(f"{k}={v!r}" for k, v in measured.items())
            problems.append(
                Diagnostic(
                    "profile-mismatch",
                    f"the profile measured {request.policy} with {shown}; this layer asks for other parameters",
                    entry.prefill.use.span if entry.prefill.use else None,
                    hint="drop the parameters to use the measured ones, or calibrate with these",
                )
            )
    return problems


def _unmeasured(checked: CheckedSpec, index: int, wanted: Sequence[str], profile: Profile | None) -> Diagnostic:
    use = _layers(checked)[index].prefill.use
    measured = ", ".join(profile.policies) if profile else "none"
    return Diagnostic(
        "not-calibrated",
        f"the profile has no measurements for {', '.join(wanted)}",
        use.span if use is not None else None,
        hint=f"its policies: {measured}; calibrate with these policies, or use a rule: `solver pyramid`",
    )


def _first_open_span(checked: CheckedSpec):
    for entry in _layers(checked):
        choice = entry.prefill
        if choice.is_open:
            return choice.use.span if choice.use is not None else None
    return None


def _unique(problems: list[Diagnostic]) -> list[Diagnostic]:
    seen, kept = set(), []
    for problem in problems:
        key = (problem.code, problem.message, problem.span.start if problem.span else None)
        if key not in seen:
            seen.add(key)
            kept.append(problem)
    return kept


def _layers(checked: CheckedSpec) -> tuple[LayerEntry, ...]:
    """The checked spec's layers: resolution reads a spec checked against its model, whose layer count is known."""
    assert checked.layers is not None
    return checked.layers

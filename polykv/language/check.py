"""Semantic checks of a spec: policies, parameters, budgets, and which layer gets what.

``check`` runs every check and raises one SpecError with all findings. What it returns keeps
each rule's checked policies and, when the layer count is known (from ``model layers N``, an
argument, or a model), one entry per layer: the table the compiler, the router and the budget
solver work from.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping, Sequence
from typing import cast

import attrs

from polykv.arguments import instance, whole_number
from polykv.errors import ArgumentTypeError
from polykv.language import ast
from polykv.language.diagnostics import Diagnostic, Note, SpecError, suggest
from polykv.language.parse import parse_recovering
from polykv.language.printer import format_budget
from polykv.language.source import Source, Span
from polykv.limits import MAX_HEADS, MAX_LAYERS, MAX_REPORTED_ERRORS
from polykv.parameters import Configurable, ParameterError
from polykv.policy import Policy, ScoringPolicy
from polykv.registry import Registry, default_registry
from polykv.values import Value, format_use


@attrs.frozen
class PhaseChoice:
    """A checked policy use: its policy (or ``auto``), full typed parameters and budget."""

    policy: str
    budget: ast.Budget | None
    params: Mapping[str, Value] = attrs.field(factory=dict)
    candidates: tuple[str, ...] = ()
    use: ast.PolicyUse | None = attrs.field(default=None, eq=False, repr=False)

    @property
    def is_open(self) -> bool:
        """Whether routing (``auto``) or the solver (``@auto``) still has to decide this choice."""
        return self.policy == ast.AUTO or isinstance(self.budget, ast.AutoBudget)

    def describe(self) -> str:
        """``snapkv@256(window=32, kernel=7, pooling="max")``: every parameter, defaults included."""
        budget = None if self.budget is None else format_budget(self.budget)
        return format_use(self.policy, budget, self.params, self.candidates)


@attrs.frozen
class CheckedRule:
    """A rule whose policies passed their checks."""

    rule: ast.Rule
    prefill: PhaseChoice
    decode: PhaseChoice | None


@attrs.frozen
class HeadEntry:
    """What the spec says one KV head of a layer does in each phase."""

    head: int
    prefill: PhaseChoice
    decode: PhaseChoice | None = None
    rule: ast.Rule | None = attrs.field(default=None, eq=False, repr=False)


# A typed converter, as polykv.converters says why.
def _heads(items: Iterable[HeadEntry]) -> tuple[HeadEntry, ...]:
    return tuple(items)


@attrs.frozen
class LayerEntry:
    """What the spec says one layer does in each phase (``auto`` and ``@auto`` still open).

    ``heads`` has one entry per KV head when the layer's heads do different things (``prefill`` and
    ``decode`` are then its first head's); it is empty when every head does what the layer does.
    """

    index: int
    prefill: PhaseChoice
    decode: PhaseChoice | None = None
    rule: ast.Rule | None = attrs.field(default=None, eq=False, repr=False)
    heads: tuple[HeadEntry, ...] = attrs.field(default=(), converter=_heads)
    #: The layer's budget is shared among its KV heads at prefill by the policy's scores (``heads adaptive``).
    adaptive_heads: bool = False

    @property
    def choices(self) -> tuple[tuple[PhaseChoice, PhaseChoice | None], ...]:
        """(prefill, decode) of each head that chooses for itself, or of the whole layer."""
        if self.heads:
            return tuple((head.prefill, head.decode) for head in self.heads)
        return ((self.prefill, self.decode),)


@attrs.frozen
class CheckedSpec:
    """A spec that passed every check; ``layers`` is None when the layer count is unknown (or the KV head
    count, for a spec that selects heads)."""

    spec: ast.Spec
    rules: tuple[CheckedRule, ...]
    layer_count: int | None
    layers: tuple[LayerEntry, ...] | None
    solver: SolverChoice | None = None
    head_count: int | None = None

    @property
    def selects_heads(self) -> bool:
        """Whether some statement names KV heads."""
        return any(rule.named_heads is not None for rule in self.spec.rules)

    @property
    def budget(self) -> ast.BudgetDecl | None:
        return self.spec.budget

    @property
    def prefill_limit(self) -> float | None:
        """``prefill <= Fx``: at most F times the full cache's prefill time (None: no limit)."""
        return None if self.spec.prefill_limit is None else self.spec.prefill_limit.factor

    @property
    def routes_heads(self) -> bool:
        """Whether some statement that names KV heads leaves them to routing or budget solving."""
        return any(rule.rule.named_heads is not None and rule.prefill.is_open for rule in self.rules)

    @property
    def has_auto(self) -> bool:
        """Whether some layer leaves its policy or its budget to routing and solving."""
        choices = [choice for rule in self.rules for choice in (rule.prefill, rule.decode) if choice is not None]
        return any(choice.is_open for choice in choices)


@attrs.frozen
class SolverChoice:
    """A checked ``solver`` statement: the solver's name and every parameter."""

    name: str
    params: Mapping[str, Value] = attrs.field(factory=dict)


def check(
    spec: ast.Spec,
    *,
    layers: int | None = None,
    layers_from: str = "the model",
    registry: Registry | None = None,
    complete: bool = True,
    windows: Sequence[int | None] | None = None,
    heads: int | None = None,
) -> CheckedSpec:
    """Check ``spec`` against the installed policies and, if given, a layer count and a KV head count.

    ``layers_from`` says where ``layers`` (and ``heads``) came from, for messages ("the model", "--layers").
    ``windows`` are the layers' sliding windows (None for full attention), when the model is known:
    a policy on a sliding-window layer must work with the tokens the window holds.
    ``complete=False`` says statements were lost to syntax errors, so layers nothing covers are
    not reported (the lost statement may have named them). Raises SpecError with every finding.
    """
    registry = default_registry() if registry is None else registry
    if isinstance(spec, str):
        raise ArgumentTypeError("spec is a polykv.Spec: parse the text first, polykv.check(polykv.parse(text), ...)")
    instance(spec, ast.Spec, "spec", "a polykv.Spec (from polykv.parse)")
    instance(registry, Registry, "registry", "a polykv.Registry (or None for the installed plugins)")
    if layers is not None:
        layers = whole_number(layers, "layers", least=1, most=MAX_LAYERS)
    if heads is not None:
        heads = whole_number(heads, "heads", least=1, most=MAX_HEADS)
    checker = _Checker(spec, registry, layers, layers_from, complete, windows, heads)
    checked = checker.run()
    if checker.diagnostics:
        raise SpecError(_in_order(checker.diagnostics), checker.unreported)
    return checked


def check_text(
    text: str,
    source: str = "<string>",
    *,
    layers: int | None = None,
    layers_from: str = "the model",
    registry: Registry | None = None,
    heads: int | None = None,
) -> CheckedSpec:
    """Parse and check ``text``, reporting syntax and semantic errors together."""
    spec, diagnostics = parse_recovering(text, source)
    unreported = 0
    try:
        checked = check(
            spec, layers=layers, layers_from=layers_from, registry=registry, complete=not diagnostics, heads=heads
        )
    except SpecError as error:
        diagnostics, unreported = diagnostics + list(error.diagnostics), error.unreported
    if diagnostics:
        raise SpecError(_in_order(diagnostics), unreported)
    return checked


def _in_order(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    return sorted(diagnostics, key=lambda d: (d.span.start, d.span.end) if d.span else (-1, -1))


class _Checker:
    def __init__(
        self,
        spec: ast.Spec,
        registry: Registry,
        layers: int | None,
        layers_from: str,
        complete: bool,
        windows: Sequence[int | None] | None,
        heads: int | None = None,
    ):
        self.given_heads = heads
        self.complete = complete
        self.windows = windows
        self.spec = spec
        self.registry = registry
        self.given_layers = layers
        self.layers_from = layers_from
        self.diagnostics: list[Diagnostic] = []
        self.unreported = 0  # errors found past MAX_REPORTED_ERRORS: counted, not kept

    def error(
        self,
        code: str,
        message: str,
        span: Span | None,
        hint: str | None = None,
        notes: Iterable[Note] = (),
    ) -> None:
        if len(self.diagnostics) >= MAX_REPORTED_ERRORS:
            self.unreported += 1
            return
        self.diagnostics.append(Diagnostic(code, message, span or self._file_start(), hint, tuple(notes)))

    def _file_start(self) -> Span:
        """The start of the spec's text: where an error about the spec as a whole points, naming its file (an
        empty file too)."""
        for item in self.spec.items:
            if item.span is not None:
                return Span.at(item.span.source, 0, 0)
        return Span.at(Source(self.spec.source_name, self.spec.source_text), 0, 0)

    def run(self) -> CheckedSpec:
        self._single_settings()
        count = self._layer_count()
        head_count = self._head_count()
        self._total_budget()
        rules = [self._rule(rule) for rule in self.spec.rules]
        checked_rules = tuple(r for r in rules if r is not None)
        self._static_selectors()
        layers = None
        selects_heads = any(rule.named_heads is not None for rule in self.spec.rules)
        if count is not None and (head_count is not None or not selects_heads):
            layers = self._layers(count, rules, head_count)
            if layers is not None:
                self._budget_sum(count, layers)
                self._sliding_windows(layers)
        checked = CheckedSpec(self.spec, checked_rules, count, layers, head_count=head_count)
        self._prefill_limit(checked)
        return attrs.evolve(checked, solver=self._solver(checked))

    # --- settings -----------------------------------------------------------------------------

    def _solver(self, checked: CheckedSpec) -> SolverChoice | None:
        decl = self.spec.solver
        if decl is None:
            return None
        solvers = [entry.name for entry in self.registry.solvers]
        if decl.name not in solvers:
            self.error(
                "unknown-solver",
                f"unknown solver '{decl.name}'",
                decl.name_span or decl.span,
                hint=_unknown_hint(decl.name, solvers, "solvers"),
            )
            return None
        solver_class = self.registry.solvers.get(decl.name).cls
        values = self._parameters(decl.name, decl.parameters, solver_class)
        if values is None:
            return None
        if not checked.has_auto and len(checked.rules) == len(self.spec.rules):
            self.error(
                "nothing-to-solve",
                f"`solver {decl.name}` has nothing to decide: no layer has an @auto budget or an auto policy",
                decl.span,
                hint="write @auto budgets (snapkv@auto) or auto policies (auto@256), or drop the solver line",
            )
            return None
        return SolverChoice(decl.name, values)

    def _prefill_limit(self, checked: CheckedSpec) -> None:
        decl = self.spec.prefill_limit
        if decl is None:
            return
        if decl.factor < 1:
            self.error(
                "bad-prefill-limit",
                f"a prefill limit below 1x cannot be met: {decl.factor:g}x (the full cache's own prefill is 1x)",
                decl.span,
                hint="write a factor of at least 1, such as `prefill <= 1.5x`",
            )
        routed = any(rule.prefill.policy == ast.AUTO for rule in checked.rules)
        if not routed and len(checked.rules) == len(self.spec.rules):
            self.error(
                "nothing-to-limit",
                "`prefill <=` has nothing to decide: it limits which policies auto layers are routed to, and no "
                "layer has an auto policy",
                decl.span,
                hint="route some layers (`auto@auto`, `auto[snapkv, kvzip]@128`), or drop the line",
            )

    def _single_settings(self) -> None:
        settings = (
            (ast.BudgetDecl, "budget"), (ast.ModelLayers, "model layers"), (ast.SolverDecl, "solver"),
            (ast.PrefillLimit, "prefill <="),
        )  # fmt: skip
        for kind, words in settings:
            found = [s for s in self.spec.statements if isinstance(s, kind)]
            for repeat in found[1:]:
                self.error(
                    "duplicate-setting",
                    f"`{words}` is set twice",
                    repeat.span,
                    hint=f"keep one `{words}` line",
                    notes=[Note("first set here", found[0].span)] if found[0].span else [],
                )

    def _layer_count(self) -> int | None:
        declared = self.spec.model_layers
        if declared is not None and declared.count < 1:
            self.error("bad-layer-count", f"a model has at least 1 layer, not {declared.count}", declared.span)
            declared = None
        elif declared is not None and declared.count > MAX_LAYERS:
            self.error(
                "bad-layer-count",
                f"polykv works with models of up to {MAX_LAYERS:,} layers, not {declared.count}",
                declared.span,
                hint="write the layer count of the model the spec is for, or drop the line",
            )
            declared = None
        if declared is not None and self.given_layers is not None and declared.count != self.given_layers:
            self.error(
                "layer-count-mismatch",
                f"this spec is written for {declared.count} layers, but {self.layers_from} has {self.given_layers}",
                declared.span,
                hint=f"write `model layers {self.given_layers}` or drop the line to use the spec with any model",
            )
            return None  # the layer-level findings would only repeat this one
        if self.given_layers is not None:
            return self.given_layers
        return declared.count if declared is not None else None

    def _head_count(self) -> int | None:
        """The KV heads per layer: given with the model, or declared by ``model layers N heads H``."""
        declared = self.spec.model_layers
        written = None if declared is None else declared.heads
        if written is not None and not 1 <= written <= MAX_HEADS:
            assert declared is not None  # written comes from it
            self.error(
                "bad-head-count",
                f"a layer has 1 to {MAX_HEADS:,} KV heads, not {written}",
                declared.span,
                hint="write the KV head count of the model the spec is for, or drop `heads`",
            )
            return self.given_heads
        if written is not None and self.given_heads is not None and written != self.given_heads:
            assert declared is not None  # written comes from it
            self.error(
                "head-count-mismatch",
                f"this spec is written for {written} KV heads per layer, but {self.layers_from} has {self.given_heads}",
                declared.span,
                hint=f"write `heads {self.given_heads}` or drop it to use the spec with any model",
            )
            return None
        return self.given_heads if self.given_heads is not None else written

    def _total_budget(self) -> None:
        decl = self.spec.budget
        if decl is None:
            return
        amount = decl.amount
        if isinstance(amount, ast.Percent):
            if decl.total:
                self.error(
                    "bad-budget",
                    "a percentage budget is already an average per layer; `total` does not apply",
                    decl.span,
                    hint=f"write `budget {format_budget(amount)}`",
                )
            self._percent_in_range(amount)
        elif amount.count < 1:
            self.error("bad-budget", f"a total budget keeps at least 1 token, not {amount.count}", amount.span)

    def _percent_in_range(self, percent: ast.Percent) -> bool:
        if 0 < percent.value <= 100:
            return True
        self.error(
            "bad-budget",
            f"a percentage budget is more than 0% and at most 100%, not {format_budget(percent)}",
            percent.span,
        )
        return False

    # --- rules and their policies -------------------------------------------------------------

    def _rule(self, rule: ast.Rule) -> CheckedRule | None:
        prefill = self._policy_use(rule.prefill, decode=False)
        decode = self._policy_use(rule.decode, decode=True) if rule.decode is not None else None
        if prefill is None or (rule.decode is not None and decode is None):
            return None
        if rule.adaptive_heads and prefill.policy != ast.AUTO:
            policy_class = self.registry.policies.get(prefill.policy).cls
            if not (issubclass(policy_class, ScoringPolicy) and policy_class.budgeted):
                assert rule.heads is not None  # adaptive_heads is what it says
                self.error(
                    "adaptive-heads-without-scores",
                    f"`heads adaptive` shares a layer's budget among its heads by the scores of its policy, and "
                    f"{prefill.policy} gives none",
                    rule.heads.span,
                    hint="use a policy that ranks tokens (snapkv, tova, h2o, ...), or drop `heads adaptive`",
                )
                return None
        return CheckedRule(rule, prefill, decode)

    def _policy_use(self, use: ast.PolicyUse, *, decode: bool) -> PhaseChoice | None:
        if decode and (use.is_auto or isinstance(use.budget, ast.AutoBudget)):
            self.error(
                "auto-while-decoding",
                "routing and budget solving choose how the prompt is compressed; a decode policy is named "
                "with a fixed budget",
                use.span,
                hint="write for example `decode streaming@1024`",
            )
            return None
        if use.is_auto:
            return self._auto_use(use)
        if use.name not in self.registry.policies:
            installed = self.registry.policies.names()
            self.error(
                "unknown-policy",
                f"unknown policy '{use.name}'",
                use.name_span or use.span,
                hint=_unknown_hint(use.name, installed, "policies"),
            )
            return None
        policy_class = self.registry.policies.get(use.name).cls
        values = self._parameters(use.name, use.parameters, policy_class)
        if values is None:
            return None
        try:
            policy = policy_class(**values)
        except ParameterError as error:
            self.error("bad-parameter", f"{use.name}: {error}", use.span, hint=error.hint)
            return None
        if not self._budget(use, policy) or (decode and not self._decode_policy(use, policy)):
            return None
        return PhaseChoice(use.name, use.budget, dict(policy.values), use=use)

    def _auto_use(self, use: ast.PolicyUse) -> PhaseChoice | None:
        ok = True
        seen: set[str] = set()
        for name in use.candidates:
            if name in seen:
                self.error("duplicate-candidate", f"'{name}' is listed twice", use.span, hint="list each policy once")
                ok = False
            elif name not in self.registry.policies:
                self.error(
                    "unknown-policy",
                    f"unknown policy '{name}' among the candidates of auto",
                    use.span,
                    hint=suggest(name, self.registry.policies.names()),
                )
                ok = False
            seen.add(name)
        if use.parameters:
            self.error(
                "bad-parameter",
                "auto takes no parameters: the router picks the policy and uses its defaults",
                use.parameters[0].span,
                hint="name a policy to set its parameters",
            )
            ok = False
        if use.budget is None:
            self.error(
                "missing-budget",
                "auto needs a budget",
                use.span,
                hint="write auto@256 (tokens), auto@10% (of the context) or auto@auto",
            )
            ok = False
        elif not self._budget_value(use.budget):
            ok = False
        return PhaseChoice(ast.AUTO, use.budget, {}, use.candidates, use=use) if ok else None

    def _parameters(
        self, name: str, parameters: Iterable[ast.Parameter], declaring: type[Configurable]
    ) -> dict[str, Value] | None:
        declared = {p.name: p for p in declaring.parameters}
        values: dict[str, Value] = {}
        ok = True
        for parameter in parameters:
            if parameter.name in values:
                self.error("duplicate-parameter", f"parameter '{parameter.name}' is given twice", parameter.span)
                ok = False
            elif parameter.name not in declared:
                known = sorted(declared)
                hint = suggest(parameter.name, known) or (
                    f"its parameters: {', '.join(known)}" if known else f"{name} takes no parameters"
                )
                self.error(
                    "unknown-parameter",
                    f"{name} has no parameter '{parameter.name}'",
                    parameter.span,
                    hint=hint,
                )
                ok = False
            else:
                try:
                    values[parameter.name] = declared[parameter.name].coerce(parameter.value)
                except ParameterError as error:
                    self.error(
                        "bad-parameter",
                        f"{name}: {error}",
                        parameter.value_span or parameter.span,
                        hint=error.hint,
                    )
                    ok = False
        return values if ok else None

    def _budget(self, use: ast.PolicyUse, policy: Policy) -> bool:
        if not policy.budgeted:
            if use.budget is None:
                return True
            self.error(
                "unexpected-budget",
                f"{use.name} keeps every token; it takes no budget",
                use.budget.span,
                hint=f"write `{use.name}` alone",
            )
            return False
        if use.budget is None:
            self.error(
                "missing-budget",
                f"{use.name} needs a budget",
                use.span,
                hint=f"write {use.name}@256 (tokens), {use.name}@10% (of the context) or {use.name}@auto",
            )
            return False
        if not self._budget_value(use.budget):
            return False
        needed = policy.min_budget()
        if isinstance(use.budget, ast.Tokens) and use.budget.count < needed:
            self.error(
                "budget-too-small",
                f"a budget of {use.budget.count} is too small for {policy!r}: it needs at least {needed}",
                use.budget.span,
                hint=f"raise the budget to {needed} or more, or lower the policy's parameters",
            )
            return False
        return True

    def _budget_value(self, budget: ast.Budget) -> bool:
        if isinstance(budget, ast.Tokens) and budget.count < 1:
            self.error(
                "budget-too-small",
                f"a budget of {budget.count} keeps nothing",
                budget.span,
                hint="give at least 1 token",
            )
            return False
        if isinstance(budget, ast.Percent):
            return self._percent_in_range(budget)
        if isinstance(budget, ast.AutoBudget) and self.spec.budget is None:
            self.error(
                "auto-budget-without-total",
                "an @auto budget needs a total budget to share",
                budget.span,
                hint="add a line such as `budget 512` (average tokens per layer), or pass budget= to polykv.compile",
            )
            return False
        return True

    def _decode_policy(self, use: ast.PolicyUse, policy: Policy) -> bool:
        if not policy.budgeted:
            self.error(
                "useless-decode-policy",
                f"`decode {use.name}` changes nothing: "
                "a layer keeps what it generates unless a decode policy bounds it",
                use.span,
                hint=f"drop `decode {use.name}`",
            )
            return False
        if policy.needs().prefill_only:
            what = (
                "attention accumulated over the whole prompt"
                if policy.needs().accumulated_attention
                else "the model to repeat the prompt"
            )
            self.error(
                "prefill-only-policy",
                f"{use.name} needs {what}, which exists only at prefill",
                use.name_span or use.span,
                hint="use it before `decode`; while decoding use a policy such as streaming or tova",
            )
            return False
        return True

    # --- layers -------------------------------------------------------------------------------

    def _static_selectors(self) -> None:
        """Checks that need no layer count: backwards ranges, and `*` used twice for the same heads."""
        every = [r for r in self.spec.rules if isinstance(r.selector, ast.EveryLayer)]
        whole = [r for r in every if r.named_heads is None]
        for repeat in every[1:]:
            if whole and (repeat.named_heads is None or repeat is not whole[0]):
                first = every[0]
                self.error(
                    "duplicate-every",
                    "only one statement can use `*`"
                    + (" for the same heads" if repeat.named_heads is not None else ""),
                    repeat.selector.span,
                    hint="`* heads ...` statements may share out the heads, each naming different ones"
                    if first.named_heads is not None or repeat.named_heads is not None
                    else None,
                    notes=[Note("`*` is first used here", first.selector.span)] if first.selector.span else [],
                )
        for rule in self.spec.rules:
            items = list(rule.selector.items) if isinstance(rule.selector, ast.LayerList) else []
            items += list(rule.named_heads.items) if rule.named_heads is not None else []
            for item in items:
                # A range whose bounds have the same sign runs backwards whatever the count.
                if isinstance(item, ast.LayerRange) and (item.start < 0) == (item.stop < 0) and item.start > item.stop:
                    self.error(
                        "backwards-range",
                        f"the range {item.start}-{item.stop} runs backwards",
                        item.span,
                        hint=f"write {item.stop}-{item.start}",
                    )

    def _layers(
        self, count: int, rules: list[CheckedRule | None], head_count: int | None
    ) -> tuple[LayerEntry, ...] | None:
        """One entry per layer, or None (after errors) when a layer or head is named twice, not at all, or does
        not exist.

        Selectors of whole layers are checked as intervals, so their cost follows the statements, not the
        layer count; statements that name heads claim each (layer, head) they name.
        """
        claims = _Claims()
        assigned: list[tuple[int, int, CheckedRule | None]] = []
        units: dict[int, dict[int, tuple[ast.Rule, Span | None, CheckedRule | None]]] = {}
        headed_layers: list[int] = []  # the keys of ``units``, in order
        everies: list[tuple[ast.Rule, CheckedRule | None, frozenset[int] | None]] = []
        ok = True
        for rule, checked in zip(self.spec.rules, rules):
            heads = None
            if rule.named_heads is not None:
                heads = self._head_set(rule.named_heads, head_count)
                if heads is None:
                    ok = False
                    continue
            if isinstance(rule.selector, ast.EveryLayer):
                everies.append((rule, checked, heads))
                continue
            for item in rule.selector.items:
                bounds = self._resolve(item, count)
                if bounds is None:
                    ok = False
                elif heads is None:
                    ok &= self._claim_layers(claims, units, headed_layers, bounds, rule, item, checked, assigned)
                else:
                    ok &= self._claim_heads(claims, units, headed_layers, bounds, heads, rule, item, checked)
        ok &= self._every_heads_disjoint(everies)
        whole_every = next(((rule, checked) for rule, checked, heads in everies if heads is None), None)
        head_everies = [(rule, checked, heads) for rule, checked, heads in everies if heads is not None]
        uncovered: list[tuple[int, int]] = []  # intervals of layers nothing covers
        missing: list[tuple[int, frozenset[int]]] = []  # layers some of whose heads nothing covers
        for start, stop in claims.gaps(count):
            first = bisect.bisect_left(headed_layers, start)
            last = bisect.bisect_right(headed_layers, stop)
            inside = headed_layers[first:last]
            cursor = start
            for layer in [*inside, stop + 1]:
                if cursor < layer:  # layers nothing names
                    if whole_every is not None:
                        assigned.append((cursor, layer - 1, whole_every[1]))
                    elif head_everies:
                        for index in range(cursor, layer):
                            units[index] = {}
                            missing += self._fill_heads(index, units[index], head_everies, None, head_count)
                    else:
                        uncovered.append((cursor, layer - 1))
                if layer <= stop:
                    missing += self._fill_heads(layer, units[layer], head_everies, whole_every, head_count)
                cursor = layer + 1
        ok &= self._report_uncovered(uncovered, missing, count, head_count)
        if not ok:
            return None
        entries: list[LayerEntry | None] = [None] * count
        for start, stop, checked in assigned:
            if checked is None:
                return None
            for index in range(start, stop + 1):
                entries[index] = _entry(index, checked)
        for index, slots in units.items():
            if any(checked is None for _rule, _span, checked in slots.values()):
                return None
            assert head_count is not None  # heads were named, so their count is known (run)
            checked_heads = [cast(CheckedRule, slots[head][2]) for head in range(head_count)]  # none is None (above)
            entries[index] = _head_entries(index, checked_heads)
        return tuple(cast("list[LayerEntry]", entries))  # every layer assigned, or None returned above

    def _claim_layers(self, claims, units, headed_layers, bounds, rule, item, checked, assigned) -> bool:
        """Claim whole layers; an error (False) where a statement named them, or some of their heads, before."""
        taken, first, fresh = claims.claim(*bounds, (rule, item.span))
        low, high = bisect.bisect_left(headed_layers, bounds[0]), bisect.bisect_right(headed_layers, bounds[1])
        headed = headed_layers[low:high]
        if not taken and not headed:
            assigned += [(start, stop, checked) for start, stop in fresh]
            return True
        if taken:
            several = len(taken) > 1 or taken[0][0] != taken[0][1]
            words = ("layers {} are" if several else "layer {} is").format(_interval_words(taken))
            hint = "name each layer in one statement only"
        else:
            first_rule, span, _checked = next(iter(units[headed[0]].values()))
            first = (first_rule, span)
            words = f"heads of layer{'s' if len(headed) > 1 else ''} {_interval_words([(i, i) for i in headed])} are"
            hint = "name each head of a layer in one statement only: `layers N heads ...` or `layers N`, not both"
        first_rule, first_span = first
        where = "earlier in this statement" if first_rule is rule else "by an earlier statement"
        self.error(
            "overlap",
            f"{words} already given a policy {where}",
            item.span,
            hint=hint,
            notes=[Note("first given here", first_span)] if first_span else [],
        )
        return False

    def _claim_heads(self, claims, units, headed_layers, bounds, heads, rule, item, checked) -> bool:
        for layer in range(bounds[0], bounds[1] + 1):
            owner = claims.owner(layer)
            slots = units.get(layer, {})
            repeated = sorted(heads & slots.keys())
            if owner is None and not repeated:
                if layer not in units:
                    bisect.insort(headed_layers, layer)
                units.setdefault(layer, {}).update({head: (rule, item.span, checked) for head in heads})
                continue
            first_rule, first_span = owner if owner is not None else slots[repeated[0]][:2]
            what = f"layer {layer}" if owner is not None else f"layer {layer} head{'s' if len(repeated) > 1 else ''} "
            if owner is None:
                what += _interval_words([(head, head) for head in repeated])
            where = "earlier in this statement" if first_rule is rule else "by an earlier statement"
            self.error(
                "overlap",
                f"{what} {'are' if owner is None and len(repeated) > 1 else 'is'} already given a policy {where}",
                rule.named_heads.span if owner is None and rule.named_heads is not None else item.span,
                hint="name each head of a layer in one statement only: `layers N heads ...` or `layers N`, not both",
                notes=[Note("first given here", first_span)] if first_span else [],
            )
            return False
        return True

    def _every_heads_disjoint(self, everies) -> bool:
        """`* heads ...` statements share out the heads: no head may be named by two of them."""
        ok = True
        seen: dict[int, ast.Rule] = {}
        for rule, _checked, heads in everies:
            if heads is None:
                continue
            repeated = sorted(head for head in heads if head in seen)
            if repeated:
                self.error(
                    "overlap",
                    f"head{'s' if len(repeated) > 1 else ''} {_interval_words([(h, h) for h in repeated])} of the "
                    "layers `*` stands for already given a policy by an earlier `*` statement",
                    rule.named_heads.span,
                    hint="give each head to one `* heads ...` statement",
                    notes=[Note("first given here", first.span)]
                    if (first := seen[repeated[0]].named_heads) is not None and first.span is not None
                    else [],  # a spec built in code has no spans to point at
                )
                ok = False
            seen.update({head: rule for head in heads})
        return ok

    @staticmethod
    def _fill_heads(layer, slots, head_everies, whole_every, head_count) -> list[tuple[int, frozenset[int]]]:
        """Give the heads of ``layer`` that no statement names to the `*` statements; the heads left over."""
        for rule, checked, heads in head_everies:
            slots.update({head: (rule, None, checked) for head in heads if head not in slots})
        if whole_every is not None:
            slots.update(
                {head: (whole_every[0], None, whole_every[1]) for head in range(head_count) if head not in slots}
            )
        left = frozenset(range(head_count)).difference(slots)
        return [(layer, left)] if left else []

    def _report_uncovered(
        self,
        uncovered: list[tuple[int, int]],
        missing: list[tuple[int, frozenset[int]]],
        count: int,
        head_count: int | None,
    ) -> bool:
        """Report layers (and heads of layers) that no statement covers; True when there are none."""
        if not uncovered and not missing:
            return True
        if not self.complete:
            return False
        anchor = self.spec.model_layers or (self.spec.rules[-1] if self.spec.rules else None)
        place = anchor.span if anchor else None
        whole = uncovered + [(layer, layer) for layer, heads in missing if len(heads) == head_count]
        # Heads are missing only from a spec laid out with its head count.
        partial = [(layer, heads) for layer, heads in missing if len(heads) < cast(int, head_count)]
        if whole:
            whole.sort()
            listed = _interval_words(whole)
            several = len(whole) > 1 or whole[0][0] != whole[0][1]
            words = "layers {} of {} have" if several else "layer {} of {} has"
            self.error(
                "uncovered-layers",
                f"{words.format(listed, count)} no policy",
                place,
                hint=f"add `layers {listed}: POLICY`, or `*: POLICY` for every layer not named",
            )
        for heads, layers in _grouped(partial):
            named = _interval_words([(head, head) for head in sorted(heads)])
            several = len(heads) > 1
            self.error(
                "uncovered-heads",
                f"head{'s' if several else ''} {named} of layer{'s' if len(layers) > 1 else ''} "
                f"{_interval_words([(layer, layer) for layer in layers])} {'have' if several else 'has'} no policy "
                f"({head_count} KV heads per layer)",
                place,
                hint=f"add `layers {_interval_words([(layer, layer) for layer in layers])} heads {named}: POLICY`, "
                "or `*: POLICY` for every head not named",
            )
        return False

    def _head_set(self, heads: ast.HeadList, head_count: int | None) -> frozenset[int] | None:
        """The KV heads ``heads`` names, or None (after an error) when one does not exist."""
        assert head_count is not None  # a spec that names heads is laid out only with their count (run)
        if heads.every:
            return frozenset(range(head_count))
        found: set[int] = set()
        for item in heads.items:
            bounds = self._resolve(item, head_count, what="head")
            if bounds is None:
                return None
            found.update(range(bounds[0], bounds[1] + 1))
        return frozenset(found)

    def _resolve(
        self, item: ast.LayerIndex | ast.LayerRange, count: int, what: str = "layer"
    ) -> tuple[int, int] | None:
        """The first and last layer (or head) ``item`` names, or None (after an error) when one does not exist."""
        bounds = [item.index] if isinstance(item, ast.LayerIndex) else [item.start, item.stop]
        resolved = []
        for index in bounds:
            actual = index + count if index < 0 else index
            if not 0 <= actual < count:
                if what == "head":
                    source = self.layers_from if self.given_heads is not None else "this spec (`model ... heads H`)"
                    message = f"KV head {index} does not exist: {source} has {count} KV heads per layer"
                else:
                    message = f"layer {index} does not exist: {self.layers_from} has {count} layers"
                self.error(f"{what}-out-of-range", f"{message} ({_index_words(count)})", item.span)
                return None
            resolved.append(actual)
        if len(resolved) == 2 and resolved[0] > resolved[1]:
            assert isinstance(item, ast.LayerRange)  # two bounds
            if (item.start < 0) != (item.stop < 0):  # same-sign ranges were reported already
                self.error(
                    "backwards-range",
                    f"the range {item.start}-{item.stop} runs backwards: "
                    f"with {count} {what}s it is {resolved[0]} to {resolved[1]}",
                    item.span,
                )
            return None
        return resolved[0], resolved[-1]

    def _sliding_windows(self, layers: tuple[LayerEntry, ...]) -> None:
        """A sliding-window layer never holds more than its window: a named policy must work with that."""
        if not self.windows:
            return
        for entry, window in zip(layers, self.windows):
            for choice in _distinct(choice for pair in entry.choices for choice in pair):
                if window is None or choice is None or choice.policy == ast.AUTO:
                    continue
                needed = self.registry.policies.create(choice.policy, dict(choice.params)).min_budget()
                if window - 1 < needed:
                    self.error(
                        "budget-too-small",
                        f"layer {entry.index} is a sliding-window layer that keeps at most {window - 1} tokens, "
                        f"fewer than the {needed} {choice.policy} needs",
                        choice.use.span if choice.use is not None else None,
                        hint="lower the policy's window parameter for these layers, or give them another policy",
                    )

    def _budget_sum(self, count: int, layers: tuple[LayerEntry, ...]) -> None:
        """Fixed budgets must fit in the total budget, where both are in the same unit."""
        decl = self.spec.budget
        if decl is None:
            return
        if isinstance(decl.amount, ast.Tokens):
            total = decl.amount.count if decl.total else decl.amount.count * count
            fixed = sum(_fixed_tokens(e) for e in layers)
            if fixed > total:
                self.error(
                    "budget-exceeds-total",
                    f"the fixed budgets add up to {fixed:g} tokens, more than the total budget of {total}",
                    decl.span,
                    hint="lower the fixed budgets or raise the total",
                )
        elif not decl.total:
            shares = [_mean([_percent_share(prefill) for prefill, _decode in e.choices]) for e in layers]
            if all(share is not None for share in shares):
                average = sum(cast("list[float]", shares)) / count
                if average > decl.amount.value:
                    self.error(
                        "budget-exceeds-total",
                        f"the budgets keep {average:g}% of the context per layer on average, "
                        f"more than the total budget of {format_budget(decl.amount)}",
                        decl.span,
                        hint="lower the budgets or raise the total",
                    )


class _Claims:
    """The layers statements have named so far: disjoint intervals in order, each with where it was named."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._stops: list[int] = []  # inclusive
        self._where: list[tuple[ast.Rule, Span | None]] = []

    def claim(self, start: int, stop: int, where: tuple[ast.Rule, Span | None]):
        """Claim layers ``start``..``stop``: the parts named before (intervals), where the first of them was
        named, and the parts newly claimed (intervals)."""
        first = bisect.bisect_left(self._stops, start)
        last = first
        taken, fresh = [], []
        cursor = start
        while last < len(self._starts) and self._starts[last] <= stop:
            if self._starts[last] > cursor:
                fresh.append((cursor, self._starts[last] - 1))
            taken.append((max(self._starts[last], start), min(self._stops[last], stop)))
            cursor = self._stops[last] + 1
            last += 1
        if cursor <= stop:
            fresh.append((cursor, stop))
        owner = self._where[first] if taken else None
        merged = sorted(
            [(s, e, w) for s, e, w in zip(self._starts[first:last], self._stops[first:last], self._where[first:last])]
            + [(s, e, where) for s, e in fresh],
            key=lambda interval: interval[0],
        )
        self._starts[first:last] = [s for s, _e, _w in merged]
        self._stops[first:last] = [e for _s, e, _w in merged]
        self._where[first:last] = [w for _s, _e, w in merged]
        return taken, owner, fresh

    def owner(self, index: int) -> tuple[ast.Rule, Span | None] | None:
        """Where layer ``index`` was named, or None if it was not."""
        found = bisect.bisect_left(self._stops, index)
        if found < len(self._starts) and self._starts[found] <= index:
            return self._where[found]
        return None

    def gaps(self, count: int) -> list[tuple[int, int]]:
        """The intervals of layers 0..count-1 that nothing claimed."""
        found, cursor = [], 0
        for start, stop in zip(self._starts, self._stops):
            if start > cursor:
                found.append((cursor, start - 1))
            cursor = stop + 1
        if cursor < count:
            found.append((cursor, count - 1))
        return found


def _interval_words(intervals: list[tuple[int, int]]) -> str:
    """``0-3,5,7-9``: ordered intervals of layers as the language writes a selector (touching ones joined)."""
    joined: list[list[int]] = []
    for start, stop in intervals:
        if joined and joined[-1][1] + 1 == start:
            joined[-1][1] = stop
        else:
            joined.append([start, stop])
    return ",".join(str(start) if start == stop else f"{start}-{stop}" for start, stop in joined)


def _entry(index: int, checked: CheckedRule) -> LayerEntry:
    return LayerEntry(
        index, checked.prefill, checked.decode, rule=checked.rule, adaptive_heads=checked.rule.adaptive_heads
    )


def _head_entries(index: int, heads: list[CheckedRule]) -> LayerEntry:
    """A layer whose heads were named by statements: one entry per head, unless they all do the same thing
    and it is decided (heads left to routing or budget solving are decided one by one)."""
    first = heads[0]
    same = all((h.prefill, h.decode) == (first.prefill, first.decode) for h in heads)
    if same and not first.prefill.is_open:
        return _entry(index, first)
    entries = [HeadEntry(head, h.prefill, h.decode, rule=h.rule) for head, h in enumerate(heads)]
    return LayerEntry(index, first.prefill, first.decode, rule=first.rule, heads=entries)


def _grouped(partial: list[tuple[int, frozenset[int]]]) -> list[tuple[frozenset[int], list[int]]]:
    """Layers grouped by the set of heads they lack, in order of their first layer."""
    groups: dict[frozenset[int], list[int]] = {}
    for layer, heads in sorted(partial, key=lambda entry: entry[0]):
        groups.setdefault(heads, []).append(layer)
    return list(groups.items())


def _distinct(choices: Iterable[PhaseChoice | None]) -> list[PhaseChoice | None]:
    found: list[PhaseChoice | None] = []
    for choice in choices:
        if choice not in found:
            found.append(choice)
    return found


def _fixed_tokens(entry: LayerEntry) -> float:
    """The tokens a layer keeps per head on average by its fixed token budgets (others count nothing)."""
    choices = entry.choices
    return sum(p.budget.count for p, _d in choices if isinstance(p.budget, ast.Tokens)) / len(choices)


def _mean(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(cast("list[float]", values)) / len(values)


def _percent_share(choice: PhaseChoice) -> float | None:
    """A layer's budget as a percentage of the context (full layers keep 100%), if known statically."""
    if choice.budget is None:
        return 100.0
    if isinstance(choice.budget, ast.Percent):
        return float(choice.budget.value)
    return None


def _unknown_hint(name: str, installed: list[str], kind: str) -> str:
    """A close installed name, or the list of what is installed."""
    return suggest(name, installed) or f"installed {kind}: {', '.join(installed) or 'none'}"


def _index_words(count: int) -> str:
    return "0" if count == 1 else f"0-{count - 1}, or -{count}--1 from the end"

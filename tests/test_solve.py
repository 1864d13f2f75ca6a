"""The budget solvers: exact against brute force, totals and bounds kept, the published rules' shapes."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from polykv_plugins.cake import CakeSolver
from polykv_plugins.knapsack import KnapsackSolver
from polykv_plugins.pyramid import PyramidSolver
from polykv_plugins.uniform import UniformSolver

from polykv.solver import BudgetProblem, InfeasibleError, LayerOptions, monotone, options, uniform_solution

GRID = (16, 32, 64, 128, 256)


@st.composite
def problems(draw, max_layers: int = 4):
    layers = []
    policies = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=3, unique=True))
    for _ in range(draw(st.integers(1, max_layers))):
        if draw(st.integers(0, 5)) == 0:
            tokens = draw(st.one_of(st.none(), st.sampled_from([16, 48, 100])))
            layers.append(LayerOptions(fixed=("f", tokens)))
            continue
        losses = {}
        for policy in policies:
            table = [draw(st.floats(0, 2)) for _ in GRID]
            if draw(st.booleans()):
                table[0] = math.inf  # the policy cannot take the smallest budget
            losses[policy] = tuple(table)
        whole = draw(st.one_of(st.none(), st.just(0.0)))
        layers.append(LayerOptions(losses=losses, whole=whole, max_budget=draw(st.sampled_from([None, 64, 128]))))
    prompt = draw(st.sampled_from([100, 200, 300]))
    total = draw(st.integers(0, len(layers) * 320))
    return BudgetProblem(GRID, layers, total, prompt, step=draw(st.sampled_from([1, 16])))


def brute_force(problem: BudgetProblem) -> float:
    best = math.inf
    for combination in itertools.product(*(options(problem, layer) for layer in problem.layers)):
        if sum(c.tokens for c in combination) <= problem.total:
            best = min(best, sum(c.loss for c in combination))
    return best


@settings(max_examples=300)
@given(problems())
def test_the_knapsack_is_exact_on_the_grid_and_keeps_every_bound(problem):
    expected = brute_force(problem)
    if math.isinf(expected):
        with pytest.raises(InfeasibleError):
            KnapsackSolver().solve(problem)
        return
    solution = KnapsackSolver().solve(problem)
    assert solution.loss <= expected + 1e-9  # exact on the grid; leftover tokens can only lower it
    assert solution.tokens <= problem.total
    for choice, layer in zip(solution.layers, problem.layers):
        if layer.fixed is not None:
            assert choice.policy == "f"
        elif not choice.whole:
            assert layer.max_budget is None or choice.tokens <= layer.max_budget
            assert choice.tokens < problem.prompt_length and not math.isinf(choice.loss)
        else:
            assert layer.whole is not None and choice.tokens == problem.prompt_length


@given(problems())
def test_solutions_use_the_whole_total_when_the_layers_can_hold_it(problem):
    try:
        solution = KnapsackSolver().solve(problem)
    except InfeasibleError:
        return
    room = sum(
        c.tokens if (c.whole or layer.fixed) else min(problem.prompt_length - 1, layer.max_budget or 10**9)
        for c, layer in zip(solution.layers, problem.layers)
    )
    assert solution.tokens == min(problem.total, room) or solution.tokens == problem.total


def test_routing_picks_the_dominating_policy():
    better = tuple(0.1 / (i + 1) for i in range(len(GRID)))
    worse = tuple(0.2 / (i + 1) for i in range(len(GRID)))
    layers = [LayerOptions({"worse": worse, "better": better}, whole=None) for _ in range(6)]
    solution = KnapsackSolver().solve(BudgetProblem(GRID, layers, 6 * 64, 1000))
    assert {c.policy for c in solution.layers} == {"better"}


def test_the_solver_spends_where_the_loss_falls_most():
    steep = (1.0, 0.5, 0.2, 0.05, 0.0)
    flat = (0.01, 0.009, 0.008, 0.007, 0.0)
    layers = [LayerOptions({"p": flat}, whole=None), LayerOptions({"p": steep}, whole=None)]
    solution = KnapsackSolver().solve(BudgetProblem(GRID, layers, 144, 1000))
    assert [c.tokens for c in solution.layers] == [16, 128]


def test_keeping_a_layer_whole_is_an_option_that_counts_the_prompt():
    layers = [LayerOptions({"p": (5.0, 4.0, 3.0, 2.0, 1.0)}, whole=0.0), LayerOptions({"p": (0.0,) * 5}, whole=0.0)]
    solution = KnapsackSolver().solve(BudgetProblem(GRID, layers, 116, 100))
    assert solution.layers[0].whole and solution.layers[0].tokens == 100
    assert solution.layers[1].tokens == 16 and solution.tokens == 116


def test_an_infeasible_total_says_by_how_much():
    layers = [LayerOptions(fixed=("full", None)), LayerOptions({"p": (0.0,) * 5}, whole=None)]
    with pytest.raises(InfeasibleError, match=r"need at least 1016 stored tokens.*16 more than the total of 1000"):
        KnapsackSolver().solve(BudgetProblem(GRID, layers, 1000, 1000))


@given(problems())
def test_the_solver_never_predicts_more_loss_than_the_best_uniform_assignment(problem):
    try:
        solution = KnapsackSolver().solve(problem)
    except InfeasibleError:
        return
    uniform = uniform_solution(problem)
    assert uniform is None or solution.loss <= uniform.loss + 1e-9


def test_monotone_makes_a_table_non_increasing():
    assert monotone([0.5, 0.7, 0.3, 0.4, 0.1]) == (0.5, 0.5, 0.3, 0.3, 0.1)
    assert monotone([math.inf, 0.2, 0.3]) == (math.inf, 0.2, 0.2)


def _free_problem(layers: int = 8, total: int = 8 * 100) -> BudgetProblem:
    table = {"p": (0.5, 0.4, 0.3, 0.2, 0.1), "q": (0.6, 0.3, 0.25, 0.1, 0.05)}
    return BudgetProblem(GRID, [LayerOptions(table) for _ in range(layers)], total, 4000, step=1)


def test_uniform_shares_equally_and_sums_exactly():
    solution = UniformSolver().solve(_free_problem(total=803))
    assert sorted(c.tokens for c in solution.layers) == [100] * 5 + [101] * 3
    assert solution.tokens == 803


def test_pyramid_falls_with_depth_around_the_same_mean():
    solution = PyramidSolver(window=8, beta=20.0).solve(_free_problem(layers=10, total=10 * 128))
    tokens = [c.tokens for c in solution.layers]
    assert tokens == sorted(tokens, reverse=True) and sum(tokens) == 1280
    assert tokens[0] > 2 * 128 - 20 and tokens[-1] < 20


def test_cake_follows_the_preference_scores():
    entropy = [1.0, 2.0, 3.0, 4.0]
    variance = [1.0, 1.0, 2.0, 2.0]
    solution = CakeSolver().solve(_free_problem(layers=4, total=4 * 100), {"entropy": entropy, "variance": variance})
    tokens = [c.tokens for c in solution.layers]
    preference = [h * v for h, v in zip(entropy, variance)]
    for got, share in zip(tokens, preference):
        assert abs(got - 400 * share / sum(preference)) <= 1
    with pytest.raises(ValueError, match="cake needs the entropy and variance signal"):
        CakeSolver().solve(_free_problem())


@given(problems(max_layers=6), st.sampled_from([UniformSolver(), PyramidSolver(), CakeSolver()]))
def test_every_rule_sums_to_the_total_within_bounds(problem, solver):
    signals = {"entropy": [1.0 + i for i in range(len(problem.layers))], "variance": [0.5] * len(problem.layers)}
    try:
        solution = solver.solve(problem, signals)
    except (InfeasibleError, ValueError):
        return
    for choice, layer in zip(solution.layers, problem.layers):
        if layer.fixed is None and not choice.whole:
            assert choice.tokens >= 1 and (layer.max_budget is None or choice.tokens <= layer.max_budget)
    assert solution.tokens <= problem.total or any(layer.fixed for layer in problem.layers)


@pytest.mark.memory_limit(512)
@pytest.mark.parametrize("total", [80 * 7_000, 80 * 300_000, 10**12])
def test_the_knapsack_stays_bounded_for_any_total(total):
    """A long prompt, a fine grid (unit 1 token) and any total: coarser units keep time and memory bounded."""
    grid = tuple(sorted({2**i + i for i in range(20)}))  # a greatest common divisor of 1, up to half a million
    layers = [
        LayerOptions({p: tuple(1.0 / (b + layer + k) for b in grid) for k, p in enumerate("abc")}, whole=0.0)
        for layer in range(80)
    ]
    problem = BudgetProblem(grid, layers, total, 1_000_000, step=1)
    solution = KnapsackSolver().solve(problem)
    assert solution.tokens <= total
    uniform = uniform_solution(problem)
    assert uniform is None or solution.loss <= uniform.loss + 1e-9
    if total >= 80 * 1_000_000:
        assert all(choice.whole for choice in solution.layers)  # above the prompt: every layer whole, no table

"""Tests of the Puzzle MIP (puzzle.solver) against brute force on small instances.

Every instance is small enough (at most 4**10 children) to enumerate with numpy broadcasting,
so the MIP's optimum, its diverse solutions and its infeasibility diagnosis are each checked
against the exhaustive answer. Resources are integers so no child sits within CBC's feasibility
tolerance of a limit, which would make "feasible" ambiguous.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from puzzle.config import Scenario, SolveConfig, ThroughputConstraint
from puzzle.solver import (
    GIB,
    Candidate,
    Constraint,
    InfeasibleError,
    ProblemError,
    SearchProblem,
    SolverOptions,
    constraints_from_config,
    hamming_distance,
    memory_constraint,
    params_constraint,
    pareto_sweep,
    resource_name,
    solve,
    solve_diverse,
    speedup_constraint,
    throughput_constraint,
)

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Random small instances and their brute force


@st.composite
def instances(draw, min_limit_frac: float = -0.1):
    """A random SearchProblem and 1-3 constraints. Limits fall anywhere from a bit below the
    cheapest child to the dearest one, so some instances are infeasible."""
    n_layers = draw(st.integers(2, 5))
    slot_names = ["attention", "ffn"][: draw(st.integers(1, 2))]
    n_res = draw(st.integers(1, 3))
    res = [f"r{i}" for i in range(n_res)]
    # Shared costs: a variant costs the same in every layer, as the profile measures it once;
    # the solver then branches on per-variant counts. Otherwise costs differ per layer.
    shared = draw(st.booleans())
    n_cands = {s: draw(st.integers(2, 4)) for s in slot_names}
    costs = {(s, i): {r: float(draw(st.integers(0, 20))) for r in res} for s in slot_names for i in range(n_cands[s])}
    slots = {}
    for layer in range(n_layers):
        for s in slot_names:
            n_c = n_cands[s] if shared else draw(st.integers(2, 4))
            slots[(layer, s)] = [
                Candidate(
                    f"v{i}",
                    draw(st.integers(0, 100)) / 100,
                    costs[(s, i)] if shared else {r: float(draw(st.integers(0, 20))) for r in res},
                )
                for i in range(n_c)
            ]
    non_block = {r: float(draw(st.integers(0, 10))) for r in res}
    problem = SearchProblem(slots, non_block, parent={k: "v0" for k in slots})
    constraints = []
    n_con = draw(st.integers(1, 3))
    for j in range(n_con):
        # Single resources and weighted combinations (like prefill + output_len * decode).
        used = draw(st.lists(st.sampled_from(res), min_size=1, max_size=n_res, unique=True))
        terms = {r: float(draw(st.integers(1, 3))) for r in used}
        q = quantities(problem, terms)
        lo, hi = float(q.min()), float(q.max())
        frac = draw(st.integers(int(min_limit_frac * 100), 100)) / 100
        limit = math.floor(lo + frac * (hi - lo))
        constraints.append(Constraint(f"c{j}", terms, float(limit)))
    return problem, constraints


def _axis_array(problem: SearchProblem, values_per_slot: list[list[float]]) -> np.ndarray:
    """Sum per-slot value lists over all children: one axis per slot (problem.keys order)."""
    n = len(values_per_slot)
    total = np.zeros([1] * n)
    for i, vals in enumerate(values_per_slot):
        shape = [1] * n
        shape[i] = len(vals)
        total = total + np.asarray(vals, dtype=np.float64).reshape(shape)
    return total


def quantities(problem: SearchProblem, terms: dict[str, float]) -> np.ndarray:
    per = [[sum(w * c.resources[r] for r, w in terms.items()) for c in problem.slots[k]] for k in problem.keys]
    const = sum(w * problem.non_block.get(r, 0.0) for r, w in terms.items())
    return _axis_array(problem, per) + const


def scores(problem: SearchProblem) -> np.ndarray:
    return _axis_array(problem, [[c.score for c in problem.slots[k]] for k in problem.keys])


def feasible_mask(problem: SearchProblem, constraints: list[Constraint]) -> np.ndarray:
    mask = np.ones(scores(problem).shape, dtype=bool)
    for c in constraints:
        mask &= quantities(problem, dict(c.terms)) <= c.limit
    return mask


def far_from(problem: SearchProblem, earlier: list[dict], d: int) -> np.ndarray:
    """Children at Hamming distance >= d from every earlier selection."""
    mask = np.ones(scores(problem).shape, dtype=bool)
    for sel in earlier:
        per = [[0.0 if c.name == sel[k] else 1.0 for c in problem.slots[k]] for k in problem.keys]
        mask &= _axis_array(problem, per) >= d
    return mask


def close(a: float, b: float, rel: float = 1e-6) -> bool:
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def assert_meets(problem: SearchProblem, sol, constraints: list[Constraint]) -> None:
    assert set(sol.selection) == set(problem.slots)
    for c in constraints:
        q = problem.quantity(c, sol.selection)
        assert q <= c.limit + 1e-9 * max(1.0, abs(c.limit)), f"{c.label}: child has {q}"
    assert close(sol.objective, problem.degradation(sol.selection))


# ---------------------------------------------------------------------------------------------
# Properties


@SETTINGS
@given(instances(min_limit_frac=-0.4))
def test_optimum_matches_brute_force_or_infeasibility_is_explained(inst):
    problem, constraints = inst
    obj = scores(problem)
    mask = feasible_mask(problem, constraints)
    if mask.any():
        sol = solve(problem, constraints)
        assert sol.status == "optimal"
        assert close(sol.objective, float(obj[mask].min())), (sol.objective, float(obj[mask].min()))
        assert_meets(problem, sol, constraints)
        plain = solve(problem, constraints, SolverOptions(aggregate=False))
        assert close(plain.objective, sol.objective)
        for r, v in problem.resource_totals(sol.selection).items():
            assert sol.resources[r] == pytest.approx(v)
        return
    with pytest.raises(InfeasibleError) as err:
        solve(problem, constraints)
    reported = {v.constraint.name: v for v in err.value.violations}
    expected = {}
    for i, c in enumerate(constraints):
        others = feasible_mask(problem, [o for j, o in enumerate(constraints) if j != i])
        if others.any():
            expected[c.name] = float(quantities(problem, dict(c.terms))[others].min())
    expected = {n: q for n, q in expected.items() if q > next(c for c in constraints if c.name == n).limit}
    if not expected:
        # No constraint's companions are feasible together: each is reported against the bare space.
        expected = {c.name: float(quantities(problem, dict(c.terms)).min()) for c in constraints}
        assert all(not v.under for v in reported.values())
    assert set(reported) == set(expected)
    for name, q in expected.items():
        assert close(reported[name].best, q), (name, reported[name].best, q)
        assert reported[name].constraint.label in str(err.value)
        assert f"{q:.6g}" in str(err.value)


@SETTINGS
@given(instances(min_limit_frac=0.3), st.integers(1, 3), st.integers(2, 4))
def test_diverse_solutions_keep_their_distance_and_are_each_optimal(inst, d, k):
    problem, constraints = inst
    d = min(d, len(problem.slots))
    obj = scores(problem)
    mask = feasible_mask(problem, constraints)
    if not mask.any():
        return
    sols = solve_diverse(problem, constraints, num_solutions=k, min_hamming_distance=d)
    assert 1 <= len(sols) <= k
    for i, sol in enumerate(sols):
        assert_meets(problem, sol, constraints)
        for earlier in sols[:i]:
            assert hamming_distance(sol.selection, earlier.selection) >= d
        allowed = mask & far_from(problem, [s.selection for s in sols[:i]], d)
        assert close(sol.objective, float(obj[allowed].min()))
    if len(sols) < k:
        assert not (mask & far_from(problem, [s.selection for s in sols], d)).any()


@SETTINGS
@given(instances(min_limit_frac=0.5), st.integers(2, 6))
def test_pareto_sweep_spans_parent_to_best_and_each_point_is_optimal(inst, points):
    problem, constraints = inst
    sweep, others = constraints[0], constraints[1:]
    mask = feasible_mask(problem, others)
    if not mask.any():
        return
    q = quantities(problem, dict(sweep.terms))
    q_best = float(q[mask].min())
    front = pareto_sweep(problem, sweep, others, points=points)
    assert 1 <= len(front) <= points
    assert close(front[-1].target, q_best)
    assert close(problem.quantity(sweep, front[-1].selection), q_best)
    q_parent = problem.quantity(sweep, problem.parent)
    # the slow end is at most the parent's value, unless the other constraints rule the parent out and
    # the best reachable value lies beyond it (then the front is that one value)
    assert front[0].target <= max(q_parent, q_best) + 1e-9
    obj = scores(problem)
    for prev, pt in zip([None, *front], front):
        # Targets tighten along the sweep, so degradation can only grow.
        if prev is not None:
            assert pt.target <= prev.target + 1e-9
            assert pt.objective >= prev.objective - 1e-9
        limited = mask & (q <= max(pt.target, q_best) + 1e-9)
        assert close(pt.objective, float(obj[limited].min()))
        assert_meets(problem, pt.solution, others)


# ---------------------------------------------------------------------------------------------
# The throughput arithmetic by hand


def hand_problem() -> SearchProblem:
    """Two layers, one block slot each, scenario cpu-b8 (batch 8, output 64: 512 tokens a batch).

    time = prefill + 64 * decode. Non-block: 0.064 + 64 * 0.001 = 0.128 s. Per layer:
    parent 0.128 + 64 * 0.005 = 0.448 s, small 0.064 + 64 * 0.0025 = 0.224 s,
    linear 0.016 + 64 * 0.0005 = 0.048 s. Parent: 0.128 + 2 * 0.448 = 1.024 s = 500 tok/s.
    """
    pre, dec, mem = resource_name("prefill_s", "cpu-b8"), resource_name("decode_s", "cpu-b8"), resource_name("memory_bytes", "cpu-b8")

    def layer(small_score: float) -> list[Candidate]:
        return [
            Candidate("parent", 0.0, {pre: 0.128, dec: 0.005, mem: 1.0 * GIB, "params": 300}),
            Candidate("small", small_score, {pre: 0.064, dec: 0.0025, mem: 0.5 * GIB, "params": 75}),
            Candidate("linear", 1.0, {pre: 0.016, dec: 0.0005, mem: 0.25 * GIB, "params": 100}),
        ]

    return SearchProblem(
        {(0, "block"): layer(0.1), (1, "block"): layer(0.2)},
        non_block={pre: 0.064, dec: 0.001, mem: 0.25 * GIB, "params": 0},
        parent={(0, "block"): "parent", (1, "block"): "parent"},
    )


def test_throughput_and_speedup_limits_by_hand():
    p = hand_problem()
    t = throughput_constraint("cpu-b8", batch_size=8, output_len=64, min_tokens_per_s=500)
    assert dict(t.terms) == {"prefill_s:cpu-b8": 1.0, "decode_s:cpu-b8": 64.0}
    assert t.limit == pytest.approx(512 / 500)  # 1.024 s
    assert p.quantity(t, p.parent) == pytest.approx(1.024)
    s = speedup_constraint(p, "cpu-b8", output_len=64, min_speedup=2.0)
    assert s.limit == pytest.approx(0.512)
    assert s.user_value(p.quantity(s, p.parent)) == pytest.approx(1.0)
    m = memory_constraint("cpu-b8", 1.5)
    assert m.limit == 1.5 * GIB

    # >= 800 tok/s means time <= 0.64 s: (small, small) = 0.576 s at degradation 0.3 beats every
    # child with a linear block (degradation >= 1) and (parent, small) = 0.8 s is too slow.
    sol = solve(p, [throughput_constraint("cpu-b8", 8, 64, 800)])
    assert sol.selection == {(0, "block"): "small", (1, "block"): "small"}
    assert sol.objective == pytest.approx(0.3)
    assert sol.constraints["throughput on cpu-b8"] == pytest.approx(512 / 0.576)
    assert sol.resources["memory_bytes:cpu-b8"] == pytest.approx(1.25 * GIB)

    # A 2x speedup (time <= 0.512 s) forces a linear block: (linear, small) = 0.4 s costs 1.2,
    # (small, linear) = 0.4 s costs 1.1.
    sol = solve(p, [s, m])
    assert sol.selection == {(0, "block"): "small", (1, "block"): "linear"}
    assert sol.constraints["speedup over the parent on cpu-b8"] == pytest.approx(1.024 / 0.4)


def test_infeasible_throughput_reports_the_fastest_child_within_the_other_limits():
    p = hand_problem()
    # params <= 180 allows (linear, small) at most: 0.128 + 0.048 + 0.224 = 0.4 s = 1280 tok/s.
    # The conflict is mutual: >= 2000 tok/s needs (linear, linear), which has 200 params.
    with pytest.raises(InfeasibleError) as err:
        solve(p, [throughput_constraint("cpu-b8", 8, 64, 2000), params_constraint(180)])
    assert str(err.value) == (
        "throughput on cpu-b8 >= 2000 tok/s is infeasible; the best child within params <= 180 reaches 1280 tok/s\n"
        "params <= 180 is infeasible; the best child within throughput on cpu-b8 >= 2000 tok/s reaches 200"
    )
    tput, params = err.value.violations
    assert tput.best == pytest.approx(0.4) and tput.best_user == pytest.approx(1280)
    assert params.best == 200 and tput.proven and params.proven
    # With memory as the companion instead, only throughput is at fault: memory <= 1.5 GiB still
    # lets (linear, linear) reach 2285.71 tok/s... so ask for more than that.
    with pytest.raises(InfeasibleError) as err:
        solve(p, [throughput_constraint("cpu-b8", 8, 64, 3000), memory_constraint("cpu-b8", 1.5)])
    assert str(err.value) == (
        "throughput on cpu-b8 >= 3000 tok/s is infeasible; the best child within memory on cpu-b8 <= 1.5 GiB "
        "reaches 2285.71 tok/s"
    )


def test_conflicting_constraints_are_each_reported_against_the_bare_space():
    p = hand_problem()
    # Each of these is impossible on its own: fastest child (linear, linear) is 0.224 s, the
    # smallest (small, small) has 150 params.
    with pytest.raises(InfeasibleError) as err:
        solve(p, [throughput_constraint("cpu-b8", 8, 64, 5000), params_constraint(100)])
    msg = str(err.value)
    assert "conflict" in msg
    assert "the best child with no other constraint reaches 2285.71 tok/s" in msg
    assert "params <= 100 is infeasible; the best child with no other constraint reaches 150" in msg


def test_pareto_sweep_on_the_hand_problem():
    p = hand_problem()
    front = pareto_sweep(p, throughput_constraint("cpu-b8", 8, 64, 1), [params_constraint(180)], points=3)
    # The least-degraded child within 180 params is (small, small) at 0.576 s (888.9 tok/s),
    # the fastest (linear, small) at 0.4 s (1280 tok/s); the midpoint 1084.4 tok/s needs <= 0.472 s.
    assert [pt.target for pt in front] == pytest.approx([512 / 0.576, (512 / 0.576 + 1280) / 2, 1280])
    assert [pt.objective for pt in front] == pytest.approx([0.3, 1.1, 1.1])


def test_config_section_becomes_constraints():
    p = hand_problem()
    scenarios = [Scenario(name="cpu-b8", batch_size=8, input_len=64, output_len=64)]
    cfg = SolveConfig(
        throughput=[ThroughputConstraint(scenario="cpu-b8", min_speedup=2.0)],
        memory_gib=1.5,
        max_prefill_latency_s=0.3,
        max_params=250,
    )
    cons = constraints_from_config(cfg, scenarios, p)
    assert [c.name for c in cons] == [
        "speedup over the parent on cpu-b8",
        "memory on cpu-b8",
        "prefill latency on cpu-b8",
        "params",
    ]
    assert [c.limit for c in cons] == pytest.approx([0.512, 1.5 * GIB, 0.3, 250])
    cfg = SolveConfig(throughput=[ThroughputConstraint(scenario="cpu-b8", min_tokens_per_s=800)])
    (c,) = constraints_from_config(cfg, scenarios)
    assert c.limit == pytest.approx(0.64)


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_resource_names_candidate_and_resource():
    p = hand_problem()
    with pytest.raises(ProblemError, match=r"decode_s:gpu-b64.*candidate 'parent' of slot \(0, 'block'\)"):
        solve(p, [throughput_constraint("gpu-b64", 64, 128, 100)])


def test_bad_hamming_distance_and_names_are_rejected():
    p = hand_problem()
    with pytest.raises(ProblemError, match=r"min_hamming_distance: 3 is not allowed; it must be between 1 and .* \(2\)"):
        solve_diverse(p, [], num_solutions=2, min_hamming_distance=3)
    with pytest.raises(ProblemError, match=r"'ghost' is not a candidate; allowed: \['a'\]"):
        SearchProblem({(0, "ffn"): [Candidate("a", 0.0, {})]}, parent={(0, "ffn"): "ghost"})
    with pytest.raises(ProblemError, match=r"name\(s\) \['params'\] appear more than once"):
        solve(p, [params_constraint(200), params_constraint(300)])
    with pytest.raises(ProblemError, match=r"score nan is not allowed"):
        SearchProblem({(0, "ffn"): [Candidate("a", float("nan"), {})]})


def test_diverse_solutions_stop_when_the_space_runs_out():
    p = hand_problem()  # 9 children in all
    sols = solve_diverse(p, [], num_solutions=20, min_hamming_distance=1)
    assert len(sols) == 9
    assert len({tuple(sorted(s.selection.items())) for s in sols}) == 9
    assert [s.objective for s in sols] == sorted(s.objective for s in sols)

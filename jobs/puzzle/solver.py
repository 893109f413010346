"""The MIP of Puzzle: pick one block variant per (layer, slot) to minimise summed degradation.

This is the "solve" half of Puzzle (arXiv 2411.19146, section 4): every layer has one or more
independent *slots* (decoupled search: an ``"attention"`` and an ``"ffn"`` slot; coupled search:
one ``"block"`` slot), each slot a list of :class:`Candidate` variants with a degradation score
(the replace_one_block_scores value; the parent's own variant scores about 0) and a resource
vector (``"decode_s:<scenario>"``, ``"prefill_s:<scenario>"``, ``"memory_bytes:<scenario>"``,
``"params"``, ...). With binary ``x[layer, slot, candidate]``::

    minimise    sum score * x
    subject to  sum_candidate x = 1                                    for every (layer, slot)
                sum_r w_r * (sum resource_r * x + non_block_r) <= limit   for every Constraint

A :class:`Constraint` is a linear limit over resource totals, so a scenario's wall time
(prefill plus ``output_len`` decode steps) is one constraint over two resources. The helpers
(:func:`throughput_constraint`, :func:`speedup_constraint`, :func:`memory_constraint`, ...) turn a
user's targets into those limits; :func:`constraints_from_config` does it for a ``solve:`` config
section. The solver is CBC through python-mip, single-threaded with a fixed seed, so the same
input gives the same answer. Candidates whose costs are equal (the same variant in different
layers: the profile measures each variant once) enter the resource rows through one integer
count per cost class, which CBC branches on far better than on the symmetric per-layer binaries.

Entry points: :func:`solve` (one optimal child), :func:`solve_diverse` (several children, each
differing from all earlier ones in at least ``min_hamming_distance`` slot choices),
:func:`pareto_sweep` (degradation against one constraint's target) and :func:`best_achievable`
(the best value of one constraint under the others). Infeasible targets raise
:class:`InfeasibleError`, whose message names each violated constraint and the best value a child
can reach under the other constraints.

This module only does arithmetic on numbers it is given; reading scores and profiles from the
artifact store is the solve step's job.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import cffi
import mip

from puzzle.config import Scenario, SolveConfig
from puzzle.errors import BadInputError, ConfigError

log = logging.getLogger(__name__)

SlotKey = tuple[int, str]
"""(layer index, slot name), e.g. ``(3, "attention")``; coupled search uses one slot per layer."""

GIB = 2**30

# Resource names the profile step writes and the constraint helpers read. One place, so a typo
# cannot silently leave a constraint empty.
DECODE = "decode_s"  # one decode step of the whole batch (mean over the output range), seconds
PREFILL = "prefill_s"  # prefill of the whole batch at input_len, seconds
MEMORY = "memory_bytes"  # weights + KV cache at the scenario's batch and input_len + output_len
PARAMS = "params"  # parameter count (scenario independent)


def resource_name(kind: str, scenario: str) -> str:
    """The key of a per-scenario resource, e.g. ``resource_name("decode_s", "cpu-b8")``."""
    return f"{kind}:{scenario}"


class ProblemError(ValueError):
    """The problem handed to the solver is malformed (names the field, the value, what is allowed)."""


class InfeasibleError(BadInputError):
    """No child meets the constraints. ``violations`` holds, per violated constraint, the best
    value reachable under the other constraints (or, where those are infeasible among themselves,
    under no other constraint)."""

    def __init__(self, message: str, violations: Sequence[Violation]):
        super().__init__(message)
        self.violations = list(violations)


class SolverTimeLimitError(BadInputError):
    """CBC hit the time limit before it found any feasible child."""


# --------------------------------------------------------------------------------------------
# Problem description


@dataclass(frozen=True)
class Candidate:
    """One variant of one slot: its replace-1-block degradation and what it costs."""

    name: str
    score: float
    resources: Mapping[str, float]


@dataclass(frozen=True)
class SearchProblem:
    """The search space with its scores and costs.

    ``slots`` maps every (layer, slot) to its candidates; ``non_block`` is each resource's cost
    outside the blocks (embeddings, LM head, final norm), added once; ``parent`` optionally names
    the parent's own candidate per slot (needed by :func:`speedup_constraint` and as the slow end
    of :func:`pareto_sweep`).
    """

    slots: Mapping[SlotKey, Sequence[Candidate]]
    non_block: Mapping[str, float] = field(default_factory=dict)
    parent: Mapping[SlotKey, str] | None = None

    def __post_init__(self) -> None:
        if not self.slots:
            raise ProblemError("slots: the problem has no (layer, slot) to choose for; give at least one")
        for key, cands in self.slots.items():
            if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], int) and isinstance(key[1], str)):
                raise ProblemError(f"slots: key {key!r} is not allowed; keys are (layer: int, slot: str)")
            if not cands:
                raise ProblemError(f"slots[{key}]: no candidates; each slot needs at least one")
            names = [c.name for c in cands]
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ProblemError(f"slots[{key}]: candidate name(s) {dup} appear more than once; names must be unique")
            for c in cands:
                if not math.isfinite(c.score):
                    raise ProblemError(f"slots[{key}] candidate {c.name!r}: score {c.score} is not allowed; it must be finite")
                for r, v in c.resources.items():
                    if not math.isfinite(v):
                        raise ProblemError(
                            f"slots[{key}] candidate {c.name!r}: resource {r!r} = {v} is not allowed; it must be finite"
                        )
        for r, v in self.non_block.items():
            if not math.isfinite(v):
                raise ProblemError(f"non_block[{r!r}] = {v} is not allowed; it must be finite")
        if self.parent is not None:
            missing = sorted(set(self.slots) - set(self.parent))
            if missing:
                raise ProblemError(f"parent: no parent candidate for slot(s) {missing}; name one for every slot")
            for key, name in self.parent.items():
                if key not in self.slots:
                    raise ProblemError(f"parent: slot {key} is not in slots")
                allowed = [c.name for c in self.slots[key]]
                if name not in allowed:
                    raise ProblemError(f"parent[{key}]: {name!r} is not a candidate; allowed: {allowed}")

    @property
    def keys(self) -> list[SlotKey]:
        """The slots in a fixed order (layer, then slot name)."""
        return sorted(self.slots)

    @property
    def resource_names(self) -> list[str]:
        names = set(self.non_block)
        for cands in self.slots.values():
            for c in cands:
                names.update(c.resources)
        return sorted(names)

    def candidate(self, key: SlotKey, name: str) -> Candidate:
        for c in self.slots[key]:
            if c.name == name:
                return c
        raise ProblemError(f"slot {key}: {name!r} is not a candidate; allowed: {[c.name for c in self.slots[key]]}")

    def resource_totals(self, selection: Mapping[SlotKey, str]) -> dict[str, float]:
        """Each resource summed over the chosen candidates plus its non-block cost."""
        totals = {r: float(self.non_block.get(r, 0.0)) for r in self.resource_names}
        for key in self.keys:
            for r, v in self.candidate(key, selection[key]).resources.items():
                totals[r] += v
        return totals

    def degradation(self, selection: Mapping[SlotKey, str]) -> float:
        return math.fsum(self.candidate(key, selection[key]).score for key in self.keys)

    def quantity(self, constraint: Constraint, selection: Mapping[SlotKey, str]) -> float:
        """The constrained quantity (left-hand side) of ``constraint`` for one selection."""
        totals = self.resource_totals(selection)
        return math.fsum(w * totals[r] for r, w in constraint.terms.items())


@dataclass(frozen=True)
class Constraint:
    """``sum_r terms[r] * total_r <= limit``, where ``total_r`` is resource r summed over the
    chosen candidates plus its non-block cost.

    ``name``, ``unit``, ``user_scale`` and ``inverse`` only translate between the quantity and the
    value a user thinks in, for messages and sweeps: ``user = user_scale / quantity`` when
    ``inverse`` (throughput from time: the user's target is a floor), else
    ``user = quantity * user_scale`` (the user's target is a ceiling).
    """

    name: str
    terms: Mapping[str, float]
    limit: float
    unit: str = ""
    user_scale: float = 1.0
    inverse: bool = False

    def __post_init__(self) -> None:
        if not self.terms:
            raise ProblemError(f"constraint {self.name!r}: terms is empty; give at least one resource weight")
        if not math.isfinite(self.limit):
            raise ProblemError(f"constraint {self.name!r}: limit {self.limit} is not allowed; it must be finite")
        if not (self.user_scale > 0 and math.isfinite(self.user_scale)):
            raise ProblemError(f"constraint {self.name!r}: user_scale {self.user_scale} is not allowed; it must be > 0")
        if self.inverse and self.limit <= 0:
            raise ProblemError(f"constraint {self.name!r}: limit {self.limit} is not allowed for an inverse constraint; it must be > 0")

    def user_value(self, quantity: float) -> float:
        if self.inverse:
            return math.inf if quantity <= 0 else self.user_scale / quantity
        return quantity * self.user_scale

    def limit_for(self, user_target: float) -> float:
        """The quantity limit that corresponds to a target in user units."""
        if self.inverse:
            if not user_target > 0:
                raise ProblemError(f"constraint {self.name!r}: target {user_target} is not allowed; it must be > 0")
            return self.user_scale / user_target
        return user_target / self.user_scale

    def with_target(self, user_target: float) -> Constraint:
        return replace(self, limit=self.limit_for(user_target))

    @property
    def target(self) -> float:
        """The limit in user units."""
        return self.user_value(self.limit)

    def describe(self, user_value: float) -> str:
        unit = f" {self.unit}" if self.unit and self.unit != "x" else self.unit
        return f"{user_value:.6g}{unit}"

    @property
    def label(self) -> str:
        return f"{self.name} {'>=' if self.inverse else '<='} {self.describe(self.target)}"


# --------------------------------------------------------------------------------------------
# Helpers: user-level targets -> linear limits


def scenario_time_terms(scenario: str, output_len: int) -> dict[str, float]:
    """Wall time of one batch of a scenario as resource weights.

    time = prefill + output_len decode steps, every one a sum over layers of the chosen blocks'
    cost plus the non-block cost. ``decode_s`` is the mean step time over the output range (the
    profile averages its sampled context lengths), so the decode steps sum to
    ``output_len * decode_s``.
    """
    if output_len < 1:
        raise ProblemError(f"output_len: {output_len} is not allowed; it must be >= 1")
    return {resource_name(PREFILL, scenario): 1.0, resource_name(DECODE, scenario): float(output_len)}


def throughput_constraint(scenario: str, batch_size: int, output_len: int, min_tokens_per_s: float) -> Constraint:
    """Throughput >= T tokens/s. A batch yields B*O tokens in ``time`` seconds, so
    tokens/s = B*O / time >= T  <=>  time <= B*O / T."""
    if batch_size < 1:
        raise ProblemError(f"batch_size: {batch_size} is not allowed; it must be >= 1")
    if not (min_tokens_per_s > 0 and math.isfinite(min_tokens_per_s)):
        raise ProblemError(f"min_tokens_per_s: {min_tokens_per_s} is not allowed; it must be a finite number > 0")
    tokens = float(batch_size * output_len)
    return Constraint(
        name=f"throughput on {scenario}",
        terms=scenario_time_terms(scenario, output_len),
        limit=tokens / min_tokens_per_s,
        unit="tok/s",
        user_scale=tokens,
        inverse=True,
    )


def speedup_constraint(problem: SearchProblem, scenario: str, output_len: int, min_speedup: float) -> Constraint:
    """Throughput >= s times the parent's. At a fixed batch the speedup is parent_time / time, so
    time <= parent_time / s (the batch size cancels)."""
    if problem.parent is None:
        raise ProblemError("min_speedup needs the parent's variant per slot; SearchProblem.parent is None")
    if not (min_speedup > 0 and math.isfinite(min_speedup)):
        raise ProblemError(f"min_speedup: {min_speedup} is not allowed; it must be a finite number > 0")
    terms = scenario_time_terms(scenario, output_len)
    _check_resources(problem, terms, f"speedup on {scenario}")
    parent_time = math.fsum(w * problem.resource_totals(problem.parent)[r] for r, w in terms.items())
    if not parent_time > 0:
        raise ProblemError(f"scenario {scenario!r}: the parent's time is {parent_time} s; it must be > 0 to define a speedup")
    return Constraint(
        name=f"speedup over the parent on {scenario}",
        terms=terms,
        limit=parent_time / min_speedup,
        unit="x",
        user_scale=parent_time,
        inverse=True,
    )


def memory_constraint(scenario: str, max_gib: float) -> Constraint:
    """Weights + KV cache (the profile's ``memory_bytes`` at this scenario) <= max_gib GiB."""
    return Constraint(
        name=f"memory on {scenario}",
        terms={resource_name(MEMORY, scenario): 1.0},
        limit=max_gib * GIB,
        unit="GiB",
        user_scale=1.0 / GIB,
    )


def prefill_latency_constraint(scenario: str, max_s: float) -> Constraint:
    """Prefill of the scenario's batch at input_len (time to first token) <= max_s seconds."""
    return Constraint(name=f"prefill latency on {scenario}", terms={resource_name(PREFILL, scenario): 1.0}, limit=max_s, unit="s")


def params_constraint(max_params: float) -> Constraint:
    """Parameter count of the child <= max_params."""
    return Constraint(name="params", terms={PARAMS: 1.0}, limit=float(max_params))


def constraints_from_config(
    cfg: SolveConfig, scenarios: Sequence[Scenario], problem: SearchProblem | None = None
) -> list[Constraint]:
    """The constraints a ``solve:`` config section asks for. Memory and prefill latency apply to
    every scenario; ``problem`` is needed only for ``min_speedup`` (it holds the parent)."""
    by_name = {s.name: s for s in scenarios}
    out: list[Constraint] = []
    for i, t in enumerate(cfg.throughput):
        sc = by_name.get(t.scenario)
        if sc is None:
            raise ConfigError(f"solve.throughput.{i}.scenario: {t.scenario!r} is not a profile scenario; allowed: {sorted(by_name)}")
        if t.min_tokens_per_s is not None:
            out.append(throughput_constraint(sc.name, sc.batch_size, sc.output_len, t.min_tokens_per_s))
        else:
            if problem is None:
                raise ProblemError(f"solve.throughput.{i}.min_speedup needs the search problem (with its parent) to compute the parent's time")
            assert t.min_speedup is not None
            out.append(speedup_constraint(problem, sc.name, sc.output_len, t.min_speedup))
    for sc in scenarios:
        if cfg.memory_gib is not None:
            out.append(memory_constraint(sc.name, cfg.memory_gib))
        if cfg.max_prefill_latency_s is not None:
            out.append(prefill_latency_constraint(sc.name, cfg.max_prefill_latency_s))
    if cfg.max_params is not None:
        out.append(params_constraint(cfg.max_params))
    return out


# --------------------------------------------------------------------------------------------
# Results


@dataclass(frozen=True)
class SolverOptions:
    """How CBC runs. ``mip_gap`` is the relative gap at which a solution counts as optimal."""

    time_limit_s: float = 60.0
    mip_gap: float = 1e-6
    threads: int = 1
    seed: int = 0
    aggregate: bool = True
    """Branch on the count of each cost-identical variant class (see ``_optimize``); off only to
    measure what it buys."""

    @classmethod
    def from_config(cls, cfg: SolveConfig) -> SolverOptions:
        return cls(time_limit_s=cfg.time_limit_s)


Status = Literal["optimal", "feasible"]


@dataclass(frozen=True)
class Solution:
    """One child. ``status`` is ``"optimal"`` (proven within ``mip_gap``) or ``"feasible"`` (the
    time limit was hit; ``gap`` says how far from proven). ``resources`` holds every resource's
    total (chosen blocks plus non-block cost); ``constraints`` each constraint's value in user
    units, keyed by constraint name."""

    selection: dict[SlotKey, str]
    objective: float
    resources: dict[str, float]
    constraints: dict[str, float]
    status: Status
    gap: float
    seconds: float
    nodes: int | None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form; the selection becomes a list of {layer, slot, variant}."""
        return {
            "selection": [{"layer": k[0], "slot": k[1], "variant": v} for k, v in sorted(self.selection.items())],
            "objective": self.objective,
            "resources": dict(self.resources),
            "constraints": dict(self.constraints),
            "status": self.status,
            "gap": self.gap,
            "seconds": self.seconds,
            "nodes": self.nodes,
        }


@dataclass(frozen=True)
class Violation:
    """A constraint no child meets: ``best`` is the best quantity reachable under ``under`` (the
    labels of the other constraints honoured while finding it), ``best_user`` the same in user
    units; ``proven`` is False where CBC's time limit cut that search short."""

    constraint: Constraint
    best: float
    best_user: float
    under: list[str]
    proven: bool

    def message(self) -> str:
        c = self.constraint
        within = f"within {', '.join(self.under)}" if self.under else "with no other constraint"
        note = "" if self.proven else " (time limit hit: a better child may exist)"
        return f"{c.label} is infeasible; the best child {within} reaches {c.describe(self.best_user)}{note}"


@dataclass(frozen=True)
class ParetoPoint:
    """One point of a sweep: the target (user units) and the optimal child under it."""

    target: float
    solution: Solution

    @property
    def objective(self) -> float:
        return self.solution.objective

    @property
    def resources(self) -> dict[str, float]:
        return self.solution.resources

    @property
    def selection(self) -> dict[SlotKey, str]:
        return self.solution.selection

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, **self.solution.to_dict()}


# --------------------------------------------------------------------------------------------
# The MIP


def _check_resources(problem: SearchProblem, terms: Mapping[str, float], name: str) -> None:
    """Every candidate must state every resource a constraint reads: a missing cost is a
    profiling gap, and treating it as 0 would make that variant look free."""
    for key in problem.keys:
        for c in problem.slots[key]:
            missing = [r for r in terms if r not in c.resources]
            if missing:
                raise ProblemError(
                    f"constraint {name!r} reads resource(s) {missing}, but candidate {c.name!r} of slot {key} "
                    f"does not have them; it has: {sorted(c.resources)}"
                )


_node_count_fn: Any = None


def _cbc_node_count(model: mip.Model) -> int | None:
    """Branch-and-bound nodes of the last CBC run. python-mip does not expose it, but the CBC C
    library does (``Cbc_getNodeCount``); declare it on mip's own cffi handle once. None where
    that fails (another python-mip build)."""
    global _node_count_fn
    if _node_count_fn is None:
        _node_count_fn = False
        try:
            from mip import cbc

            with contextlib.suppress(cffi.FFIError):  # declared already (a second import of this module)
                cbc.ffi.cdef("int Cbc_getNodeCount(Cbc_Model *model);")
            _node_count_fn = cbc.cbclib.Cbc_getNodeCount
        except (ImportError, AttributeError, cffi.FFIError) as err:
            log.debug("CBC node count unavailable: %s", err)
    if not _node_count_fn:
        return None
    solver_model = getattr(model.solver, "_model", None)
    return None if solver_model is None else int(_node_count_fn(solver_model))


@dataclass
class _Run:
    selection: dict[SlotKey, str]
    status: Status
    gap: float
    seconds: float
    nodes: int | None


def _optimize(
    problem: SearchProblem,
    constraints: Sequence[Constraint],
    options: SolverOptions,
    objective_terms: Mapping[str, float] | None = None,
    cuts: Sequence[Mapping[SlotKey, str]] = (),
    min_hamming_distance: int = 1,
) -> _Run | None:
    """Build and solve one MIP. Minimises the summed score, or, with ``objective_terms``, the
    quantity ``sum_r w_r * total_r``. Returns None when infeasible."""
    for c in constraints:
        _check_resources(problem, c.terms, c.name)
    if objective_terms is not None:
        _check_resources(problem, objective_terms, "objective")
    keys = problem.keys
    m = mip.Model(sense=mip.MINIMIZE, solver_name=mip.CBC)
    m.verbose = 0
    m.threads = options.threads
    m.seed = options.seed
    m.max_mip_gap = options.mip_gap
    m.max_mip_gap_abs = 1e-12
    x: dict[SlotKey, list[mip.Var]] = {}
    for li, key in enumerate(keys):
        x[key] = [m.add_var(name=f"x_{li}_{ci}", var_type=mip.BINARY) for ci in range(len(problem.slots[key]))]
        m += mip.xsum(x[key]) == 1

    def coefs(terms: Mapping[str, float]) -> tuple[dict[SlotKey, list[float]], float]:
        per = {key: [math.fsum(w * c.resources[r] for r, w in terms.items()) for c in problem.slots[key]] for key in keys}
        const = math.fsum(w * problem.non_block.get(r, 0.0) for r, w in terms.items())
        return per, const

    rows = []
    for c in constraints:
        per, const = coefs(c.terms)
        rhs = c.limit - const
        # Rows are scaled to O(1) so CBC's absolute feasibility tolerance (1e-6) is a relative one:
        # per-layer decode times are ~1e-5 s and memory ~1e10 bytes in the same model.
        scale = max([abs(rhs)] + [abs(v) for vals in per.values() for v in vals] + [1e-300])
        rows.append((per, rhs / scale, scale))
    if objective_terms is None:
        obj = {key: [c.score for c in problem.slots[key]] for key in keys}
    else:
        obj, _ = coefs(objective_terms)
    # Normalise the objective too: CBC derives its cutoff increment from absolute values.
    obj_scale = max([abs(v) for vals in obj.values() for v in vals] + [1e-300])

    # Each term of the rows (and of a resource objective) is (coefficient vector, variable).
    # The profile measures a variant once per scenario, so the same variant has the same costs in
    # every layer. Candidates with equal coefficient vectors then enter the rows only through
    # their count, n_k = sum of their x; giving CBC that integer to branch on turns the search
    # from 'which layer' (symmetric, thousands of nodes) into 'how many' (a handful).
    resource_obj = objective_terms is not None
    classes: dict[tuple[float, ...], list[mip.Var]] = {}
    for key in keys:
        for ci, var in enumerate(x[key]):
            vec = tuple(per[key][ci] for per, _, _ in rows) + ((obj[key][ci],) if resource_obj else ())
            if any(v != 0.0 for v in vec):
                classes.setdefault(vec, []).append(var)
    terms: list[tuple[tuple[float, ...], mip.Var]] = []
    for ki, (vec, members) in enumerate(classes.items()):
        if options.aggregate and len(members) > 1:
            count = m.add_var(name=f"n_{ki}", var_type=mip.INTEGER, lb=0, ub=len(members))
            m += count == mip.xsum(members)
            terms.append((vec, count))
        else:
            terms.extend((vec, var) for var in members)
    for ri, (_, rhs, scale) in enumerate(rows):
        m += mip.xsum(vec[ri] / scale * var for vec, var in terms if vec[ri] != 0.0) <= rhs
    if resource_obj:
        m.objective = mip.minimize(mip.xsum(vec[-1] / obj_scale * var for vec, var in terms if vec[-1] != 0.0))
    else:
        m.objective = mip.minimize(mip.xsum(v / obj_scale * var for key in keys for v, var in zip(obj[key], x[key]) if v != 0.0))

    n = len(keys)
    for earlier in cuts:
        # Hamming-distance cut: of the slots, at most n - d may keep the earlier choice.
        chosen = [x[key][[c.name for c in problem.slots[key]].index(earlier[key])] for key in keys]
        m += mip.xsum(chosen) <= n - min_hamming_distance

    t0 = time.perf_counter()
    status = m.optimize(max_seconds=options.time_limit_s)
    seconds = time.perf_counter() - t0
    if status in (mip.OptimizationStatus.INFEASIBLE, mip.OptimizationStatus.INT_INFEASIBLE):
        return None
    if status == mip.OptimizationStatus.NO_SOLUTION_FOUND:
        raise SolverTimeLimitError(
            f"solve.time_limit_s: CBC found no feasible child within {options.time_limit_s} s "
            f"({n} slots, {len(constraints)} constraints); raise the time limit"
        )
    if status not in (mip.OptimizationStatus.OPTIMAL, mip.OptimizationStatus.FEASIBLE):
        raise RuntimeError(f"CBC returned status {status.name} for a bounded binary problem")
    selection = {}
    for key in keys:
        vals = [v.x for v in x[key]]
        selection[key] = problem.slots[key][max(range(len(vals)), key=vals.__getitem__)].name
    value, bound = m.objective_value, m.objective_bound
    if status == mip.OptimizationStatus.OPTIMAL:
        gap = 0.0 if value == bound else abs(value - bound) / max(abs(value), 1e-12)
        st: Status = "optimal"
    else:
        gap = abs(value - bound) / max(abs(value), 1e-12)
        st = "feasible"
    return _Run(selection, st, float(gap), seconds, _cbc_node_count(m))


def _solution(problem: SearchProblem, constraints: Sequence[Constraint], run: _Run) -> Solution:
    totals = problem.resource_totals(run.selection)
    return Solution(
        selection=dict(run.selection),
        objective=problem.degradation(run.selection),
        resources=totals,
        constraints={c.name: c.user_value(math.fsum(w * totals[r] for r, w in c.terms.items())) for c in constraints},
        status=run.status,
        gap=run.gap,
        seconds=run.seconds,
        nodes=run.nodes,
    )


def _check_names(constraints: Sequence[Constraint]) -> None:
    names = [c.name for c in constraints]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ProblemError(f"constraints: name(s) {dup} appear more than once; each constraint needs its own name")


def best_achievable(
    problem: SearchProblem,
    target: Constraint,
    constraints: Sequence[Constraint] = (),
    options: SolverOptions = SolverOptions(),
) -> Solution | None:
    """The child with the smallest ``target`` quantity (e.g. the fastest) that meets
    ``constraints``; ``target``'s own limit is ignored. None when ``constraints`` are infeasible."""
    run = _optimize(problem, constraints, options, objective_terms=target.terms)
    if run is None:
        return None
    return _solution(problem, [*constraints, target], run)


def _diagnose(problem: SearchProblem, constraints: Sequence[Constraint], options: SolverOptions) -> list[Violation]:
    """For each constraint, the best value under the others; those beyond their limit are violated.

    If the whole problem is infeasible, every constraint whose companions are jointly feasible is
    violated (the companions' optimum would otherwise be feasible). Where no companion set is
    feasible, each constraint is reported against the bare search space instead.
    """
    violations = []
    for i, c in enumerate(constraints):
        others = [o for j, o in enumerate(constraints) if j != i]
        best = best_achievable(problem, c, others, options)
        if best is None:
            continue
        q = problem.quantity(c, best.selection)
        if q > c.limit:
            violations.append(Violation(c, q, c.user_value(q), [o.label for o in others], best.status == "optimal"))
    if not violations:
        for c in constraints:
            best = best_achievable(problem, c, (), options)
            assert best is not None  # an unconstrained search space always has a child
            q = problem.quantity(c, best.selection)
            violations.append(Violation(c, q, c.user_value(q), [], best.status == "optimal"))
    return violations


def _raise_infeasible(problem: SearchProblem, constraints: Sequence[Constraint], options: SolverOptions) -> None:
    violations = _diagnose(problem, constraints, options)
    lines = [v.message() for v in violations]
    if violations and not violations[0].under and len(constraints) > 1:
        lines.insert(0, "the constraints conflict with each other; each one alone:")
    raise InfeasibleError("; ".join(lines) if len(lines) == 1 else "\n".join(lines), violations)


def solve(
    problem: SearchProblem, constraints: Sequence[Constraint] = (), options: SolverOptions = SolverOptions()
) -> Solution:
    """The child with the least summed degradation that meets every constraint.

    Raises :class:`InfeasibleError` (with the best reachable value of each violated constraint)
    when none does, :class:`SolverTimeLimitError` when the time limit passes with no child found.
    """
    _check_names(constraints)
    run = _optimize(problem, constraints, options)
    if run is None:
        _raise_infeasible(problem, constraints, options)
    assert run is not None
    return _solution(problem, constraints, run)


def hamming_distance(a: Mapping[SlotKey, str], b: Mapping[SlotKey, str]) -> int:
    """Number of (layer, slot) choices in which two selections differ."""
    return sum(1 for key in a if a[key] != b[key])


def solve_diverse(
    problem: SearchProblem,
    constraints: Sequence[Constraint] = (),
    num_solutions: int = 1,
    min_hamming_distance: int = 1,
    options: SolverOptions = SolverOptions(),
) -> list[Solution]:
    """Up to ``num_solutions`` children, each optimal among those that differ from every earlier
    one in at least ``min_hamming_distance`` (layer, slot) choices. Fewer come back when the
    search space holds no more such children; the first one missing raises as :func:`solve` does."""
    n = len(problem.slots)
    if num_solutions < 1:
        raise ProblemError(f"num_solutions: {num_solutions} is not allowed; it must be >= 1")
    if not 1 <= min_hamming_distance <= n:
        raise ProblemError(
            f"min_hamming_distance: {min_hamming_distance} is not allowed; it must be between 1 and the number of slots ({n})"
        )
    first = solve(problem, constraints, options)
    out = [first]
    while len(out) < num_solutions:
        run = _optimize(problem, constraints, options, cuts=[s.selection for s in out], min_hamming_distance=min_hamming_distance)
        if run is None:
            log.info("only %d of %d solutions differ by >= %d choices", len(out), num_solutions, min_hamming_distance)
            break
        out.append(_solution(problem, constraints, run))
    return out


def pareto_sweep(
    problem: SearchProblem,
    sweep: Constraint,
    constraints: Sequence[Constraint] = (),
    points: int = 10,
    options: SolverOptions = SolverOptions(),
) -> list[ParetoPoint]:
    """Degradation against ``sweep``'s target (its own limit is ignored), at ``points`` targets
    spaced evenly in user units from the slow end to the best reachable value under ``constraints``.

    The slow end is the value of the least-degraded child under ``constraints`` (past it the
    sweep constraint is slack), or the parent's value where the problem names a parent and that is
    closer to the best. Returns the points in that order, each with its optimal child.
    """
    if points < 0:
        raise ProblemError(f"points: {points} is not allowed; it must be >= 0")
    _check_names([*constraints, sweep])
    if points == 0:
        return []
    fastest = best_achievable(problem, sweep, constraints, options)
    if fastest is None:
        _raise_infeasible(problem, constraints, options)
    assert fastest is not None
    q_best = problem.quantity(sweep, fastest.selection)
    # Past the least-degraded child's value the sweep constraint is slack: every point would be
    # that child. The parent's value is the natural slow end when the parent meets the others.
    q_slow = problem.quantity(sweep, solve(problem, constraints, options).selection)
    if problem.parent is not None:
        q_slow = min(q_slow, problem.quantity(sweep, problem.parent))
    q_slow = max(q_slow, q_best)
    u_slow, u_best = sweep.user_value(q_slow), sweep.user_value(q_best)
    if points == 1:
        targets = [u_best]
    else:
        targets = [u_slow + (u_best - u_slow) * i / (points - 1) for i in range(points)]
    out = []
    for u in targets:
        # The float round trip user -> limit can land a hair outside [best, slow]; clamp to it.
        limit = min(max(sweep.limit_for(u), q_best), q_slow)
        sol = solve(problem, [*constraints, replace(sweep, limit=limit)], options)
        out.append(ParetoPoint(target=u, solution=sol))
    return out

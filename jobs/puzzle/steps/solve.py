"""solve: pick one variant per layer with the MIP, sweep the Pareto front, plan the children to build.

Reads ``plan/variants.json``, the replace_one_block_scores (``scores/<layer>/<variant>.json``) and the
profiles of every scenario (``profile/<scenario>/``; a measured profile whose spread never came within
``profile.max_rel_spread`` is refused, exit 2), builds the search problem for :mod:`puzzle.solver`
(decoupled: an attention and an FFN slot per layer; coupled: one block slot), and writes:

- ``solve/solutions.json``: ``num_solutions`` diverse children (block_configs, predicted throughput,
  memory and speedup per scenario, objective, solver status, gap, seconds);
- ``solve/pareto.json``: the degradation against throughput sweep;
- ``plan/assemble.json``: the units of assemble/evaluate: the parent itself, every solution, and the
  baselines around the first solution's predicted throughput: uniform FFN shrinking (one FFN variant on
  every layer) and layer dropping (by input/output similarity), each at the two settings whose predicted
  throughput brackets the child's, so the report compares them with the child at equal measured speed.

Infeasible constraints fail with the best value each violated constraint can reach (exit 2).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from puzzle import layout
from puzzle.context import StepContext
from puzzle.errors import ConfigError
from puzzle.model import BlockConfig, variant_from_name
from puzzle.profiling.throughput import ScenarioProfile, load_scenario_profile, predict
from puzzle.serving import slot_allowed
from puzzle.solver import (
    DECODE,
    MEMORY,
    PARAMS,
    PREFILL,
    Candidate,
    SearchProblem,
    SolverOptions,
    constraints_from_config,
    pareto_sweep,
    resource_name,
    solve_diverse,
    speedup_constraint,
)

log = logging.getLogger(__name__)

METRIC_FIELD = {"kl": "kl", "lm_loss": "lm_loss_delta", "cosine": "cosine_distance",
                "task_accuracy": "task_accuracy_drop"}


def _resources(profiles: dict[str, ScenarioProfile], kind: str, name: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for sc, prof in profiles.items():
        c = prof.cost(kind, name)
        out[resource_name(DECODE, sc)] = c.decode_step_s
        out[resource_name(PREFILL, sc)] = c.prefill_s
        out[resource_name(MEMORY, sc)] = float(c.memory_bytes)
        out[PARAMS] = float(c.params)
    return out


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


def build_problem(ctx: StepContext, profiles: dict[str, ScenarioProfile]) -> SearchProblem:
    variants = ctx.store.get_json(layout.VARIANTS_PLAN)
    parent_blocks = variants["parent"]
    field = METRIC_FIELD[ctx.config.score.metric]
    serving = ctx.config.search_space.serving  # the engines' one per-layer rule (puzzle.serving.slot_allowed)

    def score(layer: int, name: str) -> float:
        key = layout.score_key(layer, name)
        if not ctx.store.exists(key):
            raise ConfigError(f"score: no replace-1-block score {key}; run the score step first")
        rec = ctx.store.get_json(key)
        if field not in rec:
            raise ConfigError(f"score.metric: {ctx.config.score.metric!r} was not measured ({key} has {sorted(rec)})")
        return float(rec[field])

    slots: dict[tuple[int, str], list[Candidate]] = {}
    parent: dict[tuple[int, str], str] = {}
    for layer, pb in enumerate(parent_blocks):
        if ctx.config.bld.mode == "coupled":
            cands = []
            for a in variants["attention"]:
                for f in variants["ffn"]:
                    name = f"{a}+{f}"
                    if not slot_allowed(serving, layer, "block", name):
                        continue
                    res = _add(_resources(profiles, "attention", a), _resources(profiles, "ffn", f))
                    cands.append(Candidate(name, score(layer, name), res))
            slots[(layer, "block")] = cands
            parent[(layer, "block")] = f"{pb['attention']}+{pb['ffn']}"
        else:
            for slot in ("attention", "ffn"):
                slots[(layer, slot)] = [Candidate(v, score(layer, v), _resources(profiles, slot, v))
                                        for v in variants[slot] if slot_allowed(serving, layer, slot, v)]
                parent[(layer, slot)] = pb[slot]
    non_block = _resources(profiles, "non_block", "non_block")
    return SearchProblem(slots=slots, non_block=non_block, parent=parent)


def block_configs(selection: dict[tuple[int, str], str], n_layers: int) -> list[dict[str, str]]:
    out = []
    for layer in range(n_layers):
        if (layer, "block") in selection:
            a, f = selection[(layer, "block")].split("+")
        else:
            a, f = selection[(layer, "attention")], selection[(layer, "ffn")]
        out.append({"attention": a, "ffn": f})
    return out


def predicted(profiles: dict[str, ScenarioProfile], blocks: list[dict[str, str]],
              parent_blocks: list[dict[str, str]], hidden: int) -> dict[str, Any]:
    def bc(bs):
        return [BlockConfig(variant_from_name(b["attention"], hidden), variant_from_name(b["ffn"], hidden)) for b in bs]

    out = {}
    for sc, prof in profiles.items():
        p = predict(prof, bc(blocks))
        base = predict(prof, bc(parent_blocks))
        out[sc] = {**p.to_dict(), "speedup": p.tokens_per_s / base.tokens_per_s}
    return out


def _bracket(options: list[tuple[float, Any]], target_tps: float) -> list[Any]:
    """Of (predicted tokens/s, x) options, the slowest that reaches the target and the fastest that does not:
    the two that bracket it, so the report can compare a child with its baselines at equal speed."""
    reaching = [o for o in options if o[0] >= target_tps]
    below = [o for o in options if o[0] < target_tps]
    out = []
    if below:
        out.append(max(below, key=lambda o: o[0])[1])
    if reaching:
        out.append(min(reaching, key=lambda o: o[0])[1])
    return out


def uniform_ffn_baselines(profiles, variants, target_sc: str, target_tps: float, hidden: int) -> list[dict[str, Any]]:
    """Uniform FFN shrinking: the parent's attention and ONE FFN variant on every layer; the variants whose
    predicted throughput brackets the target (one just below, one just above)."""
    parent_blocks = variants["parent"]
    options = []
    for f in variants["ffn"]:
        if f == parent_blocks[0]["ffn"] and all(b["ffn"] == f for b in parent_blocks):
            continue  # that is the parent itself
        blocks = [{"attention": b["attention"], "ffn": f} for b in parent_blocks]
        tps = predicted({target_sc: profiles[target_sc]}, blocks, parent_blocks, hidden)[target_sc]["tokens_per_s"]
        what = "every FFN removed (ffn_noop on every layer)" if f == "ffn_noop" else (
            f"every FFN replaced by {f}")
        options.append((tps, {"id": f"baseline-uniform-{f.replace('_', '-')}", "kind": "uniform_ffn",
                              "block_configs": blocks, "description": f"uniform FFN: {what}, the parent's attention kept"}))
    return _bracket(options, target_tps)


def layer_drop_baselines(ctx, profiles, variants, target_sc: str, target_tps: float,
                         hidden: int) -> list[dict[str, Any]]:
    """Layer dropping: whole layers removed (attn_noop + ffn_noop), most similar input/output hidden states
    first; the two drop counts whose predicted throughput brackets the target."""
    parent_blocks = variants["parent"]
    n = len(parent_blocks)
    sims = []
    for layer in range(n):
        key = layout.similarity_key(layer)
        if not ctx.store.exists(key):
            raise ConfigError(f"layer-drop baseline: {key} is missing; run the score step first")
        sims.append((ctx.store.get_json(key)["cosine_similarity"], layer))
    order = [layer for _, layer in sorted(sims, reverse=True)]
    options = []
    blocks = [dict(b) for b in parent_blocks]
    for k, layer in enumerate(order[: n - 1], 1):
        blocks[layer] = {"attention": "attn_noop", "ffn": "ffn_noop"}
        tps = predicted({target_sc: profiles[target_sc]}, blocks, parent_blocks, hidden)[target_sc]["tokens_per_s"]
        dropped = sorted(order[:k])
        options.append((tps, {"id": f"baseline-drop-{k}", "kind": "layer_drop", "block_configs": [dict(b) for b in blocks],
                              "description": f"layer dropping: {k} of {n} layers removed ({dropped}), the most "
                                             "similar input/output first"}))
        if tps >= target_tps:
            break
    return _bracket(options, target_tps)


def run(ctx: StepContext) -> None:
    cfg = ctx.config
    started = time.time()
    # Profiles whose timings never came within profile.max_rel_spread are refused here (exit 2): a child
    # chosen from a timing taken while the worker was paused is chosen by the noise.
    profiles = {sc.name: load_scenario_profile(ctx.store, sc.name, cfg.profile.max_rel_spread)
                for sc in cfg.profile.scenarios}
    problem = build_problem(ctx, profiles)
    variants = ctx.store.get_json(layout.VARIANTS_PLAN)
    n_layers = len(variants["parent"])
    hidden = next(iter(profiles.values())).hidden_size
    constraints = constraints_from_config(cfg.solve, cfg.profile.scenarios, problem)
    options = SolverOptions.from_config(cfg.solve)
    solutions = solve_diverse(problem, constraints, cfg.solve.num_solutions, cfg.solve.min_hamming_distance, options)

    records = []
    for i, sol in enumerate(solutions):
        blocks = block_configs(sol.selection, n_layers)
        records.append({"id": f"sol-{i}", "block_configs": blocks,
                        "predicted": predicted(profiles, blocks, variants["parent"], hidden), **sol.to_dict()})
        ctx.metrics.set("solve_objective", sol.objective, help="Summed replace-1-block degradation of the child",
                        solution=f"sol-{i}")
        ctx.metrics.set("solve_gap", sol.gap, help="Relative MIP gap", solution=f"sol-{i}")
    ctx.store.put_json(layout.SOLUTIONS, records)

    # Pareto front: the first throughput constraint swept (speedup on the first scenario if none is set)
    first = cfg.solve.throughput[0].scenario if cfg.solve.throughput else cfg.profile.scenarios[0].name
    sc = next(s for s in cfg.profile.scenarios if s.name == first)
    sweep = next((c for c in constraints if c.name.endswith(f"on {first}") and c.inverse), None)
    if sweep is None:
        sweep = speedup_constraint(problem, first, sc.output_len, 1.0)
    others = [c for c in constraints if c is not sweep]
    pareto = []
    for pt in pareto_sweep(problem, sweep, others, cfg.solve.pareto_points, options):
        blocks = block_configs(pt.selection, n_layers)
        pareto.append({"target": pt.target, "constraint": sweep.name, "objective": pt.objective,
                       "block_configs": blocks, "predicted": predicted(profiles, blocks, variants["parent"], hidden)})
    ctx.store.put_json(layout.PARETO, pareto)

    target_tps = records[0]["predicted"][first]["tokens_per_s"]
    units = [{"id": "parent", "kind": "parent", "block_configs": variants["parent"],
              "predicted": predicted(profiles, variants["parent"], variants["parent"], hidden)}]
    units += [{"id": r["id"], "kind": "puzzle", "block_configs": r["block_configs"], "predicted": r["predicted"]}
              for r in records]
    if cfg.eval.baselines:
        for b in (uniform_ffn_baselines(profiles, variants, first, target_tps, hidden)
                  + layer_drop_baselines(ctx, profiles, variants, first, target_tps, hidden)):
            units.append({**b, "predicted": predicted(profiles, b["block_configs"], variants["parent"], hidden)})
    ctx.store.put_json(layout.plan_key("assemble"), units)
    ctx.metrics.set("solve_seconds", time.time() - started, help="Seconds spent solving, sweep included")

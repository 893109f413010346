"""solve: pick one variant per layer with the MIP, sweep the Pareto front, plan the children to build.

Reads ``plan/variants.json``, the replace_one_block_scores (``scores/<layer>/<variant>.json``) and the
profiles of every scenario (``profile/<scenario>/``; a measured profile whose spread never came within
``profile.max_rel_spread`` is refused, exit 2), builds the search problem for :mod:`puzzle.solver`
(decoupled: an attention and an FFN slot per layer; coupled: one block slot), and writes:

- ``solve/solutions.json``: ``num_solutions`` diverse children (block_configs, predicted throughput,
  memory and speedup per scenario, objective, solver status, gap, seconds);
- ``solve/pareto.json``: the degradation against throughput sweep;
- ``plan/assemble.json``: the units of assemble/evaluate: the parent itself, every solution, and the
  two baselines at the first solution's predicted throughput (uniform FFN shrinking; layer dropping
  by input/output similarity).

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
                    res = _add(_resources(profiles, "attention", a), _resources(profiles, "ffn", f))
                    cands.append(Candidate(name, score(layer, name), res))
            slots[(layer, "block")] = cands
            parent[(layer, "block")] = f"{pb['attention']}+{pb['ffn']}"
        else:
            for slot in ("attention", "ffn"):
                slots[(layer, slot)] = [Candidate(v, score(layer, v), _resources(profiles, slot, v))
                                        for v in variants[slot]]
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


def uniform_ffn_baseline(profiles, variants, target_sc: str, target_tps: float, hidden: int) -> list[dict[str, str]]:
    """The parent's attention and one FFN variant on every layer: the slowest variant that still reaches
    the target throughput (the closest match), or the fastest one when none does."""
    parent_blocks = variants["parent"]
    options = []
    for f in variants["ffn"]:
        blocks = [{"attention": b["attention"], "ffn": f} for b in parent_blocks]
        tps = predicted({target_sc: profiles[target_sc]}, blocks, parent_blocks, hidden)[target_sc]["tokens_per_s"]
        options.append((tps, blocks))
    reaching = [o for o in options if o[0] >= target_tps]
    return min(reaching, key=lambda o: o[0])[1] if reaching else max(options, key=lambda o: o[0])[1]


def layer_drop_baseline(ctx, profiles, variants, target_sc: str, target_tps: float, hidden: int) -> list[dict[str, str]]:
    """Drop whole layers (attn_noop + ffn_noop), most similar input/output hidden states first, until the
    predicted throughput reaches the target (at most all but one layer)."""
    parent_blocks = variants["parent"]
    n = len(parent_blocks)
    sims = []
    for layer in range(n):
        key = layout.similarity_key(layer)
        if not ctx.store.exists(key):
            raise ConfigError(f"layer-drop baseline: {key} is missing; run the score step first")
        sims.append((ctx.store.get_json(key)["cosine_similarity"], layer))
    order = [layer for _, layer in sorted(sims, reverse=True)]
    blocks = [dict(b) for b in parent_blocks]
    for layer in order[: n - 1]:
        blocks[layer] = {"attention": "attn_noop", "ffn": "ffn_noop"}
        tps = predicted({target_sc: profiles[target_sc]}, blocks, parent_blocks, hidden)[target_sc]["tokens_per_s"]
        if tps >= target_tps:
            break
    return blocks


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
        for uid, kind, blocks in (
            ("baseline-uniform-ffn", "uniform_ffn", uniform_ffn_baseline(profiles, variants, first, target_tps, hidden)),
            ("baseline-layer-drop", "layer_drop", layer_drop_baseline(ctx, profiles, variants, first, target_tps, hidden)),
        ):
            units.append({"id": uid, "kind": kind, "block_configs": blocks,
                          "predicted": predicted(profiles, blocks, variants["parent"], hidden)})
    ctx.store.put_json(layout.plan_key("assemble"), units)
    ctx.metrics.set("solve_seconds", time.time() - started, help="Seconds spent solving, sweep included")

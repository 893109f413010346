"""Which way of turning CPU block profiles into whole-model times predicts a run's children best, with
the profiles and every model timed in the same rounds (so the machine's drift between the profile and
evaluate steps is out of the comparison, and only the throughput model's own error is left).

Each round profiles every variant the models use as a part (``profile_scenario(whole_models=False)``,
one build a round), then times in turns (``measure_interleaved``, the same thread clock) the run's children and the
whole random-weight models the fits are made from: the parent's shape (P), its first half (H) and
quarter (Q) of layers, the parent with every FFN removed (A) or every attention removed (F), and, for
the whole-model costs, one model per variant (that variant in every layer, the other kind removed)
and one of no-op layers. After the rounds each method predicts every child from the rounds' medians:

- ``one-point``: blocks scaled so the parts of P add up to P (the non-block part as measured);
- ``two-point P,H`` (what the profile step did before the whole-model costs): ``whole = c + k x
  blocks`` through P and H;
- ``per-kind P,H,Q,A,F``: ``whole = c + a x attention + f x ffn``, least squares through five shapes;
- ``whole-model costs`` (what the profile step does on a CPU, :func:`whole_model_costs`): each
  variant's cost is (its whole model - the no-op model) / layers; a child is the no-op model plus its
  layers' costs (no part timed alone).

The first half and second half of the rounds are also fitted apart: a method whose error moves
between the halves by more than the goal cannot be told from another on this machine.

    python benchmarks/bench_cpu_fit.py RUN_DIR [--rounds 10] [--json out.json]

``RUN_DIR``: a finished local run (``runs/<id>``); its ``child/*`` folders are the models compared.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
from pathlib import Path

import numpy as np
import torch
from puzzle.config import load_config
from puzzle.model import AttentionVariant, BlockConfig, DeciLMForCausalLM, FFNVariant, load_parent
from puzzle.profiling.bench import measure_interleaved
from puzzle.profiling.device import cpu_model
from puzzle.profiling.profiler import _init_, profile_scenario, variant_model, whole_model_costs
from puzzle.profiling.timing import cpu_clock

PHASES = (0, 1)  # prefill, decode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path)
    ap.add_argument("--parent", default="examples/tiny/parent")
    ap.add_argument("--config", default="examples/tiny/puzzle.yaml")
    ap.add_argument("--scenario", default="cpu-b8")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    sc = next(s for s in cfg.profile.scenarios if s.name == args.scenario)
    settings = cfg.profile.model_copy(update={"rebuilds": 1})
    clock = cpu_clock(settings.cpu_clock)
    parent = load_parent(args.parent)
    pcfg = parent.config
    pb, n = pcfg.block_configs, pcfg.num_hidden_layers
    children = {d.name: load_parent(d) for d in sorted((args.run / "child").iterdir()) if d.name != "parent"}
    shapes = {"P": pb, "H": pb[: n // 2], "Q": pb[: max(1, n // 4)],
              "A": [BlockConfig(b.attention, FFNVariant.noop()) for b in pb],
              "F": [BlockConfig(AttentionVariant.noop(), b.ffn) for b in pb],
              "noop": [BlockConfig(AttentionVariant.noop(), FFNVariant.noop())] * n}
    blocks = {name: m.config.block_configs for name, m in children.items()} | {"parent": pb}
    variants = sorted({(k, v) for bs in list(blocks.values()) + list(shapes.values()) for b in bs
                       for k, v in (("attention", b.attention), ("ffn", b.ffn)) if not v.no_op},
                      key=lambda kv: (kv[0], kv[1].name))
    for kind, v in variants:  # one whole model per variant, as the profile step times it
        shapes[f"{kind}:{v.name}"] = variant_model(pcfg, kind, v).block_configs
    models = {f"fit:{k}": _init_(DeciLMForCausalLM(pcfg.with_blocks(bs))).eval() for k, bs in shapes.items()}
    models |= children | {"parent": parent}
    units = [(k, v.name) for k, v in variants] + [("non_block", "non_block")]
    print(f"{cpu_model()}, torch {torch.__version__}, 1 thread, clock {clock}, {sc.name}, {len(units)} parts, "
          f"{len(models)} whole models in turns, load {os.getloadavg()[0]:.1f}", flush=True)
    rounds = []
    for r in range(args.rounds):
        recs = profile_scenario(pcfg, units, sc, settings, seed=r, whole_models=False)
        ms = measure_interleaved(list(models.values()), sc, warmup=1 if r == 0 else 0, repeats=2, clock=clock)
        rounds.append({"parts": {(x["kind"], x["variant"]): (x["prefill_s"], x["decode_s"]) for x in recs},
                       "models": {k: (m.prefill_s, m.decode_s) for k, m in zip(models, ms)}})
        print(f"round {r + 1}/{args.rounds}: parent {sum(rounds[-1]['models']['parent']):.3f} s, load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
    out = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
           "run": str(args.run), "rounds": args.rounds, "clock": clock, "errors": {}}
    h = args.rounds // 2
    for label, rr in (("all rounds", rounds), ("first half", rounds[:h]), ("second half", rounds[h:])):
        if not rr:
            continue
        errs = compare(pcfg, shapes, blocks, variants, rr)
        out["errors"][label] = errs
        print(f"== {label} ({len(rr)} rounds): predicted over measured tokens/s - 1")
        names = list(blocks)
        print(f"  {'method':22s}" + "".join(f"{m[:16]:>17s}" for m in names))
        for method, row in errs.items():
            print(f"  {method:22s}" + "".join(f"{row[m] * 100:+16.1f}%" for m in names))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


def compare(pcfg, shapes, blocks, variants, rounds) -> dict[str, dict[str, float]]:
    """Each method's tokens/s error on every model in ``blocks``, from the medians of ``rounds``."""
    part = {k: tuple(statistics.median(r["parts"][k][i] for r in rounds) for i in PHASES) for k in rounds[0]["parts"]}
    whole = {k: tuple(statistics.median(r["models"][k][i] for r in rounds) for i in PHASES)
             for k in rounds[0]["models"]}

    def sums(bs, i):  # (attention s, ffn s) of the profiled parts of these layers
        a = sum(part[("attention", b.attention.name)][i] for b in bs if not b.attention.no_op)
        f = sum(part[("ffn", b.ffn.name)][i] for b in bs if not b.ffn.no_op)
        return a, f

    nb = part[("non_block", "non_block")]
    n = pcfg.num_hidden_layers
    coefs: dict[str, list[tuple[float, float, float]]] = {"one-point": [], "two-point P,H": [],
                                                          "per-kind P,H,Q,A,F": []}
    for i in PHASES:
        a, f = sums(shapes["P"], i)
        k = (whole["fit:P"][i] - nb[i]) / (a + f)
        coefs["one-point"].append((nb[i], k, k))
        bh = sum(sums(shapes["H"], i))
        k2 = (whole["fit:P"][i] - whole["fit:H"][i]) / (a + f - bh)
        coefs["two-point P,H"].append((whole["fit:P"][i] - k2 * (a + f), k2, k2))
        X = np.array([[1.0, *sums(shapes[s], i)] for s in "PHQAF"])
        y = np.array([whole[f"fit:{s}"][i] for s in "PHQAF"])
        coefs["per-kind P,H,Q,A,F"].append(tuple(np.linalg.lstsq(X, y, rcond=None)[0]))

    def measured(m):
        return sum(whole[m])

    out: dict[str, dict[str, float]] = {}
    for method, cs in coefs.items():
        out[method] = {m: measured(m) / sum(cs[i][0] + cs[i][1] * sums(bs, i)[0] + cs[i][2] * sums(bs, i)[1]
                                            for i in PHASES) - 1 for m, bs in blocks.items()}
    times = {(k, v): whole[f"fit:{k}:{v.name}"] for k, v in variants}
    cost = whole_model_costs(times | {("non_block", None): whole["fit:noop"]}, n)
    out["whole-model costs"] = {
        m: measured(m) / sum(cost[("non_block", None)][i] + sum(
            (0 if b.attention.no_op else cost[("attention", b.attention)][i])
            + (0 if b.ffn.no_op else cost[("ffn", b.ffn)][i]) for b in bs) for i in PHASES) - 1
        for m, bs in blocks.items()}
    return out


if __name__ == "__main__":
    main()

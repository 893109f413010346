"""Fidelity of the throughput model on this CPU: the tiny parent (examples/tiny/parent) and three mixed
children on the tiny example's scenario (cpu-b8: batch 8, 64 in, 64 out, float32).

Every variant the children use is profiled with ``profile_scenario`` (what the ``profile`` step's CPU
unit writes: all variants in turns, each timed as a whole model of it less one of no-op layers), then each model's
tokens/s is predicted with ``predict`` and measured with ``measure_interleaved`` (all models'
generations in turns, as evaluation times a child with its parent); the error of tokens/s and of the
speedup over the parent is printed. Children get random weights of their variants' shapes (time does not depend on
the values). Run single-threaded, as the pods of a 2-core node would:

    python benchmarks/bench_throughput_cpu.py [--parent examples/tiny/parent] [--threads 1] [--rounds 3]
        [--pin 1] [--json out.json]

On a shared machine the wall clock measures the neighbours as much as the model. So each round
profiles with the profile step's own clock (``profile.cpu_clock``: with one thread, the thread's CPU
time) and measures every model with that same clock (the like-for-like error, what the throughput
model gets wrong) and then with the wall clock (what a user waits for, load included).
Rounds repeat the whole comparison; the summary gives each model's median, min and max error over the
rounds, and every round records the load average, so a figure taken on a busy machine says so.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

import torch
from puzzle.config import load_config
from puzzle.model import AttentionVariant as A
from puzzle.model import BlockConfig, DeciLMForCausalLM, load_parent
from puzzle.model import FFNVariant as F
from puzzle.profiling.bench import measure_interleaved
from puzzle.profiling.device import cpu_model
from puzzle.profiling.profiler import profile_scenario
from puzzle.profiling.throughput import ScenarioProfile, predict
from puzzle.profiling.timing import cpu_clock


def children(parent: list[BlockConfig], hidden: int) -> dict[str, list[BlockConfig]]:
    n = len(parent)
    pa, pf = parent[0].attention, parent[0].ffn
    attn = [pa, A.gqa(8), A.linear(), A.noop()]
    ffn = [pf, F.from_mult(1.0, hidden), F.from_mult(0.5, hidden), F.linear(), F.noop()]
    return {
        "child-mixed": [BlockConfig(attn[i % 4], ffn[(2 * i + 1) % 5]) for i in range(n)],
        "child-ffn-cut": [BlockConfig(pa, ffn[1 + i % 2]) for i in range(n)],
        "child-attn-drop": [BlockConfig(A.noop() if i % 2 else A.gqa(8), pf) for i in range(n)],
    }


def load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default="examples/tiny/parent")
    ap.add_argument("--config", default="examples/tiny/puzzle.yaml")
    ap.add_argument("--scenario", default="cpu-b8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5, help="timed generations per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="whole comparisons (profile + measure), one after another")
    ap.add_argument("--pin", type=int, default=None, metavar="CPU", help="pin the process to this CPU")
    ap.add_argument("--no-wall", action="store_true", help="skip the wall-clock measurements (halves the time)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.pin is not None:
        os.sched_setaffinity(0, {args.pin})
    cfg = load_config(args.config)
    sc = next(s for s in cfg.profile.scenarios if s.name == args.scenario)
    settings = cfg.profile
    clock = cpu_clock(settings.cpu_clock)
    parent = load_parent(args.parent)
    pcfg = parent.config
    models = {"parent": pcfg.block_configs, **children(pcfg.block_configs, pcfg.hidden_size)}
    built = {name: parent if name == "parent" else DeciLMForCausalLM(pcfg.with_blocks(blocks)).eval()
             for name, blocks in models.items()}
    used = {("attention", b.attention.name) for bs in models.values() for b in bs} | {
        ("ffn", b.ffn.name) for bs in models.values() for b in bs} | {("non_block", "non_block")}
    out = {"date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "machine": cpu_model(),
           "cpus": os.cpu_count(), "threads": args.threads, "pin": args.pin, "clock": clock, "torch": torch.__version__,
           "scenario": sc.model_dump(), "settings": settings.model_dump(exclude={"scenarios"}), "rounds": []}
    print(f"{out['machine']}, {os.cpu_count()} CPUs, torch {torch.__version__}, {args.threads} thread(s), "
          f"profile clock {clock}, {sc.name}, load {load():.1f}")
    for r in range(args.rounds):
        rnd: dict = {"load_start": load(), "models": {}}
        t0 = time.time()
        recs = profile_scenario(pcfg, sorted(used), sc, settings)
        prof = ScenarioProfile(recs)
        rnd["profile_s"] = time.time() - t0
        rnd["unstable"] = [rec["variant"] for rec in recs if not rec["stability"]["stable"]]
        rnd["worst_profile_spread"] = max(rec["stability"].get("rel_spread", 0.0) for rec in recs)
        print(f"round {r + 1}: profiled {len(recs)} variants as whole models in {rnd['profile_s']:.1f} s (worst "
              f"spread {rnd['worst_profile_spread']:.2f}, unstable: {rnd['unstable'] or 'none'})")
        names = list(models)
        same = dict(zip(names, measure_interleaved([built[n] for n in names], sc, warmup=1, repeats=args.repeats,
                                                   clock=clock)))
        wall = same if args.no_wall or clock == "wall" else dict(zip(names, measure_interleaved(
            [built[n] for n in names], sc, warmup=0, repeats=args.repeats, clock="wall")))
        pred_parent = predict(prof, models["parent"])
        for name, blocks in models.items():
            pred = predict(prof, blocks)
            m, w = same[name], wall[name]
            err = pred.tokens_per_s / m.tokens_per_s - 1
            werr = pred.tokens_per_s / w.tokens_per_s - 1
            sp_pred = pred.tokens_per_s / pred_parent.tokens_per_s
            sp_meas = m.tokens_per_s / same["parent"].tokens_per_s
            rnd["models"][name] = {"blocks": [b.name for b in blocks], "predicted": pred.to_dict(),
                                   "measured": m.to_dict(), "measured_wall": w.to_dict(),
                                   "error": err, "error_wall": werr, "speedup_predicted": sp_pred,
                                   "speedup_measured": sp_meas, "speedup_error": sp_pred / sp_meas - 1}
            print(f"  {name:16s} predicted {pred.tokens_per_s:8.1f} tok/s  measured ({clock}) {m.tokens_per_s:8.1f}"
                  f"  error {err * 100:+6.1f}% (spread {m.rel_spread * 100:4.1f}%)   speedup {sp_pred:.3f} predicted"
                  f" {sp_meas:.3f} measured ({(sp_pred / sp_meas - 1) * 100:+.1f}%)   wall {w.tokens_per_s:8.1f} "
                  f"error {werr * 100:+7.1f}%")
        rnd["load_end"] = load()
        out["rounds"].append(rnd)
    out["summary"] = {}
    print(f"summary over {args.rounds} round(s), load {min(x['load_start'] for x in out['rounds']):.1f}-"
          f"{max(x['load_end'] for x in out['rounds']):.1f}:")
    for name in models:
        errs = [x["models"][name]["error"] for x in out["rounds"]]
        werrs = [x["models"][name]["error_wall"] for x in out["rounds"]]
        serrs = [x["models"][name]["speedup_error"] for x in out["rounds"]]
        s = {"median": statistics.median(errs), "min": min(errs), "max": max(errs),
             "wall_median": statistics.median(werrs), "wall_min": min(werrs), "wall_max": max(werrs),
             "speedup_median": statistics.median(serrs), "speedup_min": min(serrs), "speedup_max": max(serrs)}
        out["summary"][name] = s
        print(f"  {name:16s} tokens/s error ({clock}) median {s['median'] * 100:+6.1f}% [{s['min'] * 100:+.1f}, "
              f"{s['max'] * 100:+.1f}]   speedup error median {s['speedup_median'] * 100:+5.1f}% "
              f"[{s['speedup_min'] * 100:+.1f}, {s['speedup_max'] * 100:+.1f}]   wall median "
              f"{s['wall_median'] * 100:+7.1f}% [{s['wall_min'] * 100:+.1f}, {s['wall_max'] * 100:+.1f}]")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

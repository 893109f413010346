"""How steady is a measured speedup on a CPU: one child against the parent, their generations taken in turns.

Part 1 takes ``--pairs`` pairs (one generation of the child, then one of the parent) from one build of
each and, over every window of ``w`` consecutive pairs (w = 5, 10, 20, 30), compares two estimates of
the speedup: the ratio of the two models' medians (what evaluate reported before) and the median of
the pairs' ratios (what it reports now). The spread of each estimate over the windows is what one
evaluate unit of ``w`` pairs can be off by.

Part 2 loads both models ``--builds`` times afresh in the same process (the earlier copies kept alive,
so the new tensors land elsewhere) and takes ``--per-build`` pairs from each build: where a model's
tensors land moves its speed by more than its generations move, which is why evaluate takes its pairs
in rounds of fresh copies on a CPU.

    python benchmarks/bench_paired.py CHILD_DIR [--parent examples/tiny/parent] [--pairs 60] [--builds 4]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import statistics
from pathlib import Path

import torch
from puzzle.config import load_config
from puzzle.model import load_parent
from puzzle.profiling.bench import measure_interleaved
from puzzle.profiling.device import cpu_model
from puzzle.profiling.timing import cpu_clock, median_interval


def pairs_of(child, parent, scenario, n: int, clock: str) -> list[tuple[float, float]]:
    """``n`` pairs (the child's generation seconds, then the parent's), as evaluate takes them."""
    c, p = measure_interleaved([child, parent], scenario, warmup=1, repeats=n, cuda_graphs=False, clock=clock)
    return list(zip(c.totals_s, p.totals_s))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("child", type=Path)
    ap.add_argument("--parent", default="examples/tiny/parent")
    ap.add_argument("--config", default="examples/tiny/puzzle.yaml")
    ap.add_argument("--scenario", default="cpu-b8")
    ap.add_argument("--pairs", type=int, default=60)
    ap.add_argument("--builds", type=int, default=4)
    ap.add_argument("--per-build", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config)
    sc = next(s for s in cfg.profile.scenarios if s.name == args.scenario)
    clock = cpu_clock(cfg.profile.cpu_clock)
    print(f"{_dt.datetime.now(_dt.UTC):%Y-%m-%d %H:%M} UTC, {cpu_model()}, torch {torch.__version__}, 1 thread, "
          f"clock {clock}, {sc.name}, child {args.child}, load {os.getloadavg()[0]:.1f}", flush=True)

    got = pairs_of(load_parent(args.child), load_parent(args.parent), sc, args.pairs, clock)
    ratios = [p / c for c, p in got]
    lo, hi, cov = median_interval(ratios)
    print(f"part 1: {args.pairs} pairs of one build: median of the ratios {statistics.median(ratios):.3f}x "
          f"[{lo:.3f}, {hi:.3f}] ({cov:.1%}), one pair's ratio {min(ratios):.3f}-{max(ratios):.3f}x")
    print(f"  {'pairs':>5s}  {'ratio of medians: range':>26s}  {'sd':>6s}  {'median of ratios: range':>26s}  {'sd':>6s}")
    for w in (5, 10, 20, 30):
        if w > len(got):
            continue
        win = [got[i:i + w] for i in range(len(got) - w + 1)]
        rom = [statistics.median(p for _, p in g) / statistics.median(c for c, _ in g) for g in win]
        mor = [statistics.median(p / c for c, p in g) for g in win]
        print(f"  {w:5d}  {min(rom):12.3f} - {max(rom):.3f}x  {statistics.pstdev(rom):6.3f}  "
              f"{min(mor):12.3f} - {max(mor):.3f}x  {statistics.pstdev(mor):6.3f}")

    keep = []
    meds = []
    for _ in range(args.builds):
        child, parent = load_parent(args.child), load_parent(args.parent)
        keep.append((child, parent))
        meds.append(statistics.median(p / c for c, p in pairs_of(child, parent, sc, args.per_build, clock)))
    print(f"part 2: {args.builds} builds of both models, {args.per_build} pairs each: medians "
          + ", ".join(f"{m:.3f}" for m in meds) + f"x (range {max(meds) - min(meds):.3f})")


if __name__ == "__main__":
    main()

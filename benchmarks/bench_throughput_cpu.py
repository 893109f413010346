"""Fidelity of the throughput model on this CPU: the tiny parent (examples/tiny/parent) and three mixed
children on the tiny example's scenario (cpu-b8: batch 8, 64 in, 64 out, float32).

Every variant the children use is profiled with ``profile_unit`` (what the ``profile`` step writes),
then each model's tokens/s is predicted with ``predict`` and measured with ``measure_throughput``;
the error is printed. Children get random weights of their variants' shapes (time does not depend on
the values). Run single-threaded, as the pods of a 2-core node would:

    python benchmarks/bench_throughput_cpu.py [--parent examples/tiny/parent] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import time

import torch
from puzzle.config import load_config
from puzzle.model import AttentionVariant as A
from puzzle.model import BlockConfig, DeciLMForCausalLM, load_parent
from puzzle.model import FFNVariant as F
from puzzle.profiling.bench import measure_throughput
from puzzle.profiling.profiler import profile_unit
from puzzle.profiling.throughput import ScenarioProfile, predict


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parent", default="examples/tiny/parent")
    ap.add_argument("--config", default="examples/tiny/puzzle.yaml")
    ap.add_argument("--scenario", default="cpu-b8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    sc = next(s for s in cfg.profile.scenarios if s.name == args.scenario)
    parent = load_parent(args.parent)
    pcfg = parent.config
    models = {"parent": pcfg.block_configs, **children(pcfg.block_configs, pcfg.hidden_size)}
    used = {("attention", b.attention.name) for bs in models.values() for b in bs} | {
        ("ffn", b.ffn.name) for bs in models.values() for b in bs} | {("non_block", "non_block")}
    t0 = time.time()
    recs = [profile_unit(pcfg, k, n, sc, cfg.profile) for k, n in sorted(used)]
    prof = ScenarioProfile(recs)
    out = {"date": _dt.datetime.now(_dt.UTC).isoformat(), "machine": platform.processor() or platform.machine(),
           "threads": args.threads, "torch": torch.__version__, "scenario": sc.model_dump(), "profile_s": time.time() - t0,
           "models": {}}
    print(f"profiled {len(recs)} variants in {out['profile_s']:.1f} s ({sc.name}, {args.threads} thread(s))")
    for name, blocks in models.items():
        m = parent if name == "parent" else DeciLMForCausalLM(pcfg.with_blocks(blocks)).eval()
        pred = predict(prof, blocks)
        meas = measure_throughput(m, sc, warmup=1, repeats=args.repeats)
        err = pred.tokens_per_s / meas.tokens_per_s - 1
        out["models"][name] = {"blocks": [b.name for b in blocks], "predicted": pred.to_dict(),
                               "measured": meas.to_dict(), "error": err}
        print(f"{name:16s} predicted {pred.tokens_per_s:9.1f} tok/s  measured {meas.tokens_per_s:9.1f} tok/s  "
              f"error {err * 100:+6.1f}%  (prefill {pred.prefill_s * 1e3:.2f}/{meas.prefill_s * 1e3:.2f} ms, decode "
              f"{pred.decode_s * 1e3:.1f}/{meas.decode_s * 1e3:.1f} ms, spread {meas.total_spread['rel_spread'] * 100:.1f}%)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

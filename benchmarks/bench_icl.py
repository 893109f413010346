"""ICL compositional-generalization benchmark for a model directory: exact match per method x split.

Runs :func:`puzzle.icl.benchmark.run_icl_benchmark` on a plain Hugging Face causal-LM directory
(the tiny parent by default) through :class:`puzzle.icl.generation.HFTextGenerator`, prints a
table method x dataset (exact match, mean structure coverage of the demonstrations) and writes
the full results (per-item records included) as JSON::

    python benchmarks/bench_icl.py --model examples/tiny/parent \
        --datasets scan:template geo:compound --num-test 100 --out runs/bench_icl.json

Predicted structures (the default) come from the same model's beams with Top-K prompts unless
``--aux-model`` names another directory; ``--structures oracle`` uses the gold programs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch
from puzzle.config import ICLEvalConfig
from puzzle.icl.benchmark import run_icl_benchmark
from puzzle.icl.generation import HFTextGenerator


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    p.add_argument("--aux-model", help="model directory predicting Cover-LS structures (default: --model)")
    p.add_argument("--datasets", nargs="+", default=["scan:template", "geo:compound"])
    p.add_argument("--methods", nargs="+", default=["random", "topk", "cover_utt", "cover_ls"])
    p.add_argument("--num-test", type=int, default=100)
    p.add_argument("--k", type=int, default=8, help="demonstrations per prompt")
    p.add_argument("--structures", choices=["predicted", "oracle"], default="predicted")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-structure-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev machine is shared)")
    p.add_argument("--out", type=Path, help="write the full results here as JSON")
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    cfg = ICLEvalConfig(
        enabled=True,
        methods=a.methods,
        datasets=a.datasets,
        num_demonstrations=a.k,
        num_test=a.num_test,
        max_structure_size=a.max_structure_size,
        structures=a.structures,
        num_beams=a.num_beams,
        seed=a.seed,
    )
    gen = HFTextGenerator(a.model, device=a.device, batch_size=a.batch_size)
    aux = HFTextGenerator(a.aux_model, device=a.device, batch_size=a.batch_size) if a.aux_model else None
    t0 = time.perf_counter()
    out = run_icl_benchmark(gen, cfg, aux, log=lambda m: print(m, file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    out["machine"] = {
        "device": a.device,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": a.threads,
        "gpu": torch.cuda.get_device_name() if a.device.startswith("cuda") else None,
    }
    out["model"] = a.model
    out["wall_s"] = wall

    print(
        f"model {a.model}, k={a.k}, n={a.num_test} per split, structures={a.structures}, "
        f"beams={a.num_beams}, device={a.device}, {wall:.0f}s"
    )
    print("| method | " + " | ".join(a.datasets) + " |")
    print("|---|" + "---|" * len(a.datasets))
    for m in a.methods:
        cells = []
        for d in a.datasets:
            r = out["results"][d][m]
            cells.append(
                f"{r['accuracy']:.3f} ({r['correct']}/{r['n']}; cov {r['mean_structure_coverage']:.2f})"
            )
        print(f"| {m} | " + " | ".join(cells) + " |")
    # Diagnostic: a model that ignores its demonstrations answers the same under every method,
    # and then no selection method can change its accuracy.
    for d in a.datasets:
        res = out["results"][d]
        n = len(res[a.methods[0]]["records"])
        same = sum(len({res[m]["records"][j]["prediction"] for m in a.methods}) == 1 for j in range(n))
        out.setdefault("same_prediction_every_method", {})[d] = same
        print(f"{d}: same prediction under every method for {same}/{n} queries")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""ICL compositional-generalization benchmark of one model: exact match per selection mode x method x split.

Runs :func:`puzzle.icl.benchmark.run_icl_benchmark` for both selection modes (``paper``, the authors'
definitions, and ``fragments``, this project's earlier variant) with every method (Random, Top-K, Cover-Utt,
Cover-LS), prints one table per mode with Wilson 95% intervals, and one line per split saying whether the
paper's ordering Cover-LS > Top-K > Random holds and whether the intervals separate. Writes the full results
(per-item records, prompts' demonstrations, predicted programs) as JSON.

CPU, the committed tiny parent (trained on 512-token sequences, hence ``--max-context-tokens 512``)::

    python benchmarks/bench_icl.py --model examples/tiny/parent --max-context-tokens 512 --threads 2 \\
        --out runs/bench_icl_tiny.json

GPU, a bigger parent (a Llama or nemotron-nas directory; bf16 by default on cuda)::

    python benchmarks/bench_icl.py --model /models/Llama-3.1-8B-Instruct --device cuda --modes paper \\
        --out runs/bench_icl_gpu_paper.json

(one mode per command keeps each run short; ``--datasets`` splits further.)

The model is loaded with the project's own loader (``puzzle.model.load_parent``, never remote code) and
answers through :class:`puzzle.generation.DeciTextGenerator`; ``--backend transformers`` uses
transformers' own Llama instead. The structure predictor is the model itself (it plays the parent) unless
``--structure-predictor model --predictor DIR`` or ``oracle`` says otherwise.
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
from puzzle.generation import DeciTextGenerator, HFTextGenerator, TextGenerator
from puzzle.icl.benchmark import run_icl_benchmark

MODES = ("paper", "fragments")
METHODS = ("random", "topk", "cover_utt", "cover_ls")


def load_generator(path: str, backend: str, device: str, dtype: str, batch_size: int) -> TextGenerator:
    if backend == "transformers":
        return HFTextGenerator.from_dir(path, device=device, batch_size=batch_size, dtype=dtype)
    from puzzle.model import load_parent

    return DeciTextGenerator(load_parent(path, dtype=getattr(torch, dtype), device=device), path, batch_size)


def ordering_line(split: str, res: dict) -> str:
    """Whether Cover-LS > Top-K > Random holds on ``split``, by accuracy and by non-overlapping intervals."""
    if not all(m in res for m in ("cover_ls", "topk", "random")):
        return f"{split}: ordering not measured (needs cover_ls, topk and random)"
    c, t, r = (res[m] for m in ("cover_ls", "topk", "random"))
    holds = c["accuracy"] > t["accuracy"] > r["accuracy"]
    separate = c["ci95"][0] > t["ci95"][1] and t["ci95"][0] > r["ci95"][1]
    return (
        f"{split}: Cover-LS {c['correct']}/{c['n']} > Top-K {t['correct']}/{t['n']} > Random "
        f"{r['correct']}/{r['n']}: {'holds' if holds else 'does NOT hold'}; the 95% intervals "
        f"{'separate' if separate else 'do not separate'}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face model directory (Llama or nemotron-nas)")
    p.add_argument("--backend", choices=["puzzle", "transformers"], default="puzzle")
    p.add_argument("--structure-predictor", choices=["parent", "model", "oracle"], default="parent",
                   help="parent: the evaluated model itself; model: --predictor DIR; oracle: gold programs")
    p.add_argument("--predictor", help="model directory predicting the query programs (--structure-predictor model)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--datasets", nargs="+", default=["scan:template", "geo:compound"])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--k", type=int, help="demonstrations selected (default: 24 paper, 8 fragments)")
    p.add_argument("--num-beams", type=int, default=3)
    p.add_argument("--max-context-tokens", type=int, help="prompt + answer cap (default: the model's context)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on cuda, float32 on cpu")
    p.add_argument("--batch-size", type=int, default=16,
                   help="sequences per forward (beams count; the project's model computes logits for every prompt "
                        "position in prefill, so keep batch x prompt tokens x vocab in memory)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (the dev machine is shared)")
    p.add_argument("--out", type=Path, help="write the full results here as JSON")
    a = p.parse_args(argv)
    if (a.structure_predictor == "model") != bool(a.predictor):
        p.error("--predictor DIR goes with --structure-predictor model, and only with it")

    cuda = a.device.startswith("cuda")
    dtype = a.dtype or ("bfloat16" if cuda else "float32")
    batch = a.batch_size
    torch.set_num_threads(a.threads)
    gen = load_generator(a.model, a.backend, a.device, dtype, batch)
    predictor = load_generator(a.predictor, a.backend, a.device, dtype, batch) if a.predictor else None

    def log(m: str) -> None:
        print(m, file=sys.stderr, flush=True)

    out: dict = {
        "model": a.model,
        "backend": a.backend,
        "machine": {
            "device": a.device,
            "dtype": dtype,
            "cpu": platform.processor() or platform.machine(),
            "torch_threads": a.threads,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "torch": torch.__version__,
        },
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "modes": {},
    }
    lines: list[str] = []
    t_all = time.perf_counter()
    for mode in a.modes:
        cfg = ICLEvalConfig(
            enabled=True,
            selection=mode,
            methods=a.methods,
            datasets=a.datasets,
            num_demonstrations=a.k,
            num_test=a.num_test,
            structure_predictor=a.structure_predictor,
            predictor_uri=a.predictor,
            max_context_tokens=a.max_context_tokens,
            num_beams=a.num_beams,
            seed=a.seed,
        )
        t0 = time.perf_counter()
        res = run_icl_benchmark(gen, cfg, predictor, log=lambda m, mode=mode: log(f"[{mode}] {m}"))
        res["wall_s"] = time.perf_counter() - t0
        out["modes"][mode] = res
        lines.append(
            f"\nselection {mode}: k={cfg.k} (cut to the prompt budget {res['prompt_budget']}), n={cfg.structure_size}, "
            f"structure predictor {a.structure_predictor}, {a.num_beams} beams, {res['wall_s']:.0f}s"
        )
        lines.append("| method | " + " | ".join(a.datasets) + " |")
        lines.append("|---|" + "---|" * len(a.datasets))
        for m in a.methods:
            cells = []
            for d in a.datasets:
                r = res["results"][d][m]
                lo, hi = r["ci95"]
                cells.append(
                    f"{r['accuracy']:.3f} [{lo:.3f}, {hi:.3f}] ({r['correct']}/{r['n']}; "
                    f"{r['mean_demonstrations']:.1f} demos; cov {r['mean_structure_coverage']:.2f})"
                )
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        for d in a.datasets:
            lines.append(ordering_line(d, res["results"][d]))
            # A model that ignores its demonstrations answers the same under every method, and then no
            # selection method can change its accuracy.
            recs = [res["results"][d][m]["records"] for m in a.methods]
            same = sum(len({r[j]["prediction"] for r in recs}) == 1 for j in range(len(recs[0])))
            res.setdefault("same_prediction_every_method", {})[d] = same
            lines.append(f"{d}: same prediction under every method for {same}/{len(recs[0])} queries")
    out["wall_s"] = time.perf_counter() - t_all
    print(f"model {a.model} ({a.backend}, {a.device}, {dtype}), {out['wall_s']:.0f}s")
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GKD sharded over the GPUs of one pod (issue #18): peak memory per GPU and tokens/s of global knowledge
distillation of a Llama-3.1-8B-shaped child from its Llama-3.1-8B-shaped parent, on 1 GPU and on N.

    python benchmarks/bench_gkd.py --gpus 1 2 [--batch-size 8] [--seq-len 1024] [--steps 8] [--out bench_gkd.json]

runs each GPU count as its own job (1: this interpreter, one plain process; N > 1:
``python -m torch.distributed.run --standalone --nproc-per-node N`` on this file with ``--worker``), then
prints a Markdown table (GPUs, peak allocated and reserved GiB per GPU, tokens/s, the ratio of the peak to
one GPU's, the dry-run plan's estimate) and the issue's check: on N GPUs the peak per GPU is at most 60% of
the one-GPU figure (exit status 1 when it is not).

What runs is the production path, not a copy: :func:`puzzle.distill.gkd.distill` (the one training loop,
``Trainer(sharded=True)``), the models sharded by :func:`puzzle.distributed.shard` (FSDP2, one group per
attention and FFN module, embedding and head), bf16 weights as ``parent.dtype: bfloat16`` gives, bf16
autocast, fused AdamW. The weights are random (values change neither memory nor speed) and each rank
fills its own shard (meta -> ``fully_shard`` -> ``to_empty`` -> ``normal_``): reading 16 GB from files on
rank 0 (:func:`puzzle.distributed.distribute`, what ``assemble`` does, tested on CPU by
``tests/test_distributed.py``) is start-up, not what is timed.

The child: the parent with ``ffn_mult`` 2.0 (SwiGLU 5461 instead of 14336) in every other layer and
``n_heads_in_group`` 8 (4 KV heads instead of 8) in every fourth, as a Puzzle child of the parent might be.
tokens/s: global tokens per second over the steps after two warm-up steps, from step ends that are synced
(``distill`` reads each step's loss). Peak memory: ``torch.cuda.max_memory_allocated`` of each rank from
before the models are built to the end of training (the max over ranks is "per GPU").

``--smoke`` runs a tiny shape on the CPU (gloo for N > 1) to check the script before GPU time:
``python benchmarks/bench_gkd.py --smoke --gpus 1 2``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from puzzle import distributed as dist
from puzzle.config import GKDConfig
from puzzle.distill.gkd import distill
from puzzle.model import AttentionVariant, BlockConfig, DeciLMForCausalLM, FFNVariant, ModelConfig

GiB = 2**30
WARMUP = 2
LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "tie_word_embeddings": False}
BLOCK_8B = BlockConfig(AttentionVariant.gqa(4), FFNVariant.exact(14336))  # 8 KV heads, SwiGLU 14336
SMOKE = {"vocab_size": 512, "hidden_size": 64, "num_attention_heads": 8, "head_dim": 8, "rms_norm_eps": 1e-5,
         "rope_theta": 10000.0, "max_position_embeddings": 256, "tie_word_embeddings": False}
BLOCK_SMOKE = BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(160))
#: the issue's goal: the peak per GPU on N GPUs at most this fraction of one GPU's
GOAL = 0.6


def shapes(smoke: bool, layers: int | None) -> tuple[ModelConfig, ModelConfig]:
    """(parent, child) configs: the child prunes FFNs of odd layers and KV heads of every fourth layer."""
    shape, block = (SMOKE, BLOCK_SMOKE) if smoke else (LLAMA_8B, BLOCK_8B)
    n = layers or (4 if smoke else 32)
    parent = ModelConfig(block_configs=[block] * n, **shape)
    hidden = shape["hidden_size"]
    child = []
    for i in range(n):
        attn = AttentionVariant.gqa(block.attention.n_heads_in_group * 2) if i % 4 == 3 else block.attention
        ffn = FFNVariant.from_mult(2.0, hidden) if i % 2 == 1 else block.ffn
        child.append(BlockConfig(attn, ffn))
    return parent, parent.with_blocks(child)


def build(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, frozen: bool) -> DeciLMForCausalLM:
    """A random model sharded over the ranks (whole at world size 1), each rank filling its shard."""
    with torch.device("meta"):
        model = DeciLMForCausalLM(cfg)
    model.to(dtype)
    dist.shard(model, frozen=frozen)
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(1000 + dist.rank())
    with torch.no_grad():
        for p in model.parameters():
            local = p.to_local() if hasattr(p, "to_local") else p  # a DTensor's own shard
            if local.dim() == 1:
                local.fill_(1.0)  # norm gains
            else:
                local.normal_(0.0, 0.02, generator=g)
    return model


def worker(args: argparse.Namespace) -> dict | None:
    dist.init()
    cuda = torch.cuda.is_available() and not args.smoke
    device = dist.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    pcfg, ccfg = shapes(args.smoke, args.layers)
    B, T = (4, 32) if args.smoke else (args.batch_size, args.seq_len)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    teacher = build(pcfg, device, dtype, frozen=True)
    child = build(ccfg, device, dtype, frozen=False)
    child_params = _counts(ccfg).params
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, pcfg.vocab_size, (4 * B, T), generator=g)  # (N, T): what the data looks like
    steps = args.steps
    cfg = GKDConfig(enabled=True, tokens=steps * B * T, batch_size=B, lr=1e-5, warmup_fraction=0.0,
                    checkpoint_every=10**9)
    ends: list[float] = []
    started = time.perf_counter()
    result = distill(child, teacher, seqs, cfg, seed=0, eval_seqs=None,
                     on_step=lambda done, point: ends.append(time.perf_counter()), desc="bench-gkd")
    timed = ends[WARMUP:]
    tps = (len(timed) - 1) * B * T / (timed[-1] - timed[0]) if len(timed) > 1 else float("nan")
    mine = {
        "rank": dist.rank(),
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB if cuda else None,
        "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB if cuda else None,
    }
    every = dist.gather_object(mine)
    dist.barrier()
    dist.destroy()
    if every is None:
        return None
    peaks = [r["peak_allocated_gib"] for r in every]
    return {
        "gpus": len(every), "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "batch_size": B, "seq_len": T, "steps": steps, "layers": pcfg.num_hidden_layers,
        "parent_params": _counts(pcfg).params, "child_params": child_params, "dtype": str(dtype),
        "tokens_per_s": tps, "seconds": time.perf_counter() - started,
        "final_loss": result.curve[-1]["loss"],
        "peak_allocated_gib_per_gpu": max(peaks) if cuda else None,
        "peak_reserved_gib_per_gpu": max(r["peak_reserved_gib"] for r in every) if cuda else None,
        "per_rank": every,
        "torch": torch.__version__,
    }


def _counts(cfg: ModelConfig):
    from puzzle.model.counts import model_counts

    return model_counts(cfg)


def plan_estimate(args: argparse.Namespace, gpus: int) -> float | None:
    """The dry-run plan's GiB per GPU for assemble (GKD) at this shape (an upper bound: the plan sizes the
    child as the parent); None when the config cannot be planned here."""
    from puzzle.config import parse_config
    from puzzle.planning import preflight

    pcfg, _ = shapes(args.smoke, args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "config.json").write_text(pcfg.to_json_string())
        B, T = (4, 32) if args.smoke else (args.batch_size, args.seq_len)
        config = parse_config({
            "name": "bench", "parent": {"uri": tmp, "dtype": "float32" if args.smoke else "bfloat16"},
            "data": {"distillation_uri": "x.txt", "validation_uri": "y.txt", "seq_len": T},
            "profile": {"scenarios": [{"name": "gpu", "batch_size": 1, "input_len": 8, "output_len": 8,
                                       "dtype": "bfloat16", "device": "cuda"}]},
            "assemble": {"gkd": {"enabled": True, "tokens": args.steps * B * T, "batch_size": B}},
            "compute": {"gpus_per_pod": gpus, "gpu_memory_gib": 141},
        })
        checked = preflight(config)
    if checked is None:
        return None
    return next(r["memory_gib_per_unit"] for r in checked.cost["steps"] if r["step"] == "assemble")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="GPU counts to run (one job each)")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per optimizer step (the global batch)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=8, help=f"optimizer steps, the first {WARMUP} untimed")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, the 8B's)")
    ap.add_argument("--smoke", action="store_true", help="a tiny shape on the CPU: checks the script")
    ap.add_argument("--out", type=Path, default=Path("bench_gkd.json"))
    ap.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.steps <= WARMUP + 1:
        ap.error(f"--steps: {args.steps} is not allowed; must be > {WARMUP + 1} (the first {WARMUP} are warm-up)")

    if args.worker is not None:  # one job: a plain process, or one torchrun rank
        res = worker(args)
        if res is not None:
            args.worker.write_text(json.dumps(res, indent=2))
        return 0

    passthrough = ["--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]
    passthrough += (["--layers", str(args.layers)] if args.layers else []) + (["--smoke"] if args.smoke else [])
    results: dict[int, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gkd-") as tmp:
        for g in args.gpus:
            out = Path(tmp) / f"gpus-{g}.json"
            launch = [sys.executable] if g == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      "--nproc-per-node", str(g)]
            subprocess.run([*launch, str(Path(__file__).resolve()), "--worker", str(out), *passthrough], check=True)
            results[g] = json.loads(out.read_text())
            try:
                results[g]["plan_gib_per_gpu"] = plan_estimate(args, g)
            except Exception as err:  # noqa: BLE001 - the estimate is a side figure
                results[g]["plan_gib_per_gpu"] = None
                print(f"plan estimate for {g} GPUs failed: {err}", file=sys.stderr)
    one = results.get(1)
    verdicts = []
    print("| GPUs | peak allocated GiB/GPU | peak reserved GiB/GPU | tokens/s | peak / 1 GPU | plan GiB/GPU |")
    print("|---:|---:|---:|---:|---:|---:|")
    for g, r in sorted(results.items()):
        peak = r["peak_allocated_gib_per_gpu"]
        ratio = peak / one["peak_allocated_gib_per_gpu"] if one and peak is not None and \
            one["peak_allocated_gib_per_gpu"] else None
        r["peak_over_one_gpu"] = ratio
        if g > 1 and ratio is not None:
            verdicts.append((g, ratio <= GOAL))

        def f(x, spec=".1f"):
            return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)

        print(f"| {g} | {f(peak)} | {f(r['peak_reserved_gib_per_gpu'])} | {f(r['tokens_per_s'], '.0f')} | "
              f"{f(ratio, '.2f')} | {f(r.get('plan_gib_per_gpu'))} |")
    first = next(iter(results.values()))
    print(f"\n{first['device']}, child {first['child_params'] / 1e9:.2f}B / parent {first['parent_params'] / 1e9:.2f}B "
          f"parameters, {first['dtype']}, batch {first['batch_size']} x {first['seq_len']}, {first['steps']} steps")
    for g, ok in verdicts:
        print(f"check: peak per GPU on {g} GPUs <= {GOAL:.0%} of one GPU's: {'PASS' if ok else 'FAIL'}")
    args.out.write_text(json.dumps({"goal": GOAL, "results": {str(g): r for g, r in results.items()}}, indent=2))
    return 0 if all(ok for _, ok in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())

"""BLD benchmarks: what the library's blocks learn (CPU, the tiny parent) and how fast BLD trains (GPU).

``cpu``: the tiny example's whole library (every bld unit of ``plan/bld.json``) trained through the bld
step on CPU; prints initial vs final held-out normalized MSE per variant and layer (a Markdown table).

    python benchmarks/bench_bld.py cpu [--config examples/tiny/puzzle.yaml] [--out bld_cpu.json]

``gpu``: BLD units on Llama-3.1-8B-shaped blocks (hidden 4096, 32 heads, 8 KV heads, SwiGLU 14336,
random weights, bf16 parent, bf16 autocast) at sequence 4096, through the same bld step code. Reports
training tokens/s per GPU and model FLOP utilization against the bf16 matmul peak measured on the same
GPU in the same process (an 8192^3 product).

    python benchmarks/bench_bld.py gpu [--batch-size 8] [--steps 24] [--layers 2] [--out bld_gpu.json]

Model FLOPs per training token of a unit over layers [0, L): the parent's forward through the layers it
must run (every layer before the unit's last; for an attention unit the last layer's FFN is skipped)
plus 3x the forward FLOPs of each trained block (forward + backward), with causal attention counted
as T(T+1)/2 score entries (``puzzle.model.counts``). Evaluation, calibration and loading are left out
of tokens/s: the step measures its training loop only, after two warm-up steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from puzzle.config import load_config, parse_config
from puzzle.context import create_run, run_step
from puzzle.data.shards import write_shards
from puzzle.library import Library
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    attention_counts,
    ffn_counts,
    save_pretrained,
    variant_from_name,
)
from puzzle.store import open_store


# ----- CPU: the tiny parent's whole library ---------------------------------------------------------
def bench_cpu(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    parent = Path(config.parent.uri)
    if not (parent / "config.json").is_file():
        sys.exit(f"error: {parent} has no config.json; train the tiny parent first (puzzle parent train-tiny)")
    root = Path(tempfile.mkdtemp(prefix="bench-bld-"))
    data = config.model_dump(mode="json")
    data["store"]["uri"] = f"file://{root}"
    config = parse_config(data)
    uri = create_run(config, config_text=config.to_yaml())
    started = time.time()
    run_step("prepare", uri, {"id": "all"})
    store = open_store(uri)
    units = store.get_json("plan/bld.json")
    for i, u in enumerate(units):
        t = time.time()
        run_step("bld", uri, u)
        print(f"[{i + 1}/{len(units)}] {u['id']}: {time.time() - t:.1f} s", file=sys.stderr)
    lib = Library.for_run(store, config)
    rows = []
    for layer, variant in lib.entries():
        m = lib.meta(layer, variant)
        rows.append({"layer": layer, "variant": variant, "initial_nmse": m["initial_nmse"],
                     "final_nmse": m["final_nmse"], "trained_nmse": m.get("trained_nmse"),
                     "kept": m.get("kept", "trained"), "tokens_seen": m["tokens_seen"], "seconds": m["seconds"]})
    result = {"config": str(args.config), "units": len(units), "wall_seconds": time.time() - started,
              "threads": args.threads, "library": lib.digest, "blocks": rows}
    variants = sorted({r["variant"] for r in rows})
    print("| variant | layers | initial nmse (mean) | final nmse (mean) | trained < initial | kept init |")
    print("|---|---|---|---|---|---|")
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        ini = np.mean([r["initial_nmse"] for r in rs])
        fin = np.mean([r["final_nmse"] for r in rs])
        better = sum(r["trained_nmse"] is not None and r["trained_nmse"] < r["initial_nmse"] for r in rs)
        kept = sum(r["kept"] == "initial" for r in rs)
        print(f"| {v} | {len(rs)} | {ini:.4f} | {fin:.4f} | {better}/{len(rs)} | {kept} |")
    print("\n| layer | variant | initial nmse | trained nmse | kept |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layer']} | {r['variant']} | {r['initial_nmse']:.3g} | {r['trained_nmse']:.3g} | {r['kept']} |")
    return result


# ----- GPU: Llama-3.1-8B-shaped blocks ---------------------------------------------------------------
LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "tie_word_embeddings": False}
PARENT_BLOCK = BlockConfig(AttentionVariant.gqa(4), FFNVariant.exact(14336))  # 8 KV heads, SwiGLU 14336


def matmul_peak_tflops(n: int = 8192, repeats: int = 20) -> float:
    """Measured dense bf16 matmul throughput (TFLOP/s) on random data: the MFU denominator."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def flops_per_token(cfg: ModelConfig, block: BlockConfig, kind: str, variant, layers: int,
                    seq_len: int) -> dict[str, float]:
    """Model FLOPs per training token of a unit over layers [0, layers) (see the module docstring)."""
    pa = attention_counts(block.attention, cfg).prefill_flops(1, seq_len) / seq_len
    pf = ffn_counts(block.ffn, cfg).prefill_flops(1, seq_len) / seq_len
    parent = layers * (pa + pf) - (pf if kind == "attention" else 0.0)
    counts = attention_counts(variant, cfg) if kind == "attention" else ffn_counts(variant, cfg)
    trained = 3 * layers * counts.prefill_flops(1, seq_len) / seq_len
    return {"parent_forward": parent, "blocks_train": trained, "total": parent + trained}


def bench_gpu(args: argparse.Namespace) -> dict:
    if args.smoke:  # the same code path at toy size on CPU, to check the script before spending GPU time
        shape = {**LLAMA_8B, "vocab_size": 512, "hidden_size": 128, "num_attention_heads": 8, "head_dim": 16}
        block = BlockConfig(AttentionVariant.gqa(4), FFNVariant.exact(448))
        device, peak = "cpu", float("nan")
    else:
        assert torch.cuda.is_available(), "the gpu benchmark needs a CUDA device (or --smoke)"
        shape, block, device = LLAMA_8B, PARENT_BLOCK, "cuda"
        peak = matmul_peak_tflops()
        print(f"bf16 matmul peak (8192^3, measured): {peak:.1f} TFLOP/s", file=sys.stderr)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-bld-gpu-"))
    cfg = ModelConfig(block_configs=[block] * args.layers, **shape)
    parent_dir = root / "parent"
    t = time.time()
    torch.manual_seed(0)
    with torch.device(device):
        model = DeciLMForCausalLM(cfg).to(torch.bfloat16)
    for p in model.parameters():  # random weights at Llama's init scale (std 0.02), norms at one
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
    save_pretrained(model, parent_dir)
    del model
    torch.cuda.empty_cache()
    print(f"random parent ({args.layers} layers) saved in {time.time() - t:.1f} s", file=sys.stderr)

    T, B = args.seq_len, args.batch_size
    config = parse_config({
        "name": "bench",
        "parent": {"uri": str(parent_dir), "dtype": "bfloat16"},
        "data": {"distillation_uri": "random", "validation_uri": "random", "seq_len": T, "shard_tokens": 1 << 22},
        "bld": {"tokens": args.steps * B * T, "batch_size": B, "lr": 1e-4, "checkpoint_every": 10**6,
                "eval_tokens": B * T, "calibration_tokens": 2 * T, "warmup_fraction": 0.1},
        "profile": {"scenarios": [{"name": "h100", "batch_size": 64, "input_len": 1024, "output_len": 1024,
                                   "dtype": "bfloat16", "device": "cuda"}]},
        "store": {"uri": f"file://{root}/runs"},
    })
    uri = create_run(config, run_id="bench-gpu")
    store = open_store(uri)
    rng = np.random.default_rng(0)
    write_shards(store, "data/distillation", rng.integers(0, cfg.vocab_size, 64 * T).astype(np.int32), 1 << 22,
                 {"sha256": "random"})
    write_shards(store, "data/validation", rng.integers(0, cfg.vocab_size, 16 * T).astype(np.int32), 1 << 22,
                 {"sha256": "random-valid"})
    results = []
    for name in args.variants.split(","):
        kind = "attention" if name.startswith("attn_") else "ffn"
        unit = {"id": f"{name}.l000-{args.layers:03d}", "kind": kind, "variant": name, "layers": [0, args.layers]}
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = time.time()
        run_step("bld", uri, unit)
        wall = time.time() - t
        lib = Library.for_run(store, config)
        meta = lib.meta(0, name)
        v = variant_from_name(name, cfg.hidden_size)
        fl = flops_per_token(cfg, block, kind, v, args.layers, T)
        tps = meta["tokens_per_second"]
        achieved = tps * fl["total"] / 1e12
        row = {
            "variant": name, "kind": kind, "layers": args.layers, "batch_size": B, "seq_len": T,
            "steps": meta["steps"], "tokens_per_second": tps, "train_seconds": meta["train_seconds"],
            "unit_wall_seconds": wall, "model_tflops_per_token": fl["total"] / 1e12,
            "flops_split_per_token": fl, "achieved_tflops": achieved, "mfu": achieved / peak,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan"),
            "initial_nmse": [lib.meta(i, name)["initial_nmse"] for i in range(args.layers)],
            "final_nmse": [lib.meta(i, name)["final_nmse"] for i in range(args.layers)],
        }
        results.append(row)
        print(f"{name}: {tps:,.0f} tokens/s, {achieved:.0f} TFLOP/s, MFU {achieved / peak:.1%} "
              f"(peak mem {row['peak_memory_gib']:.1f} GiB, unit wall {wall:.1f} s)", file=sys.stderr)
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "matmul_peak_tflops": peak,
           "date": time.strftime("%Y-%m-%d"), "units": results}
    print("| variant | layers | batch x seq | tokens/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['variant']} | {r['layers']} | {B} x {T} | {r['tokens_per_second']:,.0f} | "
              f"{r['achieved_tflops']:.0f} | {r['mfu']:.1%} | {r['peak_memory_gib']:.1f} |")
    if args.profile and device == "cuda":
        out["profile"] = _profile_steps(uri, config, results[0]["variant"], args.layers)
    return out


def _profile_steps(uri: str, config, name: str, layers: int) -> str:
    """The top CUDA kernels of three training steps of one unit (where the time goes)."""
    from puzzle.data.shards import load_tokens, sequences
    from puzzle.model import load_parent
    from puzzle.steps.bld import BLDUnit, Trainer
    from torch.profiler import ProfilerActivity, profile

    store = open_store(uri)
    parent = load_parent(config.parent.uri, dtype=torch.bfloat16, device="cuda").requires_grad_(False)
    seqs = sequences(load_tokens(store, "data/distillation"), config.data.seq_len)
    kind = "attention" if name.startswith("attn_") else "ffn"
    unit = BLDUnit("profile", kind, name, 0, layers)
    tr = Trainer(parent, config, unit, torch.device("cuda"), seqs, seqs[:1], seqs[:2])
    tr.setup(list(range(layers)), resume=None)
    tr.total_steps = 3
    tr.train(0, progress=False)  # warm-up
    tr.total_steps = 6
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        tr.train(3, progress=False)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(table, file=sys.stderr)
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu", help="the tiny parent's whole library on CPU")
    c.add_argument("--config", default="examples/tiny/puzzle.yaml")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", type=Path)
    g = sub.add_parser("gpu", help="BLD throughput and MFU on Llama-3.1-8B-shaped blocks")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--seq-len", type=int, default=4096)
    g.add_argument("--steps", type=int, default=24)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--variants", default="attn_g8,ffn_m2.0")
    g.add_argument("--workdir", default=None)
    g.add_argument("--profile", action="store_true", help="also print the top CUDA kernels of a few steps")
    g.add_argument("--smoke", action="store_true", help="toy shapes on CPU: check the script, measure nothing")
    g.add_argument("--out", type=Path)
    args = p.parse_args()
    result = bench_cpu(args) if args.mode == "cpu" else bench_gpu(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

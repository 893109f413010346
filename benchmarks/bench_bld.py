"""BLD benchmarks: what the library's blocks learn (CPU, the tiny parent), what the whole library costs on a
GPU against its floor, and what streaming the parent costs (a 70B-shaped stage).

``cpu``: the tiny example's whole library (every bld unit of ``plan/bld.json``) trained through the bld
step on CPU; prints initial vs final held-out normalized MSE per variant and layer (a Markdown table).

    python benchmarks/bench_bld.py cpu [--config examples/tiny/puzzle.yaml] [--out bld_cpu.json]

``library``: the GPU-seconds to train the whole library of a search space on a Llama-3.1-8B-shaped parent
(32 layers, random bf16 weights, batch 8 x 4096), per million distillation tokens:

- *after* (this design): every stage that ``puzzle.planning.plan_stages`` plans for the GPU's memory
  trains all its blocks from one parent pass per batch; each stage's step time is measured (after
  warm-up) with the production ``StageTrainer``;
- *before* (the old design: one unit per variant and 2-layer range, each re-running the parent from
  layer 0): the same engine restricted to one variant over 2 layers, measured at layers 0-2, 14-16 and
  30-32 (where it is cheapest, in the middle and where it is most expensive), and summed over every
  (variant, range) with the measured per-layer parent forward time and per-variant training time;
- *floor*: one parent forward over all layers plus every trained block's forward and backward at the
  speed measured for that block alone (its input and target held fixed, no parent pass).

It prints after/floor (the issue's goal: at most 1.5) and before/floor, and the planner's estimate of each
stage's time next to the measured one (``compute.mfu`` is the planner's only free figure).

    python benchmarks/bench_bld.py library [--gpu-memory-gib 80] [--steps 3] [--out bld_library.json]

``stream``: a Llama-3.1-70B-shaped parent (hidden 8192, 64 heads / 8 KV heads, SwiGLU 28672, vocab 128256)
cut to ``--layers`` layers and saved as safetensors, and one stage at its last layers with a 70B search
space: peak GPU memory and tokens/s with every earlier layer streamed from the files, and with all of
them resident (the goals: the stage fits 80 GiB; streaming costs at most 15% of the resident speed).

    python benchmarks/bench_bld.py stream [--layers 12] [--stage-layers 1] [--out bld_stream.json]

``--smoke`` runs ``library`` or ``stream`` at toy sizes on the CPU to check the script before GPU time.
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
from puzzle.context import run_step
from puzzle.distill.bld import StageTrainer, SubBlock, nmse_terms
from puzzle.library import Library
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    build_attention,
    build_ffn,
    expand_search_space,
    parse_name,
    save_pretrained,
)
from puzzle.model.streaming import ParentLayers
from puzzle.planning import bld_step_seconds, plan_stages, trained_blocks
from puzzle.run import create_run
from puzzle.store import open_store
from puzzle.training import Part, Schedule, Trainer, adamw


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
    print(f"\nwall: {result['wall_seconds']:.1f} s for {len(units)} units")
    return result


# ----- shapes ---------------------------------------------------------------------------------------
LLAMA_8B = {"vocab_size": 128256, "hidden_size": 4096, "num_attention_heads": 32, "head_dim": 128,
            "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
            "tie_word_embeddings": False}
BLOCK_8B = BlockConfig(AttentionVariant.gqa(4), FFNVariant.exact(14336))  # 8 KV heads, SwiGLU 14336
# The paper-like search space: fewer KV heads, linear and no-op attention; FFN widths 10%-57% of the parent's
SPACE_8B = {"attention": {"n_heads_in_group": [4, 8, 16, 32]},
            "ffn": {"ffn_mult": [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]}}

LLAMA_70B = {"vocab_size": 128256, "hidden_size": 8192, "num_attention_heads": 64, "head_dim": 128,
             "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
             "tie_word_embeddings": False}
BLOCK_70B = BlockConfig(AttentionVariant.gqa(8), FFNVariant.exact(28672))
SPACE_70B = {"attention": {"n_heads_in_group": [8, 16, 32]},
             "ffn": {"ffn_mult": [1.0, 2.0, 3.0]}}

SMOKE = {"vocab_size": 512, "hidden_size": 128, "num_attention_heads": 8, "head_dim": 16,
         "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 4096, "tie_word_embeddings": False}
BLOCK_SMOKE = BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(448))


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


def random_parent(cfg: ModelConfig, device: str, dtype: torch.dtype, out: Path | None) -> DeciLMForCausalLM | None:
    """Random weights at Llama's init scale (std 0.02), norms at one; saved to ``out`` (then freed) or returned."""
    torch.manual_seed(0)
    with torch.device(device):
        model = DeciLMForCausalLM(cfg).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.02)
    model.requires_grad_(False)
    if out is None:
        return model.eval()
    save_pretrained(model, out, max_shard_bytes=4 * 2**30)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return None


def _config(root: Path, parent_uri: str, space: dict, seq: int, batch: int, steps: int, gpu_mem: float,
            dtype: str, host_gib: float = 64.0) -> object:
    return parse_config({
        "name": "bench",
        "parent": {"uri": parent_uri, "dtype": dtype},
        "data": {"distillation_uri": "random", "validation_uri": "random", "seq_len": seq},
        "search_space": space,
        "bld": {"tokens": steps * batch * seq, "batch_size": batch, "lr": 1e-4, "checkpoint_every": 10**6,
                "eval_tokens": batch * seq, "calibration_tokens": seq, "warmup_fraction": 0.0},
        "profile": {"scenarios": [{"name": "gpu-b64", "batch_size": 64, "input_len": 1024, "output_len": 1024,
                                   "dtype": "bfloat16", "device": "cuda"}]},
        "compute": {"gpu_memory_gib": gpu_mem, "host_memory_gib": host_gib},
        "store": {"uri": f"file://{root}/runs"},
    })


class _Clock:
    """Wall time of GPU work: synchronize, then the host clock (CUDA events around a Python loop)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.t0


def time_stage(parent: ParentLayers, config, entries: list[tuple[int, str]], seqs: torch.Tensor,
               device: torch.device, steps: int, warmup: int = 1) -> dict:
    """Seconds per training step of one stage (the production StageTrainer), after ``warmup`` steps."""
    tr = StageTrainer(parent, config.bld, entries, config.bld.mode, device, seqs, seqs[:1], seqs[:1])
    tr.total_steps = warmup + steps
    t0 = time.perf_counter()
    tr.setup(resume=False)
    setup_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tr.trainer.schedule = Schedule(warmup + steps, config.bld.lr)
    from puzzle.data.shards import batch_indices

    batches = batch_indices(len(seqs), config.bld.batch_size, 0)
    loss_fn = tr.losses(batches)
    tr.trainer.train(0, warmup, loss_fn, progress=False)
    with _Clock(device) as c:
        tr.trainer.train(warmup, warmup + steps, loss_fn, progress=False)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    n_params = sum(p.numel() for e in tr.entries for p in e.block.parameters())
    del tr
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_s": c.seconds / steps, "setup_s": setup_s, "peak_gib": peak, "trained_params": n_params}


def time_parent_layer(parent: ParentLayers, seqs: torch.Tensor, batch: int, device: torch.device,
                      repeats: int = 3) -> float:
    """Seconds of one parent layer's forward (no grad) on one batch, layer 0 resident."""
    ids = seqs[:batch].to(device)
    sk = parent.skeleton
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        h = sk.embed(ids)
        rope = sk.attention_inputs(h)
        layer = parent.layer(0)
        layer.ffn_sublayer(layer.attn_sublayer(h, *rope))
        with _Clock(device) as c:
            for _ in range(repeats):
                layer.ffn_sublayer(layer.attn_sublayer(h, *rope))
    return c.seconds / repeats


def time_block_alone(name: str, cfg: ModelConfig, config, device: torch.device, batch: int, seq: int,
                     steps: int = 3) -> float:
    """Seconds of one training step of one block with its input and target fixed (no parent pass)."""
    attn = ffn = None
    for v in parse_name(name, cfg.hidden_size):
        if isinstance(v, AttentionVariant):
            attn = build_attention(v, cfg)
        else:
            ffn = build_ffn(v, cfg)
    from puzzle.model import RMSNorm

    block = SubBlock(attn, RMSNorm(cfg.hidden_size, 1e-5) if attn else None,
                     ffn, RMSNorm(cfg.hidden_size, 1e-5) if ffn else None).to(device, torch.float32)
    params = list(block.parameters())
    if not params:
        return 0.0
    cuda = device.type == "cuda"
    part = Part("b", block, adamw(params, 1e-4, fused=cuda or None), 1.0)
    trainer = Trainer({"b": part}, Schedule(100, 1e-4), device, autocast=cuda)
    x = torch.randn(batch, seq, cfg.hidden_size, device=device, dtype=torch.bfloat16 if cuda else torch.float32)
    t = torch.randn_like(x)
    sk = DeciLMForCausalLM(ModelConfig(block_configs=[], **{k: getattr(cfg, k) for k in (
        "vocab_size", "hidden_size", "num_attention_heads", "head_dim", "rope_theta")})).to(device)
    rope = sk.attention_inputs(x)

    def loss_fn(step: int):
        with trainer.autocast():
            y = block(x, *rope)
        n, d = nmse_terms(y, t)
        yield "b", n / d

    trainer.train(0, 1, loss_fn, progress=False)
    with _Clock(device) as c:
        trainer.train(1, 1 + steps, loss_fn, progress=False)
    return c.seconds / steps


# ----- GPU: the whole library of an 8B-shaped parent ------------------------------------------------
def bench_library(args: argparse.Namespace) -> dict:
    smoke = args.smoke
    shape, block = (SMOKE, BLOCK_SMOKE) if smoke else (LLAMA_8B, BLOCK_8B)
    space = ({"attention": {"n_heads_in_group": [2, 4, 8]}, "ffn": {"ffn_mult": [1.0, 2.0]}} if smoke else SPACE_8B)
    device = torch.device("cpu" if smoke else "cuda")
    layers = args.layers or (4 if smoke else 32)
    B, T = (2, 64) if smoke else (args.batch_size, args.seq_len)
    peak = float("nan") if smoke else matmul_peak_tflops()
    cfg = ModelConfig(block_configs=[block] * layers, **shape)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-bld-lib-"))
    parent_dir = root / "parent"
    t = time.time()
    random_parent(cfg, device.type, torch.bfloat16 if not smoke else torch.float32, parent_dir)
    print(f"random parent ({layers} layers) saved in {time.time() - t:.1f} s", file=sys.stderr)
    dtype = "float32" if smoke else "bfloat16"
    config = _config(root, str(parent_dir), space, T, B, args.steps, args.gpu_memory_gib, dtype)
    attn, ffn = expand_search_space(config.search_space, cfg)
    attention, ffns = [v.name for v in attn], [v.name for v in ffn]
    stages = plan_stages(config, cfg, attention, ffns)
    print(f"planned {len(stages)} stages for {args.gpu_memory_gib} GiB: "
          + ", ".join(f"{p.id} ({p.memory_bytes / 2**30:.0f} GiB planned)" for p in stages), file=sys.stderr)
    rng = np.random.default_rng(0)
    seqs = torch.from_numpy(rng.integers(0, cfg.vocab_size, (max(4 * B, 8), T)).astype(np.int64))
    tdt = torch.bfloat16 if not smoke else torch.float32
    # components and the old units with the whole parent resident; each stage as its plan says
    parent = ParentLayers(parent_dir, cfg, tdt, device, resident=range(layers), host_cache_bytes=0)
    tokens_per_step = B * T
    per_m = 1e6 / tokens_per_step  # steps per million tokens

    # after: every planned stage, measured
    after = []
    parent.close()
    del parent
    if device.type == "cuda":
        torch.cuda.empty_cache()
    for p in stages:
        entries = [(i, n) for i in range(p.start, p.end) for n in trained_blocks(config, cfg, attention, ffns, i)
                   if n in p.blocks]
        staged = ParentLayers(parent_dir, cfg, tdt, device, resident=p.resident_layers,
                              host_cache_bytes=int(args.host_cache_gib * 2**30))
        r = time_stage(staged, config, entries, seqs, device, args.steps, warmup=args.warmup)
        r["streamed_layers"] = p.streamed_layers
        staged.close()
        del staged
        if device.type == "cuda":
            torch.cuda.empty_cache()
        est = bld_step_seconds(p, config) if not smoke else float("nan")
        after.append({"stage": p.id, "entries": len(entries), **r, "planned_gib": p.memory_bytes / 2**30,
                      "estimated_step_s": est, "flops_per_token": p.flops_per_token,
                      "mfu": (p.flops_per_token * tokens_per_step / r["step_s"] / 1e12) / peak})
        print(f"after {p.id}: {r['step_s']:.3f} s/step, peak {r['peak_gib']:.1f} GiB "
              f"(planned {p.memory_bytes / 2**30:.1f}), {p.streamed_layers} layers streamed, "
              f"estimate {est:.3f} s", file=sys.stderr)
    after_s = per_m * sum(a["step_s"] for a in after)

    # components: one parent layer forward, each variant trained alone
    parent = ParentLayers(parent_dir, cfg, tdt, device, resident=range(layers), host_cache_bytes=0)
    layer_fwd = time_parent_layer(parent, seqs, B, device)
    variants = trained_blocks(config, cfg, attention, ffns, 0)
    alone = {n: time_block_alone(n, cfg, config, device, B, T) for n in variants}
    floor_s = per_m * (layers * layer_fwd + layers * sum(alone.values()))

    # before: one variant x 2 layers per unit, the parent re-run from layer 0; measured at three places
    old_units = []
    probe = [n for n in variants if not n.endswith("noop")][:2]
    for name in probe:
        for a in sorted({0, layers // 2 - 1, layers - 2}):
            r = time_stage(parent, config, [(a, name), (a + 1, name)], seqs, device, args.steps)
            model_s = (a + 2) * layer_fwd + 2 * alone[name]
            old_units.append({"variant": name, "layers": [a, a + 2], "step_s": r["step_s"], "model_step_s": model_s})
            print(f"before {name} l{a:03d}-{a + 2:03d}: {r['step_s']:.3f} s/step (components: {model_s:.3f})",
                  file=sys.stderr)
    ranges = [(a, min(a + 2, layers)) for a in range(0, layers, 2)]
    before_s = per_m * sum(b * layer_fwd + (b - a) * alone[n] for n in variants if not n.endswith("noop")
                           for a, b in ranges)
    fidelity = [u["step_s"] / u["model_step_s"] for u in old_units]
    out = {
        "device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)", "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "matmul_peak_tflops": peak,
        "layers": layers, "batch": B, "seq_len": T, "search_space": space, "gpu_memory_gib": args.gpu_memory_gib,
        "stages": after, "parent_layer_forward_s": layer_fwd, "block_alone_step_s": alone,
        "gpu_seconds_per_million_tokens": {"after": after_s, "before": before_s, "floor": floor_s},
        "after_over_floor": after_s / floor_s, "before_over_floor": before_s / floor_s,
        "old_units_measured": old_units, "old_unit_component_model_error": fidelity,
    }
    print(f"\nwhole library per 1M tokens: after {after_s:,.0f} GPU-s, before {before_s:,.0f} GPU-s, "
          f"floor {floor_s:,.0f} GPU-s")
    print(f"after/floor {after_s / floor_s:.2f} (goal <= 1.5), before/floor {before_s / floor_s:.1f}, "
          f"speedup {before_s / after_s:.1f}x")
    print("| stage | blocks | streamed layers | s/step | estimated s/step | est/meas | peak GiB | planned GiB | MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for a in after:
        print(f"| {a['stage']} | {a['entries']} | {a['streamed_layers']} | {a['step_s']:.3f} | "
              f"{a['estimated_step_s']:.3f} | {a['estimated_step_s'] / a['step_s']:.2f} | {a['peak_gib']:.1f} | "
              f"{a['planned_gib']:.1f} | {a['mfu']:.1%} |")
    parent.close()
    return out


# ----- GPU: a 70B-shaped stage, parent streamed vs resident ------------------------------------------
def bench_stream(args: argparse.Namespace) -> dict:
    smoke = args.smoke
    shape, block = (SMOKE, BLOCK_SMOKE) if smoke else (LLAMA_70B, BLOCK_70B)
    space = ({"attention": {"n_heads_in_group": [2, 4]}, "ffn": {"ffn_mult": [1.0]}} if smoke else SPACE_70B)
    device = torch.device("cpu" if smoke else "cuda")
    layers = args.layers or (4 if smoke else 12)
    B, T = (2, 64) if smoke else (args.batch_size, args.seq_len)
    cfg = ModelConfig(block_configs=[block] * layers, **shape)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-bld-stream-"))
    parent_dir = root / "parent"
    t = time.time()
    dt = torch.float32 if smoke else torch.bfloat16
    random_parent(cfg, device.type, dt, parent_dir)
    size = sum(f.stat().st_size for f in parent_dir.glob("*.safetensors"))
    print(f"random {layers}-layer 70B-shaped parent: {size / 2**30:.1f} GiB saved in {time.time() - t:.1f} s",
          file=sys.stderr)
    config = _config(root, str(parent_dir), space, T, B, args.steps, 80.0, "float32" if smoke else "bfloat16")
    attn, ffn = expand_search_space(config.search_space, cfg)
    attention, ffns = [v.name for v in attn], [v.name for v in ffn]
    start = layers - args.stage_layers
    entries = [(i, n) for i in range(start, layers) for n in trained_blocks(config, cfg, attention, ffns, i)]
    rng = np.random.default_rng(0)
    seqs = torch.from_numpy(rng.integers(0, cfg.vocab_size, (max(4 * B, 8), T)).astype(np.int64))
    rows = {}
    for mode, resident in (("streamed", range(start, layers)), ("resident", range(layers))):
        parent = ParentLayers(parent_dir, cfg, dt, device, resident=resident,
                              host_cache_bytes=int(args.host_cache_gib * 2**30))
        r = time_stage(parent, config, entries, seqs, device, args.steps, warmup=args.warmup)
        r["tokens_per_s"] = B * T / r["step_s"]
        r["streamed_loads"] = parent.streamed_loads
        rows[mode] = r
        parent.close()
        del parent
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"{mode}: {r['tokens_per_s']:,.0f} tokens/s, {r['step_s']:.3f} s/step, peak {r['peak_gib']:.1f} GiB",
              file=sys.stderr)
    slow = 1 - rows["streamed"]["tokens_per_s"] / rows["resident"]["tokens_per_s"]
    out = {"device": torch.cuda.get_device_name() if not smoke else "cpu (smoke)", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "layers": layers,
           "stage": [start, layers], "entries": [f"{i}/{n}" for i, n in entries], "batch": B, "seq_len": T,
           "parent_file_gib": size / 2**30, "rows": rows, "streaming_cost": slow}
    print(f"\n70B-shaped stage {start}-{layers} of a {layers}-layer cut ({len(entries)} blocks, {size / 2**30:.1f} GiB "
          f"of parent files), batch {B} x {T}:")
    print("| parent | tokens/s | s/step | peak GPU GiB |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {r['tokens_per_s']:,.0f} | {r['step_s']:.3f} | {r['peak_gib']:.1f} |")
    print(f"streaming costs {slow:.1%} of the resident throughput (goal <= 15%); streamed peak "
          f"{rows['streamed']['peak_gib']:.1f} GiB (goal <= 80)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("cpu", help="the tiny parent's whole library on CPU")
    c.add_argument("--config", default="examples/tiny/puzzle.yaml")
    c.add_argument("--threads", type=int, default=1)
    c.add_argument("--out", type=Path)
    for name, helptext in (("library", "whole-library GPU-seconds vs the floor, 8B shape"),
                           ("stream", "a 70B-shaped stage, parent streamed vs resident")):
        g = sub.add_parser(name, help=helptext)
        g.add_argument("--batch-size", type=int, default=8)
        g.add_argument("--seq-len", type=int, default=4096)
        g.add_argument("--steps", type=int, default=3)
        g.add_argument("--warmup", type=int, default=1)
        g.add_argument("--layers", type=int, default=None)
        g.add_argument("--gpu-memory-gib", type=float, default=80.0)
        g.add_argument("--stage-layers", type=int, default=1)
        g.add_argument("--host-cache-gib", type=float, default=64.0)
        g.add_argument("--workdir", default=None)
        g.add_argument("--smoke", action="store_true", help="toy shapes on CPU: check the script, measure nothing")
        g.add_argument("--out", type=Path)
    args = p.parse_args()
    result = {"cpu": bench_cpu, "library": bench_library, "stream": bench_stream}[args.mode](args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=float) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

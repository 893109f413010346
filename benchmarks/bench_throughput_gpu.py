"""Fidelity of the throughput model on a GPU: predicted vs measured tokens/s of a Llama-3.1-8B-shaped
parent and heterogeneous children, and how close the measuring method is to the hardware floors.

The parent: hidden 4096, 32 layers, 32 heads of 128, 8 KV heads (n_heads_in_group 4), SwiGLU
intermediate 14336, vocab 128256, untied head, random weights, bf16. Scenarios: batch 64 and batch 1,
1024 tokens in, 1024 out, on ``cuda``. Steps:

1. the machine's floors: device-to-device copy bandwidth (bytes read + written per second) and the
   bf16 matmul rate (8192^3 GEMMs);
2. the profile of every variant the children use, through ``puzzle.profiling.profiler.profile_unit``
   (exactly what the ``profile`` step writes), per scenario;
3. per model (parent + 3 children): ``predict`` from the profiles, ``measure_throughput`` on the real
   model, the error; the measured mean decode step against (weights + KV bytes read) / copy bandwidth
   and the prefill against its FLOPs / matmul rate.

Goals: |error| <= 3% everywhere; decode step <= 1.5x its bandwidth floor; prefill <= 1.5x its FLOP floor.

    python benchmarks/bench_throughput_gpu.py [--layers 32] [--output-len 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import time

import torch
from puzzle.config import ProfileConfig, Scenario
from puzzle.model import AttentionVariant as A
from puzzle.model import BlockConfig, DeciLMForCausalLM, ModelConfig, model_counts
from puzzle.model import FFNVariant as F
from puzzle.model.counts import dtype_bytes
from puzzle.profiling.bench import measure_throughput
from puzzle.profiling.engine import attended_length, decode_bucket, decode_contexts
from puzzle.profiling.profiler import profile_unit
from puzzle.profiling.throughput import ScenarioProfile, predict

ATTN = [A.gqa(4), A.gqa(8), A.gqa(32), A.linear(), A.noop()]
FFN = [F.exact(14336), F.exact(7168), F.exact(3584), F.linear(), F.noop()]


def parent_config(layers: int) -> ModelConfig:
    return ModelConfig(
        vocab_size=128256, hidden_size=4096, num_attention_heads=32, head_dim=128,
        block_configs=[BlockConfig(A.gqa(4), F.exact(14336))] * layers, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, torch_dtype="bfloat16",
    )


def children(layers: int) -> dict[str, list[BlockConfig]]:
    """Three heterogeneous children: mixed attention and FFN variants in every pattern."""
    mixed = [BlockConfig(ATTN[i % 5], FFN[(i * 2 + 1) % 5]) for i in range(layers)]
    ffn_cut = [BlockConfig(A.gqa(4) if i % 3 else A.gqa(8), FFN[i % 3]) for i in range(layers)]
    deep_cut = [BlockConfig(A.noop() if 0 < i < layers - 1 and i % 2 else A.gqa(8),
                            F.exact(7168) if i % 4 else F.exact(14336)) for i in range(layers)]
    return {"child-mixed": mixed, "child-ffn-cut": ffn_cut, "child-attn-drop": deep_cut}


@torch.no_grad()
def random_model(cfg: ModelConfig) -> DeciLMForCausalLM:
    with torch.device("meta"):
        m = DeciLMForCausalLM(cfg)
    m = m.to_empty(device="cuda").to(torch.bfloat16)
    for name, p in m.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02)
    from puzzle.model.modeling import rope_inv_freq

    m.model.inv_freq = rope_inv_freq(cfg).cuda()
    return m.eval()


def copy_bandwidth(gib: float = 4.0, repeats: int = 20) -> float:
    """Bytes/s of a device-to-device copy (read + write counted)."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(repeats):
        b.copy_(a)
    e.record()
    e.synchronize()
    t = s.elapsed_time(e) / 1e3 / repeats
    del a, b
    return 2 * n * 2 / t


def matmul_rate(n: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(repeats):
        a @ b
    e.record()
    e.synchronize()
    return 2 * n**3 * repeats / (s.elapsed_time(e) / 1e3)


def floors(cfg: ModelConfig, sc: Scenario, bw: float, rate: float) -> dict[str, float]:
    """Decode: bytes of weights (without the embedding table, of which a step reads B rows) plus the KV
    cache read at each step's context, over the copy bandwidth, per step on average. Prefill: matmul
    FLOPs of every layer on B*T tokens, causal attention, lm_head on the last position, over the rate."""
    counts = model_counts(cfg)
    B, T, O = sc.batch_size, sc.input_len, sc.output_len
    nbytes = dtype_bytes(sc.dtype)
    blocks = [c for pair in counts.per_layer for c in pair]
    weights = sum(c.params for c in blocks) * nbytes + (counts.non_block.head_params + cfg.hidden_size) * nbytes
    ctx = decode_contexts(T, O)
    kv_per_token = sum(c.kv_cache_bytes(B, 1, sc.dtype) for c in blocks)
    mean_ctx = sum(c + 1 for c in ctx) / len(ctx)
    step_floor = (weights + kv_per_token * mean_ctx) / bw
    bucket = decode_bucket("cuda")
    mean_att = sum(attended_length(c, T + O, bucket) for c in ctx) / len(ctx)
    flops = sum(c.prefill_flops(B, T) for c in blocks) + 2 * counts.non_block.head_params * B
    return {"decode_step_floor_s": step_floor, "decode_step_floor_at_bucket_s": (weights + kv_per_token * mean_att) / bw,
            "prefill_floor_s": flops / rate, "prefill_flops": flops, "weights_read_bytes": weights,
            "kv_read_bytes_mean": kv_per_token * mean_ctx}


@torch.no_grad()
def kernel_table(cfg: ModelConfig, batch: int, context: int) -> list[dict]:
    """Kernels of one eager decode step of the parent's attention and FFN blocks (torch.profiler), to
    see where the time over the bandwidth floor goes."""
    from puzzle.model import build_attention, build_ffn
    from puzzle.model.modeling import RMSNorm, rope_inv_freq
    from puzzle.profiling.engine import AttnBlock, FFNBlock, decode_bias, rope_tables
    from torch.profiler import ProfilerActivity, profile

    dev = torch.device("cuda")
    att = AttnBlock(RMSNorm(4096, 1e-5).to(dev, torch.bfloat16), build_attention(A.gqa(4), cfg).to(dev, torch.bfloat16),
                    batch, 2048)
    ffn = FFNBlock(RMSNorm(4096, 1e-5).to(dev, torch.bfloat16), build_ffn(F.exact(14336), cfg).to(dev, torch.bfloat16))
    pos = torch.tensor([context], device=dev)
    L = attended_length(context, 2048, 64)
    rope = rope_tables(rope_inv_freq(cfg).to(dev), pos.expand(batch, 1), torch.bfloat16)
    bias = decode_bias(pos, L, torch.bfloat16)
    h = torch.randn(batch, 1, 4096, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        ffn(att.decode(h, rope, pos, bias))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            ffn(att.decode(h, rope, pos, bias))
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_time_total > 0:
            rows.append({"kernel": e.key[:90], "calls_per_step": e.count / 10, "us_per_step": e.device_time_total / 10})
    rows.sort(key=lambda r: -r["us_per_step"])
    print(f"kernels of one eager attn_g4 + ffn_i14336 decode step, batch {batch}, context {context}: "
          f"{sum(r['calls_per_step'] for r in rows):.0f} kernels, {sum(r['us_per_step'] for r in rows):.1f} us of GPU time")
    for r in rows:
        print(f"   {r['us_per_step']:8.1f} us  x{r['calls_per_step']:.0f}  {r['kernel']}")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=1024)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--repeats", type=int, default=2, help="whole generations timed per model and scenario")
    ap.add_argument("--profile-repeats", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    t_start = time.time()
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                 "date": _dt.datetime.now(_dt.UTC).isoformat(), "layers": args.layers, "args": vars(args)}
    bw, rate = copy_bandwidth(), matmul_rate()
    out["copy_bandwidth_Bps"], out["bf16_matmul_flops"] = bw, rate
    print(f"{out['device']}  copy {bw / 1e12:.2f} TB/s  bf16 matmul {rate / 1e12:.0f} TFLOP/s", flush=True)
    cfg = parent_config(args.layers)
    out["kernels"] = {f"b{b}": kernel_table(cfg, b, args.input_len + 100) for b in args.batches}
    scenarios = [Scenario(name=f"gpu-b{b}", batch_size=b, input_len=args.input_len, output_len=args.output_len,
                          dtype="bfloat16", device="cuda") for b in args.batches]
    settings = ProfileConfig(scenarios=scenarios, warmup=3, repeats=args.profile_repeats, decode_points=5)
    profiles: dict[str, ScenarioProfile] = {}
    out["profiles"] = {}
    for sc in scenarios:
        recs = []
        t0 = time.time()
        for kind, variants in (("attention", ATTN), ("ffn", FFN), ("non_block", [None])):
            for v in variants:
                name = "non_block" if v is None else v.name
                rec = profile_unit(cfg, kind, name, sc, settings)
                recs.append(rec)
                torch.cuda.empty_cache()
                print(f"  profile {sc.name} {name:12s} prefill {rec['prefill_s'] * 1e3:8.3f} ms  decode/step "
                      f"{rec['decode_step_s'] * 1e6:8.1f} us  replicas {rec['method'].get('replicas')}", flush=True)
        profiles[sc.name] = ScenarioProfile(recs)
        out["profiles"][sc.name] = recs
        print(f"profiled {sc.name} in {time.time() - t0:.1f} s", flush=True)
    models = {"parent": cfg.block_configs, **children(args.layers)}
    out["models"] = {}
    for mname, blocks in models.items():
        mcfg = cfg.with_blocks(blocks)
        t0 = time.time()
        model = random_model(mcfg)
        res = {}
        for sc in scenarios:
            pred = predict(profiles[sc.name], blocks)
            meas = measure_throughput(model, sc, warmup=1, repeats=args.repeats)
            fl = floors(mcfg, sc, bw, rate)
            err = pred.tokens_per_s / meas.tokens_per_s - 1
            res[sc.name] = {"predicted": pred.to_dict(), "measured": meas.to_dict(), "error": err,
                            "prefill_error": pred.prefill_s / meas.prefill_s - 1,
                            "decode_error": pred.decode_s / meas.decode_s - 1, **fl,
                            "decode_step_vs_floor": meas.decode_step_s / fl["decode_step_floor_s"],
                            "prefill_vs_floor": meas.prefill_s / fl["prefill_floor_s"]}
            print(f"{mname:16s} {sc.name:9s} predicted {pred.tokens_per_s:10.1f} tok/s  measured "
                  f"{meas.tokens_per_s:10.1f} tok/s  error {err * 100:+6.2f}%  (prefill {pred.prefill_s * 1e3:.2f}/"
                  f"{meas.prefill_s * 1e3:.2f} ms, decode {pred.decode_s:.4f}/{meas.decode_s:.4f} s)  step "
                  f"{meas.decode_step_s * 1e3:.3f} ms = {res[sc.name]['decode_step_vs_floor']:.2f}x floor "
                  f"{fl['decode_step_floor_s'] * 1e3:.3f} ms; prefill {res[sc.name]['prefill_vs_floor']:.2f}x floor "
                  f"{fl['prefill_floor_s'] * 1e3:.2f} ms; spread {meas.total_spread['rel_spread'] * 100:.2f}%", flush=True)
        out["models"][mname] = res
        del model
        torch.cuda.empty_cache()
        print(f"  ({mname}: {time.time() - t0:.1f} s)", flush=True)
    out["wall_s"] = time.time() - t_start
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"done in {out['wall_s']:.1f} s")


if __name__ == "__main__":
    main()

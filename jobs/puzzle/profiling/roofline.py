"""Analytic roofline estimate of a variant's costs, used only when the target device is absent.

Each kernel group is bounded by compute or by memory: time = max(FLOPs / peak, bytes / bandwidth),
with the peak and bandwidth from the config (``profile.estimate_peak_tflops``,
``profile.estimate_bandwidth_gbps``). FLOPs follow ``puzzle.model.counts`` except that the lm_head runs
on the last position only in prefill (as the measured engine does). Bytes: weights once per pass, plus
the KV cache written in prefill and read over the attended length in each decode step, plus the
activations in and out. Every record this module makes carries ``"estimate": true``.
"""

from __future__ import annotations

from puzzle.model import ModelConfig, attention_counts, ffn_counts, non_block_counts
from puzzle.model.counts import Counts, dtype_bytes
from puzzle.profiling.engine import attended_length, decode_bucket, decode_contexts


def _counts(kind: str, variant, cfg: ModelConfig) -> Counts:
    if kind == "attention":
        return attention_counts(variant, cfg)
    if kind == "ffn":
        return ffn_counts(variant, cfg)
    return non_block_counts(cfg)


def estimate_costs(kind: str, variant, cfg: ModelConfig, batch: int, input_len: int, output_len: int,
                   dtype: str, device: str, peak_tflops: float, bandwidth_gbps: float) -> dict:
    """Estimated prefill seconds, decode seconds per sampled context and for the whole generation."""
    c = _counts(kind, variant, cfg)
    nbytes = dtype_bytes(dtype)
    peak, bw = peak_tflops * 1e12, bandwidth_gbps * 1e9
    C = cfg.hidden_size
    max_len = input_len + output_len
    bucket = decode_bucket(device)
    weight = c.params * nbytes
    if kind == "non_block":
        # The embedding gather touches B*T rows, not the table; the head reads its weights once.
        head_bytes = c.head_params * nbytes
        pre_flops = 2 * c.head_params * batch
        pre_bytes = head_bytes + batch * input_len * C * nbytes
        dec_flops = 2 * c.head_params * batch
        dec_bytes_fixed = head_bytes + batch * C * nbytes
        per_slot_bytes = 0
    else:
        pre_flops = c.prefill_flops(batch, input_len)
        pre_bytes = weight + c.kv_cache_bytes(batch, input_len, dtype) + 2 * batch * input_len * C * nbytes
        dec_flops = 2 * c.matmul_params * batch
        dec_bytes_fixed = weight + 2 * batch * C * nbytes
        per_slot_bytes = c.kv_cache_bytes(batch, 1, dtype)
    per_slot_flops = 4 * c.attn_heads * c.head_dim * batch

    def step(context: int) -> float:
        L = attended_length(context, max_len, bucket)
        return max((dec_flops + per_slot_flops * L) / peak, (dec_bytes_fixed + per_slot_bytes * L) / bw)

    steps = [step(ctx) for ctx in decode_contexts(input_len, output_len)]
    return {
        "prefill_s": max(pre_flops / peak, pre_bytes / bw) if weight or kind == "non_block" else 0.0,
        "decode_s": sum(steps) if weight or kind == "non_block" else 0.0,
        "step": step,
        "prefill_flops": pre_flops,
        "prefill_bytes": pre_bytes,
    }

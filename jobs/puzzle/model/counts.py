"""Exact per-variant counts for profiling estimates and the MIP: parameters, weight bytes, FLOPs, KV cache.

Conventions (so numbers are comparable across variants and with hand arithmetic):
- FLOPs count matrix multiplications only, 2 per multiply-add; norms, RoPE, SiLU, softmax and the
  embedding gather are not counted (they are O(T*C), negligible next to the matmuls).
- Prefill of ``batch`` x ``seq_len`` tokens is causal: query t attends to t+1 keys, so QK^T and AV
  together cost 4 * head_dim * num_heads * batch * seq_len * (seq_len + 1) / 2 FLOPs.
- One decode step at ``context_len`` processes one new token per sequence that attends to
  context_len + 1 keys (the cache plus itself).
- The lm_head runs on every position in prefill (as ``forward`` does) and on one token per decode step.
- KV-cache bytes: keys and values of every GQA layer for batch x seq_len tokens at ``dtype``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from puzzle.model.config import ModelConfig
from puzzle.model.variants import AttentionVariant, FFNVariant

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def dtype_bytes(dtype: str | torch.dtype) -> int:
    if isinstance(dtype, torch.dtype):
        return torch.empty((), dtype=dtype).element_size()
    if dtype not in _BYTES:
        raise ValueError(f"dtype: {dtype!r} is not allowed; allowed: {sorted(_BYTES)}")
    return _BYTES[dtype]


@dataclass(frozen=True)
class Counts:
    """Counts of one sub-block variant (or the non-block parts).

    ``matmul_params``: weights that multiply every token (what FLOPs scale with); ``params`` also
    includes norm weights and the embedding table. ``attn_heads``/``kv_heads`` are non-zero for GQA.
    """

    params: int
    matmul_params: int
    attn_heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    head_params: int = 0  # lm_head matmul weights (non-block only); counted separately for decode

    def weight_bytes(self, dtype: str | torch.dtype) -> int:
        return self.params * dtype_bytes(dtype)

    def prefill_flops(self, batch: int, seq_len: int) -> int:
        tokens = batch * seq_len
        attn = 2 * self.attn_heads * self.head_dim * batch * seq_len * (seq_len + 1)
        return 2 * (self.matmul_params + self.head_params) * tokens + attn

    def decode_flops(self, batch: int, context_len: int) -> int:
        attn = 4 * self.attn_heads * self.head_dim * batch * (context_len + 1)
        return 2 * (self.matmul_params + self.head_params) * batch + attn

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype: str | torch.dtype) -> int:
        return 2 * batch * seq_len * self.kv_heads * self.head_dim * dtype_bytes(dtype)


def attention_counts(variant: AttentionVariant, cfg: ModelConfig) -> Counts:
    C, H = cfg.hidden_size, cfg.num_attention_heads
    d = cfg.head_dim
    assert d is not None
    if variant.no_op:
        return Counts(0, 0)
    if variant.replace_with_linear:
        return Counts(C * C + C, C * C)
    kv = variant.num_kv_heads(H)
    mm = C * H * d + 2 * C * kv * d + H * d * C  # q, k, v, o
    return Counts(mm + C, mm, attn_heads=H, kv_heads=kv, head_dim=d)


def ffn_counts(variant: FFNVariant, cfg: ModelConfig) -> Counts:
    C = cfg.hidden_size
    if variant.no_op:
        return Counts(0, 0)
    if variant.replace_with_linear:
        return Counts(C * C + C, C * C)
    assert variant.intermediate_size is not None
    mm = 3 * C * variant.intermediate_size  # gate, up, down
    return Counts(mm + C, mm)


def non_block_counts(cfg: ModelConfig) -> Counts:
    """Embedding, final norm and lm_head (shared with the embedding when tied)."""
    V, C = cfg.vocab_size, cfg.hidden_size
    head = V * C
    params = V * C + C + (0 if cfg.tie_word_embeddings else head)
    return Counts(params, 0, head_params=head)


@dataclass(frozen=True)
class ModelCounts:
    params: int
    per_layer: list[tuple[Counts, Counts]]
    non_block: Counts

    def _all(self) -> list[Counts]:
        return [c for pair in self.per_layer for c in pair] + [self.non_block]

    def weight_bytes(self, dtype: str | torch.dtype) -> int:
        return self.params * dtype_bytes(dtype)

    def prefill_flops(self, batch: int, seq_len: int) -> int:
        return sum(c.prefill_flops(batch, seq_len) for c in self._all())

    def decode_flops(self, batch: int, context_len: int) -> int:
        return sum(c.decode_flops(batch, context_len) for c in self._all())

    def kv_cache_bytes(self, batch: int, seq_len: int, dtype: str | torch.dtype) -> int:
        return sum(c.kv_cache_bytes(batch, seq_len, dtype) for c in self._all())


def model_counts(cfg: ModelConfig) -> ModelCounts:
    per = [(attention_counts(b.attention, cfg), ffn_counts(b.ffn, cfg)) for b in cfg.block_configs]
    nb = non_block_counts(cfg)
    return ModelCounts(sum(a.params + f.params for a, f in per) + nb.params, per, nb)

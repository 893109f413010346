"""The inference path every profile and throughput measurement runs: prefill and decode of a
heterogeneous model with a per-block KV cache, static shapes and (on GPU) CUDA graphs.

Why not ``DeciLMForCausalLM.forward``: it attends over the whole preallocated cache through a boolean
mask and expands K/V with ``repeat_interleave`` every step, so its decode step reads the cache
``n_heads_in_group`` times over, and its cost is that of the cache size rather than of the context.
Profiles taken through it would measure framework overhead, not the architecture. The blocks here use
the same module weights and give the same logits (tests check it), but:

- prefill: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)`` (flash attention on GPU,
  K/V never expanded); the lm_head runs on the last position only, as serving engines do;
- decode: each KV group's queries are one (G, d) x (d, L) matmul against the cache, so keys and
  values are read once; L is the context rounded up to ``decode_bucket`` slots (64 on GPU), so one CUDA
  graph serves 64 consecutive steps and the step cost follows the context, not the cache capacity.

The same :class:`AttnBlock` / :class:`FFNBlock` / :class:`NonBlock` objects are timed one at a time by
the profiler and together by :class:`InferenceEngine`, which is what lets a sum of block costs predict
the whole model.
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.model import DeciLMForCausalLM, GQAttention, LinearAttention
from puzzle.model.modeling import RMSNorm

CUDA_DECODE_BUCKET = 64


def decode_bucket(device: torch.device | str) -> int:
    """Slots a decode step's attended length is rounded up to: 64 on GPU (one CUDA graph per 64
    steps), 1 on CPU (eager, no graphs, so the exact length costs nothing extra)."""
    return CUDA_DECODE_BUCKET if torch.device(device).type == "cuda" else 1


def attended_length(context: int, max_len: int, bucket: int) -> int:
    """Cache slots the decode step at ``context`` reads: the step writes slot ``context`` and attends to
    slots 0..context, rounded up to the bucket, never past the cache."""
    n = context + 1
    return min(max_len, -(-n // bucket) * bucket)


def decode_contexts(input_len: int, output_len: int) -> range:
    """Contexts of the decode steps of one generation: prefill yields the first output token, then
    ``output_len - 1`` steps each consume the newest token at positions input_len .. input_len+output_len-2."""
    return range(input_len, input_len + output_len - 1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (x2, x1) along the last dim: with a sign-folded sin this is Llama's rotate_half in
    one kernel instead of three (neg, cat)."""
    d = x.shape[-1]
    return x.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)


def _rms_norm(norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    # One fused kernel (fp32 statistics) instead of Llama's seven; in half precision it rounds once
    # where Llama rounds before and after the weight, a difference far below what timing can see.
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)


@dataclass
class Rope:
    """Rotary tables of one pass, each (B, 1, T, d): ``sin`` carries rotate_half's sign; the ``q_``
    tables also carry attention's 1/sqrt(d), so scores need no separate scaling kernel."""

    cos: torch.Tensor
    sin: torch.Tensor
    q_cos: torch.Tensor
    q_sin: torch.Tensor


def rope_tables(inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype) -> Rope:
    """Rope for position_ids (B, T): the model's rotary embedding (Llama's cos/sin)."""
    freqs = position_ids.float().unsqueeze(-1) * inv_freq  # (B, T, d/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
    d = emb.shape[-1]
    sign = torch.ones(d, device=emb.device)
    sign[: d // 2] = -1.0
    cos, sin = emb.cos().unsqueeze(1), (emb.sin() * sign).unsqueeze(1)  # (B, 1, T, d)
    scale = 1.0 / math.sqrt(d)
    return Rope(cos.to(dtype), sin.to(dtype), (cos * scale).to(dtype), (sin * scale).to(dtype))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.addcmul(x * cos, _swap_halves(x), sin)


def decode_bias(pos: torch.Tensor, attended: int, dtype: torch.dtype) -> torch.Tensor:
    """(attended,) additive mask of a decode step: 0 for slots <= pos, -inf after."""
    slots = torch.arange(attended, device=pos.device)
    return torch.zeros(attended, device=pos.device, dtype=dtype).masked_fill(slots > pos, float("-inf"))


class AttnBlock:
    """One attention sub-layer ``h + attn(norm(h))`` (GQA or linear) with its own KV cache.

    GQA caches keys/values as (B, n_kv, max_len, d); a linear replacement has none.
    """

    def __init__(self, norm: RMSNorm, attn: nn.Module, batch: int, max_len: int) -> None:
        self.norm, self.attn = norm, attn
        self.gqa = isinstance(attn, GQAttention)
        if not (self.gqa or isinstance(attn, LinearAttention)):
            raise TypeError(f"AttnBlock: {type(attn).__name__} is not a GQAttention or LinearAttention")
        self.kc = self.vc = None
        if self.gqa:
            w = attn.q_proj.weight
            shape = (batch, attn.n_kv, max_len, attn.head_dim)
            self.kc = torch.zeros(shape, dtype=w.dtype, device=w.device)
            self.vc = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def kv_bytes(self) -> int:
        if self.kc is None:
            return 0
        return 2 * self.kc.numel() * self.kc.element_size()

    def prefill(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        """h (B, T, C); fills cache slots 0..T-1."""
        x = _rms_norm(self.norm, h)
        if not self.gqa:
            return h + self.attn.linear_attn(x)
        a = self.attn
        B, T, _ = x.shape
        q = a.q_proj(x).view(B, T, a.n_heads, a.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = a.k_proj(x).view(B, T, a.n_kv, a.head_dim).transpose(1, 2)  # (B, KV, T, d)
        v = a.v_proj(x).view(B, T, a.n_kv, a.head_dim).transpose(1, 2)  # (B, KV, T, d)
        q = _rotate(q, rope.q_cos, rope.q_sin)  # pre-scaled by 1/sqrt(d)
        k = _rotate(k, rope.cos, rope.sin)
        self.kc[:, :, :T].copy_(k)
        self.vc[:, :, :T].copy_(v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0,
                                           enable_gqa=a.n_kv != a.n_heads)  # (B, H, T, d)
        return h + a.o_proj(y.transpose(1, 2).reshape(B, T, a.n_heads * a.head_dim))

    def decode(self, h: torch.Tensor, rope: Rope, pos: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One step: h (B, 1, C), rope tables (B, 1, 1, d), pos (1,) the slot written, bias (L,) 0 for
        slots <= pos and -inf after; attends to cache slots 0..L-1."""
        x = _rms_norm(self.norm, h)
        if not self.gqa:
            return h + self.attn.linear_attn(x)
        a = self.attn
        B = x.shape[0]
        G, L, KV, d = a.n_heads_in_group, bias.shape[0], a.n_kv, a.head_dim
        q = a.q_proj(x).view(B, KV, G, d)  # (B, KV, G, d): query head i uses kv head i // G
        k = a.k_proj(x).view(B, KV, 1, d)  # (B, KV, 1, d)
        v = a.v_proj(x).view(B, KV, 1, d)
        q = _rotate(q, rope.q_cos, rope.q_sin)
        k = _rotate(k, rope.cos, rope.sin)
        self.kc.index_copy_(2, pos, k)
        self.vc.index_copy_(2, pos, v)
        keys = self.kc[:, :, :L].reshape(B * KV, L, d)  # a view: (B, KV) merge without a copy
        vals = self.vc[:, :, :L].reshape(B * KV, L, d)
        s = torch.baddbmm(bias.expand(B * KV, G, L), q.reshape(B * KV, G, d), keys.transpose(1, 2))  # (B*KV, G, L)
        p = torch.softmax(s, dim=-1, dtype=torch.float32).to(v.dtype)  # fp32 softmax, as Llama's eager attention
        y = torch.bmm(p, vals)  # (B*KV, G, d)
        return h + a.o_proj(y.reshape(B, 1, a.n_heads * d))


class FFNBlock:
    """One FFN sub-layer ``h + ffn(norm(h))`` (SwiGLU or linear); same code for prefill and decode."""

    def __init__(self, norm: RMSNorm, mlp: nn.Module) -> None:
        self.norm, self.mlp = norm, mlp

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.mlp(_rms_norm(self.norm, h))


class NonBlock:
    """Embedding, rotary tables, decode mask, final norm, lm_head and the greedy pick: everything a
    step does outside the layers (the profile's ``non_block`` unit)."""

    def __init__(self, embed: nn.Embedding, norm: RMSNorm, lm_head: nn.Linear, inv_freq: torch.Tensor) -> None:
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        self.inv_freq = inv_freq.to(embed.weight.device)
        self.dtype = embed.weight.dtype

    def prefill_in(self, ids: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """ids (B, T) -> h (B, T, C), rope tables (B, 1, T, d)."""
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device).expand(B, T)
        return self.embed(ids), rope_tables(self.inv_freq, pos, self.dtype)

    def decode_in(self, tok: torch.Tensor, pos: torch.Tensor, attended: int
                  ) -> tuple[torch.Tensor, Rope, torch.Tensor]:
        """tok (B, 1), pos (1,) -> h (B, 1, C), rope tables (B, 1, 1, d), bias (attended,)."""
        B = tok.shape[0]
        rope = rope_tables(self.inv_freq, pos.expand(B, 1), self.dtype)
        return self.embed(tok), rope, decode_bias(pos, attended, self.dtype)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) -> logits of the last position (B, V)."""
        return self.lm_head(_rms_norm(self.norm, h[:, -1]))

    def out(self, h: torch.Tensor, tok: torch.Tensor) -> None:
        """Greedy next token of the last position into ``tok`` (B, 1), in place (static for graphs)."""
        tok.copy_(self.logits(h).argmax(-1, keepdim=True))


def model_blocks(model: DeciLMForCausalLM, batch: int, max_len: int
                 ) -> tuple[NonBlock, list[tuple[AttnBlock | None, FFNBlock | None]]]:
    """Blocks of ``model`` sharing its weights, with a fresh KV cache of (batch, max_len)."""
    layers = []
    for layer in model.model.layers:
        a = AttnBlock(layer.input_layernorm, layer.self_attn, batch, max_len) if layer.self_attn is not None else None
        f = FFNBlock(layer.post_attention_layernorm, layer.mlp) if layer.mlp is not None else None
        layers.append((a, f))
    nb = NonBlock(model.model.embed_tokens, model.model.norm, model.lm_head, model.model.inv_freq)
    return nb, layers


class Graphed:
    """``fn`` captured once in a CUDA graph (after a warm-up on a side stream) when ``enabled`` and on
    GPU; otherwise called eagerly. ``pool`` shares one memory pool among graphs run one at a time."""

    def __init__(self, fn: Callable[[], object], device: torch.device, enabled: bool, pool=None,
                 before_capture: Callable[[], object] | None = None) -> None:
        self.fn = fn
        self.graph = None
        if enabled and device.type == "cuda":
            s = torch.cuda.Stream(device)
            s.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(s):
                fn()  # warm-up: lazy inits and cuBLAS workspaces happen outside the capture
            torch.cuda.current_stream(device).wait_stream(s)
            if before_capture is not None:
                before_capture()
            self.graph = torch.cuda.CUDAGraph()
            # A graph freed by the cyclic GC in the middle of a capture (an old engine's, say) resets
            # itself, which CUDA forbids while capturing and which invalidates this capture.
            gc.collect()
            gc.disable()
            try:
                with torch.cuda.graph(self.graph, pool=pool):
                    fn()
            finally:
                gc.enable()

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()


class InferenceEngine:
    """Greedy generation of a batch with static shapes: ``prefill`` (B, input_len) then ``decode`` steps.

    ``capture(input_len, output_len)`` builds every CUDA graph the generation needs (the prefill and
    one decode graph per attended-length bucket) before anything is timed.
    """

    def __init__(self, model: DeciLMForCausalLM, batch: int, max_len: int, cuda_graphs: bool = True) -> None:
        self.model = model
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.batch, self.max_len = batch, max_len
        self.nb, self.layers = model_blocks(model, batch, max_len)
        self.bucket = decode_bucket(self.device)
        self.use_graphs = cuda_graphs and self.device.type == "cuda"
        self.pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self.ids = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.tok = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self.pos = torch.zeros(1, dtype=torch.long, device=self.device)
        self._prefill: Graphed | None = None
        self._decode: dict[int, Graphed] = {}

    def kv_bytes(self) -> int:
        return sum(a.kv_bytes() for a, _ in self.layers if a is not None)

    def close(self) -> None:
        """Drop the graphs and caches now (they hold GPU memory and reference this engine)."""
        self._prefill = None
        self._decode.clear()
        self.layers = []
        if self.use_graphs:
            torch.cuda.synchronize(self.device)

    # the graphed bodies -----------------------------------------------------------------------------
    def _prefill_body(self) -> None:
        h, rope = self.nb.prefill_in(self.ids)  # (B, T, C)
        for a, f in self.layers:
            if a is not None:
                h = a.prefill(h, rope)
            if f is not None:
                h = f(h)
        self.nb.out(h, self.tok)
        self.pos.fill_(self.ids.shape[1])

    def _decode_body(self, attended: int) -> None:
        h, rope, bias = self.nb.decode_in(self.tok, self.pos, attended)  # (B, 1, C)
        for a, f in self.layers:
            if a is not None:
                h = a.decode(h, rope, self.pos, bias)
            if f is not None:
                h = f(h)
        self.nb.out(h, self.tok)
        self.pos.add_(1)

    # public -----------------------------------------------------------------------------------------
    def set_prompt(self, ids: torch.Tensor) -> None:
        """ids (B, T): the batch's prompts (same length, no padding)."""
        if ids.shape[0] != self.batch:
            raise ValueError(f"ids: batch {ids.shape[0]} is not allowed; this engine was built for {self.batch}")
        if ids.shape[1] >= self.max_len:
            raise ValueError(f"ids: length {ids.shape[1]} leaves no room in a cache of {self.max_len} slots")
        if self.ids.shape != ids.shape:
            self.ids = torch.empty_like(ids, device=self.device)
            self._prefill = None
        self.ids.copy_(ids)

    def capture(self, input_len: int, output_len: int) -> None:
        """Build the prefill graph and every decode graph for this generation length (GPU only)."""
        if self.ids.shape[1] != input_len:
            raise ValueError(f"input_len: {input_len} does not match the prompt length {self.ids.shape[1]}")
        if self._prefill is None:
            self._prefill = Graphed(self._prefill_body, self.device, self.use_graphs, self.pool)
        for c in decode_contexts(input_len, output_len):
            L = attended_length(c, self.max_len, self.bucket)
            if L not in self._decode:
                self._decode[L] = self._graph_decode(L, c)

    def _graph_decode(self, attended: int, context: int) -> Graphed:
        # The warm-up inside Graphed really runs a step: keep the generation's token and position.
        saved_tok, saved_pos = self.tok.clone(), self.pos.clone()

        def reset() -> None:
            self.tok.copy_(saved_tok)
            self.pos.fill_(context)

        reset()
        g = Graphed(lambda: self._decode_body(attended), self.device, self.use_graphs, self.pool, before_capture=reset)
        self.tok.copy_(saved_tok)
        self.pos.copy_(saved_pos)
        return g

    @torch.no_grad()
    def prefill(self) -> None:
        if self._prefill is None:
            self._prefill = Graphed(self._prefill_body, self.device, self.use_graphs, self.pool)
        self._prefill()

    @torch.no_grad()
    def decode(self, context: int) -> None:
        """One step at ``context`` (the engine's position must equal it: steps run in order)."""
        L = attended_length(context, self.max_len, self.bucket)
        g = self._decode.get(L)
        if g is None:
            g = self._decode[L] = self._graph_decode(L, context)
        g()

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, output_len: int) -> torch.Tensor:
        """Greedy tokens (B, output_len) after the prompts ids (B, T)."""
        self.set_prompt(ids)
        out = []
        self.prefill()
        out.append(self.tok.clone())
        for c in decode_contexts(ids.shape[1], output_len):
            self.decode(c)
            out.append(self.tok.clone())
        return torch.cat(out, dim=1)

"""The heterogeneous causal LM (DeciLM / nemotron-nas layout) with a static KV cache and generation.

Every layer is ``h = h + attn(input_layernorm(h)); h = h + mlp(post_attention_layernorm(h))`` where
attention is GQA with a per-layer number of KV heads, one hidden->hidden linear, or absent (no_op), and
the FFN is SwiGLU of a per-layer intermediate size, one linear, or absent. A no_op sub-block has no norm
either, so ``state_dict()`` keys are exactly the Hugging Face names
(``model.layers.N.self_attn.q_proj.weight``, ``...self_attn.linear_attn.weight``, ``...mlp.linear_mlp.weight``).

Entry points used by BLD and scoring: ``embed``, ``attn_sublayer``, ``ffn_sublayer``, ``run_layers``,
``head``, ``set_attention``/``set_ffn``. ``StaticKVCache`` preallocates (batch, max_len) per attention
layer so decode steps have fixed shapes (CUDA-graph capturable).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.model.config import ModelConfig
from puzzle.model.variants import AttentionVariant, BlockConfig, FFNVariant


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Computed in fp32 and cast back before the weight, exactly as Llama does.
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Llama's inverse frequencies, with Llama-3 frequency-dependent scaling when configured."""
    d = cfg.head_dim
    assert d is not None
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))  # (d/2,)
    s = cfg.rope_scaling
    if s is None:
        return inv
    factor, lo, hi = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old = float(s["original_max_position_embeddings"])
    lo_wl, hi_wl = old / lo, old / hi
    wl = 2 * math.pi / inv
    scaled = torch.where(wl > lo_wl, inv / factor, inv)
    smooth = (old / wl - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wl < hi_wl) & ~(wl > lo_wl)
    return torch.where(medium, smoothed, scaled)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class GQAttention(nn.Module):
    """Grouped-query attention: num_kv_heads = num_attention_heads / n_heads_in_group."""

    def __init__(self, cfg: ModelConfig, n_heads_in_group: int) -> None:
        super().__init__()
        assert cfg.head_dim is not None
        if cfg.num_attention_heads % n_heads_in_group:
            raise ValueError(
                f"n_heads_in_group: {n_heads_in_group} does not divide num_attention_heads={cfg.num_attention_heads}"
            )
        self.n_heads = cfg.num_attention_heads
        self.n_heads_in_group = n_heads_in_group
        self.n_kv = cfg.num_attention_heads // n_heads_in_group
        self.head_dim = cfg.head_dim
        c = cfg.hidden_size
        self.q_proj = nn.Linear(c, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(c, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, c, bias=False)

    @property
    def variant(self) -> AttentionVariant:
        return AttentionVariant.gqa(self.n_heads_in_group)

    def forward(
        self,
        x: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,  # (B, T, d)
        sin: torch.Tensor,  # (B, T, d)
        mask: torch.Tensor | None,  # (B, T, S) bool: True = may attend; None = plain causal, no cache
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,  # (B, n_kv, max_len, d) each
        cache_position: torch.Tensor | None = None,  # (T,)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, d)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, KV, T, d)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        if kv is not None:
            assert cache_position is not None
            kc, vc = kv
            # In-place writes at fixed indices keep decode shapes static (CUDA-graph friendly).
            kc.index_copy_(2, cache_position, k.to(kc.dtype))
            vc.index_copy_(2, cache_position, v.to(vc.dtype))
            k, v = kc, vc  # (B, KV, S, d)
        if mask is None:
            # Plain causal attention (no cache, no padding): fused kernels skip the masked half and read
            # the KV heads in place, which is most of BLD's attention time on a GPU.
            assert kv is None, "a cached forward needs an explicit mask"
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_heads_in_group > 1)
        else:
            if self.n_heads_in_group > 1:
                k = k.repeat_interleave(self.n_heads_in_group, dim=1)  # (B, H, S, d)
                v = v.repeat_interleave(self.n_heads_in_group, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.unsqueeze(1))  # (B, H, T, d)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, H*d)
        return self.o_proj(y)


class LinearAttention(nn.Module):
    """replace_with_linear attention: one hidden->hidden linear (DeciLM's ``self_attn.linear_attn``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear_attn = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    @property
    def variant(self) -> AttentionVariant:
        return AttentionVariant.linear()

    def forward(self, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return self.linear_attn(x)  # (B, T, C)


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig, variant: FFNVariant) -> None:
        super().__init__()
        assert variant.intermediate_size is not None
        c, i = cfg.hidden_size, variant.intermediate_size
        self._variant = variant
        self.gate_proj = nn.Linear(c, i, bias=False)
        self.up_proj = nn.Linear(c, i, bias=False)
        self.down_proj = nn.Linear(i, c, bias=False)

    @property
    def variant(self) -> FFNVariant:
        return self._variant

    def activations(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.gate_proj(x)) * self.up_proj(x)  # (B, T, I)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activations(x))  # (B, T, C)


class LinearFFN(nn.Module):
    """replace_with_linear FFN: one hidden->hidden linear (DeciLM's ``mlp.linear_mlp``)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.linear_mlp = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    @property
    def variant(self) -> FFNVariant:
        return FFNVariant.linear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_mlp(x)


def build_attention(variant: AttentionVariant, cfg: ModelConfig) -> nn.Module | None:
    """A freshly initialised attention module for ``variant`` (None for no_op)."""
    if variant.kind == "noop":
        return None
    if variant.kind == "linear":
        return LinearAttention(cfg)
    assert variant.n_heads_in_group is not None
    return GQAttention(cfg, variant.n_heads_in_group)


def build_ffn(variant: FFNVariant, cfg: ModelConfig) -> nn.Module | None:
    """A freshly initialised FFN module for ``variant`` (None for no_op)."""
    if variant.kind == "noop":
        return None
    if variant.kind == "linear":
        return LinearFFN(cfg)
    return SwiGLU(cfg, variant)


class DeciLayer(nn.Module):
    """One heterogeneous decoder layer; absent sub-blocks have neither module nor norm."""

    def __init__(self, cfg: ModelConfig, block: BlockConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_layernorm: RMSNorm | None = None
        self.self_attn: nn.Module | None = None
        self.post_attention_layernorm: RMSNorm | None = None
        self.mlp: nn.Module | None = None
        self.set_attention(block.attention, build_attention(block.attention, cfg))
        self.set_ffn(block.ffn, build_ffn(block.ffn, cfg))

    @property
    def block_config(self) -> BlockConfig:
        return BlockConfig(self.attention_variant, self.ffn_variant)

    @property
    def attention_variant(self) -> AttentionVariant:
        return AttentionVariant.noop() if self.self_attn is None else self.self_attn.variant

    @property
    def ffn_variant(self) -> FFNVariant:
        return FFNVariant.noop() if self.mlp is None else self.mlp.variant

    def set_attention(
        self, variant: AttentionVariant, module: nn.Module | None, norm: RMSNorm | None = None
    ) -> None:
        """Swap the attention sub-block. Keeps the current norm unless ``norm`` is given; a layer that had
        no norm gets a fresh one (ones)."""
        if (module is None) != variant.no_op or (module is not None and module.variant != variant):
            raise ValueError(f"set_attention: module does not implement variant {variant.name}")
        if module is None:
            self.input_layernorm, self.self_attn = None, None
            return
        if norm is None:
            norm = self.input_layernorm or RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        ref = next(module.parameters())
        self.input_layernorm = norm.to(ref.device, ref.dtype)
        self.self_attn = module

    def set_ffn(self, variant: FFNVariant, module: nn.Module | None, norm: RMSNorm | None = None) -> None:
        """Swap the FFN sub-block (see ``set_attention``)."""
        if (module is None) != variant.no_op or (module is not None and module.variant != variant):
            raise ValueError(f"set_ffn: module does not implement variant {variant.name}")
        if module is None:
            self.post_attention_layernorm, self.mlp = None, None
            return
        if norm is None:
            norm = self.post_attention_layernorm or RMSNorm(self.cfg.hidden_size, self.cfg.rms_norm_eps)
        ref = next(module.parameters())
        self.post_attention_layernorm = norm.to(ref.device, ref.dtype)
        self.mlp = module

    def sublayer_state_dict(self, part: str) -> dict[str, torch.Tensor]:
        """Weights of one sub-block with layer-relative Hugging Face names, e.g. for part='attention'
        ``{"input_layernorm.weight", "self_attn.q_proj.weight", ...}`` (empty for no_op): the unit a
        BLD library entry stores."""
        prefixes = {"attention": ("input_layernorm.", "self_attn."),
                    "ffn": ("post_attention_layernorm.", "mlp.")}
        if part not in prefixes:
            raise ValueError(f"part: {part!r} is not allowed; allowed: 'attention', 'ffn'")
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes[part])}

    def attn_sublayer(
        self,
        h: torch.Tensor,  # (B, T, C)
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.self_attn is None:
            return h
        assert self.input_layernorm is not None
        return h + self.self_attn(self.input_layernorm(h), cos, sin, mask, kv, cache_position)

    def ffn_sublayer(self, h: torch.Tensor) -> torch.Tensor:
        if self.mlp is None:
            return h
        assert self.post_attention_layernorm is not None
        return h + self.mlp(self.post_attention_layernorm(h))


class StaticKVCache:
    """Preallocated keys/values (B, n_kv, max_len, d) for each GQA layer; none for no-op/linear layers.

    ``key_valid`` (B, max_len) marks written, non-padding slots; ``length`` is the number of slots used.
    """

    def __init__(self, model: DeciLMForCausalLM, batch_size: int, max_len: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        p = next(model.parameters())
        dtype = dtype or p.dtype
        device = device or p.device
        self.batch_size, self.max_len = batch_size, max_len
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for i, layer in enumerate(model.model.layers):
            attn = layer.self_attn
            if isinstance(attn, GQAttention):
                shape = (batch_size, attn.n_kv, max_len, attn.head_dim)
                self.layers[i] = (torch.zeros(shape, dtype=dtype, device=device),
                                  torch.zeros(shape, dtype=dtype, device=device))
        self.key_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.length = 0

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers.values())

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search): row r becomes old row index[r]."""
        for i, (k, v) in self.layers.items():
            self.layers[i] = (k.index_select(0, index), v.index_select(0, index))
        self.key_valid = self.key_valid.index_select(0, index)


@dataclass
class _Rope:
    cos: torch.Tensor  # (B, T, d)
    sin: torch.Tensor  # (B, T, d)


class DeciModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DeciLayer(cfg, b) for b in cfg.block_configs)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        # .to(bfloat16) would round the RoPE frequencies; recompute them in fp32 on the new device.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self._cfg).to(self.embed_tokens.weight.device)
        return self


class DeciLMForCausalLM(nn.Module):
    """The heterogeneous child (and the converted parent: every layer the parent variant)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DeciModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ----- structure -------------------------------------------------------------------------------
    @property
    def block_configs(self) -> list[BlockConfig]:
        return [layer.block_config for layer in self.model.layers]

    def current_config(self) -> ModelConfig:
        """The config matching the current layers (after any set_attention/set_ffn)."""
        self.config = self.config.with_blocks(self.block_configs)
        return self.config

    def set_attention(self, layer: int, variant: AttentionVariant, module: nn.Module | None,
                      norm: RMSNorm | None = None) -> None:
        self.model.layers[layer].set_attention(variant, module, norm)
        self.current_config()

    def set_ffn(self, layer: int, variant: FFNVariant, module: nn.Module | None, norm: RMSNorm | None = None) -> None:
        self.model.layers[layer].set_ffn(variant, module, norm)
        self.current_config()

    def load_sublayer(self, layer: int, variant: AttentionVariant | FFNVariant,
                      state_dict: dict[str, torch.Tensor]) -> None:
        """Put ``variant`` at ``layer`` with weights from ``sublayer_state_dict`` naming (strict: every
        tensor present with the right shape, nothing extra)."""
        is_attn = isinstance(variant, AttentionVariant)
        module = build_attention(variant, self.config) if is_attn else build_ffn(variant, self.config)  # type: ignore[arg-type]
        norm_key, mod_prefix = ("input_layernorm.weight", "self_attn.") if is_attn else (
            "post_attention_layernorm.weight", "mlp.")
        want = {} if module is None else {norm_key: (self.config.hidden_size,), **{
            mod_prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}}
        got = {k: tuple(v.shape) for k, v in state_dict.items()}
        if want != got:
            raise ValueError(
                f"load_sublayer: layer {layer} variant {variant.name} needs tensors {want}, got {got}"
            )
        ref = next(self.parameters())
        norm = None
        if module is not None:
            module.to(ref.device, ref.dtype)
            module.load_state_dict({k[len(mod_prefix):]: v for k, v in state_dict.items() if k != norm_key})
            norm = RMSNorm(self.config.hidden_size, self.config.rms_norm_eps)
            norm.weight.data.copy_(state_dict[norm_key])
        if is_attn:
            self.set_attention(layer, variant, module, norm)  # type: ignore[arg-type]
        else:
            self.set_ffn(layer, variant, module, norm)  # type: ignore[arg-type]

    # ----- pieces for BLD / scoring ----------------------------------------------------------------
    def layer(self, i: int) -> DeciLayer:
        """Decoder layer ``i`` (the same interface :class:`puzzle.model.streaming.ParentLayers` offers)."""
        return self.model.layers[i]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)  # (B, T, C)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm then lm_head: (B, T, C) -> (B, T, V)."""
        return self.lm_head(self.model.norm(h))

    def rope(self, position_ids: torch.Tensor, dtype: torch.dtype) -> _Rope:
        freqs = position_ids.float().unsqueeze(-1) * self.model.inv_freq  # (B, T, d/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, d)
        return _Rope(emb.cos().to(dtype), emb.sin().to(dtype))

    @staticmethod
    def default_position_ids(attention_mask: torch.Tensor | None, B: int, T: int, offset: int,
                             device: torch.device) -> torch.Tensor:
        """Positions of the last T tokens. With a mask (B, S>=T) covering everything seen so far, real
        tokens count from 0 past any left padding, as Hugging Face generation does."""
        if attention_mask is None:
            return torch.arange(offset, offset + T, device=device).expand(B, T)
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]

    def _mask(self, B: int, T: int, device: torch.device, attention_mask: torch.Tensor | None,
              cache: StaticKVCache | None, cache_position: torch.Tensor | None) -> torch.Tensor | None:
        if cache is None:
            if attention_mask is None:
                return None  # plain causal: GQAttention lets SDPA apply it (is_causal)
            q = torch.arange(T, device=device)
            m = (q[None, :] <= q[:, None]).expand(B, T, T)  # (B, T, T) causal
            if attention_mask is not None:
                m = m & attention_mask.bool()[:, None, :]
            # A query may always see itself, so left-padding rows never softmax over nothing.
            return m | torch.eye(T, dtype=torch.bool, device=device)
        assert cache_position is not None
        S = cache.max_len
        k = torch.arange(S, device=device)
        m = cache.key_valid[:, None, :] & (k[None, None, :] <= cache_position[None, :, None])  # (B, T, S)
        return m | (k[None, None, :] == cache_position[None, :, None])

    def attention_inputs(self, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(cos, sin, mask) for running sub-layers on h (B, T, C) without a cache."""
        B, T, _ = h.shape
        if position_ids is None:
            position_ids = self.default_position_ids(attention_mask, B, T, 0, h.device)
        r = self.rope(position_ids, h.dtype)
        return r.cos, r.sin, self._mask(B, T, h.device, attention_mask, None, None)

    def attn_sublayer(self, layer: int, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """h + attn(norm(h)) of layer ``layer`` (identity for no_op), no cache."""
        cos, sin, mask = self.attention_inputs(h, position_ids, attention_mask)
        return self.model.layers[layer].attn_sublayer(h, cos, sin, mask)

    def ffn_sublayer(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """h + ffn(norm(h)) of layer ``layer`` (identity for no_op)."""
        return self.model.layers[layer].ffn_sublayer(h)

    def run_layers(self, h: torch.Tensor, start: int, end: int, position_ids: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Layers [start, end) applied to hidden states h (B, T, C), no cache."""
        cos, sin, mask = self.attention_inputs(h, position_ids, attention_mask)
        for layer in self.model.layers[start:end]:
            h = layer.ffn_sublayer(layer.attn_sublayer(h, cos, sin, mask))
        return h

    # ----- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # (B, T)
        attention_mask: torch.Tensor | None = None,  # (B, S) 1 = token, 0 = left padding; S >= T covers
        # every token so far (with a cache: all earlier slots too), as in Hugging Face
        position_ids: torch.Tensor | None = None,  # (B, T)
        cache: StaticKVCache | None = None,
        cache_position: torch.Tensor | None = None,  # (T,) slots in the cache; default: next slots
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (B, T, V); with ``output_hidden_states`` also the residual stream before each layer
        and after the last (num_layers + 1 tensors of (B, T, C))."""
        B, T = input_ids.shape
        dev = input_ids.device
        advance = False
        if cache is not None:
            if cache_position is None:
                if cache.length + T > cache.max_len:
                    raise ValueError(f"KV cache overflow: {cache.length}+{T} tokens > max_len={cache.max_len}")
                cache_position = torch.arange(cache.length, cache.length + T, device=dev)
                advance = True
                if attention_mask is not None and attention_mask.shape[1] != cache.length + T:
                    raise ValueError(
                        f"attention_mask: width {attention_mask.shape[1]} is not allowed with a cache holding "
                        f"{cache.length} tokens and {T} new ones; pass the mask of all {cache.length + T} tokens"
                    )
            valid = attention_mask[:, -T:].bool() if attention_mask is not None else torch.ones(
                B, T, dtype=torch.bool, device=dev)
            cache.key_valid.index_copy_(1, cache_position, valid)
        if position_ids is None:
            if cache is not None and attention_mask is None:
                position_ids = cache_position.expand(B, T)
            else:
                position_ids = self.default_position_ids(attention_mask, B, T, 0, dev)
        h = self.embed(input_ids)  # (B, T, C)
        r = self.rope(position_ids, h.dtype)
        mask = self._mask(B, T, dev, attention_mask, cache, cache_position)
        hidden = [h] if output_hidden_states else []
        for i, layer in enumerate(self.model.layers):
            kv = cache.layers.get(i) if cache is not None else None
            h = layer.attn_sublayer(h, r.cos, r.sin, mask, kv, cache_position)
            h = layer.ffn_sublayer(h)
            if output_hidden_states:
                hidden.append(h)
        if advance:
            assert cache is not None
            cache.length += T
        logits = self.head(h)
        return (logits, hidden) if output_hidden_states else logits

    # ----- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,  # (B, T) left-padded when rows differ in length
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        num_beams: int = 1,
        num_return_sequences: int = 1,
        attention_mask: torch.Tensor | None = None,
        pad_token_id: int | None = None,
        length_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Greedy (num_beams=1) or beam search with the static KV cache.

        Returns (B * num_return_sequences, T + max_new_tokens) token ids; finished sequences are padded
        with ``pad_token_id`` (default: the first EOS id, else 0). Beams are ranked by summed log-probs
        divided by generated_length ** length_penalty, as Hugging Face's beam search does.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: {max_new_tokens} is not allowed; must be >= 1")
        if num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences: {num_return_sequences} is not allowed; must be <= num_beams={num_beams}"
            )
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        if num_beams == 1:
            return self._greedy(input_ids, max_new_tokens, eos, pad, attention_mask)
        return self._beam(input_ids, max_new_tokens, eos, pad, attention_mask, num_beams,
                          num_return_sequences, length_penalty)

    def _step_inputs(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.long().sum(-1, keepdim=True) - 1  # (B, 1) position of the newest real token

    def _greedy(self, input_ids: torch.Tensor, n: int, eos: list[int], pad: int,
                attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, T = input_ids.shape
        dev = input_ids.device
        mask = attention_mask.long() if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=dev)
        cache = StaticKVCache(self, B, T + n)
        logits = self(input_ids, attention_mask=mask, cache=cache)[:, -1]  # (B, V)
        out = [input_ids]
        done = torch.zeros(B, dtype=torch.bool, device=dev)
        eos_t = torch.tensor(eos, device=dev, dtype=torch.long)
        for step in range(n):
            tok = logits.argmax(-1)  # (B,)
            tok = torch.where(done, torch.full_like(tok, pad), tok)
            out.append(tok[:, None])
            if eos:
                done = done | torch.isin(tok, eos_t)
            if step == n - 1 or bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long, device=dev)], dim=1)
            logits = self(tok[:, None], attention_mask=mask, position_ids=self._step_inputs(mask),
                          cache=cache)[:, -1]
        seq = torch.cat(out, dim=1)
        if seq.shape[1] < T + n:
            seq = torch.cat([seq, torch.full((B, T + n - seq.shape[1]), pad, dtype=seq.dtype, device=dev)], 1)
        return seq

    def _beam(self, input_ids: torch.Tensor, n: int, eos: list[int], pad: int,
              attention_mask: torch.Tensor | None, K: int, R: int, lp: float) -> torch.Tensor:
        B, T = input_ids.shape
        dev = input_ids.device
        mask = attention_mask.long() if attention_mask is not None else torch.ones(B, T, dtype=torch.long, device=dev)
        ids = input_ids.repeat_interleave(K, 0)  # (B*K, T)
        mask = mask.repeat_interleave(K, 0)
        cache = StaticKVCache(self, B * K, T + n)
        logits = self(ids, attention_mask=mask, cache=cache)[:, -1]  # (B*K, V)
        V = logits.shape[-1]
        scores = torch.full((B, K), float("-inf"), device=dev)
        scores[:, 0] = 0.0  # all beams start identical: only one may expand at step 0
        # The bookkeeping (which beam continues, which hypothesis finished) runs on host lists, one
        # device-to-host copy a step: per-element reads of device tensors would sync the GPU each time.
        gen: list[list[int]] = [[] for _ in range(B * K)]
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        eos_set = set(eos)
        neg = float("-inf")
        for step in range(n):
            logp = F.log_softmax(logits.float(), dim=-1).view(B, K, V) + scores[:, :, None]
            top, idx = logp.view(B, K * V).topk(2 * K, dim=-1)  # (B, 2K)
            top_l, idx_l = top.tolist(), idx.tolist()
            new_scores = [[neg] * K for _ in range(B)]
            new_src = [[0] * K for _ in range(B)]
            new_tok = [[pad] * K for _ in range(B)]
            gen_len = step + 1
            for b in range(B):
                if done[b]:
                    continue
                j = 0
                for r in range(2 * K):
                    s, src, t = top_l[b][r], idx_l[b][r] // V, idx_l[b][r] % V
                    if s == neg:
                        break
                    if t in eos_set:
                        # An EOS among the top-K candidates finishes a hypothesis; beyond rank K it is ignored.
                        if r < K:
                            finished[b].append((s / gen_len ** lp, [*gen[b * K + src], t]))
                        continue
                    new_scores[b][j], new_src[b][j], new_tok[b][j] = s, src, t
                    j += 1
                    if j == K:
                        break
                finished[b].sort(key=lambda x: -x[0])
                finished[b] = finished[b][:K]
                best_running = new_scores[b][0]
                if len(finished[b]) >= K and (best_running == neg or best_running / gen_len ** lp <= finished[b][-1][0]):
                    done[b] = True
            if all(done) or step == n - 1:
                # Running beams count as hypotheses when the budget ends.
                for b in range(B):
                    if done[b]:
                        continue
                    for k in range(K):
                        s = new_scores[b][k]
                        if s == neg:
                            continue
                        finished[b].append((s / gen_len ** lp, [*gen[b * K + new_src[b][k]], new_tok[b][k]]))
                break
            flat = [b * K + new_src[b][k] for b in range(B) for k in range(K)]
            gen = [[*gen[src], new_tok[i // K][i % K]] for i, src in enumerate(flat)]
            flat_src = torch.tensor(flat, dtype=torch.long, device=dev)  # (B*K,)
            tok_t = torch.tensor(new_tok, dtype=torch.long, device=dev)  # (B, K)
            cache.reorder(flat_src)
            mask = torch.cat([mask.index_select(0, flat_src), torch.ones(B * K, 1, dtype=torch.long, device=dev)], 1)
            scores = torch.tensor(new_scores, device=dev)
            logits = self(tok_t.view(-1, 1), attention_mask=mask, position_ids=self._step_inputs(mask),
                          cache=cache)[:, -1]
        rows = []
        for b in range(B):
            hyps = sorted(finished[b], key=lambda x: -x[0])[:R]
            for _, seq in hyps:
                full = torch.full((n,), pad, dtype=torch.long, device=dev)
                full[: len(seq)] = torch.tensor(seq, dtype=torch.long, device=dev)
                rows.append(torch.cat([input_ids[b], full]))
        return torch.stack(rows)

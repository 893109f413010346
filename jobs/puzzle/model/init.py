"""Initialize block variants from the parent before BLD (Puzzle, section 3), using calibration activations.

- FFN ``ffn_m*``/``ffn_i*`` smaller than the parent: keep the intermediate channels with the largest
  contribution to the output, mean |silu(gate_i(x)) * up_i(x)| * ||W_down[:, i]||; larger than the
  parent: all parent channels plus new ones whose down_proj columns are zero (same function at start).
- Attention ``attn_g*``: query and output projections copied, KV heads mean-pooled over the parent KV
  heads that each new group's query heads used (copying when a group needs only one).
- ``*_linear``: least squares (ridge-stabilised) from the sub-block's normed input to its output.
- ``*_noop``: identity; returns None.

``calib_hidden`` is always the sub-block's *input* residual stream (B, T, C), before its RMSNorm; the
returned module expects the parent's norm in front of it (``DeciLayer.set_attention`` keeps it).
``parent`` is anything with ``config``, ``layer(i)`` and ``attention_inputs(h)``: a whole
``DeciLMForCausalLM``, or the streamed :class:`puzzle.model.streaming.ParentLayers` BLD runs on.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from puzzle.model.config import ModelConfig
from puzzle.model.modeling import (
    DeciLayer,
    GQAttention,
    LinearAttention,
    LinearFFN,
    SwiGLU,
    build_attention,
    build_ffn,
)
from puzzle.model.variants import AttentionVariant, FFNVariant


class LayerSource(Protocol):
    """What initialization reads of the parent: its config, one layer, and the rope/mask inputs."""

    @property
    def config(self) -> ModelConfig: ...

    def layer(self, i: int) -> DeciLayer: ...

    def attention_inputs(self, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None): ...


_RIDGE = 1e-6  # relative to the mean diagonal of X^T X; keeps rank-deficient calibration sets solvable


def fit_linear(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """W (out, in) minimising ||x W^T - y||^2 + ridge: x (N, in), y (N, out); solved in float64."""
    x64, y64 = x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double()
    xtx = x64.T @ x64  # (in, in)
    lam = _RIDGE * xtx.diagonal().mean().clamp(min=1e-12)
    a = torch.linalg.solve(xtx + lam * torch.eye(xtx.shape[0], dtype=xtx.dtype, device=xtx.device), x64.T @ y64)
    return a.T  # (out, in)


def _like(module: nn.Module, ref: torch.Tensor) -> nn.Module:
    return module.to(device=ref.device, dtype=ref.dtype)


@torch.no_grad()
def init_attention(
    variant: AttentionVariant,
    parent: LayerSource,
    layer: int,
    calib_hidden: torch.Tensor,  # (B, T, C) input of layer ``layer``'s attention sub-block
    attention_mask: torch.Tensor | None = None,  # (B, T)
) -> nn.Module | None:
    """A module implementing ``variant`` at ``layer``, initialized from the parent's attention there."""
    pl = parent.layer(layer)
    if variant.no_op:
        return None
    ref = next(pl.parameters(), calib_hidden)
    calib_hidden = calib_hidden.to(ref.dtype)  # calibration may come in another precision than the weights
    cfg = parent.config
    mod = build_attention(variant, cfg)
    assert mod is not None
    _like(mod, ref)
    src = pl.self_attn
    if isinstance(mod, LinearAttention):
        if src is None:
            mod.linear_attn.weight.zero_()  # the parent adds nothing here; neither should the replacement
            return mod
        x = pl.input_layernorm(calib_hidden)  # (B, T, C)
        cos, sin, mask = parent.attention_inputs(calib_hidden, attention_mask=attention_mask)
        y = src(x, cos, sin, mask) if isinstance(src, GQAttention) else src(x)  # (B, T, C)
        keep = attention_mask.bool().reshape(-1) if attention_mask is not None else slice(None)
        w = fit_linear(x.reshape(-1, x.shape[-1])[keep], y.reshape(-1, y.shape[-1])[keep])
        mod.linear_attn.weight.copy_(w.to(ref.dtype))
        return mod
    assert isinstance(mod, GQAttention)
    if not isinstance(src, GQAttention):
        # No parent attention to inherit from: start with zero output so the layer equals the parent.
        mod.o_proj.weight.zero_()
        return mod
    d, C = mod.head_dim, cfg.hidden_size
    mod.q_proj.weight.copy_(src.q_proj.weight)
    mod.o_proj.weight.copy_(src.o_proj.weight)
    pk = src.k_proj.weight.view(src.n_kv, d, C)  # (KVp, d, C)
    pv = src.v_proj.weight.view(src.n_kv, d, C)
    nk = torch.empty(mod.n_kv, d, C, dtype=pk.dtype, device=pk.device)
    nv = torch.empty_like(nk)
    for j in range(mod.n_kv):
        queries = range(j * mod.n_heads_in_group, (j + 1) * mod.n_heads_in_group)
        used = sorted({q // src.n_heads_in_group for q in queries})
        nk[j] = pk[used].mean(0)
        nv[j] = pv[used].mean(0)
    mod.k_proj.weight.copy_(nk.view(mod.n_kv * d, C))
    mod.v_proj.weight.copy_(nv.view(mod.n_kv * d, C))
    return mod


def ffn_channel_scores(parent_ffn: SwiGLU, x_normed: torch.Tensor) -> torch.Tensor:
    """Per intermediate channel: mean |activation| * ||W_down[:, i]||, on normed inputs (..., C)."""
    act = parent_ffn.activations(x_normed).reshape(-1, parent_ffn.down_proj.in_features)  # (N, I)
    return act.abs().float().mean(0) * parent_ffn.down_proj.weight.float().norm(dim=0)  # (I,)


@torch.no_grad()
def init_ffn(
    variant: FFNVariant,
    parent: LayerSource,
    layer: int,
    calib_hidden: torch.Tensor,  # (B, T, C) input of layer ``layer``'s FFN sub-block
    attention_mask: torch.Tensor | None = None,  # (B, T): padding tokens are left out of the statistics
) -> nn.Module | None:
    """A module implementing ``variant`` at ``layer``, initialized from the parent's FFN there."""
    pl = parent.layer(layer)
    if variant.no_op:
        return None
    ref = next(pl.parameters(), calib_hidden)
    calib_hidden = calib_hidden.to(ref.dtype)
    mod = build_ffn(variant, parent.config)
    assert mod is not None
    _like(mod, ref)
    src = pl.mlp
    keep = attention_mask.bool().reshape(-1) if attention_mask is not None else slice(None)
    x = pl.post_attention_layernorm(calib_hidden).reshape(-1, calib_hidden.shape[-1])[keep] if src is not None else None
    if isinstance(mod, LinearFFN):
        if src is None:
            mod.linear_mlp.weight.zero_()
            return mod
        assert x is not None
        mod.linear_mlp.weight.copy_(fit_linear(x, src(x)).to(ref.dtype))
        return mod
    assert isinstance(mod, SwiGLU)
    if not isinstance(src, SwiGLU):
        mod.down_proj.weight.zero_()  # zero output: the layer starts equal to a parent without this FFN
        return mod
    k, parent_i = mod.down_proj.in_features, src.down_proj.in_features
    assert x is not None
    if k <= parent_i:
        idx = ffn_channel_scores(src, x).topk(k).indices.sort().values  # keep the parent's channel order
        mod.gate_proj.weight.copy_(src.gate_proj.weight[idx])
        mod.up_proj.weight.copy_(src.up_proj.weight[idx])
        mod.down_proj.weight.copy_(src.down_proj.weight[:, idx])
    else:
        mod.gate_proj.weight[:parent_i].copy_(src.gate_proj.weight)
        mod.up_proj.weight[:parent_i].copy_(src.up_proj.weight)
        mod.down_proj.weight.zero_()
        mod.down_proj.weight[:, :parent_i].copy_(src.down_proj.weight)
    return mod


def normalized_mse(y: torch.Tensor, t: torch.Tensor) -> float:
    """sum (y - t)^2 / sum t^2 — the BLD loss, as a float."""
    t64 = t.double()
    return float(((y.double() - t64) ** 2).sum() / (t64**2).sum().clamp(min=1e-30))

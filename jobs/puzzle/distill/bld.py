"""Blockwise local distillation of one *stage*: every candidate block of a contiguous layer range, from
one parent pass per batch (Puzzle, arXiv 2411.19146, section 3).

Every candidate block learns to stand in for the parent's block at its layer, locally: it gets the
parent's hidden states at its input and learns the parent's output there, with the normalized MSE
``sum (y - t)^2 / sum t^2``. Per batch the parent runs ONCE over layers ``0 .. end-1`` of the stage
(:class:`puzzle.model.streaming.ParentLayers`: resident or streamed layer by layer), and at each layer
of the stage the inputs and targets of that layer's blocks are taken from that one pass:

- decoupled (default): an attention variant learns ``a = h + attn_parent(norm(h))`` from ``h``, an FFN
  variant learns ``h' = a + ffn_parent(norm(a))`` from ``a`` (the other sub-block stays the parent's);
- coupled: whole blocks ``"<attn>+<ffn>"`` learn ``h'`` from ``h``.

Only one layer's ``h``, ``a``, ``h'`` are alive at a time, and each block's loss is back-propagated and
stepped before the next block's forward (:class:`puzzle.training.Trainer`), so memory is the blocks'
weights and optimizer states plus one block's activations. Every block has its own optimizer and
clipping and the data order is a function of (seed, step), so a block's result does not depend on which
stage trained it, or with which other blocks: a library entry is per (layer, variant).

Blocks start from the parent (``puzzle.model.init_attention`` / ``init_ffn`` on calibration activations).
``no_op`` blocks have nothing to train: their held-out error is measured and recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from puzzle.config import BLDConfig
from puzzle.data.shards import batch_indices
from puzzle.model import (
    AttentionVariant,
    ModelConfig,
    RMSNorm,
    build_attention,
    build_ffn,
    init_attention,
    init_ffn,
    parse_name,
)
from puzzle.model.streaming import ParentLayers
from puzzle.training import Part, Schedule, Trainer, adamw, steps_for

log = logging.getLogger(__name__)


def entry_name(layer: int, variant: str) -> str:
    """The training part of one (layer, variant): ``"003/attn_g4"`` (also its library entry's prefix)."""
    return f"{layer:03d}/{variant}"


class SubBlock(nn.Module):
    """A layer's trainable part: attention and/or FFN sub-block with their norms.

    Attribute names are DeciLayer's, so ``state_dict()`` keys are the layer-relative Hugging Face names
    (``input_layernorm.weight``, ``self_attn.q_proj.weight``, ``mlp.down_proj.weight``) that
    ``DeciLayer.sublayer_state_dict`` gives and ``DeciLMForCausalLM.load_sublayer`` takes.
    """

    def __init__(self, attn: nn.Module | None, attn_norm: RMSNorm | None,
                 ffn: nn.Module | None, ffn_norm: RMSNorm | None) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = attn_norm, attn
        self.post_attention_layernorm, self.mlp = ffn_norm, ffn

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask)  # (B, T, C)
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))  # (B, T, C)
        return h


def _norm_like(src: RMSNorm | None, cfg: ModelConfig) -> RMSNorm:
    norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    if src is not None:
        norm.weight.data.copy_(src.weight.data.float())
    return norm


def nmse_terms(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum (y - t)^2, sum t^2) in fp32: the parts of the normalized MSE."""
    t32 = t.float()
    return (y.float() - t32).pow(2).sum(), t32.pow(2).sum()


@dataclass
class Entry:
    """One (layer, variant) of the stage: its block, its training part, and the block before training."""

    layer: int
    variant: str
    kind: str  # 'attention' | 'ffn' | 'block'
    block: SubBlock
    part: Part
    init_state: dict[str, torch.Tensor]
    initial_nmse: float | None = None

    @property
    def name(self) -> str:
        return entry_name(self.layer, self.variant)

    @property
    def trainable(self) -> bool:
        return self.part.optimizer is not None


class StageTrainer:
    """Trains the ``entries`` ((layer, variant) pairs) of one stage; usable without a step (benchmarks).

    ``parent`` gives the parent's layers (resident or streamed); sequences are (N, T) token ids.
    """

    def __init__(self, parent: ParentLayers, bld: BLDConfig, entries: Sequence[tuple[int, str]],
                 mode: str, device: torch.device, train_seqs: torch.Tensor, eval_seqs: torch.Tensor,
                 calib_seqs: torch.Tensor) -> None:
        self.parent, self.bld, self.mode, self.device = parent, bld, mode, device
        self.cfg = parent.cfg
        self.cuda = device.type == "cuda"
        self.train_seqs, self.eval_seqs, self.calib_seqs = train_seqs, eval_seqs, calib_seqs
        self.wanted = sorted(entries)
        if not self.wanted:
            raise ValueError("a stage needs at least one (layer, variant) to train")
        self.start = min(layer for layer, _ in self.wanted)
        self.end = max(layer for layer, _ in self.wanted) + 1
        self.tokens_per_step = bld.batch_size * train_seqs.shape[1]
        self.total_steps = steps_for(bld.tokens, bld.batch_size, train_seqs.shape[1])
        self.entries: list[Entry] = []
        self.trainer: Trainer | None = None

    # -- the one parent pass --
    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def stage_pass(self, ids: torch.Tensor) -> Iterator[tuple[int, dict[str, torch.Tensor], tuple]]:
        """Run the parent once up to the stage's last layer; at each stage layer, yield the (input, target)
        tensors its blocks need: ``{"h": input of the layer, "a": after attention, "h2": layer output}``."""
        sk = self.parent.skeleton
        # grad mode and autocast are thread state: never leave them set across a yield
        with torch.no_grad(), self.autocast():
            h = sk.embed(ids.to(self.device))  # (B, T, C)
            rope = sk.attention_inputs(h)
        for i, layer in self.parent.layers(0, self.end):
            with torch.no_grad(), self.autocast():
                a = layer.attn_sublayer(h, *rope)  # (B, T, C)
                h2 = layer.ffn_sublayer(a)  # (B, T, C)
            if i >= self.start:
                yield i, {"h": h, "a": a, "h2": h2}, rope
            h = h2

    @staticmethod
    def _xt(kind: str, acts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if kind == "attention":
            return acts["h"], acts["a"]
        if kind == "ffn":
            return acts["a"], acts["h2"]
        return acts["h"], acts["h2"]

    # -- blocks --
    def _kind(self, variant: str) -> str:
        return "block" if self.mode == "coupled" else ("attention" if variant.startswith("attn_") else "ffn")

    @torch.no_grad()
    def _calibration(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per stage layer, the parent's attention and FFN sub-block inputs on the calibration tokens."""
        per: dict[int, dict[str, list[torch.Tensor]]] = {}
        for chunk in self.calib_seqs.split(self.bld.batch_size):
            for i, acts, _ in self.stage_pass(chunk):
                d = per.setdefault(i, {"attention": [], "ffn": []})
                d["attention"].append(acts["h"])
                d["ffn"].append(acts["a"])
        return {i: {k: torch.cat(v) for k, v in d.items()} for i, d in per.items()}

    def _build(self, layer: int, variant: str, calib: dict[int, dict[str, torch.Tensor]] | None) -> SubBlock:
        cfg = self.cfg
        pl = self.parent.layer(layer)
        attn = attn_norm = ffn = ffn_norm = None
        for v in parse_name(variant, cfg.hidden_size, cfg.num_attention_heads):
            if isinstance(v, AttentionVariant):
                attn = (init_attention(v, self.parent, layer, calib[layer]["attention"].to(self.device))
                        if calib is not None else build_attention(v, cfg))
                attn_norm = None if attn is None else _norm_like(pl.input_layernorm, cfg)
            else:
                ffn = (init_ffn(v, self.parent, layer, calib[layer]["ffn"].to(self.device))
                       if calib is not None else build_ffn(v, cfg))
                ffn_norm = None if ffn is None else _norm_like(pl.post_attention_layernorm, cfg)
        # fp32 master weights: bf16 autocast on GPU computes with them, plain fp32 on CPU
        return SubBlock(attn, attn_norm, ffn, ffn_norm).to(self.device, torch.float32)

    def setup(self, resume: bool) -> None:
        """Build every block (initialized from the parent unless a checkpoint will be loaded)."""
        calib = None if resume else self._calibration()
        parts: dict[str, Part] = {}
        for layer, variant in self.wanted:
            block = self._build(layer, variant, calib)
            params = [p for p in block.parameters()]
            opt = adamw(params, self.bld.lr, self.bld.weight_decay, fused=self.cuda or None) if params else None
            part = Part(entry_name(layer, variant), block, opt, self.bld.grad_clip)
            # the block before training, kept off the device: it is needed only at the very end
            state = {k: v.detach().to("cpu", copy=True) for k, v in block.state_dict().items()}
            self.entries.append(Entry(layer, variant, self._kind(variant), block, part, state))
            parts[part.name] = part
        del calib
        schedule = Schedule.from_fraction(self.total_steps, self.bld.lr, self.bld.warmup_fraction)
        self.trainer = Trainer(parts, schedule, self.device, autocast=self.cuda, tokens_per_step=self.tokens_per_step)

    def by_layer(self) -> dict[int, list[Entry]]:
        out: dict[int, list[Entry]] = {}
        for e in self.entries:
            out.setdefault(e.layer, []).append(e)
        return out

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cuda else x.float()

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Normalized MSE of every entry on the held-out sequences: sums over all tokens, then the ratio."""
        num = {e.name: 0.0 for e in self.entries}
        den = {e.name: 0.0 for e in self.entries}
        layers = self.by_layer()
        for chunk in self.eval_seqs.split(self.bld.batch_size):
            for i, acts, rope in self.stage_pass(chunk):
                for e in layers.get(i, ()):
                    x, t = self._xt(e.kind, acts)
                    with self.autocast():
                        y = e.block(self._input(x), *rope)
                    n, d = nmse_terms(y, t)
                    num[e.name] += float(n)
                    den[e.name] += float(d)
        return {k: num[k] / max(den[k], 1e-30) for k in num}

    # -- training --
    def losses(self, batches: Iterator[torch.Tensor]):
        """``loss_fn`` for :meth:`Trainer.train`: one stage pass per step, a loss per trainable entry."""
        layers = {i: [e for e in es if e.trainable] for i, es in self.by_layer().items()}

        def loss_fn(step: int):
            ids = self.train_seqs[next(batches)]  # (B, T)
            for i, acts, rope in self.stage_pass(ids):
                for e in layers.get(i, ()):
                    x, t = self._xt(e.kind, acts)
                    with self.autocast():
                        y = e.block(self._input(x), *rope)
                    num, den = nmse_terms(y, t)
                    yield e.name, num / den.clamp(min=1e-30)

        return loss_fn

    def train(self, start_step: int, on_step=None, progress: bool = True, desc: str = "bld") -> dict[str, Any]:
        assert self.trainer is not None, "setup() first"
        if not any(e.trainable for e in self.entries):
            return {"train_seconds": 0.0, "steps_timed": 0, "tokens_per_second": 0.0, "steps": 0}
        batches = batch_indices(len(self.train_seqs), self.bld.batch_size, self.bld.seed, start_step)
        res = self.trainer.train(start_step, self.total_steps, self.losses(batches), on_step=on_step,
                                 desc=desc, progress=progress)
        return {"train_seconds": res.train_seconds, "steps_timed": res.steps_timed,
                "tokens_per_second": res.tokens_per_second, "steps": self.total_steps}

    # -- checkpoints --
    def state_dict(self) -> dict[str, Any]:
        assert self.trainer is not None
        return {**self.trainer.state_dict(),
                "init": {e.name: e.init_state for e in self.entries},
                "initial_nmse": {e.name: e.initial_nmse for e in self.entries}}

    def load_state_dict(self, state: dict[str, Any]) -> int:
        assert self.trainer is not None
        self.trainer.load_state_dict(state)
        for e in self.entries:
            e.init_state = dict(state["init"][e.name])
            e.initial_nmse = state["initial_nmse"][e.name]
        return self.trainer.step


__all__ = ["Entry", "StageTrainer", "SubBlock", "entry_name", "nmse_terms"]

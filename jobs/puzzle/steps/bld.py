"""The ``bld`` step: blockwise local distillation of one variant over one layer range (one pod).

Puzzle (arXiv 2411.19146, section 3) trains every candidate block to stand in for the parent's block
at its layer, locally: the block gets the parent's hidden states at its input and learns the parent's
output there, with the normalized MSE  sum (y - t)^2 / sum t^2.

- decoupled (default): an attention variant learns ``h + attn_parent(norm(h))`` from ``h`` (the FFN stays
  the parent's), an FFN variant learns ``h + ffn_parent(norm(h))``; coupled: whole blocks
  (``"<attn>+<ffn>"``) learn the parent's whole layer.
- The parent runs once per batch up to the last layer of the unit; its activations are computed on
  the fly and never written to disk.
- Blocks start from the parent (``puzzle.model.init_attention`` / ``init_ffn`` on calibration
  activations), then train with AdamW, linear warm-up and cosine decay, gradient clipping; bf16
  autocast on GPU, fp32 on CPU. Each block has its own optimizer and clipping, and the data order is a
  function of (seed, step), so a block's result does not depend on the unit that trained it.
- Every ``bld.checkpoint_every`` steps the unit's state (weights, optimizer, step, RNG, loss curve) goes
  to the library's ``checkpoints/<unit-id>/``; a retried unit resumes there and ends with the same
  weights as an uninterrupted run.
- The library keeps the better (on held-out tokens) of the trained block and its initialization;
  ``meta.json`` records both errors and which one was kept.
- Results go to the content-addressed library (``puzzle.library``): a block already there (same
  parent, data and hyperparameters) is reused, not trained again.

Unit: ``{"id": "attn_g4.l000-002", "kind": "attention"|"ffn"|"block", "variant": "attn_g4", "layers": [0, 2]}``
(layers 0 and 1). Run one with ``puzzle step bld --run RUN_URI --unit JSON``.

Fault injection for tests: ``PUZZLE_BLD_KILL_AFTER_STEP=k`` makes the process SIGKILL itself right
after optimizer step k, exactly as a preempted pod dies (no cleanup, no final write).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm import tqdm

from puzzle.config import PuzzleConfig
from puzzle.context import StepContext, UnitError
from puzzle.data.shards import batch_indices, load_tokens, sequences
from puzzle.library import Library, parse_variants
from puzzle.model import (
    AttentionVariant,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    RMSNorm,
    build_attention,
    build_ffn,
    init_attention,
    init_ffn,
    load_parent,
)
from puzzle.model.io import parent_model_config, torch_dtype

log = logging.getLogger(__name__)

KILL_ENV = "PUZZLE_BLD_KILL_AFTER_STEP"
_KINDS = ("attention", "ffn", "block")
_TIMING_WARMUP_STEPS = 2  # steps left out of tokens/s (kernel selection, allocator growth)
_MAX_CURVE_POINTS = 200


# ----- units ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BLDUnit:
    id: str
    kind: str
    variant: str
    start: int
    end: int  # exclusive

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def parse_unit(unit: dict[str, Any], parent_cfg: ModelConfig, mode: str) -> BLDUnit:
    """Check a bld unit against the parent and the BLD mode; every problem is a UnitError naming it."""
    for k in ("kind", "variant", "layers"):
        if k not in unit:
            raise UnitError(f"bld unit {unit.get('id')!r}: field {k!r} is missing; a bld unit needs "
                            "'id', 'kind', 'variant' and 'layers' [start, end)")
    kind, variant, layers = unit["kind"], unit["variant"], unit["layers"]
    if kind not in _KINDS:
        raise UnitError(f"kind: {kind!r} is not allowed; allowed: {', '.join(_KINDS)}")
    want = "block" if mode == "coupled" else None
    if want and kind != want:
        raise UnitError(f"kind: {kind!r} is not allowed in bld.mode 'coupled'; allowed: 'block'")
    if mode == "decoupled" and kind == "block":
        raise UnitError("kind: 'block' is only allowed with bld.mode 'coupled'; allowed here: 'attention', 'ffn'")
    if not isinstance(variant, str):
        raise UnitError(f"variant: {variant!r} is not allowed; must be a variant name string")
    try:
        parts = parse_variants(variant, parent_cfg.hidden_size)
    except ValueError as err:
        raise UnitError(f"variant: {err}") from None
    shape = {"attention": (AttentionVariant,), "ffn": (FFNVariant,), "block": (AttentionVariant, FFNVariant)}[kind]
    if tuple(type(p) for p in parts) != shape:
        raise UnitError(f"variant: {variant!r} is not a {kind} variant")
    for p in parts:
        if isinstance(p, AttentionVariant) and p.kind == "gqa":
            nh = parent_cfg.num_attention_heads
            assert p.n_heads_in_group is not None
            if nh % p.n_heads_in_group:
                allowed = [g for g in range(1, nh + 1) if nh % g == 0]
                raise UnitError(f"variant: {variant!r}: n_heads_in_group {p.n_heads_in_group} does not divide "
                                f"the parent's {nh} heads; allowed: {allowed}")
    n = len(parent_cfg.block_configs)
    if (not isinstance(layers, list) or len(layers) != 2 or not all(isinstance(x, int) and not isinstance(x, bool)
                                                                      for x in layers)):
        raise UnitError(f"layers: {layers!r} is not allowed; must be [start, end) with integers")
    a, b = layers
    if not (0 <= a < b <= n):
        raise UnitError(f"layers: {layers!r} is outside the parent, which has {n} layers; allowed: "
                        f"0 <= start < end <= {n}")
    return BLDUnit(str(unit["id"]), kind, variant, a, b)


def parent_config(parent_dir: Path) -> ModelConfig:
    """The parent's layer structure from config.json alone (no weights), to check a unit at once."""
    path = parent_dir / "config.json"
    raw = json.loads(path.read_text())
    if raw.get("model_type") == "nemotron-nas":
        return ModelConfig.from_json_file(path)
    return parent_model_config(raw, str(path))


# ----- the trainable block -------------------------------------------------------------------------
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

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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


@dataclass
class _Targets:
    """One layer's parent activations for one batch: the sub-block input and the parent's output."""

    x: torch.Tensor  # (B, T, C)
    t: torch.Tensor  # (B, T, C)


def parent_pass(parent: DeciLMForCausalLM, ids: torch.Tensor, unit: BLDUnit, kind: str,
                autocast) -> tuple[dict[int, _Targets], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Run the parent up to the unit's last layer once; per layer, the (input, target) its block learns."""
    out: dict[int, _Targets] = {}
    with torch.no_grad(), autocast():
        h = parent.embed(ids)  # (B, T, C)
        cos, sin, mask = parent.attention_inputs(h)
        for i, layer in enumerate(parent.model.layers[: unit.end]):
            a = layer.attn_sublayer(h, cos, sin, mask)  # (B, T, C)
            if kind == "attention" and i == unit.end - 1:
                out[i] = _Targets(h, a)  # the last FFN's output is nobody's input or target
                break
            f = layer.ffn_sublayer(a)  # (B, T, C)
            if i >= unit.start:
                if kind == "attention":
                    out[i] = _Targets(h, a)
                elif kind == "ffn":
                    out[i] = _Targets(a, f)
                else:
                    out[i] = _Targets(h, f)
            h = f
    return out, (cos, sin, mask)


def nmse_terms(y: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum (y - t)^2, sum t^2) in fp32: the parts of the normalized MSE."""
    t32 = t.float()
    return (y.float() - t32).pow(2).sum(), t32.pow(2).sum()


# ----- training ------------------------------------------------------------------------------------
@dataclass
class _LayerState:
    layer: int
    block: SubBlock
    optimizer: torch.optim.Optimizer | None
    curve: list[list[float]] = field(default_factory=list)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # losses not yet synced
    initial_nmse: float | None = None
    init_state: dict[str, torch.Tensor] = field(default_factory=dict)  # the block before training

    def flush(self) -> None:
        if self.pending:
            vals = torch.stack([v for _, v in self.pending]).tolist()
            self.curve.extend([float(s), float(v)] for (s, _), v in zip(self.pending, vals))
            self.pending.clear()


def lr_at(step: int, total: int, peak: float, warmup_fraction: float) -> float:
    """Linear warm-up over the first warmup_fraction of steps, then cosine decay to zero at ``total``."""
    warm = round(warmup_fraction * total)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Trains the blocks of one unit; usable without a StepContext (benchmarks)."""

    def __init__(self, parent: DeciLMForCausalLM, config: PuzzleConfig, unit: BLDUnit, device: torch.device,
                 train_seqs: torch.Tensor, eval_seqs: torch.Tensor, calib_seqs: torch.Tensor) -> None:
        self.parent, self.config, self.unit, self.device = parent, config, unit, device
        self.bld = config.bld
        self.train_seqs, self.eval_seqs, self.calib_seqs = train_seqs, eval_seqs, calib_seqs
        self.cuda = device.type == "cuda"
        self.variants = parse_variants(unit.variant, parent.config.hidden_size)
        tokens_per_step = self.bld.batch_size * train_seqs.shape[1]
        self.total_steps = max(1, math.ceil(self.bld.tokens / tokens_per_step))
        self.tokens_per_step = tokens_per_step
        self.layers: list[_LayerState] = []

    def autocast(self):
        if self.cuda:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- blocks --
    def _build(self, layer: int, init: dict[int, dict[str, torch.Tensor]] | None) -> SubBlock:
        """The layer's block, initialized from the parent (``init``: calibration inputs) or shaped only."""
        cfg = self.parent.config
        pl = self.parent.model.layers[layer]
        attn = attn_norm = ffn = ffn_norm = None
        for v in self.variants:
            if isinstance(v, AttentionVariant):
                if init is not None:
                    attn = init_attention(v, self.parent, layer, init[layer]["attention"])
                else:
                    attn = build_attention(v, cfg)
                attn_norm = None if attn is None else _norm_like(pl.input_layernorm, cfg)
            else:
                if init is not None:
                    ffn = init_ffn(v, self.parent, layer, init[layer]["ffn"])
                else:
                    ffn = build_ffn(v, cfg)
                ffn_norm = None if ffn is None else _norm_like(pl.post_attention_layernorm, cfg)
        # fp32 master weights: bf16 autocast on GPU computes with them, plain fp32 on CPU
        return SubBlock(attn, attn_norm, ffn, ffn_norm).to(self.device, torch.float32)

    @torch.no_grad()
    def _calibration(self) -> dict[int, dict[str, torch.Tensor]]:
        """Per layer of the unit, the parent's attention and FFN sub-block inputs on calibration tokens."""
        per: dict[int, dict[str, list[torch.Tensor]]] = {i: {"attention": [], "ffn": []} for i in self.unit.layers}
        need_attn = any(isinstance(v, AttentionVariant) for v in self.variants)
        need_ffn = any(isinstance(v, FFNVariant) for v in self.variants)
        for chunk in self.calib_seqs.split(self.bld.batch_size):
            ids = chunk.to(self.device)
            h = self.parent.embed(ids)
            cos, sin, mask = self.parent.attention_inputs(h)
            for i, layer in enumerate(self.parent.model.layers[: self.unit.end]):
                a = layer.attn_sublayer(h, cos, sin, mask)
                if i >= self.unit.start:
                    if need_attn:
                        per[i]["attention"].append(h)
                    if need_ffn:
                        per[i]["ffn"].append(a)
                h = layer.ffn_sublayer(a)
        return {i: {k: torch.cat(v) for k, v in d.items() if v} for i, d in per.items()}

    def _optimizer(self, block: SubBlock) -> torch.optim.Optimizer | None:
        params = [p for p in block.parameters()]
        if not params:
            return None
        return torch.optim.AdamW(params, lr=self.bld.lr, weight_decay=self.bld.weight_decay,
                                 betas=(0.9, 0.95), fused=self.cuda or None)

    def setup(self, layers: list[int], resume: dict[str, Any] | None) -> None:
        init = None if resume is not None else self._calibration()
        for i in layers:
            block = self._build(i, init)
            state = {k: v.detach().clone() for k, v in block.state_dict().items()}
            self.layers.append(_LayerState(i, block, self._optimizer(block), init_state=state))
        del init

    # -- evaluation --
    @torch.no_grad()
    def evaluate(self) -> dict[int, float]:
        """Normalized MSE of every block on the held-out sequences: sums over all tokens, then the ratio."""
        num = {s.layer: 0.0 for s in self.layers}
        den = {s.layer: 0.0 for s in self.layers}
        for chunk in self.eval_seqs.split(self.bld.batch_size):
            targets, (cos, sin, mask) = parent_pass(self.parent, chunk.to(self.device), self.unit,
                                                    self.unit.kind, self.autocast)
            for s in self.layers:
                tg = targets[s.layer]
                with self.autocast():
                    y = s.block(self._input(tg.x), cos, sin, mask)
                n, d = nmse_terms(y, tg.t)
                num[s.layer] += float(n)
                den[s.layer] += float(d)
        return {i: num[i] / max(den[i], 1e-30) for i in num}

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.cuda else x.float()

    # -- the loop --
    def train(self, start_step: int, on_step=None, progress: bool = True) -> dict[str, float]:
        """Optimizer steps start_step..total_steps-1. ``on_step(step_done)`` runs after each step."""
        trainable = [s for s in self.layers if s.optimizer is not None]
        order = batch_indices(len(self.train_seqs), self.bld.batch_size, self.bld.seed, start_step)
        bar = tqdm(total=self.total_steps, initial=start_step, desc=f"bld {self.unit.id}", unit="step",
                   file=sys.stderr, disable=not progress, mininterval=1.0 if sys.stderr.isatty() else 30.0)
        timed_from, t0 = None, time.perf_counter()
        for step in range(start_step, self.total_steps if trainable else start_step):
            if step - start_step == _TIMING_WARMUP_STEPS:
                self._sync()
                timed_from, t0 = step, time.perf_counter()
            ids = self.train_seqs[next(order)].to(self.device, non_blocking=True)  # (B, T)
            targets, (cos, sin, mask) = parent_pass(self.parent, ids, self.unit, self.unit.kind, self.autocast)
            lr = lr_at(step, self.total_steps, self.bld.lr, self.bld.warmup_fraction)
            for s in trainable:
                assert s.optimizer is not None
                tg = targets[s.layer]
                with self.autocast():
                    y = s.block(self._input(tg.x), cos, sin, mask)
                num, den = nmse_terms(y, tg.t)
                loss = num / den.clamp(min=1e-30)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(s.block.parameters(), self.bld.grad_clip)
                for g in s.optimizer.param_groups:
                    g["lr"] = lr
                s.optimizer.step()
                s.optimizer.zero_grad(set_to_none=True)
                s.pending.append((step + 1, loss.detach()))
            del targets
            bar.update(1)
            if on_step is not None:
                on_step(step + 1)
        self._sync()
        elapsed = time.perf_counter() - t0
        bar.close()
        for s in self.layers:
            s.flush()
        if not trainable:
            steps_timed = 0
        elif timed_from is not None:
            steps_timed = self.total_steps - timed_from
        else:
            steps_timed = self.total_steps - start_step
        return {"train_seconds": elapsed, "steps_timed": steps_timed,
                "tokens_per_second": steps_timed * self.tokens_per_step / elapsed if elapsed > 0 and steps_timed else 0.0}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    # -- checkpoints --
    def checkpoint_state(self, step: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {"rng.cpu": torch.get_rng_state()}
        if self.cuda:
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        curves = {}
        for s in self.layers:
            s.flush()
            curves[str(s.layer)] = s.curve
            for k, v in s.block.state_dict().items():
                tensors[f"block.{s.layer}.{k}"] = v
            for k, v in s.init_state.items():
                tensors[f"init.{s.layer}.{k}"] = v
            if s.optimizer is not None:
                for pi, st in s.optimizer.state_dict()["state"].items():
                    for name, v in st.items():
                        tensors[f"opt.{s.layer}.{pi}.{name}"] = v if torch.is_tensor(v) else torch.tensor(v)
        meta = {"step": step, "curves": curves, "initial_nmse": {str(s.layer): s.initial_nmse for s in self.layers}}
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, meta

    def load_checkpoint(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> int:
        torch.set_rng_state(tensors["rng.cpu"])
        if self.cuda and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        for s in self.layers:
            pre = f"block.{s.layer}."
            s.block.load_state_dict({k[len(pre):]: v for k, v in tensors.items() if k.startswith(pre)})
            pre = f"init.{s.layer}."
            s.init_state = {k[len(pre):]: v.to(self.device) for k, v in tensors.items() if k.startswith(pre)}
            s.curve = [list(x) for x in meta["curves"][str(s.layer)]]
            s.initial_nmse = meta["initial_nmse"][str(s.layer)]
            if s.optimizer is not None:
                sd = s.optimizer.state_dict()
                state: dict[int, dict[str, torch.Tensor]] = {}
                pre = f"opt.{s.layer}."
                for k, v in tensors.items():
                    if k.startswith(pre):
                        pi, name = k[len(pre):].split(".", 1)
                        state.setdefault(int(pi), {})[name] = v.to(self.device) if name != "step" else v
                sd["state"] = state
                s.optimizer.load_state_dict(sd)
        return int(meta["step"])


# ----- the step ------------------------------------------------------------------------------------
def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return "cpu"


def _curve_points(curve: list[list[float]]) -> list[list[float]]:
    """At most _MAX_CURVE_POINTS (step, loss) pairs, evenly spaced, always with the last one."""
    if len(curve) <= _MAX_CURVE_POINTS:
        return curve
    stride = math.ceil(len(curve) / _MAX_CURVE_POINTS)
    out = curve[::stride]
    return out if out[-1] == curve[-1] else [*out, curve[-1]]


def _kill_after() -> int | None:
    v = os.environ.get(KILL_ENV)
    return int(v) if v else None


def run(ctx: StepContext) -> None:
    config = ctx.config
    parent_dir = ctx.parent_dir()
    pcfg = parent_config(parent_dir)
    unit = parse_unit(ctx.unit, pcfg, config.bld.mode)
    variants = parse_variants(unit.variant, pcfg.hidden_size)

    def is_parent_variant(layer: int) -> bool:
        b = pcfg.block_configs[layer]
        return all(v == (b.attention if isinstance(v, AttentionVariant) else b.ffn) for v in variants)

    lib = Library.for_run(ctx.store, config, parent_dir)
    todo = [i for i in unit.layers if not is_parent_variant(i) and not lib.has(i, unit.variant)]
    reused = [i for i in unit.layers if lib.has(i, unit.variant)]
    for i in unit.layers:
        if is_parent_variant(i):
            log.info("bld %s: layer %d already has %s in the parent; nothing to train", unit.id, i, unit.variant)
    if reused:
        log.info("bld %s: layers %s reused from library %s", unit.id, reused, lib.uri)
    for i in reused:
        m = lib.meta(i, unit.variant)
        _metrics(ctx, i, unit.variant, m, reused=True)
    if not todo:
        return

    device = ctx.device()
    started = time.perf_counter()
    parent = load_parent(parent_dir, dtype=torch_dtype(config.parent.dtype), device=device)
    parent.requires_grad_(False)
    seq_len = config.data.seq_len
    train_seqs = sequences(load_tokens(ctx.store, "data/distillation"), seq_len)
    val = load_tokens(ctx.store, "data/validation")
    eval_seqs = sequences(val[: max(config.bld.eval_tokens, seq_len)], seq_len)
    calib = load_tokens(ctx.store, "data/distillation")
    calib_seqs = sequences(calib[: max(config.bld.calibration_tokens, seq_len)], seq_len)

    trainer = Trainer(parent, config, unit, device, train_seqs, eval_seqs, calib_seqs)
    ckpt = lib.checkpoints(unit.id)
    resume = ckpt.get_json("state.json") if ckpt.exists("state.json") else None
    if resume is not None and (resume.get("layers") != todo or resume.get("total_steps") != trainer.total_steps):
        log.warning("bld %s: checkpoint is for layers %s / %s steps, not %s / %s; starting over", unit.id,
                    resume.get("layers"), resume.get("total_steps"), todo, trainer.total_steps)
        resume = None
    try:
        trainer.setup(todo, resume)
        start_step = 0
        prior_seconds = 0.0
        if resume is not None:
            start_step = trainer.load_checkpoint(st_load(ckpt.get_bytes(resume["tensors"])), resume)
            prior_seconds = float(resume.get("seconds", 0.0))
            log.info("bld %s: resuming from step %d of %d", unit.id, start_step, trainer.total_steps)
        else:
            for i, v in trainer.evaluate().items():
                next(s for s in trainer.layers if s.layer == i).initial_nmse = v
        kill_after = _kill_after()

        def on_step(done: int) -> None:
            if done % config.bld.checkpoint_every == 0 and done < trainer.total_steps:
                _write_checkpoint(ckpt, trainer, done, todo, prior_seconds + time.perf_counter() - started)
            if kill_after is not None and done >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        timing = trainer.train(start_step, on_step)
        final = trainer.evaluate()
    except torch.OutOfMemoryError as err:
        bs = config.bld.batch_size
        raise MemoryError(
            f"bld unit {unit.id}: CUDA out of memory with bld.batch_size={bs} and data.seq_len={seq_len} "
            f"({str(err).splitlines()[0]}); lower bld.batch_size (e.g. to {max(1, bs // 2)})"
        ) from None
    seconds = prior_seconds + time.perf_counter() - started
    steps_run = trainer.total_steps if trainer.layers[0].optimizer is not None else 0
    for s in trainer.layers:
        # A block whose initialization is already better on held-out tokens than what training made
        # of it (a near-exact init, too high a learning rate) keeps the initialization: the library
        # holds the best block it has for (layer, variant), and meta says which one it is.
        assert s.initial_nmse is not None
        kept_initial = bool(s.init_state) and final[s.layer] >= s.initial_nmse
        if kept_initial:
            log.warning("bld %s: layer %d: trained nmse %.3g is not below the initialization's %.3g; keeping the "
                        "initialization (lower bld.lr?)", unit.id, s.layer, final[s.layer], s.initial_nmse)
        meta = {
            "unit": unit.id,
            "kind": unit.kind,
            "mode": config.bld.mode,
            "initial_nmse": s.initial_nmse,
            "final_nmse": s.initial_nmse if kept_initial else final[s.layer],
            "trained_nmse": final[s.layer],
            "kept": "initial" if kept_initial else "trained",
            "loss_curve": _curve_points(s.curve),
            "steps": steps_run,
            "tokens_seen": steps_run * trainer.tokens_per_step,
            "eval_tokens": int(eval_seqs.numel()),
            "seconds": seconds,
            "train_seconds": timing["train_seconds"],
            "tokens_per_second": timing["tokens_per_second"],
            "device": _device_name(device),
            "dtype": config.parent.dtype,
            "autocast": "bfloat16" if device.type == "cuda" else None,
            "library": lib.digest,
            "created_at": _dt.datetime.now(_dt.UTC).isoformat(),
        }
        weights = s.init_state if kept_initial else s.block.state_dict()
        sd = {k: v.to(torch_dtype(config.parent.dtype)) for k, v in weights.items()}
        lib.save_block(s.layer, unit.variant, sd, meta)
        _metrics(ctx, s.layer, unit.variant, meta, reused=False)
    for key in ckpt.list():
        ckpt.delete(key)


def _write_checkpoint(ckpt, trainer: Trainer, step: int, layers: list[int], seconds: float) -> None:
    """Tensors under a step-numbered key first, then state.json naming them; older tensors removed last."""
    tensors, meta = trainer.checkpoint_state(step)
    name = f"step-{step:08d}.safetensors"
    ckpt.put_bytes(name, st_save(tensors))
    old = [k for k in ckpt.list() if k.startswith("step-") and k != name]
    ckpt.put_json("state.json", {**meta, "tensors": name, "layers": layers,
                                 "total_steps": trainer.total_steps, "seconds": seconds})
    for k in old:
        ckpt.delete(k)


def _metrics(ctx: StepContext, layer: int, variant: str, meta: dict[str, Any], reused: bool) -> None:
    labels = {"layer": layer, "variant": variant}
    curve = meta.get("loss_curve") or []
    loss = curve[-1][1] if curve else meta["final_nmse"]
    ctx.metrics.set("bld_loss", loss, help="Last training loss (normalized MSE) of the block", **labels)
    ctx.metrics.set("bld_tokens_per_second", meta.get("tokens_per_second", 0.0),
                    help="Training tokens per second (steady state)", **labels)
    ctx.metrics.set("bld_seconds", 0.0 if reused else meta["seconds"],
                    help="Wall-clock seconds this unit spent on the block (0: reused)", **labels)
    ctx.metrics.set("bld_normalized_mse", meta["initial_nmse"], help="Held-out normalized MSE",
                    phase="initial", **labels)
    ctx.metrics.set("bld_normalized_mse", meta["final_nmse"], help="Held-out normalized MSE",
                    phase="final", **labels)
    ctx.metrics.set("bld_reused", 1 if reused else 0, help="1 when the block came from the library", **labels)

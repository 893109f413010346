"""The ``bld`` step: blockwise local distillation of one stage (one pod): every candidate block of a
contiguous layer range, trained from one parent pass per batch (:mod:`puzzle.distill.bld`).

Unit (planned by prepare with :func:`puzzle.planning.plan_stages`)::

    {"id": "bld.l000-008", "layers": [0, 8], "blocks": ["attn_g4", "attn_noop", "ffn_m1.0", ...],
     "resident_layers": [0, 1, ...]}

``blocks`` are sub-block names in ``bld.mode: decoupled`` and ``"<attn>+<ffn>"`` names in ``coupled``.
Every (layer, block) of the unit that is not the parent's own variant there and not in the library yet
is trained; library entries are per (layer, variant) and content-addressed (:mod:`puzzle.library`), so a
block any earlier run or stage trained is reused. The parent's layers listed in ``resident_layers`` stay
on the device; the others stream from the safetensors files (:mod:`puzzle.model.streaming`).

- Every ``bld.checkpoint_every`` steps the unit's state (every block, optimizer, step, RNG, loss curves)
  goes to the library's ``checkpoints/<unit-id>/``; a retried unit resumes there and ends with the same
  weights as an uninterrupted run. A checkpoint that cannot be read is discarded (the unit starts over).
- The library keeps the better (on held-out tokens) of the trained block and its initialization;
  ``meta.json`` records both errors and which one was kept.

Run one with ``puzzle step bld --run RUN_URI --unit JSON``. Fault injection for tests:
``PUZZLE_BLD_KILL_AFTER_STEP=k`` makes the process SIGKILL itself right after optimizer step k, exactly
as a preempted pod dies (no cleanup, no final write).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

import torch

from puzzle.config import PuzzleConfig
from puzzle.context import StepContext
from puzzle.data.shards import load_tokens, sequences
from puzzle.distill.bld import Entry, StageTrainer, entry_name
from puzzle.errors import UnitError
from puzzle.library import Library
from puzzle.model import AttentionVariant, ModelConfig, VariantNameError, parent_config, parse_name
from puzzle.model.io import torch_dtype
from puzzle.model.streaming import ParentLayers
from puzzle.training import clear_checkpoint, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

KILL_ENV = "PUZZLE_BLD_KILL_AFTER_STEP"
_MAX_CURVE_POINTS = 200


@dataclass(frozen=True)
class StageUnit:
    id: str
    start: int
    end: int  # exclusive
    blocks: tuple[str, ...]
    resident_layers: tuple[int, ...] | None  # None: every layer the unit needs

    @property
    def layers(self) -> range:
        return range(self.start, self.end)


def parse_unit(unit: dict[str, Any], cfg: ModelConfig, mode: str) -> StageUnit:
    """Check a bld unit against the parent and the BLD mode; every problem is a UnitError naming it."""
    for k in ("layers", "blocks"):
        if k not in unit:
            raise UnitError(f"bld unit {unit.get('id')!r}: field {k!r} is missing; a bld unit needs 'id', "
                            "'layers' [start, end) and 'blocks' (variant names)")
    layers, blocks = unit["layers"], unit["blocks"]
    n = cfg.num_hidden_layers
    if (not isinstance(layers, list) or len(layers) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise UnitError(f"layers: {layers!r} is not allowed; must be [start, end) with integers")
    a, b = layers
    if not (0 <= a < b <= n):
        raise UnitError(f"layers: {layers!r} is outside the parent, which has {n} layers; allowed: "
                        f"0 <= start < end <= {n}")
    if not isinstance(blocks, list) or not blocks or not all(isinstance(x, str) for x in blocks):
        raise UnitError(f"blocks: {blocks!r} is not allowed; must be a non-empty list of variant names")
    kinds = ("block",) if mode == "coupled" else ("attention", "ffn")
    for name in blocks:
        try:
            kind = "block" if "+" in name else ("attention" if name.startswith("attn_") else "ffn")
            if kind not in kinds:
                raise VariantNameError(
                    f"{name!r} is a {kind} variant, which bld.mode {mode!r} does not train; allowed here: "
                    + ("'<attn>+<ffn>' names" if mode == "coupled" else "attention and FFN names"))
            parse_name(name, cfg.hidden_size, cfg.num_attention_heads, kind=kind)
        except VariantNameError as err:
            raise UnitError(f"blocks: {err}") from None
    resident = unit.get("resident_layers")
    if resident is not None and (not isinstance(resident, list) or not all(
            isinstance(x, int) and not isinstance(x, bool) and 0 <= x < b for x in resident)):
        raise UnitError(f"resident_layers: {resident!r} is not allowed; must be layer indices in [0, {b})")
    return StageUnit(str(unit["id"]), a, b, tuple(blocks), tuple(resident) if resident is not None else None)


def _is_parent_variant(cfg: ModelConfig, layer: int, name: str) -> bool:
    own = cfg.block_configs[layer]
    parts = parse_name(name, cfg.hidden_size)
    return all(v == (own.attention if isinstance(v, AttentionVariant) else own.ffn) for v in parts)


def _curve_points(curve: list[list[float]]) -> list[list[float]]:
    """At most _MAX_CURVE_POINTS (step, loss) pairs, evenly spaced, always with the last one."""
    if len(curve) <= _MAX_CURVE_POINTS:
        return curve
    stride = math.ceil(len(curve) / _MAX_CURVE_POINTS)
    out = curve[::stride]
    return out if out[-1] == curve[-1] else [*out, curve[-1]]


def _device_name(device: torch.device) -> str:
    return f"cuda:{torch.cuda.get_device_name(device)}" if device.type == "cuda" else "cpu"


def _kill_after() -> int | None:
    v = os.environ.get(KILL_ENV)
    return int(v) if v else None


def host_cache_bytes(config: PuzzleConfig) -> int:
    return int(config.compute.host_memory_gib * 2**30)


def run(ctx: StepContext) -> None:
    config = ctx.config
    parent_dir = ctx.parent_dir()
    pcfg = parent_config(parent_dir)
    unit = parse_unit(ctx.unit, pcfg, config.bld.mode)
    lib = Library.for_run(ctx.store, config, parent_dir)
    pairs = [(i, name) for i in unit.layers for name in unit.blocks if not _is_parent_variant(pcfg, i, name)]
    usable = {(i, name): lib.usable(i, name) for i, name in pairs}
    reused = [p for p in pairs if usable[p]]
    todo = [p for p in pairs if not usable[p]]
    for i, name in todo:
        if lib.has(i, name):
            log.warning("bld %s: library entry %s is damaged (unreadable meta or missing weights); training it "
                        "again", unit.id, entry_name(i, name))
    if reused:
        log.info("bld %s: %d blocks reused from library %s", unit.id, len(reused), lib.uri)
    for i, name in reused:
        _metrics(ctx, i, name, lib.meta(i, name), reused=True)
    if not todo:
        return

    device = ctx.device()
    started = time.perf_counter()
    dtype = torch_dtype(config.parent.dtype)
    resident = unit.resident_layers if unit.resident_layers is not None else range(unit.end)
    parent = ParentLayers(parent_dir, pcfg, dtype, device, resident=resident,
                          host_cache_bytes=host_cache_bytes(config))
    seq_len = config.data.seq_len
    train_seqs = sequences(load_tokens(ctx.store, "distillation"), seq_len)
    val = load_tokens(ctx.store, "validation")
    eval_seqs = sequences(val[: max(config.bld.eval_tokens, seq_len)], seq_len)
    calib_seqs = train_seqs[: max(1, math.ceil(config.bld.calibration_tokens / seq_len))]

    trainer = StageTrainer(parent, config.bld, todo, config.bld.mode, device, train_seqs, eval_seqs, calib_seqs)
    ckpt = lib.checkpoints(unit.id)
    loaded = load_checkpoint(ckpt)
    resume = None
    if loaded is not None:
        state, meta = loaded
        want = {"entries": [entry_name(i, v) for i, v in sorted(todo)], "total_steps": trainer.total_steps}
        if {k: meta.get(k) for k in want} == want:
            resume = (state, meta)
        else:
            log.warning("bld %s: the checkpoint is for %s entries / %s steps, not %d / %d; starting over", unit.id,
                        len(meta.get("entries") or []), meta.get("total_steps"), len(todo), trainer.total_steps)
    elif ckpt.exists("state.json"):
        log.warning("bld %s: the checkpoint in %s cannot be read; starting the unit over", unit.id, ckpt.uri)
    try:
        trainer.setup(resume=resume is not None)
        start_step, prior_seconds = 0, 0.0
        if resume is not None:
            start_step = trainer.load_state_dict(resume[0])
            prior_seconds = float(resume[1].get("seconds", 0.0))
            log.info("bld %s: resuming from step %d of %d", unit.id, start_step, trainer.total_steps)
        else:
            for name, v in trainer.evaluate().items():
                next(e for e in trainer.entries if e.name == name).initial_nmse = v
        kill_after = _kill_after()
        entries = [e.name for e in trainer.entries]

        target = trainer.total_steps * trainer.tokens_per_step

        def progress(done: int) -> None:
            # what the dashboard's progress panel and the stalled-BLD alert read, pushed while training
            ctx.metrics.set("bld_tokens_total", done * trainer.tokens_per_step, help="Tokens trained so far")
            ctx.metrics.set("bld_target_tokens", target, help="Tokens the unit trains in all")
            ctx.metrics.push()

        progress(start_step)

        def on_step(done: int) -> None:
            if done % config.bld.checkpoint_every == 0:
                progress(done)
            if done % config.bld.checkpoint_every == 0 and done < trainer.total_steps:
                save_checkpoint(ckpt, trainer.state_dict(), {
                    "entries": entries, "total_steps": trainer.total_steps, "step": done,
                    "seconds": prior_seconds + time.perf_counter() - started})
            if kill_after is not None and done >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        timing = trainer.train(start_step, on_step, desc=f"bld {unit.id}")
        final = trainer.evaluate()
    except torch.OutOfMemoryError as err:
        bs = config.bld.batch_size
        raise MemoryError(
            f"bld unit {unit.id}: CUDA out of memory with bld.batch_size={bs} and data.seq_len={seq_len} "
            f"({str(err).splitlines()[0]}); lower bld.batch_size (e.g. to {max(1, bs // 2)}) or plan smaller "
            "stages (compute.gpu_memory_gib, bld.stage_layers)"
        ) from None
    finally:
        parent.close()
    seconds = prior_seconds + time.perf_counter() - started
    for e in trainer.entries:
        meta = _entry_meta(e, final[e.name], trainer, timing, unit, config, seconds, device, eval_seqs, lib)
        weights = e.init_state if meta["kept"] == "initial" else e.block.state_dict()
        sd = {k: v.to(torch_dtype(config.parent.dtype)) for k, v in weights.items()}
        lib.save_block(e.layer, e.variant, sd, meta)
        _metrics(ctx, e.layer, e.variant, meta, reused=False)
    clear_checkpoint(ckpt)


def _entry_meta(e: Entry, final_nmse: float, trainer: StageTrainer, timing: dict[str, Any], unit: StageUnit,
                config: PuzzleConfig, seconds: float, device: torch.device, eval_seqs: torch.Tensor,
                lib: Library) -> dict[str, Any]:
    # A block whose initialization is already better on held-out tokens than what training made of it (a
    # near-exact init, too high a learning rate) keeps the initialization: the library holds the best block
    # it has for (layer, variant), and meta says which one it is.
    assert e.initial_nmse is not None
    kept_initial = bool(e.init_state) and final_nmse >= e.initial_nmse
    if kept_initial:
        log.warning("bld %s: %s: trained nmse %.3g is not below the initialization's %.3g; keeping the "
                    "initialization (lower bld.lr?)", unit.id, e.name, final_nmse, e.initial_nmse)
    steps = timing["steps"] if e.trainable else 0
    return {
        "unit": unit.id,
        "stage": [unit.start, unit.end],
        "kind": e.kind,
        "mode": config.bld.mode,
        "initial_nmse": e.initial_nmse,
        "final_nmse": e.initial_nmse if kept_initial else final_nmse,
        "trained_nmse": final_nmse,
        "kept": "initial" if kept_initial else "trained",
        "loss_curve": _curve_points(e.part.curve),
        "steps": steps,
        "tokens_seen": steps * trainer.tokens_per_step,
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


def _metrics(ctx: StepContext, layer: int, variant: str, meta: dict[str, Any], reused: bool) -> None:
    labels = {"layer": layer, "variant": variant}
    curve = meta.get("loss_curve") or []
    loss = curve[-1][1] if curve else meta["final_nmse"]
    ctx.metrics.set("bld_loss", loss, help="Last training loss (normalized MSE) of the block", **labels)
    ctx.metrics.set("bld_tokens_per_second", meta.get("tokens_per_second", 0.0),
                    help="Training tokens per second of the stage (steady state)", **labels)
    ctx.metrics.set("bld_seconds", 0.0 if reused else meta["seconds"],
                    help="Wall-clock seconds this unit spent (0: reused)", **labels)
    ctx.metrics.set("bld_normalized_mse", meta["initial_nmse"], help="Held-out normalized MSE",
                    phase="initial", **labels)
    ctx.metrics.set("bld_normalized_mse", meta["final_nmse"], help="Held-out normalized MSE",
                    phase="final", **labels)
    ctx.metrics.set("bld_reused", 1 if reused else 0, help="1 when the block came from the library", **labels)

"""The one training loop of the project: schedule, AdamW, clipping, autocast and a resumable checkpoint.

Three things train here: BLD's blocks (many independent parts from one parent pass per batch), the
child in global knowledge distillation (GKD) and the tiny parent. They share:

- :class:`Schedule`: linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr_ratio`` of the
  peak at the last step; :meth:`Schedule.from_fraction` is the only place a warm-up fraction is rounded.
- :class:`Part`: a module, its AdamW optimizer and its gradient-clipping threshold. A step's losses come
  one part at a time from the caller's ``loss_fn`` and each is back-propagated, clipped and stepped at
  once, so the autograd graph of one part is freed before the next part's forward runs (BLD keeps tens
  of blocks of one stage resident; their activations never are at the same time).
- :class:`Trainer`: the loop itself (``train``), with bf16 autocast on GPU, and its state as a dict of
  stateful objects (torchtitan's checkpoint idea): ``state_dict()`` / ``load_state_dict()`` hold every
  part's weights and optimizer state, the step and the RNG states, so a resumed run ends with the same
  weights as an uninterrupted one.
- ``Trainer(..., sharded=True)`` (GKD): the parts are FSDP2-sharded over the ranks of a torchrun step
  (:mod:`puzzle.distributed`; plain modules at world size 1, the same code). Each rank's loss is its
  share of the batch, scaled so that the mean over ranks is the batch's loss; FSDP2 averages the
  gradients over ranks, so they equal one process's; clipping measures the norm over the sharded
  gradients (DTensors) as a whole; the recorded losses are the mean over ranks; ``state_dict()`` is the
  full state gathered to rank 0 with parameter names as keys (the same at any world size, so a
  checkpoint of N ranks resumes on M) and ``load_state_dict()`` spreads rank 0's back to the shards.
- :func:`save_checkpoint` / :func:`load_checkpoint`: that state in a store, as one safetensors blob of
  tensors plus a JSON tree (no pickle), written tensors first and ``state.json`` last.

Use::

    parts = {"child": Part("child", model, adamw(model.parameters(), lr=1e-4), grad_clip=1.0)}
    trainer = Trainer(parts, Schedule.from_fraction(total, 1e-4, 0.05), device)
    trainer.train(start_step, total, lambda step: [("child", loss_of(batch(step)))], on_step=...)
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from tqdm import tqdm

from puzzle import distributed as dist

#: Steps left out of the tokens/s figure (kernel selection, allocator growth).
TIMING_WARMUP_STEPS = 2


# ----- the learning-rate schedule -------------------------------------------------------------------------
@dataclass(frozen=True)
class Schedule:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine to ``peak_lr * min_lr_ratio``."""

    total_steps: int
    peak_lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps: {self.total_steps} is not allowed; must be >= 1")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is not allowed; must be in [0, total_steps]")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: {self.min_lr_ratio} is not allowed; must be in [0, 1]")

    @classmethod
    def from_fraction(cls, total_steps: int, peak_lr: float, warmup_fraction: float,
                      min_lr_ratio: float = 0.0) -> Schedule:
        """The warm-up as a fraction of the steps (config fields ``*.warmup_fraction``), rounded once here."""
        return cls(total_steps, peak_lr, round(warmup_fraction * total_steps), min_lr_ratio)

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        floor = self.peak_lr * self.min_lr_ratio
        return floor + 0.5 * (self.peak_lr - floor) * (1.0 + math.cos(math.pi * progress))


def steps_for(tokens: int, batch_size: int, seq_len: int) -> int:
    """Optimizer steps that consume ``tokens`` tokens at ``batch_size`` sequences of ``seq_len`` (at least one)."""
    return max(1, math.ceil(tokens / (batch_size * seq_len)))


# ----- parts and the loop ---------------------------------------------------------------------------------
def adamw(params: Iterable[nn.Parameter] | Iterable[dict[str, Any]], lr: float, weight_decay: float = 0.0,
          betas: tuple[float, float] = (0.9, 0.95), fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW as every trainer here uses it (fused on GPU)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas, eps=1e-8, fused=fused)


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups that decay matrices only: decaying RMSNorm gains toward 0 fights the normalization."""
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


@dataclass
class Part:
    """One independently optimized module: its optimizer (None: nothing to train) and clipping threshold."""

    name: str
    module: nn.Module
    optimizer: torch.optim.Optimizer | None
    grad_clip: float = 1.0
    #: per-step losses not synced to the host yet (a sync per step would stall the GPU)
    pending: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    #: (step, loss) pairs, synced
    curve: list[list[float]] = field(default_factory=list)

    def flush(self, mean_over_ranks: bool = False) -> None:
        """Sync pending losses to ``curve``; ``mean_over_ranks``: each rank's share averaged (a collective:
        every rank flushes at the same steps)."""
        if self.pending:
            vals_t = torch.stack([v.float() for _, v in self.pending])
            if mean_over_ranks and dist.world() > 1:
                vals_t = dist.all_reduce_sum(vals_t) / dist.world()
            vals = vals_t.tolist()
            self.curve.extend([float(s), float(v)] for (s, _), v in zip(self.pending, vals, strict=True))
            self.pending.clear()


LossFn = Callable[[int], Iterable[tuple[str, torch.Tensor]]]


@dataclass
class TrainResult:
    steps: int  # optimizer steps run by this call
    train_seconds: float
    steps_timed: int
    tokens_per_second: float


class Trainer:
    """The training loop over named parts (see the module docstring)."""

    def __init__(self, parts: Mapping[str, Part], schedule: Schedule, device: torch.device | str,
                 autocast: bool | None = None, tokens_per_step: int = 0, sharded: bool = False) -> None:
        self.parts = dict(parts)
        #: parts FSDP2-sharded over the ranks (see the module docstring)
        self.sharded = sharded
        self.schedule = schedule
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.use_autocast = self.cuda if autocast is None else autocast
        self.tokens_per_step = tokens_per_step
        self.step = 0  # optimizer steps done

    def autocast(self):
        """bf16 autocast on GPU (fp32 master weights), plain fp32 on CPU."""
        if self.use_autocast:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def optimizer_step(self, part: Part, loss: torch.Tensor, step: int) -> None:
        """Back-propagate one part's loss, clip, step its optimizer at this step's learning rate."""
        assert part.optimizer is not None, f"part {part.name!r} has nothing to train"
        loss.backward()
        torch.nn.utils.clip_grad_norm_(part.module.parameters(), part.grad_clip)
        lr = self.schedule.lr(step)
        for g in part.optimizer.param_groups:
            g["lr"] = lr
        part.optimizer.step()
        part.optimizer.zero_grad(set_to_none=True)
        part.pending.append((step + 1, loss.detach()))

    def train(self, start_step: int, end_step: int, loss_fn: LossFn,
              on_step: Callable[[int], None] | None = None, desc: str = "train", progress: bool = True,
              postfix: Callable[[], str] | None = None) -> TrainResult:
        """Optimizer steps ``start_step .. end_step - 1``. ``loss_fn(step)`` yields ``(part name, loss)``
        pairs; each is stepped as it comes. ``on_step(steps_done)`` runs after every step (checkpoints)."""
        self.step = start_step
        bar = tqdm(total=end_step, initial=start_step, desc=desc, unit="step", file=sys.stderr,
                   disable=not progress or not dist.is_main(), mininterval=1.0 if sys.stderr.isatty() else 30.0, leave=False)
        timed_from, t0 = None, time.perf_counter()
        for step in range(start_step, end_step):
            if step - start_step == TIMING_WARMUP_STEPS:
                self.synchronize()
                timed_from, t0 = step, time.perf_counter()
            for name, loss in loss_fn(step):
                self.optimizer_step(self.parts[name], loss, step)
            self.step = step + 1
            bar.update(1)
            if postfix is not None and (step % 10 == 0 or step == end_step - 1):
                bar.set_postfix_str(postfix())
            if on_step is not None:
                on_step(self.step)
        self.synchronize()
        elapsed = time.perf_counter() - t0
        bar.close()
        self.flush()
        ran = end_step - start_step
        timed = (end_step - timed_from) if timed_from is not None else ran
        tps = timed * self.tokens_per_step / elapsed if elapsed > 0 and timed and self.tokens_per_step else 0.0
        return TrainResult(ran, elapsed, timed, tps)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def flush(self) -> None:
        for p in self.parts.values():
            p.flush(mean_over_ranks=self.sharded)

    # -- state: a dict of stateful objects --
    def state_dict(self) -> dict[str, Any]:
        """Every part's weights and optimizer state, the step, the RNG states. Sharded: a collective;
        rank 0 gets the full state (the other ranks' weights and optimizer entries are empty)."""
        self.flush()
        if self.sharded:
            return self._full_state_dict()
        state: dict[str, Any] = {
            "step": self.step,
            "rng": {"cpu": torch.get_rng_state()},
            "parts": {name: {"model": p.module.state_dict(),
                             "optimizer": p.optimizer.state_dict() if p.optimizer is not None else None,
                             "curve": p.curve}
                      for name, p in self.parts.items()},
        }
        if self.cuda:
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _full_state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"step": self.step, "rng": {"cpu": torch.get_rng_state()}, "parts": {}}
        if self.cuda:
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        for name, p in self.parts.items():
            msd, osd = dist.model_state(p.module, p.optimizer)
            state["parts"][name] = {"model": msd, "optimizer": osd, "curve": p.curve}
        return state

    def _load_full_state_dict(self, state: Mapping[str, Any] | None) -> None:
        # what is small (step, RNG, curves, which parts) goes by pickle from rank 0; weights and
        # optimizer state by FSDP's own broadcast, one tensor at a time
        small = dist.broadcast_object(None if state is None else {
            "step": state["step"], "rng": state["rng"],
            "parts": {n: {"curve": ps["curve"], "optimizer": ps["optimizer"] is not None}
                      for n, ps in state["parts"].items()}})
        assert small is not None, "load_state_dict: the state is needed on rank 0"
        self._restore_step_and_rng(small)
        for name, p in self.parts.items():
            ps = state["parts"][name] if state is not None and dist.is_main() else {"model": {}, "optimizer": {}}
            with_opt = p.optimizer is not None and small["parts"][name]["optimizer"]
            dist.load_model_state(p.module, p.optimizer if with_opt else None, ps["model"],
                                  ps["optimizer"] if with_opt else None)
            p.curve = [list(x) for x in small["parts"][name]["curve"]]
            p.pending.clear()

    def _restore_step_and_rng(self, state: Mapping[str, Any]) -> None:
        """The parts a checkpoint must name, its step and its RNG states (both load paths)."""
        missing = sorted(set(self.parts) - set(state["parts"]))
        if missing:
            raise ValueError(f"checkpoint lacks parts {missing[:8]}; it belongs to another unit")
        self.step = int(state["step"])
        torch.set_rng_state(state["rng"]["cpu"])
        if self.cuda and "cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Inverse of :meth:`state_dict`. Sharded: a collective; ``state`` is read on rank 0 only (None
        elsewhere)."""
        if self.sharded:
            self._load_full_state_dict(state)
            return
        assert state is not None
        self._restore_step_and_rng(state)
        for name, p in self.parts.items():
            ps = state["parts"][name]
            p.module.load_state_dict(ps["model"])
            if p.optimizer is not None and ps["optimizer"] is not None:
                p.optimizer.load_state_dict(ps["optimizer"])
            p.curve = [list(x) for x in ps["curve"]]
            p.pending.clear()


# ----- checkpoints in a store: safetensors for tensors, JSON for the rest ----------------------------------
_TENSOR = "__tensor__"
STATE_NAME = "state.json"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """(tensors by path, the JSON tree with each tensor replaced by ``{"__tensor__": path}``)."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(o: Any, path: str) -> Any:
        if torch.is_tensor(o):
            tensors[path] = o.detach().to("cpu").contiguous()
            return {_TENSOR: path}
        if isinstance(o, Mapping):
            return {"__map__": [[k if isinstance(k, str) else {"int": k}, walk(v, f"{path}.{k}")]
                                for k, v in o.items()]}
        if isinstance(o, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(o)]
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise TypeError(f"checkpoint state at {path!r}: {type(o).__name__} is not a tensor, number, str or container")

    return tensors, walk(obj, prefix or "s")


def unflatten_state(tree: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(tree, dict):
        if _TENSOR in tree:
            return tensors[tree[_TENSOR]]
        return {(k["int"] if isinstance(k, dict) else k): unflatten_state(v, tensors) for k, v in tree["__map__"]}
    if isinstance(tree, list):
        return [unflatten_state(v, tensors) for v in tree]
    return tree


def save_checkpoint(store, state: Mapping[str, Any], meta: Mapping[str, Any] | None = None) -> str:
    """Write ``state`` (a dict of tensors, numbers and containers) to ``store``: the tensors under a
    step-numbered key first, then ``state.json`` naming them, then older tensors removed."""
    tensors, tree = flatten_state(state)
    name = f"step-{int(state.get('step', 0)):08d}.safetensors"
    store.put_bytes(name, st_save(tensors))
    old = [k for k in store.list() if k.startswith("step-") and k != name]
    store.put_json(STATE_NAME, {"tensors": name, "tree": tree, **(meta or {})})
    for k in old:
        store.delete(k)
    return name


def load_checkpoint(store) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(state, meta) of the checkpoint in ``store``, or None when there is none (or it is unreadable:
    a checkpoint whose tensors were lost is discarded, and the unit starts over)."""
    if not store.exists(STATE_NAME):
        return None
    try:
        record = store.get_json(STATE_NAME)
        tensors = st_load(store.get_bytes(record["tensors"]))
        state = unflatten_state(record["tree"], tensors)
    except Exception:  # noqa: BLE001 - any damage means: no usable checkpoint
        return None
    meta = {k: v for k, v in record.items() if k not in ("tensors", "tree")}
    return state, meta


def clear_checkpoint(store) -> None:
    for key in store.list():
        store.delete(key)


__all__ = [
    "Part", "Schedule", "TrainResult", "Trainer", "adamw", "clear_checkpoint", "decay_groups", "flatten_state",
    "load_checkpoint", "save_checkpoint", "steps_for", "unflatten_state",
]

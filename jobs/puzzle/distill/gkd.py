"""Global knowledge distillation (GKD): the assembled child learns from the parent as a whole.

After assembly every block of the child was trained only locally (BLD), against the parent's inputs
at its own layer; stacked, their small errors compound. Puzzle (arXiv 2411.19146, section 5) closes
that gap by distilling the whole child from the parent on a short budget of tokens with

    loss = kl_weight * KL(parent || child) on next-token distributions
         + cosine_weight * mean over layers of (1 - cos(h_child, h_parent)) on each layer's output

(the paper found the LM loss on the data itself harmful next to these two, so it is not used). A
child keeps one entry per parent layer (no_op sub-blocks make a layer the identity), so the residual
streams after each layer line up one to one.

Deterministic: the data order comes from :func:`puzzle.data.shards.batch_indices` (seed, step) and
the parameters from the assembled weights, so two runs of one unit give the same child. The same
budget (``assemble.gkd``) is given to the baselines.

Sharded (``assemble`` under torchrun, :mod:`puzzle.distributed`): child and teacher are FSDP2 modules
and every rank takes its contiguous share of each step's batch of ``batch_size`` sequences (the global
batch stays ``batch_size``). Both loss terms are means over the batch's tokens, so a rank's share of
``n_r`` of ``B`` sequences is scaled by ``n_r * W / B``: the mean over the W ranks, which FSDP2's
gradient averaging takes, is then the batch's loss, and the gradients, the clipped norm, the recorded
losses and so the weights equal one process's up to fp32 rounding (the tests hold them to 1e-6).
Held-out KL runs the one-process batches dealt round-robin. Use::

    result = distill(child, parent, seqs, config.assemble.gkd, seed=config.seed, eval_seqs=held_out)
    result.curve          # [{step, loss, kl, cosine, tokens}], result.initial_kl, result.final_kl
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from puzzle import distributed as dist
from puzzle.config import GKDConfig
from puzzle.data.shards import batch_indices
from puzzle.model import DeciLMForCausalLM
from puzzle.training import (
    Part,
    Schedule,
    Trainer,
    adamw,
    clear_checkpoint,
    load_checkpoint,
    save_checkpoint,
    steps_for,
)

_MAX_CURVE_POINTS = 200
#: what a checkpoint's state holds: full state dicts keyed by parameter name (Trainer(sharded=True));
#: an older checkpoint (optimizer state keyed by position) is not resumed, the unit starts over
CHECKPOINT_FORMAT = 2


@dataclass
class GKDResult:
    """What a GKD run did: steps, tokens, the loss curve and the held-out KL before and after."""

    steps: int
    tokens: int
    seconds: float
    initial_kl: float | None
    final_kl: float | None
    curve: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def gkd_loss(
    child_logits: torch.Tensor,  # (B, T, V)
    child_hidden: list[torch.Tensor],  # L + 1 of (B, T, C)
    parent_logits: torch.Tensor,  # (B, T, V)
    parent_hidden: list[torch.Tensor],  # L + 1 of (B, T, C)
    kl_weight: float,
    cosine_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, kl per token, mean cosine distance) of one batch; the last two detached."""
    logp_child = F.log_softmax(child_logits.float(), dim=-1)  # (B, T, V)
    logp_parent = F.log_softmax(parent_logits.float(), dim=-1)
    n_tok = child_logits.shape[0] * child_logits.shape[1]
    kl = F.kl_div(logp_child, logp_parent, log_target=True, reduction="sum") / n_tok
    # index 0 is the embedding, shared and identical: only the layers' outputs carry signal
    cos = torch.stack([
        (1 - F.cosine_similarity(hc.float(), hp.float(), dim=-1)).mean()
        for hc, hp in zip(child_hidden[1:], parent_hidden[1:], strict=True)
    ]).mean()
    loss = kl_weight * kl + cosine_weight * cos
    return loss, kl.detach(), cos.detach()


def num_steps(cfg: GKDConfig, seq_len: int) -> int:
    """Optimizer steps that consume ``cfg.tokens`` tokens (at least one)."""
    return steps_for(cfg.tokens, cfg.batch_size, seq_len)


@torch.no_grad()
def held_out_kl(child: DeciLMForCausalLM, parent: DeciLMForCausalLM, seqs: torch.Tensor, batch_size: int) -> float:
    """KL(parent || child) per token on ``seqs`` (N, T); sharded: each rank its round-robin batches."""
    dev = next(child.parameters()).device
    total, n = 0.0, 0
    for span, counted in dist.rank_batches(len(seqs), batch_size):
        ids = seqs[span].to(dev)  # (B, T)
        lp = F.log_softmax(parent(ids).float(), dim=-1)
        lc = F.log_softmax(child(ids).float(), dim=-1)
        kl = F.kl_div(lc, lp, log_target=True, reduction="sum").item()
        if counted:  # a sharded forward is a collective: a rank short of a batch runs one uncounted
            total += kl
            n += ids.numel()
    total, n = dist.all_reduce_sum([total, n])
    return total / max(n, 1)


def distill(
    child: DeciLMForCausalLM,
    parent: DeciLMForCausalLM,
    seqs: torch.Tensor,  # (N, T) distillation sequences
    cfg: GKDConfig,
    seed: int = 0,
    eval_seqs: torch.Tensor | None = None,  # (M, T) held-out sequences for the before/after KL
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    desc: str = "gkd",
    checkpoints=None,  # a Store: resumable state every cfg.checkpoint_every steps (None: no checkpoints)
    resume_key: str = "",  # what the checkpoint must have been made for (the unit), else it is ignored
) -> GKDResult:
    """Train every parameter of ``child`` towards ``parent`` (frozen) for ``cfg.tokens`` tokens.

    With ``checkpoints``, the state (weights, optimizer, step, RNG, curve) is saved every
    ``cfg.checkpoint_every`` steps and a second call resumes from it, ending with the weights an
    uninterrupted call would have produced; the checkpoint is removed when training ends.

    Sharded over the ranks of a torchrun step, ``child`` and ``parent`` are FSDP2 modules
    (:func:`puzzle.distributed.distribute`) and every rank calls this with the same arguments, except
    ``checkpoints``: rank 0 alone reads and writes them (None on the other ranks).
    """
    if len(seqs) == 0:
        raise ValueError("seqs: no distillation sequences; GKD needs at least one")
    if len(child.model.layers) != len(parent.model.layers):
        raise ValueError(
            f"child has {len(child.model.layers)} layers, parent {len(parent.model.layers)}; GKD aligns "
            "hidden states layer by layer and needs equal counts (no_op keeps a layer, it does not remove it)"
        )
    W = dist.world()
    if cfg.batch_size < W:
        raise ValueError(f"assemble.gkd.batch_size: {cfg.batch_size} is not allowed on {W} GPUs; every GPU needs "
                         f"a share of each batch, so it must be >= {W}")
    dev = next(child.parameters()).device
    seq_len = seqs.shape[1]
    total = num_steps(cfg, seq_len)
    parent.eval()
    for p in parent.parameters():
        p.requires_grad_(False)
    cuda = dev.type == "cuda"
    params = [p for p in child.parameters() if p.requires_grad]
    part = Part("child", child, adamw(params, cfg.lr, fused=cuda or None), cfg.grad_clip)
    trainer = Trainer({"child": part}, Schedule.from_fraction(total, cfg.lr, cfg.warmup_fraction), dev,
                      tokens_per_step=cfg.batch_size * seq_len, sharded=True)
    start, initial, prior = 0, None, 0.0
    curve: list[dict[str, float]] = []
    # gathering the state is a collective: every rank checkpoints when rank 0 has somewhere to write
    checkpointing = dist.broadcast_object(checkpoints is not None)
    resumed = load_checkpoint(checkpoints) if checkpoints is not None and dist.is_main() else None
    usable = resumed is not None and all(resumed[1].get(k) == v for k, v in (
        ("total_steps", total), ("key", resume_key), ("format", CHECKPOINT_FORMAT)))
    meta = dist.broadcast_object(resumed[1] if usable and resumed is not None else None)
    if meta is not None:
        trainer.load_state_dict(resumed[0] if resumed is not None else None)
        start, initial, prior = trainer.step, meta.get("initial_kl"), float(meta.get("seconds", 0.0))
        curve = list(meta.get("curve") or [])
    else:
        torch.manual_seed(seed)
        initial = held_out_kl(child, parent, eval_seqs, cfg.batch_size) if eval_seqs is not None else None
    del resumed
    every = max(1, total // _MAX_CURVE_POINTS)
    points: dict[int, dict[str, float]] = {}
    batches = batch_indices(len(seqs), cfg.batch_size, seed, start)
    started = time.time()
    child.train()
    mine = dist.share(cfg.batch_size)  # this rank's rows of every batch
    # the mean over this rank's share, scaled so that the mean over ranks is the batch's (module docstring)
    weight = (mine.stop - mine.start) * W / cfg.batch_size

    def loss_fn(step: int):
        ids = seqs[next(batches)][mine].to(dev)  # (B / W, T)
        with torch.no_grad(), trainer.autocast():
            p_logits, p_hidden = parent(ids, output_hidden_states=True)
        with trainer.autocast():
            c_logits, c_hidden = child(ids, output_hidden_states=True)
            loss, kl, cos = gkd_loss(c_logits, c_hidden, p_logits, p_hidden, cfg.kl_weight, cfg.cosine_weight)
        del p_logits, p_hidden
        loss = loss * weight
        # one host sync per step, as before; over ranks one all-reduce of three numbers
        figures = dist.all_reduce_sum(torch.stack([loss.detach(), kl * weight, cos * weight]).float()) / W
        f_loss, f_kl, f_cos = figures.tolist()
        points[step] = {"step": step + 1, "loss": f_loss, "kl": f_kl, "cosine": f_cos,
                        "tokens": (step + 1) * cfg.batch_size * seq_len}
        yield "child", loss

    def after(done: int) -> None:
        point = points.pop(done - 1)
        if (done - 1) % every == 0 or done == total:
            curve.append(point)
        if on_step is not None:
            on_step(done, point)
        if checkpointing and done % cfg.checkpoint_every == 0 and done < total:
            state = trainer.state_dict()  # a collective: every rank, rank 0 gets the whole state
            if checkpoints is not None and dist.is_main():
                save_checkpoint(checkpoints, state, {
                    "total_steps": total, "key": resume_key, "format": CHECKPOINT_FORMAT, "initial_kl": initial,
                    "curve": curve, "seconds": prior + time.time() - started})
            del state

    trainer.train(start, total, loss_fn, on_step=after, desc=desc,
                  postfix=lambda: f"loss {curve[-1]['loss']:.4f}" if curve else "")
    child.eval()
    final = held_out_kl(child, parent, eval_seqs, cfg.batch_size) if eval_seqs is not None else None
    if checkpoints is not None and dist.is_main():
        clear_checkpoint(checkpoints)
    return GKDResult(steps=total, tokens=total * cfg.batch_size * seq_len, seconds=prior + time.time() - started,
                     initial_kl=initial, final_kl=final, curve=curve)


__all__ = ["GKDResult", "distill", "gkd_loss", "held_out_kl", "num_steps"]

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
budget (``assemble.gkd``) is given to the baselines. Use::

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
) -> tuple[torch.Tensor, float, float]:
    """(loss, kl per token, mean cosine distance) of one batch."""
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
    return loss, float(kl.detach()), float(cos.detach())


def num_steps(cfg: GKDConfig, seq_len: int) -> int:
    """Optimizer steps that consume ``cfg.tokens`` tokens (at least one)."""
    return steps_for(cfg.tokens, cfg.batch_size, seq_len)


@torch.no_grad()
def held_out_kl(child: DeciLMForCausalLM, parent: DeciLMForCausalLM, seqs: torch.Tensor, batch_size: int) -> float:
    """KL(parent || child) per token on ``seqs`` (N, T)."""
    dev = next(child.parameters()).device
    total, n = 0.0, 0
    for s in range(0, len(seqs), batch_size):
        ids = seqs[s : s + batch_size].to(dev)  # (B, T)
        lp = F.log_softmax(parent(ids).float(), dim=-1)
        lc = F.log_softmax(child(ids).float(), dim=-1)
        total += F.kl_div(lc, lp, log_target=True, reduction="sum").item()
        n += ids.numel()
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
    """
    if len(seqs) == 0:
        raise ValueError("seqs: no distillation sequences; GKD needs at least one")
    if len(child.model.layers) != len(parent.model.layers):
        raise ValueError(
            f"child has {len(child.model.layers)} layers, parent {len(parent.model.layers)}; GKD aligns "
            "hidden states layer by layer and needs equal counts (no_op keeps a layer, it does not remove it)"
        )
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
                      tokens_per_step=cfg.batch_size * seq_len)
    start, initial, prior = 0, None, 0.0
    curve: list[dict[str, float]] = []
    resumed = load_checkpoint(checkpoints) if checkpoints is not None else None
    if resumed is not None and resumed[1].get("total_steps") == total and resumed[1].get("key") == resume_key:
        state, meta = resumed
        trainer.load_state_dict(state)
        start, initial, prior = trainer.step, meta.get("initial_kl"), float(meta.get("seconds", 0.0))
        curve = list(meta.get("curve") or [])
    else:
        torch.manual_seed(seed)
        initial = held_out_kl(child, parent, eval_seqs, cfg.batch_size) if eval_seqs is not None else None
    every = max(1, total // _MAX_CURVE_POINTS)
    points: dict[int, dict[str, float]] = {}
    batches = batch_indices(len(seqs), cfg.batch_size, seed, start)
    started = time.time()
    child.train()

    def loss_fn(step: int):
        ids = seqs[next(batches)].to(dev)  # (B, T)
        with torch.no_grad(), trainer.autocast():
            p_logits, p_hidden = parent(ids, output_hidden_states=True)
        with trainer.autocast():
            c_logits, c_hidden = child(ids, output_hidden_states=True)
            loss, kl, cos = gkd_loss(c_logits, c_hidden, p_logits, p_hidden, cfg.kl_weight, cfg.cosine_weight)
        points[step] = {"step": step + 1, "loss": float(loss.detach()), "kl": kl, "cosine": cos,
                        "tokens": (step + 1) * ids.numel()}
        yield "child", loss

    def after(done: int) -> None:
        point = points.pop(done - 1)
        if (done - 1) % every == 0 or done == total:
            curve.append(point)
        if on_step is not None:
            on_step(done, point)
        if checkpoints is not None and done % cfg.checkpoint_every == 0 and done < total:
            save_checkpoint(checkpoints, trainer.state_dict(), {
                "total_steps": total, "key": resume_key, "initial_kl": initial, "curve": curve,
                "seconds": prior + time.time() - started})

    trainer.train(start, total, loss_fn, on_step=after, desc=desc,
                  postfix=lambda: f"loss {curve[-1]['loss']:.4f}" if curve else "")
    child.eval()
    final = held_out_kl(child, parent, eval_seqs, cfg.batch_size) if eval_seqs is not None else None
    if checkpoints is not None:
        clear_checkpoint(checkpoints)
    return GKDResult(steps=total, tokens=total * cfg.batch_size * seq_len, seconds=prior + time.time() - started,
                     initial_kl=initial, final_kl=final, curve=curve)


__all__ = ["GKDResult", "distill", "gkd_loss", "held_out_kl", "num_steps"]

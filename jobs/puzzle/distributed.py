"""The GPUs of one pod as one step: FSDP2 sharding under torchrun, and a no-op in one plain process.

A step that needs several GPUs (GKD in ``assemble``, ``score``, ``evaluate``) runs as N workers of
``torch.distributed.run`` (``puzzle step NAME --nproc-per-node N``), which set ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. We write no distributed engine of our own: models
are sharded by PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``: one group per attention and
per FFN module where torchtitan has one per decoder layer, see :func:`decoder_units`; the root holds
the rest) and whole state dicts move with ``torch.distributed.checkpoint.state_dict``. Every function here is a no-op (or the identity) at world
size 1, so one GPU (or a CPU) stays the default and runs the same code.

Rules the steps keep:

- rank 0 alone reads a model's full weights from disk and alone writes to the store (children,
  reports, checkpoints, metrics): :func:`distribute` sends the weights to every rank's shard,
  :func:`full_state_dict` gathers them back to rank 0;
- every rank runs every collective in the same order, so a sharded forward runs on every rank as often
  as on any other: :func:`rank_batches` hands out whole batches round-robin and pads the last round
  with a repeated batch whose sums are not counted;
- after its last collective a rank other than 0 may leave the step; rank 0 finishes alone (saving,
  generation, writing).

On CUDA the backend is NCCL and ``LOCAL_RANK`` picks the device; on CPU it is gloo (how the tests run
two processes: FSDP2, its gradient averaging, DTensor clipping and the state-dict functions all run on
CPU with gloo as they are, checked with torch 2.13). Mixed precision (bf16 all-gathers of fp32 weights,
fp32 gradient reduction) is used only on CUDA, where the step trains under bf16 autocast anyway; on
CPU everything stays fp32, so the tests compare sharded and one-process runs at fp32 rounding. Use::

    dist.init()                                   # from the torchrun environment; idempotent
    model = dist.distribute(full_on_rank0, lambda: DeciLMForCausalLM(cfg), device)
    for span, counted in dist.rank_batches(len(seqs), batch_size): ...
    totals = dist.all_reduce_sum([kl, nll])       # python floats, summed over ranks
    sd = dist.full_state_dict(model)              # rank 0: the whole state dict on CPU; others: None
"""

from __future__ import annotations

import datetime
import importlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

#: How long a rank waits in a collective for the others (while rank 0 reads a 140 GB parent alone, say).
TIMEOUT = datetime.timedelta(minutes=60)


# ----- the process group --------------------------------------------------------------------------------
def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init() -> None:
    """Join the process group torchrun describes (nothing at world size 1; nothing when already joined)."""
    if initialized() or _env_world() <= 1:
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        # before the group: NCCL binds each rank's communicator to the current device
        torch.cuda.set_device(local)
        backend = "nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, timeout=TIMEOUT)


def destroy() -> None:
    if initialized():
        torch.distributed.destroy_process_group()


def world() -> int:
    """Ranks in the step (1 without torchrun)."""
    return torch.distributed.get_world_size() if initialized() else 1


def rank() -> int:
    return torch.distributed.get_rank() if initialized() else 0


def is_main() -> bool:
    """Rank 0: the one that reads full weights and writes to the store (a torchrun worker that has not
    joined its group yet knows its rank from ``RANK``)."""
    return rank() == 0 if initialized() else int(os.environ.get("RANK", "0")) == 0


def device(default: torch.device | str) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` under torchrun on GPUs, else ``default``."""
    d = torch.device(default)
    if d.type == "cuda" and d.index is None and world() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return d


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> Any:
    """Sum over ranks: python floats in, python floats out (fp64 on the wire); a tensor in, a tensor out."""
    if isinstance(values, torch.Tensor):
        if world() == 1:
            return values
        t = values.clone()
        torch.distributed.all_reduce(t)
        return t
    if world() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled: for small things, never weights)."""
    if world() == 1:
        return obj
    box = [obj if is_main() else None]
    torch.distributed.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]  # type: ignore[return-value]


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` run on rank 0 alone (reading the store, downloading the parent) and its result, or the
    exception it raised, on every rank: a bad unit fails every rank with the same error (and exit code)
    instead of leaving the others waiting in a collective."""
    if world() == 1:
        return fn()
    result: Any = None
    err: BaseException | None = None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    ok, payload = broadcast_object((err is None, result if err is None else _describe(err)))
    if not ok:
        if err is not None:
            raise err
        raise _rebuild(payload)
    return payload


def _describe(err: BaseException) -> tuple[str, str, str]:
    """An exception as (module, class name, message): plain strings travel, the exception object need not."""
    return type(err).__module__, type(err).__qualname__, str(err)


def _rebuild(desc: tuple[str, str, str]) -> BaseException:
    """The same class for the project's own errors (so exit codes match on every rank), else a RuntimeError."""
    module, name, message = desc
    if module == "puzzle" or module.startswith("puzzle."):
        cls = getattr(importlib.import_module(module), name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            try:
                return cls(message)
            except TypeError:  # a constructor that wants more than a message
                pass
    return RuntimeError(f"rank 0: {name}: {message}")


def gather_object(obj: T) -> list[T] | None:
    """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
    if world() == 1:
        return [obj]
    out: list[Any] | None = [None] * world() if is_main() else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _comm_device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ----- work split ---------------------------------------------------------------------------------------
def share(n: int, r: int | None = None, w: int | None = None) -> slice:
    """Rank ``r``'s contiguous share of ``n`` items (sizes differ by at most one, lower ranks larger)."""
    r = rank() if r is None else r
    w = world() if w is None else w
    base, extra = divmod(n, w)
    lo = r * base + min(r, extra)
    return slice(lo, lo + base + (1 if r < extra else 0))


def rank_batches(n: int, batch_size: int, r: int | None = None, w: int | None = None) -> list[tuple[slice, bool]]:
    """Rank ``r``'s batches of ``range(n)`` in steps of ``batch_size``: the one-process batches, dealt
    round-robin, each with ``counted``. Every rank gets the same number of batches (a sharded model's
    forward is a collective); a rank short of one in the last round repeats batch 0 uncounted."""
    spans = [slice(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    r = rank() if r is None else r
    w = world() if w is None else w
    rounds = -(-len(spans) // w)
    out = []
    for k in range(rounds):
        i = k * w + r
        out.append((spans[i], True) if i < len(spans) else (spans[0], False))
    return out


# ----- sharding -----------------------------------------------------------------------------------------
Units = Callable[[nn.Module], Iterable[nn.Module]]


def decoder_units(model: nn.Module) -> list[nn.Module]:
    """What FSDP2 shards of a ``DeciLMForCausalLM``, one group each: every layer's attention and FFN,
    the embedding and the head (when untied). FSDP2 gathers a group's weights when its module is
    *called*, and the model runs a layer as ``attn_sublayer``/``ffn_sublayer`` (never the layer's own
    forward), so the groups are the modules those call; the norms (a few KB a layer) stay with the root."""
    inner = model.model  # type: ignore[attr-defined]
    tied = model.lm_head.weight is inner.embed_tokens.weight  # type: ignore[attr-defined]
    units: list[nn.Module] = [] if tied else [inner.embed_tokens]
    for layer in inner.layers:
        units += [m for m in (layer.self_attn, layer.mlp) if m is not None]
    if not tied:
        units.append(model.lm_head)  # type: ignore[attr-defined]
    return units


def shard(model: nn.Module, units: Units = decoder_units, *, frozen: bool = False,
          mixed_precision: bool | None = None) -> nn.Module:
    """FSDP2 over every rank: ``fully_shard`` on each of ``units(model)`` that holds parameters, then on
    ``model`` for the rest. ``frozen`` stops gradients (a teacher). ``mixed_precision`` (default: on CUDA
    with fp32 weights) all-gathers bf16 and reduces gradients in fp32. The identity at world size 1."""
    if frozen:
        model.requires_grad_(False)
    if world() == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    ref = next(model.parameters())
    if mixed_precision is None:
        mixed_precision = torch.distributed.get_backend() == "nccl" and ref.dtype == torch.float32
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    for m in units(model):
        if any(True for _ in m.parameters()):
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


def distribute(full: nn.Module | None, skeleton: Callable[[], nn.Module], dev: torch.device | str,
               units: Units = decoder_units, *, frozen: bool = False,
               mixed_precision: bool | None = None) -> nn.Module:
    """A model with rank 0's weights, sharded over every rank.

    ``full``: the model with its weights, needed on rank 0 only (on CPU: it need not fit one GPU);
    ``skeleton()`` builds the same structure (called on every rank under ``torch.device("meta")``, so
    it allocates nothing). At world size 1 this is ``full.to(dev)``. Otherwise the skeleton is sharded,
    allocated on ``dev`` (each rank its shard only) and filled from rank 0 one tensor at a time."""
    dev = torch.device(dev)
    if world() == 1:
        assert full is not None, "distribute: the model is needed on rank 0"
        if frozen:
            full.requires_grad_(False)
        return full.to(dev)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = skeleton()
    if is_main():
        assert full is not None, "distribute: the model is needed on rank 0"
        want, got = set(model.state_dict()), set(full.state_dict())
        if want != got:
            raise ValueError(f"distribute: the skeleton's tensors {sorted(want ^ got)[:4]} differ from the model's")
    model.to(broadcast_object(next(full.parameters()).dtype if full is not None and is_main() else None))
    shard(model, units, frozen=frozen, mixed_precision=mixed_precision)
    model.to_empty(device=dev)
    sd = full.state_dict() if (full is not None and is_main()) else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def is_sharded(module: nn.Module) -> bool:
    if world() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The whole state dict on rank 0, on CPU (None on the other ranks). A collective when sharded."""
    if not is_sharded(model):
        return {k: v.detach().to("cpu") for k, v in model.state_dict().items()} if is_main() else None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return sd if is_main() else None


def gather_model(model: nn.Module, skeleton: Callable[[], nn.Module]) -> nn.Module | None:
    """Rank 0: a plain (unsharded) CPU copy of ``model``; other ranks: None. The model itself when it is
    not sharded (world size 1)."""
    if not is_sharded(model):
        return model
    sd = full_state_dict(model)
    if not is_main():
        return None
    assert sd is not None
    with torch.device("meta"):
        out = skeleton()
    out.load_state_dict(sd, assign=True)
    # buffers outside the state dict (RoPE frequencies) are whole on every rank: copied from this one
    for name, buf in model.named_buffers():
        if name not in sd:
            owner, _, leaf = name.rpartition(".")
            out.get_submodule(owner)._buffers[leaf] = buf.detach().to("cpu", copy=True)
    return out


def model_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict | None]:
    """(model, optimizer) full state dicts with parameter names as keys, on rank 0 (empty elsewhere):
    the same form at any world size, so a checkpoint of N ranks resumes on M."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    msd = get_model_state_dict(model, options=opts)
    osd = get_optimizer_state_dict(model, optimizer, options=opts) if optimizer is not None else None
    return msd, osd


def load_model_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, msd: Mapping[str, Any],
                     osd: Mapping[str, Any] | None) -> None:
    """Inverse of :func:`model_state`: rank 0's full state dicts into every rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=world() > 1)
    set_model_state_dict(model, dict(msd), options=opts)
    if optimizer is not None and osd is not None:
        set_optimizer_state_dict(model, optimizer, dict(osd), options=opts)


__all__ = [
    "all_reduce_sum", "barrier", "broadcast_object", "decoder_units", "destroy", "device", "distribute",
    "from_main", "full_state_dict", "gather_model", "gather_object", "init", "initialized", "is_main", "is_sharded", "load_model_state",
    "model_state", "rank", "rank_batches", "shard", "share", "world",
]

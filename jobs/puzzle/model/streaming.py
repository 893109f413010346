"""The parent's decoder layers for steps that run it over many layers (bld, score): resident or streamed.

A unit of a 70B parent cannot hold the whole parent on one GPU (140 GB in bf16), and it does not need
to: BLD and scoring run the parent's layers in order, once per batch. :class:`ParentLayers` gives them
layer by layer:

- layers listed as ``resident`` are loaded onto the device once and stay there;
- every other layer is *streamed*: read from the parent's safetensors files (memory-mapped, so only the
  bytes of that layer are touched), converted to the run's dtype, kept in a pinned host-memory cache while
  ``host_cache_bytes`` allows (a second batch then reads no file at all), and copied to the device on a
  side CUDA stream while the previous layer computes; a background thread prepares the host copy of the
  next layer at the same time. At most two streamed layers are on the device at once.

The embedding, the final norm and the LM head are always resident (``skeleton``: a ``DeciLMForCausalLM``
with no layers, whose ``embed``, ``attention_inputs`` and ``head`` the steps call).

Use::

    parent = ParentLayers(parent_dir, cfg, dtype=torch.bfloat16, device="cuda", resident=range(8))
    h = parent.skeleton.embed(ids)
    cos, sin, mask = parent.skeleton.attention_inputs(h)
    for i, layer in parent.layers(0, 32):           # DeciLayer modules, in order, prefetched
        h = layer.ffn_sublayer(layer.attn_sublayer(h, cos, sin, mask))
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open

from puzzle.model.config import ModelConfig
from puzzle.model.io import INDEX_NAME, ModelLoadError, weight_files
from puzzle.model.modeling import DeciLayer, DeciLMForCausalLM

_LAYER = "model.layers.{i}."
_NON_LAYER = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def layer_bytes(cfg: ModelConfig, layer: int, dtype: torch.dtype) -> int:
    """Bytes of one parent layer's weights in ``dtype``."""
    from puzzle.model.counts import attention_counts, ffn_counts

    b = cfg.block_configs[layer]
    params = attention_counts(b.attention, cfg).params + ffn_counts(b.ffn, cfg).params
    return params * torch.empty((), dtype=dtype).element_size()


class ParentLayers:
    """The parent's layers, resident or streamed (see the module docstring)."""

    def __init__(self, parent_dir: str | Path, cfg: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str, resident: Iterable[int] = (), host_cache_bytes: int = 0) -> None:
        self.dir = Path(parent_dir)
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.host_cache_bytes = host_cache_bytes
        self._files = {f.name: f for f in weight_files(self.dir)}
        self._where = self._tensor_files()
        self._local = threading.local()  # one safe_open handle per file and thread (handles are not shared)
        self._host: dict[int, dict[str, torch.Tensor]] = {}
        self._host_bytes = 0
        self._pool = cf.ThreadPoolExecutor(1, thread_name_prefix="parent-prefetch")
        self._copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.resident_layers = sorted(set(resident))
        bad = [i for i in self.resident_layers if not 0 <= i < cfg.num_hidden_layers]
        if bad:
            raise ValueError(f"resident: layers {bad} are outside the parent's {cfg.num_hidden_layers} layers")
        self._resident = {i: self._materialize(i, self._host_tensors(i, cache=False)) for i in self.resident_layers}
        self.skeleton = self._skeleton()
        self.streamed_loads = 0  # layers copied to the device so far (a benchmark figure)
        self._last: tuple[int, DeciLayer] | None = None

    # -- where tensors live --
    def _tensor_files(self) -> dict[str, str]:
        index = self.dir / INDEX_NAME
        if index.is_file():
            return dict(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
        out: dict[str, str] = {}
        for name in self._files:
            with safe_open(str(self._files[name]), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 (safe_open is not iterable)
                    out[k] = name
        return out

    def _handle(self, file: str):
        handles = getattr(self._local, "handles", None)
        if handles is None:
            handles = self._local.handles = {}
        if file not in handles:
            handles[file] = safe_open(str(self._files[file]), framework="pt")
        return handles[file]

    def _read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise ModelLoadError(f"{self.dir}: tensor {name} is not in the parent's safetensors files")
        return self._handle(self._where[name]).get_tensor(name)

    def _layer_names(self, i: int) -> list[str]:
        pre = _LAYER.format(i=i)
        names = [k for k in self._where if k.startswith(pre) and not k.endswith("rotary_emb.inv_freq")]
        if not names:
            raise ModelLoadError(f"{self.dir}: no weights for layer {i} ({pre}*)")
        return names

    # -- host side --
    def _host_tensors(self, i: int, cache: bool = True) -> dict[str, torch.Tensor]:
        """Layer ``i``'s tensors on the host in the run's dtype (pinned when the target is a GPU)."""
        hit = self._host.get(i)
        if hit is not None:
            return hit
        pre = _LAYER.format(i=i)
        out = {}
        for name in self._layer_names(i):
            t = self._read(name).to(self.dtype)
            out[name[len(pre):]] = t.pin_memory() if self.cuda else t
        size = sum(t.numel() * t.element_size() for t in out.values())
        if cache and self._host_bytes + size <= self.host_cache_bytes:
            self._host[i] = out
            self._host_bytes += size
        return out

    # -- device side --
    def _materialize(self, i: int, host: dict[str, torch.Tensor], stream=None) -> DeciLayer:
        """A DeciLayer of layer ``i`` on the device, its weights copied from ``host`` (on ``stream``)."""
        with torch.device("meta"):
            layer = DeciLayer(self.cfg, self.cfg.block_configs[i])
        if stream is not None:
            with torch.cuda.stream(stream):
                dev = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
        else:
            dev = {k: v.to(self.device) for k, v in host.items()}
        expected = set(layer.state_dict())
        if set(dev) != expected:
            raise ModelLoadError(f"{self.dir}: layer {i} has tensors {sorted(dev)[:6]}..., the config needs "
                                 f"{sorted(expected)[:6]}...")
        layer.load_state_dict(dev, assign=True)
        layer.requires_grad_(False)
        return layer.eval()

    def _ready(self, layer: DeciLayer, event) -> DeciLayer:
        if event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(event)
            for p in layer.parameters():
                p.record_stream(compute)  # allocated on the copy stream, used on the compute stream
        return layer

    def _start(self, i: int):
        """Begin bringing streamed layer ``i`` to the device: (layer, event) once the host copy is ready."""
        host = self._host_tensors(i)
        if self._copy_stream is None:
            return self._materialize(i, host), None
        layer = self._materialize(i, host, self._copy_stream)
        event = torch.cuda.Event()
        event.record(self._copy_stream)
        return layer, event

    def layer(self, i: int) -> DeciLayer:
        """Layer ``i`` on the device (resident, or loaded now; the last one loaded this way is kept, since
        initializing a stage's blocks asks for the same layer once per block)."""
        if i in self._resident:
            return self._resident[i]
        if self._last is not None and self._last[0] == i:
            return self._last[1]
        self.streamed_loads += 1
        layer = self._ready(*self._start(i))
        self._last = (i, layer)
        return layer

    def layers(self, start: int, end: int) -> Iterator[tuple[int, DeciLayer]]:
        """Layers ``start .. end-1`` in order; the next streamed one is prefetched while the caller computes."""
        self._last = None  # free the layer `layer()` kept: a pass holds at most two streamed layers
        order = list(range(start, end))
        pending: cf.Future | None = None
        for pos, i in enumerate(order):
            if i in self._resident:
                cur = self._resident[i]
            else:
                self.streamed_loads += 1
                cur = self._ready(*(pending.result() if pending is not None else self._start(i)))
            pending = None
            nxt = order[pos + 1] if pos + 1 < len(order) else None
            if nxt is not None and nxt not in self._resident:
                # host copy (file read, dtype conversion, pinning) in the background; the device copy is
                # queued on the side stream, behind nothing the compute stream does
                pending = self._pool.submit(self._start, nxt)
            yield i, cur
            del cur

    def _skeleton(self) -> DeciLMForCausalLM:
        """Embedding, final norm and LM head on the device (a model with no layers)."""
        cfg = replace(self.cfg, block_configs=[])
        with torch.device("meta"):
            model = DeciLMForCausalLM(cfg)
        sd = {"model.embed_tokens.weight": self._read("model.embed_tokens.weight"),
              "model.norm.weight": self._read("model.norm.weight")}
        if not cfg.tie_word_embeddings:
            sd["lm_head.weight"] = self._read("lm_head.weight")
        model.to_empty(device=self.device)
        model.load_state_dict({k: v.to(self.device, self.dtype) for k, v in sd.items()}, strict=False)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        model.to(self.dtype)
        model.requires_grad_(False)
        return model.eval()

    @property
    def config(self) -> ModelConfig:
        return self.cfg

    def attention_inputs(self, h: torch.Tensor, position_ids: torch.Tensor | None = None,
                         attention_mask: torch.Tensor | None = None):
        return self.skeleton.attention_inputs(h, position_ids, attention_mask)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._resident.clear()
        self._host.clear()
        self._last = None


__all__ = ["ParentLayers", "layer_bytes"]

"""The BLD block library: where trained (layer, variant) blocks live and how later steps load them.

``bld`` writes one entry per (layer, variant); ``score`` and ``assemble`` read them. Entries are
content-addressed: the library of a run lives at ``<store root>/library/<digest>/`` where the digest is
the sha256 of (the parent's weight files, the distillation/validation token manifests, the BLD
hyperparameters that change a block's weights, the training dtype, the format version). A second run
with the same inputs resolves to the same digest and finds its blocks already trained, so bld skips
them. Each run records the digest it uses in ``library.json`` (its own store), so score and assemble
never rehash the parent.

Layout under ``library/<digest>/``::

    key.json                          what the digest was computed from (for humans and audits)
    <layer:03d>/<variant>/weights.safetensors   the sub-block's weights, layer-relative HF names
                                                (``DeciLayer.sublayer_state_dict``); absent for no_op
    <layer:03d>/<variant>/meta.json   written last: marks the entry complete (initial/final
                                      normalized MSE, loss curve, tokens, seconds, device)
    checkpoints/<unit-id>/...         bld's resumable training state while a unit runs

Coupled-mode entries are named ``<attn variant>+<ffn variant>`` and hold both sub-blocks' weights.
Every block is trained independently of the others (own optimizer, own clipping, data order fixed by
the seed), so an entry does not depend on which unit, or how many layers per unit, trained it.

Use::

    lib = Library.for_run(ctx.store, ctx.config, ctx.parent_dir)   # parent_dir: a path or a function
    if lib.has(3, "attn_g4"):
        lib.apply(model, 3, "attn_g4")          # swap the trained block into a DeciLMForCausalLM
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from puzzle import layout
from puzzle.config import PuzzleConfig, StoreConfig
from puzzle.errors import UnitError
from puzzle.layout import digest_of
from puzzle.model import AttentionVariant, DeciLMForCausalLM, parse_name, split_name, weight_files
from puzzle.run import runs_root_uri
from puzzle.store import Store, open_store

#: Bumped whenever the meaning of an entry changes, so old libraries are never mistaken for new ones.
FORMAT_VERSION = 2  # 2: stages train every block of a layer range from one parent pass
LIBRARY_PREFIX = layout.LIBRARY_PREFIX
#: The run-store key that records which library a run uses.
RUN_RECORD_KEY = layout.LIBRARY_RECORD
WEIGHTS_NAME = layout.LIBRARY_WEIGHTS
META_NAME = layout.LIBRARY_META
KEY_NAME = layout.LIBRARY_KEY
_CHUNK = 1 << 22
# BLD fields that do not change a block's weights (how units are cut and how often they checkpoint)
_NOT_HASHED = ("stage_layers", "checkpoint_every")


class LibraryError(KeyError):
    """A library entry that is missing or malformed; the message names the layer, variant and library."""

    def __str__(self) -> str:  # KeyError would show the repr
        return str(self.args[0]) if self.args else ""


def parent_weights_sha256(parent_dir: str | Path) -> str:
    """sha256 over the parent's safetensors files (names and bytes, in sorted order)."""
    h = hashlib.sha256()
    for f in sorted(weight_files(Path(parent_dir)), key=lambda p: p.name):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def data_sha256(run_store: Store) -> str:
    """sha256 of the distillation and validation manifests (they carry counts and source sha256)."""
    h = hashlib.sha256()
    for split in layout.DATA_SPLITS:
        h.update(layout.data_prefix(split).encode() + b"\0" + run_store.get_bytes(layout.data_manifest_key(split)))
    return h.hexdigest()


def hyperparameters(config: PuzzleConfig) -> dict[str, Any]:
    """The settings that change a trained block's weights (see _NOT_HASHED for what is left out)."""
    bld = {k: v for k, v in config.bld.model_dump(mode="json").items() if k not in _NOT_HASHED}
    return {"bld": bld, "seq_len": config.data.seq_len, "dtype": config.parent.dtype, "format": FORMAT_VERSION}


def library_key(run_store: Store, config: PuzzleConfig, parent_dir: str | Path) -> dict[str, Any]:
    """What the library digest is computed from."""
    return {
        "parent_sha256": parent_weights_sha256(parent_dir),
        "data_sha256": data_sha256(run_store),
        "hyperparameters": hyperparameters(config),
    }


def check_parent_unchanged(run_store: Store, parent_dir: str | Path) -> None:
    """Refuse a parent whose weights changed since the run's library was keyed on them.

    Steps load the parent from ``parent.uri`` each time; a directory rewritten mid-run (a retrained
    parent) would silently mix two parents: blocks distilled from one, KL measured against another.
    The library record (``library.json``) holds the sha256 bld computed; no record, nothing to check.
    """
    if not run_store.exists(RUN_RECORD_KEY):
        return
    want = (run_store.get_json(RUN_RECORD_KEY).get("key") or {}).get("parent_sha256")
    if want is None:
        return
    got = parent_weights_sha256(parent_dir)
    if got != want:
        raise UnitError(
            f"parent.uri: the weights in {str(parent_dir)!r} changed since this run's blocks were distilled "
            f"(sha256 {got[:12]}... now, {want[:12]}... then); one run needs one parent: start a new run"
        )


class Library:
    """One content-addressed block library (``<root>/library/<digest>``)."""

    def __init__(self, store: Store, digest: str) -> None:
        self.store = store  # rooted at library/<digest>
        self.digest = digest

    def __repr__(self) -> str:
        return f"Library({self.store.uri!r})"

    @property
    def uri(self) -> str:
        return self.store.uri

    # ----- finding the library ---------------------------------------------------------------------
    @classmethod
    def open(cls, run_uri: str, digest: str, store_config: StoreConfig | None = None) -> Library:
        root = open_store(runs_root_uri(run_uri), store_config)
        return cls(root.child(layout.library_root(digest)), digest)

    @classmethod
    def for_run(
        cls,
        run_store: Store,
        config: PuzzleConfig,
        parent_dir: str | Path | Callable[[], str | Path] | None = None,
    ) -> Library:
        """The library a run uses: the digest recorded in the run's ``library.json``, else computed from
        the parent's weights (``parent_dir``: a path, or a function giving one, called only when the
        digest must be computed, e.g. ``ctx.parent_dir``), the data and the config, and then recorded."""
        if run_store.exists(RUN_RECORD_KEY):
            record = run_store.get_json(RUN_RECORD_KEY)
            recorded = (record.get("key") or {}).get("hyperparameters")
            if recorded is not None and recorded != hyperparameters(config):
                # blocks are filed under what they were trained with, never under another config's settings
                raise UnitError(
                    f"{RUN_RECORD_KEY}: the run's library was keyed on other BLD settings than the config's "
                    f"({recorded} vs {hyperparameters(config)}); redo from bld: "
                    f"`puzzle run --resume {run_store.uri} --redo bld`")
            return cls.open(run_store.uri, record["digest"], config.store)
        if parent_dir is None:
            raise LibraryError(
                f"run {run_store.uri!r} has no {RUN_RECORD_KEY} yet; pass parent_dir so the library digest "
                "can be computed from the parent's weights"
            )
        key = library_key(run_store, config, parent_dir() if callable(parent_dir) else parent_dir)
        digest = digest_of(key)
        lib = cls.open(run_store.uri, digest, config.store)
        if not lib.store.exists(KEY_NAME):
            lib.store.put_json(KEY_NAME, key)
        # Concurrent units write identical records, and each write is atomic.
        run_store.put_json(RUN_RECORD_KEY, {"digest": digest, "key": key})
        return lib

    # ----- entries ---------------------------------------------------------------------------------
    @staticmethod
    def prefix(layer: int, variant: str) -> str:
        split_name(variant)
        if not isinstance(layer, int) or layer < 0:
            raise ValueError(f"layer: {layer!r} is not allowed; must be an integer >= 0")
        return layout.library_entry_prefix(layer, variant)

    def has(self, layer: int, variant: str) -> bool:
        """True when the entry is complete (its meta.json exists)."""
        return self.store.exists(f"{self.prefix(layer, variant)}/{META_NAME}")

    def usable(self, layer: int, variant: str) -> bool:
        """True when the entry is complete AND whole: its meta.json reads with the fields readers use and its
        weights are there. A damaged entry (tampered, half-deleted) is trained again, never reused."""
        if not self.has(layer, variant):
            return False
        try:
            meta = self.meta(layer, variant)
        except Exception:  # noqa: BLE001 - unreadable means unusable
            return False
        if not isinstance(meta, dict) or not all(k in meta for k in ("initial_nmse", "final_nmse", "has_weights")):
            return False
        return not meta["has_weights"] or self.store.exists(f"{self.prefix(layer, variant)}/{WEIGHTS_NAME}")

    def meta(self, layer: int, variant: str) -> dict[str, Any]:
        key = f"{self.prefix(layer, variant)}/{META_NAME}"
        if not self.store.exists(key):
            raise LibraryError(f"library {self.uri}: no block for layer {layer}, variant {variant!r}")
        return self.store.get_json(key)

    def entries(self) -> list[tuple[int, str]]:
        """Every complete (layer, variant), sorted."""
        return sorted(e for e in map(layout.parse_library_entry, self.store.list()) if e is not None)

    def load_block(
        self,
        layer: int,
        variant: str,
        device: torch.device | str = "cpu",
        dtype: torch.dtype | None = None,
    ) -> dict[str, torch.Tensor]:
        """The entry's weights with layer-relative HF names (``self_attn.q_proj.weight``, ...); {} for no_op."""
        meta = self.meta(layer, variant)
        if not meta.get("has_weights", True):
            return {}
        sd = st_load(self.store.get_bytes(f"{self.prefix(layer, variant)}/{WEIGHTS_NAME}"))
        return {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in sd.items()}

    def save_block(
        self, layer: int, variant: str, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]
    ) -> None:
        """Write an entry: weights first, then meta.json, which makes it visible to ``has``."""
        prefix = self.prefix(layer, variant)
        if state_dict:
            sd = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
            self.store.put_bytes(f"{prefix}/{WEIGHTS_NAME}", st_save(sd, metadata={"format": "pt"}))
        self.store.put_json(f"{prefix}/{META_NAME}", {**meta, "layer": layer, "variant": variant,
                                                      "has_weights": bool(state_dict)})

    def apply(self, model: DeciLMForCausalLM, layer: int, variant: str) -> None:
        """Put ``variant`` at ``layer`` of ``model`` with the library's trained weights.

        A variant the model already has at that layer (the parent's own) is left as it is: it needs no
        library entry. Anything else without an entry is a :class:`LibraryError`.
        """
        n = len(model.model.layers)
        if not 0 <= layer < n:
            raise LibraryError(f"layer {layer} is outside the model (layers 0..{n - 1})")
        parts = parse_name(variant, model.config.hidden_size)
        current = model.model.layers[layer]
        if all(p.name == (current.attention_variant.name if isinstance(p, AttentionVariant)
                          else current.ffn_variant.name) for p in parts) and not self.has(layer, variant):
            return
        ref = next(model.parameters())
        sd = self.load_block(layer, variant, ref.device, ref.dtype)
        for p in parts:
            keys = ("input_layernorm.", "self_attn.") if isinstance(p, AttentionVariant) else (
                "post_attention_layernorm.", "mlp.")
            part_sd = {k: v for k, v in sd.items() if k.startswith(keys)}
            try:
                model.load_sublayer(layer, p, part_sd)
            except ValueError as err:
                raise LibraryError(f"library {self.uri}: layer {layer}, variant {variant!r}: {err}") from None

    # ----- checkpoints (bld's resumable state) -----------------------------------------------------
    def checkpoints(self, unit_id: str) -> Store:
        return self.store.child(layout.library_checkpoint_prefix(unit_id))


__all__ = [
    "FORMAT_VERSION",
    "LIBRARY_PREFIX",
    "RUN_RECORD_KEY",
    "Library",
    "LibraryError",
    "check_parent_unchanged",
    "data_sha256",
    "digest_of",
    "hyperparameters",
    "library_key",
    "parent_weights_sha256",
]

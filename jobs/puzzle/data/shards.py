"""Token shards in the store: written once by ``prepare``, read by bld, score, assemble and evaluate.

Text comes from a local path, ``file://`` or ``s3://`` URI: UTF-8 ``.txt`` (a stream of text) or
``.jsonl`` (one ``{"text": ...}`` document a line, joined with the end-of-sequence token). Tokens are
stored as int32 safetensors shards under ``data/<split>/`` with a ``manifest.json`` (token counts,
sha256 of the source), so a pod needs only the shards, never the tokenizer or the raw text.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as st_load_np
from safetensors.numpy import save as st_save_np

from puzzle import layout
from puzzle.config import ConfigError, StoreConfig

CHUNK_CHARS = 1 << 16


def read_uri_bytes(uri: str, store_config: StoreConfig | None = None, field: str = "data") -> bytes:
    """Bytes of a local path, ``file://`` or ``s3://bucket/key`` object."""
    if uri.startswith("s3://"):
        from puzzle.store import open_store

        root, _, name = uri.rstrip("/").rpartition("/")
        return open_store(root, store_config).get_bytes(name)
    path = Path(uri.removeprefix("file://"))
    if not path.is_file():
        raise ConfigError(f"{field}: {uri!r} is not a readable file (use a local path, file:// or s3:// URI)")
    return path.read_bytes()


def load_tokenizer(model_dir: Path):
    """The parent's fast tokenizer (``tokenizer.json``), and its end-of-sequence id."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"parent.uri: {str(model_dir)!r} has no tokenizer.json (a fast tokenizer is required)")
    tok = Tokenizer.from_file(str(path))
    eos_id = None
    cfg = model_dir / "config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        eos_id = eos[0] if isinstance(eos, list) else eos
    return tok, eos_id


def tokenize_text(data: bytes, name: str, tokenizer, eos_id: int | None, max_tokens: int) -> np.ndarray:
    """Token ids of a .txt stream or .jsonl documents, truncated to ``max_tokens``."""
    text = data.decode("utf-8")
    out: list[int] = []
    if name.endswith(".jsonl"):
        for i, line in enumerate(text.splitlines()):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f"{name}: line {i + 1} is not a JSON object with a 'text' field") from None
            out.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
            if eos_id is not None:
                out.append(eos_id)
            if len(out) >= max_tokens:
                break
    else:
        # chunk at line boundaries so BPE never sees a split word, and stop early on large files
        start = 0
        while start < len(text) and len(out) < max_tokens:
            end = text.find("\n", start + CHUNK_CHARS)
            end = len(text) if end < 0 else end + 1
            out.extend(tokenizer.encode(text[start:end], add_special_tokens=False).ids)
            start = end
    return np.asarray(out[:max_tokens], dtype=np.int32)


def write_shards(store, split: str, tokens: np.ndarray, shard_tokens: int, source: dict) -> dict:
    """Write ``tokens`` as the shards of ``split``; the manifest is written last (it marks completion)."""
    shards = []
    for i, start in enumerate(range(0, max(len(tokens), 1), shard_tokens)):
        part = np.ascontiguousarray(tokens[start : start + shard_tokens])
        key = layout.data_shard_key(split, i)
        store.put_bytes(key, st_save_np({"tokens": part}))
        shards.append({"key": key, "tokens": len(part)})
    manifest = {"tokens": len(tokens), "shards": shards, "source": source}
    store.put_json(layout.data_manifest_key(split), manifest)
    return manifest


def load_tokens(store, split: str) -> torch.Tensor:
    """All tokens of a split ('distillation' or 'validation') as one int64 tensor (N,)."""
    manifest = store.get_json(layout.data_manifest_key(split))
    parts = [st_load_np(store.get_bytes(s["key"]))["tokens"] for s in manifest["shards"]]
    if not parts:
        return torch.zeros(0, dtype=torch.long)
    return torch.from_numpy(np.concatenate(parts).astype(np.int64))


def sequences(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Non-overlapping sequences (N, seq_len); the remainder is dropped."""
    n = len(tokens) // seq_len
    if n == 0:
        raise ConfigError(f"data: only {len(tokens)} tokens, fewer than one sequence of seq_len={seq_len}")
    return tokens[: n * seq_len].view(n, seq_len)


def batch_indices(n_sequences: int, batch_size: int, seed: int, start_step: int = 0) -> Iterator[torch.Tensor]:
    """Sequence indices of each optimizer step: a fresh seeded permutation per epoch.

    Deterministic in (seed, step), so a resumed unit sees exactly the batches it would have seen.
    """
    step = start_step
    per_epoch = max(n_sequences // batch_size, 1)
    while True:
        epoch, k = divmod(step, per_epoch)
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(n_sequences, generator=g)
        idx = perm[k * batch_size : (k + 1) * batch_size]
        if len(idx) < batch_size:  # fewer sequences than one batch: repeat them
            idx = perm.repeat(batch_size // n_sequences + 1)[:batch_size]
        yield idx
        step += 1


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()

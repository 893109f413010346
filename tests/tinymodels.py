"""Small random parents for tests that need a model directory before (or instead of) the tiny parent.

``make_parent(dir)`` writes a transformers ``LlamaForCausalLM`` (safetensors) plus a word-level
``tokenizer.json`` covering the SCAN vocabulary and a small English filler, so steps can tokenize the
example data. Deterministic in ``seed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = [
    "source", "target", "walk", "look", "run", "jump", "turn", "left", "right", "opposite", "around",
    "twice", "thrice", "and", "after", "I_WALK", "I_LOOK", "I_RUN", "I_JUMP", "I_TURN_LEFT", "I_TURN_RIGHT",
    ":", "the", "a", "of", "to", "in", "is", "it", "that",
]


def make_tokenizer(out: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "\n": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split("\n", behavior="isolated"), pre_tokenizers.WhitespaceSplit()]
    )
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                          "eos_token": "</s>", "bos_token": "<s>",
                                                          "unk_token": "<unk>"}))
    return len(vocab)


def make_parent(out: Path, hidden: int = 64, layers: int = 2, heads: int = 8, kv_heads: int = 4,
                intermediate: int = 160, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab = make_tokenizer(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=max(vocab, 64), hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                      max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_text(path: Path, n_lines: int = 400, seed: int = 0) -> Path:
    """SCAN episodes in the shared prompt format: enough tokens for a few sequences."""
    from puzzle.data import scan
    from puzzle.data.prompts import format_example

    path.parent.mkdir(parents=True, exist_ok=True)
    exs = scan.sample(n_lines, seed)
    path.write_text("\n\n".join(format_example(e.command, e.actions) for e in exs) + "\n", encoding="utf-8")
    return path

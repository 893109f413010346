"""The tiny parent's byte-level BPE tokenizer, trained with Hugging Face ``tokenizers``.

Byte-level, so any text round-trips exactly (filler docstrings included). The pre-tokenizer keeps
letters *and underscores* together, with the preceding space attached (`` I_TURN_LEFT``), so every
SCAN action becomes one token once BPE has merged it; GPT-2's regex would cut it at each ``_``.
The post-processor prepends ``<s>`` as Llama tokenizers do, so ``tokenizer(prompt)`` gives what
the model saw at the start of every training document.

Saved as ``tokenizer.json`` + ``tokenizer_config.json`` + ``special_tokens_map.json``, loadable by
``transformers.PreTrainedTokenizerFast.from_pretrained(dir)`` and ``AutoTokenizer`` (no remote code).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from puzzle.data.scan import ACTION, TURN

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
DEFAULT_VOCAB_SIZE = 1024
# Words are letters/underscores (so I_TURN_LEFT stays whole), numbers, punctuation runs, and
# whitespace; a single leading space joins the following word as in GPT-2.
_SPLIT = r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+"
ACTION_TOKENS = tuple(f" {a}" for a in (*ACTION.values(), *TURN.values()))


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE) -> Tokenizer:
    """Train the BPE on ``texts``; deterministic for the same texts and vocab size."""
    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"vocab_size: {vocab_size} is not allowed; must be in [300, 65536]")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    missing = [a for a in ACTION_TOKENS if len(tok.encode(a).ids) != 1]
    if missing:
        raise ValueError(
            f"the BPE did not learn the SCAN action(s) {missing} as single tokens; "
            f"train on more SCAN text or raise vocab_size (now {vocab_size})"
        )
    bos = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos)]
    )
    return tok


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int) -> None:
    """Write the three files ``PreTrainedTokenizerFast.from_pretrained`` reads."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **{k: v for k, v in special.items() if v is not None},
        "add_bos_token": True,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "padding_side": "left",  # batched greedy generation appends to the right end
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps({k: v for k, v in special.items() if v is not None}, indent=2) + "\n"
    )


def load_tokenizer(path: str | Path):
    """The saved tokenizer as a ``transformers.PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(path))

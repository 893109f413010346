"""Text generation: the one interface every exact-match metric of the project goes through.

Both the tiny-task metric (:mod:`puzzle.data.tasks`, ``evaluation.task_accuracy``) and the ICL benchmark
(:mod:`puzzle.icl.benchmark`) only need "continue these prompts, one answer line each", plus, for
Cover-LS's prompt budget, the length of a prompt in the model's own tokens. That is
:class:`TextGenerator`:

- ``generate(prompts, max_new_tokens, num_beams=1, num_return_sequences=1) -> list[list[str]]``: for
  each prompt ``num_return_sequences`` continuations, best first, the prompt excluded; greedy for one
  beam, beam search otherwise, never sampling;
- ``count_tokens(texts) -> list[int]``: the tokens ``generate`` would feed for each text (special tokens
  the tokenizer adds, such as a BOS, included);
- ``context_length``: the most tokens the model takes (its ``max_position_embeddings``).

The stop rule is one: decoding ends at the first generated token whose text holds a newline, or at an
EOS token (:func:`newline_stop_ids`), because every answer of the shared prompt format
(:mod:`puzzle.data.prompts`) is one line. A continuation is decoded up to and including that token.

Two adapters, both over a fast tokenizer (``tokenizers.Tokenizer``), differing only in the model call:

- :class:`DeciTextGenerator`: the project's own ``DeciLMForCausalLM`` (children are nemotron-nas, which
  transformers cannot load without remote code);
- :class:`HFTextGenerator`: a plain transformers causal LM, from a directory (:meth:`HFTextGenerator.from_dir`)
  or from a model and tokenizer already in memory (the tiny parent's tests and benchmarks).

Imports: this module sits on the model/data floor: it imports nothing of ``puzzle`` but the failure policy,
so ``puzzle.data`` and everything above may use it. torch and transformers are imported where used.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from puzzle.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from tokenizers import Tokenizer


@runtime_checkable
class TextGenerator(Protocol):
    """What every exact-match metric needs from a model (see the module docstring)."""

    @property
    def context_length(self) -> int:
        """The most tokens (prompt + answer) the model takes."""
        ...

    def generate(
        self, prompts: list[str], max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1
    ) -> list[list[str]]:
        """For each prompt, ``num_return_sequences`` continuations (best first), prompt excluded."""
        ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text takes as a prompt, special tokens included."""
        ...


def newline_stop_ids(tokenizer: Tokenizer, eos_token_id: int | Sequence[int] | None) -> list[int]:
    """The stop rule: every token whose decoded text holds a newline, and the EOS token(s).

    Decoding each id (rather than reading vocabulary strings) finds the newline whatever the tokenizer
    spells it as: 'Ċ' in byte-level BPE, '<0x0A>' with SentencePiece byte fallback, '\\n' in word-level ones.
    """
    n = tokenizer.get_vocab_size(with_added_tokens=True)
    texts = tokenizer.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
    eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    return sorted({*eos, *(i for i, t in enumerate(texts) if "\n" in t)})


def _check_beams(num_beams: int, num_return_sequences: int) -> None:
    if num_beams < 1:
        raise ValueError(f"num_beams: value {num_beams} is not allowed; must be >= 1")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(
            f"num_return_sequences: value {num_return_sequences} is not allowed; must be in [1, num_beams={num_beams}]"
        )


class _Generator(abc.ABC):
    """Batching, left padding, the stop rule and decoding, shared by both adapters.

    Prompts are sorted by length so a batch pads little; answers go back in the caller's order. A batch holds
    ``batch_size`` sequences: ``batch_size // num_beams`` prompts under beam search, so memory stays put.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_id: Any, pad_token_id: Any, context_length: int,
                 batch_size: int, device: Any) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size: value {batch_size} is not allowed; must be >= 1")
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.device = device
        self._context_length = int(context_length)
        self.stop_ids = newline_stop_ids(tokenizer, eos_token_id)
        self._stop = set(self.stop_ids)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.pad_id = pad_token_id if isinstance(pad_token_id, int) else (eos[0] if eos else 0)

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(e.ids) for e in self.tokenizer.encode_batch(list(texts))]

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded ids and attention mask, both (B, T)."""
        import torch

        enc = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        width = max(len(e) for e in enc)
        ids = torch.full((len(enc), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(enc), width, dtype=torch.long)
        for r, e in enumerate(enc):
            ids[r, width - len(e):] = torch.tensor(e, dtype=torch.long)
            mask[r, width - len(e):] = 1
        return ids, mask

    def decode(self, new_ids: list[int]) -> str:
        """The continuation up to and including its first stop token."""
        cut = next((k for k, t in enumerate(new_ids) if t in self._stop), len(new_ids))
        return self.tokenizer.decode(new_ids[: cut + 1], skip_special_tokens=True)

    @abc.abstractmethod
    def _generate_ids(self, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, num_beams: int,
                      num_return_sequences: int) -> torch.Tensor:
        """(B * R, T + new) token ids, the prompt first; each adapter's own decoding."""

    def generate(
        self, prompts: list[str], max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1
    ) -> list[list[str]]:
        import torch

        _check_beams(num_beams, num_return_sequences)
        if not prompts:
            return []
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        answers: dict[int, list[str]] = {}
        # batch_size counts sequences: beam search runs num_beams of them per prompt
        step = max(1, self.batch_size // num_beams)
        with torch.no_grad():
            for s in range(0, len(order), step):
                idx = order[s : s + step]
                ids, mask = self.encode([prompts[i] for i in idx])
                seqs = self._generate_ids(ids.to(self.device), mask.to(self.device), max_new_tokens, num_beams,
                                          num_return_sequences)  # (B * R, T + new)
                new = seqs[:, ids.shape[1]:].tolist()
                R = num_return_sequences
                for j, i in enumerate(idx):
                    answers[i] = [self.decode(new[j * R + r]) for r in range(R)]
        return [answers[i] for i in range(len(prompts))]


def _fast_tokenizer(model_dir: str | Path) -> Tokenizer:
    from tokenizers import Tokenizer

    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise ConfigError(f"tokenizer: {str(path)!r} not found; a fast tokenizer (tokenizer.json) is required")
    return Tokenizer.from_file(str(path))


class DeciTextGenerator(_Generator):
    """:class:`TextGenerator` over a ``DeciLMForCausalLM`` and the ``tokenizer.json`` of ``tokenizer_dir``.

    Prompts are encoded with the tokenizer's own special tokens (a BOS where its post-processor adds one,
    as in training).
    """

    def __init__(self, model: Any, tokenizer_dir: str | Path, batch_size: int = 16) -> None:
        cfg = model.config
        super().__init__(_fast_tokenizer(tokenizer_dir), cfg.eos_token_id, cfg.pad_token_id,
                         cfg.max_position_embeddings, batch_size, next(model.parameters()).device)
        self.model = model

    def _generate_ids(self, ids, mask, max_new_tokens, num_beams, num_return_sequences):
        return self.model.generate(
            ids, max_new_tokens, eos_token_id=self.stop_ids, num_beams=num_beams,
            num_return_sequences=num_return_sequences, attention_mask=mask, pad_token_id=self.pad_id,
        )


class HFTextGenerator(_Generator):
    """:class:`TextGenerator` over a transformers causal LM and its tokenizer (a ``PreTrainedTokenizerFast``
    or a ``tokenizers.Tokenizer``); :meth:`from_dir` loads both from a Hugging Face directory."""

    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8) -> None:
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        if isinstance(tokenizer, PreTrainedTokenizerFast):
            tokenizer = tokenizer.backend_tokenizer
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer: {type(tokenizer).__name__} is not allowed; give a fast tokenizer")
        cfg = model.config
        super().__init__(tokenizer, cfg.eos_token_id, cfg.pad_token_id, cfg.max_position_embeddings,
                         batch_size, next(model.parameters()).device)
        self.model = model

    @classmethod
    def from_dir(cls, model_dir: str | Path, device: str = "cpu", batch_size: int = 8,
                 dtype: str = "float32") -> HFTextGenerator:
        """Load ``config.json`` + safetensors + ``tokenizer.json`` (never with remote code)."""
        import torch
        from transformers import AutoModelForCausalLM

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ConfigError(f"model directory {str(path)!r} has no config.json; give a Hugging Face model directory")
        tokenizer = _fast_tokenizer(path)
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True
        )
        model.to(device).eval()
        return cls(model, tokenizer, batch_size)

    def _generate_ids(self, ids, mask, max_new_tokens, num_beams, num_return_sequences):
        return self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, num_beams=num_beams,
            num_return_sequences=num_return_sequences, do_sample=False, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
        )


__all__ = ["DeciTextGenerator", "HFTextGenerator", "TextGenerator", "newline_stop_ids"]

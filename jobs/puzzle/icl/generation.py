"""Text generation for the ICL benchmark: the :class:`TextGenerator` protocol and its Hugging Face adapter.

The benchmark only needs "continue these prompts": greedy answers for evaluation, and beams of an
auxiliary model for Cover-LS's predicted structures. :class:`HFTextGenerator` wraps
``transformers``' ``generate`` for a plain Hugging Face causal-LM directory (the tiny Llama parent,
or any child the project can load with ``AutoModelForCausalLM`` without remote code); it stops at
the end of the answer line, since the prompt format puts one answer per line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class TextGenerator(Protocol):
    def generate(
        self, prompts: list[str], max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1
    ) -> list[list[str]]:
        """For each prompt, ``num_return_sequences`` continuations (best first), prompt excluded."""
        ...


class HFTextGenerator:
    """:class:`TextGenerator` over a Hugging Face model directory (``config.json`` + safetensors).

    Prompts are left-padded and run in batches of ``batch_size``; decoding is deterministic
    (greedy or beam search, no sampling) and stops once every sequence has produced a newline.
    """

    def __init__(
        self, model_dir: str | Path, device: str = "cpu", batch_size: int = 8, dtype: str = "float32"
    ) -> None:
        import torch  # heavy: imported here so selection and datasets do not need it
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(model_dir)
        if not (path / "config.json").is_file():
            raise ValueError(
                f"model directory {str(path)!r} has no config.json; give a Hugging Face model directory"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size: value {batch_size} is not allowed; must be >= 1")
        self.torch = torch
        self.device = device
        self.batch_size = batch_size
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=getattr(torch, dtype), trust_remote_code=False, use_safetensors=True
        )
        self.model.to(device).eval()

    def generate(
        self, prompts: list[str], max_new_tokens: int, num_beams: int = 1, num_return_sequences: int = 1
    ) -> list[list[str]]:
        if num_return_sequences > num_beams:
            raise ValueError(
                f"num_return_sequences: value {num_return_sequences} is not allowed; must be <= num_beams ({num_beams})"
            )
        out: list[list[str]] = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            enc = self.tokenizer(batch, return_tensors="pt", padding=True).to(self.device)
            kwargs: dict[str, Any] = {
                "max_new_tokens": max_new_tokens,
                "num_beams": num_beams,
                "num_return_sequences": num_return_sequences,
                "do_sample": False,
                "pad_token_id": self.tokenizer.pad_token_id,
                # One answer per line: stop at its end instead of running to max_new_tokens.
                "stop_strings": ["\n"],
                "tokenizer": self.tokenizer,
            }
            with self.torch.no_grad():
                seqs = self.model.generate(**enc, **kwargs)  # (B * R, T_prompt + T_new)
            new = seqs[:, enc["input_ids"].shape[1] :]  # (B * R, T_new)
            texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
            for i in range(len(batch)):
                out.append(texts[i * num_return_sequences : (i + 1) * num_return_sequences])
        return out

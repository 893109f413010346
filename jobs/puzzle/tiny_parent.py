"""Train the project's tiny parent: a small Llama (GQA, SwiGLU) learned from scratch on CPU.

No model hub is reachable, so every example and test of the project compresses this parent. It
learns the in-context SCAN episodes of :mod:`puzzle.data.corpus` (plus English filler) well enough
that compressing it has something measurable to lose: exact match on held-out commands and
perplexity on held-out text.

Deterministic given the seed: the corpus stream, the BPE, the initial weights and the batch order
all derive from it, training runs single-process with a fixed thread count and
``torch.use_deterministic_algorithms``, so the same seed on the same machine writes the same
safetensors bytes.

Run ``puzzle parent train-tiny --out examples/tiny/parent`` (about 15 minutes on 2 CPU cores).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from puzzle.data import corpus
from puzzle.data.tokenizer import BOS, EOS, PAD, save_tokenizer, train_tokenizer
from puzzle.training import Part, Schedule, Trainer, adamw, decay_groups

log = logging.getLogger(__name__)

MAX_PARENT_BYTES = 20 * 2**20


@dataclass(frozen=True)
class TinyParentConfig:
    """Architecture and training settings of the tiny parent (defaults: the committed parent)."""

    seed: int = 0
    """Seeds the corpus stream, the BPE's training text, the initial weights and batch order."""
    hidden_size: int = 256
    """Model width; head_dim = hidden_size / num_attention_heads = 32, a head size every serving engine
    runs (vLLM's CPU attention has none below 32; see puzzle.serving)."""
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    """GQA: 4 KV heads for 8 query heads, so n_heads_in_group = 2 in the parent."""
    intermediate_size: int = 768
    """SwiGLU width: vLLM's size for ffn_mult 4.0 at hidden 256 (round_up(int(2 * 4.0 * 256 / 3), 256) = 768),
    so the parent's own FFN is on the grid vLLM, SGLang and TensorRT-LLM size FFNs by."""
    vocab_size: int = 1024
    max_position_embeddings: int = 1024
    tie_word_embeddings: bool = False
    """Untied, as Llama-3.1-8B: the child conversion must handle a separate lm_head."""
    seq_len: int = 512
    """Tokens per packed training sequence (an 8-demonstration episode fits)."""
    batch_size: int = 16
    steps: int = 600
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    """Cosine decays to lr * min_lr_ratio."""
    warmup_steps: int = 30
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    tokenizer_chars: int = 2_000_000
    """Characters of training text the BPE is learned from (the prefix written to train.txt)."""
    threads: int = 2
    """torch intra-op threads; results are bit-identical only for the same count."""
    device: str = "cpu"
    """'cpu' (the reference) or 'cuda'; CUDA runs are repeatable on one GPU model, not equal to CPU."""
    save_dtype: str = "bfloat16"
    """Dtype of the saved weights: bfloat16 keeps the committed parent near 10 MB; steps load it in
    ``parent.dtype`` (float32 for the tiny example: exact, since every bfloat16 is a float32)."""

    def __post_init__(self) -> None:
        checks = {
            "hidden_size": self.hidden_size >= 8,
            "num_hidden_layers": self.num_hidden_layers >= 1,
            "num_attention_heads": self.num_attention_heads >= 1
            and self.hidden_size % self.num_attention_heads == 0,
            "num_key_value_heads": self.num_key_value_heads >= 1
            and self.num_attention_heads % self.num_key_value_heads == 0,
            "intermediate_size": self.intermediate_size >= 1,
            "seq_len": 8 <= self.seq_len <= self.max_position_embeddings,
            "batch_size": self.batch_size >= 1,
            "steps": self.steps >= 1,
            "lr": self.lr > 0,
            "min_lr_ratio": 0 <= self.min_lr_ratio <= 1,
            "warmup_steps": self.warmup_steps >= 0,
            "threads": self.threads >= 1,
            "device": self.device == "cpu" or self.device.startswith("cuda"),
            "save_dtype": self.save_dtype in ("float32", "bfloat16", "float16"),
        }
        rules = {
            "num_attention_heads": "must be >= 1 and divide hidden_size",
            "num_key_value_heads": "must be >= 1 and divide num_attention_heads",
            "seq_len": "must be in [8, max_position_embeddings]",
            "min_lr_ratio": "must be in [0, 1]",
            "device": "allowed: cpu, cuda, cuda:N",
            "save_dtype": "allowed: float32, bfloat16, float16",
        }
        for name, ok in checks.items():
            if not ok:
                raise ValueError(
                    f"{name}: value {getattr(self, name)!r} is not allowed; {rules.get(name, 'must be positive')}"
                )


def schedule(cfg: TinyParentConfig) -> Schedule:
    """Linear warm-up to cfg.lr, then cosine down to cfg.lr * cfg.min_lr_ratio at the last step."""
    return Schedule(cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


def token_batches(tok, cfg: TinyParentConfig) -> Iterator[torch.Tensor]:
    """Packed (batch_size, seq_len) batches of ``<s> doc </s>`` from the seeded training stream."""
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    docs = corpus.iter_documents(cfg.seed, "train")
    buf: list[int] = []
    need = cfg.batch_size * cfg.seq_len
    while True:
        while len(buf) < need:
            chunk = [next(docs) for _ in range(64)]
            for enc in tok.encode_batch(chunk, add_special_tokens=False):
                buf.extend([bos, *enc.ids, eos])
        yield torch.tensor(buf[:need], dtype=torch.long).view(cfg.batch_size, cfg.seq_len)  # (B, T)
        buf = buf[need:]


def build_model(cfg: TinyParentConfig, tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
    )
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def train_tiny_parent(
    out_dir: str | Path, cfg: TinyParentConfig = TinyParentConfig(), progress: bool = True
) -> dict:
    """Train the tiny parent and save it (safetensors + config + tokenizer) into ``out_dir``.

    Returns a summary (settings, parameter count, first/last loss, wall time) that is also written
    to ``out_dir/training.json``.
    """
    from transformers import GenerationConfig

    torch.set_num_threads(cfg.threads)
    if cfg.device.startswith("cuda"):
        # cuBLAS needs a fixed workspace to be deterministic (PyTorch reproducibility notes).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    texts = corpus.build_documents(cfg.seed, "train", cfg.tokenizer_chars)
    tok = train_tokenizer(texts, cfg.vocab_size)
    model = build_model(cfg, tok).to(cfg.device)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log.info(
        "tiny parent: %d parameters, %d steps of %dx%d tokens",
        n_params,
        cfg.steps,
        cfg.batch_size,
        cfg.seq_len,
    )

    opt = adamw(decay_groups(model, cfg.weight_decay), cfg.lr)
    part = Part("model", model, opt, cfg.grad_clip)
    # bf16 autocast on a GPU (fp32 master weights): the one-GPU example's parent trains in about a minute;
    # the CPU reference stays plain fp32 and bit-repeatable
    trainer = Trainer({"model": part}, schedule(cfg), cfg.device, autocast=cfg.device.startswith("cuda"))
    batches = token_batches(tok, cfg)
    last: list[torch.Tensor] = []

    def loss_fn(step: int):
        ids = next(batches).to(cfg.device)  # (B, T)
        with trainer.autocast():
            loss = model(input_ids=ids, labels=ids).loss
        last[:] = [loss.detach()]
        yield "model", loss

    trainer.train(0, cfg.steps, loss_fn, desc="train-tiny", progress=progress,
                  postfix=lambda: f"loss {float(last[0]):.3f}, lr {trainer.schedule.lr(trainer.step - 1):.2e}")
    losses = [loss for _, loss in part.curve]

    model.eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tok.token_to_id(BOS),
        eos_token_id=tok.token_to_id(EOS),
        pad_token_id=tok.token_to_id(PAD),
        do_sample=False,
        max_new_tokens=64,
    )
    model.to("cpu", dtype=getattr(torch, cfg.save_dtype)).save_pretrained(out)  # transformers >= 5: safetensors
    save_tokenizer(tok, out, cfg.max_position_embeddings)
    pickles = [p.name for p in out.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    if pickles:
        raise RuntimeError(f"{out}: pickle files {pickles} were written; the parent must be safetensors only")
    tail = losses[-min(20, len(losses)) :]
    summary = {
        "config": asdict(cfg),
        "parameters": n_params,
        "first_loss": losses[0],
        "final_loss_mean_last_20": sum(tail) / len(tail),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "wall_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    if size > MAX_PARENT_BYTES:
        log.warning(
            "%s holds %.1f MB, above the %d MB meant for the committed parent",
            out,
            size / 2**20,
            MAX_PARENT_BYTES // 2**20,
        )
    return summary

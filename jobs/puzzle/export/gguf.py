"""Write a nemotron-nas child as a GGUF file that llama.cpp loads and runs (architecture ``deci``).

    puzzle export gguf ./child child.gguf [--dtype f16|bf16|f32] [--pre-tokenizer NAME]
    python3 -c "from puzzle.export.gguf import export_gguf; export_gguf('child', 'child.gguf')"

Our own writer on llama.cpp's format library (the ``gguf`` package), written from llama.cpp's DeciLM
converter (``convert_hf_to_gguf.py``, class ``DeciModel``) and its ``deci`` loader and graph
(``src/models/deci.cpp``); checked against llama.cpp itself by ``benchmarks/bench_llamacpp.py``.

How each layer of the child is written (``deci.attention.head_count`` / ``head_count_kv`` /
``deci.feed_forward_length`` are per-layer arrays; H = num_attention_heads):

| ours | head_count | head_count_kv | feed_forward_length | tensors of ``blk.N`` |
|---|---|---|---|---|
| GQA, n_heads_in_group g | H | H/g | | attn_norm, attn_q, attn_k (rows permuted for llama.cpp's rope), attn_v, attn_output |
| linear attention | H | 0 | | attn_norm, attn_output (= ``linear_attn``) |
| no_op attention | 0 | 0 | | none |
| no_op attention in layer 0 | H | 0 | | attn_norm (ones), attn_output (zeros): a zero linear attention |
| SwiGLU FFN of size I | | | I | ffn_norm, ffn_gate, ffn_up, ffn_down |
| no_op FFN | | | 32 | ffn_norm (ones), ffn_gate, ffn_up, ffn_down (zeros): a zero FFN |
| no_op FFN after a no_op attention, not the last layer | | | 0 | none |
| linear FFN | refused (``GGUFExportError``): llama.cpp's ``deci`` has no linear FFN |

Why the zero blocks: llama.cpp's ``deci`` graph skips the rest of a layer whose FFN length is 0 and so
drops that layer's attention output, and it aborts when the last layer has none; a zero FFN adds exactly
0 instead. It reads the head size (``key_length``) only when layer 0 has heads, so a no_op attention in
layer 0 becomes a linear attention whose output is exactly 0. The rope permutation is the one llama.cpp's
Llama converter applies: Hugging Face rotates the two halves of each head, llama.cpp adjacent pairs.
Llama-3 rope scaling is written as the ``rope_freqs`` tensor of per-frequency divisors.

The vocabulary must be a byte-level BPE ``tokenizer.json`` (what llama.cpp calls ``gpt2``): tokens,
merges, token types and special ids are copied, and the list is padded with ``[PAD{i}]`` up to the
model's vocab_size as llama.cpp's converter does. llama.cpp knows pre-tokenizers (the regex split before
BPE) only by name, so ours must be one it implements; the recognised ones are GPT-2's (``gpt-2``),
Llama 3's (``llama-bpe``) and Qwen2's (``qwen2``). Any other is refused unless ``pre_tokenizer=`` names
one of llama.cpp's to use anyway: then llama.cpp may split some text differently before BPE (so tokenize
it differently), while token ids given to it directly run exactly as ours.

Memory: tensors stream from the safetensors files one at a time (the header is written first), so the
exporter needs about one tensor of memory, not the model.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from puzzle.errors import BadInputError
from puzzle.model.config import ModelConfig
from puzzle.model.io import INDEX_NAME, SINGLE_NAME, ModelLoadError
from puzzle.model.modeling import DeciLMForCausalLM, rope_inv_freq
from puzzle.model.variants import BlockConfigError

ARCH = "deci"
#: Width of the all-zero FFN that stands in for a no_op FFN: the smallest whose rows llama.cpp's
#: 32-element block quantizers can still quantize, so `llama-quantize` works on the file.
ZERO_FFN_SIZE = 32
DTYPES = ("f32", "f16", "bf16")
#: Pre-tokenizer names llama.cpp (as vendored by llama-cpp-python 0.3.36) accepts for a byte-level BPE,
#: for ``pre_tokenizer=`` when ours is not one it implements.
LLAMA_CPP_PRE_TOKENIZERS = (
    "default", "gpt-2", "llama-bpe", "qwen2", "qwen35", "superbpe", "bloom", "gpt3-finnish", "poro-chat",
    "falcon", "mpt", "starcoder", "refact", "command-r", "smollm", "codeshell", "olmo", "dbrx", "smaug-bpe",
    "stablelm2", "deepseek-llm", "deepseek-coder", "deepseek-v3", "tekken", "gpt-4o", "chatglm-bpe",
    "viking", "jais", "exaone", "chameleon", "minerva-7b", "trillion",
)
# The split regexes Hugging Face writes into tokenizer.json for Llama 3 and Qwen2, as llama.cpp quotes them.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# The split regex of the project's own tiny-parent BPE (puzzle.data.tokenizer), which keeps I_TURN_LEFT one
# word: no llama.cpp pre-tokenizer does that, and 'superbpe' (split only around digits) tokenizes 94% of the
# validation documents exactly as Hugging Face does (benchmarks/bench_llamacpp.py), the most of any name.
_NEAREST = {r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z_0-9]+|\s+(?!\S)|\s+": "superbpe"}
# name -> (split regex or None for ByteLevel's own GPT-2 regex, model.ignore_merges llama.cpp assumes,
#          normalizers it is equivalent under)
_KNOWN_PRE = {
    "gpt-2": (None, False, (None,)),
    "llama-bpe": (_LLAMA3_REGEX, True, (None,)),
    # llama.cpp's own converter maps Qwen2 (NFC normalizer included) to qwen2 and applies no NFC.
    "qwen2": (_QWEN2_REGEX, False, (None, "NFC")),
}


class GGUFExportError(BadInputError):
    """A child (or argument) that cannot become a llama.cpp GGUF: names the layer/field and the rule."""


@dataclass
class LayerPlan:
    """What one layer becomes in the GGUF file."""

    head_count: int
    head_count_kv: int
    feed_forward_length: int
    attention: str  # "gqa", "linear", "none", "zero-linear"
    ffn: str  # "swiglu", "zero", "none"


@dataclass
class GGUFSummary:
    path: Path
    dtype: str
    pre_tokenizer: str
    layers: list[LayerPlan]
    n_tensors: int
    n_bytes: int
    notes: list[str] = field(default_factory=list)


# ----- the per-layer plan -------------------------------------------------------------------------------
def plan_layers(cfg: ModelConfig) -> list[LayerPlan]:
    """The GGUF form of every layer (see the module docstring), refusing what llama.cpp cannot run."""
    bad = [i for i, b in enumerate(cfg.block_configs) if b.ffn.replace_with_linear]
    if bad:
        raise GGUFExportError(
            f"block_configs[{bad[0]}].ffn.replace_with_linear: true is not allowed for llama.cpp: its 'deci' "
            f"architecture has no linear FFN (a SwiGLU FFN or none); layers with one: {bad}. Choose a SwiGLU or "
            "no_op FFN there (a run config with search_space.ffn.replace_with_linear: false never makes one)"
        )
    n = cfg.num_hidden_layers
    heads = cfg.num_attention_heads
    plan = []
    for i, b in enumerate(cfg.block_configs):
        a = b.attention
        if a.kind == "gqa":
            hc, kv, attn = heads, a.num_kv_heads(heads), "gqa"
        elif a.kind == "linear":
            hc, kv, attn = heads, 0, "linear"
        elif i == 0:
            hc, kv, attn = heads, 0, "zero-linear"
        else:
            hc, kv, attn = 0, 0, "none"
        f = b.ffn
        if f.kind == "swiglu":
            assert f.intermediate_size is not None
            ff, ffn = f.intermediate_size, "swiglu"
        elif a.no_op and i != n - 1:
            ff, ffn = 0, "none"  # the whole layer is the identity; llama.cpp's 'continue' keeps it so
        else:
            ff, ffn = ZERO_FFN_SIZE, "zero"
        plan.append(LayerPlan(hc, kv, ff, attn, ffn))
    return plan


def permute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection (n_heads*d, C) from Hugging Face's half-split rope order to llama.cpp's
    interleaved pairs: row (h, k*d/2 + j) moves to (h, 2j + k)."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of ``permute_rope``."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----- the vocabulary -----------------------------------------------------------------------------------
@dataclass
class Vocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    special: dict[str, int]  # bos/eos/unk/pad -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    notes: list[str]


def _describe_pre(pre: Any) -> str:
    if not isinstance(pre, dict):
        return repr(pre)
    if pre.get("type") == "Sequence":
        return " + ".join(_describe_pre(p) for p in pre.get("pretokenizers", []))
    if pre.get("type") == "Split":
        pat = pre.get("pattern", {})
        return f"Split({pat.get('Regex', pat.get('String'))!r})"
    if pre.get("type") == "ByteLevel":
        return f"ByteLevel(use_regex={pre.get('use_regex', True)})"
    return str(pre.get("type"))


def recognise_pre_tokenizer(tok: dict[str, Any]) -> str | None:
    """The llama.cpp pre-tokenizer name that splits exactly as this tokenizer.json does, or None."""
    pre = tok.get("pre_tokenizer") or {}
    model = tok.get("model") or {}
    norm = (tok.get("normalizer") or {}).get("type")
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    regex: str | None = None
    if len(parts) == 1 and parts[0].get("type") == "ByteLevel" and parts[0].get("use_regex", True):
        if parts[0].get("add_prefix_space", False):
            return None
    elif (len(parts) == 2 and parts[0].get("type") == "Split" and parts[1].get("type") == "ByteLevel"
          and not parts[1].get("use_regex", True) and not parts[1].get("add_prefix_space", False)
          and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert", False)):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex is None:
            return None
    else:
        return None
    for name, (want_regex, ignore_merges, norms) in _KNOWN_PRE.items():
        if regex == want_regex and bool(model.get("ignore_merges", False)) == ignore_merges and norm in norms:
            return name
    return None


def _bool_template_edge(post: Any, token: str, first: bool) -> bool:
    """Whether the post-processor puts ``token`` first (``first``) or last in a single sequence."""
    if not isinstance(post, dict):
        return False
    if post.get("type") == "Sequence":
        return any(_bool_template_edge(p, token, first) for p in post.get("processors", []))
    if post.get("type") == "TemplateProcessing":
        single = post.get("single") or []
        if not single:
            return False
        edge = single[0] if first else single[-1]
        return (edge.get("SpecialToken") or {}).get("id") == token
    return False


def read_vocab(child: Path, cfg: ModelConfig, pre_tokenizer: str | None = None) -> Vocab:
    """The GGUF vocabulary of ``child``'s tokenizer.json (see the module docstring for what is allowed)."""
    path = child / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(
            f"{path}: not found; llama.cpp needs the vocabulary inside the GGUF, so the child directory must "
            "hold its Hugging Face tokenizer.json (puzzle fetch and save_pretrained copy it)"
        )
    try:
        tok = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise GGUFExportError(f"{path}: not valid JSON: {e}") from None
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise GGUFExportError(
            f"{path}: model.type {model.get('type')!r} is not allowed: llama.cpp reads this kind of tokenizer "
            "as a byte-level BPE ('gpt2') only; allowed: 'BPE' with a ByteLevel pre-tokenizer"
        )
    if model.get("byte_fallback"):
        raise GGUFExportError(
            f"{path}: model.byte_fallback true (a SentencePiece-style BPE) is not allowed: this exporter writes "
            "byte-level BPE vocabularies only"
        )
    for k in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(k):
            raise GGUFExportError(f"{path}: model.{k} {model[k]!r} is not allowed: llama.cpp's BPE has none")
    pre_desc = _describe_pre(tok.get("pre_tokenizer"))
    if "ByteLevel" not in pre_desc:
        raise GGUFExportError(
            f"{path}: pre_tokenizer {pre_desc} is not allowed: llama.cpp's BPE maps bytes to characters as "
            "GPT-2's ByteLevel does, so the pre-tokenizer must end in ByteLevel"
        )
    notes: list[str] = []
    known = recognise_pre_tokenizer(tok)
    if pre_tokenizer is None:
        if known is None:
            parts = (tok.get("pre_tokenizer") or {}).get("pretokenizers") or [{}]
            nearest = _NEAREST.get(((parts[0].get("pattern") or {}).get("Regex")) or "")
            hint = f" The nearest for this one is {nearest!r}." if nearest else ""
            raise GGUFExportError(
                f"{path}: pre_tokenizer {pre_desc} is not one llama.cpp implements (it knows pre-tokenizers by "
                f"name; recognised here: {sorted(_KNOWN_PRE)}).{hint} Pass --pre-tokenizer NAME (one of "
                f"{list(LLAMA_CPP_PRE_TOKENIZERS)}) to write one of llama.cpp's anyway: llama.cpp then splits some "
                "text differently before BPE, so its tokens for a text prompt can differ from Hugging Face's; "
                "token ids given to it directly run exactly as ours"
            )
        pre = known
    else:
        if pre_tokenizer not in LLAMA_CPP_PRE_TOKENIZERS:
            raise GGUFExportError(
                f"--pre-tokenizer: {pre_tokenizer!r} is not allowed; allowed: {list(LLAMA_CPP_PRE_TOKENIZERS)}"
            )
        pre = pre_tokenizer
        if known != pre:
            notes.append(
                f"pre-tokenizer: wrote llama.cpp's {pre!r} for {pre_desc}"
                + (f" (which llama.cpp implements as {known!r})" if known else
                   ", which llama.cpp does not implement: text prompts may tokenize differently there")
            )
    vocab: dict[str, int] = model.get("vocab") or {}
    added = {int(a["id"]): a for a in tok.get("added_tokens") or []}
    by_id: dict[int, str] = {int(i): t for t, i in vocab.items()}
    for i, a in added.items():
        by_id[i] = a["content"]
    if not by_id:
        raise GGUFExportError(f"{path}: the vocabulary is empty")
    top = max(by_id)
    if top >= cfg.vocab_size:
        raise GGUFExportError(
            f"{path}: token id {top} ({by_id[top]!r}) is not allowed: the model's vocab_size is {cfg.vocab_size}, "
            "so ids must be below it"
        )
    tokens, types = [], []
    for i in range(cfg.vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")  # an embedding row the tokenizer never produces, as llama.cpp pads
            types.append(5)  # UNUSED
        elif i in added:
            tokens.append(by_id[i])
            types.append(3 if added[i].get("special") else 4)  # CONTROL / USER_DEFINED
        else:
            tokens.append(by_id[i])
            types.append(1)  # NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    for m in merges:
        if m.count(" ") != 1:
            raise GGUFExportError(
                f"{path}: merge {m!r} is not allowed: llama.cpp stores a merge as 'left right' with one space"
            )
    tc_path = child / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text(encoding="utf-8")) if tc_path.is_file() else {}
    special: dict[str, int] = {}
    for key, value in (("bos", cfg.bos_token_id), ("eos", cfg.eos_token_id), ("pad", cfg.pad_token_id)):
        if isinstance(value, list):
            if len(value) > 1:
                notes.append(f"{key}_token_id: wrote the first of {value}; llama.cpp holds one")
            value = value[0] if value else None
        if value is None:
            name = tc.get(f"{key}_token")
            name = name.get("content") if isinstance(name, dict) else name
            ids = [i for i, t in by_id.items() if t == name] if name else []
            value = ids[0] if ids else None
        if value is not None:
            special[key] = int(value)
    unk = model.get("unk_token")
    if unk is not None and unk in vocab:
        special["unk"] = int(vocab[unk])
    post = tok.get("post_processor")
    bos_text = by_id.get(special.get("bos", -1))
    eos_text = by_id.get(special.get("eos", -1))
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = bos_text is not None and _bool_template_edge(post, bos_text, first=True)
    add_eos = tc.get("add_eos_token")
    if add_eos is None:
        add_eos = eos_text is not None and _bool_template_edge(post, eos_text, first=False)
    chat = tc.get("chat_template")
    if not isinstance(chat, str):
        jinja = child / "chat_template.jinja"
        chat = jinja.read_text(encoding="utf-8") if jinja.is_file() else None
    return Vocab(tokens, types, merges, pre, special, bool(add_bos), bool(add_eos), chat, notes)


# ----- the weights --------------------------------------------------------------------------------------
def _weight_index(d: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it."""
    if (d / INDEX_NAME).is_file():
        wm = json.loads((d / INDEX_NAME).read_text()).get("weight_map", {})
        return {k: d / v for k, v in wm.items()}
    files = [d / SINGLE_NAME] if (d / SINGLE_NAME).is_file() else sorted(d.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{d}: no safetensors weights found (expected {SINGLE_NAME} or {INDEX_NAME})")
    out: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.update({k: f for k in fh.keys()})  # noqa: SIM118  (safe_open is not iterable)
    return out


class _Weights:
    """Reads one tensor at a time from a child's safetensors files (kept open)."""

    def __init__(self, d: Path, cfg: ModelConfig) -> None:
        self.index = {k: v for k, v in _weight_index(d).items() if not k.endswith("rotary_emb.inv_freq")}
        self._open: dict[Path, Any] = {}
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in DeciLMForCausalLM(cfg).state_dict().items()}
        if cfg.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            self.index.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(self.index))
        unexpected = sorted(set(self.index) - set(expected))
        if missing or unexpected:
            raise ModelLoadError(
                f"{d}: weights do not match config.json: missing {missing[:8]}, unexpected {unexpected[:8]}"
            )
        for k, shape in expected.items():
            got = self.shape(k)
            if got != shape:
                raise ModelLoadError(f"{d}: weight {k} has shape {got} but config.json needs {shape}")

    def _handle(self, name: str) -> Any:
        f = self.index[name]
        if f not in self._open:
            if not f.is_file():
                raise ModelLoadError(f"{f}: listed in {INDEX_NAME} but not present")
            self._open[f] = safe_open(str(f), framework="pt")
        return self._open[f]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())


def _to_numpy(t: torch.Tensor, dtype: str) -> tuple[np.ndarray, Any]:
    """(array, raw GGML type or None) for one tensor; 1-D tensors stay f32 as llama.cpp's converter keeps them."""
    import gguf

    if t.ndim <= 1 or dtype == "f32":
        return t.to(torch.float32).contiguous().numpy(), None
    if dtype == "f16":
        return t.to(torch.float16).contiguous().numpy(), None
    # numpy has no bfloat16: hand over the raw 16-bit patterns and tell the writer what they are
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy(), gguf.GGMLQuantizationType.BF16


def _tensor_plan(cfg: ModelConfig, plan: list[LayerPlan]) -> list[tuple[str, Any]]:
    """(GGUF name, source) in file order; a source is a HF tensor name, ("rope", name, n_heads) for a
    permuted q/k, or ("ones"|"zeros", shape)."""
    c = cfg.hidden_size
    out: list[tuple[str, Any]] = [("token_embd.weight", "model.embed_tokens.weight")]
    if cfg.rope_scaling is not None:
        out.append(("rope_freqs.weight", ("rope_freqs",)))
    for i, p in enumerate(plan):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        if p.attention == "gqa":
            out += [
                (blk + "attn_norm.weight", hf + "input_layernorm.weight"),
                (blk + "attn_q.weight", ("rope", hf + "self_attn.q_proj.weight", p.head_count)),
                (blk + "attn_k.weight", ("rope", hf + "self_attn.k_proj.weight", p.head_count_kv)),
                (blk + "attn_v.weight", hf + "self_attn.v_proj.weight"),
                (blk + "attn_output.weight", hf + "self_attn.o_proj.weight"),
            ]
        elif p.attention == "linear":
            out += [(blk + "attn_norm.weight", hf + "input_layernorm.weight"),
                    (blk + "attn_output.weight", hf + "self_attn.linear_attn.weight")]
        elif p.attention == "zero-linear":
            out += [(blk + "attn_norm.weight", ("ones", (c,))), (blk + "attn_output.weight", ("zeros", (c, c)))]
        if p.ffn == "swiglu":
            out += [
                (blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight"),
                (blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight"),
                (blk + "ffn_up.weight", hf + "mlp.up_proj.weight"),
                (blk + "ffn_down.weight", hf + "mlp.down_proj.weight"),
            ]
        elif p.ffn == "zero":
            z = ZERO_FFN_SIZE
            out += [(blk + "ffn_norm.weight", ("ones", (c,))), (blk + "ffn_gate.weight", ("zeros", (z, c))),
                    (blk + "ffn_up.weight", ("zeros", (z, c))), (blk + "ffn_down.weight", ("zeros", (c, z)))]
    out.append(("output_norm.weight", "model.norm.weight"))
    if not cfg.tie_word_embeddings:
        out.append(("output.weight", "lm_head.weight"))  # tied: llama.cpp reuses token_embd
    return out


def _rope_freq_factors(cfg: ModelConfig) -> torch.Tensor:
    """Llama-3 scaling as llama.cpp applies it: each rope frequency divided by a factor (d/2,)."""
    plain = rope_inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (plain / rope_inv_freq(cfg)).to(torch.float32)


# ----- the file -----------------------------------------------------------------------------------------
def export_gguf(child_dir: str | Path, out_path: str | Path, dtype: str = "f16",
                pre_tokenizer: str | None = None, name: str | None = None) -> GGUFSummary:
    """Write ``child_dir`` (nemotron-nas) as ``out_path`` (GGUF, arch 'deci'); returns what was written.

    The file appears only when complete (written beside it, then renamed)."""
    import gguf

    if dtype not in DTYPES:
        raise GGUFExportError(f"--dtype: {dtype!r} is not allowed; allowed: {list(DTYPES)}")
    child = Path(child_dir)
    if not (child / "config.json").is_file():
        raise GGUFExportError(f"CHILD: {str(child)!r} holds no config.json; give a child directory (puzzle fetch)")
    try:
        cfg = ModelConfig.from_json_file(child / "config.json")
    except BlockConfigError as e:
        raise GGUFExportError(f"CHILD: {e}") from None
    plan = plan_layers(cfg)
    vocab = read_vocab(child, cfg, pre_tokenizer)
    weights = _Weights(child, cfg)
    assert cfg.head_dim is not None
    notes = list(vocab.notes)
    if plan[0].attention == "zero-linear":
        notes.append("layer 0: no_op attention written as a zero linear attention (llama.cpp reads the head size "
                     "from layer 0)")
    notes += [f"layer {i}: no_op FFN written as a zero FFN of width {ZERO_FFN_SIZE}"
              for i, p in enumerate(plan) if p.ffn == "zero"]

    def load(src: Any) -> torch.Tensor:
        if isinstance(src, str):
            return weights.get(src)
        if src[0] == "rope":
            return permute_rope(weights.get(src[1]), src[2])
        if src[0] == "rope_freqs":
            return _rope_freq_factors(cfg)
        return (torch.ones if src[0] == "ones" else torch.zeros)(src[1], dtype=torch.float32)

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    w = gguf.GGUFWriter(str(tmp), ARCH)
    w.add_name(name or child.resolve().name)
    w.add_type("model")
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length([p.feed_forward_length for p in plan])
    w.add_head_count([p.head_count for p in plan])
    w.add_head_count_kv([p.head_count_kv for p in plan])
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.token_types)
    w.add_token_merges(vocab.merges)
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id), ("unk", w.add_unk_token_id),
                     ("pad", w.add_pad_token_id)):
        if key in vocab.special:
            add(vocab.special[key])
    w.add_add_bos_token(vocab.add_bos)
    w.add_add_eos_token(vocab.add_eos)
    if vocab.chat_template:
        w.add_chat_template(vocab.chat_template)

    # Header first (names, shapes, types), then the data one tensor at a time: no whole model in memory.
    tensors = _tensor_plan(cfg, plan)
    n_bytes = 0
    for gname, src in tensors:
        shape = _source_shape(src, weights, cfg)
        big = len(shape) > 1 and dtype != "f32"
        if big and dtype == "bf16":
            w.add_tensor_info(gname, shape, np.dtype(np.int16), _nbytes(shape, 2), gguf.GGMLQuantizationType.BF16)
        else:
            item = 2 if big else 4
            w.add_tensor_info(gname, shape, np.dtype(np.float16 if big else np.float32), _nbytes(shape, item))
        n_bytes += _nbytes(shape, 2 if big else 4)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, src in tensors:
            arr, _ = _to_numpy(load(src), dtype)
            w.write_tensor_data(arr)
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return GGUFSummary(out, dtype, vocab.pre, plan, len(tensors), n_bytes, notes)


def _nbytes(shape: tuple[int, ...], item: int) -> int:
    return int(np.prod(shape)) * item


def _source_shape(src: Any, weights: _Weights, cfg: ModelConfig) -> tuple[int, ...]:
    if isinstance(src, str):
        return weights.shape(src)
    if src[0] == "rope":
        return weights.shape(src[1])
    if src[0] == "rope_freqs":
        assert cfg.head_dim is not None
        return (cfg.head_dim // 2,)
    return tuple(src[1])

"""Save/load the child in the Hugging Face nemotron-nas format, and convert a parent into it.

``save_pretrained`` writes config.json, safetensors weights (sharded with model.safetensors.index.json
above ``max_shard_bytes``), generation_config.json, the tokenizer files and ``configuration_decilm.py``
(the config class serving engines load through ``auto_map``; our loaders never run it).
``load_pretrained`` reads them back. ``load_parent`` accepts a LlamaForCausalLM directory (Mistral and Qwen2 where the layout is
the same) or an existing nemotron-nas directory and returns the heterogeneous model with every layer
the parent variant. Weights are read with safetensors only; pickle checkpoints are refused.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from puzzle import serving as serving_rules
from puzzle.errors import ConfigError
from puzzle.model.config import AUTO_MAP_MODULE, ModelConfig, hf_common_fields
from puzzle.model.modeling import DeciLMForCausalLM
from puzzle.model.variants import AttentionVariant, BlockConfig, BlockConfigError, FFNVariant

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# The configuration module every child carries (config.json's auto_map names it): our own file, copied.
CONFIG_MODULE = AUTO_MAP_MODULE + ".py"
CONFIG_MODULE_SOURCE = Path(__file__).with_name(CONFIG_MODULE)
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a config dtype name ("float32", "bfloat16", "float16")."""
    if name not in _DTYPES:
        raise ValueError(f"dtype: {name!r} is not allowed; allowed: {list(_DTYPES)}")
    return _DTYPES[name]


class ModelLoadError(ConfigError):
    """A model directory that cannot be loaded: says which file or field and why (bad input)."""


def _dtype_name(dtype: torch.dtype) -> str:
    for k, v in _DTYPES.items():
        if v == dtype:
            return k
    raise ValueError(f"dtype: {dtype} is not allowed; allowed: {list(_DTYPES)}")


def save_pretrained(
    model: DeciLMForCausalLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    serving: str | Sequence[str] = "any",
) -> Path:
    """Write the model as a nemotron-nas Hugging Face directory; returns ``out_dir``.

    ``serving`` names the engines the child must load in (``"vllm"``, ``["vllm", "llamacpp"]``, ...;
    see :mod:`puzzle.serving`): a child that breaks one of their rules is refused (``ValueError`` naming
    the layer, the field, the engine and what is allowed) before anything is written. Every child also
    gets the configuration module (``configuration_decilm.py``, named by ``auto_map`` in config.json)
    that engines resolving the config through transformers load with ``trust_remote_code``.
    """
    cfg = model.current_config()
    engines = serving_rules.parse_serving(serving)
    broken = serving_rules.block_violations(engines, cfg.to_dict()["block_configs"], cfg.hidden_size,
                                            int(cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads))
    if broken:
        raise ValueError(f"serving: {engines} cannot load this child: {serving_rules.messages(broken)}")
    if max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes: {max_shard_bytes} is not allowed; must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # tied: Hugging Face stores only the embedding
    dtype = next(iter(sd.values())).dtype
    cfg.torch_dtype = _dtype_name(dtype)

    # Greedy sharding in state_dict order; a single tensor larger than the limit gets its own shard.
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in sd.items():
        nb = v.numel() * v.element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nb
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        old.unlink(missing_ok=True)
    if len(shards) == 1:
        save_file(shards[0], str(out / SINGLE_NAME), metadata={"format": "pt"})
    else:
        n = len(shards)
        weight_map = {}
        for i, sh in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            save_file(sh, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in sh})
        total = sum(v.numel() * v.element_size() for v in sd.values())
        (out / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
        )
    (out / "config.json").write_text(cfg.to_json_string())
    shutil.copyfile(CONFIG_MODULE_SOURCE, out / CONFIG_MODULE)
    gen: dict[str, Any] = {"do_sample": False}
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, k) is not None:
            gen[k] = getattr(cfg, k)
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    return out


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files found in ``src`` to ``dst``; returns their names."""
    s = Path(src)
    if not s.is_dir():
        raise ModelLoadError(f"tokenizer_dir: {str(s)!r} is not a directory")
    copied = [f for f in _TOKENIZER_FILES if (s / f).is_file()]
    if not copied:
        raise ModelLoadError(f"tokenizer_dir: {str(s)!r} holds none of {list(_TOKENIZER_FILES)}")
    for f in copied:
        if (s / f).resolve() != (Path(dst) / f).resolve():
            shutil.copyfile(s / f, Path(dst) / f)
    return copied


def weight_files(d: Path) -> list[Path]:
    """The safetensors files of a Hugging Face directory (index-listed shards, one file, or every
    ``*.safetensors``); ModelLoadError when there are none, a listed shard is missing, or only pickles."""
    if (d / INDEX_NAME).is_file():
        idx = json.loads((d / INDEX_NAME).read_text())
        files = sorted(set(idx.get("weight_map", {}).values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise ModelLoadError(f"{d / INDEX_NAME}: shard file(s) {missing} listed but not present")
        return [d / f for f in files]
    if (d / SINGLE_NAME).is_file():
        return [d / SINGLE_NAME]
    st = sorted(d.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise ModelLoadError(
            f"{d}: only pickle weights {pickles} found; pickle checkpoints are not loaded (they can run code). "
            f"Convert them to safetensors first, e.g. transformers' save_pretrained(..., safe_serialization=True)"
        )
    raise ModelLoadError(f"{d}: no weights found (expected {SINGLE_NAME} or {INDEX_NAME} with shards)")


def read_safetensors(d: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory (single file or sharded)."""
    out: dict[str, torch.Tensor] = {}
    for f in weight_files(Path(d)):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118  (safe_open is not iterable)
                out[k] = fh.get_tensor(k)
    return out


def _load_weights(model: DeciLMForCausalLM, sd: dict[str, torch.Tensor], source: str) -> None:
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        msg = [f"{source}: weights do not match the config"]
        if missing:
            msg.append(f"missing {len(missing)}: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            msg.append(f"unexpected {len(unexpected)}: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        raise ModelLoadError("; ".join(msg))
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ModelLoadError(
                f"{source}: weight {k} has shape {tuple(v.shape)} but the config needs {tuple(expected[k].shape)}"
            )
    model.load_state_dict(sd, strict=False)


def _finish(model: DeciLMForCausalLM, dtype: torch.dtype | str | None, device: str | torch.device) -> DeciLMForCausalLM:
    if isinstance(dtype, str):
        dtype = torch_dtype(dtype)
    if dtype is not None:
        model.to(dtype)
    model.to(device)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def load_pretrained(
    path: str | Path, dtype: torch.dtype | str | None = torch.float32, device: str | torch.device = "cpu"
) -> DeciLMForCausalLM:
    """Load a nemotron-nas directory written by ``save_pretrained`` (or by NVIDIA's tools)."""
    d = Path(path)
    if not (d / "config.json").is_file():
        raise ModelLoadError(f"{d}: config.json not found")
    cfg = ModelConfig.from_json_file(d / "config.json")
    with torch.device("meta"):
        model = DeciLMForCausalLM(cfg)
    model.to_empty(device="cpu")
    _load_weights(model, read_safetensors(d), str(d))
    return _finish(model, dtype, device)


_PARENT_TYPES = ("llama", "mistral", "qwen2")
#: Fields a Llama-family config.json must give, as integers >= 1.
_REQUIRED_INTS = ("vocab_size", "hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size")


def _int_field(d: dict[str, Any], key: str, source: str, required: bool = True) -> int | None:
    v = d.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        got = "missing" if key not in d else f"{v!r}"
        raise ModelLoadError(f"{source}: {key}: {got} is not allowed; allowed: an integer >= 1")
    return v


def parent_model_config(d: dict[str, Any], source: str) -> ModelConfig:
    """A ModelConfig (every layer the parent variant) from a Llama / Mistral / Qwen2 config.json."""
    if not isinstance(d, dict):
        raise ModelLoadError(f"{source}: the top level must be a JSON object, got {type(d).__name__}")
    mt = d.get("model_type")
    if mt not in _PARENT_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {mt!r} is not allowed; allowed: {list(_PARENT_TYPES)} or 'nemotron-nas'"
        )
    for k in _REQUIRED_INTS:
        _int_field(d, k, source)
    _int_field(d, "num_key_value_heads", source, required=False)
    _int_field(d, "head_dim", source, required=False)
    _int_field(d, "max_position_embeddings", source, required=False)
    for k in ("attention_bias", "mlp_bias"):
        if d.get(k):
            raise ModelLoadError(f"{source}: {k}: true is not supported (the nemotron-nas child has no biases)")
    # Qwen2 always has q/k/v biases (no config field says so): the weight check refuses them by tensor name.
    if d.get("hidden_act", "silu") != "silu":
        raise ModelLoadError(f"{source}: hidden_act {d.get('hidden_act')!r} is not allowed; allowed: 'silu'")
    sw = d.get("sliding_window")
    use_sw = d.get("use_sliding_window", mt == "mistral")
    if sw is not None and use_sw and sw < d.get("max_position_embeddings", 0):
        raise ModelLoadError(
            f"{source}: sliding_window {sw} is not supported (attention here is full causal); "
            f"allowed: null or >= max_position_embeddings"
        )
    h, nh = d["hidden_size"], d["num_attention_heads"]
    nkv = d.get("num_key_value_heads") or nh
    if nh % nkv:
        raise ModelLoadError(f"{source}: num_key_value_heads {nkv} does not divide num_attention_heads {nh}")
    try:
        common = hf_common_fields(d, rms_norm_eps_default=1e-6)
    except BlockConfigError as e:
        raise ModelLoadError(f"{source}: {e}") from None
    block = BlockConfig(AttentionVariant.gqa(nh // nkv), FFNVariant.exact(d["intermediate_size"]))
    return ModelConfig(
        vocab_size=d["vocab_size"],
        hidden_size=h,
        num_attention_heads=nh,
        block_configs=[block] * d["num_hidden_layers"],
        head_dim=d.get("head_dim") or h // nh,
        **common,
    )


def parent_config(path: str | Path) -> ModelConfig:
    """The parent's layer structure from its ``config.json`` alone (no weights read): a Llama-family
    directory (every layer the parent variant) or a nemotron-nas one. Every problem is a ModelLoadError
    (bad input) naming the file and the field."""
    d = Path(path)
    f = d / "config.json"
    if not d.is_dir():
        raise ModelLoadError(f"{d}: is not a directory; expected a Hugging Face model directory")
    if not f.is_file():
        raise ModelLoadError(f"{f}: not found; expected a Hugging Face model directory (config.json + safetensors)")
    try:
        raw = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{f}: not valid JSON ({err}); is the file truncated?") from None
    if isinstance(raw, dict) and raw.get("model_type") == "nemotron-nas":
        try:
            return ModelConfig.from_dict(raw, str(f))
        except BlockConfigError as err:
            raise ModelLoadError(str(err)) from None
    return parent_model_config(raw, str(f))


def load_parent(
    path: str | Path, dtype: torch.dtype | str | None = torch.float32, device: str | torch.device = "cpu"
) -> DeciLMForCausalLM:
    """The parent as a heterogeneous model: a Llama-layout directory or a nemotron-nas directory."""
    d = Path(path)
    cfg = parent_config(d)
    if json.loads((d / "config.json").read_text(encoding="utf-8")).get("model_type") == "nemotron-nas":
        return load_pretrained(d, dtype, device)
    sd = read_safetensors(d)
    bias = sorted(k for k in sd if k.endswith(".bias"))
    if bias:
        raise ModelLoadError(
            f"{d}: bias weights {bias[:4]}{' ...' if len(bias) > 4 else ''} are not supported "
            f"(e.g. Qwen2 attention biases); the nemotron-nas child has none"
        )
    with torch.device("meta"):
        model = DeciLMForCausalLM(cfg)
    model.to_empty(device="cpu")
    _load_weights(model, sd, str(d))
    return _finish(model, dtype, device)

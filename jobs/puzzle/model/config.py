"""The child's model config: reads and writes the Hugging Face ``nemotron-nas`` (DeciLM) config.json.

``ModelConfig`` holds the global Llama-style fields plus one ``BlockConfig`` per layer. Its JSON form
has ``"architectures": ["DeciLMForCausalLM"]``, ``"model_type": "nemotron-nas"``, per-layer
``block_configs`` and ``num_key_value_heads`` / ``intermediate_size`` set to null (they vary per layer),
as vLLM's ``nemotron_nas`` loader expects, and ``auto_map`` naming the configuration module that
``save_pretrained`` writes beside it (``configuration_decilm.DeciLMConfig``): transformers has no
``nemotron-nas`` config class, so engines that resolve the config through transformers (vLLM, SGLang,
TensorRT-LLM) load that module with ``trust_remote_code``. Our own code reads the JSON and never runs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from puzzle.model.variants import BlockConfig, BlockConfigError, block_config_from_json

_ROPE_TYPES = ("default", "llama3")
AUTO_MAP_MODULE = "configuration_decilm"
AUTO_MAP = {"AutoConfig": f"{AUTO_MAP_MODULE}.DeciLMConfig"}


def _rope_from_hf(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, Llama-3 rope_scaling or None) from either HF 4.x or 5.x config keys."""
    params = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling") or None
    theta = d.get("rope_theta", params.get("rope_theta", 10000.0))
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling is not None:
        rtype = scaling.get("rope_type", scaling.get("type", "default"))
        if rtype not in _ROPE_TYPES:
            raise BlockConfigError(
                f"rope_scaling.rope_type: value {rtype!r} is not allowed; allowed: {list(_ROPE_TYPES)}"
            )
        if rtype == "default":
            scaling = None
        else:
            for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                if k not in scaling:
                    raise BlockConfigError(f"rope_scaling.{k}: required for rope_type 'llama3' but missing")
            scaling = {"rope_type": "llama3", **{k: scaling[k] for k in (
                "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
    return float(theta), scaling


@dataclass
class ModelConfig:
    """Global fields of the heterogeneous causal LM and its per-layer block configs."""

    vocab_size: int
    hidden_size: int
    num_attention_heads: int
    block_configs: list[BlockConfig]
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | list[int] | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "float32"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    @property
    def num_hidden_layers(self) -> int:
        return len(self.block_configs)

    def with_blocks(self, block_configs: list[BlockConfig]) -> ModelConfig:
        return replace(self, block_configs=list(block_configs))

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "architectures": ["DeciLMForCausalLM"],
            "model_type": "nemotron-nas",
            "auto_map": dict(AUTO_MAP),
            "block_configs": [b.to_json(self.hidden_size) for b in self.block_configs],
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "head_dim": self.head_dim,
            "intermediate_size": None,
            "num_key_value_heads": None,
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.torch_dtype,
            "use_cache": True,
        }
        return d

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        if d.get("model_type") != "nemotron-nas":
            raise BlockConfigError(
                f"{source}: model_type {d.get('model_type')!r} is not allowed here; expected 'nemotron-nas'"
            )
        for k in ("vocab_size", "hidden_size", "num_attention_heads"):
            if not isinstance(d.get(k), int) or isinstance(d.get(k), bool) or d[k] < 1:
                raise BlockConfigError(f"{source}: {k}: value {d.get(k)!r} is not allowed; expected an integer >= 1")
        blocks = d.get("block_configs")
        if not isinstance(blocks, list) or not blocks:
            raise BlockConfigError(f"{source}: block_configs: value {blocks!r} is not allowed; expected a non-empty list")
        n = d.get("num_hidden_layers", len(blocks))
        if n != len(blocks):
            raise BlockConfigError(
                f"{source}: num_hidden_layers is {n} but block_configs has {len(blocks)} entries; they must agree"
            )
        for k in ("attention_bias", "mlp_bias"):
            if d.get(k):
                raise BlockConfigError(f"{source}: {k}: value true is not allowed; biases are not supported")
        parsed = []
        for i, b in enumerate(blocks):
            try:
                parsed.append(block_config_from_json(b, i, d["hidden_size"], d["num_attention_heads"]))
            except BlockConfigError as e:
                raise BlockConfigError(f"{source}: {e}") from None
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            num_attention_heads=d["num_attention_heads"],
            block_configs=parsed,
            head_dim=d.get("head_dim"),
            **hf_common_fields(d, rms_norm_eps_default=1e-5),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise BlockConfigError(f"{p}: not valid JSON: {e}") from None
        return cls.from_dict(d, str(p))


def hf_common_fields(d: dict[str, Any], rms_norm_eps_default: float) -> dict[str, Any]:
    """The ModelConfig fields a Hugging Face config.json spells the same way for Llama-family parents
    and nemotron-nas children (norm, RoPE, positions, embeddings tying, special tokens, dtype)."""
    theta, scaling = _rope_from_hf(d)
    return {
        "rms_norm_eps": float(d.get("rms_norm_eps", rms_norm_eps_default)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(d.get("max_position_embeddings", 2048)),
        "tie_word_embeddings": bool(d.get("tie_word_embeddings", False)),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_id": d.get("eos_token_id"),
        "pad_token_id": d.get("pad_token_id"),
        "torch_dtype": str(d.get("torch_dtype") or d.get("dtype") or "float32"),
    }

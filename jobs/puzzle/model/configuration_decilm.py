"""Configuration of a nemotron-nas (DeciLM) model, written by puzzle's ``save_pretrained`` beside config.json.

transformers does not ship the ``nemotron-nas`` model type, so engines that resolve a checkpoint's
config through transformers (vLLM, SGLang, TensorRT-LLM) load this class through ``auto_map`` in
config.json, with ``trust_remote_code``. It only holds the config: the engines bring their own model
code (``DeciLMForCausalLM``). It reads the ``block_configs`` entries so that both styles of reader
work: by attribute (``block.attention.no_op``, as vLLM's loader does) and as mappings
(``block["attention"]["no_op"]``, as the JSON and NVIDIA's tools do).

Self-contained on purpose (it imports only transformers): it is copied into every saved child.
puzzle's own loaders read config.json directly and never import it.
"""

from __future__ import annotations

import warnings
from typing import Any

from transformers import PretrainedConfig


class BlockEntry(dict):
    """One part of a ``block_configs`` entry: a mapping whose keys also read as attributes."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        try:
            del self[name]
        except KeyError:
            raise AttributeError(name) from None


def _entry(value: Any) -> Any:
    """Mappings, nested ones too, as :class:`BlockEntry` (keys as attributes); other values as they are."""
    if isinstance(value, dict):
        return BlockEntry({k: _entry(v) for k, v in value.items()})
    return value


class DeciLMConfig(PretrainedConfig):
    """A heterogeneous Llama: per-layer ``block_configs`` (attention and FFN variant of each layer)."""

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ("past_key_values",)

    def __init__(
        self,
        vocab_size: int = 32000,
        hidden_size: int = 4096,
        num_attention_heads: int = 32,
        num_hidden_layers: int | None = None,
        head_dim: int | None = None,
        block_configs: list[dict[str, Any]] | None = None,
        hidden_act: str = "silu",
        rms_norm_eps: float = 1e-5,
        rope_theta: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
        max_position_embeddings: int = 2048,
        attention_bias: bool = False,
        mlp_bias: bool = False,
        intermediate_size: int | None = None,
        num_key_value_heads: int | None = None,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        **kwargs: Any,
    ) -> None:
        self.block_configs = [_entry(b) for b in (block_configs or [])]
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_attention_heads = num_attention_heads
        self.num_hidden_layers = num_hidden_layers if num_hidden_layers is not None else len(self.block_configs)
        self.head_dim = head_dim if head_dim is not None else hidden_size // num_attention_heads
        self.hidden_act = hidden_act
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        with warnings.catch_warnings():
            # transformers 5 maps rope_scaling onto rope_parameters with a FutureWarning; readers written
            # for 4.x (TensorRT-LLM's DeciConfig.from_hugging_face) read the attribute, so it stays.
            warnings.simplefilter("ignore", FutureWarning)
            self.rope_scaling = rope_scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_bias = attention_bias
        self.mlp_bias = mlp_bias
        # Both vary per layer (block_configs); null in config.json, as NVIDIA's checkpoints have them.
        self.intermediate_size = intermediate_size
        self.num_key_value_heads = num_key_value_heads
        self.use_cache = use_cache
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

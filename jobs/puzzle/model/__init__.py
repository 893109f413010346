"""Block variants, the heterogeneous nemotron-nas child model, save/load, parent conversion, variant
initialization from the parent and exact per-variant counts.

Public API (import from ``puzzle.model``): ``AttentionVariant``, ``FFNVariant``, ``BlockConfig``,
``ModelConfig``, ``DeciLMForCausalLM``, ``StaticKVCache``, ``build_attention``, ``build_ffn``,
``save_pretrained``, ``load_pretrained``, ``load_parent``, ``expand_search_space``, ``init_attention``,
``init_ffn``, and the counts in ``puzzle.model.counts``.
"""

from puzzle.model.config import ModelConfig
from puzzle.model.io import ModelLoadError, copy_tokenizer, load_parent, load_pretrained, read_safetensors, save_pretrained
from puzzle.model.modeling import (
    DeciLayer,
    DeciLMForCausalLM,
    GQAttention,
    LinearAttention,
    LinearFFN,
    RMSNorm,
    StaticKVCache,
    SwiGLU,
    build_attention,
    build_ffn,
)
from puzzle.model.variants import (
    AttentionVariant,
    BlockConfig,
    BlockConfigError,
    FFNVariant,
    attention_variant_from_name,
    ffn_intermediate_size,
    ffn_variant_from_name,
    variant_from_name,
    vllm_intermediate_size,
)

__all__ = [
    "AttentionVariant", "BlockConfig", "BlockConfigError", "DeciLayer", "DeciLMForCausalLM", "FFNVariant",
    "GQAttention", "LinearAttention", "LinearFFN", "ModelConfig", "ModelLoadError", "RMSNorm", "StaticKVCache",
    "SwiGLU", "attention_variant_from_name", "build_attention", "build_ffn", "copy_tokenizer",
    "ffn_intermediate_size", "ffn_variant_from_name", "load_parent", "load_pretrained", "read_safetensors",
    "save_pretrained", "variant_from_name", "vllm_intermediate_size",
]

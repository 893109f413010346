"""Block variants, the heterogeneous nemotron-nas child model, save/load, parent conversion, variant
initialization from the parent and exact per-variant counts.

Public API (import from ``puzzle.model``): ``AttentionVariant``, ``FFNVariant``, ``BlockConfig``,
``ModelConfig``, ``DeciLMForCausalLM``, ``StaticKVCache``, ``build_attention``, ``build_ffn``,
``save_pretrained``, ``load_pretrained``, ``load_parent``, ``expand_search_space``, ``init_attention``,
``init_ffn``, and the counts in ``puzzle.model.counts``.
"""

from puzzle.model.config import ModelConfig
from puzzle.model.counts import (
    Counts,
    ModelCounts,
    attention_counts,
    ffn_counts,
    model_counts,
    non_block_counts,
)
from puzzle.model.init import fit_linear, init_attention, init_ffn, normalized_mse
from puzzle.model.io import (
    ModelLoadError,
    copy_tokenizer,
    load_parent,
    load_pretrained,
    read_safetensors,
    save_pretrained,
)
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
from puzzle.model.search_space import expand_search_space, head_divisors
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
    "AttentionVariant",
    "BlockConfig",
    "BlockConfigError",
    "Counts",
    "DeciLMForCausalLM",
    "DeciLayer",
    "FFNVariant",
    "GQAttention",
    "LinearAttention",
    "LinearFFN",
    "ModelConfig",
    "ModelCounts",
    "ModelLoadError",
    "RMSNorm",
    "StaticKVCache",
    "SwiGLU",
    "attention_counts",
    "attention_variant_from_name",
    "build_attention",
    "build_ffn",
    "copy_tokenizer",
    "expand_search_space",
    "ffn_counts",
    "ffn_intermediate_size",
    "ffn_variant_from_name",
    "fit_linear",
    "head_divisors",
    "init_attention",
    "init_ffn",
    "load_parent",
    "load_pretrained",
    "model_counts",
    "non_block_counts",
    "normalized_mse",
    "read_safetensors",
    "save_pretrained",
    "variant_from_name",
    "vllm_intermediate_size",
]

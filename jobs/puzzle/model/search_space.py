"""Expand the user's search space (``puzzle.config.SearchSpaceConfig``) into concrete block variants.

The result is what BLD trains, profiling measures, scoring scores and the MIP chooses from: a list of
attention variants and a list of FFN variants, each with a stable ``.name`` for artifact keys.
"""

from __future__ import annotations

from puzzle.config import SearchSpaceConfig
from puzzle.errors import ConfigError
from puzzle.model.config import ModelConfig
from puzzle.model.variants import AttentionVariant, FFNVariant, head_divisors, vllm_intermediate_size


def expand_search_space(
    space: SearchSpaceConfig, parent_cfg: ModelConfig
) -> tuple[list[AttentionVariant], list[FFNVariant]]:
    """(attention variants, FFN variants) for ``parent_cfg``; the parent's own variants come first.

    n_heads_in_group values that do not divide the parent's head count are a ``ConfigError``;
    ``serving='vllm'`` leaves out replace_with_linear. FFN variants whose intermediate size equals the
    parent's are dropped in favour of the parent's own ``ffn_i{size}`` (same module, one name).
    """
    nh = parent_cfg.num_attention_heads
    allowed = head_divisors(nh)
    bad = [g for g in space.attention.n_heads_in_group if g not in allowed]
    if bad:
        raise ConfigError(
            f"search_space.attention.n_heads_in_group: value(s) {bad} are not allowed for this parent "
            f"(num_attention_heads={nh}); allowed: {allowed}"
        )
    linear_ok = space.serving != "vllm"
    parent_blocks = parent_cfg.block_configs
    attn: list[AttentionVariant] = []
    ffn: list[FFNVariant] = []

    def add(lst: list, v: object) -> None:
        if v not in lst:
            lst.append(v)

    if space.include_parent:
        for b in parent_blocks:
            if linear_ok or not b.attention.replace_with_linear:
                add(attn, b.attention)
            if linear_ok or not b.ffn.replace_with_linear:
                add(ffn, b.ffn)
    for g in space.attention.n_heads_in_group:
        add(attn, AttentionVariant.gqa(g))
    if space.attention.replace_with_linear and linear_ok:
        add(attn, AttentionVariant.linear())
    if space.attention.no_op:
        add(attn, AttentionVariant.noop())

    taken = {v.intermediate_size for v in ffn if v.kind == "swiglu"}
    for m in space.ffn.ffn_mult:
        v = FFNVariant.from_mult(m, parent_cfg.hidden_size)
        if not linear_ok:  # serving: vllm builds exactly vLLM's size for an ffn_mult
            v = FFNVariant("swiglu", vllm_intermediate_size(m, parent_cfg.hidden_size), float(m))
        if v.intermediate_size in taken:
            continue
        taken.add(v.intermediate_size)
        ffn.append(v)
    if space.ffn.replace_with_linear and linear_ok:
        add(ffn, FFNVariant.linear())
    if space.ffn.no_op:
        add(ffn, FFNVariant.noop())
    return attn, ffn

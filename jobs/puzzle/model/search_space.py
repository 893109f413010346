"""Expand the user's search space (``puzzle.config.SearchSpaceConfig``) into concrete block variants.

The result is what BLD trains, profiling measures, scoring scores and the MIP chooses from: a list of
attention variants and a list of FFN variants, each with a stable ``.name`` for artifact keys. The
engines of ``search_space.serving`` decide which variants exist and how FFNs are sized
(:mod:`puzzle.serving`).
"""

from __future__ import annotations

from puzzle import serving
from puzzle.config import SearchSpaceConfig
from puzzle.errors import ConfigError
from puzzle.model.config import ModelConfig
from puzzle.model.variants import AttentionVariant, FFNVariant, head_divisors


def expand_search_space(
    space: SearchSpaceConfig, parent_cfg: ModelConfig
) -> tuple[list[AttentionVariant], list[FFNVariant]]:
    """(attention variants, FFN variants) for ``parent_cfg``; the parent's own variants come first.

    n_heads_in_group values that do not divide the parent's head count are a ``ConfigError``, and so is
    a search space that breaks a rule of an engine in ``space.serving`` for this parent (head size, FFN
    sizes: :func:`puzzle.serving.parent_violations`). Variants an engine cannot build are left out
    (replace_with_linear where it has none), and where an engine sizes FFNs from ffn_mult on its grid
    the ffn_mult variants get exactly that size, as exact-size variants (``ffn_i{size}``). FFN variants
    whose intermediate size equals the parent's are dropped in favour of the parent's own
    ``ffn_i{size}`` (same module, one name).
    """
    nh = parent_cfg.num_attention_heads
    allowed = head_divisors(nh)
    bad = [g for g in space.attention.n_heads_in_group if g not in allowed]
    if bad:
        raise ConfigError(
            f"search_space.attention.n_heads_in_group: value(s) {bad} are not allowed for this parent "
            f"(num_attention_heads={nh}); allowed: {allowed}"
        )
    engines = serving.engines_of(space.serving)
    h = parent_cfg.hidden_size
    parent_blocks = parent_cfg.block_configs
    broken = serving.parent_violations(
        space.serving, hidden_size=h, head_dim=int(parent_cfg.head_dim or h // nh),
        ffn_mults=space.ffn.ffn_mult,
        parent_ffn_sizes=[b.ffn.intermediate_size for b in parent_blocks if b.ffn.kind == "swiglu"],
        include_parent=space.include_parent,
    )
    if broken:
        raise ConfigError(serving.messages(broken))
    linear_attn_ok = all(r.linear_attention for r in engines)
    linear_ffn_ok = all(r.linear_ffn for r in engines)
    on_grid = any(r.ffn_grid for r in engines)
    attn: list[AttentionVariant] = []
    ffn: list[FFNVariant] = []

    def add(lst: list, v: object) -> None:
        if v not in lst:
            lst.append(v)

    if space.include_parent:
        for b in parent_blocks:
            if linear_attn_ok or not b.attention.replace_with_linear:
                add(attn, b.attention)
            if linear_ffn_ok or not b.ffn.replace_with_linear:
                add(ffn, b.ffn)
    for g in space.attention.n_heads_in_group:
        add(attn, AttentionVariant.gqa(g))
    if space.attention.replace_with_linear and linear_attn_ok:
        add(attn, AttentionVariant.linear())
    if space.attention.no_op:
        add(attn, AttentionVariant.noop())

    taken = {v.intermediate_size for v in ffn if v.kind == "swiglu"}
    for m in space.ffn.ffn_mult:
        if on_grid:
            # The engine's size, named by size (ffn_i<size>): every later step parses the name back
            # to this module, and config.json's ffn_mult for it rebuilds the same size in the engine.
            v = FFNVariant.exact(serving.ffn_grid_size(m, h))
        else:
            v = FFNVariant.from_mult(m, h)
        if v.intermediate_size in taken:
            continue
        taken.add(v.intermediate_size)
        ffn.append(v)
    if space.ffn.replace_with_linear and linear_ffn_ok:
        add(ffn, FFNVariant.linear())
    if space.ffn.no_op:
        add(ffn, FFNVariant.noop())
    return attn, ffn

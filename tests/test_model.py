"""Tests of puzzle.model: parent conversion against transformers, every search-space variant (forward,
cached generation, save/load), the nemotron-nas golden format, variant initialization and exact counts.

All models are small random Llamas built here from transformers' LlamaConfig (no download).
"""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from puzzle.config import ConfigError, SearchSpaceConfig
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    BlockConfigError,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    ModelLoadError,
    StaticKVCache,
    attention_counts,
    build_attention,
    build_ffn,
    expand_search_space,
    ffn_counts,
    ffn_variant_from_name,
    init_attention,
    init_ffn,
    load_parent,
    load_pretrained,
    model_counts,
    non_block_counts,
    normalized_mse,
    save_pretrained,
    variant_from_name,
)
from puzzle.model.io import CONFIG_MODULE_SOURCE
from puzzle.model.variants import block_config_from_json
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)
GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]


def _llama(tmp: Path, seed: int = 0, **over) -> tuple[LlamaForCausalLM, Path]:
    torch.manual_seed(seed)
    kw = {"hidden_size": 64, "num_attention_heads": 8, "num_key_value_heads": 4, "num_hidden_layers": 3,
              "vocab_size": 300, "intermediate_size": 160, "max_position_embeddings": 256, "rms_norm_eps": 1e-6}
    kw.update(over)
    m = LlamaForCausalLM(LlamaConfig(**kw)).eval()
    with torch.no_grad():
        # Llama initialises norms to ones; perturb them so a lost or misplaced norm weight shows up.
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    d = tmp / f"llama{seed}"
    m.save_pretrained(d)
    return m, d


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("parent")
    hf, d = _llama(tmp)
    return hf, d, load_parent(d)


def _uncached_greedy(model: DeciLMForCausalLM, ids: torch.Tensor, n: int) -> torch.Tensor:
    seq = ids
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    return seq


def _ids(b=2, t=12, seed=1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 300, (b, t), generator=g)


# ----- parent conversion ------------------------------------------------------------------------------


def test_converted_parent_logits_equal_transformers(parent):
    hf, _, p = parent
    x = _ids(3, 24)
    mask = torch.ones_like(x)
    mask[0, :7] = 0  # left padding
    with torch.no_grad():
        assert (hf(x).logits - p(x)).abs().max() < 1e-5
        a, b = hf(x, attention_mask=mask).logits, p(x, attention_mask=mask)
    assert (a[1:] - b[1:]).abs().max() < 1e-5
    assert (a[0, 7:] - b[0, 7:]).abs().max() < 1e-5  # padding positions' outputs are meaningless
    assert [b.name for b in p.block_configs] == ["attn_g2+ffn_i160"] * 3


@pytest.mark.parametrize("over", [
    {"tie_word_embeddings": True},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
])
def test_converted_parent_variants_equal_transformers(tmp_path, over):
    hf, d = _llama(tmp_path, seed=3, **over)
    p = load_parent(d)
    x = _ids(2, 80)
    with torch.no_grad():
        assert (hf(x).logits - p(x)).abs().max() < 1e-5


def test_beam_search_equals_transformers(parent):
    hf, _, p = parent
    x = _ids(2, 10, seed=5)
    ours = p.generate(x, 6, num_beams=3, num_return_sequences=3)
    theirs = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, num_beams=3,
                         num_return_sequences=3, early_stopping=False, pad_token_id=0)
    assert torch.equal(ours, theirs)
    greedy = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(p.generate(x, 6), greedy)


def test_load_parent_rejects_bad_directories(tmp_path, parent):
    _, d, _ = parent
    # pickle-only weights
    pk = tmp_path / "pickle"
    pk.mkdir()
    (pk / "config.json").write_text((d / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, pk / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"pickle weights \['pytorch_model.bin'\]"):
        load_parent(pk)
    # a missing weight
    miss = tmp_path / "missing"
    miss.mkdir()
    (miss / "config.json").write_text((d / "config.json").read_text())
    sd = load_file(str(d / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, str(miss / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"missing 1: \['model.layers.1.mlp.up_proj.weight'\]"):
        load_parent(miss)
    # Qwen2-style attention biases
    bias = tmp_path / "bias"
    bias.mkdir()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "qwen2"
    (bias / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(d / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(sd, str(bias / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="q_proj.bias"):
        load_parent(bias)
    # an unsupported architecture
    cfg["model_type"] = "gpt2"
    (bias / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="model_type 'gpt2' is not allowed"):
        load_parent(bias)


# ----- variants: forward, cached generation, save/load ------------------------------------------------


def _check_child(child: DeciLMForCausalLM, tmp: Path, name: str) -> None:
    x = _ids(2, 9, seed=7)
    cached = child.generate(x, 5)
    assert torch.equal(cached, _uncached_greedy(child, x, 5)), name
    out = save_pretrained(child, tmp / name)
    back = load_pretrained(out)
    assert back.block_configs == child.block_configs
    with torch.no_grad():
        assert torch.equal(back(x), child(x)), name
    assert torch.equal(back.generate(x, 5), cached)


def test_every_default_variant_builds_runs_generates_and_round_trips(parent, tmp_path):
    _, _, p = parent
    attn, ffn = expand_search_space(SearchSpaceConfig(), p.config)
    assert [v.name for v in attn] == ["attn_g2", "attn_g1", "attn_g4", "attn_g8", "attn_linear", "attn_noop"]
    assert [v.name for v in ffn] == ["ffn_i160", "ffn_m0.5", "ffn_m1.0", "ffn_m1.5", "ffn_m2.0", "ffn_linear", "ffn_noop"]
    for v in attn:
        child = copy.deepcopy(p)
        child.set_attention(1, v, build_attention(v, child.config))
        assert child.block_configs[1].attention == v
        _check_child(child, tmp_path, v.name)
    for v in ffn:
        child = copy.deepcopy(p)
        child.set_ffn(1, v, build_ffn(v, child.config))
        assert child.block_configs[1].ffn == v
        _check_child(child, tmp_path, v.name)


def test_random_mixed_child_with_padding_beams_and_sharding(parent, tmp_path):
    _, _, p = parent
    attn, ffn = expand_search_space(SearchSpaceConfig(), p.config)
    rng = random.Random(4)
    child = copy.deepcopy(p)
    for i in range(3):
        a, f = rng.choice(attn[1:]), rng.choice(ffn[1:])
        child.set_attention(i, a, build_attention(a, child.config))
        child.set_ffn(i, f, build_ffn(f, child.config))
    _check_child(child, tmp_path, "mixed")
    # left-padded batch == each row alone, greedy and beam
    rows = [_ids(1, 6, seed=8)[0], _ids(1, 11, seed=9)[0]]
    ids = torch.zeros(2, 11, dtype=torch.long)
    mask = torch.zeros(2, 11, dtype=torch.long)
    for r, t in enumerate(rows):
        ids[r, 11 - len(t):], mask[r, 11 - len(t):] = t, 1
    for beams in (1, 3):
        batched = child.generate(ids, 4, num_beams=beams, attention_mask=mask)
        for r, t in enumerate(rows):
            alone = child.generate(t[None], 4, num_beams=beams)
            assert torch.equal(batched[r, 11:], alone[0, len(t):]), (beams, r)
    # sharded save reloads with identical outputs
    out = save_pretrained(child, tmp_path / "sharded", max_shard_bytes=30_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert set(index["weight_map"]) == set(child.state_dict())
    back = load_pretrained(out)
    x = _ids(2, 7, seed=10)
    with torch.no_grad():
        assert torch.equal(back(x), child(x))


def test_static_cache_holds_only_gqa_layers(parent):
    _, _, p = parent
    child = copy.deepcopy(p)
    child.set_attention(0, AttentionVariant.noop(), None)
    child.set_attention(2, AttentionVariant.linear(), build_attention(AttentionVariant.linear(), child.config))
    cache = StaticKVCache(child, batch_size=3, max_len=17)
    assert list(cache.layers) == [1]
    assert cache.layers[1][0].shape == (3, 4, 17, 8)
    assert cache.nbytes() == model_counts(child.config).kv_cache_bytes(3, 17, "float32")
    # fixed shapes: a decode step writes slot `cache_position` in place, no reallocation
    ptr = cache.layers[1][0].data_ptr()
    x = _ids(3, 5)
    child(x, cache=cache)
    child(x[:, :1], cache=cache, cache_position=torch.tensor([5]), position_ids=torch.full((3, 1), 5))
    assert cache.layers[1][0].data_ptr() == ptr and cache.key_valid[:, :6].all() and not cache.key_valid[:, 6:].any()


# ----- format -------------------------------------------------------------------------------------------


def _golden_child() -> DeciLMForCausalLM:
    blocks = [
        BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(160)),
        BlockConfig(AttentionVariant.linear(), FFNVariant.from_mult(1.0, 64)),
        BlockConfig(AttentionVariant.noop(), FFNVariant.linear()),
        BlockConfig(AttentionVariant.gqa(8), FFNVariant.noop()),
    ]
    cfg = ModelConfig(vocab_size=300, hidden_size=64, num_attention_heads=8, block_configs=blocks,
                      rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return DeciLMForCausalLM(cfg)


def test_saved_config_and_weight_names_match_golden(tmp_path):
    out = save_pretrained(_golden_child(), tmp_path / "golden", max_shard_bytes=10**9)
    assert json.loads((out / "config.json").read_text()) == json.loads((GOLDEN / "nemotron_nas_config.json").read_text())
    want = [ln for ln in (GOLDEN / "nemotron_nas_weights.txt").read_text().splitlines() if ln and ln[0] != "#"]
    sd = load_file(str(out / "model.safetensors"))
    got = sorted(f"{k} {' '.join(map(str, v.shape))}" for k, v in sd.items())
    assert got == want
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    # the configuration module auto_map names, our own file (tests/test_serving.py loads it with transformers)
    assert (out / "configuration_decilm.py").read_bytes() == CONFIG_MODULE_SOURCE.read_bytes()
    # the golden config itself loads, with the same variants
    cfg = ModelConfig.from_json_file(GOLDEN / "nemotron_nas_config.json")
    assert [b.name for b in cfg.block_configs] == [
        "attn_g2+ffn_i160", "attn_linear+ffn_m1.0", "attn_noop+ffn_linear", "attn_g8+ffn_noop"]


@pytest.mark.parametrize("edit, match", [
    (lambda b: b[2]["attention"].update(n_heads_in_group=3, no_op=False),
     r"block_configs\[2\]\.attention\.n_heads_in_group: value 3 is not allowed; allowed: divisors .*\[1, 2, 4, 8\]"),
    (lambda b: b[1]["ffn"].pop("no_op"), r"block_configs\[1\]\.ffn\.no_op: required field is missing"),
    (lambda b: b[0]["ffn"].update(intermediate_size=-4), r"block_configs\[0\]\.ffn\.intermediate_size: value -4"),
    (lambda b: b[3]["attention"].update(no_op=True, replace_with_linear=True),
     r"block_configs\[3\]\.attention: no_op and replace_with_linear are both true"),
])
def test_malformed_block_configs_name_layer_and_field(edit, match):
    d = json.loads((GOLDEN / "nemotron_nas_config.json").read_text())
    edit(d["block_configs"])
    with pytest.raises(BlockConfigError, match=match):
        ModelConfig.from_dict(d)


def test_serving_vllm_refuses_linear_blocks(tmp_path):
    with pytest.raises(ValueError, match=r"block_configs\[1\]\.attention\.replace_with_linear: value true breaks "
                                         r"vllm's rule .*block_configs\[2\]\.ffn\.replace_with_linear"):
        save_pretrained(_golden_child(), tmp_path / "v", serving="vllm")
    assert not (tmp_path / "v").exists()  # refused before anything is written


def test_variant_names_round_trip():
    for name in ("attn_g4", "attn_linear", "attn_noop", "ffn_m0.5", "ffn_m5.25", "ffn_i160", "ffn_linear", "ffn_noop"):
        assert variant_from_name(name, 64).name == name
    assert ffn_variant_from_name("ffn_i173", 64).intermediate_size == 173
    # Llama-70B's FFN expressed as ffn_mult (Nemotron-51B): vLLM's rounding is exact there.
    assert FFNVariant.from_mult(5.25, 8192).intermediate_size == 28672
    assert "intermediate_size" not in FFNVariant.from_mult(5.25, 8192).to_json(8192)
    with pytest.raises(ValueError, match="ffn_x2"):
        variant_from_name("ffn_x2", 64)


def test_expand_search_space_checks_and_serving(parent, tmp_path):
    _, _, p = parent
    with pytest.raises(ConfigError, match=r"n_heads_in_group: value\(s\) \[3\].*allowed: \[1, 2, 4, 8\]"):
        expand_search_space(SearchSpaceConfig.model_validate({"attention": {"n_heads_in_group": [2, 3]}}), p.config)
    # a nemotron-nas parent that itself has linear blocks: its own linear FFN is excluded for llama.cpp
    # (no linear FFN there), its linear attention kept (llama.cpp has one)
    golden_parent = _golden_child().config
    llamacpp = SearchSpaceConfig.model_validate({"serving": ["llamacpp"], "ffn": {"replace_with_linear": False}})
    attn, ffn = expand_search_space(llamacpp, golden_parent)
    assert AttentionVariant.linear() in attn and not any(v.replace_with_linear for v in ffn)
    attn, ffn = expand_search_space(SearchSpaceConfig(), golden_parent)
    assert AttentionVariant.linear() in attn and FFNVariant.linear() in ffn
    # its head size (64 / 8 = 8) is none vLLM runs
    vllm = SearchSpaceConfig.model_validate({"serving": "vllm", "attention": {"replace_with_linear": False},
                                            "ffn": {"replace_with_linear": False}})
    with pytest.raises(ConfigError, match=r"parent\.uri: value head_dim 8 breaks vllm's rule"):
        expand_search_space(vllm, golden_parent)


# ----- initialization ----------------------------------------------------------------------------------


def _sublayer_io(p: DeciLMForCausalLM, layer: int, x: torch.Tensor):
    with torch.no_grad():
        _, hidden = p(x, output_hidden_states=True)
        h_attn = hidden[layer]  # (B, T, C) input of the attention sub-block
        h_ffn = p.attn_sublayer(layer, h_attn)  # (B, T, C) input of the FFN sub-block
        return h_attn, h_ffn, p.ffn_sublayer(layer, h_ffn)


def test_initialization_beats_random(parent):
    _, _, p = parent
    layer = 1
    calib, held = _ids(8, 32, seed=11), _ids(8, 32, seed=12)
    ca, cf, _ = _sublayer_io(p, layer, calib)
    ha, hf_, _ = _sublayer_io(p, layer, held)
    pl = p.model.layers[layer]
    attn, ffn = expand_search_space(SearchSpaceConfig(), p.config)
    with torch.no_grad():
        t_attn = p.attn_sublayer(layer, ha) - ha  # parent attention output (B, T, C)
        t_ffn = p.ffn_sublayer(layer, hf_) - hf_
        cos, sin, mask = p.attention_inputs(ha)
        for v in attn:
            if v.no_op:
                assert init_attention(v, p, layer, ca) is None
                continue
            torch.manual_seed(0)
            rand = build_attention(v, p.config)
            mod = init_attention(v, p, layer, ca)
            x = pl.input_layernorm(ha)
            e_init = normalized_mse(mod(x, cos, sin, mask), t_attn)
            e_rand = normalized_mse(rand(x, cos, sin, mask), t_attn)
            assert e_init < e_rand, (v.name, e_init, e_rand)
            if v == AttentionVariant.gqa(2) or v == AttentionVariant.gqa(1):
                assert e_init < 1e-10, v.name  # the parent's grouping (or finer) is reproduced exactly
        for v in ffn + [FFNVariant.exact(256)]:
            if v.no_op:
                assert init_ffn(v, p, layer, cf) is None
                continue
            torch.manual_seed(0)
            rand = build_ffn(v, p.config)
            mod = init_ffn(v, p, layer, cf)
            x = pl.post_attention_layernorm(hf_)
            e_init, e_rand = normalized_mse(mod(x), t_ffn), normalized_mse(rand(x), t_ffn)
            assert e_init < e_rand, (v.name, e_init, e_rand)
            if v.intermediate_size is not None and v.intermediate_size >= 160:
                assert e_init < 1e-10, v.name  # all parent channels kept: exact
            elif v.kind == "swiglu":
                assert e_init < 1.0, v.name


def test_ffn_pruning_keeps_highest_contribution_channels(parent):
    _, _, p = parent
    # make channel 7 dominant: it must survive pruning to 24 channels
    child = copy.deepcopy(p)
    with torch.no_grad():
        child.model.layers[0].mlp.down_proj.weight[:, 7] *= 50
    calib = _ids(4, 16, seed=13)
    _, cf, _ = _sublayer_io(child, 0, calib)
    mod = init_ffn(FFNVariant.from_mult(0.5, 64), child, 0, cf)
    assert mod.down_proj.weight.shape == (64, 24)
    col = child.model.layers[0].mlp.down_proj.weight[:, 7]
    assert any(torch.equal(mod.down_proj.weight[:, j], col) for j in range(24))


# ----- counts --------------------------------------------------------------------------------------------


def test_counts_parent_by_hand(parent):
    _, _, p = parent
    cfg = p.config
    # attention g2: q 64*64 + k 64*32 + v 64*32 + o 64*64 = 12288 matmul weights, + 64 norm
    a = attention_counts(AttentionVariant.gqa(2), cfg)
    assert (a.params, a.matmul_params) == (12352, 12288)
    # SwiGLU 160: 3*64*160 = 30720, + 64 norm
    f = ffn_counts(FFNVariant.exact(160), cfg)
    assert (f.params, f.matmul_params) == (30784, 30720)
    # embedding 300*64 + norm 64 + untied lm_head 300*64
    assert non_block_counts(cfg).params == 38464
    mc = model_counts(cfg)
    assert mc.params == 3 * (12352 + 30784) + 38464 == 167872
    assert mc.params == sum(t.numel() for t in p.parameters())
    assert mc.weight_bytes("float32") == 167872 * 4
    # prefill B=2, T=10: per layer attn 2*12288*20 + 2*8*8*2*10*11 = 519680, ffn 2*30720*20 = 1228800;
    # lm_head 2*19200*20 = 768000
    assert mc.prefill_flops(2, 10) == 3 * (519680 + 1228800) + 768000 == 6013440
    # decode B=2 at context 10: attn 2*12288*2 + 4*8*8*2*11 = 54784, ffn 2*30720*2 = 122880, head 76800
    assert mc.decode_flops(2, 10) == 3 * (54784 + 122880) + 76800 == 609792
    # KV cache B=2, L=10, bf16: 2 (k,v) * 2 * 10 * 4 heads * 8 dims * 2 bytes = 2560 per layer
    assert mc.kv_cache_bytes(2, 10, "bfloat16") == 3 * 2560 == 7680


def test_counts_mixed_tied_child_by_hand():
    child = _golden_child()
    cfg = child.config.with_blocks(child.config.block_configs)
    cfg.tie_word_embeddings = True
    tied = DeciLMForCausalLM(cfg)
    mc = model_counts(cfg)
    # layer0 g2 12352 + ffn160 30784; layer1 linear 64*64+64=4160 + ffn48 3*64*48+64=9280;
    # layer2 noop 0 + linear 4160; layer3 g8 (1 kv head) 4096+512+512+4096+64=9280 + noop 0;
    # tied non-block 300*64 + 64 = 19264
    assert mc.params == 12352 + 30784 + 4160 + 9280 + 4160 + 9280 + 19264 == 89280
    assert mc.params == sum(t.numel() for t in tied.parameters())  # parameters() counts the tied table once
    # KV cache B=1, L=100, fp32: layer0 2*100*4*8*4 = 25600, layer3 2*100*1*8*4 = 6400
    assert mc.kv_cache_bytes(1, 100, "float32") == 32000
    # decode B=1 at context 99 (100 keys): layer0 2*12288 + 4*8*8*100 = 50176, ffn 61440; layer1 8192 + 18432;
    # layer2 8192; layer3 2*9216 + 25600 = 44032; lm_head 2*19200 = 38400
    assert mc.decode_flops(1, 99) == 50176 + 61440 + 8192 + 18432 + 8192 + 44032 + 38400 == 228864


# ----- the project's tiny parent -----------------------------------------------------------------------


@pytest.mark.skipif(not (REPO / "examples/tiny/parent/config.json").is_file(),
                    reason="examples/tiny/parent not trained yet (`puzzle parent train-tiny`)")
def test_tiny_parent_converts_losslessly():
    d = REPO / "examples/tiny/parent"
    hf = LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    p = load_parent(d)
    x = _ids(2, 32, seed=14) % hf.config.vocab_size
    with torch.no_grad():
        assert (hf(x).logits - p(x)).abs().max() < 1e-5
    assert model_counts(p.config).params == sum(t.numel() for t in hf.parameters())
    assert torch.equal(p.generate(x, 8), hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                                                     do_sample=False, eos_token_id=None, pad_token_id=0))


def test_sublayer_state_dict_moves_a_block_between_models(parent):
    _, _, p = parent
    donor = copy.deepcopy(p)
    v = FFNVariant.from_mult(1.0, 64)
    donor.set_ffn(2, v, build_ffn(v, donor.config))
    sd = donor.model.layers[2].sublayer_state_dict("ffn")
    assert sorted(sd) == ["mlp.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                          "post_attention_layernorm.weight"]
    child = copy.deepcopy(p)
    child.load_sublayer(2, v, sd)
    x = _ids(2, 8)
    with torch.no_grad():
        assert torch.equal(child(x), donor(x))
    child.load_sublayer(0, AttentionVariant.noop(), {})
    assert "model.layers.0.input_layernorm.weight" not in child.state_dict()
    with pytest.raises(ValueError, match="layer 1 variant attn_g4 needs tensors"):
        child.load_sublayer(1, AttentionVariant.gqa(4), p.model.layers[1].sublayer_state_dict("attention"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_step_captures_in_a_cuda_graph(parent):
    """Profiling captures decode steps in CUDA graphs: replaying one must equal eager decoding."""
    _, _, p = parent
    m = copy.deepcopy(p).cuda()
    m.set_attention(2, AttentionVariant.linear(), build_attention(AttentionVariant.linear(), m.config).cuda())
    B, T, L = 2, 6, 12
    x = _ids(B, T).cuda()
    eager_cache, graph_cache = StaticKVCache(m, B, L), StaticKVCache(m, B, L)
    with torch.no_grad():
        m(x, cache=eager_cache)
        m(x, cache=graph_cache)
        tok = torch.zeros(B, 1, dtype=torch.long, device="cuda")
        # Warm-up and capture write slot T, which the first replay overwrites with the real token.
        pos = torch.full((1,), T, dtype=torch.long, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up outside the graph, as capture requires
                m(tok, cache=graph_cache, cache_position=pos, position_ids=pos.expand(B, 1))
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = m(tok, cache=graph_cache, cache_position=pos, position_ids=pos.expand(B, 1))
        nxt = torch.tensor([[5], [7]], device="cuda")
        for step in range(T, L):
            tok.copy_(nxt)
            pos.fill_(step)
            g.replay()
            ref = m(nxt, cache=eager_cache)
            assert (out - ref).abs().max() < 1e-4
            nxt = ref[:, -1].argmax(-1, keepdim=True)


def test_mistral_parent_converts(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(6)
    hf = MistralForCausalLM(MistralConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2,
                                          num_hidden_layers=2, vocab_size=300, intermediate_size=96,
                                          sliding_window=None, max_position_embeddings=256)).eval()
    hf.save_pretrained(tmp_path / "mistral")
    p = load_parent(tmp_path / "mistral")
    assert p.block_configs[0].name == "attn_g4+ffn_i96"
    x = _ids(2, 20)
    with torch.no_grad():
        assert (hf(x).logits - p(x)).abs().max() < 1e-5
    cfg = json.loads((tmp_path / "mistral/config.json").read_text())
    cfg["sliding_window"] = 16
    (tmp_path / "mistral/config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="sliding_window 16 is not supported"):
        load_parent(tmp_path / "mistral")


def test_rope_frequencies_stay_fp32_in_bf16(parent):
    _, d, p = parent
    pb = load_parent(d, dtype="bfloat16")
    assert pb.model.inv_freq.dtype == torch.float32
    assert torch.equal(pb.model.inv_freq, p.model.inv_freq)
    assert pb.lm_head.weight.dtype == torch.bfloat16


@given(mult=st.floats(0.05, 12.0), hidden=st.sampled_from([64, 96, 128, 192, 4096, 8192]),
       exact=st.integers(1, 30000), use_exact=st.booleans())
def test_ffn_sizes_survive_config_json(mult, hidden, exact, use_exact):
    v = FFNVariant.exact(exact) if use_exact else FFNVariant.from_mult(mult, hidden)
    block = BlockConfig(AttentionVariant.gqa(2), v)
    back = block_config_from_json(json.loads(json.dumps(block.to_json(hidden))), 0, hidden, 8)
    assert back.ffn.intermediate_size == v.intermediate_size
    assert back == block
    assert ffn_variant_from_name(v.name, hidden).intermediate_size == v.intermediate_size


def test_save_copies_tokenizer_files(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    tdir = tmp_path / "tok"
    tdir.mkdir()
    tok = Tokenizer(WordLevel({"a": 0, "b": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    tok.save(str(tdir / "tokenizer.json"))
    (tdir / "tokenizer_config.json").write_text('{"model_max_length": 256}')
    out = save_pretrained(_golden_child(), tmp_path / "with_tok", tokenizer_dir=tdir)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (out / f).read_bytes() == (tdir / f).read_bytes()
    assert Tokenizer.from_file(str(out / "tokenizer.json")).encode("a b").ids == [0, 1]
    with pytest.raises(ModelLoadError, match="holds none of"):
        save_pretrained(_golden_child(), tmp_path / "no_tok", tokenizer_dir=tmp_path / "no_tok")

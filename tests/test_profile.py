"""The profile step and its pieces: every variant of a tiny search space profiled on this CPU, exact
memory, the roofline estimate when the target device is absent, the decode fit, bad units.

Everything runs for real on the CPU (tiny shapes); nothing is mocked. GPU-only behaviour (CUDA graphs,
events) is checked by ``test_gpu_profile_and_engine_graphs``, skipped without CUDA.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from puzzle.config import ProfileConfig, Scenario, parse_config
from puzzle.context import run_step
from puzzle.errors import UnitError
from puzzle.model import AttentionVariant, FFNVariant, expand_search_space
from puzzle.model.io import parent_model_config
from puzzle.profiling.engine import attended_length, decode_contexts
from puzzle.profiling.profiler import (
    decode_points,
    fit_decode,
    generation_decode_s,
    profile_unit,
)
from puzzle.profiling.roofline import estimate_costs
from puzzle.run import create_run
from puzzle.store import open_store

torch.set_num_threads(1)

HIDDEN, HEADS, KV, INTER, VOCAB, LAYERS = 64, 8, 4, 176, 96, 3


def llama_config() -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": HIDDEN,
            "num_attention_heads": HEADS, "num_key_value_heads": KV, "intermediate_size": INTER,
            "num_hidden_layers": LAYERS, "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "hidden_act": "silu",
            "max_position_embeddings": 256, "tie_word_embeddings": False, "rope_theta": 10000.0}


@pytest.fixture()
def run(tmp_path: Path):
    parent = tmp_path / "parent"
    parent.mkdir()
    # The profile step reads only config.json: variants are timed with random weights of the right shape.
    (parent / "config.json").write_text(json.dumps(llama_config()))
    cfg = parse_config({
        "name": "prof",
        "parent": {"uri": str(parent)},
        "data": {"distillation_uri": "unused.txt", "validation_uri": "unused.txt"},
        "search_space": {"attention": {"n_heads_in_group": [2, 4, 8]}, "ffn": {"ffn_mult": [0.5, 1.0]}},
        "profile": {"scenarios": [
            {"name": "cpu-b2", "batch_size": 2, "input_len": 16, "output_len": 9, "device": "cpu"},
            {"name": "gpu-b4", "batch_size": 4, "input_len": 32, "output_len": 8, "dtype": "bfloat16",
             "device": "cuda:7"},
        ], "warmup": 1, "repeats": 2, "decode_points": 3},
        "store": {"uri": f"file://{tmp_path / 'runs'}"},
    })
    return create_run(cfg, run_id="prof-test"), cfg


def units(cfg) -> list[dict]:
    """The profile units exactly as prepare plans them (every variant incl. the parent's, one non_block)."""
    parent = parent_model_config(llama_config(), "config.json")
    attn, ffn = expand_search_space(cfg.search_space, parent)
    out = []
    for sc in cfg.profile.scenarios:
        for kind, variants in (("attention", attn), ("ffn", ffn)):
            out += [{"id": f"{sc.name}.{v.name}", "scenario": sc.name, "kind": kind, "variant": v.name} for v in variants]
        out.append({"id": f"{sc.name}.non_block", "scenario": sc.name, "kind": "non_block", "variant": "non_block"})
    return out


def test_every_variant_profiled_on_cpu_writes_well_formed_json(run):
    run_uri, cfg = run
    us = units(cfg)
    for u in us:
        assert run_step("profile", run_uri, u)
    store = open_store(run_uri)
    for u in us:
        rec = store.get_json(f"profile/{u['scenario']}/{u['variant']}.json")
        sc = next(s for s in cfg.profile.scenarios if s.name == u["scenario"])
        assert (rec["kind"], rec["variant"], rec["scenario"]["name"]) == (u["kind"], u["variant"], sc.name)
        assert rec["torch_version"] == torch.__version__
        assert rec["memory_bytes"] == rec["weight_bytes"] + rec["kv_bytes"]
        assert rec["decode_steps"] == sc.output_len - 1
        noop = u["variant"].endswith("_noop")
        if noop:
            assert rec["prefill_s"] == rec["decode_s"] == rec["weight_bytes"] == 0
            continue
        assert rec["prefill_s"] > 0 and rec["decode_s"] > 0
        assert math.isclose(rec["decode_step_s"] * sc.output_len, rec["decode_s"], rel_tol=1e-12)
        if sc.device == "cpu":
            assert rec["estimate"] is False and rec["device"].startswith("cpu")
            assert rec["method"]["kind"] == "wall_clock" and rec["method"]["repeats"] == 2
            assert len(rec["decode_points"]) == 3
            for p in rec["decode_points"]:
                s = p["spread"]
                assert s["min_s"] <= p["step_s"] <= s["max_s"] and s["repeats"] == 2
            assert rec["prefill"]["min_s"] <= rec["prefill_s"] <= rec["prefill"]["max_s"]
        else:  # cuda:7 is absent here (and on any one-GPU machine): the roofline, labelled
            assert rec["estimate"] is True and "estimate" in rec["device"]
    # Metrics the framework wrote for the units
    prom = "".join(store.get_text(k) for k in store.list("metrics") if k.endswith(".prom"))
    assert "puzzle_profile_prefill_seconds" in prom and "puzzle_profile_decode_seconds" in prom
    # A retried unit is skipped (done marker), not re-measured.
    assert not run_step("profile", run_uri, us[0])


def test_memory_matches_hand_computed_bytes():
    cfg = parent_model_config(llama_config(), "config.json")
    sc = Scenario(name="m", batch_size=3, input_len=10, output_len=6, dtype="bfloat16", device="cuda:7")
    settings = ProfileConfig(scenarios=[sc])
    d = HIDDEN // HEADS
    g2 = profile_unit(cfg, "attention", "attn_g2", sc, settings)
    # q, o: C x H*d; k, v: C x (H/2)*d; plus the input norm; 2 bytes each
    assert g2["params"] == 2 * HIDDEN * HEADS * d + 2 * HIDDEN * (HEADS // 2) * d + HIDDEN
    assert g2["weight_bytes"] == 2 * g2["params"]
    # keys and values of 4 KV heads for 3 x 16 tokens, 2 bytes each
    assert g2["kv_bytes"] == 2 * 3 * 16 * (HEADS // 2) * d * 2
    ffn = profile_unit(cfg, "ffn", f"ffn_i{INTER}", sc, settings)
    assert ffn["weight_bytes"] == 2 * (3 * HIDDEN * INTER + HIDDEN) and ffn["kv_bytes"] == 0
    lin = profile_unit(cfg, "attention", "attn_linear", sc, settings)
    assert lin["weight_bytes"] == 2 * (HIDDEN * HIDDEN + HIDDEN) and lin["kv_bytes"] == 0
    nb = profile_unit(cfg, "non_block", "non_block", sc, settings)
    assert nb["weight_bytes"] == 2 * (2 * VOCAB * HIDDEN + HIDDEN)  # embedding, untied head, final norm


def test_roofline_estimate_by_hand():
    cfg = parent_model_config(llama_config(), "config.json")
    B, T, O = 4, 32, 8
    peak, bw = 100.0, 50.0  # TFLOP/s, GB/s: small so both bounds occur
    est = estimate_costs("ffn", FFNVariant.exact(INTER), cfg, B, T, O, "float32", "cuda", peak, bw)
    mm = 3 * HIDDEN * INTER
    pre_flops, pre_bytes = 2 * mm * B * T, (mm + HIDDEN) * 4 + 2 * B * T * HIDDEN * 4
    assert est["prefill_s"] == pytest.approx(max(pre_flops / 100e12, pre_bytes / 50e9))
    step = max(2 * mm * B / 100e12, ((mm + HIDDEN) * 4 + 2 * B * HIDDEN * 4) / 50e9)
    assert est["decode_s"] == pytest.approx(step * (O - 1))
    # attention: each step reads the keys/values of the attended slots (rounded to the GPU bucket of 64)
    a = estimate_costs("attention", AttentionVariant.gqa(2), cfg, B, T, O, "float32", "cuda", 1e6, bw)
    d, kv = HIDDEN // HEADS, HEADS // 2
    w = (2 * HIDDEN * HEADS * d + 2 * HIDDEN * kv * d + HIDDEN) * 4
    want = sum((w + 2 * B * HIDDEN * 4 + 2 * B * kv * d * 4 * attended_length(c, T + O, 64)) / 50e9
               for c in decode_contexts(T, O))
    assert a["decode_s"] == pytest.approx(want)


def test_decode_points_fit_and_generation_sum():
    assert decode_points(100, 1, 5) == []
    assert decode_points(100, 4, 5) == [100, 101, 102]
    pts = decode_points(1024, 1024, 5)
    assert pts[0] == 1024 and pts[-1] == 2046 and len(pts) == 5
    # exact line through the points, then its sum over every step
    a, b = fit_decode([(64, 1.0 + 64 * 0.5), (128, 1.0 + 128 * 0.5), (192, 1.0 + 192 * 0.5)], linear=True)
    assert (a, b) == pytest.approx((1.0, 0.5))
    assert fit_decode([(64, 2.0), (128, 4.0)], linear=False) == (3.0, 0.0)
    total = generation_decode_s(1.0, 0.5, 100, 30, 130, 64)
    assert total == pytest.approx(sum(1.0 + 0.5 * attended_length(c, 130, 64) for c in range(100, 129)))
    assert attended_length(100, 130, 64) == 128 and attended_length(127, 130, 64) == 128
    assert attended_length(128, 130, 64) == 130  # capped at the cache
    assert attended_length(5, 100, 1) == 6


@pytest.mark.parametrize(
    "unit, match",
    [
        ({"scenario": "nope", "kind": "ffn", "variant": "ffn_noop"}, "scenario 'nope' is not in profile.scenarios"),
        ({"scenario": "cpu-b2", "kind": "mlp", "variant": "ffn_noop"}, "kind: 'mlp' is not allowed"),
        ({"scenario": "cpu-b2", "kind": "attention", "variant": "attn_g3"}, "does not divide"),
        ({"scenario": "cpu-b2", "kind": "attention", "variant": "ffn_noop"}, "is not a attention variant"),
        ({"scenario": "cpu-b2", "kind": "ffn"}, "field 'variant' is missing"),
    ],
)
def test_bad_units_are_unit_errors(run, unit, match):
    run_uri, _ = run
    with pytest.raises(UnitError, match=match):
        run_step("profile", run_uri, {"id": "bad", **unit})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graphs and events)")
def test_gpu_profile_and_engine_graphs():
    cfg = parent_model_config(llama_config(), "config.json")
    sc = Scenario(name="g", batch_size=2, input_len=64, output_len=70, dtype="bfloat16", device="cuda")
    rec = profile_unit(cfg, "attention", "attn_g2", sc, ProfileConfig(scenarios=[sc], warmup=1, repeats=3))
    assert rec["estimate"] is False and rec["method"]["cuda_graphs"] and rec["method"]["kind"] == "cuda_events"
    assert rec["prefill_s"] > 0 and rec["decode_s"] > 0

"""The profile step and its pieces: every variant of a tiny search space profiled on this CPU, exact
memory, the roofline estimate when the target device is absent, the decode fit, bad units; timings
that disagree are taken again and a profile that never became stable is refused by solve (issue 16).

Everything runs for real on the CPU (tiny shapes); nothing is mocked: the "paused worker" is a real
sleep inside the timed callable. GPU-only behaviour (CUDA graphs,
events) is checked by ``test_gpu_profile_and_engine_graphs``, skipped without CUDA.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from pathlib import Path

import pytest
import torch
from puzzle.config import ProfileConfig, Scenario, parse_config
from puzzle.context import run_step
from puzzle.errors import UnitError
from puzzle.model import AttentionVariant, BlockConfig, FFNVariant
from puzzle.model.io import parent_model_config
from puzzle.profiling.engine import attended_length, decode_contexts
from puzzle.profiling.profiler import (
    decode_points,
    fit_decode,
    generation_decode_s,
    profile_unit,
)
from puzzle.profiling.roofline import estimate_costs
from puzzle.profiling.throughput import ScenarioProfile, UnstableProfileError, load_scenario_profile, predict
from puzzle.profiling.timing import time_callable
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
        ], "warmup": 1, "repeats": 2, "decode_points": 3, "rebuilds": 2},
        "store": {"uri": f"file://{tmp_path / 'runs'}"},
    })
    return create_run(cfg, run_id="prof-test"), cfg


def units(cfg) -> list[dict]:
    """The profile units exactly as prepare plans them: the CPU scenario as one unit of every variant
    (incl. the parent's and non_block), the GPU scenario as one unit per variant."""
    from puzzle.steps.prepare import plan_units

    return plan_units(cfg, parent_model_config(llama_config(), "config.json"))["profile"]


def pairs(us: list[dict]) -> list[tuple[str, str, str]]:
    """(scenario, kind, variant) of every record the units write."""
    out = []
    for u in us:
        vs = u["variants"] if u["kind"] == "scenario" else [u]
        out += [(u["scenario"], v["kind"], v["variant"]) for v in vs]
    return out


def test_every_variant_profiled_on_cpu_writes_well_formed_json(run):
    run_uri, cfg = run
    us = units(cfg)
    cpu_units = [u for u in us if u["scenario"] == "cpu-b2"]
    assert len(cpu_units) == 1 and cpu_units[0]["kind"] == "scenario" and cpu_units[0]["id"] == "cpu-b2"
    assert all(u["kind"] != "scenario" and u["id"] == f"gpu-b4.{u['variant']}" for u in us if u["scenario"] == "gpu-b4")
    assert sorted(p[1:] for p in pairs(us) if p[0] == "cpu-b2") == sorted(p[1:] for p in pairs(us) if p[0] == "gpu-b4")
    for u in us:
        assert run_step("profile", run_uri, u)
    store = open_store(run_uri)
    sessions = set()
    for scenario, kind, variant in pairs(us):
        rec = store.get_json(f"profile/{scenario}/{variant}.json")
        sc = next(s for s in cfg.profile.scenarios if s.name == scenario)
        assert (rec["kind"], rec["variant"], rec["scenario"]["name"]) == (kind, variant, sc.name)
        assert rec["torch_version"] == torch.__version__
        assert rec["memory_bytes"] == rec["weight_bytes"] + rec["kv_bytes"]
        assert rec["decode_steps"] == sc.output_len - 1
        noop = variant.endswith("_noop")
        if noop:
            assert rec["prefill_s"] == rec["decode_s"] == rec["weight_bytes"] == 0
            assert rec["stability"] == {"measured": False, "stable": True}
            continue
        assert rec["prefill_s"] > 0 and rec["decode_s"] > 0
        assert math.isclose(rec["decode_step_s"] * sc.output_len, rec["decode_s"], rel_tol=1e-12)
        if sc.device == "cpu":
            assert rec["estimate"] is False and rec["device"].startswith("cpu")
            # timed as a whole model: the variant in every layer, in turns with the others, over the rounds
            m = rec["method"]
            assert m["kind"] == "whole_model" and m["clock"] == "thread_cpu" and m["layers"] == LAYERS
            assert m["rounds"] == cfg.profile.rebuilds and m["generations"] == 2
            sessions.add(m["interleaved"]["session"])
            w = rec["whole_model"]
            assert len(w["decode_s"]) == len(w["no_op_decode_s"]) == cfg.profile.rebuilds
            model = [statistics.median(w[f]) for f in ("prefill_s", "decode_s")]
            no_op = [statistics.median(w[f]) for f in ("no_op_prefill_s", "no_op_decode_s")]
            if kind == "non_block":
                assert [rec["prefill_s"], rec["decode_s"]] == model == no_op
            else:  # (its model less the no-op model) / layers, or 0 where noise put it below
                assert rec["prefill_s"] == max(0.0, (model[0] - no_op[0]) / LAYERS)
                assert rec["decode_s"] == max(0.0, (model[1] - no_op[1]) / LAYERS)
            st = rec["stability"]
            assert st["measured"] and st["max_rel_spread"] == 0.75 and st["stable"] == (st["rel_spread"] <= 0.75)
            assert st["worst"].startswith("whole-model generations, round ")
        else:  # cuda:7 is absent here (and on any one-GPU machine): the roofline, labelled
            assert rec["estimate"] is True and "estimate" in rec["device"]
            assert rec["stability"] == {"measured": False, "stable": True}
            assert "whole_model" not in rec
    assert len(sessions) == 1
    # a model of one variant throughout is predicted as it was timed (the no-op FFN costs nothing)
    prof = load_scenario_profile(store, "cpu-b2")
    for name in ("attn_g2", "attn_g4"):
        rec = store.get_json(f"profile/cpu-b2/{name}.json")
        blocks = [BlockConfig(AttentionVariant.gqa(int(name[6:])), FFNVariant.noop())] * LAYERS
        if rec["decode_s"] > 0:
            assert math.isclose(predict(prof, blocks).decode_s, statistics.median(rec["whole_model"]["decode_s"]),
                                rel_tol=1e-9)
    # Metrics the framework wrote for the units
    prom = "".join(store.get_text(k) for k in store.list("metrics") if k.endswith(".prom"))
    assert "puzzle_profile_prefill_seconds" in prom and "puzzle_profile_decode_seconds" in prom
    # A retried unit is skipped (done marker), not re-measured.
    assert not run_step("profile", run_uri, us[0])


def test_whole_model_costs_are_the_models_less_the_no_op_model_per_layer():
    from puzzle.profiling.profiler import variant_model, whole_model_costs

    cfg = parent_model_config(llama_config(), "config.json")  # 3 layers
    g4, f = AttentionVariant.gqa(4), cfg.block_configs[0].ffn
    times = {("non_block", None): (0.5, 1.0), ("attention", g4): (2.0, 7.0), ("ffn", f): (3.5, 0.7)}
    costs = whole_model_costs(times, LAYERS)
    assert costs[("non_block", None)] == (0.5, 1.0)
    assert costs[("attention", g4)] == (0.5, 2.0)  # (2 - 0.5) / 3, (7 - 1) / 3
    # the FFN's decode came out below the no-op model (noise): it costs 0, never a negative time
    assert costs[("ffn", f)] == (1.0, 0.0)
    # the model a variant is timed as: it in every layer, the other kind removed; non_block: no-op layers
    m = variant_model(cfg, "attention", g4)
    assert m.num_hidden_layers == LAYERS and all(b == BlockConfig(g4, FFNVariant.noop()) for b in m.block_configs)
    assert all(b.attention.no_op and b.ffn == f for b in variant_model(cfg, "ffn", f).block_configs)
    assert all(b.attention.no_op and b.ffn.no_op for b in variant_model(cfg, "non_block", None).block_configs)
    assert (m.hidden_size, m.vocab_size) == (cfg.hidden_size, cfg.vocab_size)


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


def test_a_whole_model_round_above_the_bound_is_taken_again(monkeypatch):
    """A CPU scenario's round whose generations spread above profile.max_rel_spread is measured again, up
    to profile.attempts times; the record says how often and whether it ever came within the bound. The
    real measuring function runs; the spy only counts its calls."""
    from puzzle.profiling import profiler

    calls = []
    real = profiler.measure_interleaved
    monkeypatch.setattr(profiler, "measure_interleaved", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = parent_model_config(llama_config(), "config.json")
    sc = Scenario(name="cpu-b2", batch_size=2, input_len=16, output_len=9, device="cpu")
    units = [("attention", "attn_g4"), ("non_block", "non_block")]
    strict = ProfileConfig(scenarios=[sc], warmup=0, repeats=2, rebuilds=2, attempts=3, max_rel_spread=1e-12)
    recs = profiler.profile_scenario(cfg, units, sc, strict)
    assert len(calls) == 2 * 3  # every round taken three times: no two generations agree to 1e-12
    for rec in recs:
        st = rec["stability"]
        assert not st["stable"] and st["attempts"] == 3 and st["remeasured"] == 2 * 2
        assert st["rel_spread"] > 1e-12 and len(rec["whole_model"]["decode_s"]) == 2
    calls.clear()
    loose = strict.model_copy(update={"max_rel_spread": 1e6})
    recs = profiler.profile_scenario(cfg, units, sc, loose)
    assert len(calls) == 2 and all(r["stability"]["stable"] and r["stability"]["remeasured"] == 0 for r in recs)


def test_rebuilds_keep_the_build_of_median_time():
    """profile.rebuilds: the block is built and measured that many times (fresh weights and buffers each),
    the record is the build whose total (prefill + generation decode) is the median of all, and it lists
    every build's total."""
    cfg = parent_model_config(llama_config(), "config.json")
    sc = Scenario(name="cpu", batch_size=2, input_len=8, output_len=8, dtype="float32", device="cpu")
    rec = profile_unit(cfg, "ffn", f"ffn_i{INTER}", sc, ProfileConfig(scenarios=[sc], warmup=1, repeats=3,
                                                                      rebuilds=3))
    totals = rec["rebuilds"]["totals_s"]
    assert rec["rebuilds"]["count"] == 3 and totals == sorted(totals) and len(totals) == 3
    assert rec["prefill_s"] + rec["decode_s"] == pytest.approx(totals[1])
    one = profile_unit(cfg, "ffn", f"ffn_i{INTER}", sc, ProfileConfig(scenarios=[sc], warmup=1, repeats=3))
    assert "rebuilds" not in one


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


def _sleeper(pattern):
    """A callable that sleeps pattern(i) seconds on its i-th call (0-based): a worker paused by the OS."""
    calls = []

    def fn() -> None:
        time.sleep(pattern(len(calls)))
        calls.append(1)

    return fn


BASE, PAUSE = 0.05, 0.5


def test_a_paused_worker_is_measured_again_and_the_undisturbed_median_kept():
    # The worker is paused during 3 of the first attempt's 5 repetitions: that median is the pause.
    def paused():
        return _sleeper(lambda i: PAUSE if i < 3 else BASE)

    old = time_callable(paused(), "cpu", warmup=0, repeats=5, inner=1)  # what the profiler did before
    assert old.median_s >= PAUSE and old.rel_spread > 0.5 and old.stable  # no bound: trusted as it is
    t = time_callable(paused(), "cpu", warmup=0, repeats=5, inner=1, max_rel_spread=0.5, attempts=3, clock="wall")
    assert t.attempt_spreads[0] > 0.5 and len(t.attempt_spreads) >= 2  # rejected, then taken again
    assert BASE <= t.median_s < 2 * BASE  # the undisturbed time, not the pause
    assert t.stable and t.rel_spread == t.attempt_spreads[-1] <= 0.5
    d = t.to_dict()
    assert d["stable"] is True and d["attempt_spreads"] == list(t.attempt_spreads) and d["max_rel_spread"] == 0.5


def test_a_persistently_noisy_callable_ends_unstable():
    fn = _sleeper(lambda i: PAUSE / 5 if i % 2 else BASE / 5)  # every other repetition 10x slower
    t = time_callable(fn, "cpu", warmup=0, repeats=4, inner=1, max_rel_spread=0.5, attempts=3, clock="wall")
    assert len(t.attempt_spreads) == 3 and min(t.attempt_spreads) > 0.5
    assert t.rel_spread == min(t.attempt_spreads)  # the least noisy attempt is the one kept
    assert t.stable is False and t.to_dict()["stable"] is False
    with pytest.raises(ValueError, match="attempts: 0 is not allowed"):
        time_callable(fn, "cpu", warmup=0, repeats=1, attempts=0)
    with pytest.raises(ValueError, match="clock: 'sundial' is not allowed"):
        time_callable(fn, "cpu", warmup=0, repeats=1, clock="sundial")


def test_solve_refuses_a_profile_that_never_became_stable(tmp_path, capsys):
    from puzzle.cli import main as cli_main

    parent = tmp_path / "parent"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps(llama_config()))
    # A bound no wall-clock or CPU-time measurement meets: every attempt of every timing is "too noisy".
    cfg = parse_config({
        "name": "noisy", "parent": {"uri": str(parent)},
        "data": {"distillation_uri": "unused.txt", "validation_uri": "unused.txt"},
        "profile": {"scenarios": [{"name": "cpu-b2", "batch_size": 2, "input_len": 16, "output_len": 9}],
                    "warmup": 0, "repeats": 3, "decode_points": 2, "max_rel_spread": 1e-9, "attempts": 2},
        "store": {"uri": f"file://{tmp_path / 'runs'}"},
    })
    run_uri = create_run(cfg, run_id="noisy-test")
    unit = {"id": "cpu-b2.attn_g2", "scenario": "cpu-b2", "kind": "attention", "variant": "attn_g2"}
    assert run_step("profile", run_uri, unit)
    store = open_store(run_uri)
    rec = store.get_json("profile/cpu-b2/attn_g2.json")
    st = rec["stability"]
    assert st["measured"] and st["stable"] is False and st["rel_spread"] > 1e-9 and st["attempts"] == 2
    assert len(rec["prefill"]["attempt_spreads"]) == 2 and rec["prefill"]["stable"] is False
    assert all(len(p["spread"]["attempt_spreads"]) == 2 for p in rec["decode_points"])
    # never cached: the next run must measure it again rather than inherit the noise
    assert not any(k.endswith("attn_g2.json") for k in open_store(f"file://{tmp_path / 'runs'}").list("profiles"))
    for u in ({"id": "cpu-b2.attn_noop", "scenario": "cpu-b2", "kind": "attention", "variant": "attn_noop"},):
        assert run_step("profile", run_uri, u)  # nothing measured: nothing to judge

    assert cli_main(["step", "solve", "--run", run_uri]) == 2
    err = capsys.readouterr().err
    assert "scenario 'cpu-b2', variant 'attn_g2'" in err and "attn_noop" not in err
    assert f"(p90 - p10) / median = {st['rel_spread']:.3g} after 2 attempt(s)" in err
    assert "above profile.max_rel_spread = 1e-09" in err
    assert f"puzzle step profile --run {run_uri} --unit '{json.dumps(unit)}' --force" in err
    assert "raise profile.max_rel_spread" in err
    assert not store.exists("solve/solutions.json") and not store.exists("done/solve/all.json")
    # the way out the message names: a bound the recorded spread is within lets it through
    with pytest.raises(UnstableProfileError):
        load_scenario_profile(store, "cpu-b2")  # the bound it was measured under
    prof = load_scenario_profile(store, "cpu-b2", max_rel_spread=max(10 * st["rel_spread"], 1.0))
    assert prof.cost("attention", "attn_g2").prefill_s == rec["prefill_s"]


def _two_runs(tmp_path: Path, **profile):
    """Two runs of one config in one store (as a rerun would be), plus the store root."""
    parent = tmp_path / "parent"
    parent.mkdir(exist_ok=True)
    (parent / "config.json").write_text(json.dumps(llama_config()))

    def cfg(scenario_name: str, **extra):
        return parse_config({
            "name": "reuse", "parent": {"uri": str(parent)},
            "data": {"distillation_uri": "unused.txt", "validation_uri": "unused.txt"},
            "profile": {"scenarios": [{"name": scenario_name, "batch_size": 2, "input_len": 16, "output_len": 9}],
                        "warmup": 0, "repeats": 3, "decode_points": 2, "max_rel_spread": 1e6, **profile, **extra},
            "store": {"uri": f"file://{tmp_path / 'runs'}"},
        })

    return cfg


CACHED_UNITS = [("attention", "attn_g2"), ("ffn", "ffn_m1.0"), ("non_block", "non_block")]


def _profile(run_uri: str, scenario: str) -> dict[str, dict]:
    for kind, v in CACHED_UNITS + [("attention", "attn_noop")]:
        assert run_step("profile", run_uri, {"id": f"{scenario}.{v}", "scenario": scenario, "kind": kind, "variant": v})
    store = open_store(run_uri)
    return {v: store.get_json(f"profile/{scenario}/{v}.json") for _, v in CACHED_UNITS + [("attention", "attn_noop")]}


def test_a_rerun_reuses_the_stable_profiles_of_an_earlier_run_bit_for_bit(tmp_path):
    cfg = _two_runs(tmp_path)
    first = _profile(create_run(cfg("cpu-b2"), run_id="reuse-1"), "cpu-b2")
    root = open_store(f"file://{tmp_path / 'runs'}")
    cached = sorted(k for k in root.list("profiles"))
    digest = first["attn_g2"]["cache"]["digest"]
    ffn_entry = f"ffn_i{FFNVariant.from_mult(1.0, HIDDEN).intermediate_size}"  # cached by its shape
    assert cached == [f"profiles/{digest}/{e}.json" for e in ("attn_g2", ffn_entry, "key", "non_block")]
    key = root.get_json(f"profiles/{digest}/key.json")
    assert key["device"]["name"] == first["attn_g2"]["device"] and key["device"]["torch"] == torch.__version__
    assert key["scenario"] == {"batch_size": 2, "input_len": 16, "output_len": 9, "dtype": "float32", "device": "cpu"}
    assert key["model"]["hidden_size"] == HIDDEN and key["model"]["num_hidden_layers"] == LAYERS
    for v, rec in first.items():
        if v == "attn_noop":
            assert "reused" not in rec and "cache" not in rec  # nothing measured, nothing cached
            continue
        assert rec["reused"] is None and rec["cache"]["written"] is True
        assert rec["measured_by"]["run"] == "reuse-1" and rec["measured_by"]["unit"] == f"cpu-b2.{v}"

    # The rerun (here: its scenario renamed, same contents) copies them instead of measuring
    second = _profile(create_run(cfg("cpu-again"), run_id="reuse-2"), "cpu-again")
    for v in ("attn_g2", "ffn_m1.0", "non_block"):
        a, b = first[v], second[v]
        entry = ffn_entry if v == "ffn_m1.0" else v
        assert b["reused"] == {"from": f"{root.uri}/profiles/{digest}/{entry}.json", "digest": digest,
                               "measured_by": a["measured_by"]}
        assert b["scenario"]["name"] == "cpu-again" and b["variant"] == v and "cache" not in b
        for f in ("prefill_s", "decode_s", "decode_step_s", "decode_points", "prefill", "stability", "memory_bytes"):
            assert b[f] == a[f], f
    p1 = ScenarioProfile(list(first.values()))
    p2 = load_scenario_profile(open_store("file://" + str(tmp_path / "runs" / "reuse-2")), "cpu-again")
    blocks = [BlockConfig(AttentionVariant.gqa(2), FFNVariant.from_mult(1.0, HIDDEN))] * LAYERS
    assert predict(p1, blocks) == predict(p2, blocks)  # the solver sees the same problem

    # reuse off: measured again, the cache left as it was
    before = {k: root.get_bytes(k) for k in cached}
    third = _profile(create_run(cfg("cpu-b2", reuse=False), run_id="reuse-3"), "cpu-b2")
    assert all("reused" not in r and "cache" not in r for r in third.values())
    assert {k: root.get_bytes(k) for k in root.list("profiles")} == before


def test_cache_key_follows_device_shapes_and_settings_and_the_bound_is_the_readers(tmp_path):
    from puzzle.profiling.cache import ProfileCache, cache_key, digest_of, entry_name

    cfg = parent_model_config(llama_config(), "config.json")
    sc = Scenario(name="a", batch_size=2, input_len=16, output_len=9)
    settings = ProfileConfig(scenarios=[sc], repeats=3)
    cpu = torch.device("cpu")
    base = digest_of(cache_key(cfg, sc, settings, cpu))
    assert digest_of(cache_key(cfg, sc.model_copy(update={"name": "b"}), settings, cpu)) == base
    assert digest_of(cache_key(cfg, sc, settings.model_copy(update={"max_rel_spread": 0.1, "attempts": 9}), cpu)) == base
    changed = [
        cache_key(cfg, sc.model_copy(update={"batch_size": 3}), settings, cpu),
        cache_key(cfg, sc.model_copy(update={"dtype": "bfloat16"}), settings, cpu),
        cache_key(cfg, sc, settings.model_copy(update={"repeats": 4}), cpu),
        cache_key(cfg, sc, settings.model_copy(update={"cpu_clock": "wall"}), cpu),
        cache_key(parent_model_config({**llama_config(), "vocab_size": 128}, "config.json"), sc, settings, cpu),
        cache_key(parent_model_config({**llama_config(), "num_hidden_layers": 4}, "config.json"), sc, settings, cpu),
    ]
    torch.set_num_threads(2)
    try:
        changed.append(cache_key(cfg, sc, settings, cpu))  # another thread count is another device
    finally:
        torch.set_num_threads(1)
    assert len({base, *map(digest_of, changed)}) == len(changed) + 1
    size = FFNVariant.from_mult(1.0, HIDDEN).intermediate_size
    assert entry_name("ffn", FFNVariant.from_mult(1.0, HIDDEN)) == entry_name("ffn", FFNVariant.exact(size)) == f"ffn_i{size}"

    # A cached record is judged against the reading run's bound, not the one it was written under
    cache = ProfileCache(open_store(f"file://{tmp_path}"), cache_key(cfg, sc, settings, cpu))
    rec = profile_unit(cfg, "attention", "attn_g2", sc, settings.model_copy(update={"max_rel_spread": 1e6}))
    cache.save("attn_g2", rec)
    spread = rec["stability"]["rel_spread"]
    assert cache.lookup("attn_g2", max_rel_spread=spread * 2 + 1e-12) == rec
    assert cache.lookup("attn_g2", max_rel_spread=spread / 2) is None
    assert cache.lookup("attn_g4", max_rel_spread=1e6) is None


def test_a_scenario_unit_reuses_the_cache_only_as_the_whole_set_it_measured_together(tmp_path):
    cfg = _two_runs(tmp_path)
    pairs_ = CACHED_UNITS + [("attention", "attn_noop")]

    def profile(run_uri: str, scenario: str) -> dict[str, dict]:
        unit = {"id": scenario, "scenario": scenario, "kind": "scenario",
                "variants": [{"kind": k, "variant": v} for k, v in pairs_]}
        assert run_step("profile", run_uri, unit)
        store = open_store(run_uri)
        return {v: store.get_json(f"profile/{scenario}/{v}.json") for _, v in pairs_}

    first = profile(create_run(cfg("cpu-b2"), run_id="set-1"), "cpu-b2")
    session = first["attn_g2"]["method"]["interleaved"]["session"]
    assert all(first[v]["method"]["interleaved"]["session"] == session for _, v in CACHED_UNITS)
    assert all(first[v]["cache"]["written"] for _, v in CACHED_UNITS) and "cache" not in first["attn_noop"]
    digest = first["attn_g2"]["cache"]["digest"]
    root = open_store(f"file://{tmp_path / 'runs'}")
    assert root.get_json(f"profiles/{digest}/key.json")["settings"]["interleaved"] is True

    second = profile(create_run(cfg("cpu-b2"), run_id="set-2"), "cpu-b2")  # the whole set: reused
    for _, v in CACHED_UNITS:
        assert second[v]["reused"]["digest"] == digest
        for f in ("prefill_s", "decode_s", "whole_model", "method"):
            assert second[v][f] == first[v][f], f

    # one entry gone: the others are not mixed with a new measurement of it; all are measured again
    root.delete(f"profiles/{digest}/attn_g2.json")
    third = profile(create_run(cfg("cpu-b2"), run_id="set-3"), "cpu-b2")
    sessions = {third[v]["method"]["interleaved"]["session"] for _, v in CACHED_UNITS}
    assert len(sessions) == 1 and session not in sessions
    assert all(third[v]["reused"] is None for _, v in CACHED_UNITS)
    assert root.get_json(f"profiles/{digest}/non_block.json")["method"]["interleaved"]["session"] in sessions

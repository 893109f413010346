"""The throughput model and the whole-model measurement: arithmetic on a hand example, lookup by
variant shape, the inference engine against the model's own generation, predicted vs measured on this
CPU (a ratio sanity bound, not a timing assertion), and the ``puzzle bench throughput`` command.

All real components on the CPU; the vLLM backend is skipped when vLLM is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from puzzle.cli import main as cli_main
from puzzle.config import ProfileConfig, Scenario
from puzzle.model import AttentionVariant as A
from puzzle.model import BlockConfig, DeciLMForCausalLM, ModelConfig, save_pretrained
from puzzle.model import FFNVariant as F
from puzzle.profiling import ProfileError, ScenarioProfile, load_scenario_profile, predict, variant_costs
from puzzle.profiling.bench import DeviceAbsentError, measure_throughput
from puzzle.profiling.engine import InferenceEngine
from puzzle.profiling.profiler import profile_unit
from puzzle.store import open_store

torch.set_num_threads(1)

SC = {"name": "hand", "batch_size": 4, "input_len": 10, "output_len": 5, "dtype": "float32", "device": "cpu"}
MODEL = {"hidden_size": 48, "num_attention_heads": 4, "head_dim": 12, "vocab_size": 64, "num_hidden_layers": 2}


def rec(kind: str, variant: str, prefill: float, decode: float, weight: int, kv: int = 0, estimate: bool = False) -> dict:
    return {"scenario": SC, "model": MODEL, "kind": kind, "variant": variant, "prefill_s": prefill,
            "decode_s": decode, "decode_step_s": decode / SC["output_len"], "weight_bytes": weight, "kv_bytes": kv,
            "memory_bytes": weight + kv, "params": weight // 4, "estimate": estimate}


def hand_profile() -> ScenarioProfile:
    return ScenarioProfile([
        rec("attention", "attn_g1", 0.010, 0.040, 400, 100),
        rec("attention", "attn_g2", 0.008, 0.030, 320, 50),
        rec("attention", "attn_noop", 0.0, 0.0, 0),
        rec("ffn", "ffn_i128", 0.020, 0.050, 800),
        rec("ffn", "ffn_linear", 0.004, 0.010, 200, estimate=True),
        rec("non_block", "non_block", 0.001, 0.005, 1000),
    ])


def test_prediction_arithmetic_by_hand():
    prof = hand_profile()
    blocks = [BlockConfig(A.gqa(1), F.exact(128)), BlockConfig(A.noop(), F.linear()), BlockConfig(A.gqa(2), F.exact(128))]
    p = predict(prof, blocks)
    prefill = 0.001 + (0.010 + 0.020) + (0.0 + 0.004) + (0.008 + 0.020)
    decode = 0.005 + (0.040 + 0.050) + (0.0 + 0.010) + (0.030 + 0.050)
    assert p.prefill_s == pytest.approx(prefill) and p.decode_s == pytest.approx(decode)
    assert p.tokens_per_s == pytest.approx(4 * 5 / (prefill + decode))
    assert p.memory_bytes == 1000 + 500 + 800 + 0 + 200 + 370 + 800
    assert p.kv_bytes == 150 and p.estimate is True  # ffn_linear's cost is an estimate
    assert predict(prof, [BlockConfig(A.gqa(1), F.exact(128))]).estimate is False
    c = variant_costs(prof, "attention", "attn_g2")
    assert c["decode_step_s"] == pytest.approx(0.030 / 5) and c["memory_bytes"] == 370 and c["params"] == 80


def test_lookup_is_by_shape_and_errors_name_what_is_missing():
    prof = hand_profile()
    # ffn_m4.0 at hidden 48 is intermediate 128: the same module as ffn_i128, so it shares the cost
    assert F.from_mult(4.0, 48).intermediate_size == 128
    assert prof.cost("ffn", "ffn_m4.0") == prof.cost("ffn", "ffn_i128")
    with pytest.raises(ProfileError, match="no ffn profile for variant 'ffn_i64'.*profiled"):
        prof.cost("ffn", "ffn_i64")
    with pytest.raises(ProfileError, match="kind: 'block' is not allowed"):
        prof.cost("block", "attn_g1")
    other = dict(rec("ffn", "ffn_noop", 0, 0, 0), scenario={**SC, "batch_size": 8})
    with pytest.raises(ProfileError, match="differs"):
        ScenarioProfile([rec("ffn", "ffn_i128", 1, 1, 1), other])
    with pytest.raises(ProfileError, match="no non_block profile"):
        predict(ScenarioProfile([rec("attention", "attn_g1", 1, 1, 1), rec("ffn", "ffn_i128", 1, 1, 1)]),
                [BlockConfig(A.gqa(1), F.exact(128))])


def test_load_scenario_profile_from_store(tmp_path):
    store = open_store(f"file://{tmp_path}/run-x")
    for r in hand_profile().records:
        store.put_json(f"profile/hand/{r['variant']}.json", r)
    store.put_json("profile/other/ffn_noop.json", dict(rec("ffn", "ffn_noop", 0, 0, 0), scenario={**SC, "name": "other"}))
    prof = load_scenario_profile(store, "hand")
    assert prof.name == "hand" and prof.variants("attention") == ["attn_g1", "attn_g2", "attn_noop"]
    with pytest.raises(ProfileError, match="no profiles under profile/missing/"):
        load_scenario_profile(store, "missing")


def tiny_cfg(blocks: list[BlockConfig]) -> ModelConfig:
    return ModelConfig(vocab_size=96, hidden_size=64, num_attention_heads=8, block_configs=blocks)


PARENT = [BlockConfig(A.gqa(2), F.exact(176))] * 4
CHILD = [BlockConfig(A.linear(), F.noop()), BlockConfig(A.gqa(4), F.linear()),
         BlockConfig(A.noop(), F.exact(176)), BlockConfig(A.gqa(2), F.exact(88))]


def test_engine_generates_what_the_model_generates():
    torch.manual_seed(0)
    m = DeciLMForCausalLM(tiny_cfg(CHILD)).eval()
    ids = torch.randint(0, 96, (3, 9))
    eng = InferenceEngine(m, 3, 9 + 7)
    assert torch.equal(eng.generate(ids, 7), m.generate(ids, 7)[:, 9:])
    # and the prefill's last-position logits equal forward's
    eng.set_prompt(ids)
    h, rope = eng.nb.prefill_in(eng.ids)
    for a, f in eng.layers:
        h = a.prefill(h, rope) if a is not None else h
        h = f(h) if f is not None else h
    torch.testing.assert_close(eng.nb.logits(h), m(ids)[:, -1], rtol=1e-4, atol=1e-5)


def test_predicted_vs_measured_on_cpu_within_a_sanity_bound():
    sc = Scenario(name="cpu-b4", batch_size=4, input_len=24, output_len=24)
    settings = ProfileConfig(scenarios=[sc], warmup=2, repeats=5, decode_points=3)
    cfg = tiny_cfg(PARENT)
    names = [("attention", v) for v in ("attn_g2", "attn_g4", "attn_linear", "attn_noop")] + [
        ("ffn", v) for v in ("ffn_i176", "ffn_i88", "ffn_linear", "ffn_noop")] + [("non_block", "non_block")]
    prof = ScenarioProfile([profile_unit(cfg, k, n, sc, settings) for k, n in names])
    for blocks in (PARENT, CHILD):
        m = DeciLMForCausalLM(tiny_cfg(blocks)).eval()
        # The clock the profiles read (one thread: the thread's CPU time), so the neighbours' load on this
        # shared machine does not enter one side only.
        assert settings.cpu_clock == "auto" and torch.get_num_threads() == 1
        meas = measure_throughput(m, sc, warmup=1, repeats=3, clock="thread_cpu")
        pred = predict(prof, blocks)
        assert pred.memory_bytes == meas.memory_bytes  # exact, both from the counts
        # Shared 2-core machine: only a loose ratio, the benchmark records the error.
        assert 0.33 < pred.tokens_per_s / meas.tokens_per_s < 3.0
        assert meas.tokens_per_s == pytest.approx(4 * 24 / (meas.prefill_s + meas.decode_s))


def test_measure_interleaved_takes_the_models_generations_in_turns(monkeypatch):
    """Two real models, measured for real; a spy on the generation records the order the engines ran in."""
    from puzzle.profiling import bench

    sc = Scenario(name="cpu-b2", batch_size=2, input_len=8, output_len=4)
    a, b = DeciLMForCausalLM(tiny_cfg(PARENT)).eval(), DeciLMForCausalLM(tiny_cfg(CHILD)).eval()
    order: list[int] = []
    real = bench.GenerationTimer.once

    def spy(self):
        order.append(id(self.model))
        return real(self)

    monkeypatch.setattr(bench.GenerationTimer, "once", spy)
    ma, mb = bench.measure_interleaved([a, b], sc, warmup=1, repeats=3, clock="thread_cpu")
    assert order == [id(a), id(b)] * 4  # warm-up then three timed rounds, A B A B ...
    assert ma.repeats == mb.repeats == 3 and ma.clock == "thread_cpu"
    assert ma.weight_bytes > mb.weight_bytes  # the child is smaller, each measured as itself
    with pytest.raises(ValueError, match="models: an empty list"):
        bench.measure_interleaved([], sc)


def test_measure_refuses_an_absent_device():
    m = DeciLMForCausalLM(tiny_cfg(PARENT[:1])).eval()
    if torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(DeviceAbsentError, match="cuda:7"):
        measure_throughput(m, Scenario(name="x", batch_size=1, input_len=4, output_len=2, device="cuda:7"))


def test_bench_throughput_command(tmp_path, capsys):
    torch.manual_seed(0)
    d = save_pretrained(DeciLMForCausalLM(tiny_cfg(CHILD)).eval(), tmp_path / "child")
    out = tmp_path / "r.json"
    rc = cli_main(["bench", "throughput", str(d), "--batch", "2", "--input-len", "8", "--output-len", "4",
                   "--repeats", "1", "--json", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())["measured"]
    assert res["tokens_per_s"] > 0 and res["scenario"]["batch_size"] == 2
    assert "tokens/s" in capsys.readouterr().out
    assert cli_main(["bench", "throughput", str(d), "--batch", "2"]) == 2
    assert "--input-len, --output-len: required" in capsys.readouterr().err
    assert cli_main(["bench", "throughput", str(d), "--batch", "0", "--input-len", "8", "--output-len", "4"]) == 2
    assert "batch_size" in capsys.readouterr().err
    assert cli_main(["bench", "throughput", str(tmp_path), "--batch", "1", "--input-len", "8", "--output-len", "4"]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_bench_throughput_threads_and_the_spread_warning(tmp_path, capsys):
    from puzzle.commands.bench import default_threads

    torch.manual_seed(0)
    d = save_pretrained(DeciLMForCausalLM(tiny_cfg(CHILD)).eval(), tmp_path / "child")
    out = tmp_path / "r.json"
    flags = ["--batch", "2", "--input-len", "8", "--output-len", "6", "--json", str(out)]
    try:
        assert cli_main(["bench", "throughput", str(d), *flags, "--threads", "2", "--repeats", "3",
                         "--max-rel-spread", "1e9"]) == 0
        res = json.loads(out.read_text())
        assert res["measured"]["threads"] == 2 and torch.get_num_threads() == 2 and "(2 threads)" in res["measured"]["device"]
        assert res["stable"] is True and res["max_rel_spread"] == 1e9
        assert "warning" not in capsys.readouterr().err
        # default: what one local worker of `puzzle run` gets on this machine
        assert cli_main(["bench", "throughput", str(d), *flags, "--repeats", "1"]) == 0
        assert json.loads(out.read_text())["measured"]["threads"] == default_threads()
        capsys.readouterr()
        # a bound no three generations meet: the figure is flagged as the machine's, not the model's
        assert cli_main(["bench", "throughput", str(d), *flags, "--threads", "1", "--repeats", "3",
                         "--max-rel-spread", "1e-12"]) == 0
        err = capsys.readouterr().err
        assert "warning: the 3 generations disagree by" in err and "above 1e-10% (--max-rel-spread)" in err and "load average" in err
        assert json.loads(out.read_text())["stable"] is False
        assert cli_main(["bench", "throughput", str(d), *flags, "--threads", "0"]) == 2
        assert "--threads: 0 is not allowed" in capsys.readouterr().err
        assert cli_main(["bench", "throughput", str(d), *flags, "--max-rel-spread", "-1"]) == 2
        assert "--max-rel-spread: -1.0 is not allowed" in capsys.readouterr().err
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed here (optional backend)")
def test_vllm_backend_runs(tmp_path):
    from puzzle.profiling.bench import measure_throughput_vllm

    d = save_pretrained(DeciLMForCausalLM(tiny_cfg(PARENT)).eval(), tmp_path / "m")
    res = measure_throughput_vllm(Path(d), Scenario(name="v", batch_size=2, input_len=8, output_len=4, device="cuda"))
    assert res.tokens_per_s > 0 and res.backend == "vllm"


def test_median_interval_is_the_binomial_order_statistics_interval():
    from puzzle.profiling.timing import median_interval

    xs = [float(x) for x in range(20, 0, -1)]  # given unsorted
    # n = 20: ranks 6 and 15 cover the median with 1 - 2 P(Bin(20, 1/2) <= 5) = 0.9586
    assert median_interval(xs)[:2] == (6.0, 15.0) and abs(median_interval(xs)[2] - 0.95861) < 1e-4
    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) == (1.0, 5.0, 0.9375), "5 samples: (min, max), below 95%"
    assert median_interval([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])[:2] == (1.0, 6.0)
    lo, hi, cov = median_interval([float(x) for x in range(1, 41)])
    assert (lo, hi) == (14.0, 27.0) and cov >= 0.95
    with pytest.raises(ValueError, match="empty"):
        median_interval([])


def test_pooled_measurement_is_the_median_generation_of_every_round():
    from puzzle.profiling.bench import measure_interleaved, pooled

    sc = Scenario(name="cpu", batch_size=1, input_len=4, output_len=4, device="cpu")
    model = DeciLMForCausalLM(tiny_cfg(PARENT[:1])).eval()
    a, b = (measure_interleaved([model], sc, warmup=0, repeats=n)[0] for n in (2, 3))
    both = pooled([a, b])
    gens = a.generations_s + b.generations_s
    totals = sorted(p + d for p, d in gens)
    assert both.repeats == 5 and both.generations_s == gens
    assert both.total_s == totals[2] and math.isclose(both.tokens_per_s, 4 / totals[2])
    assert both.total_spread["min_s"] == totals[0] and both.total_spread["max_s"] == totals[-1]
    with pytest.raises(ValueError, match="no generations"):
        pooled([])

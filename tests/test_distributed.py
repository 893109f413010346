"""Sharded steps (FSDP2 under torchrun) give what one process gives: GKD's weights and loss curve,
held-out KL/perplexity, replace-1-block scores and the evaluate report, on a small random parent.

The sharded side really runs two processes: ``torch.distributed.run --nproc-per-node 2`` on this file
(its ``__main__`` is the worker), CPU, gloo backend, each process a rank with its FSDP2 shards. The
one-process side runs here, in the test process, through the same functions (world size 1: every
``puzzle.distributed`` call the identity). One launch serves every sharded check (a launch costs
tens of seconds of imports on a small machine):

- ``gkd``: ``distill`` on a 3-sequence batch (shares of 2 and 1: the loss normalization across ranks
  matters) with a clipping threshold every step hits (the norm must be the global one); a sharded run
  killed after its step-2 checkpoint resumes to the uninterrupted weights; a one-process checkpoint
  resumes on two ranks; ``compare_to_parent`` on 5 batches (one rank runs an uncounted repeat);
- bad input met by rank 0 alone (``from_main``) raises the same error on both ranks;
- ``steps``: ``assemble`` (with GKD), every ``score`` unit and ``evaluate`` through ``run_step``, in a
  second run built exactly like the one-process run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from puzzle import distributed as dist
from puzzle.config import GKDConfig
from puzzle.distill.gkd import distill
from puzzle.evaluation import compare_to_parent
from puzzle.model import DeciLMForCausalLM, FFNVariant, build_attention, init_ffn, load_parent, parent_config
from puzzle.model.variants import AttentionVariant
from puzzle.store import open_store
from safetensors.torch import load as st_load
from safetensors.torch import load_file, save_file

torch.set_num_threads(1)

HERE = Path(__file__).resolve().parent
GKD = GKDConfig(enabled=True, tokens=6 * 3 * 16, batch_size=3, lr=3e-3, warmup_fraction=0.2, grad_clip=0.05,
                checkpoint_every=2)
SEQ = 16


class Killed(RuntimeError):
    """Stands for a pod killed between two checkpoints."""


# ----- what both sides run ---------------------------------------------------------------------------------
def tiny_child(parent_dir: Path) -> DeciLMForCausalLM:
    """The parent with layer 0's FFN pruned to half and layer 1's attention a fresh linear map (seeded)."""
    child = load_parent(parent_dir)
    seqs = data(parent_dir)[0]
    with torch.no_grad():
        _, hidden = child(seqs[:4], output_hidden_states=True)
        h_mid = child.attn_sublayer(0, hidden[0])
    ffn = FFNVariant.from_mult(0.5, child.config.hidden_size)
    child.set_ffn(0, ffn, init_ffn(ffn, child, 0, h_mid))
    torch.manual_seed(1)
    child.set_attention(1, AttentionVariant.linear(), build_attention(AttentionVariant.linear(), child.config))
    return child


def data(parent_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(distillation, held-out) sequences (N, SEQ) of random tokens, the same in every process."""
    g = torch.Generator().manual_seed(7)
    vocab = parent_config(parent_dir).vocab_size
    return torch.randint(0, vocab, (10, SEQ), generator=g), torch.randint(0, vocab, (9, SEQ), generator=g)


def sharded_models(parent_dir: Path) -> tuple[DeciLMForCausalLM, DeciLMForCausalLM]:
    """(child, frozen teacher), each built on rank 0 and spread over the ranks (plain at world size 1)."""
    full = tiny_child(parent_dir) if dist.is_main() else None
    ccfg = dist.broadcast_object(full.config if full is not None else None)
    child = dist.distribute(full, lambda: DeciLMForCausalLM(ccfg), "cpu")
    pcfg = parent_config(parent_dir)
    teacher = dist.distribute(load_parent(parent_dir) if dist.is_main() else None, lambda: DeciLMForCausalLM(pcfg),
                              "cpu", frozen=True)
    return child, teacher


def run_gkd(parent_dir: Path, checkpoints: Path | None = None, kill_after: int | None = None):
    """(GKDResult, the child's full state dict on rank 0) of distill on the tiny child."""
    seqs, held = data(parent_dir)
    child, teacher = sharded_models(parent_dir)

    def on_step(done: int, point: dict) -> None:
        if done == kill_after:
            raise Killed(f"killed after step {done}")

    store = open_store(f"file://{checkpoints}") if checkpoints is not None and dist.is_main() else None
    result = distill(child, teacher, seqs, GKD, seed=0, eval_seqs=held, on_step=on_step, checkpoints=store,
                     resume_key="tiny")
    return result, dist.full_state_dict(child)


def quality(parent_dir: Path) -> dict:
    child, teacher = sharded_models(parent_dir)
    return compare_to_parent(child, teacher, data(parent_dir)[1], batch_size=2)


def steps(run: str) -> None:
    """assemble (GKD on) sol-0, every score unit, evaluate sol-0: what the pipeline runs on one pod."""
    from puzzle.context import run_step
    from test_assemble import unit

    store = open_store(run)
    run_step("assemble", run, unit(run, "sol-0"))
    for u in store.get_json("plan/score.json"):
        run_step("score", run, u)
    run_step("evaluate", run, unit(run, "sol-0"))


def make_steps_run(root: Path) -> str:
    from test_assemble import make_run

    # 4 GKD steps of 4 sequences; score: 16 sequences in 6 batches of 3, evaluate: 8 in 3 (one rank repeats one)
    return make_run(root, gkd=True, gkd_tokens=4 * 32 * 4, extra="score: {tokens: 512, batch_size: 3}")


def _error_on_every_rank() -> str:
    """What each rank sees when rank 0 alone meets bad input in ``from_main``."""
    from puzzle.errors import UnitError

    def bad() -> None:
        raise UnitError("layers: [3, 1] is not allowed")

    try:
        dist.from_main(bad)
    except UnitError as err:
        return f"{type(err).__name__}: {err}"
    return "no error"


# ----- the worker (python -m torch.distributed.run --nproc-per-node 2 tests/test_distributed.py OUT) ----------
def worker(out: Path) -> None:
    dist.init()
    assert dist.world() == 2, "the worker runs under torchrun with 2 processes"
    parent_dir = out / "parent"
    result, sd = run_gkd(parent_dir, out / "ckpt-sharded")
    try:
        run_gkd(parent_dir, out / "ckpt-killed", kill_after=3)
        raise AssertionError("the kill did not happen")
    except Killed:
        pass
    resumed, sd_resumed = run_gkd(parent_dir, out / "ckpt-killed")
    # the one-process side left its checkpoint of step 2 here: two ranks resume it
    crossed, sd_crossed = run_gkd(parent_dir, out / "ckpt-one")
    q = quality(parent_dir)
    errors = dist.gather_object(_error_on_every_rank())
    steps(json.loads((out / "steps-run.json").read_text()))
    if dist.is_main():
        for name, state in (("sharded", sd), ("resumed", sd_resumed), ("crossed", sd_crossed)):
            save_file({k: v.contiguous() for k, v in state.items()}, out / f"{name}.safetensors")
        (out / "figures.json").write_text(json.dumps({
            "curve": result.curve, "initial_kl": result.initial_kl, "final_kl": result.final_kl,
            "resumed_curve": resumed.curve, "crossed_curve": crossed.curve, "quality": q, "errors": errors}))
    dist.barrier()
    dist.destroy()


# ----- the tests -------------------------------------------------------------------------------------------
def test_share_and_rank_batches_cover_every_item_once():
    for n in (1, 5, 7, 8):
        for w in (1, 2, 3):
            parts = [dist.share(n, r, w) for r in range(w)]
            assert [i for p in parts for i in range(n)[p]] == list(range(n))
            assert max(len(range(n)[p]) for p in parts) - min(len(range(n)[p]) for p in parts) <= 1
    # 5 batches over 2 ranks: 3 rounds each, the last of rank 1 a repeat that does not count
    per_rank = [dist.rank_batches(9, 2, r, 2) for r in range(2)]
    assert [len(b) for b in per_rank] == [3, 3]
    counted = sorted((s.start, s.stop) for b in per_rank for s, c in b if c)
    assert counted == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 9)]
    assert per_rank[1][-1][1] is False


def _llama8b_plan(tmp_path: Path, gpus: int) -> dict:
    """The dry-run plan's rows of a Llama-3.1-8B-shaped parent with GKD on, at ``gpus`` GPUs a pod."""
    from puzzle.config import parse_config
    from puzzle.planning import format_plan, preflight

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
           "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
           "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    config = parse_config({
        "name": "p", "parent": {"uri": str(tmp_path), "dtype": "bfloat16"},
        "data": {"distillation_uri": "x.txt", "validation_uri": "y.txt", "seq_len": 1024},
        "profile": {"scenarios": [{"name": "gpu", "batch_size": 8, "input_len": 128, "output_len": 128,
                                   "dtype": "bfloat16", "device": "cuda"}]},
        "assemble": {"gkd": {"enabled": True, "tokens": 10**8, "batch_size": 8}},
        "eval": {"task_examples": 0, "measure_throughput": False},
        "compute": {"gpu_memory_gib": 141, "gpus_per_pod": gpus},
    })
    checked = preflight(config)
    assert checked is not None
    return {"rows": {r["step"]: r for r in checked.cost["steps"]}, "text": format_plan(checked.cost)}


def test_the_plan_gives_memory_per_gpu_and_time_of_the_sharded_steps(tmp_path):
    one, two = _llama8b_plan(tmp_path, 1), _llama8b_plan(tmp_path, 2)
    a1, a2 = one["rows"]["assemble"], two["rows"]["assemble"]
    assert (a1["gpus_per_unit"], a2["gpus_per_unit"]) == (1, 2)
    # FSDP2 halves the states and the batch per GPU; the gathered unit and the overhead do not shrink
    assert 0.5 * a1["memory_gib_per_unit"] < a2["memory_gib_per_unit"] < 0.6 * a1["memory_gib_per_unit"]
    assert a2["hours_per_unit"] == pytest.approx(a1["hours_per_unit"] / 2, rel=0.05)
    assert a2["gpu_hours"] == pytest.approx(a1["gpu_hours"], rel=0.05), "GPU hours count both GPUs"
    s1, s2 = one["rows"]["score"], two["rows"]["score"]
    assert s2["memory_gib_per_unit"] == s1["memory_gib_per_unit"] and s2["gpus_per_unit"] == 2
    assert s2["hours_per_unit"] == pytest.approx(s1["hours_per_unit"] / 2)
    e1, e2 = one["rows"]["evaluate"], two["rows"]["evaluate"]
    assert e2["gpus_per_unit"] == 2 and e2["memory_gib_per_unit"] < e1["memory_gib_per_unit"]
    for step in ("prepare", "bld", "profile", "solve"):
        assert two["rows"][step]["gpus_per_unit"] == 1
    assert "GiB/GPU" in two["text"] and "sharded over 2 GPUs" in two["text"]
    assert "1 x 141 GiB" in one["text"] and "2 x 141 GiB" in two["text"]


def test_gpus_per_pod_is_checked():
    from puzzle.config import ComputeConfig, ConfigError, parse_config

    assert ComputeConfig().gpus_per_pod == 1
    with pytest.raises(ConfigError, match="gpus_per_pod"):
        parse_config({"name": "p", "parent": {"uri": "x"}, "data": {"distillation_uri": "x", "validation_uri": "y"},
                      "profile": {"scenarios": [{"name": "c", "batch_size": 1, "input_len": 8, "output_len": 8}]},
                      "compute": {"gpus_per_pod": 0}})


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    """(one-process figures, the sharded worker's output folder)."""
    from tinymodels import make_parent

    out = tmp_path_factory.mktemp("dist")
    parent_dir = make_parent(out / "parent")
    one: dict = {}
    one["result"], one["sd"] = run_gkd(parent_dir)
    with pytest.raises(Killed):
        run_gkd(parent_dir, out / "ckpt-one", kill_after=3)  # leaves the checkpoint of step 2
    assert (out / "ckpt-one" / "state.json").is_file()
    one["quality"] = quality(parent_dir)
    one["run"] = make_steps_run(out / "run-one")
    steps(one["run"])
    (out / "steps-run.json").write_text(json.dumps(make_steps_run(out / "run-two")))

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "jobs"), str(HERE),
                                                         os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).resolve()), str(out)], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return one, out


def _close(a: dict, b: dict, atol: float) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.allclose(v, b[k], rtol=1e-5, atol=atol), (k, (v - b[k]).abs().max().item())


@pytest.mark.slow
def test_sharded_gkd_equals_one_process(both):
    one, out = both
    figures = json.loads((out / "figures.json").read_text())
    curve = one["result"].curve
    assert len(figures["curve"]) == len(curve) == 6
    for p, q in zip(figures["curve"], curve, strict=True):
        assert p["step"] == q["step"] and p["tokens"] == q["tokens"] == p["step"] * 3 * SEQ
        for k in ("loss", "kl", "cosine"):
            assert p[k] == pytest.approx(q[k], rel=1e-5, abs=1e-7), (p, q)
    assert curve[-1]["loss"] < curve[0]["loss"], "the test must train something"
    assert figures["initial_kl"] == pytest.approx(one["result"].initial_kl, rel=1e-6)
    assert figures["final_kl"] == pytest.approx(one["result"].final_kl, rel=1e-5)
    sharded = load_file(out / "sharded.safetensors")
    _close(sharded, one["sd"], atol=1e-6)
    # and the weights moved: a wrong split would be caught, not hidden by an untrained child
    init = tiny_child(out / "parent").state_dict()
    assert max((sharded[k] - init[k]).abs().max().item() for k in init) > 1e-3


@pytest.mark.slow
def test_sharded_gkd_resumes_after_a_kill(both):
    one, out = both
    figures = json.loads((out / "figures.json").read_text())
    for name in ("resumed", "crossed"):  # killed on two ranks; killed in one process, resumed on two
        _close(load_file(out / f"{name}.safetensors"), one["sd"], atol=1e-6)
        assert [p["step"] for p in figures[f"{name}_curve"]] == [p["step"] for p in one["result"].curve]
        assert figures[f"{name}_curve"][-1]["loss"] == pytest.approx(one["result"].curve[-1]["loss"], rel=1e-5)
    assert not (out / "ckpt-killed" / "state.json").exists(), "a finished run removes its checkpoint"


@pytest.mark.slow
def test_bad_input_on_rank_0_fails_every_rank_alike(both):
    _, out = both
    errors = json.loads((out / "figures.json").read_text())["errors"]
    assert errors == ["UnitError: layers: [3, 1] is not allowed"] * 2


@pytest.mark.slow
def test_sharded_compare_to_parent_equals_one_process(both):
    one, out = both
    q2 = json.loads((out / "figures.json").read_text())["quality"]
    assert q2["tokens"] == one["quality"]["tokens"] == 9 * SEQ
    for k in ("kl", "lm_loss", "parent_lm_loss", "perplexity"):
        assert q2[k] == pytest.approx(one["quality"][k], rel=1e-6), k


@pytest.mark.slow
def test_sharded_steps_equal_one_process(both):
    one, out = both
    s1 = open_store(one["run"])
    s2 = open_store(json.loads((out / "steps-run.json").read_text()))
    # assemble: the child's weights and its GKD record
    r1, r2 = s1.get_json("child/sol-0/complete.json"), s2.get_json("child/sol-0/complete.json")
    assert r2["world_size"] == 2 and r1["world_size"] == 1
    assert r2["params"] == r1["params"] and r2["gkd"]["steps"] == r1["gkd"]["steps"] == 4
    for p, q in zip(r2["gkd"]["curve"], r1["gkd"]["curve"], strict=True):
        assert p["loss"] == pytest.approx(q["loss"], rel=1e-5)
    weights = [k for k in s1.list("child/sol-0") if k.endswith(".safetensors")]
    assert weights
    for k in weights:
        _close(st_load(s1.get_bytes(k)), st_load(s2.get_bytes(k)), atol=1e-6)
    # score: every (layer, variant), and the layers' similarities
    keys = [k for k in s1.list("scores") if k.endswith(".json")]
    assert keys and sorted(keys) == sorted(k for k in s2.list("scores") if k.endswith(".json"))
    for k in keys:
        a, b = s1.get_json(k), s2.get_json(k)
        assert a.keys() == b.keys()
        for f, v in a.items():
            if isinstance(v, float):
                assert b[f] == pytest.approx(v, rel=1e-6, abs=1e-9), (k, f)
            else:
                assert b[f] == v, (k, f)
    # evaluate: the sharded quality figures, and what rank 0 generates alone
    e1, e2 = s1.get_json("eval/sol-0/report.json"), s2.get_json("eval/sol-0/report.json")
    for f in ("kl", "lm_loss", "parent_lm_loss"):
        assert e2["quality"][f] == pytest.approx(e1["quality"][f], rel=1e-5), f
    assert e2["quality"]["tokens"] == e1["quality"]["tokens"]
    assert e2["task"]["n"] == e1["task"]["n"] == 4
    assert e2["params"] == e1["params"]
    # rank 0 alone wrote the done markers and metrics
    assert s2.exists("done/assemble/sol-0.json") and s2.exists("done/evaluate/sol-0.json")


if __name__ == "__main__":
    worker(Path(sys.argv[1]))

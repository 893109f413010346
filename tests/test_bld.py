"""The bld step: a tiny library trains through ``puzzle step bld`` on CPU as one stage (every block of two
layers from one parent pass per batch), every trained block improves on its initialization, a block's
weights do not depend on which stage trained it or on whether the parent streamed, a killed unit resumes
to the same weights, a second run reuses the library, and bad units fail at once with exit status 2."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from puzzle.cli import main
from puzzle.config import parse_config
from puzzle.data.shards import load_tokens, sequences
from puzzle.layout import done_key
from puzzle.library import Library
from puzzle.model import load_parent, normalized_mse
from puzzle.steps.bld import KILL_ENV
from puzzle.store import open_store
from puzzle.training import Schedule
from test_library import make_config, make_parent, make_run

torch.set_num_threads(1)

# 40 steps of 8 x 32 tokens: enough for every variant of the tiny parent to beat its initialization
BLD = {"tokens": 8 * 32 * 40, "lr": 1e-3}

# The parent has 4 heads / 2 KV heads (attn_g2) and SwiGLU 128 (ffn_i128): those get no unit.
UNITS = [
    ("attention", "attn_g4"), ("attention", "attn_linear"), ("attention", "attn_noop"),
    ("ffn", "ffn_m0.5"), ("ffn", "ffn_m1.0"), ("ffn", "ffn_linear"), ("ffn", "ffn_noop"),
]


def unit(blocks: str | list[str], layers=(0, 2), uid: str | None = None, **extra) -> dict:
    """A stage unit as prepare plans it: the blocks it trains over layers [start, end)."""
    blocks = [blocks] if isinstance(blocks, str) else list(blocks)
    return {"id": uid or f"bld.l{layers[0]:03d}-{layers[1]:03d}", "layers": list(layers), "blocks": blocks, **extra}


def step(run_uri: str, u: dict) -> int:
    return main(["step", "bld", "--run", run_uri, "--unit", json.dumps(u)])


def library(run_uri: str, root: Path, parent: Path) -> Library:
    return Library.for_run(open_store(run_uri), parse_config(make_config(root, parent, **BLD)))


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, parent_dir):
    """One run whose whole library (every variant, both layers) trained through the CLI."""
    root = tmp_path_factory.mktemp("runs")
    uri = make_run(root, parent_dir, **BLD)
    assert step(uri, unit([v for _, v in UNITS])) == 0  # one stage: every block of both layers
    return root, uri


def test_whole_library_trains_and_every_block_improves(trained, parent_dir):
    root, uri = trained
    lib = library(uri, root, parent_dir)
    assert lib.entries() == sorted((layer, v) for _, v in UNITS for layer in (0, 1))
    for layer, v in lib.entries():
        m = lib.meta(layer, v)
        assert m["layer"] == layer and m["variant"] == v and m["device"] == "cpu"
        assert m["eval_tokens"] == 512
        if v.endswith("noop"):
            # nothing to train: the held-out error of leaving the sub-block out, before and after
            assert m["initial_nmse"] == m["final_nmse"] > 0 and m["tokens_seen"] == 0
            assert lib.load_block(layer, v) == {}
        else:
            assert m["kept"] == "trained"
            assert m["final_nmse"] == m["trained_nmse"] < m["initial_nmse"], (layer, v, m)
            assert m["steps"] == 40 and m["tokens_seen"] == 40 * 8 * 32
            assert [s for s, _ in m["loss_curve"]] == list(range(1, 41))
            assert m["seconds"] > 0 and m["tokens_per_second"] > 0
    # the checkpoints of finished units are gone
    assert lib.store.list("checkpoints") == []
    # metrics per unit, labelled by layer and variant
    prom = open_store(uri).get_text("metrics/bld-bld.l000-002.prom")
    for name in ("puzzle_bld_loss", "puzzle_bld_tokens_per_second", "puzzle_bld_seconds"):
        assert f'{name}{{layer="1",' in prom and 'variant="attn_g4"' in prom


def test_applied_block_reproduces_its_recorded_nmse_in_the_model(trained, parent_dir):
    """The weights' names and the norm travel correctly: swapped into the parent with Library.apply, the
    sub-block's held-out error is the one bld measured."""
    root, uri = trained
    lib = library(uri, root, parent_dir)
    store = open_store(uri)
    ids = sequences(load_tokens(store, "validation")[:512], 32)  # (16, 32)
    parent = load_parent(parent_dir)
    for layer, v, kind in ((1, "attn_g4", "attention"), (0, "ffn_m0.5", "ffn"), (1, "attn_linear", "attention")):
        child = load_parent(parent_dir)
        lib.apply(child, layer, v)
        with torch.no_grad():
            h = parent.run_layers(parent.embed(ids), 0, layer)  # (B, T, C) input of the layer
            if kind == "attention":
                t, y = parent.attn_sublayer(layer, h), child.attn_sublayer(layer, h)
            else:
                h = parent.attn_sublayer(layer, h)
                t, y = parent.ffn_sublayer(layer, h), child.ffn_sublayer(layer, h)
        assert normalized_mse(y, t) == pytest.approx(lib.meta(layer, v)["final_nmse"], rel=1e-4)


def test_second_run_reuses_the_library(trained, parent_dir):
    root, uri = trained
    before = library(uri, root, parent_dir).meta(0, "attn_g4")
    uri2 = make_run(root, parent_dir, run_id="run-again", **BLD)
    assert step(uri2, unit("attn_g4")) == 0
    lib2 = library(uri2, root, parent_dir)
    assert lib2.digest == library(uri, root, parent_dir).digest
    assert lib2.meta(0, "attn_g4") == before  # not retrained: the very same entry
    store2 = open_store(uri2)
    assert store2.exists(done_key("bld", "bld.l000-002"))
    prom = store2.get_text("metrics/bld-bld.l000-002.prom")
    assert 'puzzle_bld_reused{layer="0",' in prom and "} 1.0" in prom.split("puzzle_bld_reused{")[1]


def _weights(lib: Library) -> dict[str, torch.Tensor]:
    return {f"{layer}/{k}": t for layer in (0, 1) for k, t in lib.load_block(layer, "ffn_m0.5").items()}


def test_a_block_does_not_depend_on_its_stage_or_on_streaming(trained, tmp_path, parent_dir):
    """attn_g4 at layer 1 trained alone (a stage of layer 1 only, the parent's layer 0 streamed from its
    file) equals the one trained beside every other block in the two-layer stage (parent resident)."""
    root, uri = trained
    uri2 = make_run(tmp_path, parent_dir, **BLD)
    assert step(uri2, unit("attn_g4", (1, 2), resident_layers=[])) == 0
    a, b = library(uri, root, parent_dir), library(uri2, tmp_path, parent_dir)
    wa, wb = a.load_block(1, "attn_g4"), b.load_block(1, "attn_g4")
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6, msg=k)
    assert b.meta(1, "attn_g4")["final_nmse"] == pytest.approx(a.meta(1, "attn_g4")["final_nmse"], rel=1e-5)


def _weights(lib: Library) -> dict[str, torch.Tensor]:
    return {f"{layer}/{k}": t for layer in (0, 1) for k, t in lib.load_block(layer, "ffn_m0.5").items()}


def test_killed_unit_resumes_to_the_same_weights(tmp_path, parent_dir):
    cfg = {**BLD, "tokens": 8 * 32 * 16, "checkpoint_every": 5}
    u = unit(["ffn_m0.5", "attn_g4"])
    # uninterrupted
    uri_a = make_run(tmp_path / "a", parent_dir, **cfg)
    assert step(uri_a, u) == 0
    lib_a = Library.for_run(open_store(uri_a), parse_config(make_config(tmp_path / "a", parent_dir, **cfg)))
    # killed (SIGKILL, as a preempted pod) after step 7: the last checkpoint is step 5
    uri_b = make_run(tmp_path / "b", parent_dir, **cfg)
    env = {**os.environ, KILL_ENV: "7", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "puzzle.cli", "step", "bld", "--run", uri_b, "--unit",
                           json.dumps(u)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    lib_b = Library.for_run(open_store(uri_b), parse_config(make_config(tmp_path / "b", parent_dir, **cfg)))
    assert lib_b.digest == lib_a.digest
    state = lib_b.checkpoints(u["id"]).get_json("state.json")
    assert state["step"] == 5 and not lib_b.has(0, "ffn_m0.5")
    # the retry resumes from step 5 and ends where the uninterrupted run ended
    assert step(uri_b, u) == 0
    wa, wb = _weights(lib_a), _weights(lib_b)
    assert wa.keys() == wb.keys() and len(wa) == 2 * 4
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)
    for layer in (0, 1):
        ma, mb = lib_a.meta(layer, "ffn_m0.5"), lib_b.meta(layer, "ffn_m0.5")
        assert mb["initial_nmse"] == ma["initial_nmse"]
        assert mb["final_nmse"] == pytest.approx(ma["final_nmse"], abs=1e-6)
        assert [s for s, _ in mb["loss_curve"]] == list(range(1, 17))
        for (_, la), (_, lb) in zip(ma["loss_curve"], mb["loss_curve"], strict=True):
            assert lb == pytest.approx(la, abs=1e-6)


def test_an_unreadable_checkpoint_is_discarded_and_the_unit_starts_over(tmp_path, parent_dir):
    """RELIABILITY.md's known gap: a checkpoint whose tensors were lost made every retry fail; now the unit
    starts over (and ends as an uninterrupted run would)."""
    cfg = {**BLD, "tokens": 8 * 32 * 10, "checkpoint_every": 5}
    u = unit("ffn_m0.5")
    uri_a = make_run(tmp_path / "a", parent_dir, **cfg)
    assert step(uri_a, u) == 0
    uri_b = make_run(tmp_path / "b", parent_dir, **cfg)
    env = {**os.environ, KILL_ENV: "6", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "puzzle.cli", "step", "bld", "--run", uri_b, "--unit",
                           json.dumps(u)], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL
    lib_b = Library.for_run(open_store(uri_b), parse_config(make_config(tmp_path / "b", parent_dir, **cfg)))
    ckpt = lib_b.checkpoints(u["id"])
    for k in ckpt.list():
        if k.endswith(".safetensors"):
            ckpt.delete(k)  # the tensors are gone; state.json still names them
    assert step(uri_b, u) == 0
    lib_a = Library.for_run(open_store(uri_a), parse_config(make_config(tmp_path / "a", parent_dir, **cfg)))
    wa, wb = _weights(lib_a), _weights(lib_b)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-6)


def test_coupled_mode_trains_whole_blocks(tmp_path, parent_dir):
    cfg = {**BLD, "mode": "coupled", "tokens": 8 * 32 * 30}
    uri = make_run(tmp_path, parent_dir, **cfg)
    assert step(uri, unit("attn_g4+ffn_m0.5", (1, 2))) == 0
    lib = Library.for_run(open_store(uri), parse_config(make_config(tmp_path, parent_dir, **cfg)))
    m = lib.meta(1, "attn_g4+ffn_m0.5")
    assert m["final_nmse"] < m["initial_nmse"] and m["mode"] == "coupled"
    sd = lib.load_block(1, "attn_g4+ffn_m0.5")
    assert {"input_layernorm.weight", "self_attn.k_proj.weight", "post_attention_layernorm.weight",
            "mlp.down_proj.weight"} <= set(sd)
    child = load_parent(parent_dir)
    lib.apply(child, 1, "attn_g4+ffn_m0.5")
    assert child.block_configs[1].name == "attn_g4+ffn_m0.5"


def test_a_block_that_training_made_worse_keeps_its_initialization(tmp_path, parent_dir):
    """lr 1.0 wrecks the trained weights; the library then holds the (better) initialized block."""
    cfg = {**BLD, "lr": 1.0, "tokens": 8 * 32 * 6}
    uri = make_run(tmp_path, parent_dir, **cfg)
    assert step(uri, unit("ffn_m1.0", (1, 2))) == 0
    lib = Library.for_run(open_store(uri), parse_config(make_config(tmp_path, parent_dir, **cfg)))
    m = lib.meta(1, "ffn_m1.0")
    assert m["kept"] == "initial" and m["trained_nmse"] > m["initial_nmse"] == m["final_nmse"]
    # the stored weights are the initialization: swapped in, they reproduce the initial error
    ids = sequences(load_tokens(open_store(uri), "validation")[:512], 32)
    parent, child = load_parent(parent_dir), load_parent(parent_dir)
    lib.apply(child, 1, "ffn_m1.0")
    with torch.no_grad():
        h = parent.attn_sublayer(1, parent.run_layers(parent.embed(ids), 0, 1))
        y, t = child.ffn_sublayer(1, h), parent.ffn_sublayer(1, h)
    assert normalized_mse(y, t) == pytest.approx(m["initial_nmse"], rel=1e-4)


@pytest.mark.parametrize(
    ("u", "message"),
    [
        (unit("attn_g3"), "n_heads_in_group 3 does not divide the parent's 4 attention heads"),
        (unit("attn_bogus"), "'attn_bogus' is not allowed"),
        (unit("attn_g4", (1, 3)), r"layers: \[1, 3\] is outside the parent, which has 2 layers"),
        (unit("attn_g4+ffn_m0.5"), "is a block variant, which bld.mode 'decoupled' does not train"),
        (unit([]), r"blocks: \[\] is not allowed"),
        ({"id": "x", "blocks": ["ffn_noop"]}, "field 'layers' is missing"),
        (unit("attn_g4", resident_layers=[5]), r"resident_layers: \[5\] is not allowed"),
    ],
)
def test_bad_units_fail_at_once_with_exit_2(tmp_path, parent_dir, capsys, u, message):
    uri = make_run(tmp_path, parent_dir, **BLD)
    assert step(uri, u) == 2
    err = capsys.readouterr().err
    assert f"unit {u['id']}" in err
    assert re.search(message, err), err
    assert not open_store(uri).exists(done_key("bld", u["id"]))


def test_out_of_memory_names_the_unit_and_the_batch_size(tmp_path, parent_dir, monkeypatch, capsys):
    """CUDA cannot run here, so the trainer's step raises the out-of-memory error a GPU would (a mock)."""
    from puzzle.distill.bld import StageTrainer

    def oom(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(StageTrainer, "train", oom)
    uri = make_run(tmp_path, parent_dir, **BLD)
    assert step(uri, unit("attn_g4")) == 1
    err = capsys.readouterr().err
    assert "bld unit bld.l000-002: CUDA out of memory with bld.batch_size=8" in err
    assert "lower bld.batch_size (e.g. to 4)" in err


def test_learning_rate_warms_up_then_decays_to_zero():
    sched = Schedule.from_fraction(100, 1.0, 0.1)
    lrs = [sched.lr(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] < 0.001 and sched.lr(100) == 0.0
    assert Schedule.from_fraction(10, 2.0, 0.0).lr(0) == 2.0

"""assemble: a child built from a small random parent and a hand-made block library loads and generates;
GKD lowers its KL to the parent; a half-written child is replaced; bad units and vLLM-unservable
children are refused.

``make_run`` (shared with test_evaluate, test_report and test_fetch) builds a run the way the
pipeline does up to solve: prepare runs for real; the library holds blocks initialized from the
parent by ``puzzle.model.init_*`` (what BLD starts from; training them is bld's test, not ours);
plan/assemble.json is written as solve writes it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from puzzle.config import load_config_text
from puzzle.context import run_step
from puzzle.data.shards import load_tokens, sequences
from puzzle.errors import UnitError
from puzzle.layout import done_key
from puzzle.library import Library
from puzzle.model import (
    AttentionVariant,
    FFNVariant,
    init_attention,
    init_ffn,
    load_parent,
    load_pretrained,
)
from puzzle.run import create_run
from puzzle.store import open_store
from tinymodels import make_parent, write_text

torch.set_num_threads(1)

# parent: 8 heads, 4 kv heads (attn_g2), intermediate 160 (ffn_i160); ffn_m0.5 of hidden 64 is 48
SOLUTION = [{"attention": "attn_g4", "ffn": "ffn_m0.5"}, {"attention": "attn_linear", "ffn": "ffn_i160"}]
UNIFORM = [{"attention": "attn_g2", "ffn": "ffn_m0.5"}, {"attention": "attn_g2", "ffn": "ffn_m0.5"}]
DROP = [{"attention": "attn_g2", "ffn": "ffn_i160"}, {"attention": "attn_noop", "ffn": "ffn_noop"}]
PARENT = [{"attention": "attn_g2", "ffn": "ffn_i160"}] * 2


def units(predicted: dict | None = None) -> list[dict]:
    pred = predicted or {"cpu": {"tokens_per_s": 100.0, "prefill_s": 0.01, "decode_s": 0.1,
                                 "memory_bytes": 1000, "speedup": 1.0, "estimate": False}}
    return [
        {"id": "parent", "kind": "parent", "block_configs": PARENT, "predicted": pred},
        {"id": "sol-0", "kind": "puzzle", "block_configs": SOLUTION, "predicted": pred},
        {"id": "baseline-uniform-ffn", "kind": "uniform_ffn", "block_configs": UNIFORM, "predicted": pred},
        {"id": "baseline-layer-drop", "kind": "layer_drop", "block_configs": DROP, "predicted": pred},
    ]


def config_text(tmp_path, parent, train, valid, *, gkd: bool = False, gkd_tokens: int = 2048,
                serving: str = "any", extra: str = "") -> str:
    return f"""
name: t
seed: 0
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32, shard_tokens: 4096}}
search_space:
  attention: {{n_heads_in_group: [2, 4], replace_with_linear: {str(serving == 'any').lower()}}}
  ffn: {{ffn_mult: [0.5], replace_with_linear: {str(serving == 'any').lower()}}}
  serving: {serving}
bld: {{stage_layers: 2}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}], warmup: 0, repeats: 1}}
assemble: {{gkd: {{enabled: {str(gkd).lower()}, tokens: {gkd_tokens}, batch_size: 4, lr: 0.003}}}}
eval: {{tokens: 256, task_examples: 4, measure_throughput: false}}
store: {{uri: "file://{tmp_path}/runs"}}
{extra}
"""


def fill_library(run: str, cfg, parent_dir) -> Library:
    """Blocks for every non-parent, non-no_op variant the test units use, initialized from the parent."""
    store = open_store(run)
    lib = Library.for_run(store, cfg, parent_dir)
    parent = load_parent(parent_dir)
    ids = sequences(load_tokens(store, "distillation"), 32)[:4]
    with torch.no_grad():
        _, hidden = parent(ids, output_hidden_states=True)
    for layer in range(len(parent.model.layers)):
        h = hidden[layer]  # (B, T, C) input of the layer
        h_mid = parent.attn_sublayer(layer, h)  # input of the FFN sub-block
        for name, variant in (("attn_g4", AttentionVariant.gqa(4)), ("attn_linear", AttentionVariant.linear())):
            work = load_parent(parent_dir)
            work.set_attention(layer, variant, init_attention(variant, parent, layer, h))
            lib.save_block(layer, name, work.model.layers[layer].sublayer_state_dict("attention"),
                           {"loss_curve": [[1, 0.5], [2, 0.3], [3, 0.2]], "initial_nmse": 0.5, "final_nmse": 0.2})
        for name, variant in (("ffn_m0.5", FFNVariant.from_mult(0.5, 64)), ("ffn_linear", FFNVariant.linear())):
            work = load_parent(parent_dir)
            work.set_ffn(layer, variant, init_ffn(variant, parent, layer, h_mid))
            lib.save_block(layer, name, work.model.layers[layer].sublayer_state_dict("ffn"),
                           {"loss_curve": [[1, 0.4], [2, 0.25], [3, 0.1]], "initial_nmse": 0.4, "final_nmse": 0.1})
    return lib


def make_run(tmp_path, *, gkd: bool = False, gkd_tokens: int = 2048, serving: str = "any", extra: str = "",
             unit_list: list[dict] | None = None) -> str:
    """A run with data, a library and plan/assemble.json: everything assemble needs."""
    parent = make_parent(tmp_path / "parent")
    train = write_text(tmp_path / "train.txt", 300, seed=1)
    valid = write_text(tmp_path / "valid.txt", 120, seed=2)
    text = config_text(tmp_path, parent, train, valid, gkd=gkd, gkd_tokens=gkd_tokens, serving=serving, extra=extra)
    cfg = load_config_text(text)
    run = create_run(cfg, text)
    assert run_step("prepare", run, {"id": "all"})
    fill_library(run, cfg, parent)
    open_store(run).put_json("plan/assemble.json", unit_list if unit_list is not None else units())
    return run


def unit(run: str, uid: str) -> dict:
    return next(u for u in open_store(run).get_json("plan/assemble.json") if u["id"] == uid)


def test_assemble_builds_a_child_that_loads_and_generates(tmp_path):
    run = make_run(tmp_path)
    assert run_step("assemble", run, unit(run, "sol-0"))
    store = open_store(run)
    rec = store.get_json("child/sol-0/complete.json")
    assert rec["block_configs"] == SOLUTION and rec["gkd"] == {"enabled": False}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(rec["files"])
    dest = tmp_path / "sol-0"
    store.download_dir("child/sol-0", dest)
    cfg = json.loads((dest / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas" and cfg["architectures"] == ["DeciLMForCausalLM"]
    assert cfg["block_configs"][0]["attention"]["n_heads_in_group"] == 4
    assert cfg["block_configs"][1]["attention"]["replace_with_linear"] is True
    child = load_pretrained(dest)
    assert [b.name for b in child.block_configs] == ["attn_g4+ffn_m0.5", "attn_linear+ffn_i160"]
    # the library's weights, not fresh ones: layer 0's attention equals the library entry
    lib = Library.for_run(store, load_config_text(store.get_text("config.yaml")))
    want = lib.load_block(0, "attn_g4")
    got = child.model.layers[0].sublayer_state_dict("attention")
    assert all(torch.equal(want[k], got[k]) for k in want)
    # and the parent's own FFN at layer 1 is the parent's weights
    parent = load_parent(tmp_path / "parent")
    assert torch.equal(child.model.layers[1].mlp.down_proj.weight, parent.model.layers[1].mlp.down_proj.weight)
    out = child.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)
    assert out.shape == (1, 7) and torch.equal(out[:, :3], torch.tensor([[5, 6, 7]]))


def test_layer_drop_and_parent_units(tmp_path):
    run = make_run(tmp_path)
    for uid in ("parent", "baseline-layer-drop"):
        assert run_step("assemble", run, unit(run, uid))
    store = open_store(run)
    parent = load_parent(tmp_path / "parent")
    p_child = tmp_path / "p"
    store.download_dir("child/parent", p_child)
    same = load_pretrained(p_child)
    ids = torch.randint(0, 40, (2, 12))
    with torch.no_grad():
        assert torch.allclose(same(ids), parent(ids), atol=1e-6), "the parent unit must be the parent itself"
    d = tmp_path / "d"
    store.download_dir("child/baseline-layer-drop", d)
    dropped = load_pretrained(d)
    assert dropped.model.layers[1].self_attn is None and dropped.model.layers[1].mlp is None
    with torch.no_grad():
        _, hid = parent(ids, output_hidden_states=True)
        # a dropped last layer: the child's output is the parent's head on layer 0's output
        assert torch.allclose(dropped(ids), parent.head(hid[1]), atol=1e-5)


def test_gkd_lowers_kl_to_the_parent_and_is_deterministic(tmp_path):
    run = make_run(tmp_path, gkd=True, gkd_tokens=4096)
    store = open_store(run)
    assert run_step("assemble", run, unit(run, "sol-0"))
    gkd = store.get_json("child/sol-0/complete.json")["gkd"]
    assert gkd["enabled"] and gkd["steps"] == math.ceil(4096 / (4 * 32))
    assert gkd["final_kl"] < 0.8 * gkd["initial_kl"], gkd
    assert len(gkd["curve"]) == gkd["steps"] and gkd["curve"][-1]["loss"] < gkd["curve"][0]["loss"]
    prom = store.get_text("metrics/assemble-sol-0.prom")
    assert "puzzle_gkd_loss{" in prom and 'when="after"' in prom
    # the parent unit gets no GKD even when it is enabled
    run_step("assemble", run, unit(run, "parent"))
    assert store.get_json("child/parent/complete.json")["gkd"] == {"enabled": False}
    # same unit again (forced): byte-identical weights
    first = store.get_json("child/sol-0/complete.json")["files"]["model.safetensors"]["sha256"]
    run_step("assemble", run, unit(run, "sol-0"), force=True)
    assert store.get_json("child/sol-0/complete.json")["files"]["model.safetensors"]["sha256"] == first


def test_retry_replaces_a_half_written_child(tmp_path):
    run = make_run(tmp_path)
    store = open_store(run)
    # what a pod killed mid-upload leaves: some files, no complete.json, no done marker
    store.put_bytes("child/sol-0/model.safetensors", b"truncated")
    store.put_bytes("child/sol-0/stale-shard.safetensors", b"from an earlier attempt")
    assert run_step("assemble", run, unit(run, "sol-0"))
    assert not store.exists("child/sol-0/stale-shard.safetensors")
    assert store.exists(done_key("assemble", "sol-0"))
    load_pretrained(store.root / "child" / "sol-0")


def test_bad_units_are_refused_with_the_field(tmp_path):
    run = make_run(tmp_path)
    with pytest.raises(UnitError, match=r"block_configs: 1 entries .* 2 layers"):
        run_step("assemble", run, {"id": "x", "kind": "puzzle", "block_configs": SOLUTION[:1]})
    with pytest.raises(UnitError, match=r"block_configs\[1\]: attention variant name 'attn_g3x'"):
        run_step("assemble", run, {"id": "x", "kind": "puzzle",
                                   "block_configs": [SOLUTION[0], {"attention": "attn_g3x", "ffn": "ffn_noop"}]})
    with pytest.raises(UnitError, match=r"kind: 'mystery'"):
        run_step("assemble", run, {"id": "x", "kind": "mystery", "block_configs": SOLUTION})
    with pytest.raises(UnitError, match=r"no block for layer 0, variant 'ffn_m2.0'"):
        run_step("assemble", run, {"id": "x", "kind": "puzzle",
                                   "block_configs": [{"attention": "attn_g2", "ffn": "ffn_m2.0"}, PARENT[1]]})


def test_a_unit_the_serving_engines_cannot_load_is_an_error(tmp_path):
    # llama.cpp has linear attention but no linear FFN (puzzle.serving); this parent's head size (8) is
    # none vLLM or TensorRT-LLM runs, so llama.cpp is the engine a refused unit can be planned for here
    run = make_run(tmp_path, serving="llamacpp")
    sol = [{"attention": "attn_linear", "ffn": "ffn_i160"}, {"attention": "attn_g2", "ffn": "ffn_linear"}]
    bad = {"id": "sol-0", "kind": "puzzle", "block_configs": sol, "predicted": units()[1]["predicted"]}
    with pytest.raises(UnitError, match=r"search_space\.serving: \['llamacpp'\] cannot load unit sol-0: "
                                         r"block_configs\[1\]\.ffn\.replace_with_linear: value true breaks llamacpp's rule"):
        run_step("assemble", run, bad)
    assert not open_store(run).exists("child/sol-0/complete.json")


def test_a_parent_changed_mid_run_is_refused(tmp_path):
    run = make_run(tmp_path)
    assert run_step("assemble", run, unit(run, "parent"))
    # the parent directory rewritten after bld (a retrained parent): blocks and parent no longer belong together
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(str(tmp_path / "parent"))
    with torch.no_grad():
        m.model.norm.weight.mul_(2)
    m.save_pretrained(tmp_path / "parent", safe_serialization=True)
    with pytest.raises(UnitError, match=r"parent.uri: the weights in .* changed since this run's blocks"):
        run_step("assemble", run, unit(run, "sol-0"))
    with pytest.raises(UnitError, match=r"changed since this run's blocks"):
        run_step("evaluate", run, unit(run, "parent"))

"""prepare: shards and plans from a small random parent in a file:// run."""

from __future__ import annotations

import json

import pytest
from puzzle.config import ConfigError, load_config_text
from puzzle.context import run_step
from puzzle.data.shards import batch_indices, load_tokens, sequences
from puzzle.layout import done_key
from puzzle.run import create_run
from puzzle.store import open_store
from tinymodels import make_parent, write_text


def _config(tmp_path, **over):
    parent = make_parent(tmp_path / "parent")
    train = write_text(tmp_path / "train.txt", 300, seed=1)
    valid = write_text(tmp_path / "valid.txt", 100, seed=2)
    text = f"""
name: t
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32, shard_tokens: 2048}}
search_space:
  attention: {{n_heads_in_group: {over.get('groups', [2, 4, 8])}}}
  ffn: {{ffn_mult: [0.5, 1.0]}}
bld: {{mode: {over.get('mode', 'decoupled')}, stage_layers: 1}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}]}}
store: {{uri: "file://{tmp_path}/runs"}}
"""
    return load_config_text(text), text


def test_prepare_writes_shards_and_plans(tmp_path):
    cfg, text = _config(tmp_path)
    run = create_run(cfg, text)
    assert run_step("prepare", run, {"id": "all"})
    store = open_store(run)
    assert store.exists(done_key("prepare", "all"))
    toks = load_tokens(store, "distillation")
    man = store.get_json("data/distillation/manifest.json")
    assert man["tokens"] == len(toks) > 2048 and len(man["shards"]) >= 2
    assert int(toks.max()) < 64 and int(toks.min()) >= 0
    seqs = sequences(toks, 32)
    b1 = [next(batch_indices(len(seqs), 4, seed=0, start_step=k)).tolist() for k in range(5)]
    it = batch_indices(len(seqs), 4, seed=0)
    b2 = [next(it).tolist() for _ in range(5)]
    assert b1 == b2, "resuming at step k must give the batches an uninterrupted run sees"

    variants = store.get_json("plan/variants.json")
    # parent: 8 heads / 4 kv heads = attn_g2; its FFN is ffn_i160
    assert variants["attention"][0] == "attn_g2" and variants["ffn"][0] == "ffn_i160"
    bld = store.get_json("plan/bld.json")
    # one stage per layer (bld.stage_layers: 1), each training every non-parent variant there
    assert [u["layers"] for u in bld] == [[0, 1], [1, 2]]
    for u in bld:
        assert "attn_g2" not in u["blocks"] and "ffn_i160" not in u["blocks"]
        assert {"attn_g4", "attn_g8", "attn_linear", "attn_noop", "ffn_linear", "ffn_noop"} <= set(u["blocks"])
    assert len({u["id"] for u in bld}) == len(bld)
    cost = store.get_json("plan/cost.json")
    assert [r["step"] for r in cost["steps"]][:2] == ["prepare", "bld"] and cost["estimate"] is True
    assert cost["steps"][1]["units"] == 2 and cost["steps"][1]["gpu_hours"] > 0
    prof = store.get_json("plan/profile.json")
    # a CPU scenario is one unit that measures every variant in turns (see puzzle.steps.profile)
    assert [u["id"] for u in prof] == [u["scenario"] for u in prof] and all(u["kind"] == "scenario" for u in prof)
    for u in prof:
        assert [v["variant"] for v in u["variants"]] == variants["attention"] + variants["ffn"] + ["non_block"]
    assert store.get_json("plan/score.json") == [{"id": "score.l000-002", "layers": [0, 2]}]
    # a second run of the same unit is skipped by its done marker
    assert not run_step("prepare", run, {"id": "all"})


def test_prepare_writes_argo_outputs(tmp_path):
    cfg, text = _config(tmp_path, mode="coupled")
    run = create_run(cfg, text)
    out = tmp_path / "outputs"
    run_step("prepare", run, {"id": "all"}, outputs_dir=out)
    bld = json.loads((out / "bld.json").read_text())
    assert bld and all(all("+" in b for b in u["blocks"]) for u in bld)
    assert json.loads((out / "score.json").read_text()) == open_store(run).get_json("plan/score.json")


def test_prepare_rejects_impossible_search_space(tmp_path):
    cfg, text = _config(tmp_path, groups=[3])
    run = create_run(cfg, text)
    with pytest.raises(ConfigError, match=r"n_heads_in_group.*\[3\].*allowed: \[1, 2, 4, 8\]"):
        run_step("prepare", run, {"id": "all"})
    assert not open_store(run).exists("plan/bld.json"), "nothing a later step could mistake for a result"

"""score and solve: replace_one_block_scores on a small random parent with a freshly trained library,
then the MIP over those scores and the profiled costs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from puzzle.config import load_config_text
from puzzle.context import run_step
from puzzle.data.shards import load_tokens, sequences
from puzzle.errors import BadInputError, UnitError
from puzzle.library import Library
from puzzle.model import load_parent
from puzzle.run import create_run
from puzzle.store import open_store
from tinymodels import make_parent, write_text


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("score")
    parent = make_parent(tmp / "parent")
    train, valid = write_text(tmp / "train.txt", 300, 1), write_text(tmp / "valid.txt", 100, 2)
    text = f"""
name: t
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32}}
search_space:
  attention: {{n_heads_in_group: [4]}}
  ffn: {{ffn_mult: [0.5]}}
bld: {{stage_layers: 2, tokens: 1024, batch_size: 4, eval_tokens: 256, calibration_tokens: 256}}
score: {{tokens: 320, batch_size: 4, layers_per_unit: 1}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}], repeats: 3, warmup: 1}}
solve: {{throughput: [{{scenario: cpu, min_speedup: 1.2}}], num_solutions: 3, min_hamming_distance: 2, pareto_points: 4}}
store: {{uri: "file://{tmp}/runs"}}
"""
    cfg = load_config_text(text)
    run = create_run(cfg, text)
    run_step("prepare", run, {"id": "all"})
    store = open_store(run)
    for u in store.get_json("plan/bld.json"):
        run_step("bld", run, u)
    for u in store.get_json("plan/score.json"):
        run_step("score", run, u)
    for u in store.get_json("plan/profile.json"):
        run_step("profile", run, u)
    return run, store, cfg, parent


def test_every_layer_and_variant_is_scored(scored_run):
    _, store, _, _ = scored_run
    variants = store.get_json("plan/variants.json")
    for layer in range(2):
        for v in variants["attention"] + variants["ffn"]:
            rec = store.get_json(f"scores/{layer:03d}/{v}.json")
            assert rec["tokens"] == 320 and rec["variant"] == v
            if v in ("attn_g2", "ffn_i160"):  # the parent's own blocks
                assert rec["parent_variant"] and rec["kl"] == 0.0
            else:
                assert rec["kl"] > 0 and rec["cosine_distance"] > 0
        sim = store.get_json(f"scores/similarity/{layer:03d}.json")["cosine_similarity"]
        assert -1 <= sim <= 1
    # removing attention outright must cost more than a trained 2x GQA reduction
    assert store.get_json("scores/001/attn_noop.json")["kl"] > store.get_json("scores/001/attn_g4.json")["kl"]


def test_score_equals_a_full_forward_of_the_swapped_model(scored_run):
    """The cached-prefix computation must give exactly what a whole child model gives."""
    _run, store, cfg, parent_dir = scored_run
    parent = load_parent(parent_dir).eval()
    child = load_parent(parent_dir).eval()
    Library.for_run(store, cfg).apply(child, 1, "attn_linear")
    ids = sequences(load_tokens(store, "validation"), 32)[:10]
    with torch.no_grad():
        lp = F.log_softmax(parent(ids).float(), -1)
        lc = F.log_softmax(child(ids).float(), -1)
    kl = F.kl_div(lc, lp, log_target=True, reduction="sum").item() / ids.numel()
    assert store.get_json("scores/001/attn_linear.json")["kl"] == pytest.approx(kl, rel=1e-4)


def test_unit_outside_the_parent_is_refused(scored_run):
    run, *_ = scored_run
    with pytest.raises(UnitError, match=r"layers: \[1, 5\]"):
        run_step("score", run, {"id": "bad", "layers": [1, 5]})


def _selection(rec):
    return [(i, slot, b[slot]) for i, b in enumerate(rec["block_configs"]) for slot in ("attention", "ffn")]


def test_solve_returns_optimal_diverse_constraint_respecting_children(scored_run):
    run, store, _, _ = scored_run
    run_step("solve", run, {"id": "all"}, force=True)
    sols = store.get_json("solve/solutions.json")
    assert 1 <= len(sols) <= 3
    for rec in sols:
        assert rec["status"] == "optimal"
        assert rec["predicted"]["cpu"]["speedup"] >= 1.2 - 1e-9
        # the objective is the summed replace-1-block KL of the chosen blocks
        kl = sum(store.get_json(f"scores/{layer:03d}/{v}.json")["kl"] for layer, _, v in _selection(rec))
        assert rec["objective"] == pytest.approx(kl, rel=1e-6, abs=1e-12)
    for i in range(len(sols)):
        for j in range(i):
            diff = sum(a != b for a, b in zip(_selection(sols[i]), _selection(sols[j])))
            assert diff >= 2
    pareto = store.get_json("solve/pareto.json")
    assert len(pareto) == 4
    objs = [p["objective"] for p in pareto]
    assert objs == sorted(objs), "a faster target can never cost less degradation"
    units = store.get_json("plan/assemble.json")
    ids = [u["id"] for u in units]
    assert ids[0] == "parent" and ids[1] == "sol-0"
    # each baseline family brackets the child's predicted throughput: one setting below it, one at or above
    target = sols[0]["predicted"]["cpu"]["tokens_per_s"]
    for kind in ("uniform_ffn", "layer_drop"):
        family = [u for u in units if u["kind"] == kind]
        assert 1 <= len(family) <= 2 and all(u["description"] for u in family)
        speeds = sorted(u["predicted"]["cpu"]["tokens_per_s"] for u in family)
        if len(family) == 2:
            assert speeds[0] < target <= speeds[1]
    drops = [u for u in units if u["kind"] == "layer_drop"]
    assert all(any(b == {"attention": "attn_noop", "ffn": "ffn_noop"} for b in u["block_configs"]) for u in drops)
    assert [u["id"] for u in drops] == sorted(u["id"] for u in drops) and all(u["id"].startswith("baseline-drop-")
                                                                              for u in drops)


def test_infeasible_throughput_names_the_best_achievable(scored_run, tmp_path):
    run, store, _, _ = scored_run
    text = store.get_text("config.yaml").replace("min_speedup: 1.2", "min_speedup: 1000")
    from puzzle.store import open_store as _open

    bad = run.rsplit("/", 1)[0] + "/infeasible-run"
    other = _open(bad)
    for key in store.list():
        if not key.startswith(("done/", "metrics/", "solve/", "plan/assemble")):
            other.put_bytes(key, store.get_bytes(key))
    other.put_text("config.yaml", text)
    with pytest.raises(BadInputError, match=r"speedup over the parent on cpu >= 1000.*infeasible; the best child .* reaches [0-9.]+x"):
        run_step("solve", bad, {"id": "all"})
    assert not other.exists("plan/assemble.json")


def test_task_accuracy_drop_matches_an_independently_built_child(tmp_path):
    """score.task_examples: the drop equals parent accuracy minus that of a child built by hand."""
    from pathlib import Path

    from puzzle.evaluation import task_accuracy
    from puzzle.generation import DeciTextGenerator
    from puzzle.model import AttentionVariant

    repo = Path(__file__).resolve().parents[1]
    parent = repo / "examples/tiny/parent"
    text = f"""
name: t
parent: {{uri: {parent}}}
data: {{distillation_uri: {repo}/examples/tiny/data/valid.txt, validation_uri: {repo}/examples/tiny/data/valid.txt,
        seq_len: 64, distillation_tokens: 4096, validation_tokens: 4096}}
search_space:
  attention: {{n_heads_in_group: [2], replace_with_linear: false}}
  ffn: {{ffn_mult: [], replace_with_linear: false}}
bld: {{stage_layers: 6, tokens: 64, batch_size: 1, eval_tokens: 64, calibration_tokens: 64}}
score: {{tokens: 128, batch_size: 8, layers_per_unit: 1, task_examples: 8, metric: task_accuracy}}
profile: {{scenarios: [{{name: cpu, batch_size: 1, input_len: 8, output_len: 8}}]}}
store: {{uri: "file://{tmp_path}/runs"}}
"""
    cfg = load_config_text(text)
    run = create_run(cfg, text)
    run_step("prepare", run, {"id": "all"})
    store = open_store(run)
    for u in store.get_json("plan/bld.json"):  # no-op blocks only: nothing to train
        run_step("bld", run, u)
    run_step("score", run, {"id": "s5", "layers": [5, 6]})
    model = load_parent(parent).eval()
    gen = DeciTextGenerator(model, parent, batch_size=8)
    base = task_accuracy(gen, 8, seed=0)["accuracy"]
    only_attn = load_parent(parent).eval()
    only_attn.set_attention(5, AttentionVariant.noop(), None)
    got = task_accuracy(DeciTextGenerator(only_attn, parent, batch_size=8), 8, seed=0)["accuracy"]
    rec = store.get_json("scores/005/attn_noop.json")
    assert rec["task_accuracy_drop"] == pytest.approx(base - got)
    assert store.get_json("scores/005/attn_g2.json")["task_accuracy_drop"] == 0.0

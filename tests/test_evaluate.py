"""evaluate: figures of the parent unit and of a child on the same data; the project's generator agrees
with transformers' greedy generation; lm-evaluation-harness runs a local JSON task through its Python
API and scores multiple choice as a hand computation does; an incomplete child is refused."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from puzzle.config import ConfigError
from puzzle.context import run_step
from puzzle.errors import UnitError
from puzzle.evaluation import compare_to_parent, lm_eval_results, load_task_spec
from puzzle.generation import DeciTextGenerator
from puzzle.model import load_parent
from puzzle.store import open_store
from test_assemble import make_run, unit

torch.set_num_threads(1)

@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    run = make_run(tmp)
    store = open_store(run)
    # measure throughput on the CPU scenario and run a small ICL benchmark, as a user's config would
    text = store.get_text("config.yaml").replace(
        "eval: {tokens: 256, task_examples: 4, measure_throughput: false}",
        "eval: {tokens: 256, task_examples: 4, measure_throughput: true, throughput_repeats: 3, icl: {enabled: true, "
        "methods: [random, topk, cover_ls], num_demonstrations: 2, num_test: 2, num_beams: 2}}",
    )
    # two rounds of pairs: the second with fresh copies of both models, as on any CPU with profile.rebuilds
    text = text.replace("warmup: 0, repeats: 1}", "warmup: 0, repeats: 1, rebuilds: 2}")
    store.put_text("config.yaml", text)
    for uid in ("parent", "sol-0"):
        run_step("assemble", run, unit(run, uid))
        assert run_step("evaluate", run, unit(run, uid))
    return run, tmp


def test_evaluate_writes_every_figure(evaluated):
    run, _ = evaluated
    store = open_store(run)
    p = store.get_json("eval/parent/report.json")
    c = store.get_json("eval/sol-0/report.json")
    assert p["quality"]["kl"] == 0.0 and c["quality"]["kl"] > 0
    # same held-out data for every unit: the child's view of the parent equals the parent's own figure
    assert math.isclose(c["quality"]["parent_perplexity"], p["quality"]["perplexity"], rel_tol=1e-5)
    assert c["quality"]["tokens"] == p["quality"]["tokens"] == 8 * 32
    assert c["block_configs"][1] == {"attention": "attn_linear", "ffn": "ffn_i160"}
    assert c["params"] < p["params"]
    tc = c["throughput"]["cpu"]
    # the speedup is the median of the pairs' ratios (one generation of each, back to back), not a ratio of
    # the two medians, and its distribution-free interval holds it
    got = [p + d for p, d in tc["measured"]["generations_s"]]
    ref = [p + d for p, d in tc["reference_measured"]["generations_s"]]
    assert len(got) == len(ref) == tc["pairs"] == tc["measured"]["repeats"] == 3, "eval.throughput_repeats pairs"
    assert tc["rounds"] == 2, "profile.rebuilds rounds, 2 pairs and 1"
    # the model's figure is its median generation over both rounds
    assert math.isclose(sum(tc["measured"]["generations_s"][sorted(range(3), key=got.__getitem__)[1]]),
                        statistics.median(got))
    assert math.isclose(tc["paired_speedup"], statistics.median(r / t for t, r in zip(got, ref)))
    assert tc["paired_ci95"][0] <= tc["paired_speedup"] <= tc["paired_ci95"][1]
    assert tc["paired_ci95"] == [min(r / t for t, r in zip(got, ref)), max(r / t for t, r in zip(got, ref))]
    assert tc["paired_ci_coverage"] == 0.75, "3 pairs: (min, max) covers the median with 1 - 2/8"
    for r in (p, c):
        assert r["task"]["n"] == 4 and 0 <= r["task"]["accuracy"] <= 1
        t = r["throughput"]["cpu"]
        assert t["measured"]["tokens_per_s"] > 0 and t["predicted"]["tokens_per_s"] == 100.0
        assert math.isclose(t["measured_over_predicted"], t["measured"]["tokens_per_s"] / 100.0)
        assert ("paired_speedup" in t) == (r is c), "only a child unit times the parent beside itself"
        res = r["icl"]["results"]["scan:template"]
        assert set(res) == {"random", "topk", "cover_ls"} and all(v["n"] == 2 for v in res.values())
        assert all("records" not in v for v in res.values()), "per-item records stay out of report.json"
        assert r["icl"]["selection"] == "paper" and r["icl"]["structure_predictor"] == "parent"
        assert all(len(v["ci95"]) == 2 and v["ci95"][0] <= v["accuracy"] <= v["ci95"][1] for v in res.values())
    # the parent sets the prompt budget of every unit, and its demonstrations are the same for both
    assert p["icl"]["prompt_budget"] == c["icl"]["prompt_budget"]
    for m in ("random", "topk", "cover_ls"):
        pm, cm = p["icl"]["results"]["scan:template"][m], c["icl"]["results"]["scan:template"][m]
        assert (pm["mean_demonstrations"], pm["mean_structure_coverage"]) == (
            cm["mean_demonstrations"], cm["mean_structure_coverage"])
        assert r["lm_eval"] is None
    prom = store.get_text("metrics/evaluate-sol-0.prom")
    assert "puzzle_eval_kl{" in prom and "puzzle_eval_tokens_per_s{" in prom


def test_compare_to_parent_matches_a_direct_computation(evaluated):
    _, tmp = evaluated
    parent = load_parent(tmp / "parent")
    child = load_parent(tmp / "parent")
    with torch.no_grad():
        child.model.layers[1].mlp.down_proj.weight.mul_(0.5)
    ids = torch.randint(0, 40, (3, 16))
    got = compare_to_parent(child, parent, ids, batch_size=2)
    with torch.no_grad():
        lp, lc = F.log_softmax(parent(ids), -1), F.log_softmax(child(ids), -1)
    kl = (lp.exp() * (lp - lc)).sum(-1).mean().item()
    nll = -lc[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert math.isclose(got["kl"], kl, rel_tol=1e-4) and math.isclose(got["perplexity"], math.exp(nll), rel_tol=1e-4)
    assert compare_to_parent(parent, None, ids)["kl"] == 0.0


def test_generator_agrees_with_transformers_greedy(evaluated):
    _, tmp = evaluated
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(str(tmp / "parent"), dtype=torch.float32).eval()
    gen = DeciTextGenerator(load_parent(tmp / "parent"), tmp / "parent", batch_size=3)
    prompts = ["source: walk twice\ntarget:", "source: jump\ntarget: I_JUMP\n\nsource: look left\ntarget:",
               "source: run"]
    ids = [gen.tokenizer.encode(p).ids for p in prompts]
    got = gen.generate(prompts, max_new_tokens=6)
    for p, row, text in zip(prompts, ids, got, strict=True):
        with torch.no_grad():
            out = ref.generate(torch.tensor([row]), max_new_tokens=6, do_sample=False, eos_token_id=gen.stop_ids,
                               pad_token_id=gen.pad_id)[0, len(row):].tolist()
        cut = next((k for k, t in enumerate(out) if t in gen.stop_ids), len(out))
        want = gen.tokenizer.decode(out[: cut + 1], skip_special_tokens=True)
        assert text == [want], p
    beams = gen.generate(prompts[:2], max_new_tokens=4, num_beams=3, num_return_sequences=2)
    assert [len(b) for b in beams] == [2, 2]


def test_evaluate_refuses_an_incomplete_child(evaluated):
    run, _ = evaluated
    store = open_store(run)
    store.put_bytes("child/baseline-layer-drop/config.json", b"{}")  # a killed upload: no complete.json
    with pytest.raises(UnitError, match=r"child 'baseline-layer-drop' is incomplete"):
        run_step("evaluate", run, unit(run, "baseline-layer-drop"))


def test_lm_eval_local_json_task_scores_like_a_hand_computation(evaluated, tmp_path):
    _, tmp = evaluated
    docs = [{"question": "walk twice", "choices": ["I_WALK I_WALK", "I_LOOK"], "label": 0},
            {"question": "look", "choices": ["I_WALK", "I_LOOK"], "label": 1},
            {"question": "jump left", "choices": ["I_TURN_LEFT I_JUMP", "I_RUN", "I_JUMP"], "label": 0},
            {"question": "run after walk", "choices": ["I_WALK I_RUN", "I_RUN I_WALK"], "label": 0}]
    (tmp_path / "scan_mc.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    task = {"task": "scan_mc_local", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": "scan_mc.jsonl"}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "source: {{question}}\ntarget:",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": " ",
            "metric_list": [{"metric": "acc"}]}
    (tmp_path / "scan_mc.json").write_text(json.dumps(task))
    model = load_parent(tmp / "parent")
    got = lm_eval_results(model, tmp / "parent", [str(tmp_path / "scan_mc.json")])
    gen = DeciTextGenerator(model, tmp / "parent")
    correct = 0
    for d in docs:
        ctx = gen.tokenizer.encode(f"source: {d['question']}\ntarget:").ids
        scores = []
        for ch in d["choices"]:
            ids = gen.tokenizer.encode(f"source: {d['question']}\ntarget: {ch}").ids
            with torch.no_grad():
                lp = F.log_softmax(model(torch.tensor([ids[:-1]])), -1)[0]
            scores.append(sum(lp[k - 1, ids[k]].item() for k in range(len(ctx), len(ids))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    assert got["scan_mc_local"]["acc,none"] == pytest.approx(correct / len(docs))
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks: \['no_such_task_xyz'\] could not be evaluated"):
        lm_eval_results(model, tmp / "parent", ["no_such_task_xyz"])


def test_lm_eval_bad_task_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.lm_eval_tasks: task file '.*missing.json' does not exist"):
        load_task_spec(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"no_task": 1}')
    with pytest.raises(ConfigError, match=r"must be a mapping with a 'task' name"):
        load_task_spec(str(tmp_path / "bad.json"))
    assert load_task_spec("hellaswag") == "hellaswag"

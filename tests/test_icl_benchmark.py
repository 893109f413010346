"""The ICL benchmark: Wilson intervals, the prompt-budget cut, how predicted beams become atoms and structures
(repair, unparsable beams), that the demonstrations never depend on the evaluated model, the config's rules,
both modes end to end on a real (randomly initialized) tiny Llama, and the retention table."""

from __future__ import annotations

import math

import pytest
from puzzle.config import ConfigError, ICLEvalConfig, load_config_text
from puzzle.data.prompts import format_prompt
from puzzle.generation import TextGenerator
from puzzle.icl.benchmark import (
    answer_budget,
    fit_to_budget,
    format_table,
    plan_dataset,
    plan_icl,
    retention_table,
    run_icl_benchmark,
    structure_coverage,
    wilson_interval,
)
from puzzle.icl.datasets import load_dataset, scan_atoms_of_actions
from puzzle.icl.selection import DemonstrationSelector, PaperSelector
from puzzle.icl.structures import Structure, anonymize, local_structures, parse_program, program_atoms
from test_generation import hf_generator, tiny_model_dir  # noqa: F401 - the fixture


class Words:
    """Test double for :class:`puzzle.generation.TextGenerator`: a token is a whitespace-separated word plus
    one BOS, and every prompt is answered with ``beams`` (a fixed list), so the budget arithmetic and the way
    beams are read can be checked exactly (a trained model's beams are not controllable). Records every call."""

    def __init__(self, beams: list[str] | None = None, context_length: int = 10_000) -> None:
        self.beams = beams or [""]
        self._context_length = context_length
        self.calls: list[tuple[list[str], int, int, int]] = []

    @property
    def context_length(self) -> int:
        return self._context_length

    def count_tokens(self, texts):
        return [len(t.split()) + 1 for t in texts]

    def generate(self, prompts, max_new_tokens, num_beams=1, num_return_sequences=1):
        self.calls.append((list(prompts), max_new_tokens, num_beams, num_return_sequences))
        return [(self.beams * num_return_sequences)[:num_return_sequences] for _ in prompts]


def test_wilson_interval_by_hand():
    # 5/10: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5; half-width z sqrt(0.025 + z^2/400) / (1 + z^2/10)
    z = 1.959963984540054
    half = z * math.sqrt(0.025 + z * z / 400) / (1 + z * z / 10)
    assert wilson_interval(5, 10) == pytest.approx([0.5 - half, 0.5 + half])
    assert wilson_interval(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)
    lo, hi = wilson_interval(0, 4)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(z * z / (4 + z * z))
    assert wilson_interval(4, 4)[1] == pytest.approx(1.0) and wilson_interval(0, 0) == [0.0, 1.0]


def test_fit_to_budget_drops_the_least_similar_first():
    d = load_dataset("geo:compound")
    demos = [0, 1, 2]  # prompt order: 2 is the most similar, 0 the least
    measure = Words()
    full = format_prompt([(d.train[i].source, d.train[i].target) for i in demos], "how many rivers")
    n_full = measure.count_tokens([full])[0]
    assert fit_to_budget(d, demos, "how many rivers", measure, n_full) == (demos, full)
    kept, prompt = fit_to_budget(d, demos, "how many rivers", measure, n_full - 1)
    assert kept == [1, 2]
    assert prompt == format_prompt([(d.train[i].source, d.train[i].target) for i in (1, 2)], "how many rivers")
    alone = measure.count_tokens([format_prompt([], "how many rivers")])[0]
    assert fit_to_budget(d, demos, "how many rivers", measure, alone) == ([], format_prompt([], "how many rivers"))
    with pytest.raises(ValueError, match="does not fit the context even without demonstrations"):
        fit_to_budget(d, demos, "how many rivers", measure, alone - 1)


def test_answer_budget_is_the_longest_target_in_tokens_plus_slack():
    d = load_dataset("scan:length")  # the test part's answers are longer than any demonstration's
    longest = max(len(it.target.split()) for it in d.test)
    assert longest > max(len(it.target.split()) for it in d.train)
    assert answer_budget(d, Words()) == longest + 1 + 8  # + the BOS a prompt count includes, + slack


def paper_cfg(**kw) -> ICLEvalConfig:
    return ICLEvalConfig(**{"enabled": True, "methods": ["random", "topk", "cover_utt", "cover_ls"],
                            "datasets": ["geo:compound"], "num_test": 3, **kw})


def test_beams_become_atoms_and_structures_as_the_authors_read_them():
    beams = [
        "answer(count(river(all))\nsource: junk",  # one ) missing: repaired, parses
        " answer(count(state(loc_2(",  # does not parse even repaired: its atoms only
        "I_WALK I_JUMP",  # not a program at all: its text's atoms all the same
    ]
    predictor = Words(beams)
    cfg = paper_cfg(num_beams=3)
    plan = plan_dataset("geo:compound", cfg, Words(), predictor)
    assert predictor.calls[0][2:] == (3, 3), "num_beams beams, all returned"
    for p in plan.predictions:
        assert p.atoms == ["I_JUMP", "I_WALK", "all", "answer", "count", "loc_2", "river", "state"]
        assert p.top_atoms == ["all", "answer", "count", "river"]
        assert p.structures == local_structures(parse_program("answer(count(river(all)))")) | {
            Structure(1, a) for a in p.atoms}
        assert p.programs == ["answer(count(river(all))", "answer(count(state(loc_2(", "I_WALK I_JUMP"]


def test_unparsable_beams_in_fragments_mode_are_dropped():
    cfg = paper_cfg(selection="fragments", methods=["cover_ls"], num_beams=2)
    plan = plan_dataset("geo:compound", cfg, Words(), Words(["answer(count(river(all)))", "answer(count("]))
    from puzzle.icl.structures import fragment_structures

    want = fragment_structures(parse_program("answer(count(river(all)))"), 4)
    assert all(p.structures == want for p in plan.predictions)


def test_scan_actions_no_command_denotes_still_name_their_atoms():
    assert scan_atoms_of_actions("I_TURN_RIGHT I_WALK I_TURN_RIGHT I_WALK I_TURN_RIGHT I_WALK I_TURN_RIGHT I_WALK") == (
        program_atoms("around(walk,right)"))
    assert scan_atoms_of_actions("I_WALK I_WALK I_WALK I_WALK I_WALK I_WALK I_WALK I_JUMP I_TURN_LEFT") == [
        "jump", "left", "walk"]
    assert scan_atoms_of_actions("x y") == []


def test_paper_methods_use_the_atoms_the_authors_use():
    d = load_dataset("geo:compound")
    top, other = "answer(count(river(all)))", "answer(state(next_to_2(stateid('texas'))))"
    cfg = paper_cfg(num_beams=2, num_demonstrations=6)
    plan = plan_dataset("geo:compound", cfg, Words(), Words([top, other]))
    sel = PaperSelector(d.train)
    for j, it in enumerate(plan.items):
        q = it.source
        # Top-K and Cover-Utt: the top predicted program's atoms; Cover-LS: every beam's
        assert plan.selected["topk"][j] == sel.topk(q, program_atoms(top), 6)
        assert plan.selected["cover_utt"][j] == sel.cover_utt(q, program_atoms(top), 6)
        atoms = sorted(set(program_atoms(top)) | set(program_atoms(other)))
        st = local_structures(parse_program(top)) | local_structures(parse_program(other))
        assert plan.selected["cover_ls"][j] == sel.cover_ls(q, atoms, st, 6)
        assert plan.selected["random"][j] == sel.random(q, 6)
        assert plan.demonstrations["cover_ls"][j] == plan.selected["cover_ls"][j], "6 demonstrations fit"


def test_predictor_prompts_are_utterance_topk_cut_to_the_predictors_own_context():
    d = load_dataset("geo:compound")
    predictor = Words(["answer(state(all))"], context_length=120)
    cfg = paper_cfg(methods=["cover_ls"])
    plan = plan_dataset("geo:compound", cfg, Words(), predictor)
    prompts, new_tokens, _, _ = predictor.calls[0]
    sel = PaperSelector(d.train)
    for it, prompt in zip(plan.items, prompts, strict=True):
        top = sel.utterance_topk(it.source, cfg.k)
        kept, want = fit_to_budget(d, top, it.source, predictor, 120 - new_tokens)
        assert prompt == want and 0 < len(kept) < cfg.k == 24
    assert new_tokens == answer_budget(d, predictor)


def test_budget_cut_keeps_the_most_similar_and_k_is_24_in_paper_mode():
    d = load_dataset("geo:compound")
    cfg = paper_cfg(max_context_tokens=150)
    plan = plan_dataset("geo:compound", cfg, Words(), Words(["answer(count(river(all)))"]))
    assert plan.budget == 150 - answer_budget(d, Words())
    cut = 0
    for m in cfg.methods:
        for it, sel, kept, prompt in zip(plan.items, plan.selected[m], plan.demonstrations[m], plan.prompts[m],
                                         strict=True):
            assert len(sel) == 24 or m == "cover_ls"
            assert kept == sel[len(sel) - len(kept):], "only the front (the least similar) is dropped"
            assert Words().count_tokens([prompt])[0] <= plan.budget
            if len(kept) < len(sel):  # one more demonstration would not have fitted
                cut += 1
                more = format_prompt([(d.train[i].source, d.train[i].target) for i in sel[len(sel) - len(kept) - 1:]],
                                     it.source)
                assert Words().count_tokens([more])[0] > plan.budget
    assert cut > 0


def test_demonstrations_never_depend_on_the_evaluated_model():
    """Two different evaluated models, one predictor: the very same prompts; a precomputed plan too."""
    cfg = paper_cfg(datasets=["scan:template", "geo:compound"], num_test=4)
    predictor = Words(["answer(count(river(all)))", "I_TURN_RIGHT I_WALK"])
    a, b = Words(["I_WALK"]), Words(["answer(state(all))"])
    ra = run_icl_benchmark(a, cfg, predictor, measure=Words())
    rb = run_icl_benchmark(b, cfg, predictor, measure=Words())
    assert [c[0] for c in a.calls] == [c[0] for c in b.calls] and len(a.calls) == 2 * 4
    for name in cfg.datasets:
        for m in cfg.methods:
            da = [r["demonstrations"] for r in ra["results"][name][m]["records"]]
            assert da == [r["demonstrations"] for r in rb["results"][name][m]["records"]]
    plan = plan_icl(cfg, Words(), predictor)
    c = Words(["x"])
    run_icl_benchmark(c, cfg, plan=plan)
    assert [x[0] for x in c.calls] == [x[0] for x in a.calls]


def test_a_beams_cache_runs_the_predictor_once_for_every_model():
    """evaluate keeps the predictor's beams in the run: the second model's plan reads them (no predictor
    call) and gets the very same prompts as the first."""
    cfg = paper_cfg(datasets=["scan:template", "geo:compound"], num_test=4)
    kept: dict[str, list[list[str]]] = {}

    def cache(name, compute):
        if name not in kept:
            kept[name] = compute()
        return kept[name]

    predictor = Words(["answer(count(river(all)))", "I_TURN_RIGHT I_WALK"])
    a, b = Words(["I_WALK"]), Words(["answer(state(all))"])
    run_icl_benchmark(a, cfg, predictor, measure=Words(), beams_cache=cache)
    first = len(predictor.calls)
    assert first == len(cfg.datasets) and set(kept) == set(cfg.datasets)
    run_icl_benchmark(b, cfg, predictor, measure=Words(), beams_cache=cache)
    assert len(predictor.calls) == first, "the predictor ran again despite the cache"
    assert [c[0] for c in a.calls] == [c[0] for c in b.calls]


def test_oracle_structures_are_those_of_the_anonymized_gold_program():
    cfg = paper_cfg(methods=["cover_ls"], structure_predictor="oracle")
    plan = plan_dataset("geo:compound", cfg, Words(), None)
    for it, p in zip(plan.items, plan.predictions, strict=True):
        gold = anonymize(it.program_tree)
        assert p.atoms == program_atoms(str(gold)) and p.structures == local_structures(gold)
    with pytest.raises(ValueError, match="no predictor model was given"):
        plan_dataset("geo:compound", paper_cfg(methods=["topk"]), Words(), None)


def test_config_defaults_per_mode_and_the_predictor_rules():
    assert (ICLEvalConfig().selection, ICLEvalConfig().k, ICLEvalConfig().structure_size) == ("paper", 24, 30)
    frag = ICLEvalConfig(selection="fragments")
    assert (frag.k, frag.structure_size) == (8, 4)
    assert ICLEvalConfig(num_demonstrations=5, max_structure_size=2).k == 5
    with pytest.raises(ValueError, match="predictor_uri: required when structure_predictor is 'model'"):
        ICLEvalConfig(structure_predictor="model")
    with pytest.raises(ValueError, match="predictor_uri: '/m' is not allowed with structure_predictor 'parent'"):
        ICLEvalConfig(predictor_uri="/m")
    assert ICLEvalConfig(structure_predictor="model", predictor_uri="s3://b/m").predictor_uri == "s3://b/m"
    with pytest.raises(ConfigError, match="structures"):
        load_config_text("parent: {uri: p}\ndata: {distillation_uri: a, validation_uri: b}\n"
                         "profile: {scenarios: [{name: s, device: cpu}]}\neval: {icl: {structures: oracle}}", "x.yaml")


@pytest.mark.parametrize("selection", ["paper", "fragments"])
def test_run_icl_benchmark_end_to_end(tiny_model_dir, selection):  # noqa: F811 - the fixture
    gen = hf_generator(tiny_model_dir)
    assert isinstance(gen, TextGenerator)
    cfg = ICLEvalConfig(enabled=True, selection=selection, methods=["random", "topk", "cover_utt", "cover_ls"],
                        datasets=["geo:compound"], num_demonstrations=3, num_test=4, num_beams=2, seed=0)
    out = run_icl_benchmark(gen, cfg, max_new_tokens=6)
    assert out["selection"] == selection and out["config"]["num_test"] == 4
    res = out["results"]["geo:compound"]
    assert set(res) == {"random", "topk", "cover_utt", "cover_ls"}
    d = load_dataset("geo:compound")
    sel = PaperSelector(d.train) if selection == "paper" else DemonstrationSelector(d.train, cfg.structure_size)
    for method, r in res.items():
        assert r["n"] == 4 == len(r["records"]) and r["accuracy"] == r["correct"] / 4
        assert r["ci95"] == wilson_interval(r["correct"], 4)
        for rec in r["records"]:
            item = d.test[rec["test_index"]]
            assert rec["gold"] == item.target and rec["source"] == item.source
            assert len(rec["demonstrations"]) <= 3 and rec["selected"] <= 3
            assert rec["correct"] == (rec["prediction"] == rec["gold"])
            demos = [d.train[i] for i in rec["demonstrations"]]
            assert rec["structure_coverage"] == structure_coverage(item, demos, cfg)
            if method == "random":
                assert rec["demonstrations"] == sel.random(item.source, 3, 0)
    assert all("predicted_structures" in rec for rec in res["cover_ls"]["records"])
    # Same model, config and seed: the same answers.
    assert run_icl_benchmark(gen, cfg, max_new_tokens=6)["results"] == out["results"]


def test_retention_table():
    def res(acc):
        return {"selection": "paper",
                "results": {"scan:template": {m: {"accuracy": a, "ci95": [a / 2, a]} for m, a in acc.items()}}}

    rows = retention_table(res({"random": 0.2, "topk": 0.5, "cover_ls": 0.0}),
                           res({"random": 0.1, "topk": 0.45, "cover_ls": 0.1}))
    assert rows[0] == {"selection": "paper", "method": "random", "split": "scan:template", "parent": 0.2,
                       "child": 0.1, "retention": 0.5, "parent_ci95": [0.1, 0.2], "child_ci95": [0.05, 0.1]}
    assert rows[1]["retention"] == pytest.approx(0.9) and rows[2]["retention"] is None
    table = format_table(rows)
    assert "| paper | topk | scan:template | 0.500 | 0.450 | 90.0% |" in table
    assert "| paper | cover_ls | scan:template | 0.000 | 0.100 | n/a |" in table

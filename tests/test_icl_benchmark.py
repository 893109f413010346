"""The ICL benchmark end to end on a real (randomly initialized) tiny Llama, the Hugging Face
adapter against a hand-written greedy decode, predicted structures and the retention table."""

from __future__ import annotations

import functools

import pytest
import torch
from puzzle.config import ICLEvalConfig
from puzzle.data.prompts import format_prompt, parse_answer
from puzzle.icl.benchmark import (
    format_table,
    predict_structures,
    retention_table,
    run_icl_benchmark,
    structure_coverage,
)
from puzzle.icl.datasets import geo_items, load_dataset
from puzzle.icl.generation import HFTextGenerator, TextGenerator
from puzzle.icl.selection import DemonstrationSelector
from puzzle.icl.structures import local_structures
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    """A plain HF Llama directory: byte-level BPE trained on the geo questions, random weights."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [format_prompt([(it.source, it.target)], it.source) for it in geo_items()[:300]]
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<s>", "</s>", "<pad>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    hf_tok.save_pretrained(path)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@functools.cache
def generator(path) -> HFTextGenerator:
    torch.set_num_threads(1)
    return HFTextGenerator(path, batch_size=3)


def test_adapter_matches_hand_written_greedy_decode(tiny_model_dir):
    gen = generator(tiny_model_dir)
    assert isinstance(gen, TextGenerator)
    d = load_dataset("geo:iid")
    # Prompts of different lengths, so the batch is left-padded.
    prompts = [
        format_prompt([(d.train[0].source, d.train[0].target)], d.test[0].source),
        format_prompt([], d.test[1].source),
        format_prompt([(d.train[i].source, d.train[i].target) for i in (2, 3)], d.test[2].source),
    ]
    got = gen.generate(prompts, max_new_tokens=12)
    assert [len(g) for g in got] == [1, 1, 1]
    for prompt, (text,) in zip(prompts, got):
        ids = gen.tokenizer(prompt, return_tensors="pt")["input_ids"]  # (1, T)
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(12):
                nxt = gen.model(ids).logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
                ids = torch.cat([ids, nxt], dim=1)
                if "\n" in gen.tokenizer.decode(ids[0, start:]):
                    break
        want = gen.tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        assert text == want
        assert parse_answer(text) == parse_answer(want)


def test_adapter_beams_and_errors(tiny_model_dir, tmp_path):
    gen = generator(tiny_model_dir)
    out = gen.generate(
        ["source: how many rivers\ntarget:", "source: what\ntarget:"], 5, num_beams=3, num_return_sequences=3
    )
    assert [len(o) for o in out] == [3, 3]
    with pytest.raises(ValueError, match="num_return_sequences: value 4"):
        gen.generate(["x"], 2, num_beams=2, num_return_sequences=4)
    with pytest.raises(ValueError, match="no config.json"):
        HFTextGenerator(tmp_path)


class FixedBeams:
    """Test double for the TextGenerator protocol: returns given beams, so the parsing and
    union logic of predicted structures can be checked exactly (a trained model's beams are not
    controllable here)."""

    def __init__(self, beams: list[str]) -> None:
        self.beams = beams
        self.calls: list[tuple[list[str], int, int, int]] = []

    def generate(self, prompts, max_new_tokens, num_beams=1, num_return_sequences=1):
        self.calls.append((prompts, max_new_tokens, num_beams, num_return_sequences))
        return [self.beams[:num_return_sequences] for _ in prompts]


def test_predicted_structures_are_the_union_of_parsed_beams():
    d = load_dataset("geo:compound")
    sel = DemonstrationSelector(d.train, 3)
    a, b = d.test[0], d.train[7]
    aux = FixedBeams([a.target + "\nsource: junk", "answer(count(", " " + b.target])
    (got,) = predict_structures(
        aux, d, sel, [a.source], k=4, num_beams=3, max_structure_size=3, max_new_tokens=50
    )
    assert got == local_structures(a.program_tree, 3) | local_structures(b.program_tree, 3)
    prompts, budget, beams, nrs = aux.calls[0]
    assert (budget, beams, nrs) == (50, 3, 3)
    top = [d.train[i] for i in sel.topk(a.source, 4)]
    assert prompts == [format_prompt([(t.source, t.target) for t in top], a.source)]
    (none,) = predict_structures(FixedBeams(["((", "x("]), d, sel, [a.source], 4, 2, 3, 10)
    assert none == frozenset()


def test_run_icl_benchmark_end_to_end(tiny_model_dir):
    gen = generator(tiny_model_dir)
    cfg = ICLEvalConfig(
        enabled=True,
        methods=["random", "topk", "cover_utt", "cover_ls"],
        datasets=["geo:compound"],
        num_demonstrations=3,
        num_test=4,
        max_structure_size=3,
        num_beams=2,
        seed=0,
    )
    out = run_icl_benchmark(gen, cfg, max_new_tokens=6)
    assert out["config"]["num_test"] == 4
    res = out["results"]["geo:compound"]
    assert set(res) == {"random", "topk", "cover_utt", "cover_ls"}
    d = load_dataset("geo:compound")
    sel = DemonstrationSelector(d.train, 3)
    for method, r in res.items():
        assert r["n"] == 4 == len(r["records"])
        assert r["accuracy"] == r["correct"] / 4
        for rec in r["records"]:
            item = d.test[rec["test_index"]]
            assert rec["gold"] == item.target and rec["source"] == item.source
            assert len(rec["demonstrations"]) == 3
            assert rec["correct"] == (rec["prediction"] == rec["gold"])
            demos = [d.train[i] for i in rec["demonstrations"]]
            assert rec["structure_coverage"] == structure_coverage(item, demos, 3)
            if method == "topk":
                assert rec["demonstrations"] == sel.topk(item.source, 3)
    assert all("predicted_structures" in rec for rec in res["cover_ls"]["records"])
    # Same model, config and seed: the same answers.
    again = run_icl_benchmark(gen, cfg, max_new_tokens=6)
    assert again["results"] == out["results"]


def test_oracle_structures_give_full_coverage_where_the_pool_allows(tiny_model_dir):
    cfg = ICLEvalConfig(
        methods=["cover_ls"], datasets=["geo:template"], num_demonstrations=8, num_test=5, structures="oracle"
    )
    out = run_icl_benchmark(generator(tiny_model_dir), cfg, max_new_tokens=2)
    d = load_dataset("geo:template")
    sel = DemonstrationSelector(d.train, cfg.max_structure_size)
    for rec in out["results"]["geo:template"]["cover_ls"]["records"]:
        gold = local_structures(d.test[rec["test_index"]].program_tree, cfg.max_structure_size)
        coverable = sum(s in sel.by_structure for s in gold)
        assert rec["structure_coverage"] == pytest.approx(coverable / len(gold))


def test_retention_table():
    def res(acc):
        return {"results": {"scan:template": {m: {"accuracy": a} for m, a in acc.items()}}}

    parent = res({"random": 0.2, "topk": 0.5, "cover_ls": 0.0})
    child = res({"random": 0.1, "topk": 0.45, "cover_ls": 0.1})
    rows = retention_table(parent, child)
    assert rows == [
        {"method": "random", "split": "scan:template", "parent": 0.2, "child": 0.1, "retention": 0.5},
        {
            "method": "topk",
            "split": "scan:template",
            "parent": 0.5,
            "child": 0.45,
            "retention": pytest.approx(0.9),
        },
        {"method": "cover_ls", "split": "scan:template", "parent": 0.0, "child": 0.1, "retention": None},
    ]
    table = format_table(rows)
    assert "| topk | scan:template | 0.500 | 0.450 | 90.0% |" in table
    assert "| cover_ls | scan:template | 0.000 | 0.100 | n/a |" in table

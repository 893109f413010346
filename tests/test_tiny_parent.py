"""The tiny parent: training is deterministic and saves a safetensors-only Hugging Face directory,
the tokenizer round-trips the prompt format, and the committed parent solves held-out items."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from puzzle.data import corpus
from puzzle.data.prompts import format_prompt
from puzzle.data.tokenizer import ACTION_TOKENS, train_tokenizer
from puzzle.tiny_parent import MAX_PARENT_BYTES, TinyParentConfig, schedule, train_tiny_parent

PARENT = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "parent"
TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "intermediate_size": 64,
    "seq_len": 64,
    "batch_size": 2,
    "steps": 3,
    "warmup_steps": 1,
    "tokenizer_chars": 150_000,
    "threads": 1,
    "vocab_size": 400,
}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("a"), tmp_path_factory.mktemp("b")
    cfg = TinyParentConfig(seed=3, **TINY)
    return train_tiny_parent(a, cfg, progress=False), a, train_tiny_parent(b, cfg, progress=False), b


def test_short_training_is_deterministic(two_runs):
    sa, a, sb, b = two_runs
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()
    assert (
        sa["first_loss"] == sb["first_loss"]
        and sa["final_loss_mean_last_20"] == sb["final_loss_mean_last_20"]
    )


def test_another_seed_gives_other_weights(two_runs, tmp_path):
    _, a, _, _ = two_runs
    train_tiny_parent(tmp_path, TinyParentConfig(seed=4, **TINY), progress=False)
    assert (a / "model.safetensors").read_bytes() != (tmp_path / "model.safetensors").read_bytes()


def test_short_training_writes_a_loadable_safetensors_only_directory(two_runs):
    from transformers import AutoTokenizer, LlamaForCausalLM, PreTrainedTokenizerFast

    _, a, _, _ = two_runs
    names = {p.name for p in a.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    } <= names
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".pkl"))]
    model = LlamaForCausalLM.from_pretrained(a)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["hidden_size"]) == (8, 4, 32)
    tok = PreTrainedTokenizerFast.from_pretrained(a)
    assert AutoTokenizer.from_pretrained(a).get_vocab() == tok.get_vocab()
    ids = tok("source: walk\ntarget:", return_tensors="pt").input_ids  # (1, T)
    assert ids[0, 0].item() == tok.bos_token_id
    with torch.no_grad():
        logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = TinyParentConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert schedule(cfg).lr(0) == pytest.approx(1e-4)
    assert schedule(cfg).lr(9) == pytest.approx(1e-3)
    assert schedule(cfg).lr(99) == pytest.approx(1e-4, rel=0.01)
    assert all(schedule(cfg).lr(s) >= schedule(cfg).lr(s + 1) for s in range(10, 99))


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("num_key_value_heads", 3, "divide num_attention_heads"),
        ("seq_len", 4096, "max_position_embeddings"),
        ("device", "tpu", "allowed: cpu, cuda"),
        ("steps", 0, "must be positive"),
    ],
)
def test_bad_settings_name_the_field_and_value(field, value, needle):
    with pytest.raises(ValueError, match=f"{field}: value {value!r} is not allowed.*{needle}"):
        TinyParentConfig(**{field: value})


def test_tokenizer_refuses_text_without_the_task():
    filler = list(corpus.filler_documents()[:200])
    with pytest.raises(ValueError, match="did not learn the SCAN action"):
        train_tokenizer(filler, 400)


@pytest.fixture(scope="module")
def committed_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(PARENT)


def test_committed_tokenizer_round_trips_the_prompt_format(committed_tokenizer):
    tok = committed_tokenizer
    prompt = format_prompt(
        [
            ("jump around left twice", "I_TURN_LEFT I_JUMP " * 7 + "I_TURN_LEFT I_JUMP"),
            ("what are the states bordering texas", "answer(state(next_to_2(stateid('texas'))))"),
        ],
        "walk opposite right thrice after look",
    )
    for text in (prompt, prompt + " I_LOOK I_TURN_RIGHT\n\n", "Return the value of 'x' (see PEP 8)."):
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert all(len(tok(a, add_special_tokens=False).input_ids) == 1 for a in ACTION_TOKENS)
    # The answer starts a new token right after "target:", in prompts exactly as in training text.
    full = tok(prompt + " I_WALK", add_special_tokens=False).input_ids
    assert full[:-1] == tok(prompt, add_special_tokens=False).input_ids


def test_committed_parent_is_small_safetensors_and_solves_held_out_items(committed_tokenizer):
    from puzzle.data.tasks import evaluate_exact_match, scan_task_examples
    from puzzle.generation import HFTextGenerator
    from transformers import LlamaForCausalLM

    files = [p for p in PARENT.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_PARENT_BYTES
    assert not [p.name for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    torch.set_num_threads(1)
    model = LlamaForCausalLM.from_pretrained(PARENT).eval()
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (8, 4)
    generate = HFTextGenerator(model, committed_tokenizer, batch_size=6)
    for part in ("valid", "test"):  # test: compose `around right`, never seen, from demonstrations
        r = evaluate_exact_match(generate, scan_task_examples(6, seed=11, part=part), batch_size=6)
        assert r["correct"] > 0, (part, r["errors"])

"""The one generation interface: both adapters against a hand-written greedy decode on a real (randomly
initialized) tiny Llama, the one stop rule, token counting, beams and bad arguments."""

from __future__ import annotations

import functools

import pytest
import torch
from puzzle.data.prompts import format_prompt
from puzzle.generation import DeciTextGenerator, HFTextGenerator, TextGenerator, newline_stop_ids
from puzzle.icl.datasets import geo_items, load_dataset
from puzzle.model import load_parent
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast


@pytest.fixture(scope="session")
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
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
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
def hf_generator(path) -> HFTextGenerator:
    torch.set_num_threads(1)
    return HFTextGenerator.from_dir(path, batch_size=3)


def _prompts() -> list[str]:
    d = load_dataset("geo:iid")
    # Prompts of different lengths, so a batch is left-padded.
    return [
        format_prompt([(d.train[0].source, d.train[0].target)], d.test[0].source),
        format_prompt([], d.test[1].source),
        format_prompt([(d.train[i].source, d.train[i].target) for i in (2, 3)], d.test[2].source),
        format_prompt([(d.train[4].source, d.train[4].target)], d.test[3].source),
    ]


def _hand_greedy(model, tok: Tokenizer, prompt: str, steps: int) -> str:
    """Greedy decoding written out: the argmax token until one whose text holds a newline, or EOS."""
    ids = torch.tensor([tok.encode(prompt).ids])  # (1, T)
    start = ids.shape[1]
    with torch.no_grad():
        for _ in range(steps):
            logits = model(ids)
            logits = getattr(logits, "logits", logits)
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            ids = torch.cat([ids, nxt], dim=1)
            if "\n" in tok.decode([int(nxt)], skip_special_tokens=False) or int(nxt) == model.config.eos_token_id:
                break
    return tok.decode(ids[0, start:].tolist(), skip_special_tokens=True)


def test_both_adapters_match_a_hand_written_greedy_decode(tiny_model_dir):
    hf = hf_generator(tiny_model_dir)
    deci = DeciTextGenerator(load_parent(tiny_model_dir), tiny_model_dir, batch_size=3)
    prompts = _prompts()
    for gen in (hf, deci):
        assert isinstance(gen, TextGenerator)
        got = gen.generate(prompts, max_new_tokens=12)
        assert [len(g) for g in got] == [1] * len(prompts)
        for prompt, (text,) in zip(prompts, got, strict=True):
            assert text == _hand_greedy(gen.model, gen.tokenizer, prompt, 12)


def test_stop_rule_is_every_token_holding_a_newline_plus_eos(tiny_model_dir):
    gen = hf_generator(tiny_model_dir)
    tok = gen.tokenizer
    vocab = tok.get_vocab()
    newline = {i for t, i in vocab.items() if "Ċ" in t}  # byte-level BPE spells the newline byte 'Ċ'
    assert newline and set(gen.stop_ids) == newline | {gen.model.config.eos_token_id}
    # a word-level vocabulary keeps "\n" as it is
    wl = Tokenizer(models.WordLevel({"a": 0, "\n": 1, "b\n": 2, "<unk>": 3}, unk_token="<unk>"))
    assert newline_stop_ids(wl, [3]) == [1, 2, 3]
    assert newline_stop_ids(wl, None) == [1, 2]


def test_count_tokens_counts_what_generate_feeds(tiny_model_dir):
    gen = hf_generator(tiny_model_dir)
    prompts = _prompts()
    counts = gen.count_tokens(prompts)
    _, mask = gen.encode(prompts)  # (B, T) left-padded
    assert counts == mask.sum(-1).tolist()
    assert counts == [len(gen.tokenizer.encode(p).ids) for p in prompts]  # special tokens, if any, included
    assert gen.context_length == 2048


def test_beams_and_errors(tiny_model_dir, tmp_path):
    gen = hf_generator(tiny_model_dir)
    out = gen.generate(["source: how many rivers\ntarget:", "source: what\ntarget:"], 5, num_beams=3,
                       num_return_sequences=3)
    assert [len(o) for o in out] == [3, 3]
    assert gen.generate([], 5) == []
    with pytest.raises(ValueError, match="num_return_sequences: value 4"):
        gen.generate(["x"], 2, num_beams=2, num_return_sequences=4)
    with pytest.raises(ValueError, match="num_beams: value 0"):
        gen.generate(["x"], 2, num_beams=0)
    with pytest.raises(ValueError, match="no config.json"):
        HFTextGenerator.from_dir(tmp_path)
    with pytest.raises(ValueError, match="tokenizer.json.* not found"):
        DeciTextGenerator(gen.model, tmp_path)
    with pytest.raises(TypeError, match="give a fast tokenizer"):
        HFTextGenerator(gen.model, object())

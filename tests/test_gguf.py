"""Tests of puzzle.export.gguf and ``puzzle export gguf``: heterogeneous children written as llama.cpp GGUF.

A small random parent (byte-level BPE vocabulary, so llama.cpp's tokenizer can hold it) is turned into
children with every kind of layer llama.cpp runs: GQA with several n_heads_in_group, linear attention,
no_op attention (in layer 0 too), several FFN sizes, no_op FFNs in the middle and in the last layer.
Each is exported and read back with the ``gguf`` package (llama.cpp's own reader): every per-layer size,
tensor name, shape, dtype and value is checked, the rope permutation undone. ``_llamacpp_forward`` runs
the file with the computation of llama.cpp's ``deci`` graph (src/models/deci.cpp, re-written here in
numpy: interleaved rope, a layer skipped when its FFN length is 0) and must give our logits; the real
llama.cpp is compared in benchmarks/bench_llamacpp.py (it needs a C++ build this suite does not make).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from puzzle.cli import main
from puzzle.export.gguf import (
    ZERO_FFN_SIZE,
    GGUFExportError,
    export_gguf,
    permute_rope,
    unpermute_rope,
)
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    RMSNorm,
    build_attention,
    build_ffn,
    load_parent,
    load_pretrained,
    save_pretrained,
)
from tinymodels import make_parent

# absent from the GPU machine's image (it lacks some runtime dependencies): skip there, not a collection error
gguf = pytest.importorskip("gguf", reason="gguf (llama.cpp's format library) is not installed")

torch.set_num_threads(1)
HIDDEN, HEADS, HEAD_DIM, VOCAB, INTER = 64, 8, 8, 320, 96
# (attention, ffn) per layer of the main child: layer 0 no_op attention, a linear attention, three GQA
# group sizes, a whole no_op layer in the middle, no_op FFNs after a linear attention and in the last layer.
CHILD_LAYERS = [
    (AttentionVariant.noop(), FFNVariant.exact(INTER)),
    (AttentionVariant.gqa(4), FFNVariant.exact(48)),
    (AttentionVariant.linear(), FFNVariant.noop()),
    (AttentionVariant.noop(), FFNVariant.noop()),
    (AttentionVariant.gqa(1), FFNVariant.exact(160)),
    (AttentionVariant.gqa(8), FFNVariant.noop()),
]


def _bpe_tokenizer(out: Path) -> None:
    """A GPT-2-style byte-level BPE (ByteLevel with its own regex: llama.cpp's 'gpt-2') of VOCAB-10 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 10, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = ["walk twice and jump left", "look around right thrice", "the source of the target is it"] * 50
    tok.train_from_iterator(text, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}))


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            # norms around 1 (a lost or misplaced norm weight shows), matrices small and random
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g) if p.ndim == 1 else 0.2 * torch.randn(p.shape, generator=g))


def _parent(**over) -> DeciLMForCausalLM:
    kw: dict = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "num_attention_heads": HEADS, "head_dim": HEAD_DIM,
                "block_configs": [BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(INTER))] * len(CHILD_LAYERS),
                "rms_norm_eps": 1e-6, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1,
                "pad_token_id": 2}
    kw.update(over)
    model = DeciLMForCausalLM(ModelConfig(**kw)).eval()
    _randomize(model, 0)
    return model


def _child(parent: DeciLMForCausalLM, layers) -> DeciLMForCausalLM:
    cfg = parent.config
    for i, (a, f) in enumerate(layers):
        for seed, (variant, build, put) in enumerate(
                ((a, build_attention, parent.set_attention), (f, build_ffn, parent.set_ffn))):
            module = build(variant, cfg)
            norm = None
            if module is not None:
                _randomize(module, 100 * i + seed + 1)
                norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
                _randomize(norm, 100 * i + seed + 50)
            put(i, variant, module, norm)
    return parent


@pytest.fixture(scope="module")
def child_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gguf")
    _bpe_tokenizer(root / "tok")
    return save_pretrained(_child(_parent(), CHILD_LAYERS), root / "child", tokenizer_dir=root / "tok")


def _fields(r: gguf.GGUFReader) -> dict:
    return {k: f.contents() for k, f in r.fields.items()}


def _array(t) -> np.ndarray:
    """A tensor of the file as float32 in Hugging Face (rows, cols) order."""
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        bits = data.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32).reshape(data.shape[0], -1)
    return data.astype(np.float32)


def _expected_layers(cfg: ModelConfig) -> tuple[list[int], list[int], list[int]]:
    """The per-layer arrays the rules of the module docstring give, computed from the variants here."""
    hc, kv, ff = [], [], []
    last = cfg.num_hidden_layers - 1
    for i, b in enumerate(cfg.block_configs):
        a, f = b.attention, b.ffn
        hc.append(0 if (a.no_op and i > 0) else cfg.num_attention_heads)
        kv.append(cfg.num_attention_heads // a.n_heads_in_group if a.kind == "gqa" else 0)
        ff.append(f.intermediate_size if f.kind == "swiglu" else (0 if a.no_op and i != last else ZERO_FFN_SIZE))
    return hc, kv, ff


def _llamacpp_forward(path: Path, ids: list[int]) -> np.ndarray:
    """Logits (T, V) of a GGUF 'deci' file computed the way llama.cpp's deci graph computes them."""
    r = gguf.GGUFReader(str(path))
    kv = _fields(r)
    w = {t.name: _array(t) for t in r.tensors}
    eps, base = kv["deci.attention.layer_norm_rms_epsilon"], kv["deci.rope.freq_base"]
    # llama.cpp reads the head size only when layer 0 has heads (llama_model_base::load_hparams)
    d = kv["deci.attention.key_length"] if kv["deci.attention.head_count"][0] > 0 else 0
    assert d > 0 or not any(kv["deci.attention.head_count_kv"]), "llama.cpp would run GQA layers with head size 0"
    freq_div = w.get("rope_freqs.weight", np.ones(d // 2, np.float32))

    def norm(x, g):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * g

    def rope(x):  # (T, n, d): llama.cpp's "normal" rope rotates adjacent pairs (2j, 2j+1)
        pos = np.arange(x.shape[0])[:, None, None]
        theta = pos * base ** (-np.arange(0, d, 2) / d) / freq_div  # (T, 1, d/2)
        c, s = np.cos(theta), np.sin(theta)
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2], out[..., 1::2] = x0 * c - x1 * s, x0 * s + x1 * c
        return out

    x = w["token_embd.weight"][ids].astype(np.float64)  # (T, C)
    T = len(ids)
    for il in range(kv["deci.block_count"]):
        nh, nkv, nff = (kv[k][il] for k in ("deci.attention.head_count", "deci.attention.head_count_kv",
                                            "deci.feed_forward_length"))
        b = f"blk.{il}."
        inp = x
        cur = x if nh == 0 else norm(x, w[b + "attn_norm.weight"])
        if nh > 0 and nkv == 0:
            cur = cur @ w[b + "attn_output.weight"].T
        elif nh > 0:
            q = rope((cur @ w[b + "attn_q.weight"].T).reshape(T, nh, d))
            k = rope((cur @ w[b + "attn_k.weight"].T).reshape(T, nkv, d))
            v = (cur @ w[b + "attn_v.weight"].T).reshape(T, nkv, d)
            k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)  # head h reads kv h // group
            att = np.einsum("thd,shd->hts", q, k) / np.sqrt(d)
            att = np.where(np.tril(np.ones((T, T), bool)), att, -np.inf)
            att = np.exp(att - att.max(-1, keepdims=True))
            att /= att.sum(-1, keepdims=True)
            cur = np.einsum("hts,shd->thd", att, v).reshape(T, nh * d) @ w[b + "attn_output.weight"].T
        if nff == 0:
            continue  # llama.cpp: a layer without FFN keeps its input (its attention output is dropped)
        ffn_inp = cur + inp if nh > 0 else cur
        h = norm(ffn_inp, w[b + "ffn_norm.weight"])
        gate = h @ w[b + "ffn_gate.weight"].T
        x = ((gate / (1 + np.exp(-gate))) * (h @ w[b + "ffn_up.weight"].T)) @ w[b + "ffn_down.weight"].T + ffn_inp
    head = w.get("output.weight", w["token_embd.weight"])
    return norm(x, w["output_norm.weight"]) @ head.T


IDS = [0, 17, 45, 3, 200, 99, 150, 7, 250, 31, 64, 128]


def _ours(child: Path, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return load_pretrained(child)(torch.tensor([ids]))[0].double().numpy()


def test_every_per_layer_size_and_the_vocabulary(child_dir, tmp_path):
    out = export_gguf(child_dir, tmp_path / "c.gguf", dtype="f32")
    assert out.pre_tokenizer == "gpt-2" and out.path.is_file()
    assert not (tmp_path / "c.gguf.partial").exists()
    r = gguf.GGUFReader(str(out.path))
    kv = _fields(r)
    cfg = ModelConfig.from_json_file(child_dir / "config.json")
    hc, kvh, ff = _expected_layers(cfg)
    assert hc == [8, 8, 8, 0, 8, 8] and kvh == [0, 2, 0, 0, 8, 1] and ff == [96, 48, 32, 0, 160, 32]
    assert kv["general.architecture"] == "deci"
    assert kv["deci.attention.head_count"] == hc
    assert kv["deci.attention.head_count_kv"] == kvh
    assert kv["deci.feed_forward_length"] == ff
    assert kv["deci.block_count"] == 6 and kv["deci.embedding_length"] == HIDDEN
    assert kv["deci.attention.key_length"] == kv["deci.attention.value_length"] == HEAD_DIM
    assert kv["deci.rope.dimension_count"] == HEAD_DIM and kv["deci.rope.freq_base"] == 10000.0
    assert kv["deci.context_length"] == 256 and kv["deci.vocab_size"] == VOCAB
    assert kv["general.file_type"] == gguf.LlamaFileType.ALL_F32

    tok = json.loads((child_dir / "tokenizer.json").read_text())
    tokens = kv["tokenizer.ggml.tokens"]
    assert len(tokens) == VOCAB and len(kv["tokenizer.ggml.token_type"]) == VOCAB
    for text, i in tok["model"]["vocab"].items():
        assert tokens[i] == text
    n_real = len(tok["model"]["vocab"])
    assert tokens[n_real:] == [f"[PAD{i}]" for i in range(n_real, VOCAB)]  # rows the tokenizer never makes
    types = kv["tokenizer.ggml.token_type"]
    assert types[:3] == [gguf.TokenType.CONTROL] * 3 and types[3] == gguf.TokenType.NORMAL
    assert set(types[n_real:]) == {gguf.TokenType.UNUSED}
    assert kv["tokenizer.ggml.merges"] == [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert kv["tokenizer.ggml.padding_token_id"] == 2
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False


@pytest.mark.parametrize("dtype", ["f32", "f16", "bf16"])
def test_tensors_equal_ours_after_the_rope_permutation_inverse(child_dir, tmp_path, dtype):
    path = export_gguf(child_dir, tmp_path / f"c-{dtype}.gguf", dtype=dtype).path
    r = gguf.GGUFReader(str(path))
    kv = _fields(r)
    tensors = {t.name: t for t in r.tensors}
    sd = load_pretrained(child_dir).state_dict()
    cast = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "bf16": gguf.GGMLQuantizationType.BF16}[dtype]
    expected: dict[str, torch.Tensor] = {"token_embd.weight": sd["model.embed_tokens.weight"],
                                         "output_norm.weight": sd["model.norm.weight"],
                                         "output.weight": sd["lm_head.weight"]}
    for i, (a, f) in enumerate(CHILD_LAYERS):
        hf, b = f"model.layers.{i}.", f"blk.{i}."
        if a.kind == "gqa":
            expected |= {b + "attn_norm.weight": sd[hf + "input_layernorm.weight"],
                         b + "attn_q.weight": sd[hf + "self_attn.q_proj.weight"],
                         b + "attn_k.weight": sd[hf + "self_attn.k_proj.weight"],
                         b + "attn_v.weight": sd[hf + "self_attn.v_proj.weight"],
                         b + "attn_output.weight": sd[hf + "self_attn.o_proj.weight"]}
        elif a.kind == "linear":
            expected |= {b + "attn_norm.weight": sd[hf + "input_layernorm.weight"],
                         b + "attn_output.weight": sd[hf + "self_attn.linear_attn.weight"]}
        elif i == 0:  # the zero linear attention that stands in for layer 0's no_op
            expected |= {b + "attn_norm.weight": torch.ones(HIDDEN), b + "attn_output.weight": torch.zeros(HIDDEN, HIDDEN)}
        if f.kind == "swiglu":
            expected |= {b + "ffn_norm.weight": sd[hf + "post_attention_layernorm.weight"],
                         b + "ffn_gate.weight": sd[hf + "mlp.gate_proj.weight"],
                         b + "ffn_up.weight": sd[hf + "mlp.up_proj.weight"],
                         b + "ffn_down.weight": sd[hf + "mlp.down_proj.weight"]}
        elif kv["deci.feed_forward_length"][i]:  # the zero FFN (layers 2 and 5)
            z = ZERO_FFN_SIZE
            expected |= {b + "ffn_norm.weight": torch.ones(HIDDEN), b + "ffn_gate.weight": torch.zeros(z, HIDDEN),
                         b + "ffn_up.weight": torch.zeros(z, HIDDEN), b + "ffn_down.weight": torch.zeros(HIDDEN, z)}
    assert set(tensors) == set(expected)
    assert not any(n.startswith("blk.3.") for n in tensors)  # the whole no_op layer has no tensors
    for name, want in expected.items():
        t = tensors[name]
        assert tuple(int(n) for n in t.shape) == tuple(reversed(want.shape)), name  # GGUF lists ne0 first
        assert t.tensor_type == (gguf.GGMLQuantizationType.F32 if want.ndim == 1 else matrix_type), name
        got = torch.from_numpy(_array(t).copy()).reshape(want.shape)
        layer = int(name.split(".")[1]) if name.startswith("blk.") else None
        if name.endswith(("attn_q.weight", "attn_k.weight")):
            n = kv["deci.attention.head_count" if "attn_q" in name else "deci.attention.head_count_kv"][layer]
            got = unpermute_rope(got, n)
        ref = want.to(cast).float() if want.ndim > 1 else want.float()
        assert torch.equal(got, ref), name


def test_rope_permutation_is_llamacpp_pair_order_and_inverts():
    w = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(12, 3)  # 2 heads of d=6, 3 input columns
    p = permute_rope(w, 2)
    # head 0 rows (0,1,2 | 3,4,5) = (first half | second half) become pairs (0,3), (1,4), (2,5)
    assert [int(r[0]) // 3 for r in p] == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11]
    assert torch.equal(unpermute_rope(p, 2), w)


def test_the_file_computes_our_logits(child_dir, tmp_path):
    path = export_gguf(child_dir, tmp_path / "c.gguf", dtype="f32").path
    got, ours = _llamacpp_forward(path, IDS), _ours(child_dir, IDS)
    assert np.abs(got - ours).max() < 1e-4
    assert (got.argmax(-1) == ours.argmax(-1)).all()


def test_without_the_zero_ffn_the_last_layer_attention_would_be_lost(child_dir, tmp_path):
    """The zero FFN is not decoration: with feed_forward_length 0 the deci graph drops layer 5's attention."""
    path = export_gguf(child_dir, tmp_path / "c.gguf", dtype="f32").path
    r = gguf.GGUFReader(str(path), "r+")
    ff = r.fields["deci.feed_forward_length"]
    ff.parts[ff.data[5]][...] = 0  # rewrite the value in the memory-mapped copy
    r.data.flush()
    assert np.abs(_llamacpp_forward(path, IDS) - _ours(child_dir, IDS)).max() > 1e-2


def test_tied_embeddings_and_llama3_rope_scaling(tmp_path):
    _bpe_tokenizer(tmp_path / "tok")
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    parent = _parent(tie_word_embeddings=True, rope_scaling=scaling, rope_theta=500000.0,
                     block_configs=[BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(INTER))] * 2)
    child = save_pretrained(_child(parent, [(AttentionVariant.gqa(4), FFNVariant.exact(64)),
                                            (AttentionVariant.linear(), FFNVariant.noop())]),
                            tmp_path / "child", tokenizer_dir=tmp_path / "tok")
    path = export_gguf(child, tmp_path / "c.gguf", dtype="f32").path
    r = gguf.GGUFReader(str(path))
    names = {t.name for t in r.tensors}
    assert "output.weight" not in names  # tied: llama.cpp reuses token_embd
    freqs = next(_array(t) for t in r.tensors if t.name == "rope_freqs.weight").ravel()
    assert freqs.shape == (HEAD_DIM // 2,) and freqs.min() >= 1.0 and freqs.max() == pytest.approx(8.0)
    ids = list(range(3, 40))  # long enough that low frequencies pass the original 16-token context
    got, ours = _llamacpp_forward(path, ids), _ours(child, ids)
    assert np.abs(got - ours).max() < 1e-4


def test_linear_ffn_is_refused_naming_the_layer(tmp_path):
    _bpe_tokenizer(tmp_path / "tok")
    parent = _parent(block_configs=[BlockConfig(AttentionVariant.gqa(2), FFNVariant.exact(INTER))] * 3)
    child = save_pretrained(_child(parent, [(AttentionVariant.gqa(2), FFNVariant.exact(INTER)),
                                            (AttentionVariant.gqa(2), FFNVariant.exact(INTER)),
                                            (AttentionVariant.gqa(2), FFNVariant.linear())]),
                            tmp_path / "child", tokenizer_dir=tmp_path / "tok")
    with pytest.raises(GGUFExportError, match=r"block_configs\[2\]\.ffn\.replace_with_linear.*no linear FFN"):
        export_gguf(child, tmp_path / "c.gguf")
    assert not (tmp_path / "c.gguf").exists() and not (tmp_path / "c.gguf.partial").exists()
    assert main(["export", "gguf", str(child), str(tmp_path / "c.gguf")]) == 2


def test_tokenizers_llamacpp_cannot_hold_are_refused(tmp_path, capsys):
    """tinymodels' word-level vocabulary has no llama.cpp form; an unknown split regex needs --pre-tokenizer."""
    parent_dir = make_parent(tmp_path / "p")
    child = save_pretrained(load_parent(parent_dir), tmp_path / "word", tokenizer_dir=parent_dir)
    with pytest.raises(GGUFExportError, match="model.type 'WordLevel' is not allowed"):
        export_gguf(child, tmp_path / "w.gguf")

    from puzzle.data.tokenizer import save_tokenizer, train_tokenizer
    from tinymodels import write_text

    text = write_text(tmp_path / "scan.txt", n_lines=300).read_text()
    save_tokenizer(train_tokenizer([text], vocab_size=300), tmp_path / "tiny-tok", model_max_length=256)
    child = save_pretrained(_parent(), tmp_path / "own", tokenizer_dir=tmp_path / "tiny-tok")
    with pytest.raises(GGUFExportError, match=r"is not one llama.cpp implements.*nearest.*'superbpe'.*--pre-tokenizer"):
        export_gguf(child, tmp_path / "own.gguf")
    assert main(["export", "gguf", str(child), str(tmp_path / "own.gguf")]) == 2
    assert "--pre-tokenizer" in capsys.readouterr().err
    with pytest.raises(GGUFExportError, match="--pre-tokenizer: 'nope' is not allowed"):
        export_gguf(child, tmp_path / "own.gguf", pre_tokenizer="nope")
    s = export_gguf(child, tmp_path / "own.gguf", pre_tokenizer="superbpe")
    assert s.pre_tokenizer == "superbpe" and any("does not implement" in n for n in s.notes)
    assert gguf.GGUFReader(str(s.path)).fields["tokenizer.ggml.pre"].contents() == "superbpe"


def test_cli_writes_the_file_and_refuses_to_overwrite(child_dir, tmp_path, capsys):
    out = tmp_path / "c.gguf"
    assert main(["export", "gguf", str(child_dir), str(out), "--dtype", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert "head_count_kv       0 2 0 0 8 1" in printed and "feed_forward_length 96 48 32 0 160 32" in printed
    assert gguf.GGUFReader(str(out)).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16
    assert main(["export", "gguf", str(child_dir), str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["export", "gguf", str(child_dir), str(out), "--force", "--dtype", "f8"]) == 2
    assert "--dtype: 'f8' is not allowed" in capsys.readouterr().err
    assert main(["export", "gguf", str(tmp_path / "nowhere"), str(tmp_path / "x.gguf")]) == 2

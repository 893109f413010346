"""The BLD block library: content addressing, entries round-trip, and swapping blocks into a model.

Also holds the small-run helpers that tests/test_bld.py uses: a random 2-layer Llama parent saved with
safetensors (as transformers writes it) and a run with token shards in a file:// store.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from puzzle.config import parse_config
from puzzle.data.shards import write_shards
from puzzle.library import (
    RUN_RECORD_KEY,
    Library,
    LibraryError,
    digest_of,
    library_key,
    parent_weights_sha256,
)
from puzzle.model import AttentionVariant, FFNVariant, build_attention, build_ffn, load_parent
from puzzle.model import split_name as split_variant
from puzzle.run import create_run, runs_root_uri
from puzzle.store import open_store

torch.set_num_threads(1)

VOCAB = 64


def make_parent(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random LlamaForCausalLM (hidden 64, 4 heads / 2 KV heads, SwiGLU 128) saved with safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return path


def markov_tokens(n: int, seed: int) -> np.ndarray:
    """Tokens from a sparse random Markov chain: text with structure a model can pick up."""
    rng = np.random.default_rng(seed)
    nxt = rng.integers(0, VOCAB, size=(VOCAB, 3))
    out = np.empty(n, dtype=np.int32)
    t = 0
    for i in range(n):
        t = int(nxt[t, rng.integers(0, 3)])
        out[i] = t
    return out


def make_config(root: Path, parent: Path, **bld) -> dict:
    return {
        "name": "t",
        "parent": {"uri": str(parent), "dtype": "float32"},
        "data": {"distillation_uri": "unused.txt", "validation_uri": "unused.txt", "seq_len": 32},
        "search_space": {"attention": {"n_heads_in_group": [2, 4]}, "ffn": {"ffn_mult": [0.5, 1.0]}},
        "bld": {"tokens": 8 * 32 * 12, "batch_size": 8, "lr": 3e-3, "checkpoint_every": 5,
                "eval_tokens": 512, "calibration_tokens": 256, **bld},
        "profile": {"scenarios": [{"name": "cpu", "batch_size": 1, "input_len": 8, "output_len": 8}]},
        "store": {"uri": f"file://{root}"},
    }


def make_run(root: Path, parent: Path, run_id: str = "run-a", data_seed: int = 1, **bld) -> str:
    """A run with config.yaml and distillation/validation shards, as prepare leaves it."""
    config = parse_config(make_config(root, parent, **bld))
    uri = create_run(config, run_id=run_id)
    store = open_store(uri)
    write_shards(store, "distillation", markov_tokens(6000, data_seed), 4096, {"sha256": f"d{data_seed}"})
    write_shards(store, "validation", markov_tokens(1024, data_seed + 100), 4096, {"sha256": f"v{data_seed}"})
    return uri


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


def test_digest_depends_on_parent_data_and_hyperparameters_only(tmp_path, parent_dir):
    uri = make_run(tmp_path / "r1", parent_dir)
    store = open_store(uri)
    config = parse_config(make_config(tmp_path / "r1", parent_dir))
    key = library_key(store, config, parent_dir)
    assert key["parent_sha256"] == parent_weights_sha256(parent_dir)
    base = digest_of(key)
    # the same inputs in another store: the same library
    uri2 = make_run(tmp_path / "r2", parent_dir, run_id="run-b")
    assert digest_of(library_key(open_store(uri2), config, parent_dir)) == base
    # how units are cut and how often they checkpoint do not change a block
    c2 = parse_config(make_config(tmp_path, parent_dir, stage_layers=1, checkpoint_every=7))
    assert digest_of(library_key(store, c2, parent_dir)) == base
    # a hyperparameter, the data or the parent's weights do
    c3 = parse_config(make_config(tmp_path, parent_dir, lr=1e-4))
    assert digest_of(library_key(store, c3, parent_dir)) != base
    uri3 = make_run(tmp_path / "r3", parent_dir, run_id="run-c", data_seed=5)
    assert digest_of(library_key(open_store(uri3), config, parent_dir)) != base
    other = make_parent(tmp_path / "p2", seed=1)
    assert digest_of(library_key(store, config, other)) != base


def test_for_run_records_the_digest_beside_the_run(tmp_path, parent_dir):
    uri = make_run(tmp_path, parent_dir)
    store = open_store(uri)
    config = parse_config(make_config(tmp_path, parent_dir))
    with pytest.raises(LibraryError, match="parent_dir"):
        Library.for_run(store, config)
    lib = Library.for_run(store, config, parent_dir)
    assert lib.uri == f"file://{tmp_path}/library/{lib.digest}"
    assert store.get_json(RUN_RECORD_KEY)["digest"] == lib.digest
    assert lib.store.get_json("key.json")["parent_sha256"] == parent_weights_sha256(parent_dir)
    # later steps find it without the parent
    assert Library.for_run(store, config).digest == lib.digest


def test_entries_round_trip_and_apply_into_the_model(tmp_path, parent_dir):
    model = load_parent(parent_dir)
    cfg = model.config
    lib = Library(open_store(f"file://{tmp_path}/lib"), "x")
    torch.manual_seed(0)
    attn = build_attention(AttentionVariant.gqa(4), cfg)
    ffn = build_ffn(FFNVariant.from_mult(0.5, cfg.hidden_size), cfg)
    a_sd = {"input_layernorm.weight": torch.rand(64), **{f"self_attn.{k}": v for k, v in attn.state_dict().items()}}
    f_name = FFNVariant.from_mult(0.5, cfg.hidden_size).name
    f_sd = {"post_attention_layernorm.weight": torch.rand(64), **{f"mlp.{k}": v for k, v in ffn.state_dict().items()}}
    lib.save_block(1, "attn_g4", a_sd, {"initial_nmse": 0.5, "final_nmse": 0.1})
    lib.save_block(0, f_name, f_sd, {"initial_nmse": 0.4, "final_nmse": 0.2})
    lib.save_block(0, "attn_noop", {}, {"initial_nmse": 0.3, "final_nmse": 0.3})
    assert lib.entries() == sorted([(0, "attn_noop"), (0, f_name), (1, "attn_g4")])
    assert lib.has(1, "attn_g4") and not lib.has(0, "attn_g4")
    assert lib.meta(1, "attn_g4")["final_nmse"] == 0.1
    loaded = lib.load_block(1, "attn_g4")
    assert set(loaded) == set(a_sd) and all(torch.equal(loaded[k], a_sd[k]) for k in a_sd)
    assert lib.load_block(0, "attn_noop") == {}

    lib.apply(model, 1, "attn_g4")
    lib.apply(model, 0, f_name)
    lib.apply(model, 0, "attn_noop")
    assert [b.name for b in model.block_configs] == [f"attn_noop+{f_name}", "attn_g4+ffn_i128"]
    got = model.model.layers[1].sublayer_state_dict("attention")
    assert all(torch.equal(got[k], a_sd[k]) for k in a_sd)
    got = model.model.layers[0].sublayer_state_dict("ffn")
    assert all(torch.equal(got[k], f_sd[k]) for k in f_sd)
    # the parent's own variant needs no entry; anything else missing is an error naming it
    before = {k: v.clone() for k, v in model.model.layers[1].sublayer_state_dict("ffn").items()}
    lib.apply(model, 1, "ffn_i128")
    assert all(torch.equal(v, model.model.layers[1].sublayer_state_dict("ffn")[k]) for k, v in before.items())
    with pytest.raises(LibraryError, match=r"layer 1, variant 'attn_linear'"):
        lib.apply(model, 1, "attn_linear")
    with pytest.raises(LibraryError, match="outside the model"):
        lib.apply(model, 5, "attn_g4")


def test_names_and_roots_are_checked():
    assert split_variant("attn_g4+ffn_m0.5") == ("attn_g4", "ffn_m0.5")
    for bad in ("mlp_x", "ffn_m0.5+attn_g4", "attn_g4+attn_g2", ""):
        with pytest.raises(ValueError, match="not allowed"):
            split_variant(bad)
    assert runs_root_uri("s3://bucket/runs/tiny-1") == "s3://bucket/runs"
    with pytest.raises(ValueError, match="no parent folder"):
        runs_root_uri("s3://bucket")
    with pytest.raises(ValueError, match="layer"):
        Library.prefix(-1, "attn_g4")


def test_library_on_s3_lives_beside_the_runs(s3_bucket, tmp_path, parent_dir):
    """The same code path on a real S3 server (SeaweedFS): digest recorded, entry written and read back."""
    data = make_config(tmp_path, parent_dir)
    data["store"] = {"uri": f"{s3_bucket.uri}/runs"}
    config = parse_config(data)
    uri = create_run(config, run_id="run-s3")
    store = open_store(uri, config.store)
    write_shards(store, "distillation", markov_tokens(600, 1), 4096, {"sha256": "d"})
    write_shards(store, "validation", markov_tokens(200, 2), 4096, {"sha256": "v"})
    lib = Library.for_run(store, config, parent_dir)
    assert lib.uri == f"{s3_bucket.uri}/runs/library/{lib.digest}"
    sd = {"post_attention_layernorm.weight": torch.rand(64), "mlp.linear_mlp.weight": torch.rand(64, 64)}
    lib.save_block(0, "ffn_linear", sd, {"initial_nmse": 0.2, "final_nmse": 0.1})
    again = Library.for_run(open_store(uri, config.store), config)
    assert again.entries() == [(0, "ffn_linear")]
    got = again.load_block(0, "ffn_linear")
    assert all(torch.equal(got[k], sd[k]) for k in sd)

"""The serving engines' rules (puzzle.serving) as the config, prepare, the solver and save_pretrained
enforce them, and the configuration module every saved child carries.

Fast tests (no engine runs here; tests/test_serving_vllm.py serves a pipeline-built child with real
vLLM). transformers' ``AutoConfig`` with ``trust_remote_code=True`` runs in a subprocess, as a serving
engine would: the package itself never passes it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from puzzle import serving
from puzzle.cli import main
from puzzle.config import ConfigError, SearchSpaceConfig
from puzzle.model import (
    AttentionVariant,
    BlockConfig,
    DeciLMForCausalLM,
    FFNVariant,
    ModelConfig,
    expand_search_space,
    load_pretrained,
    save_pretrained,
)
from puzzle.model.io import CONFIG_MODULE_SOURCE
from tinymodels import make_parent, write_text

torch.set_num_threads(1)
A, F = AttentionVariant, FFNVariant


def _parent(hidden: int = 256, heads: int = 8, intermediate: int = 768, layers: int = 2) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=hidden, num_attention_heads=heads,
                       block_configs=[BlockConfig(A.gqa(2), F.exact(intermediate))] * layers)


def _space(serving_: object, *, attn_linear: bool = False, ffn_linear: bool = False, **ffn) -> SearchSpaceConfig:
    return SearchSpaceConfig.model_validate({
        "serving": serving_, "attention": {"n_heads_in_group": [2, 4], "replace_with_linear": attn_linear},
        "ffn": {"replace_with_linear": ffn_linear, "ffn_mult": [1.0, 2.0], **ffn}})


def _child(blocks: list[BlockConfig], hidden: int = 256, heads: int = 8) -> DeciLMForCausalLM:
    torch.manual_seed(0)
    return DeciLMForCausalLM(ModelConfig(vocab_size=64, hidden_size=hidden, num_attention_heads=heads,
                                         block_configs=blocks, bos_token_id=1, eos_token_id=2))


# ----- the rules, engine by engine -------------------------------------------------------------------


def test_config_names_the_engines_and_keeps_a_single_name_as_a_list_of_one():
    assert SearchSpaceConfig().serving == ["any"]
    assert _space("vllm").serving == ["vllm"]
    assert _space(["llamacpp", "vllm", "llamacpp"]).serving == ["llamacpp", "vllm"]
    # the config's names are the rule module's names
    field = SearchSpaceConfig.model_fields["serving"].annotation
    assert set(field.__args__[0].__args__) == set(serving.NAMES)
    with pytest.raises(ValueError, match=r"'any' beside engines"):
        _space(["any", "vllm"])
    with pytest.raises(ValueError, match=r"serving\.0"):
        _space(["tgi"])


@pytest.mark.parametrize("engines, attn_ok, ffn_ok", [
    (["any"], True, True),
    (["vllm"], False, False),
    (["sglang"], False, False),
    (["trtllm"], True, True),
    (["llamacpp"], True, False),
    (["trtllm", "llamacpp"], True, False),  # the union: llama.cpp has no linear FFN
    (["llamacpp", "vllm"], False, False),
])
def test_linear_blocks_follow_the_union_of_the_engines_rules(engines, attn_ok, ffn_ok):
    for attn_linear, ffn_linear, ok in ((True, False, attn_ok), (False, True, ffn_ok)):
        if ok:
            space = _space(engines, attn_linear=attn_linear, ffn_linear=ffn_linear)
            attn, ffn = expand_search_space(space, _parent())
            assert (A.linear() in attn) == attn_linear and (F.linear() in ffn) == ffn_linear
        else:
            part = "attention" if attn_linear else "ffn"
            blocker = next(e for e in engines if not getattr(serving.ENGINES[e], f"linear_{part}"))
            with pytest.raises(ValueError, match=rf"{part}\.replace_with_linear: value true breaks {blocker}'s rule "
                                                 rf".*allowed: false, or serving without {blocker}"):
                _space(engines, attn_linear=attn_linear, ffn_linear=ffn_linear)


def test_grid_engines_size_ffns_the_way_they_build_them():
    # hidden 256: ffn_mult 1.0 -> round_up(170, 256) = 256; 2.0 -> round_up(341, 256) = 512;
    # 4.0 -> 768, the parent's own size, so it is the parent's variant and not listed twice
    for engines in (["vllm"], ["trtllm"], ["vllm", "llamacpp"]):
        _, ffn = expand_search_space(_space(engines, ffn_mult=[1.0, 2.0, 4.0]), _parent())
        assert [v.intermediate_size for v in ffn if v.kind == "swiglu"] == [768, 256, 512]
        # named by size: every later step parses the name back to the module the engine builds
        assert [v.name for v in ffn] == ["ffn_i768", "ffn_i256", "ffn_i512", "ffn_noop"]
    # llama.cpp reads per-layer sizes: the finer rounding stays (2 * 256 / 3 = 170 -> 176)
    _, ffn = expand_search_space(_space(["llamacpp"], ffn_mult=[1.0]), _parent())
    assert ffn[1].intermediate_size == 176 and ffn[1].name == "ffn_m1.0"


def test_an_ffn_mult_off_the_grid_for_the_parent_names_field_engine_and_allowed_values():
    with pytest.raises(ConfigError, match=r"search_space\.ffn\.ffn_mult: value 3 breaks vllm's rule \(FFN sizes are "
                                          r"round_up\(int\(2\*ffn_mult\*hidden/3\), 256\), so ffn_mult 3 gives 512, "
                                          r"the same as ffn_mult 2\); allowed: one value per size \(at hidden_size 256: "
                                          r"256 up to ffn_mult 1.5, 512 up to ffn_mult 3, 768 up to ffn_mult 4.5\)"):
        expand_search_space(_space(["vllm"], ffn_mult=[1.0, 2.0, 3.0]), _parent())
    with pytest.raises(ConfigError, match=r"ffn_mult: value 0.001 breaks .* an empty FFN"):
        expand_search_space(_space(["trtllm"], ffn_mult=[0.001]), _parent())
    # a parent FFN off the grid cannot be offered as is
    with pytest.raises(ConfigError, match=r"search_space\.include_parent: value true breaks vllm's rule \(the parent's "
                                          r"own FFN has intermediate_size 700.*build 768\); allowed: false"):
        expand_search_space(_space(["vllm"], ffn_mult=[1.0]), _parent(intermediate=700))
    expand_search_space(_space(["llamacpp"], ffn_mult=[1.0, 2.0, 3.0]), _parent(intermediate=700))  # per-layer sizes
    space = SearchSpaceConfig.model_validate({**_space(["vllm"], ffn_mult=[1.0]).model_dump(), "include_parent": False})
    assert [v.intermediate_size for v in expand_search_space(space, _parent(intermediate=700))[1] if v.kind == "swiglu"] \
        == [256]


@pytest.mark.parametrize("engines, head_dim, ok", [
    (["vllm"], 24, False), (["vllm"], 32, True), (["vllm"], 48, False), (["trtllm"], 48, True),
    (["trtllm"], 512, False), (["llamacpp"], 24, True), (["llamacpp", "trtllm"], 24, False),
])
def test_head_sizes_per_engine(engines, head_dim, ok):
    parent = _parent(hidden=8 * head_dim, intermediate=512)
    if ok:
        expand_search_space(_space(engines, ffn_mult=[1.0]), parent)
    else:
        with pytest.raises(ConfigError, match=rf"parent\.uri: value head_dim {head_dim} breaks \w+'s rule .*support "
                                              rf"head sizes \[32, .*allowed: a parent with one of those head sizes"):
            expand_search_space(_space(engines, ffn_mult=[1.0]), parent)


def test_save_pretrained_checks_the_config_json_the_engine_reads(tmp_path):
    first_ffn = [BlockConfig(A.noop(), F.exact(256)), BlockConfig(A.gqa(2), F.exact(512))]
    with pytest.raises(ValueError, match=r"block_configs\[0\]\.attention\.no_op: value true breaks vllm's rule "
                                         r"\(vLLM's residual stream starts at the first attention"):
        save_pretrained(_child(first_ffn), tmp_path / "a", serving="vllm")
    assert not (tmp_path / "a").exists()
    save_pretrained(_child(first_ffn), tmp_path / "a", serving=["trtllm", "llamacpp"])  # theirs add residuals
    # a whole layer 0 dropped is fine: the stream then starts at layer 1's attention
    save_pretrained(_child([BlockConfig(A.noop(), F.noop()), *first_ffn[1:]]), tmp_path / "b", serving="vllm")
    off_grid = [BlockConfig(A.gqa(2), F.exact(384))]  # vLLM would build round_up(384, 256) = 512
    with pytest.raises(ValueError, match=r"block_configs\[0\]\.ffn\.intermediate_size: value 384 breaks trtllm's rule "
                                         r"\(TensorRT-LLM sizes FFNs as .*ffn_mult 2.25 loads as 512\)"):
        save_pretrained(_child(off_grid), tmp_path / "c", serving=["llamacpp", "trtllm"])
    save_pretrained(_child(off_grid), tmp_path / "c", serving="llamacpp")
    linear = [BlockConfig(A.linear(), F.linear())]
    save_pretrained(_child(linear), tmp_path / "d", serving="trtllm")
    with pytest.raises(ValueError, match=r"block_configs\[0\]\.ffn\.replace_with_linear: value true breaks llamacpp"):
        save_pretrained(_child(linear), tmp_path / "e", serving="llamacpp")
    with pytest.raises(ValueError, match=r"serving: value 'tgi' is not allowed; allowed: \['any', 'vllm'"):
        save_pretrained(_child(linear), tmp_path / "e", serving="tgi")


def test_the_solver_keeps_layer_0_attention_where_an_engine_needs_it():
    assert not serving.slot_allowed(["vllm"], 0, "attention", "attn_noop")
    assert not serving.slot_allowed(["llamacpp", "sglang"], 0, "block", "attn_noop+ffn_noop")
    assert serving.slot_allowed(["vllm"], 0, "attention", "attn_g2")
    assert serving.slot_allowed(["vllm"], 1, "attention", "attn_noop")
    assert serving.slot_allowed(["vllm"], 0, "ffn", "ffn_noop")
    assert serving.slot_allowed(["trtllm", "llamacpp"], 0, "attention", "attn_noop")
    assert serving.slot_allowed(["any"], 0, "block", "attn_noop+ffn_i256")


# ----- at the command line: validate and prepare exit 2 ----------------------------------------------


def _config(tmp_path: Path, parent: Path, search_space: str) -> Path:
    train = write_text(tmp_path / "train.txt", 60, seed=1)
    valid = write_text(tmp_path / "valid.txt", 40, seed=2)
    path = tmp_path / "run.yaml"
    path.write_text(f"""
name: t
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32, shard_tokens: 4096}}
search_space: {search_space}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}]}}
store: {{uri: "file://{tmp_path}/runs"}}
""")
    return path


def test_validate_and_prepare_exit_2_naming_the_rule(tmp_path, capsys):
    parent = make_parent(tmp_path / "parent", hidden=256, heads=8, kv_heads=4, intermediate=768)
    linear = _config(tmp_path, parent, "{serving: [vllm], ffn: {replace_with_linear: true}, "
                                       "attention: {replace_with_linear: false}}")
    assert main(["config", "validate", str(linear)]) == 2
    err = capsys.readouterr().err
    assert "ffn.replace_with_linear: value true breaks vllm's rule (vLLM has no replace_with_linear FFN); allowed: " \
        "false, or serving without vllm" in err and "\nsearch_space: " in err
    grid = _config(tmp_path, parent, "{serving: [vllm], ffn: {replace_with_linear: false, ffn_mult: [2.0, 3.0]}, "
                                     "attention: {replace_with_linear: false}}")
    assert main(["config", "validate", "--quiet", str(grid)]) == 0  # needs the parent to know
    assert main(["config", "validate", "--parent", str(grid)]) == 2
    err = capsys.readouterr().err
    assert "search_space.ffn.ffn_mult: value 3 breaks vllm's rule" in err and "allowed: one value per size" in err
    assert main(["run", str(grid), "--dry-run"]) == 2
    assert "search_space.ffn.ffn_mult: value 3 breaks vllm's rule" in capsys.readouterr().err
    assert main(["run", str(grid), "--steps", "prepare"]) == 2
    err = capsys.readouterr().err
    assert "search_space.ffn.ffn_mult: value 3 breaks vllm's rule" in err
    ok = _config(tmp_path, parent, "{serving: [vllm], ffn: {replace_with_linear: false, ffn_mult: [1.0, 2.0]}, "
                                   "attention: {replace_with_linear: false}}")
    assert main(["config", "validate", "--parent", "--quiet", str(ok)]) == 0


def test_the_tiny_example_targets_vllm_and_its_committed_parent_obeys_the_rules():
    """What prepare checks first, on the shipped example and parent (fails until the parent is retrained
    at the sizes of TinyParentConfig's defaults: hidden 256, head_dim 32, SwiGLU 768)."""
    from puzzle.config import load_config
    from puzzle.steps.prepare import read_parent_config

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "examples/tiny/puzzle.yaml")
    assert cfg.search_space.serving == ["vllm"]
    _, ffn = expand_search_space(cfg.search_space, read_parent_config(repo / cfg.parent.uri))
    assert [v.name for v in ffn] == ["ffn_i768", "ffn_i256", "ffn_i512", "ffn_noop"]


# ----- the configuration module every child carries ---------------------------------------------------

_READ_BACK = """
import json, sys
from transformers import AutoConfig
c = AutoConfig.from_pretrained(sys.argv[1], trust_remote_code=True)
b = c.block_configs
print(json.dumps({
    "class": type(c).__name__, "model_type": c.model_type, "head_dim": c.head_dim,
    "layers": c.num_hidden_layers, "rope_theta": c.rope_theta,
    "attr": [[x.attention.no_op, x.attention.n_heads_in_group, x.ffn.no_op, x.ffn.ffn_mult] for x in b],
    "dict": [[x["attention"]["no_op"], x["attention"]["n_heads_in_group"], x["ffn"]["no_op"], x["ffn"]["ffn_mult"]]
             for x in b],
    "has_size": [hasattr(x.ffn, "intermediate_size") for x in b],
    "json": json.loads(c.to_json_string())["block_configs"],
}))
"""


def test_every_child_carries_the_configuration_module_and_auto_map(tmp_path):
    blocks = [BlockConfig(A.gqa(2), F.exact(768)), BlockConfig(A.noop(), F.exact(256)),
              BlockConfig(A.gqa(4), F.noop())]
    out = save_pretrained(_child(blocks), tmp_path / "child", serving="vllm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_decilm.DeciLMConfig"}
    assert (out / "configuration_decilm.py").read_bytes() == CONFIG_MODULE_SOURCE.read_bytes()
    proc = subprocess.run([sys.executable, "-c", _READ_BACK, str(out)], check=False, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["class"] == "DeciLMConfig" and got["model_type"] == "nemotron-nas"
    assert got["head_dim"] == 32 and got["layers"] == 3 and got["rope_theta"] == 10000.0
    want = [[False, 2, False, 4.5], [True, None, False, 1.5], [False, 4, True, None]]
    assert got["attr"] == want and got["dict"] == want
    assert got["has_size"] == [True, True, False]  # only the keys config.json has read as attributes
    assert got["json"] == cfg["block_configs"]  # and it writes them back unchanged


def test_our_loader_never_runs_the_configuration_module(tmp_path):
    out = save_pretrained(_child([BlockConfig(A.gqa(2), F.exact(512))]), tmp_path / "child")
    (out / "configuration_decilm.py").write_text("raise SystemExit('puzzle must not import this')\n")
    model = load_pretrained(out)
    assert model.config.block_configs == [BlockConfig(A.gqa(2), F.exact(512))]

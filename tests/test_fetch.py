"""puzzle fetch: copies a complete child (which then loads and generates), refuses an incomplete or
unknown one, a changed file and a non-empty destination; exit status 2 with the reason."""

from __future__ import annotations

import torch
from puzzle.cli import main
from puzzle.context import run_step
from puzzle.model import load_pretrained
from puzzle.store import open_store
from test_assemble import make_run, unit

torch.set_num_threads(1)


def test_fetch_copies_a_complete_child_and_refuses_the_rest(tmp_path, capsys):
    run = make_run(tmp_path)
    assert run_step("assemble", run, unit(run, "sol-0"))
    store = open_store(run)

    dest = tmp_path / "out"
    assert main(["fetch", run, str(dest)]) == 0  # default: sol-0
    assert "fetched sol-0" in capsys.readouterr().out
    files = store.get_json("child/sol-0/complete.json")["files"]
    assert sorted(p.name for p in dest.iterdir()) == sorted(files)
    assert "complete.json" not in files
    child = load_pretrained(dest)
    assert [b.name for b in child.block_configs] == ["attn_g4+ffn_m0.5", "attn_linear+ffn_i160"]
    assert child.generate(torch.tensor([[4, 5]]), max_new_tokens=3).shape == (1, 5)

    # a child whose assemble never finished: files but no complete.json
    store.put_bytes("child/baseline-uniform-ffn/config.json", b"{}")
    assert main(["fetch", run, "--solution", "baseline-uniform-ffn", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "'baseline-uniform-ffn' is incomplete" in err and "['sol-0']" in err
    assert not (tmp_path / "x").exists()

    assert main(["fetch", run, "--solution", "sol-9", str(tmp_path / "y")]) == 2
    assert "child 'sol-9' is not in this run" in (err := capsys.readouterr().err) and "complete children: ['sol-0']" in err

    assert main(["fetch", run, str(dest)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert main(["fetch", run, str(dest), "--force"]) == 0
    capsys.readouterr()

    # a file replaced after assembly (a valid store write, but not what assemble recorded)
    store.put_text("child/sol-0/generation_config.json", '{"do_sample": true}')
    assert main(["fetch", run, str(tmp_path / "z")]) == 2
    assert "generation_config.json: its sha256 differs" in capsys.readouterr().err


def test_fetch_names_a_bad_run_uri(tmp_path, capsys):
    assert main(["fetch", f"file://{tmp_path}/nothing-here", str(tmp_path / "d")]) == 2
    assert "holds no run (no config.yaml)" in capsys.readouterr().err

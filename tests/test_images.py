"""The container images, checked by reading their Dockerfiles (no Docker daemon runs here).

Both images must install the package with the one shared command (images/install.sh: build the wheel,
pip install it), run as a numeric non-root user matching the pods' runAsUser, and have ENTRYPOINT puzzle.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from puzzle import argo

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = {"gpu": IMAGES / "Dockerfile.gpu", "cpu": IMAGES / "Dockerfile.cpu"}


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (op, _) in enumerate(ins) if op == "FROM")
    return ins[last_from:]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_numeric_non_root_user_matching_the_pods(kind):
    users = [arg for op, arg in final_stage(DOCKERFILES[kind]) if op == "USER"]
    assert users, f"{kind}: no USER in the final stage (the image would run as root)"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) != 0, f"{kind}: USER {users[-1]!r} must be a numeric non-zero uid"
    wt = argo.render_workflow_template()
    assert int(uid) == wt["spec"]["securityContext"]["runAsUser"]
    assert gid and int(gid) == wt["spec"]["securityContext"]["runAsGroup"]


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_entrypoint_is_the_puzzle_cli(kind):
    entry = [arg for op, arg in final_stage(DOCKERFILES[kind]) if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["puzzle"], "exec form, so pods' args go straight to the CLI"
    env = " ".join(arg for op, arg in final_stage(DOCKERFILES[kind]) if op == "ENV")
    assert "HOME=/tmp" in env  # the root filesystem is read-only in the pods


def test_both_images_install_with_the_same_shared_command():
    runs = {k: [arg for op, arg in instructions(p) if op == "RUN" and "install.sh" in arg] for k, p in DOCKERFILES.items()}
    assert runs["gpu"] and runs["gpu"] == runs["cpu"]
    assert runs["gpu"][0].startswith("sh /src/images/install.sh /src")
    for p in DOCKERFILES.values():
        copies = [arg for op, arg in instructions(p) if op == "COPY"]
        assert "images/install.sh /src/images/install.sh" in copies
        # No second, divergent install path (pip install -e, requirements files) in either image.
        others = [arg for op, arg in instructions(p) if op == "RUN" and "pip" in arg and "install.sh" not in arg]
        assert others == []


def test_install_script_builds_and_installs_the_wheel():
    script = (IMAGES / "install.sh").read_text()
    assert re.search(r"python -m pip wheel --no-deps --wheel-dir \S+ \"\$src\"", script)
    assert re.search(r"python -m pip install --no-cache-dir \S+/puzzle_k8s-\*\.whl", script)
    assert "set -eu" in script
    sh = shutil.which("sh")
    assert sh
    subprocess.run([sh, "-n", str(IMAGES / "install.sh")], check=True)  # parses as POSIX sh


def test_bases_are_cuda_pytorch_and_python_slim():
    gpu = dict(a.split("=", 1) for op, a in instructions(DOCKERFILES["gpu"]) if op == "ARG" and "=" in a)
    cpu = dict(a.split("=", 1) for op, a in instructions(DOCKERFILES["cpu"]) if op == "ARG" and "=" in a)
    assert gpu["BASE_IMAGE"].startswith("pytorch/pytorch:") and "cuda" in gpu["BASE_IMAGE"]
    assert re.match(r"python:3\.1[1-9]-slim", cpu["BASE_IMAGE"])
    assert "whl/cpu" in cpu["TORCH_INDEX_URL"]


def test_ci_installs_the_package_the_way_the_images_do():
    """CI runs the images' install script, so a broken wheel build or requirement fails CI, not a pod."""
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    lines = [ln.strip() for ln in ci.splitlines() if not ln.strip().startswith("#")]
    assert "sh images/install.sh ." in lines


def test_ci_runs_the_readme_test_command_and_the_readme_starts_with_two_commands():
    """The README's first block is the install-and-run command and the test command; CI's last command is
    exactly that test command (issue #19: the README's command must pass on a fresh machine as written)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text(encoding="utf-8")
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(commands) == 2, commands
    assert commands[0].endswith("puzzle run examples/tiny/puzzle.yaml"), commands[0]
    ci = [ln.strip() for ln in (root / ".ci" / "run").read_text().splitlines()
          if ln.strip() and not ln.strip().startswith("#")]
    assert ci[-1] == commands[1].strip(), (ci[-1], commands[1])

"""Security (issue 10): no secret in any rendered manifest, log line, metric or artifact; every pod of every
rendered template meets the Kubernetes "restricted" Pod Security Standard; RBAC within the allow-list;
weights only as safetensors, never ``trust_remote_code``; keys and run ids cannot leave their root.

The chart is rendered with real Helm (tests/test_chart.py's ``render``); the checks are those of
tests/manifests.py: the RBAC allow-list and the WorkflowTemplate lock-down (``rbac_violations``,
``security_problems``, also used by test_chart.py and test_argo.py), and ``restricted_pss_problems``,
which adds what those leave out: every pod-bearing object, host namespaces and paths, privileged mode,
added capabilities, volume types.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from manifests import rbac_violations, restricted_pss_problems, security_problems
from puzzle import argo
from puzzle.commands.submit import build_workflow
from puzzle.config import ConfigError, load_config_text
from puzzle.run import create_run, run_id_of
from puzzle.store import InvalidKeyError, open_store, validate_key
from services import ACCESS_KEY, SECRET_KEY
from test_chart import SCENARIOS, render
from test_reliability import CHILD_ENV, bld_unit, config_text
from tinymodels import make_parent

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "jobs" / "puzzle"
SENTINEL = "s3cr3t-SENTINEL-0f9e8d7c6b5a"


@pytest.fixture(scope="module")
def parent_dir(tmp_path_factory) -> Path:
    return make_parent(tmp_path_factory.mktemp("parent"))


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {p.name: render(yaml.safe_load(p.read_text()) or {}) for p in SCENARIOS}


def test_every_rendered_pod_meets_the_restricted_standard(rendered):
    for scenario, docs in rendered.items():
        assert restricted_pss_problems(docs) == [], scenario
        wt = next(d for d in docs if d["kind"] == "WorkflowTemplate")
        assert security_problems(wt) == [], scenario
        assert rbac_violations(docs) == [], scenario
        # every leaf template runs a container checked above
        leaves = [t for t in wt["spec"]["templates"] if "dag" not in t and "steps" not in t]
        assert leaves and all("container" in t for t in leaves), scenario
    # nothing that mounts the node or shares its namespaces anywhere in any manifest
    text = json.dumps(rendered)
    for word in ("hostPath", "hostNetwork", "hostPID", "hostIPC", "hostPort", "privileged"):
        assert word not in text, word


@pytest.mark.parametrize(("mutate", "expected"), [
    (lambda wt: wt["spec"].__setitem__("hostNetwork", True), "pod hostNetwork is set"),
    (lambda wt: wt["spec"]["volumes"].append({"name": "node", "hostPath": {"path": "/"}}), "['hostPath']"),
    (lambda wt: wt["spec"]["templates"][0]["container"]["securityContext"].__setitem__("privileged", True),
     "privileged"),
    (lambda wt: wt["spec"]["templates"][0]["container"]["securityContext"]["capabilities"].__setitem__(
        "add", ["SYS_ADMIN"]), "capabilities.add ['SYS_ADMIN']"),
    (lambda wt: wt["spec"]["templates"][1].__setitem__(
        "podSpecPatch", '{"hostPID": true, "containers": [{"name": "main", "resources": {}}]}'), "hostPID"),
    (lambda wt: wt["spec"]["templates"][0]["container"]["env"].append(
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}), "has a literal value"),
    (lambda wt: [wt["spec"]["securityContext"].pop("seccompProfile"),
                 wt["spec"]["templates"][0]["container"]["securityContext"].pop("seccompProfile")],
     "seccompProfile.type must be"),
])
def test_the_check_catches_a_weakened_pod(rendered, mutate, expected):
    docs = json.loads(json.dumps(rendered["default-values.yaml"]))
    mutate(next(d for d in docs if d["kind"] == "WorkflowTemplate"))
    problems = restricted_pss_problems(docs)
    assert any(expected in p for p in problems), problems


def test_a_deployment_is_checked_too():
    pod = {"hostNetwork": True, "containers": [{"name": "c", "image": "x", "securityContext": {}}]}
    docs = [{"kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {"spec": pod}}}]
    problems = restricted_pss_problems(docs)
    assert any("hostNetwork" in p for p in problems) and any("allowPrivilegeEscalation" in p for p in problems)


def test_template_names_are_unique():
    names = [t["name"] for t in argo.render_workflow_template()["spec"]["templates"]]
    assert len(names) == len(set(names)), names


# ----- secrets --------------------------------------------------------------------------------------
def test_no_secret_in_any_rendered_manifest(monkeypatch):
    """Credentials in the environment of whoever renders, and a custom credentials Secret name: the
    manifests carry the Secret's name and key names only, never a value."""
    for k, v in {"AWS_SECRET_ACCESS_KEY": SENTINEL, "AWS_ACCESS_KEY_ID": SENTINEL + "-id",
                 "AWS_SESSION_TOKEN": SENTINEL + "-token"}.items():
        monkeypatch.setenv(k, v)
    for scenario in SCENARIOS:
        values = yaml.safe_load(scenario.read_text()) or {}
        values.setdefault("s3", {})["secretName"] = "team-s3-credentials"
        text = json.dumps(render(values))
        assert SENTINEL not in text, scenario.name
        assert "team-s3-credentials" in text
    wt = json.dumps(argo.render_workflow_template())
    assert SENTINEL not in wt
    refs = [e for t in argo.render_workflow_template()["spec"]["templates"] if "container" in t
            for e in t["container"].get("env", []) if e["name"].startswith("AWS_") and "KEY" in e["name"]]
    assert refs and all(set(e) == {"name", "valueFrom"} and "secretKeyRef" in e["valueFrom"] for e in refs)
    workflow = build_workflow(store_prefix="s3://b/runs", run_id="t-1", namespace="ml")
    assert SENTINEL not in json.dumps(workflow)


def test_chart_values_have_no_place_for_a_secret():
    import helm_python as helm

    with helm.Chart.load(ROOT / "charts" / "puzzle") as chart:
        for bad in ({"s3": {"secretAccessKey": SENTINEL}}, {"s3": {"accessKeyId": SENTINEL}},
                    {"artifactRepository": {"secretKey": SENTINEL}}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_config_has_no_place_for_a_secret(tmp_path, parent_dir):
    text = config_text(tmp_path, parent_dir, "s3://bucket/runs")
    text = text.replace('store: {uri: "s3://bucket/runs"}',
                        f'store: {{uri: "s3://bucket/runs", secret_access_key: {SENTINEL}}}')
    with pytest.raises(ConfigError, match="store.secret_access_key: unknown key") as err:
        load_config_text(text)
    assert SENTINEL not in str(err.value), "an error message does not echo a rejected secret"


@pytest.mark.parametrize("verbose", [False, True], ids=["info", "debug"])
def test_no_secret_in_logs_metrics_or_artifacts(tmp_path, parent_dir, s3_bucket, verbose):
    """prepare and a bld unit on S3 with the credentials in the environment, as in a pod: the secret key
    appears in no log line (even with -v, where botocore logs its requests), no metric, no stored object."""
    text = config_text(tmp_path, parent_dir, f"s3://{s3_bucket.name}/runs", bld_steps=10)
    uri = create_run(load_config_text(text), text, run_id="secrets")
    v = ["-v"] if verbose else []
    logs = ""
    for argv in (["step", "prepare", "--run", uri], None):
        if argv is None:
            argv = ["step", "bld", "--run", uri, "--unit", json.dumps(bld_unit(uri))]
        r = subprocess.run([sys.executable, "-m", "puzzle.cli", *v, *argv], env={**os.environ, **CHILD_ENV},
                           capture_output=True, text=True, timeout=300, check=False)
        assert r.returncode == 0, r.stderr[-3000:]
        logs += r.stdout + r.stderr
    assert SECRET_KEY not in logs
    if not verbose:
        assert ACCESS_KEY not in logs
    store = open_store(uri)
    keys = store.list()
    assert any(k.startswith("metrics/") for k in keys) and any(k.startswith("done/bld/") for k in keys)
    for k in keys:
        body = store.get_bytes(k)
        assert SECRET_KEY.encode() not in body and ACCESS_KEY.encode() not in body, k


# ----- weights and code loading ---------------------------------------------------------------------
def unsafe_loading(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from a file: torch.load without weights_only=True, pickle and friends,
    numpy allow_pickle, yaml.load without a safe loader, and trust_remote_code=True anywhere."""
    bad = []
    tree = ast.parse(source, filename)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for mod in mods:
                if mod.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"):
                    bad.append(f"{filename}:{node.lineno}: imports {mod}")
        if not isinstance(node, ast.Call):
            continue
        kw = {k.arg: k.value for k in node.keywords}
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""

        def const(k: str, kw: dict = kw) -> object:
            return isinstance(kw.get(k), ast.Constant) and kw[k].value

        if const("trust_remote_code") is True or ("trust_remote_code" in kw and not isinstance(kw["trust_remote_code"], ast.Constant)):
            bad.append(f"{filename}:{node.lineno}: trust_remote_code is set")
        if owner == "torch" and name == "load" and const("weights_only") is not True:
            bad.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        if owner in ("np", "numpy") and name == "load" and const("allow_pickle") is True:
            bad.append(f"{filename}:{node.lineno}: numpy.load(allow_pickle=True)")
        if owner == "yaml" and name in ("load", "load_all", "unsafe_load", "full_load"):
            loader = kw.get("Loader")
            if name != "load" or not (isinstance(loader, ast.Attribute) and loader.attr in ("SafeLoader", "CSafeLoader")):
                bad.append(f"{filename}:{node.lineno}: yaml.{name} without SafeLoader")
    return bad


def test_the_package_loads_no_pickle_and_no_remote_code():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 30
    problems = [p for f in files for p in unsafe_loading(f.read_text(encoding="utf-8"), str(f.relative_to(ROOT)))]
    assert problems == []
    text = "\n".join(f.read_text(encoding="utf-8") for f in files)
    assert "trust_remote_code=True" not in text


@pytest.mark.parametrize(("source", "expected"), [
    ("import torch\ntorch.load('x')", "torch.load without weights_only=True"),
    ("import torch\ntorch.load('x', weights_only=False)", "torch.load without weights_only=True"),
    ("import pickle", "imports pickle"),
    ("from joblib import load", "imports joblib"),
    ("AutoModel.from_pretrained('x', trust_remote_code=True)", "trust_remote_code is set"),
    ("import numpy as np\nnp.load('x', allow_pickle=True)", "allow_pickle"),
    ("import yaml\nyaml.load(s)", "yaml.load without SafeLoader"),
    ("import yaml\nyaml.unsafe_load(s)", "yaml.unsafe_load without SafeLoader"),
])
def test_the_loading_check_catches_unsafe_code(source, expected):
    assert any(expected in p for p in unsafe_loading(source)), unsafe_loading(source)
    assert unsafe_loading("import torch\ntorch.load('x', weights_only=True)\nimport yaml\n"
                          "yaml.load(s, Loader=yaml.SafeLoader)") == []


# ----- keys and run ids -----------------------------------------------------------------------------
KEY_CHARS = st.sampled_from(list("ab/.\\\x00\n -_~") + ["..", ".puzzle-", "%2e"])


@given(st.lists(KEY_CHARS, min_size=0, max_size=12).map("".join))
def test_no_key_reaches_outside_the_store_root(tmp_path_factory, key):
    root = tmp_path_factory.getbasetemp() / "keys-root"
    store = open_store(f"file://{root}")
    try:
        validate_key(key)
    except InvalidKeyError:
        return
    path = store._path(key).resolve()
    assert path.is_relative_to(root.resolve()) and path != root.resolve(), key


@given(st.lists(st.sampled_from(list("ab-/.") + [".."]), min_size=1, max_size=10).map("".join))
def test_no_run_uri_with_traversal_is_accepted(tmp_path_factory, tail):
    from puzzle.run import RUN_ID_RE

    uri = f"file://{tmp_path_factory.getbasetemp() / 'ids-root'}/{tail}"
    try:
        rid = run_id_of(uri)
    except ConfigError:
        return
    assert RUN_ID_RE.match(rid) and ".." not in uri.split("/"), uri

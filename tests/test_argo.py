"""The Argo WorkflowTemplate rendered from the pipeline DAG (jobs/puzzle/argo.py).

The committed charts/puzzle/files/workflowtemplate.yaml is a golden file: a fresh render must equal it.
PUZZLE_REGENERATE_GOLDEN=1 rewrites it (refused under CI). No cluster runs here: the template is checked
with Hera's Argo models and by reading it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections import Counter
from pathlib import Path

import manifests
import pytest
import yaml
from puzzle import argo, pipeline
from puzzle.commands import render_workflow
from puzzle.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
#: The one committed render; the chart ships it (tests/test_chart.py renders the chart around it).
GOLDEN = ROOT / "charts" / "puzzle" / "files" / "workflowtemplate.yaml"


@pytest.fixture(scope="module")
def rendered_text() -> str:
    return argo.render_workflow_template_yaml()


@pytest.fixture(scope="module")
def wt(rendered_text) -> dict:
    return yaml.safe_load(rendered_text)


def templates(wt: dict) -> dict[str, dict]:
    return {t["name"]: t for t in wt["spec"]["templates"]}


def test_template_name_is_versioned():
    assert argo.template_name("0.1.0") == "puzzle-v0-1-0"
    assert argo.template_name("1.2.0rc1+local") == "puzzle-v1-2-0rc1-local"


# ---------------------------------------------------------------- golden file


def test_committed_workflow_template_matches_a_fresh_render(rendered_text):
    if os.environ.get("PUZZLE_REGENERATE_GOLDEN") == "1":
        if os.environ.get("CI"):
            pytest.fail("PUZZLE_REGENERATE_GOLDEN is refused under CI: regenerate locally and commit")
        GOLDEN.write_text(rendered_text, encoding="utf-8")
    assert GOLDEN.read_text(encoding="utf-8") == rendered_text, (
        f"{GOLDEN.relative_to(ROOT)} is stale: run `puzzle render-workflow` (or PUZZLE_REGENERATE_GOLDEN=1)")
    assert ROOT / render_workflow.DEFAULT_OUT == GOLDEN, "render-workflow writes the file this test checks"
    assert not (ROOT / "k8s" / "workflowtemplate.yaml").exists(), "the template is committed once, in the chart"


def test_render_workflow_command_writes_and_checks(tmp_path, rendered_text, capsys):
    parser = argparse.ArgumentParser()
    render_workflow.register(parser.add_subparsers())
    out = tmp_path / "files" / "workflowtemplate.yaml"
    out.parent.mkdir()
    argv = ["render-workflow", "--out", str(out)]
    check = parser.parse_args(argv + ["--check"])
    assert check.func(check) == 1  # nothing written yet: stale
    args = parser.parse_args(argv)
    assert args.func(args) == 0
    assert out.read_text() == rendered_text
    assert check.func(check) == 0
    out.write_text(rendered_text.replace("bld", "bdl"))
    assert check.func(check) == 1
    assert f"{out}: differs from a fresh render" in capsys.readouterr().err
    missing = parser.parse_args(["render-workflow", "--out", str(tmp_path / "nowhere" / "wt.yaml")])
    with pytest.raises(UserError, match="--out: directory .*nowhere' does not exist"):
        missing.func(missing)
    assert parser.parse_args(["render-workflow"]).out == render_workflow.DEFAULT_OUT


# ---------------------------------------------------------------- Argo model and agreement with pipeline.py


def test_workflow_template_parses_with_argo_models_and_has_no_unknown_fields(wt):
    assert manifests.argo_unknown_fields(wt) == []
    bad = copy.deepcopy(wt)
    bad["spec"]["templates"][0]["container"]["imagePullPolicyy"] = "Always"
    assert manifests.argo_unknown_fields(bad) == [".spec.templates[0].container.imagePullPolicyy"]


def test_steps_parameters_and_dependencies_agree_with_pipeline(wt):
    ts = templates(wt)
    leaves = {n for n, t in ts.items() if "container" in t}
    assert leaves == {s.name for s in pipeline.STEPS} | {"exit-handler"}
    assert wt["spec"]["onExit"] == "exit-handler"
    params = {p["name"]: p.get("value") for p in wt["spec"]["arguments"]["parameters"]}
    assert params == {n: d for n, (d, _) in argo.WORKFLOW_PARAMETERS.items()}

    # Flatten the main DAG and the per-unit chain DAGs into step -> dependencies.
    main = {t["name"]: t for t in ts["main"]["dag"]["tasks"]}
    deps: dict[str, set[str]] = {}
    for task in main.values():
        chain = ts[task["template"]]
        task_deps = {d.strip() for d in task.get("depends", "").split("&&") if d.strip()}
        if "dag" in chain:
            inner = chain["dag"]["tasks"]
            for j, sub in enumerate(inner):
                deps[sub["template"]] = (
                    {ts[x]["dag"]["tasks"][-1]["template"] if "dag" in ts.get(x, {}) else x for x in task_deps}
                    if j == 0 else {sub["depends"]}
                )
        else:
            deps[task["template"]] = {
                ts[x]["dag"]["tasks"][-1]["template"] if "dag" in ts[main[x]["template"]] else x
                for x in task_deps
            }
    assert deps == {s.name: set(s.depends) for s in pipeline.STEPS}

    for s in pipeline.STEPS:
        leaf = ts[s.name]
        args = leaf["container"]["args"]
        assert args[:4] == ["step", s.name, "--run", argo.RUN_URI]
        assert leaf["activeDeadlineSeconds"] == s.active_deadline_seconds
        outputs = {p["name"]: p["valueFrom"]["path"] for p in leaf.get("outputs", {}).get("parameters", [])}
        assert outputs == {n: f"{argo.OUTPUTS_DIR}/{n}.json" for n in s.produces}
        if s.produces:
            assert args[args.index("--outputs") + 1] == argo.OUTPUTS_DIR
        if s.distributed:  # one template serves 1 GPU (in-process) and N (torchrun) alike
            assert args[args.index("--nproc-per-node") + 1] == "{{workflow.parameters.gpu-count}}"
        else:
            assert "--nproc-per-node" not in args
        if s.fan_out:
            assert args[args.index("--unit") + 1] == "{{inputs.parameters.unit}}"
            task = main[argo.dag_task_of(s.name)]
            producer = pipeline.producer_of(s.fan_out)
            assert task["withParam"] == f"{{{{tasks.{producer.name}.outputs.parameters.{s.fan_out}}}}}"
            assert task["arguments"]["parameters"] == [{"name": "unit", "value": "{{item}}"}]
        else:
            assert "--unit" not in args and "inputs" not in leaf


def test_gpu_steps_use_the_semaphore_and_gpu_pod_patch(wt):
    for s in pipeline.STEPS:
        t = templates(wt)[s.name]
        if s.gpu:
            sem = t["synchronization"]["semaphores"]
            assert sem == [{"configMapKeyRef": {"name": argo.SEMAPHORE_CONFIGMAP, "key": argo.GPU_SEMAPHORE_KEY}}]
            patch = json.loads(manifests.substitute(t["podSpecPatch"], {
                "workflow.parameters.gpu-node-selector": '{"gpu": "h100"}',
                "workflow.parameters.gpu-tolerations": '[{"key": "nvidia.com/gpu", "operator": "Exists"}]',
                "workflow.parameters.gpu-resource": "nvidia.com/gpu",
                "workflow.parameters.gpu-count": "1",
            }))
            assert patch["containers"] == [{"name": "main", "resources": {"limits": {"nvidia.com/gpu": "1"}}}]
            assert patch["nodeSelector"] == {"gpu": "h100"}
            assert patch["tolerations"][0]["operator"] == "Exists"
            assert t["container"]["image"] == "{{workflow.parameters.image}}"
        else:
            assert "synchronization" not in t and "podSpecPatch" not in t
            assert t["container"]["image"] == "{{workflow.parameters.cpu-image}}"


def test_retry_strategy_retries_errors_but_never_bad_input(wt):
    for t in templates(wt).values():
        if "container" not in t:
            continue
        r = t["retryStrategy"]
        assert r["retryPolicy"] == "Always" and int(r["limit"]) >= 1
        assert r["affinity"] == {"nodeAntiAffinity": {}}
        assert r["backoff"]["duration"] and r["backoff"]["maxDuration"]
        # Argo evaluates this with exitCode as a string; emulate it for the codes the steps use.
        expr = r["expression"]
        assert expr == 'lastRetry.exitCode != "2"'
        retried = {code: eval(expr.replace("lastRetry.exitCode", repr(code))) for code in ("0", "1", "2", "137", "-1")}
        assert retried == {"0": True, "1": True, "2": False, "137": True, "-1": True}


def test_metrics_pod_gc_deadlines_and_artifacts(wt):
    spec = wt["spec"]
    assert spec["podGC"]["strategy"] == "OnPodSuccess"
    assert spec["artifactRepositoryRef"] == {
        "configMap": argo.ARTIFACT_REPOSITORY_CONFIGMAP, "key": argo.ARTIFACT_REPOSITORY_KEY}
    for s in pipeline.STEPS:
        t = templates(wt)[s.name]
        names = {m["name"]: m for m in t["metrics"]["prometheus"]}
        assert names["puzzle_step_duration_seconds"]["gauge"]["value"] == "{{duration}}"
        assert {"key": "status", "value": "{{status}}"} in names["puzzle_step_result_total"]["labels"]
        for a in t.get("outputs", {}).get("artifacts", []):
            assert set(a["s3"]) == {"key"}, "artifacts are key-only: the bucket comes from artifactRepositoryRef"
    report = templates(wt)["report"]["outputs"]["artifacts"]
    assert {a["path"] for a in report} == {f"{argo.OUTPUTS_DIR}/report.html", f"{argo.OUTPUTS_DIR}/report.json"}


# ---------------------------------------------------------------- security and quantities


def test_every_pod_is_locked_down(wt):
    assert manifests.security_problems(wt) == []
    for t in templates(wt).values():
        if "container" in t:
            env = {e["name"]: e for e in t["container"]["env"]}
            assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["key"] == "AWS_ACCESS_KEY_ID"
            assert env["AWS_ENDPOINT_URL"]["value"] == "{{workflow.parameters.s3-endpoint-url}}"


@pytest.mark.parametrize("mutate, expected", [
    (lambda t: t["container"].pop("securityContext"), "securityContext is missing"),
    (lambda t: t["container"]["securityContext"].update(readOnlyRootFilesystem=False), "readOnlyRootFilesystem"),
    (lambda t: t["container"]["securityContext"]["capabilities"].update(drop=["NET_RAW"]), "capabilities.drop"),
    (lambda t: t["container"]["securityContext"].pop("allowPrivilegeEscalation"), "allowPrivilegeEscalation"),
    (lambda t: t["container"]["env"].__setitem__(0, {"name": "AWS_ACCESS_KEY_ID", "value": "AKIA..."}),
     "secretKeyRef"),
])
def test_security_check_catches_a_weakened_template(wt, mutate, expected):
    bad = copy.deepcopy(wt)
    mutate(templates(bad)["bld"])
    assert any(expected in p for p in manifests.security_problems(bad))


def test_resource_quantities_are_quoted_strings(wt, rendered_text):
    assert manifests.unquoted_quantities(wt) == []
    assert "gpu-count}}\\\"" not in rendered_text  # the patch is one JSON string, not YAML
    bad = copy.deepcopy(wt)
    templates(bad)["prepare"]["container"]["resources"]["requests"]["cpu"] = 2
    assert manifests.unquoted_quantities(bad) == ["spec.templates[0].container.resources.requests.cpu"]
    bad = copy.deepcopy(wt)
    templates(bad)["bld"]["podSpecPatch"] = templates(bad)["bld"]["podSpecPatch"].replace(
        '"{{workflow.parameters.gpu-count}}"', "{{workflow.parameters.gpu-count}}")
    assert any("limits.nvidia.com/gpu" in p for p in manifests.unquoted_quantities(bad))


def test_argo_expressions_only_name_declared_parameters(rendered_text):
    exprs = Counter(manifests.ARGO_EXPR.findall(rendered_text))
    params = {m[len("{{workflow.parameters."):-2] for m in exprs if m.startswith("{{workflow.parameters.")}
    assert params <= set(argo.WORKFLOW_PARAMETERS)
    assert {"run-id", "store-prefix", "gpu-count", "gpu-tolerations"} <= params

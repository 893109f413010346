"""The Helm chart (charts/puzzle), rendered with real Helm (helm-python-sdk bundles Helm's Go SDK).

Every ci/*-values.yaml scenario is rendered; core objects are validated with kubernetes-validate (strict,
Kubernetes KUBE_VERSION), the WorkflowTemplate with Hera's Argo models. kubernetes-validate ships no
schemas for the Prometheus Operator CRDs (ServiceMonitor, PodMonitor, PrometheusRule): those are checked
field by field below instead.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import manifests
import pytest
import yaml
from puzzle import argo
from puzzle.commands import render_workflow

# test extras, absent where only the runtime is installed (the GPU machine): skip, not a collection error
helm = pytest.importorskip("helm_python", reason="helm-python-sdk (a test extra) is not installed")
kubernetes_validate = pytest.importorskip("kubernetes_validate",
                                          reason="kubernetes-validate (a test extra) is not installed")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "puzzle"
SCENARIOS = sorted(CHART.glob("ci/*-values.yaml"))
KUBE_VERSION = "1.33.0"
CRD_KINDS = {"WorkflowTemplate", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
#: Metric names the dashboard and alerts assume; steps push them (see README.md, "Run on Kubernetes").
STEP_METRICS = {"puzzle_bld_loss", "puzzle_bld_tokens_per_second", "puzzle_bld_tokens_total",
                "puzzle_bld_target_tokens", "puzzle_solve_objective"}
ARGO_METRICS = {"puzzle_step_duration_seconds", "puzzle_step_result_total"}
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
APP_VERSION = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
#: The least a render needs: no image is published and no registry is assumed, so both repositories are set.
MINIMAL = yaml.safe_load((CHART / "ci" / "default-values.yaml").read_text())


def render(values: dict | None = None, name: str = "puzzle", namespace: str = "ml") -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(values or {})
        out = chart.render(values or {}, name=name, namespace=namespace)
    docs = []
    for path, text in sorted(out.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs += [d for d in yaml.safe_load_all(text) if d]
    return docs


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {p.name: render(yaml.safe_load(p.read_text()) or {}) for p in SCENARIOS}


def test_scenarios_exist():
    assert {p.name for p in SCENARIOS} >= {
        "default-values.yaml", "gpu-tolerations-values.yaml", "monitoring-on-values.yaml"}


def test_every_object_validates(rendered):
    for scenario, docs in rendered.items():
        kinds = Counter(d["kind"] for d in docs)
        assert kinds["WorkflowTemplate"] == 1, scenario
        assert kinds["ConfigMap"] >= 1, scenario
        for d in docs:
            where = f"{scenario}: {d['kind']} {d['metadata']['name']}"
            name = d["metadata"]["name"]
            assert len(name) <= 63 and DNS_LABEL.match(name), where
            if d["kind"] in CRD_KINDS:
                continue
            try:
                kubernetes_validate.validate(d, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as err:
                pytest.fail(f"{where}: {err.message}")


def test_strict_validation_catches_a_bad_object():
    bad = by_kind(render(MINIMAL), "ServiceAccount")[0]
    bad["automountServiceAccountTokens"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSION, strict=True)


def test_workflow_template_survives_helm_unchanged_except_named_fields(rendered):
    """Argo's {{...}} reaches the cluster verbatim: the file is parsed as data, never as a template."""
    source = yaml.safe_load((CHART / "files" / "workflowtemplate.yaml").read_text())
    source_exprs = Counter(manifests.ARGO_EXPR.findall(json.dumps(source)))
    for scenario, docs in rendered.items():
        wt = by_kind(docs, "WorkflowTemplate")[0]
        assert Counter(manifests.ARGO_EXPR.findall(json.dumps(wt))) == source_exprs, scenario
        a, b = copy.deepcopy(source["spec"]), copy.deepcopy(wt["spec"])
        for s in (a, b):
            s.pop("arguments"), s.pop("serviceAccountName"), s.pop("artifactRepositoryRef")
            for t in s["templates"]:
                for sem in (t.get("synchronization") or {}).get("semaphores", []):
                    sem["configMapKeyRef"].pop("name")
        assert a == b, f"{scenario}: the chart changed the WorkflowTemplate beyond the named fields"
        assert wt["metadata"]["name"] == argo.template_name()


def test_the_chart_ships_the_file_render_workflow_writes():
    """One committed copy: `puzzle render-workflow` writes the file the chart reads (tests/test_argo.py
    compares it with a fresh render)."""
    helpers = (CHART / "templates" / "_helpers.tpl").read_text()
    (shipped,) = re.findall(r'\.Files\.Get "([^"]+)"', helpers)
    assert CHART / shipped == ROOT / render_workflow.DEFAULT_OUT
    assert (CHART / shipped).read_text() == argo.render_workflow_template_yaml()


def test_workflow_template_is_valid_argo_and_locked_down(rendered):
    for scenario, docs in rendered.items():
        wt = by_kind(docs, "WorkflowTemplate")[0]
        assert manifests.argo_unknown_fields(wt) == [], scenario
        assert manifests.security_problems(wt) == [], scenario
        assert manifests.unquoted_quantities(docs) == [], scenario


def _params(wt: dict) -> dict[str, str | None]:
    return {p["name"]: p.get("value") for p in wt["spec"]["arguments"]["parameters"]}


def test_values_become_parameter_defaults(rendered):
    wt = by_kind(rendered["gpu-tolerations-values.yaml"], "WorkflowTemplate")[0]
    p = _params(wt)
    assert p["gpu-count"] == "2"
    assert json.loads(p["gpu-tolerations"]) == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert json.loads(p["gpu-node-selector"]) == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert p["image"] == f"registry.example.com/ml/puzzle-gpu:{APP_VERSION}"
    assert p["cpu-image"] == f"registry.example.com/ml/puzzle-cpu:{APP_VERSION}"
    assert p["store-prefix"] == "s3://ml-runs/puzzle"
    default = _params(by_kind(rendered["default-values.yaml"], "WorkflowTemplate")[0])
    assert default["store-prefix"] is None and default["gpu-tolerations"] == "[]"
    sem = by_kind(rendered["gpu-tolerations-values.yaml"], "ConfigMap")
    assert any(c["data"].get(argo.GPU_SEMAPHORE_KEY) == "16" for c in sem)
    pinned = _params(by_kind(rendered["pinned-tags-values.yaml"], "WorkflowTemplate")[0])
    assert pinned["image"] == "registry.example.com/ml/puzzle-gpu:0.1.0-cu124"
    assert pinned["cpu-image"] == "registry.example.com/ml/puzzle-cpu:0.1.0-2025.06"


def _leaves(values: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in values.items():
        out.update(_leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def test_default_scenario_sets_only_the_image_repositories():
    """ci/default-values.yaml stands for the chart's defaults: it may add only what cannot be defaulted."""
    assert set(_leaves(MINIMAL)) == {"image.gpu.repository", "image.cpu.repository"}
    defaults = _leaves(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert defaults["image.gpu.repository"] == defaults["image.cpu.repository"] == ""


@pytest.mark.parametrize("kind", ["gpu", "cpu"])
def test_an_empty_image_repository_fails_the_render_and_says_what_to_set(kind):
    """No image is published and no registry is assumed: without a repository Helm refuses to render (a
    WorkflowTemplate whose pods would sit in ImagePullBackOff), naming the value and what to set it to.
    The schema accepts the empty default, so the message comes from the template's `required`."""
    message = (f"image.{kind}.repository is empty: set it to the repository you pushed images/Dockerfile.{kind} "
               f"to (no registry is assumed), e.g. --set image.{kind}.repository=REGISTRY/puzzle-{kind}")
    other = "cpu" if kind == "gpu" else "gpu"
    cases = [{"image": {other: {"repository": f"registry.example.com/ml/puzzle-{other}"}}},
             {"image": {kind: {"repository": "", "tag": "0.1.0"},
                        other: {"repository": f"registry.example.com/ml/puzzle-{other}"}}}]
    if kind == "gpu":
        cases.append({})  # a bare `helm install`: the render stops at the first image, the GPU one
    with helm.Chart.load(CHART) as chart:
        for values in cases:
            chart.validate_schema(values)
            with pytest.raises(helm.HelmError, match=re.escape(message)):
                chart.render(values, name="puzzle", namespace="ml")


def test_every_reference_resolves(rendered):
    for scenario, docs in rendered.items():
        wt = by_kind(docs, "WorkflowTemplate")[0]
        configmaps = {c["metadata"]["name"]: c for c in by_kind(docs, "ConfigMap")}
        sas = {s["metadata"]["name"] for s in by_kind(docs, "ServiceAccount")}
        sa = wt["spec"]["serviceAccountName"]
        if sas:
            assert sa in sas, scenario
            binding = by_kind(docs, "RoleBinding")[0]
            assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": "ml"}]
            assert binding["roleRef"]["name"] == by_kind(docs, "Role")[0]["metadata"]["name"]
        else:
            assert sa == "ml-batch"
        for t in wt["spec"]["templates"]:
            for sem in (t.get("synchronization") or {}).get("semaphores", []):
                ref = sem["configMapKeyRef"]
                assert ref["key"] in configmaps[ref["name"]]["data"], scenario
        repo = wt["spec"]["artifactRepositoryRef"]
        if repo["configMap"] in configmaps:
            data = yaml.safe_load(configmaps[repo["configMap"]]["data"][repo["key"]])
            assert data["s3"]["bucket"] and data["s3"]["accessKeySecret"]["key"] == "AWS_ACCESS_KEY_ID"
            assert data["s3"]["keyFormat"] == "puzzle/{{workflow.name}}/{{pod.name}}"
        else:
            assert repo["configMap"] == "argo-artifacts" and scenario == "existing-identity-values.yaml"


def test_rbac_is_within_the_allow_list(rendered):
    for scenario, docs in rendered.items():
        assert manifests.rbac_violations(docs) == [], scenario
    docs = rendered["default-values.yaml"]
    role = by_kind(docs, "Role")[0]
    assert role["rules"] == [{"apiGroups": ["argoproj.io"], "resources": ["workflowtaskresults"],
                              "verbs": ["create", "patch"]}]
    wider = copy.deepcopy(role)
    wider["rules"].append({"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]})
    wider["rules"][0]["verbs"].append("delete")
    problems = manifests.rbac_violations([wider])
    assert any("core/pods" in p for p in problems) and any("'delete'" in p for p in problems)
    assert manifests.rbac_violations([{**role, "kind": "ClusterRole"}])


def test_names_are_truncated_to_63_characters(rendered):
    docs = rendered["existing-identity-values.yaml"]
    names = [d["metadata"]["name"] for d in docs]
    assert all(len(n) <= 63 for n in names)
    sem = [n for n in names if n.endswith("-semaphore")]
    assert sem and sem[0].startswith("a-very-long-release-name")


def test_schema_rejects_bad_values():
    with helm.Chart.load(CHART) as chart:
        for bad in ({"gpu": {"count": 0}}, {"gpu": {"tolerations": [{"effect": "Sometimes"}]}},
                    {"store": {"prefix": "file://./runs"}}, {"gpu": {"maxConcurrentPods": "4"}},
                    {"unknownKey": 1}):
            with pytest.raises(helm.HelmError):
                chart.validate_schema(bad)


def test_helm_lint_is_clean():
    for scenario in SCENARIOS:
        report = helm.lint(CHART, yaml.safe_load(scenario.read_text()) or {}, strict=True, kube_version=f"v{KUBE_VERSION}")
        assert not report.get("errors"), (scenario.name, report)
        assert not [m for m in report["messages"] if m["severity"] >= 2], (scenario.name, report["messages"])


def test_monitoring_objects(rendered):
    docs = rendered["monitoring-on-values.yaml"]
    sm = by_kind(docs, "ServiceMonitor")[0]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["spec"]["selector"]["matchLabels"] and sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    pm = by_kind(docs, "PodMonitor")[0]
    assert pm["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True
    rule = by_kind(docs, "PrometheusRule")[0]
    rules = {r["alert"]: r for g in rule["spec"]["groups"] for r in g["rules"]}
    assert set(rules) == {"PuzzleStepFailed", "PuzzleBLDStalled"}
    assert "puzzle_step_result_total" in rules["PuzzleStepFailed"]["expr"]
    assert "> 2700" in rules["PuzzleBLDStalled"]["expr"]  # 45 minutes from the values
    assert "{{ $labels.step }}" in rules["PuzzleStepFailed"]["annotations"]["summary"]
    dash_cm = next(c for c in by_kind(docs, "ConfigMap") if c["metadata"]["name"].endswith("-dashboard"))
    assert dash_cm["metadata"]["namespace"] == "monitoring" and dash_cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(dash_cm["data"]["puzzle.json"])
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    used = set(re.findall(r"\bpuzzle_[a-z_]+", exprs))
    assert used == STEP_METRICS | ARGO_METRICS
    assert {"{{unit}}", "{{step}}"} <= {t["legendFormat"] for p in dash["panels"] for t in p["targets"]}
    assert "nvidia_com_gpu" in exprs
    for kind in ("ServiceMonitor", "PodMonitor", "PrometheusRule"):
        assert not by_kind(rendered["default-values.yaml"], kind)


def test_argo_metric_names_match_the_workflow_template():
    wt = argo.render_workflow_template()
    names = {m["name"] for t in wt["spec"]["templates"] for m in (t.get("metrics") or {}).get("prometheus", [])}
    assert names == ARGO_METRICS


def test_notes_name_the_next_commands():
    with helm.Chart.load(CHART) as chart:
        values = {**MINIMAL, "store": {"prefix": "s3://runs/p"}}
        notes = chart.render(values, name="x", namespace="ml")["puzzle/templates/NOTES.txt"]
    assert f"--from workflowtemplate/{argo.template_name()}" in notes
    assert "puzzle submit" in notes and "puzzle status s3://runs/p/RUN_ID" in notes and "puzzle fetch" in notes

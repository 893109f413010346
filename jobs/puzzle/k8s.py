"""Kubernetes-side logic of ``puzzle submit`` / ``puzzle status`` and checks of the manifests we ship.

- :func:`build_workflow` makes the Workflow object that runs one Puzzle run from the installed
  WorkflowTemplate (``workflowTemplateRef``); :func:`create_via_argo_server` sends it through Argo
  Server's REST API (Hera's ``WorkflowsService``), :func:`create_via_kubernetes` creates it directly as a
  custom object with the kubernetes client.
- :func:`security_problems`, :func:`unquoted_quantities` and :func:`rbac_violations` are the checks the
  tests (and ``puzzle render-workflow``) run on the WorkflowTemplate and the chart's objects.
"""

from __future__ import annotations

import json
import re
from typing import Any

from puzzle import argo

RUN_ID_LABEL = "puzzle.dev/run-id"
#: RBAC rules the chart may grant: (apiGroup, resource) -> verbs. Anything wider fails the tests.
RBAC_ALLOW_LIST: dict[tuple[str, str], frozenset[str]] = {
    ("argoproj.io", "workflowtaskresults"): frozenset({"create", "patch"}),
}
ARGO_EXPR = re.compile(r"\{\{[^{}]*\}\}")


# ------------------------------------------------------------------------------------------------
# The Workflow object of one run
# ------------------------------------------------------------------------------------------------


def build_workflow(
    *,
    run_id: str,
    store_prefix: str,
    namespace: str,
    template: str | None = None,
    parameters: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The Workflow that runs ``<store_prefix>/<run_id>`` from the WorkflowTemplate ``template``.

    Its name is the run id, so a run can't be submitted twice and ``argo get RUN_ID`` finds it.
    ``parameters`` override template defaults (image, gpu-count, ...); unknown names are rejected.
    """
    from puzzle.errors import UserError

    extra = dict(parameters or {})
    unknown = sorted(set(extra) - set(argo.WORKFLOW_PARAMETERS))
    if unknown:
        raise UserError(
            f"workflow parameter(s) {unknown} do not exist; allowed: {', '.join(argo.WORKFLOW_PARAMETERS)}"
        )
    for fixed in ("run-id", "store-prefix"):
        if fixed in extra:
            raise UserError(f"workflow parameter {fixed!r} is set by puzzle submit itself; remove it")
    if not store_prefix.startswith("s3://"):
        raise UserError(
            f"store.uri: {store_prefix!r} is not reachable from cluster pods; use s3://BUCKET/PREFIX"
        )
    params = [{"name": "run-id", "value": run_id}, {"name": "store-prefix", "value": store_prefix.rstrip("/")}]
    params += [{"name": k, "value": str(extra[k])} for k in argo.WORKFLOW_PARAMETERS if k in extra]
    return {
        "apiVersion": "argoproj.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "name": run_id,
            "namespace": namespace,
            "labels": {RUN_ID_LABEL: run_id, "app.kubernetes.io/name": "puzzle", "app.kubernetes.io/part-of": "puzzle"},
        },
        "spec": {
            "workflowTemplateRef": {"name": template or argo.template_name()},
            "arguments": {"parameters": params},
        },
    }


def create_via_argo_server(
    workflow: dict[str, Any], *, server: str, namespace: str, token: str | None = None, verify_ssl: bool = True
) -> str:
    """POST the Workflow to Argo Server (``/api/v1/workflows/{namespace}``); returns the created name."""
    from hera.workflows.models import Workflow, WorkflowCreateRequest
    from hera.workflows.service import WorkflowsService

    # A trailing slash keeps a path prefix (https://host/argo/) when Hera joins "api/v1/...".
    # Hera adds "Bearer " unless the token already has a scheme, as `argo auth token` prints it.
    service = WorkflowsService(
        host=server.rstrip("/") + "/", token=token, verify_ssl=verify_ssl, namespace=namespace
    )
    created = service.create_workflow(
        WorkflowCreateRequest(workflow=Workflow.model_validate(workflow), namespace=namespace),
        namespace=namespace,
    )
    return created.metadata.name


def create_via_kubernetes(
    workflow: dict[str, Any], *, namespace: str, kubeconfig: str | None = None, context: str | None = None
) -> str:
    """Create the Workflow as a custom object with the kubernetes client (kubeconfig or in-cluster)."""
    from kubernetes import client, config

    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    else:
        config.load_kube_config(config_file=kubeconfig, context=context)
    api = client.CustomObjectsApi()
    created = api.create_namespaced_custom_object(
        group="argoproj.io", version="v1alpha1", namespace=namespace, plural="workflows", body=workflow
    )
    return created["metadata"]["name"]


def follow_commands(name: str, namespace: str, run_uri: str) -> list[str]:
    return [
        f"argo -n {namespace} watch {name}",
        f"argo -n {namespace} logs {name} --follow",
        f"puzzle status {run_uri}",
    ]


# ------------------------------------------------------------------------------------------------
# Manifest checks (tests and `puzzle render-workflow` use them)
# ------------------------------------------------------------------------------------------------


def substitute(text: str, values: dict[str, str]) -> str:
    """Argo-style ``{{workflow.parameters.X}}`` substitution (for checking podSpecPatch)."""
    return ARGO_EXPR.sub(lambda m: values.get(m.group(0)[2:-2].strip(), m.group(0)), text)


def unquoted_quantities(obj: Any, path: str = "") -> list[str]:
    """Paths of resource quantities that are not strings (YAML ``1`` instead of ``"1"``), podSpecPatch included."""
    bad: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else str(k)
            if k in ("requests", "limits") and isinstance(v, dict):
                bad += [f"{p}.{q}" for q, val in v.items() if not isinstance(val, str)]
            elif k == "podSpecPatch" and isinstance(v, str):
                sample = {f"workflow.parameters.{n}": d for n, (d, _) in argo.WORKFLOW_PARAMETERS.items() if d}
                try:
                    patch = json.loads(substitute(v, sample))
                except json.JSONDecodeError as err:
                    bad.append(f"{p} (not JSON after substitution: {err})")
                else:
                    bad += unquoted_quantities(patch, p)
            else:
                bad += unquoted_quantities(v, p)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += unquoted_quantities(v, f"{path}[{i}]")
    return bad


REQUIRED_CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
}


def security_problems(wt: dict[str, Any]) -> list[str]:
    """What keeps a WorkflowTemplate's pods from the restricted Pod Security profile (plus read-only root)."""
    problems = []
    spec = wt.get("spec", {})
    sa = spec.get("serviceAccountName")
    if not sa or sa == "default":
        problems.append(f"spec.serviceAccountName: {sa!r}; pods need their own service account")
    pod = spec.get("securityContext") or {}
    if pod.get("runAsNonRoot") is not True:
        problems.append("spec.securityContext.runAsNonRoot must be true")
    if (pod.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
        problems.append("spec.securityContext.seccompProfile.type must be RuntimeDefault")
    volumes = {v.get("name"): v for v in spec.get("volumes", [])}
    for t in spec.get("templates", []):
        c = t.get("container") or t.get("script")
        if c is None:
            continue
        where = f"templates[{t.get('name')}].container"
        sc = c.get("securityContext")
        if not sc:
            problems.append(f"{where}.securityContext is missing")
            continue
        for k, want in REQUIRED_CONTAINER_SECURITY.items():
            if sc.get(k) is not want:
                problems.append(f"{where}.securityContext.{k} must be {want}")
        if (sc.get("capabilities") or {}).get("drop") != ["ALL"]:
            problems.append(f"{where}.securityContext.capabilities.drop must be [ALL]")
        if (sc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
            problems.append(f"{where}.securityContext.seccompProfile.type must be RuntimeDefault")
        mounts = {m.get("mountPath"): m.get("name") for m in c.get("volumeMounts", [])}
        if "emptyDir" not in (volumes.get(mounts.get("/tmp")) or {}):
            problems.append(f"{where}: /tmp must be an emptyDir mount (the root filesystem is read-only)")
        for e in c.get("env", []):
            if e.get("name") in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY") and "secretKeyRef" not in (
                e.get("valueFrom") or {}
            ):
                problems.append(f"{where}.env[{e['name']}] must come from a secretKeyRef")
    return problems


def rbac_violations(objects: list[dict[str, Any]], allow: dict[tuple[str, str], frozenset[str]] = RBAC_ALLOW_LIST) -> list[str]:
    """RBAC rules wider than ``allow`` (wildcards, other resources or verbs, any ClusterRole)."""
    bad = []
    for o in objects:
        kind = o.get("kind")
        if kind in ("ClusterRole", "ClusterRoleBinding"):
            bad.append(f"{kind} {o['metadata']['name']}: cluster-wide RBAC is not allowed")
        if kind not in ("Role", "ClusterRole"):
            continue
        for i, rule in enumerate(o.get("rules", [])):
            where = f"{kind} {o['metadata']['name']} rules[{i}]"
            if rule.get("nonResourceURLs") or rule.get("resourceNames") is not None and not rule.get("resources"):
                bad.append(f"{where}: non-resource rules are not allowed")
            for group in rule.get("apiGroups", []):
                for res in rule.get("resources", []):
                    allowed = allow.get((group, res))
                    if allowed is None:
                        bad.append(f"{where}: {group or 'core'}/{res} is not in the allow-list")
                        continue
                    extra = set(rule.get("verbs", [])) - allowed
                    if extra:
                        bad.append(f"{where}: verbs {sorted(extra)} on {group}/{res} exceed {sorted(allowed)}")
    return bad


def _dropped(original: Any, parsed: Any, path: str) -> list[str]:
    if isinstance(original, dict):
        if not isinstance(parsed, dict):
            return [path]
        return [x for k, v in original.items()
                for x in (_dropped(v, parsed[k], f"{path}.{k}") if k in parsed else [f"{path}.{k}"])]
    if isinstance(original, list):
        if not isinstance(parsed, list) or len(parsed) != len(original):
            return [path]
        return [x for i, (a, b) in enumerate(zip(original, parsed)) for x in _dropped(a, b, f"{path}[{i}]")]
    return []


def argo_unknown_fields(manifest: dict[str, Any]) -> list[str]:
    """Paths Hera's Argo models do not know (they parse leniently and drop them): typos, wrong nesting.

    Raises pydantic's ValidationError when a known field has the wrong type.
    """
    from hera.workflows import models as m

    model_cls = {"WorkflowTemplate": m.WorkflowTemplate, "Workflow": m.Workflow}[manifest["kind"]]
    parsed = model_cls.model_validate(manifest).model_dump(mode="json", by_alias=True, exclude_none=True)
    return _dropped(manifest, parsed, "")

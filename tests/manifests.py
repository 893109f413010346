"""Checks of the manifests we ship (the rendered WorkflowTemplate, every object the chart renders).

Test code only: the package never runs them. Used by tests/test_argo.py, test_chart.py, test_security.py
and test_submit.py.

- :func:`argo_unknown_fields`: paths Hera's Argo models do not know (typos, wrong nesting);
- :func:`unquoted_quantities`: resource quantities that are not strings, podSpecPatch included;
- :func:`security_problems`: a WorkflowTemplate's pods against the project's lock-down;
- :func:`restricted_pss_problems`: every pod-bearing object against the "restricted" Pod Security Standard;
- :func:`rbac_violations`: RBAC wider than :data:`RBAC_ALLOW_LIST`;
- :func:`substitute`: Argo-style ``{{...}}`` substitution, to read a podSpecPatch as it will be applied.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from puzzle import argo

#: RBAC rules the chart may grant: (apiGroup, resource) -> verbs. Anything wider fails the tests.
RBAC_ALLOW_LIST: dict[tuple[str, str], frozenset[str]] = {
    ("argoproj.io", "workflowtaskresults"): frozenset({"create", "patch"}),
}
ARGO_EXPR = re.compile(r"\{\{[^{}]*\}\}")


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


# ----- the "restricted" Pod Security Standard (kubernetes.io/docs/concepts/security/pod-security-standards)
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                      "projected", "secret"}
CONTAINER_KEYS = ("containers", "initContainers", "ephemeralContainers")


def _pod_specs(obj: Any, path: str = "") -> list[tuple[str, dict]]:
    """Every pod-level spec in a manifest: Kubernetes workloads, and Argo's workflow-level pod settings
    with each template's container (and its podSpecPatch, which Argo merges into the pod)."""
    out: list[tuple[str, dict]] = []
    if isinstance(obj, dict):
        if any(k in obj for k in CONTAINER_KEYS):
            out.append((path or "<root>", obj))
        for k, v in obj.items():
            out += _pod_specs(v, f"{path}.{k}" if path else k)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _pod_specs(v, f"{path}[{i}]")
    return out


def _containers_of_workflow(wt: dict) -> list[tuple[str, dict, dict]]:
    """(where, container, pod-level settings) for each template of an Argo (Cluster)WorkflowTemplate."""
    spec = wt["spec"]
    out = []
    for t in spec.get("templates", []):
        pod = {"securityContext": spec.get("securityContext") or {}, "volumes": spec.get("volumes", []),
               **{k: spec[k] for k in ("hostNetwork", "hostPID", "hostIPC") if k in spec}}
        patch = t.get("podSpecPatch")
        if patch:
            # Argo fills {{...}} (quoted or bare) before merging the patch: any placeholder parses
            parsed = yaml.safe_load(re.sub(r'"?\{\{[^{}]*\}\}"?', '"x"', patch))
            for k in ("hostNetwork", "hostPID", "hostIPC", "securityContext", "volumes"):
                if k in parsed:
                    pod[k] = parsed[k]
            for c in parsed.get("containers", []):
                if set(c) - {"name", "resources"}:
                    out.append((f"templates[{t['name']}].podSpecPatch.containers[{c.get('name')}]", c, pod))
        for key in ("container", "script"):
            if key in t:
                out.append((f"templates[{t['name']}].{key}", t[key], pod))
        for i, c in enumerate(t.get("initContainers", []) + t.get("sidecars", [])):
            out.append((f"templates[{t['name']}].init/sidecar[{i}]", c, pod))
    return out


def restricted_pss_problems(docs: list[dict]) -> list[str]:
    """Breaches of the restricted Pod Security Standard in rendered manifests (empty: none)."""
    bad: list[str] = []
    checks: list[tuple[str, dict, dict]] = []
    for d in docs:
        name = f"{d['kind']} {d['metadata']['name']}"
        if d["kind"] in ("WorkflowTemplate", "ClusterWorkflowTemplate", "Workflow", "CronWorkflow"):
            wf = d if d["kind"] != "CronWorkflow" else {"spec": d["spec"]["workflowSpec"]}
            checks += [(f"{name}: {w}", c, pod) for w, c, pod in _containers_of_workflow(wf)]
        else:
            for where, pod in _pod_specs(d.get("spec", {})):
                for key in CONTAINER_KEYS:
                    checks += [(f"{name}: {where}.{key}[{c.get('name')}]", c, pod) for c in pod.get(key, [])]
    for where, c, pod in checks:
        psc, csc = pod.get("securityContext") or {}, c.get("securityContext") or {}
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            if pod.get(k):
                bad.append(f"{where}: pod {k} is set")
        for v in pod.get("volumes", []):
            kinds = set(v) - {"name"}
            if not kinds <= RESTRICTED_VOLUMES:
                bad.append(f"{where}: volume {v.get('name')} of type {sorted(kinds)} (hostPath and others are not allowed)")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            bad.append(f"{where}: hostPort is set")
        if csc.get("privileged"):
            bad.append(f"{where}: privileged")
        if csc.get("allowPrivilegeEscalation") is not False:
            bad.append(f"{where}: allowPrivilegeEscalation must be false")
        caps = csc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad.append(f"{where}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad.append(f"{where}: capabilities.add {caps['add']}")
        if csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad.append(f"{where}: runAsNonRoot must be true")
        if csc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad.append(f"{where}: runAsUser 0")
        seccomp = (csc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad.append(f"{where}: seccompProfile.type must be RuntimeDefault or Localhost, got {seccomp!r}")
        for e in c.get("env", []):
            if any(w in e.get("name", "").upper() for w in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY")) and "value" in e:
                bad.append(f"{where}: env {e['name']} has a literal value; use a secretKeyRef")
    return bad

"""``puzzle submit CONFIG``: start a run on Kubernetes from the installed WorkflowTemplate.

Validates the config, uploads it to ``<store.uri>/<run-id>/config.yaml`` and creates the Workflow
(``workflowTemplateRef``), through Argo Server when ``--argo-server`` (or ``ARGO_SERVER``) is given,
else directly as a custom object with the kubeconfig / in-cluster credentials. Prints the workflow
name and the commands to follow it. ``--dry-run`` prints the Workflow and touches nothing.

The cluster side lives here too, since nothing else needs it: :func:`build_workflow` makes the Workflow
object of one run, :func:`create_via_argo_server` sends it through Argo Server's REST API (Hera's
``WorkflowsService``) and :func:`create_via_kubernetes` creates it with the kubernetes client.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

from puzzle.errors import UserError

RUN_ID_LABEL = "puzzle.dev/run-id"


def register(sub) -> None:
    p = sub.add_parser("submit", help="upload a run config and start its Argo Workflow")
    p.add_argument("config", metavar="CONFIG", help="run config YAML (store.uri must be s3://...)")
    p.add_argument("--namespace", "-n", default=os.environ.get("ARGO_NAMESPACE", "default"),
                   help="namespace of the installed chart (default: $ARGO_NAMESPACE or 'default')")
    p.add_argument("--template", default=None,
                   help="WorkflowTemplate name (default: this version's, e.g. puzzle-v0-1-0)")
    p.add_argument("--image", default=None, help="GPU step image (overrides the template's default)")
    p.add_argument("--cpu-image", default=None, help="CPU step image (overrides the template's default)")
    p.add_argument("--parameter", "-p", action="append", default=[], metavar="NAME=VALUE",
                   help="any other workflow parameter, e.g. -p gpu-count=2 (repeatable)")
    p.add_argument("--run-id", default=None, help="run id (default: <name>-<UTC time>-<random>)")
    p.add_argument("--argo-server", default=os.environ.get("ARGO_SERVER"), metavar="URL",
                   help="Argo Server URL, e.g. https://argo.example.com:2746 (default: $ARGO_SERVER); "
                        "without it the Workflow is created with the kubeconfig")
    p.add_argument("--argo-token", default=os.environ.get("ARGO_TOKEN"),
                   help="bearer token for Argo Server (default: $ARGO_TOKEN)")
    p.add_argument("--insecure-skip-verify", action="store_true", help="don't verify Argo Server's TLS certificate")
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then ~/.kube/config)")
    p.add_argument("--context", default=None, help="kubeconfig context")
    p.add_argument("--dry-run", action="store_true", help="print the Workflow; upload and create nothing")
    p.set_defaults(func=_main)


def parse_parameters(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--parameter: {item!r} is not NAME=VALUE")
        out[name] = value
    return out


def _refuse_local_inputs(path: str, cfg) -> None:
    """Pods see neither this machine's folders nor its files: every input must be in S3 (or the hub)."""
    fields = [("parent.uri", cfg.parent.uri, ("s3://", "hf://")),
              ("data.distillation_uri", cfg.data.distillation_uri, ("s3://",)),
              ("data.validation_uri", cfg.data.validation_uri, ("s3://",))]
    if cfg.eval.icl.predictor_uri:
        fields.append(("eval.icl.predictor_uri", cfg.eval.icl.predictor_uri, ("s3://", "hf://")))
    for field, value, allowed in fields:
        if not value.startswith(allowed):
            raise UserError(
                f"{path}: {field} is {value!r}, a path on this machine that cluster pods cannot read; allowed "
                f"for a cluster run: {' or '.join(a + '...' for a in allowed)} (upload it first, e.g. "
                f"`aws s3 cp --recursive`, or use `puzzle run` for a local run)")


def _main(args) -> int:
    from puzzle.config import load_config

    cfg = load_config(args.config)
    text = Path(args.config).read_text(encoding="utf-8")
    if not cfg.store.uri.startswith("s3://"):
        raise UserError(
            f"{args.config}: store.uri is {cfg.store.uri!r}; cluster pods can only reach an s3:// store "
            "(set store.uri: s3://BUCKET/PREFIX, or use `puzzle run` for a local run)"
        )
    _refuse_local_inputs(args.config, cfg)
    params = parse_parameters(args.parameter)
    if args.image:
        params["image"] = args.image
    if args.cpu_image:
        params["cpu-image"] = args.cpu_image

    from puzzle.layout import CONFIG
    from puzzle.run import check_run_id, create_run, new_run_id

    run_id = args.run_id or new_run_id(cfg.name)
    check_run_id(run_id)  # the same rule as every step: a DNS label, which a Workflow name must be too
    workflow = build_workflow(
        run_id=run_id, store_prefix=cfg.store.uri, namespace=args.namespace,
        template=args.template, parameters=params,
    )
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(workflow, sort_keys=False))
        return 0

    run_uri = create_run(cfg, text, run_id)
    print(f"uploaded {run_uri}/{CONFIG}")
    try:
        if args.argo_server:
            name = create_via_argo_server(
                workflow, server=args.argo_server, namespace=args.namespace,
                token=args.argo_token, verify_ssl=not args.insecure_skip_verify,
            )
        else:
            name = create_via_kubernetes(
                workflow, namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context
            )
    except Exception as err:
        raise UserError(
            f"the config is uploaded to {run_uri}, but creating Workflow {run_id} in namespace "
            f"{args.namespace!r} failed: {err}"
        ) from err
    print(f"workflow {name} created in namespace {args.namespace} (template {workflow['spec']['workflowTemplateRef']['name']})")
    print("follow it with:")
    for cmd in follow_commands(name, args.namespace, run_uri):
        print(f"  {cmd}")
    return 0


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
    from puzzle import argo

    extra = dict(parameters or {})
    unknown = sorted(set(extra) - set(argo.WORKFLOW_PARAMETERS))
    if unknown:
        raise UserError(
            f"workflow parameter(s) {unknown} do not exist; allowed: {', '.join(argo.WORKFLOW_PARAMETERS)}"
        )
    for fixed in ("run-id", "store-prefix"):
        if fixed in extra:
            raise UserError(f"workflow parameter {fixed!r} is set by puzzle submit itself; remove it")
    count = str(extra.get("gpu-count", "1"))
    if not count.isdigit() or int(count) < 1:
        # the GPU limit of every GPU pod and the torchrun worker count: refused here, not in each pod
        raise UserError(f"workflow parameter 'gpu-count': {count!r} is not allowed; give a whole number >= 1")
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

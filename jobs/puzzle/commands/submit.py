"""``puzzle submit CONFIG``: start a run on Kubernetes from the installed WorkflowTemplate.

Validates the config, uploads it to ``<store.uri>/<run-id>/config.yaml`` and creates the Workflow
(``workflowTemplateRef``), through Argo Server when ``--argo-server`` (or ``ARGO_SERVER``) is given,
else directly as a custom object with the kubeconfig / in-cluster credentials. Prints the workflow
name and the commands to follow it. ``--dry-run`` prints the Workflow and touches nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import yaml

from puzzle.errors import UserError


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


def _main(args) -> int:
    from puzzle import argo, k8s
    from puzzle.config import load_config

    cfg = load_config(args.config)
    text = Path(args.config).read_text(encoding="utf-8")
    if not cfg.store.uri.startswith("s3://"):
        raise UserError(
            f"{args.config}: store.uri is {cfg.store.uri!r}; cluster pods can only reach an s3:// store "
            "(set store.uri: s3://BUCKET/PREFIX, or use `puzzle run` for a local run)"
        )
    params = parse_parameters(args.parameter)
    if args.image:
        params["image"] = args.image
    if args.cpu_image:
        params["cpu-image"] = args.cpu_image

    from puzzle.layout import CONFIG
    from puzzle.run import check_run_id, create_run, new_run_id

    run_id = args.run_id or new_run_id(cfg.name)
    check_run_id(run_id)  # the same rule as every step: a DNS label, which a Workflow name must be too
    workflow = k8s.build_workflow(
        run_id=run_id, store_prefix=cfg.store.uri, namespace=args.namespace,
        template=args.template or argo.template_name(), parameters=params,
    )
    if args.dry_run:
        sys.stdout.write(yaml.safe_dump(workflow, sort_keys=False))
        return 0

    run_uri = create_run(cfg, text, run_id)
    print(f"uploaded {run_uri}/{CONFIG}")
    try:
        if args.argo_server:
            name = k8s.create_via_argo_server(
                workflow, server=args.argo_server, namespace=args.namespace,
                token=args.argo_token, verify_ssl=not args.insecure_skip_verify,
            )
        else:
            name = k8s.create_via_kubernetes(
                workflow, namespace=args.namespace, kubeconfig=args.kubeconfig, context=args.context
            )
    except Exception as err:
        raise UserError(
            f"the config is uploaded to {run_uri}, but creating Workflow {run_id} in namespace "
            f"{args.namespace!r} failed: {err}"
        ) from err
    print(f"workflow {name} created in namespace {args.namespace} (template {workflow['spec']['workflowTemplateRef']['name']})")
    print("follow it with:")
    for cmd in k8s.follow_commands(name, args.namespace, run_uri):
        print(f"  {cmd}")
    return 0

"""Renders the pipeline DAG (:mod:`puzzle.pipeline`) as the Argo ``WorkflowTemplate``, with Hera.

``puzzle render-workflow`` writes the result to ``charts/puzzle/files/workflowtemplate.yaml``, the one
committed copy, which the Helm chart ships through ``.Files.Get``; ``puzzle render-workflow --check`` and
``tests/test_argo.py`` fail when it is stale (``PUZZLE_REGENERATE_GOLDEN=1 pytest tests/test_argo.py``
rewrites it, never under CI). Only orchestration lives here: every pod runs the same CLI,
``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR] [--nproc-per-node N]``.

What is set once, and where:

- the workflow parameters (:data:`WORKFLOW_PARAMETERS`), which ``puzzle submit`` checks its ``-p`` against;
- everything a pod shares (retry policy, container lock-down, environment, scratch mounts, log
  archiving) in :func:`_pod_template`, the only maker of leaf templates; pod-level security, volumes,
  the service account and the artifact repository on the WorkflowTemplate itself;
- the DAG's edges with Hera's ``>>`` and fan-out lists with ``Task.get_parameter``, so a task that
  waits on a missing task or iterates over an output its producer does not declare fails at render time.

Argo's ``spec.templateDefaults`` is deliberately not used: it is merged into *every* template at run
time, DAG templates included, so a default retry or deadline would also retry or time out the whole DAG,
and a reader (or a policy checker) of the rendered YAML would no longer see each pod's lock-down.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from hera.workflows import DAG, Container, Env, Parameter, RetryStrategy, SecretEnv, Task, WorkflowTemplate
from hera.workflows import models as m
from hera.workflows.retry_strategy import RetryPolicy

from puzzle import __version__
from puzzle.errors import EXIT_BAD_INPUT
from puzzle.pipeline import STEPS, Step, producer_of, step, topological_order

#: Where steps that produce fan-out lists write them for Argo's output parameters (an emptyDir).
OUTPUTS_DIR = "/tmp/outputs"
#: The main container's name in every Argo pod; podSpecPatch merges GPU settings into it by name.
MAIN_CONTAINER = "main"
#: ConfigMap key of the semaphore that caps concurrent GPU pods (the chart creates the ConfigMap).
GPU_SEMAPHORE_KEY = "gpu-pods"

#: Names of cluster objects the template refers to; the Helm chart rewrites them to its release's names.
SERVICE_ACCOUNT = "puzzle-workflow"
SEMAPHORE_CONFIGMAP = "puzzle-semaphore"
ARTIFACT_REPOSITORY_CONFIGMAP = "puzzle-artifact-repository"
ARTIFACT_REPOSITORY_KEY = "default-v1"


def template_name(version: str = __version__) -> str:
    """Versioned WorkflowTemplate name, e.g. ``puzzle-v0-1-0``: runs keep the template they started with."""
    return "puzzle-v" + re.sub(r"[^a-z0-9]+", "-", version.lower()).strip("-")


#: Workflow parameters: name -> (default or None when required at submit time, description).
#: Node selector and tolerations are JSON parameters patched into GPU pods (podSpecPatch), so one
#: committed template serves every cluster: the chart sets the defaults from its values, and a
#: submit can still override them per run without re-installing anything.
WORKFLOW_PARAMETERS: dict[str, tuple[str | None, str]] = {
    "run-id": (None, "run id: the last segment of the run URI (puzzle submit creates it)"),
    "store-prefix": (None, "s3://BUCKET/PREFIX holding runs; the run URI is <store-prefix>/<run-id>"),
    "image": (f"puzzle-gpu:{__version__}", "image of GPU steps (CUDA PyTorch)"),
    "cpu-image": (f"puzzle-cpu:{__version__}", "image of CPU steps (prepare, solve, report, exit handler)"),
    "gpu-resource": ("nvidia.com/gpu", "extended resource name of a GPU"),
    "gpu-count": ("1", "GPUs per GPU pod"),
    "gpu-node-selector": ("{}", "JSON object: nodeSelector of GPU pods"),
    "gpu-tolerations": ("[]", "JSON list: tolerations of GPU pods"),
    "s3-endpoint-url": ("", "AWS_ENDPOINT_URL for S3-compatible stores (empty: AWS)"),
    "s3-secret": ("puzzle-s3", "Secret with keys AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"),
    "pushgateway-url": ("", "Prometheus Pushgateway the steps push to (empty: off)"),
}


def param(name: str) -> str:
    """The Argo reference to workflow parameter ``name``; a name :data:`WORKFLOW_PARAMETERS` lacks is a bug."""
    if name not in WORKFLOW_PARAMETERS:
        raise KeyError(f"workflow parameter {name!r} is not declared in WORKFLOW_PARAMETERS")
    return "{{workflow.parameters." + name + "}}"


RUN_URI = param("store-prefix") + "/" + param("run-id")
RETRY_LIMIT = 3
# Retry failures and errors (OOM 137, evictions, node loss) but never bad input (exit 2). A string
# comparison, not asInt(): an attempt killed before its container started has no integer exit code.
RETRY_EXPRESSION = f'lastRetry.exitCode != "{EXIT_BAD_INPUT}"'

RETRY = RetryStrategy(
    limit=RETRY_LIMIT,
    retry_policy=RetryPolicy.always,
    expression=RETRY_EXPRESSION,
    backoff=m.Backoff(duration="1m", factor=2, max_duration="1h"),
    affinity=m.RetryAffinity(node_anti_affinity=m.RetryNodeAntiAffinity()),
)
#: The restricted Pod Security profile, plus a read-only root filesystem (scratch is the /tmp emptyDir).
CONTAINER_SECURITY = m.SecurityContext(
    allow_privilege_escalation=False,
    capabilities=m.Capabilities(drop=["ALL"]),
    read_only_root_filesystem=True,
    run_as_non_root=True,
    seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
)
#: uid/gid 10001 is the images' USER (tests/test_images.py checks that they agree).
POD_SECURITY = m.PodSecurityContext(
    run_as_non_root=True,
    run_as_user=10001,
    run_as_group=10001,
    fs_group=10001,
    seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
)


def gpu_pod_spec_patch() -> str:
    """The JSON podSpecPatch of GPU pods: GPU limit (a quoted quantity), node selector, tolerations.

    Resources are patched rather than written into ``container.resources`` because a parameter can't be
    a resource name or a Quantity there: the controller decodes the template before substituting.
    """
    return (
        '{"nodeSelector": ' + param("gpu-node-selector") + ', "tolerations": ' + param("gpu-tolerations")
        + ', "containers": [{"name": "' + MAIN_CONTAINER + '", "resources": {"limits": {"'
        + param("gpu-resource") + '": "' + param("gpu-count") + '"}}}]}'
    )


def _env(name: str) -> list[Any]:
    return [
        SecretEnv(name="AWS_ACCESS_KEY_ID", secret_name=param("s3-secret"), secret_key="AWS_ACCESS_KEY_ID"),
        SecretEnv(name="AWS_SECRET_ACCESS_KEY", secret_name=param("s3-secret"), secret_key="AWS_SECRET_ACCESS_KEY"),
        Env(name="AWS_ENDPOINT_URL", value=param("s3-endpoint-url")),
        Env(name="PUZZLE_PUSHGATEWAY_URL", value=param("pushgateway-url")),
        # The root filesystem is read-only: every cache goes to the /tmp emptyDir.
        Env(name="HOME", value="/tmp"),
        Env(name="HF_HOME", value="/tmp/hf"),
        Env(name="XDG_CACHE_HOME", value="/tmp/cache"),
        Env(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
        Env(name="TRITON_CACHE_DIR", value="/tmp/triton"),
        Env(name="PUZZLE_STEP", value=name),
    ]


def _pod_template(
    name: str, args: list[str], *, gpu: bool, cpu: str, memory: str, deadline: int, **fields: Any
) -> Container:
    """Every leaf (pod) template is made here: retry, lock-down, env, mounts, image and log archiving
    are set once for all of them; ``fields`` adds what is particular to one (inputs, outputs, metrics)."""
    volume_mounts = [m.VolumeMount(name="tmp", mount_path="/tmp")]
    if gpu:
        # PyTorch worker processes share tensors through /dev/shm; the default 64 MiB is too small.
        volume_mounts.append(m.VolumeMount(name="dshm", mount_path="/dev/shm"))
        fields["pod_spec_patch"] = gpu_pod_spec_patch()
        fields["synchronization"] = m.Synchronization(
            semaphores=[
                m.SemaphoreRef(
                    config_map_key_ref=m.ConfigMapKeySelector(name=SEMAPHORE_CONFIGMAP, key=GPU_SEMAPHORE_KEY)
                )
            ]
        )
    return Container(
        name=name,
        image=param("image") if gpu else param("cpu-image"),
        image_pull_policy="IfNotPresent",
        args=args,
        env=_env(name),
        resources=m.ResourceRequirements(requests={"cpu": cpu, "memory": memory}, limits={"memory": memory}),
        security_context=CONTAINER_SECURITY,
        volume_mounts=volume_mounts,
        active_deadline_seconds=deadline,
        retry_strategy=RETRY,
        archive_location=m.ArtifactLocation(archive_logs=True),
        **fields,
    )


def _metrics(s: Step) -> m.Metrics:
    label = [m.MetricLabel(key="step", value=s.name)]
    return m.Metrics(
        prometheus=[
            m.Prometheus(
                name="puzzle_step_duration_seconds",
                help="Duration of one puzzle step pod (seconds)",
                labels=label,
                gauge=m.Gauge(realtime=False, value="{{duration}}"),
            ),
            m.Prometheus(
                name="puzzle_step_result_total",
                help="Puzzle step pods by final status",
                labels=label + [m.MetricLabel(key="status", value="{{status}}")],
                counter=m.Counter(value="1"),
            ),
        ]
    )


def _step_template(s: Step) -> Container:
    """The leaf template of one step: ``puzzle step NAME --run URI [--unit ...] [--outputs DIR]
    [--nproc-per-node N]``."""
    args = ["step", s.name, "--run", RUN_URI]
    fields: dict[str, Any] = {}
    if s.fan_out is not None:
        unit = Parameter(name="unit", description=f"one unit of plan/{s.fan_out}.json")
        fields["inputs"] = [unit]
        args += ["--unit", "{{inputs.parameters." + unit.name + "}}"]
    outputs: list[Any] = []
    if s.produces or s.artifacts:
        args += ["--outputs", OUTPUTS_DIR]
    if s.distributed:
        # One process per GPU of the pod: `puzzle step` itself becomes torchrun when this is above 1.
        args += ["--nproc-per-node", param("gpu-count")]
    for plan_list in s.produces:
        outputs.append(Parameter(name=plan_list, value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/{plan_list}.json")))
    for name in s.artifacts:
        # Key-only: bucket, endpoint and credentials come from the artifactRepositoryRef ConfigMap.
        outputs.append(
            m.Artifact(
                name=re.sub(r"[^a-z0-9]+", "-", name),
                path=f"{OUTPUTS_DIR}/{name}",
                optional=True,
                archive=m.ArchiveStrategy(none=m.NoneStrategy()),
                s3=m.S3Artifact(key=f"puzzle/{param('run-id')}/{name}"),
            )
        )
    if outputs:
        fields["outputs"] = outputs
    return _pod_template(
        s.name, args, gpu=s.gpu, cpu=s.cpu, memory=s.memory, deadline=s.active_deadline_seconds,
        metrics=_metrics(s), labels={"puzzle.dev/step": s.name, "puzzle.dev/run-id": param("run-id")},
        **fields,
    )


def _exit_handler() -> Container:
    """Records the workflow's final status in the run (``status.json``) whatever happened."""
    return _pod_template(
        "exit-handler",
        [
            "status", RUN_URI,
            "--record-final", "{{workflow.status}}",
            "--workflow", "{{workflow.name}}",
            # Not {{workflow.failures}}: Argo fails to resolve it when nothing failed (argo-workflows#12330).
        ],
        gpu=False, cpu="100m", memory="512Mi", deadline=600,
    )


def chains() -> dict[str, list[Step]]:
    """Per-unit chains: root step -> [root, steps with same_unit_as the previous, ...]."""
    out: dict[str, list[Step]] = {}
    for s in STEPS:
        if s.same_unit_as is None and any(t.same_unit_as == s.name for t in STEPS):
            chain = [s]
            while nxt := [t for t in STEPS if t.same_unit_as == chain[-1].name]:
                chain.append(nxt[0])
            out[s.name] = chain
    return out


def dag_task_of(name: str) -> str:
    """The main DAG task that runs step ``name`` (a chain runs as one task named after its steps)."""
    for chain in chains().values():
        if name in (c.name for c in chain):
            return "-".join(c.name for c in chain)
    return name


def build_workflow_template() -> WorkflowTemplate:
    """The Hera ``WorkflowTemplate`` of :data:`puzzle.pipeline.STEPS`."""
    chain_of = {c.name: root for root, chain in chains().items() for c in chain}

    with WorkflowTemplate(
        name=template_name(),
        entrypoint="main",
        on_exit="exit-handler",
        service_account_name=SERVICE_ACCOUNT,
        security_context=POD_SECURITY,
        arguments=[
            Parameter(name=n, value=default, description=desc) if default is not None
            else Parameter(name=n, description=desc)
            for n, (default, desc) in WORKFLOW_PARAMETERS.items()
        ],
        volumes=[
            m.Volume(name="tmp", empty_dir=m.EmptyDirVolumeSource(size_limit="50Gi")),
            m.Volume(name="dshm", empty_dir=m.EmptyDirVolumeSource(medium="Memory", size_limit="16Gi")),
        ],
        artifact_repository_ref=m.ArtifactRepositoryRef(
            config_map=ARTIFACT_REPOSITORY_CONFIGMAP, key=ARTIFACT_REPOSITORY_KEY
        ),
        pod_gc=m.PodGC(strategy="OnPodSuccess", delete_delay_duration="10m"),
        ttl_strategy=m.TTLStrategy(seconds_after_success=7 * 86400, seconds_after_failure=14 * 86400),
        labels={"app.kubernetes.io/name": "puzzle", "app.kubernetes.io/version": __version__},
        annotations={"puzzle.dev/generated-by": "puzzle render-workflow (jobs/puzzle/argo.py)"},
    ) as wt:
        # Templates made inside the WorkflowTemplate context register themselves, the exit handler
        # (referenced by name only, through onExit) included.
        leaves = {s.name: _step_template(s) for s in STEPS}
        _exit_handler()

        # Chain templates: unit i of each later step waits only for unit i of the one before it.
        for chain in chains().values():
            with DAG(name="-".join(c.name for c in chain), inputs=[Parameter(name="unit")]) as dag:
                prev = None
                for c in chain:
                    t = Task(name=c.name, template=leaves[c.name], arguments=[dag.get_parameter("unit")])
                    if prev is not None:
                        prev >> t
                    prev = t

        with DAG(name="main"):
            tasks: dict[str, Task] = {}
            for s in topological_order():
                task_name = dag_task_of(s.name)
                if task_name in tasks:
                    continue
                root = step(chain_of.get(s.name, s.name))
                kwargs: dict[str, Any] = {}
                if root.fan_out is not None:
                    # The producer's output parameter (Hera checks its template declares it), one pod per item.
                    kwargs["with_param"] = tasks[dag_task_of(producer_of(root.fan_out).name)].get_parameter(
                        root.fan_out
                    )
                    kwargs["arguments"] = [Parameter(name="unit", value="{{item}}")]
                task = Task(name=task_name, template=task_name if s.name in chain_of else leaves[s.name], **kwargs)
                [tasks[d] for d in sorted({dag_task_of(d) for d in root.depends})] >> task
                tasks[task_name] = task
    return wt


def render_workflow_template() -> dict[str, Any]:
    """The WorkflowTemplate as a plain dict (what ``charts/puzzle/files/workflowtemplate.yaml`` holds)."""
    return build_workflow_template().to_dict()


def render_workflow_template_yaml() -> str:
    header = (
        "# GENERATED by `puzzle render-workflow` from jobs/puzzle/pipeline.py (the DAG) and\n"
        "# jobs/puzzle/argo.py (its rendering); do not edit by hand. `puzzle render-workflow --check`\n"
        "# and tests/test_argo.py fail when this file and a fresh render differ.\n"
    )
    return header + yaml.safe_dump(render_workflow_template(), sort_keys=False, width=1000)

"""The Puzzle pipeline DAG, defined once: steps, fan-out, dependencies, GPU or CPU, deadlines.

Two consumers read this module and nothing else for the shape of a run:

- the local runner (``puzzle run``) walks :func:`topological_order` and, for a fanned-out step, reads
  the unit list ``plan/<fan_out>.json`` from the run's store;
- :func:`render_workflow_template` turns the same data into the Argo ``WorkflowTemplate`` (with Hera),
  committed at ``k8s/workflowtemplate.yaml`` by ``puzzle render-workflow`` and shipped by the Helm chart.

Every pod runs the same image and CLI: ``puzzle step NAME --run RUN_URI [--unit JSON] [--outputs DIR]``.
Step code never imports this module; business logic stays in ``puzzle.steps``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from puzzle import __version__
from puzzle.errors import EXIT_BAD_INPUT

#: Where steps that produce fan-out lists write them for Argo's output parameters (an emptyDir).
OUTPUTS_DIR = "/tmp/outputs"
#: The main container's name in every Argo pod; podSpecPatch merges GPU settings into it by name.
MAIN_CONTAINER = "main"
#: ConfigMap key of the semaphore that caps concurrent GPU pods (the chart creates the ConfigMap).
GPU_SEMAPHORE_KEY = "gpu-pods"


@dataclass(frozen=True)
class Step:
    """One kind of pod in the pipeline.

    ``fan_out`` names the plan list (``plan/<fan_out>.json`` in the store, a JSON list of unit objects
    each with an ``"id"``) whose units this step runs, one pod per unit; ``None`` means a single pod.
    ``same_unit_as`` pairs units: unit *i* of this step waits only for unit *i* of that step (evaluate
    waits for its own assemble, not for every assemble).
    """

    name: str
    description: str
    fan_out: str | None
    depends: tuple[str, ...]
    gpu: bool
    active_deadline_seconds: int
    cpu: str
    memory: str
    produces: tuple[str, ...] = ()
    same_unit_as: str | None = None
    artifacts: tuple[str, ...] = field(default=())


#: The pipeline, in an order that is also a valid topological order.
STEPS: tuple[Step, ...] = (
    Step(
        name="prepare",
        description="tokenize distillation/validation text into shards; expand the search space into work units",
        fan_out=None, depends=(), gpu=False, active_deadline_seconds=4 * 3600,
        cpu="2", memory="8Gi", produces=("bld", "profile", "score"),
    ),
    Step(
        name="bld",
        description="blockwise local distillation of one variant over a layer range",
        fan_out="bld", depends=("prepare",), gpu=True, active_deadline_seconds=24 * 3600,
        cpu="8", memory="64Gi",
    ),
    Step(
        name="profile",
        description="measure prefill/decode time and memory of one variant on the target hardware",
        fan_out="profile", depends=("prepare",), gpu=True, active_deadline_seconds=4 * 3600,
        cpu="8", memory="32Gi",
    ),
    Step(
        name="score",
        description="replace_one_block_scores: the parent with one library block swapped in, against the parent",
        fan_out="score", depends=("prepare", "bld"), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi",
    ),
    Step(
        name="solve",
        description="MIP: one variant per layer, minimal degradation under throughput/memory/latency limits",
        fan_out=None, depends=("score", "profile"), gpu=False, active_deadline_seconds=2 * 3600,
        cpu="4", memory="8Gi", produces=("assemble",),
    ),
    Step(
        name="assemble",
        description="stitch library blocks into the child (optional GKD uplift); save as nemotron-nas",
        fan_out="assemble", depends=("solve",), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi",
    ),
    Step(
        name="evaluate",
        description="parent vs child: KL, perplexity, tasks, ICL (random/top-k/cover-ls), measured throughput",
        fan_out="assemble", depends=("assemble",), gpu=True, active_deadline_seconds=12 * 3600,
        cpu="8", memory="64Gi", same_unit_as="assemble",
    ),
    Step(
        name="report",
        description="collect every solution's evaluation into report.json and report.html",
        fan_out=None, depends=("evaluate",), gpu=False, active_deadline_seconds=3600,
        cpu="1", memory="4Gi", artifacts=("report.html", "report.json"),
    ),
)

STEP_BY_NAME: dict[str, Step] = {s.name: s for s in STEPS}


def step(name: str) -> Step:
    try:
        return STEP_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown step {name!r}; allowed: {', '.join(STEP_BY_NAME)}") from None


def producer_of(plan_list: str) -> Step:
    """The step that writes ``plan/<plan_list>.json``."""
    for s in STEPS:
        if plan_list in s.produces:
            return s
    raise KeyError(f"no step produces plan list {plan_list!r}")


def topological_order(steps: Iterable[Step] = STEPS) -> list[Step]:
    """Steps so that each comes after everything it depends on; ties keep the order of ``steps``."""
    steps = list(steps)
    names = {s.name for s in steps}
    done: list[Step] = []
    placed: set[str] = set()
    while len(done) < len(steps):
        ready = [s for s in steps if s.name not in placed and all(d in placed for d in s.depends)]
        if not ready:
            stuck = sorted(s.name for s in steps if s.name not in placed)
            raise ValueError(f"pipeline has a dependency cycle or an unknown dependency among {stuck}")
        for s in ready:
            done.append(s)
            placed.add(s.name)
    assert placed == names
    return done


def ancestors(name: str) -> set[str]:
    """Every step that must finish before ``name`` can start."""
    out: set[str] = set()
    todo = list(step(name).depends)
    while todo:
        d = todo.pop()
        if d not in out:
            out.add(d)
            todo.extend(step(d).depends)
    return out


def descendants(name: str) -> set[str]:
    """Every step that (directly or not) depends on ``name``: what redoing ``name`` must redo too."""
    return {s.name for s in STEPS if name in ancestors(s.name)}


def validate_pipeline(steps: tuple[Step, ...] = STEPS) -> None:
    """Reject a malformed pipeline at import time, so both runners see only a consistent DAG."""
    by_name = {s.name: s for s in steps}
    if len(by_name) != len(steps):
        raise ValueError("pipeline: step names must be unique")
    for s in steps:
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,40}", s.name):
            raise ValueError(f"pipeline: step name {s.name!r} must be a short DNS label")
        for d in s.depends:
            if d not in by_name:
                raise ValueError(f"pipeline: step {s.name!r} depends on unknown step {d!r}")
        if s.fan_out is not None:
            producers = [p for p in steps if s.fan_out in p.produces]
            if len(producers) != 1:
                raise ValueError(f"pipeline: plan list {s.fan_out!r} of step {s.name!r} needs exactly one producer")
        if s.same_unit_as is not None:
            other = by_name.get(s.same_unit_as)
            if other is None or other.fan_out != s.fan_out or s.depends != (other.name,):
                raise ValueError(
                    f"pipeline: step {s.name!r}: same_unit_as={s.same_unit_as!r} needs a step with the same "
                    "fan_out that is its only dependency"
                )
    topological_order(steps)
    for s in steps:
        if s.fan_out is not None:
            producer = next(p for p in steps if s.fan_out in p.produces)
            if producer.name not in ancestors(s.name) and producer.name != s.same_unit_as:
                raise ValueError(f"pipeline: step {s.name!r} must depend (directly or not) on {producer.name!r}")


validate_pipeline()


# --------------------------------------------------------------------------------------------------
# Argo WorkflowTemplate rendering (Hera). Only orchestration lives here: what each pod runs is the CLI.
# --------------------------------------------------------------------------------------------------


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

#: Names of cluster objects the template refers to; the Helm chart rewrites them to its release's names.
SERVICE_ACCOUNT = "puzzle-workflow"
SEMAPHORE_CONFIGMAP = "puzzle-semaphore"
ARTIFACT_REPOSITORY_CONFIGMAP = "puzzle-artifact-repository"
ARTIFACT_REPOSITORY_KEY = "default-v1"

RUN_URI = "{{workflow.parameters.store-prefix}}/{{workflow.parameters.run-id}}"
RETRY_LIMIT = 3
# Retry failures and errors (OOM 137, evictions, node loss) but never bad input (exit 2). A string
# comparison, not asInt(): an attempt killed before its container started has no integer exit code.
RETRY_EXPRESSION = f'lastRetry.exitCode != "{EXIT_BAD_INPUT}"'


def _p(name: str) -> str:
    return "{{workflow.parameters." + name + "}}"


def gpu_pod_spec_patch() -> str:
    """The JSON podSpecPatch of GPU pods: GPU limit (a quoted quantity), node selector, tolerations.

    Resources are patched rather than written into ``container.resources`` because a parameter can't be
    a resource name or a Quantity there: the controller decodes the template before substituting.
    """
    return (
        '{"nodeSelector": ' + _p("gpu-node-selector") + ', "tolerations": ' + _p("gpu-tolerations") + ", "
        '"containers": [{"name": "' + MAIN_CONTAINER + '", "resources": {"limits": {"'
        + _p("gpu-resource") + '": "' + _p("gpu-count") + '"}}}]}'
    )


def _security():
    from hera.workflows import models as m

    container = m.SecurityContext(
        allow_privilege_escalation=False,
        capabilities=m.Capabilities(drop=["ALL"]),
        read_only_root_filesystem=True,
        run_as_non_root=True,
        seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )
    pod = m.PodSecurityContext(
        run_as_non_root=True,
        run_as_user=10001,
        run_as_group=10001,
        fs_group=10001,
        seccomp_profile=m.SeccompProfile(type="RuntimeDefault"),
    )
    return container, pod


def _env(s: Step) -> list[Any]:
    from hera.workflows import models as m

    def secret(name: str) -> Any:
        return m.EnvVar(
            name=name,
            value_from=m.EnvVarSource(secret_key_ref=m.SecretKeySelector(name=_p("s3-secret"), key=name)),
        )

    return [
        secret("AWS_ACCESS_KEY_ID"),
        secret("AWS_SECRET_ACCESS_KEY"),
        m.EnvVar(name="AWS_ENDPOINT_URL", value=_p("s3-endpoint-url")),
        m.EnvVar(name="PUZZLE_PUSHGATEWAY_URL", value=_p("pushgateway-url")),
        # The root filesystem is read-only: every cache goes to the /tmp emptyDir.
        m.EnvVar(name="HOME", value="/tmp"),
        m.EnvVar(name="HF_HOME", value="/tmp/hf"),
        m.EnvVar(name="XDG_CACHE_HOME", value="/tmp/cache"),
        m.EnvVar(name="MPLCONFIGDIR", value="/tmp/matplotlib"),
        m.EnvVar(name="TRITON_CACHE_DIR", value="/tmp/triton"),
        m.EnvVar(name="PUZZLE_STEP", value=s.name),
    ]


def _metrics(s: Step):
    from hera.workflows import models as m

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


def _retry():
    from hera.workflows import models as m

    return m.RetryStrategy(
        limit=RETRY_LIMIT,
        retry_policy="Always",
        expression=RETRY_EXPRESSION,
        backoff=m.Backoff(duration="1m", factor=2, max_duration="1h"),
        affinity=m.RetryAffinity(node_anti_affinity=m.RetryNodeAntiAffinity()),
    )


def _container_template(s: Step):
    """The leaf template of one step: ``puzzle step NAME --run URI [--unit ...] [--outputs DIR]``."""
    from hera.workflows import Container
    from hera.workflows import models as m

    args = ["step", s.name, "--run", RUN_URI]
    inputs = None
    if s.fan_out is not None:
        inputs = [m.Parameter(name="unit", description=f"one unit of plan/{s.fan_out}.json")]
        args += ["--unit", "{{inputs.parameters.unit}}"]
    outputs: list[Any] = []
    if s.produces or s.artifacts:
        args += ["--outputs", OUTPUTS_DIR]
    for plan_list in s.produces:
        outputs.append(
            m.Parameter(name=plan_list, value_from=m.ValueFrom(path=f"{OUTPUTS_DIR}/{plan_list}.json"))
        )
    for name in s.artifacts:
        # Key-only: bucket, endpoint and credentials come from the artifactRepositoryRef ConfigMap.
        outputs.append(
            m.Artifact(
                name=re.sub(r"[^a-z0-9]+", "-", name),
                path=f"{OUTPUTS_DIR}/{name}",
                optional=True,
                archive=m.ArchiveStrategy(none=m.NoneStrategy()),
                s3=m.S3Artifact(key=f"puzzle/{_p('run-id')}/{name}"),
            )
        )
    sec, _ = _security()
    requests = {"cpu": s.cpu, "memory": s.memory}
    volume_mounts = [m.VolumeMount(name="tmp", mount_path="/tmp")]
    if s.gpu:
        # PyTorch worker processes share tensors through /dev/shm; the default 64 MiB is too small.
        volume_mounts.append(m.VolumeMount(name="dshm", mount_path="/dev/shm"))
    extra: dict[str, Any] = {}
    if s.gpu:
        extra["pod_spec_patch"] = gpu_pod_spec_patch()
        extra["synchronization"] = m.Synchronization(
            semaphores=[
                m.SemaphoreRef(
                    config_map_key_ref=m.ConfigMapKeySelector(name=SEMAPHORE_CONFIGMAP, key=GPU_SEMAPHORE_KEY)
                )
            ]
        )
    return Container(
        name=s.name,
        image=_p("image") if s.gpu else _p("cpu-image"),
        image_pull_policy="IfNotPresent",
        args=args,
        inputs=inputs,
        outputs=outputs or None,
        env=_env(s),
        resources=m.ResourceRequirements(requests=requests, limits={"memory": s.memory}),
        security_context=sec,
        volume_mounts=volume_mounts,
        active_deadline_seconds=s.active_deadline_seconds,
        retry_strategy=_retry(),
        metrics=_metrics(s),
        archive_location=m.ArtifactLocation(archive_logs=True),
        labels={"puzzle.dev/step": s.name, "puzzle.dev/run-id": _p("run-id")},
        **extra,
    )


def _exit_handler():
    """Records the workflow's final status in the run (``status.json``) whatever happened."""
    from hera.workflows import Container
    from hera.workflows import models as m

    sec, _ = _security()
    exit_step = Step(
        name="exit-handler", description="", fan_out=None, depends=(), gpu=False,
        active_deadline_seconds=600, cpu="100m", memory="512Mi",
    )
    return Container(
        name="exit-handler",
        image=_p("cpu-image"),
        image_pull_policy="IfNotPresent",
        args=[
            "status", RUN_URI,
            "--record-final", "{{workflow.status}}",
            "--workflow", "{{workflow.name}}",
            # Not {{workflow.failures}}: Argo fails to resolve it when nothing failed (argo-workflows#12330).
        ],
        env=_env(exit_step),
        resources=m.ResourceRequirements(
            requests={"cpu": exit_step.cpu, "memory": exit_step.memory}, limits={"memory": exit_step.memory}
        ),
        security_context=sec,
        volume_mounts=[m.VolumeMount(name="tmp", mount_path="/tmp")],
        active_deadline_seconds=exit_step.active_deadline_seconds,
        retry_strategy=_retry(),
        archive_location=m.ArtifactLocation(archive_logs=True),
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


def build_workflow_template():
    """The Hera ``WorkflowTemplate`` of :data:`STEPS`."""
    from hera.workflows import DAG, Parameter, Task, WorkflowTemplate
    from hera.workflows import models as m

    _, pod_sec = _security()
    chain_of = {c.name: root for root, chain in chains().items() for c in chain}

    with WorkflowTemplate(
        name=template_name(),
        entrypoint="main",
        on_exit="exit-handler",
        service_account_name=SERVICE_ACCOUNT,
        security_context=pod_sec,
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
        annotations={"puzzle.dev/generated-by": "puzzle render-workflow (jobs/puzzle/pipeline.py)"},
    ) as wt:
        # Templates made inside the WorkflowTemplate context register themselves, the exit handler
        # (referenced by name only, through onExit) included.
        leaves = {s.name: _container_template(s) for s in STEPS}
        _exit_handler()

        # Chain templates: unit i of each later step waits only for unit i of the one before it.
        for chain in chains().values():
            with DAG(name="-".join(c.name for c in chain), inputs=[m.Parameter(name="unit")]):
                prev = None
                for c in chain:
                    t = Task(
                        name=c.name,
                        template=leaves[c.name],
                        arguments=[m.Parameter(name="unit", value="{{inputs.parameters.unit}}")],
                    )
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
                deps = sorted({dag_task_of(d) for d in root.depends})
                kwargs: dict[str, Any] = {}
                if root.fan_out is not None:
                    producer = producer_of(root.fan_out)
                    kwargs["with_param"] = (
                        "{{tasks." + dag_task_of(producer.name) + ".outputs.parameters." + root.fan_out + "}}"
                    )
                    kwargs["arguments"] = [m.Parameter(name="unit", value="{{item}}")]
                template = task_name if s.name in chain_of else leaves[s.name]
                tasks[task_name] = Task(
                    name=task_name,
                    template=template,
                    depends=" && ".join(deps) if deps else None,
                    **kwargs,
                )
    return wt


def render_workflow_template() -> dict[str, Any]:
    """The WorkflowTemplate as a plain dict (what ``k8s/workflowtemplate.yaml`` holds)."""
    return build_workflow_template().to_dict()


def render_workflow_template_yaml() -> str:
    import yaml

    header = (
        "# GENERATED by `puzzle render-workflow` from jobs/puzzle/pipeline.py; do not edit by hand.\n"
        "# tests/test_pipeline.py fails when this file and a fresh render differ.\n"
    )
    return header + yaml.safe_dump(render_workflow_template(), sort_keys=False, width=1000)


def pipeline_summary() -> list[dict[str, Any]]:
    """JSON-able description of the DAG (``puzzle render-workflow --summary``)."""
    return [
        {
            "name": s.name, "fan_out": s.fan_out, "depends": list(s.depends), "gpu": s.gpu,
            "active_deadline_seconds": s.active_deadline_seconds, "produces": list(s.produces),
            "same_unit_as": s.same_unit_as,
        }
        for s in STEPS
    ]


def dumps_summary() -> str:
    return json.dumps(pipeline_summary(), indent=2)

"""``puzzle submit`` and ``puzzle status``.

The Workflow object is compared with a golden file (tests/golden/workflow_submit.yaml; regenerate with
PUZZLE_REGENERATE_GOLDEN=1, refused under CI). There is no Argo Server or Kubernetes API server here, so
their HTTP endpoints are played by a STAND-IN: a small HTTP server on 127.0.0.1 that records the request
and answers the way Argo Server / the API server answer a create. The config upload goes to a real S3
server (SeaweedFS, tests/services.py).
"""

from __future__ import annotations

import http.server
import json
import os
import threading
from pathlib import Path

import pytest
import yaml
from manifests import argo_unknown_fields
from puzzle import argo, pipeline
from puzzle.cli import main
from puzzle.commands.submit import build_workflow, create_via_argo_server, create_via_kubernetes
from puzzle.errors import UserError
from puzzle.run import progress as run_progress
from puzzle.store import open_store

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "workflow_submit.yaml"
RUN_ID = "tiny-20261126-040000-abc123"


def golden_workflow() -> dict:
    return build_workflow(
        run_id=RUN_ID, store_prefix="s3://ml-runs/puzzle/", namespace="ml",
        parameters={"image": "registry.example.com/puzzle-gpu:0.1.0", "gpu-count": "2"},
    )


def test_workflow_object_matches_golden():
    wf = golden_workflow()
    text = yaml.safe_dump(wf, sort_keys=False)
    if os.environ.get("PUZZLE_REGENERATE_GOLDEN") == "1":
        if os.environ.get("CI"):
            pytest.fail("PUZZLE_REGENERATE_GOLDEN is refused under CI: regenerate locally and commit")
        GOLDEN.write_text(text)
    assert GOLDEN.read_text() == text
    assert argo_unknown_fields(wf) == []
    assert wf["spec"]["workflowTemplateRef"]["name"] == argo.template_name()
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params["store-prefix"] == "s3://ml-runs/puzzle"  # no trailing slash: RUN_URI joins with "/"
    assert set(params) <= set(argo.WORKFLOW_PARAMETERS)


@pytest.mark.parametrize("kwargs, message", [
    ({"parameters": {"gpu-cuont": "2"}}, r"\['gpu-cuont'\] do not exist; allowed: run-id, store-prefix"),
    ({"parameters": {"run-id": "other"}}, "set by puzzle submit itself"),
    ({"parameters": {"gpu-count": "two"}}, "'gpu-count': 'two' is not allowed; give a whole number >= 1"),
    ({"parameters": {"gpu-count": "0"}}, "'gpu-count': '0' is not allowed"),
    ({"store_prefix": "file://./runs"}, "store.uri: 'file://./runs' is not reachable from cluster pods"),
])
def test_bad_submissions_are_refused(kwargs, message):
    args = {"run_id": RUN_ID, "store_prefix": "s3://b/p", "namespace": "ml", **kwargs}
    with pytest.raises(UserError, match=message):
        build_workflow(**args)


class StandIn:
    """STAND-IN for Argo Server / the Kubernetes API server: records one POST, answers with ``status``."""

    def __init__(self, status: int = 200):
        self.requests: list[dict] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                wf = body.get("workflow", body)
                if status < 300:
                    reply = {**wf, "metadata": {**wf["metadata"], "uid": "1234", "resourceVersion": "1"}}
                else:
                    reply = {"code": 6, "message": f'workflows.argoproj.io "{wf["metadata"]["name"]}" already exists',
                             "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "AlreadyExists"}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep test output quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_create_through_argo_server_posts_the_workflow():
    wf = golden_workflow()
    with StandIn() as argo:
        name = create_via_argo_server(wf, server=argo.url + "/", namespace="ml", token="s3cr3t")
    assert name == RUN_ID
    (req,) = argo.requests
    assert req["path"] == "/api/v1/workflows/ml"
    assert {k.lower(): v for k, v in req["headers"].items()}["authorization"] == "Bearer s3cr3t"
    assert req["body"] == {"namespace": "ml", "workflow": wf}


def test_argo_server_error_is_raised():
    with StandIn(status=409) as argo, pytest.raises(Exception, match="already exists"):
        create_via_argo_server(golden_workflow(), server=argo.url, namespace="ml")


def test_create_through_kubernetes_api_posts_a_custom_object(tmp_path):
    wf = golden_workflow()
    with StandIn(status=201) as api:
        kubeconfig = tmp_path / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {"server": api.url}}],
            "users": [{"name": "u", "user": {"token": "kube-token"}}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "u", "namespace": "ml"}}],
        }))
        name = create_via_kubernetes(wf, namespace="ml", kubeconfig=str(kubeconfig))
    assert name == RUN_ID
    (req,) = api.requests
    assert req["path"] == "/apis/argoproj.io/v1alpha1/namespaces/ml/workflows"
    headers = {k.lower(): v for k, v in req["headers"].items()}
    assert headers["authorization"] == "Bearer kube-token"
    assert req["body"] == wf


def _config(tmp_path: Path, store_uri: str, local_inputs: bool = False) -> Path:
    """The tiny example with the given store; its parent and text moved to S3 unless ``local_inputs``."""
    text = (ROOT / "examples" / "tiny" / "puzzle.yaml").read_text().replace("uri: file://./runs", f"uri: {store_uri}")
    if not local_inputs:
        text = (text.replace("uri: examples/tiny/parent", "uri: s3://bucket/models/tiny-parent")
                .replace("_uri: examples/tiny/data/", "_uri: s3://bucket/text/"))
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_submit_uploads_the_config_and_creates_the_workflow(tmp_path, s3_bucket, capsys):
    config = _config(tmp_path, s3_bucket.uri + "/runs")
    with StandIn() as argo:
        rc = main(["submit", str(config), "--namespace", "ml", "--argo-server", argo.url, "--argo-token", "t",
                   "--run-id", RUN_ID, "--image", "reg/puzzle-gpu:dev", "-p", "gpu-count=4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"workflow {RUN_ID} created in namespace ml" in out
    assert f"argo -n ml watch {RUN_ID}" in out
    run_uri = f"{s3_bucket.uri}/runs/{RUN_ID}"
    assert f"puzzle status {run_uri}" in out
    assert open_store(run_uri).get_text("config.yaml") == config.read_text()
    wf = argo.requests[0]["body"]["workflow"]
    params = {p["name"]: p["value"] for p in wf["spec"]["arguments"]["parameters"]}
    assert params == {"run-id": RUN_ID, "store-prefix": f"{s3_bucket.uri}/runs",
                      "image": "reg/puzzle-gpu:dev", "gpu-count": "4"}


def test_submit_refuses_a_local_store_and_bad_parameters(tmp_path, capsys):
    config = _config(tmp_path, "file://./runs")
    assert main(["submit", str(config), "--dry-run"]) == 2
    assert "cluster pods can only reach an s3:// store" in capsys.readouterr().err
    config = _config(tmp_path, "s3://bucket/runs", local_inputs=True)
    assert main(["submit", str(config), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "parent.uri is 'examples/tiny/parent', a path on this machine that cluster pods cannot read" in err
    assert "allowed for a cluster run: s3://... or hf://..." in err
    config = _config(tmp_path, "s3://bucket/runs")
    assert main(["submit", str(config), "--dry-run", "-p", "gpu-count"]) == 2
    assert "'gpu-count' is not NAME=VALUE" in capsys.readouterr().err
    assert main(["submit", str(config), "--dry-run", "--run-id", RUN_ID]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["metadata"]["name"] == RUN_ID and printed["kind"] == "Workflow"


# ---------------------------------------------------------------- puzzle status


def _run(tmp_path: Path):
    store = open_store(f"file://{tmp_path}/runs/{RUN_ID}")
    store.put_text("config.yaml", _config(tmp_path, f"file://{tmp_path}/runs").read_text())
    store.put_json("plan/bld.json", [{"id": f"attn-{i}"} for i in range(3)])
    store.put_json("plan/profile.json", [{"id": "cpu-b8-parent"}])
    store.put_json("done/prepare/all.json", {"ok": True})
    store.put_json("done/bld/attn-0.json", {"ok": True})
    store.put_json("done/bld/attn-2.json", {"ok": True})
    store.put_json("done/bld/stale-unit.json", {"ok": True})  # not in the plan: not counted
    return store


def test_status_counts_done_markers_against_plan_lists(tmp_path, capsys):
    store = _run(tmp_path)
    progress = {p.step: (p.done, p.total) for p in run_progress(store, pipeline.topological_order())}
    assert progress == {"prepare": (1, 1), "bld": (2, 3), "profile": (0, 1), "score": (0, None),
                        "solve": (0, 1), "assemble": (0, None), "evaluate": (0, None), "report": (0, 1)}
    assert main(["status", store.uri, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["steps"][1] == {"step": "bld", "done": 2, "total": 3, "complete": False, "failed": []}
    assert main(["status", store.uri]) == 0
    table = capsys.readouterr().out
    assert "bld          2/3" in table and "score        0/?    waiting for plan" in table


def test_exit_handler_records_the_final_status(tmp_path, capsys):
    store = _run(tmp_path)
    assert main(["status", store.uri, "--record-final", "Failed", "--workflow", RUN_ID]) == 0
    record = store.get_json("status.json")
    assert record["status"] == "Failed" and record["workflow"] == RUN_ID
    assert record["progress"]["bld"] == {"done": 2, "total": 3, "failed": 0}
    assert main(["status", store.uri]) == 0
    assert f"workflow {RUN_ID}: Failed" in capsys.readouterr().out


def test_status_of_a_missing_run_is_a_user_error(tmp_path, capsys):
    assert main(["status", f"file://{tmp_path}/nothing-here"]) == 2
    assert "holds no run" in capsys.readouterr().err

"""Apply and follow a RayJob with the official kubernetes client against a loopback API server.

No Kubernetes API server can run on these machines (no container runtime, no etcd), so the small
HTTP server in kube_api_server.py stands in for the endpoints the client calls: it listens on
127.0.0.1, answers with the API's object and metav1.Status shapes (201, 404 for a missing CRD or
namespace, 409 for a name conflict) and moves the RayJob status through RUNNING to SUCCEEDED/FAILED.
The client is pointed at it with a kubeconfig generated in tmp_path; nothing is mocked in-process.
"""
import io
import json
import socket
from pathlib import Path

import pytest
import yaml
from kube_api_server import FAILED, KubeApiServer

from orchestrator import config as config_mod
from orchestrator.cluster.kuberay.rayjob import (
    KubeRayNotInstalled,
    KubernetesError,
    RayJobExists,
    submit_rayjob,
)
from orchestrator.cluster.kuberay.spec import ClusterSpecError
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[3]
CRD_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "kuberay"
POLL = 0.01


@pytest.fixture(scope="module")
def crd():
    """The RayJob CRD the server reports as installed: KubeRay's published one when a copy exists."""
    path = CRD_DIR / "ray.io_rayjobs.yaml"
    if path.is_file():
        return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    # Minimal structural CRD (served version v1, open schema) so the apply path is still exercised.
    return {"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
            "metadata": {"name": "rayjobs.ray.io"},
            "spec": {"group": "ray.io", "names": {"kind": "RayJob", "plural": "rayjobs"},
                     "versions": [{"name": "v1", "served": True, "storage": True,
                                   "schema": {"openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}}}]}}


def cfg():
    return load_config(None, ["train.use_gpu=true", "train.num_workers=2", "cluster.backoff_limit=1"])


def spec_for(server: KubeApiServer, tmp_path: Path, **sdo) -> Path:
    data = yaml.safe_load((ROOT / "deploy" / "k8s.yaml").read_text())
    data["sdo"].update(kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"), **sdo)
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def calls(server: KubeApiServer, method: str, suffix: str) -> list:
    return [q for m, p, q in server.requests if m == method and p.endswith(suffix)]


def test_apply_follow_and_stream_logs_until_succeeded(tmp_path, crd):
    log = "Submitting job r50 ...\nepoch 0 AP 0.012\nJob 'r50' succeeded\n"
    with KubeApiServer(crd=crd, pod_log=log) as server:
        out = io.StringIO()
        code = submit_rayjob(cfg(), spec_for(server, tmp_path), name="r50", out=out, poll_interval=POLL)
        assert code == 0
        rayjob = server.rayjobs[("sdo", "r50")]
        configmap = server.configmaps[("sdo", "r50-config")]
        # Both objects were sent with strict field validation, RayJob first.
        assert calls(server, "POST", "/rayjobs") == [{"fieldValidation": ["Strict"]}]
        assert calls(server, "POST", "/configmaps") == [{"fieldValidation": ["Strict"]}]
        posts = [p for m, p, _ in server.requests if m == "POST"]
        assert posts == ["/apis/ray.io/v1/namespaces/sdo/rayjobs", "/api/v1/namespaces/sdo/configmaps"]
    spec = rayjob["spec"]
    assert spec["submissionMode"] == "K8sJobMode" and spec["backoffLimit"] == 1
    assert spec["entrypoint"].split()[:2] == ["sdo", "launch"]
    # The ConfigMap is owned by the RayJob (garbage-collected with it) and carries the resolved config.
    assert configmap["metadata"]["ownerReferences"] == [
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "r50", "uid": rayjob["metadata"]["uid"]}]
    resolved = config_mod.from_dict(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert resolved.train.storage_path == "/mnt/sdo/runs" and resolved.train.num_workers == 2
    text = out.getvalue()
    assert "RayJob r50: Running (job RUNNING)" in text
    assert "RayJob r50: Complete (job SUCCEEDED)" in text
    assert log in text  # the submitter pod's log, streamed whole
    assert text.index("Running (job PENDING)") < text.index("Complete (job SUCCEEDED)")


def test_log_stream_waits_for_the_submitter_container(tmp_path, crd):
    log = "epoch 0 AP 0.012\n"
    with KubeApiServer(crd=crd, pod_log=log, log_not_ready=2) as server:
        out = io.StringIO()
        assert submit_rayjob(cfg(), spec_for(server, tmp_path), name="slow", out=out, poll_interval=POLL) == 0
        log_reads = [p for m, p, _ in server.requests if p.endswith("/log")]
    assert len(log_reads) == 3  # two refusals (ContainerCreating), then the stream
    assert out.getvalue().count(log) == 1


@pytest.mark.skipif(not (CRD_DIR / "ray.io_rayjobs.yaml").is_file(), reason=f"no copy of KubeRay's CRDs at {CRD_DIR}")
def test_installed_crd_is_checked_before_anything_is_created(tmp_path, crd):
    """A field sdo's schema leaves open but the cluster's RayJob CRD rejects: nothing is created."""
    with KubeApiServer(crd=crd) as server:
        spec = spec_for(server, tmp_path)
        data = yaml.safe_load(spec.read_text())
        data["spec"]["autoscalerOptions"] = {"upscalingSpeed": "fast"}
        spec.write_text(yaml.safe_dump(data))
        with pytest.raises(ClusterSpecError, match=r"CRD installed at http://127\.0\.0\.1:\d+.*autoscalerOptions\.upscalingSpeed: unknown field"):
            submit_rayjob(cfg(), spec, name="open", out=io.StringIO())
        assert not [m for m, _, _ in server.requests if m == "POST"]


def test_failed_job_returns_1(tmp_path, crd):
    with KubeApiServer(crd=crd, script=FAILED, pod_log="Traceback ...\n") as server:
        out = io.StringIO()
        assert submit_rayjob(cfg(), spec_for(server, tmp_path), name="bad", out=out, poll_interval=POLL) == 1
    assert "RayJob bad: Failed (job FAILED) - Job entrypoint command failed with exit code 1" in out.getvalue()


def test_name_conflict_is_a_clear_error(tmp_path, crd):
    with KubeApiServer(crd=crd) as server:
        spec = spec_for(server, tmp_path)
        assert submit_rayjob(cfg(), spec, name="twice", out=io.StringIO(), poll_interval=POLL) == 0
        with pytest.raises(RayJobExists, match=r"RayJob sdo/twice already exists.*kubectl -n sdo delete rayjob twice"):
            submit_rayjob(cfg(), spec, name="twice", out=io.StringIO(), poll_interval=POLL)
        assert len(calls(server, "POST", "/configmaps")) == 1  # nothing sent after the 409
    assert issubclass(RayJobExists, FileExistsError)  # the CLI maps it to exit 2


def test_configmap_conflict_rolls_the_rayjob_back(tmp_path, crd):
    with KubeApiServer(crd=crd) as server:
        server.configmaps[("sdo", "left-config")] = {"metadata": {"name": "left-config"}}
        with pytest.raises(RayJobExists, match="ConfigMap sdo/left-config already exists"):
            submit_rayjob(cfg(), spec_for(server, tmp_path), name="left", out=io.StringIO(), poll_interval=POLL)
        assert ("sdo", "left") not in server.rayjobs
        assert [m for m, p, _ in server.requests if p.endswith("/rayjobs/left")] == ["DELETE"]


def test_missing_crd_is_one_line(tmp_path):
    with KubeApiServer(crd=None) as server:
        with pytest.raises(KubeRayNotInstalled) as info:
            submit_rayjob(cfg(), spec_for(server, tmp_path), name="nocrd", out=io.StringIO())
        assert not calls(server, "POST", "/rayjobs")  # detected from the CRD path before creating anything
    message = str(info.value)
    assert "rayjobs.ray.io" in message and "KubeRay" in message and "\n" not in message
    assert isinstance(info.value, ValueError)  # exit 2


def test_missing_crd_detected_by_create_when_crds_are_unreadable(tmp_path):
    with KubeApiServer(crd=None, crd_readable=False) as server:
        with pytest.raises(KubeRayNotInstalled, match="does not serve ray.io/v1 rayjobs"):
            submit_rayjob(cfg(), spec_for(server, tmp_path), name="nocrd", out=io.StringIO())
        assert len(calls(server, "POST", "/rayjobs")) == 1


def test_missing_namespace(tmp_path, crd):
    with KubeApiServer(crd=crd, namespaces=("default",)) as server, \
            pytest.raises(ClusterSpecError, match=r"namespace 'sdo' does not exist .*kubectl create namespace sdo"):
        submit_rayjob(cfg(), spec_for(server, tmp_path), name="nons", out=io.StringIO())


def test_unreachable_api_server_is_one_line(tmp_path):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}]}))
    data = yaml.safe_load((ROOT / "deploy" / "k8s.yaml").read_text())
    data["sdo"]["kubeconfig"] = str(kubeconfig)
    (tmp_path / "k8s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(KubernetesError) as info:
        submit_rayjob(cfg(), tmp_path / "k8s.yaml", name="away", out=io.StringIO())
    assert f"cannot reach the Kubernetes API server at http://127.0.0.1:{port}" in str(info.value)
    assert "\n" not in str(info.value) and not isinstance(info.value, ValueError)  # exit 1


def test_bad_kubeconfig_is_bad_input(tmp_path):
    data = yaml.safe_load((ROOT / "deploy" / "k8s.yaml").read_text())
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\n")
    data["sdo"].update(kubeconfig=str(tmp_path / "kubeconfig"), context="nowhere")
    (tmp_path / "k8s.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ClusterSpecError, match="kubeconfig"):
        submit_rayjob(cfg(), tmp_path / "k8s.yaml", name="x", out=io.StringIO())


class InterruptOnStatus(io.StringIO):
    """Output that raises KeyboardInterrupt (as Ctrl-C would) once the job is reported running."""

    def write(self, text):
        super().write(text)
        if "(job RUNNING)" in text:
            raise KeyboardInterrupt
        return len(text)


def test_ctrl_c_detaches_and_leaves_the_job_running(tmp_path, crd):
    with KubeApiServer(crd=crd) as server:
        out = InterruptOnStatus()
        code = submit_rayjob(cfg(), spec_for(server, tmp_path), name="bg", out=out, poll_interval=POLL)
        assert code == 130
        assert ("sdo", "bg") in server.rayjobs and not calls(server, "DELETE", "/rayjobs/bg")
    text = out.getvalue()
    assert "kubectl -n sdo get rayjob bg -w" in text and "kubectl -n sdo delete rayjob bg" in text


# ------------------------------------------------------------------------------------------------
# Through the `sdo` CLI: exit codes and one-line errors
# ------------------------------------------------------------------------------------------------

def sdo(*args):
    from click.testing import CliRunner

    from orchestrator.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_dry_run_prints_manifests(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", str(ROOT / "deploy" / "k8s.yaml"),
                 "--name", "cli_run.1", "--dry-run")
    assert result.exit_code == 0, result.output
    configmap, rayjob = yaml.safe_load_all(result.stdout)
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"]["annotations"]["sdo/run-name"] == "cli_run.1"
    assert configmap["metadata"]["name"] == rayjob["metadata"]["name"] + "-config"


def test_cli_exit_codes(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    with KubeApiServer(crd=None) as server:
        result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", str(spec_for(server, tmp_path)),
                     "--name", "cli-run")
    assert result.exit_code == 2
    assert result.stderr.startswith("sdo: error: the cluster at http://127.0.0.1:") and result.stderr.count("\n") == 1
    result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", str(tmp_path / "k8s.yaml"),
                 "--name", "cli-run")  # the server is gone now: unreachable
    assert result.exit_code == 1
    assert result.stderr.startswith("sdo: failed: cannot reach the Kubernetes API server") and result.stderr.count("\n") == 1
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 3\n")
    result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", str(tmp_path / "k8s.yaml"),
                 "--name", "cli-run")
    assert result.exit_code == 2 and "needs 3 GPUs" in result.stderr

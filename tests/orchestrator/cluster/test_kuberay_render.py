"""Rendering and validation of the RayJob that `sdo launch --cluster k8s.yaml` submits.

Structure is asserted field by field (kinds, entrypoint, resources, tolerations, volumes,
securityContext, ttl/backoff from the config), never by comparing YAML text. Bad inputs must raise
a ValueError whose message names the path of the offending field.
"""
import copy
import io
import re
from pathlib import Path

import pytest
import yaml

from orchestrator import config as config_mod
from orchestrator.cluster.kuberay.rayjob import submit_rayjob
from orchestrator.cluster.kuberay.render import (
    CONFIG_DIR,
    CONFIG_VOLUME,
    SUBMITTER_CONTAINER,
    render_manifests,
)
from orchestrator.cluster.kuberay.schema import (
    crd_dir_files,
    crd_validator,
    load_crd,
    validate_crd,
    validate_rayjob,
)
from orchestrator.cluster.kuberay.spec import (
    ClusterSpecError,
    check_rayjob_name,
    load_cluster_spec,
    rayjob_name,
)
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "k8s.yaml"
CRD_DIR = Path(__file__).resolve().parents[3].parent / "shared" / "kuberay"
needs_crds = pytest.mark.skipif(not (CRD_DIR / "ray.io_rayjobs.yaml").is_file(),
                                reason=f"no copy of KubeRay's CRDs at {CRD_DIR}")
GPU_PATH = "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu"


def gpu_config(**extra):
    overrides = ["train.use_gpu=true", "train.num_workers=2", "cluster.ttl_seconds_after_finished=120",
                 "cluster.backoff_limit=2", "model.rho=0.3"] + [f"{k}={v}" for k, v in extra.items()]
    return load_config(None, overrides)


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def write_spec(tmp_path, data: dict) -> Path:
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def render(tmp_path, data=None, cfg=None, name="r50-rho03", command="launch", crd=None):
    spec = load_cluster_spec(write_spec(tmp_path, data if data is not None else example()))
    return render_manifests(cfg or gpu_config(), spec, name=name, command=command, crd=crd)


def pods(rayjob: dict) -> dict:
    """Pod templates by role: head, each worker group by name, submitter."""
    rcs = rayjob["spec"]["rayClusterSpec"]
    out = {"head": rcs["headGroupSpec"]["template"], "submitter": rayjob["spec"]["submitterPodTemplate"]}
    out.update({g["groupName"]: g["template"] for g in rcs.get("workerGroupSpecs", [])})
    return out


# ------------------------------------------------------------------------------------------------
# The example spec
# ------------------------------------------------------------------------------------------------

def test_example_spec_renders_configmap_and_rayjob(tmp_path):
    configmap, rayjob = render(tmp_path)
    assert (configmap["apiVersion"], configmap["kind"]) == ("v1", "ConfigMap")
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["name"] == "r50-rho03" and rayjob["metadata"]["namespace"] == "sdo"
    assert configmap["metadata"] == {**configmap["metadata"], "name": "r50-rho03-config", "namespace": "sdo"}

    spec = rayjob["spec"]
    # backoffLimit 2: a retried attempt continues the run it finds in train.storage_path
    assert spec["entrypoint"].split() == ["sdo", "launch", "--config", f"{CONFIG_DIR}/config.yaml", "--name", "r50-rho03",
                                          "--resume-if-exists"]
    assert spec["submissionMode"] == "K8sJobMode"
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] == 120 and spec["backoffLimit"] == 2
    rcs = spec["rayClusterSpec"]
    assert rcs["rayVersion"] == "2.60.0"
    assert rcs["headGroupSpec"]["serviceType"] == "ClusterIP"

    head = rcs["headGroupSpec"]["template"]["spec"]
    assert {p["containerPort"] for p in head["containers"][0]["ports"]} >= {8265}
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]

    (group,) = rcs["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert group["groupName"] == "gpu" and group["maxReplicas"] == 2
    assert worker["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in worker["tolerations"]

    for role, template in pods(rayjob).items():
        pod = template["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, role
        for container in pod["containers"]:
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, role
            assert not container["securityContext"].get("privileged", False), role
        if role == "submitter":
            continue
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == "sdo-shared", role
        assert volumes[CONFIG_VOLUME]["configMap"]["name"] == "r50-rho03-config", role
        mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
        assert mounts[CONFIG_DIR] == {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True}, role
        assert mounts["/mnt/sdo"]["name"] == "shared", role

    submitter = spec["submitterPodTemplate"]["spec"]
    assert submitter["restartPolicy"] == "Never"
    assert submitter["containers"][0]["name"] == SUBMITTER_CONTAINER
    assert submitter["containers"][0]["image"] == head["containers"][0]["image"]
    assert "nvidia.com/gpu" not in submitter["containers"][0]["resources"]["limits"]
    assert submitter["securityContext"]["runAsUser"] == 1000


def test_configmap_holds_the_resolved_config(tmp_path):
    configmap, _ = render(tmp_path)
    resolved = config_mod.from_dict(yaml.safe_load(configmap["data"]["config.yaml"]))
    sdo = example()["sdo"]
    assert resolved.tracking.uri == sdo["tracking_uri"]
    assert resolved.data.train_shards == sdo["train_shards"] and resolved.data.val_shards == sdo["val_shards"]
    assert resolved.train.storage_path == sdo["storage_path"]
    assert resolved.cluster.address == "local"  # the driver attaches to the RayCluster it runs in
    assert resolved.model.rho == 0.3 and resolved.train.num_workers == 2 and resolved.train.use_gpu is True


def test_sweep_renders_the_sweep_command(tmp_path):
    _, rayjob = render(tmp_path, command="sweep", name="sweep-rho")
    assert rayjob["spec"]["entrypoint"].split()[:2] == ["sdo", "sweep"]
    assert rayjob["metadata"]["labels"]["app.kubernetes.io/component"] == "sweep"


def test_resume_continues_the_run(tmp_path):
    spec = load_cluster_spec(write_spec(tmp_path, example()))
    _, rayjob = render_manifests(gpu_config(), spec, name="r50", command="launch", resume=True)
    assert rayjob["spec"]["entrypoint"].split()[-3:] == ["--name", "r50", "--resume"]


def test_dry_run_prints_both_manifests_as_yaml(tmp_path):
    out = io.StringIO()
    assert submit_rayjob(gpu_config(), EXAMPLE, name="dry", dry_run=True, out=out) == 0
    docs = list(yaml.safe_load_all(out.getvalue()))
    assert [d["kind"] for d in docs] == ["ConfigMap", "RayJob"]
    assert docs[1]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


@needs_crds
def test_dry_run_validates_against_the_crd_copy_named_by_env(tmp_path, monkeypatch):
    data = example()
    data["spec"]["autoscalerOptions"] = {"upscalingSpeed": "fast"}
    path = write_spec(tmp_path, data)
    assert submit_rayjob(gpu_config(), path, name="open", dry_run=True, out=io.StringIO()) == 0
    monkeypatch.setenv("SDO_KUBERAY_CRDS", str(CRD_DIR))
    with pytest.raises(ClusterSpecError, match=r"autoscalerOptions\.upscalingSpeed: unknown field"):
        submit_rayjob(gpu_config(), path, name="open", dry_run=True, out=io.StringIO())
    monkeypatch.setenv("SDO_KUBERAY_CRDS", str(tmp_path))  # no CRD files there: say so, do not skip the check
    with pytest.raises(FileNotFoundError, match="ray.io_rayjobs.yaml"):
        submit_rayjob(gpu_config(), path, name="open", dry_run=True, out=io.StringIO())


# ------------------------------------------------------------------------------------------------
# A multi-group spec
# ------------------------------------------------------------------------------------------------

def multi_group() -> dict:
    data = example()
    gpu = data["spec"]["workerGroupSpecs"][0]
    gpu["replicas"] = gpu["minReplicas"] = 1
    gpu["maxReplicas"] = 2
    for key in ("requests", "limits"):
        gpu["template"]["spec"]["containers"][0]["resources"][key]["nvidia.com/gpu"] = 4
    cpu = {"groupName": "cpu-data", "replicas": 3, "minReplicas": 0, "maxReplicas": 4, "numOfHosts": 1,
           "rayStartParams": {"num-cpus": "16"},
           "template": {"spec": {"containers": [{"name": "ray-worker", "image": "ghcr.io/example/sdo:0.1.0",
                                                 "resources": {"limits": {"cpu": "16", "memory": "64Gi"}}}],
                                 "nodeSelector": {"pool": "cpu"}}}}
    data["spec"]["workerGroupSpecs"].append(cpu)
    data["sdo"]["env_from_secrets"] = ["s3-credentials", "mlflow-auth"]
    return data


def test_multi_group_spec(tmp_path):
    _, rayjob = render(tmp_path, multi_group(), cfg=gpu_config(**{"train.num_workers": 8}))
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert [g["groupName"] for g in groups] == ["gpu", "cpu-data"]
    gpu, cpu = (g["template"]["spec"] for g in groups)
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    assert "tolerations" not in cpu and cpu["nodeSelector"] == {"pool": "cpu"}
    # sdo's defaults fill what the CPU group left unset, and keep what the GPU group set.
    assert cpu["securityContext"] == {"runAsNonRoot": True}
    assert cpu["containers"][0]["securityContext"] == {"allowPrivilegeEscalation": False}
    assert gpu["securityContext"]["runAsUser"] == 1000
    for role, template in pods(rayjob).items():
        ray = template["spec"]["containers"][0]
        assert [e["secretRef"]["name"] for e in ray["envFrom"]] == ["s3-credentials", "mlflow-auth"], role
        if role != "submitter":
            assert any(m["mountPath"] == CONFIG_DIR for m in ray["volumeMounts"]), role


def test_gpu_capacity_must_cover_the_train_workers(tmp_path):
    # 2 replicas x 4 GPUs = 8: nine GPU workers cannot be placed.
    with pytest.raises(ClusterSpecError, match=r"spec\.rayClusterSpec\.workerGroupSpecs: .*num_workers=9.* at most 8"):
        render(tmp_path, multi_group(), cfg=gpu_config(**{"train.num_workers": 9}))


# ------------------------------------------------------------------------------------------------
# Bad input: each raises a ValueError naming the field path
# ------------------------------------------------------------------------------------------------

def _set(path: list, value):
    def edit(data):
        node = data
        for key in path[:-1]:
            node = node[key]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value
    return edit


WORKER = ["spec", "workerGroupSpecs", 0]
WORKER_C = WORKER + ["template", "spec", "containers", 0]
HEAD_C = ["spec", "headGroupSpec", "template", "spec", "containers", 0]
BAD_SPECS = {
    "unknown container field": (_set(WORKER_C + ["gpus"], 1),
                                "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].gpus: unknown field"),
    "unknown group field": (_set(WORKER + ["replica"], 2), "spec.rayClusterSpec.workerGroupSpecs[0].replica: unknown field"),
    "unknown pod field": (_set(WORKER + ["template", "spec", "tolerationz"], []),
                          "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.tolerationz: unknown field"),
    "missing image": (_set(HEAD_C + ["image"], KeyError),
                      "spec.rayClusterSpec.headGroupSpec.template.spec.containers[0].image: required field is missing"),
    "empty image": (_set(WORKER_C + ["image"], " "),
                    "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].image: missing container image"),
    "fractional GPU": (_set(WORKER_C + ["resources", "limits", "nvidia.com/gpu"], 1.5), GPU_PATH),
    "GPU as a word": (_set(WORKER_C + ["resources", "limits", "nvidia.com/gpu"], "one"), GPU_PATH),
    "negative GPUs": (_set(WORKER_C + ["resources", "limits", "nvidia.com/gpu"], -1), GPU_PATH),
    "GPU request != limit": (_set(WORKER_C + ["resources", "requests", "nvidia.com/gpu"], 2),
                             "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.requests.nvidia.com/gpu"),
    "group name not RFC 1123": (_set(WORKER + ["groupName"], "GPU_workers"), "spec.rayClusterSpec.workerGroupSpecs[0].groupName"),
    "privileged": (_set(WORKER_C + ["securityContext", "privileged"], True),
                   "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].securityContext.privileged"),
    "min > max replicas": (_set(WORKER + ["minReplicas"], 3), "spec.rayClusterSpec.workerGroupSpecs[0].minReplicas=3"),
    "no rayVersion": (_set(["spec", "rayVersion"], KeyError), "spec.rayClusterSpec.rayVersion: required field is missing"),
    "quantity typo": (_set(WORKER_C + ["resources", "limits", "memory"], "48 GB"),
                      "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.memory"),
    "namespace not RFC 1123": (_set(["sdo", "namespace"], "Team_A"), "sdo.namespace='Team_A'"),
    "unknown sdo field": (_set(["sdo", "tracking"], "http://x"), "sdo.tracking: unknown field"),
    "unknown top-level field": (_set(["specs"], {}), "specs: unknown top-level field"),
    "relative storage path": (_set(["sdo", "storage_path"], "runs"), "train.storage_path='runs'"),
    "credentials in tracking uri": (_set(["sdo", "tracking_uri"], "http://bob:s3cret@mlflow:5000"), "tracking.uri"),
    "volumes not a list": (_set(WORKER + ["template", "spec", "volumes"], {"shared": {}}),
                           "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.volumes: {'shared': {}} is not of type 'array'"),
    "pod spec not a mapping": (_set(WORKER + ["template", "spec"], "gpu-pod"),
                               "spec.rayClusterSpec.workerGroupSpecs[0].template.spec: 'gpu-pod' is not of type 'object'"),
    "reserved volume name": (_set(WORKER + ["template", "spec", "volumes", 0, "name"], CONFIG_VOLUME),
                             "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.volumes"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_names_the_field(tmp_path, case):
    edit, expected = BAD_SPECS[case]
    data = example()
    edit(data)
    with pytest.raises(ValueError) as info:
        render(tmp_path, data)
    assert expected in str(info.value)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize("run_name", ["R50_rho0.1", "3-runs", "a" * 128, "run-", "r50_sparse_detr_rho0.1-20261125-130000"])
def test_run_names_become_valid_rayjob_names(tmp_path, run_name):
    configmap, rayjob = render(tmp_path, name=run_name)
    k8s_name = rayjob["metadata"]["name"]
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", k8s_name) and len(k8s_name) <= 47
    assert configmap["metadata"]["name"] == f"{k8s_name}-config"
    # The run keeps its own name (MLflow run, storage folder): only the Kubernetes objects differ.
    words = rayjob["spec"]["entrypoint"].split()
    assert words[words.index("--name") + 1] == run_name
    assert rayjob["metadata"]["annotations"]["sdo/run-name"] == run_name


def test_distinct_runs_keep_distinct_rayjob_names():
    names = ["R50_rho0.1", "r50-rho0-1", "r50_rho0.1", "x" * 60 + "-a", "x" * 60 + "-b"]
    assert len({rayjob_name(n) for n in names}) == len(names)
    assert rayjob_name("r50-rho01") == "r50-rho01"  # valid names are kept as they are


@pytest.mark.parametrize("bad", ["R50", "3-runs", "a" * 48, "run-", "run.1"])
def test_schema_rejects_a_bad_rayjob_name(tmp_path, bad):
    _, rayjob = render(tmp_path)
    rayjob["metadata"]["name"] = bad
    with pytest.raises(ClusterSpecError, match=r"RayJob: metadata\.name: "):
        validate_rayjob(rayjob)
    with pytest.raises(ClusterSpecError, match=r"metadata\.name="):
        check_rayjob_name(bad)


def test_gpu_training_needs_a_gpu_group(tmp_path):
    data = example()
    for key in ("requests", "limits"):
        del data["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"][key]["nvidia.com/gpu"]
    with pytest.raises(ClusterSpecError, match="at most 0"):
        render(tmp_path, data)
    render(tmp_path, data, cfg=load_config(None, ["train.use_gpu=false"]))  # CPU training fits


# ------------------------------------------------------------------------------------------------
# KubeRay's published CRD schemas
# ------------------------------------------------------------------------------------------------

@needs_crds
def test_rendered_rayjobs_pass_the_kuberay_crd(tmp_path):
    crd = load_crd(CRD_DIR / "ray.io_rayjobs.yaml")
    render(tmp_path, crd=crd)
    render(tmp_path, multi_group(), cfg=gpu_config(**{"train.num_workers": 8}), crd=crd)
    data = example()
    del data["spec"]["workerGroupSpecs"][0]["minReplicas"]  # required by the CRD, but defaulted (0) first
    del data["spec"]["workerGroupSpecs"][0]["replicas"]
    render(tmp_path, data, crd=crd)


@needs_crds
def test_example_file_is_a_valid_raycluster():
    data = example()
    data.pop("sdo")
    validate_crd(data, load_crd(crd_dir_files(CRD_DIR)["RayCluster"]), "deploy/k8s.yaml")


@needs_crds
def test_crd_catches_what_sdo_schema_leaves_open(tmp_path):
    """autoscalerOptions is an opaque object to sdo's schema; KubeRay's CRD knows its fields."""
    data = example()
    data["spec"]["autoscalerOptions"] = {"idleTimeoutSeconds": 60, "upscalingSpeed": "fast"}
    render(tmp_path, data)  # sdo's own schema accepts it
    with pytest.raises(ClusterSpecError, match=r"KubeRay CRD schema: spec\.rayClusterSpec\.autoscalerOptions\.upscalingSpeed: unknown field"):
        render(tmp_path, data, crd=load_crd(CRD_DIR / "ray.io_rayjobs.yaml"))


@needs_crds
def test_crd_validation_reports_paths():
    validator = crd_validator(load_crd(CRD_DIR / "ray.io_rayjobs.yaml"))
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "x"},
              "spec": {"entrypoint": "true", "backoffLimit": "two"}}
    errors = {"/".join(map(str, e.absolute_path)) for e in validator.iter_errors(rayjob)}
    assert errors == {"spec/backoffLimit"}
    bad = copy.deepcopy(rayjob)
    bad["spec"]["backoffLimit"] = 1
    bad["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(ClusterSpecError, match=r"spec\.shutdownAfterJobFinish: unknown field"):
        validate_crd(bad, load_crd(CRD_DIR / "ray.io_rayjobs.yaml"), "RayJob x")


def test_crd_without_v1_is_rejected():
    crd = {"spec": {"names": {"kind": "RayJob"}, "versions": [{"name": "v1alpha1", "schema": {"openAPIV3Schema": {}}}]}}
    with pytest.raises(ClusterSpecError, match="does not serve version v1"):
        crd_validator(crd)


def test_runs_in_object_storage_need_a_tracking_server(tmp_path):
    data = example()
    data["sdo"]["storage_path"] = "s3://bucket/runs"
    data["sdo"].pop("tracking_uri", None)
    with pytest.raises(ClusterSpecError, match=r"train\.storage_path='s3://bucket/runs': runs in object storage need "
                                               r"an MLflow server .* set sdo\.tracking_uri"):
        render(tmp_path, data)
    data["sdo"]["tracking_uri"] = "http://mlflow.sdo.svc.cluster.local:5000"
    configmap, _ = render(tmp_path, data)
    assert "s3://bucket/runs" in configmap["data"][next(iter(configmap["data"]))]

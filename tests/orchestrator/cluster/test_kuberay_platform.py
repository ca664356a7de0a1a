"""What a platform engineer needs from the RayJob besides the pods: one image, metadata for queueing
(Kueue), Ray token auth, a runtime cap, retries that continue the run, Secrets checked up front.

Manifests are rendered from deploy/k8s.yaml and checked field by field and against KubeRay's published
CRD (when the copy in ../shared/kuberay exists); Secrets are checked against the loopback API server of
kube_api_server.py; the MLflow params are those of a real run created in a sqlite store.
"""
import base64
import io
import json
import secrets as token_source
from pathlib import Path

import pytest
import yaml
from kube_api_server import KubeApiServer

from orchestrator import config as config_mod
from orchestrator.cluster.kuberay.rayjob import submit_rayjob
from orchestrator.cluster.kuberay.render import render_manifests
from orchestrator.cluster.kuberay.schema import load_crd, validate_crd
from orchestrator.cluster.kuberay.spec import ClusterSpecError, load_cluster_spec
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "deploy" / "k8s.yaml"
CRD_DIR = ROOT.parent / "shared" / "kuberay"
needs_crds = pytest.mark.skipif(not (CRD_DIR / "ray.io_rayjobs.yaml").is_file(),
                                reason=f"no copy of KubeRay's CRDs at {CRD_DIR}")
POLL = 0.01


def cfg(*extra):
    return load_config(None, ["train.use_gpu=true", "train.num_workers=2", *extra])


def with_image(image: str):
    """A config whose cluster.image is ``image`` as given (as --image sets it, no YAML parsing)."""
    config = cfg()
    config.cluster.image = image
    return config


def example() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def render(tmp_path, data=None, config=None, name="r50-rho01", command="launch", crd=None):
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(data if data is not None else example(), sort_keys=False))
    return render_manifests(config or cfg(), load_cluster_spec(path), name=name, command=command, crd=crd)


def ray_images(rayjob: dict) -> dict:
    rcs = rayjob["spec"]["rayClusterSpec"]
    out = {"head": rcs["headGroupSpec"]["template"]["spec"]["containers"][0]["image"],
           "submitter": rayjob["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"]}
    out.update({g["groupName"]: g["template"]["spec"]["containers"][0]["image"] for g in rcs["workerGroupSpecs"]})
    return out


def crd():
    return load_crd(CRD_DIR / "ray.io_rayjobs.yaml") if (CRD_DIR / "ray.io_rayjobs.yaml").is_file() else None


# ------------------------------------------------------------------------------------------------
# One image
# ------------------------------------------------------------------------------------------------

def test_the_example_writes_its_image_once():
    text = EXAMPLE.read_text()
    assert text.count("ghcr.io/example/sdo:0.1.0") == 1  # the anchor; the workers refer to it
    _, rayjob = render_manifests(cfg(), load_cluster_spec(EXAMPLE), name="one", command="launch")
    assert set(ray_images(rayjob).values()) == {"ghcr.io/example/sdo:0.1.0"}


def test_cluster_image_sets_head_workers_and_submitter(tmp_path):
    data = example()
    sidecar = {"name": "log-shipper", "image": "fluent/fluent-bit:3.1"}
    data["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"].append(sidecar)
    _, rayjob = render(tmp_path, data, with_image("registry.local:5000/sdo:2.0.1"), crd=crd())
    assert set(ray_images(rayjob).values()) == {"registry.local:5000/sdo:2.0.1"}
    worker = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
    assert worker["containers"][1]["image"] == "fluent/fluent-bit:3.1"  # sidecars keep their own


@pytest.mark.parametrize("image,problem", [("ghcr.io/you/sdo", "no tag"), ("registry.local:5000/sdo", "no tag"),
                                           ("ghcr.io/you/sdo:", "no tag"), ("sdo@sha256:xyz", "digest")])
def test_an_image_without_a_tag_is_refused(tmp_path, image, problem):
    with pytest.raises(ClusterSpecError, match=rf"cluster\.image={image!r}.*{problem}"):
        render(tmp_path, config=with_image(image))
    data = example()
    data["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] = image
    with pytest.raises(ClusterSpecError, match=r"headGroupSpec\.template\.spec\.containers\[0\]\.image="):
        render(tmp_path, data)


def test_a_digest_pins_the_image(tmp_path):
    digest = "ghcr.io/you/sdo@sha256:" + "ab" * 32
    _, rayjob = render(tmp_path, config=with_image(digest))
    assert set(ray_images(rayjob).values()) == {digest}


# ------------------------------------------------------------------------------------------------
# Metadata: Kueue and friends
# ------------------------------------------------------------------------------------------------

def test_spec_labels_and_annotations_reach_the_rayjob(tmp_path):
    data = example()
    data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu-queue"
    data["metadata"]["labels"]["app.kubernetes.io/name"] = "mine"  # sdo's own keys win
    data["metadata"]["annotations"] = {"team.example.com/owner": "vision", "note": "rho 0.1 long run"}
    worker = data["spec"]["workerGroupSpecs"][0]["template"]
    worker["metadata"] = {"labels": {"pool": "a100"}, "annotations": {"prometheus.io/scrape": "true"}}
    configmap, rayjob = render(tmp_path, data, crd=crd())
    labels, annotations = rayjob["metadata"]["labels"], rayjob["metadata"]["annotations"]
    assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert labels["app.kubernetes.io/part-of"] == "sdo" and labels["app.kubernetes.io/name"] == "sdo"
    assert annotations == {"team.example.com/owner": "vision", "note": "rho 0.1 long run", "sdo/run-name": "r50-rho01"}
    # The pod templates keep their own metadata.
    template = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]
    assert template["metadata"] == {"labels": {"pool": "a100"}, "annotations": {"prometheus.io/scrape": "true"}}
    assert "kueue.x-k8s.io/queue-name" not in configmap["metadata"]["labels"]


BAD_METADATA = {
    "space in value": ("labels", "kueue.x-k8s.io/queue-name", "gpu queue", "not a valid label value"),
    "value too long": ("labels", "tier", "x" * 64, "not a valid label value"),
    "two slashes": ("labels", "a/b/c", "x", "at most one '/'"),
    "uppercase prefix": ("labels", "Kueue.x-k8s.io/queue-name", "gpu", "prefix before '/'"),
    "number value": ("labels", "replicas", 3, "must be strings"),
    "bad annotation key": ("annotations", "team owner", "x", "not a valid annotation key"),
}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_bad_metadata_names_the_key(tmp_path, case):
    field, key, value, why = BAD_METADATA[case]
    data = example()
    data["metadata"].setdefault(field, {})[key] = value
    with pytest.raises(ClusterSpecError) as info:
        render(tmp_path, data)
    message = str(info.value)
    assert f"k8s.yaml: metadata.{field}[{key!r}]" in message and why in message and "\n" not in message


# ------------------------------------------------------------------------------------------------
# Ray token auth
# ------------------------------------------------------------------------------------------------

def test_token_auth_is_on_by_default(tmp_path):
    data = example()
    del data["spec"]["authOptions"]
    _, rayjob = render(tmp_path, data, crd=crd())
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}


def test_auth_options_of_the_spec_are_kept(tmp_path):
    data = example()
    data["spec"]["authOptions"] = {"mode": "disabled"}
    _, rayjob = render(tmp_path, data, crd=crd())
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "disabled"}
    data["spec"]["authOptions"] = {"mode": "token", "secretName": "sdo-ray-token"}
    _, rayjob = render(tmp_path, data, crd=crd())
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "sdo-ray-token"}


def test_token_auth_needs_a_recent_ray(tmp_path):
    data = example()
    data["spec"]["rayVersion"] = "2.40.0"
    with pytest.raises(ClusterSpecError, match=r"authOptions\.mode='token': needs rayVersion >= 2\.52"):
        render(tmp_path, data)


def test_unknown_auth_field_is_refused(tmp_path):
    data = example()
    data["spec"]["authOptions"] = {"mode": "token", "token": "s3cret"}
    with pytest.raises(ClusterSpecError, match=r"spec\.rayClusterSpec\.authOptions\.token: unknown field"):
        render(tmp_path, data)


# ------------------------------------------------------------------------------------------------
# Deadlines and retries
# ------------------------------------------------------------------------------------------------

def test_active_deadline_and_backoff(tmp_path):
    _, rayjob = render(tmp_path, config=cfg("cluster.active_deadline_seconds=86400", "cluster.backoff_limit=3"),
                       crd=crd())
    spec = rayjob["spec"]
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 3
    assert spec["entrypoint"].split()[-1] == "--resume-if-exists"  # each retry continues the run
    _, rayjob = render(tmp_path, config=cfg("cluster.backoff_limit=0"))
    assert "activeDeadlineSeconds" not in rayjob["spec"]
    assert "--resume-if-exists" not in rayjob["spec"]["entrypoint"]  # one attempt: a taken name is an error
    with pytest.raises(ValueError, match=r"cluster\.active_deadline_seconds"):
        cfg("cluster.active_deadline_seconds=0")


# ------------------------------------------------------------------------------------------------
# Secrets, checked before anything is created; the token appears nowhere
# ------------------------------------------------------------------------------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def spec_with_secrets(server: KubeApiServer, tmp_path: Path, *, auth_secret="sdo-ray-token",
                      env_secrets=("s3-credentials",)) -> Path:
    data = example()
    data["spec"]["authOptions"] = {"mode": "token", "secretName": auth_secret}
    data["sdo"].update(kubeconfig=server.kubeconfig(tmp_path / "kubeconfig"), env_from_secrets=list(env_secrets))
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def token():
    return "tok-" + token_source.token_hex(16)


def test_no_token_value_in_any_manifest_request_or_mlflow_param(tmp_path, token, monkeypatch):
    stored = {"sdo-ray-token": {"auth_token": b64(token)},
              "s3-credentials": {"AWS_ACCESS_KEY_ID": b64("AKIA" + token), "AWS_SECRET_ACCESS_KEY": b64(token)}}
    with KubeApiServer(crd=crd(), secrets=stored, pod_log="done\n") as server:
        spec = spec_with_secrets(server, tmp_path)
        dry = io.StringIO()
        assert submit_rayjob(cfg(), spec, name="tok", dry_run=True, out=dry) == 0
        out = io.StringIO()
        assert submit_rayjob(cfg(), spec, name="tok", out=out, poll_interval=POLL) == 0
        bodies = list(server.bodies)
        reads = [p for m, p, _ in server.requests if p.startswith("/api/v1/namespaces/sdo/secrets/")]
    assert sorted(set(reads)) == ["/api/v1/namespaces/sdo/secrets/s3-credentials", "/api/v1/namespaces/sdo/secrets/sdo-ray-token"]
    configmap, rayjob = list(yaml.safe_load_all(dry.getvalue()))
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": "sdo-ray-token"}
    # The MLflow params of the run are the config tree the pods get (the ConfigMap's config.yaml).
    resolved = config_mod.from_dict(yaml.safe_load(configmap["data"]["config.yaml"]))
    resolved.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    resolved.train.storage_path = str(tmp_path / "runs")
    from mlflow.tracking import MlflowClient

    from orchestrator.run.tracking import create_run

    _, run_id = create_run(resolved, name="tok")
    params = MlflowClient(resolved.tracking.uri).get_run(run_id).data.params
    assert len(params) > 50
    texts = {"dry-run output": dry.getvalue(), "follow output": out.getvalue(), "params": json.dumps(params),
             **{f"request {i}": body for i, body in enumerate(bodies)}}
    assert len(bodies) == 2  # the RayJob and the ConfigMap
    for what, text in texts.items():
        for secret in (token, b64(token)):
            assert secret not in text, what


@pytest.mark.parametrize("case", ["missing auth secret", "missing env secret", "forbidden", "no auth_token key"])
def test_secret_problems_are_one_line_before_anything_is_created(tmp_path, token, case):
    stored = {"sdo-ray-token": {"auth_token": b64(token)}, "s3-credentials": {"AWS_ACCESS_KEY_ID": b64("x")}}
    forbidden = ()
    expected = {"missing auth secret": r"Secret sdo/sdo-ray-token \(.*spec\.authOptions\.secretName\) does not exist: "
                                       r"create it with `kubectl -n sdo create secret generic sdo-ray-token --from-literal=auth_token=",
                "missing env secret": r"Secret sdo/s3-credentials \(.*sdo\.env_from_secrets\[0\]\) does not exist",
                "forbidden": r"Secret sdo/s3-credentials .* cannot be read .*forbidden.*grant `get`",
                "no auth_token key": r"Secret sdo/sdo-ray-token .* has no non-empty key 'auth_token' \(keys: token\)"}[case]
    if case == "missing auth secret":
        del stored["sdo-ray-token"]
    elif case == "missing env secret":
        del stored["s3-credentials"]
    elif case == "forbidden":
        forbidden = ("s3-credentials",)
    else:
        stored["sdo-ray-token"] = {"token": b64(token)}
    with KubeApiServer(crd=crd(), secrets=stored, forbidden_secrets=forbidden) as server:
        spec = spec_with_secrets(server, tmp_path)
        for dry_run in (True, False):
            with pytest.raises(ClusterSpecError, match=expected) as info:
                submit_rayjob(cfg(), spec, name="sec", dry_run=dry_run, out=io.StringIO())
            assert "\n" not in str(info.value) and token not in str(info.value)
        assert not [m for m, _, _ in server.requests if m == "POST"]


def test_dry_run_without_credentials_says_secrets_were_not_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    data = example()
    data["sdo"]["env_from_secrets"] = ["s3-credentials"]
    path = tmp_path / "k8s.yaml"
    path.write_text(yaml.safe_dump(data))
    out = io.StringIO()
    assert submit_rayjob(cfg(), path, name="offline", dry_run=True, out=out) == 0
    comments = [line for line in out.getvalue().splitlines() if line.startswith("#")]
    assert comments[-1] == "# Secrets not checked: no Kubernetes credentials (kubeconfig)"
    assert [d["kind"] for d in yaml.safe_load_all(out.getvalue())] == ["ConfigMap", "RayJob"]


# ------------------------------------------------------------------------------------------------
# Through the CLI: --image, bad input -> one line, exit 2
# ------------------------------------------------------------------------------------------------

def sdo(*args, env=None):
    from click.testing import CliRunner

    from orchestrator.cli import main

    return CliRunner(env=env).invoke(main, list(args))


def test_cli_image_option_sets_every_pod(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    for command in ("launch", "sweep"):
        args = [command, "--config", str(tmp_path / "run.yaml"), "--cluster", str(EXAMPLE), "--name", "img",
                "--image", "ghcr.io/you/sdo:1.2.3", "--dry-run"]
        if command == "sweep":
            (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n"
                                               "sweep:\n  space:\n    model.rho: {grid: [0.1, 0.2]}\n")
        result = sdo(*args, env={"KUBECONFIG": "", "HOME": str(tmp_path)})
        assert result.exit_code == 0, result.output
        _, rayjob = yaml.safe_load_all(result.stdout)
        assert set(ray_images(rayjob).values()) == {"ghcr.io/you/sdo:1.2.3"}, command


@pytest.mark.parametrize("case", ["untagged --image", "bad label", "--image on local"])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, case):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    data = example()
    image = "ghcr.io/you/sdo:1.0"
    cluster = str(tmp_path / "k8s.yaml")
    if case == "untagged --image":
        image = "ghcr.io/you/sdo"
    elif case == "bad label":
        data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu queue!"
    else:
        cluster = "local"
    (tmp_path / "k8s.yaml").write_text(yaml.safe_dump(data))
    result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", cluster, "--name", "bad",
                 "--image", image, "--dry-run", env={"KUBECONFIG": "", "HOME": str(tmp_path)})
    assert result.exit_code == 2, result.output
    if case == "--image on local":
        assert "--image applies to --cluster *.yaml" in result.stderr
        return
    assert result.stderr.startswith("sdo: error: ") and result.stderr.count("\n") == 1
    assert {"untagged --image": "cluster.image='ghcr.io/you/sdo' (--image): no tag",
            "bad label": "metadata.labels['kueue.x-k8s.io/queue-name']='gpu queue!': not a valid label value"}[case] \
        in result.stderr


def test_cli_missing_secret_at_dry_run_is_exit_2(tmp_path):
    (tmp_path / "run.yaml").write_text("train:\n  use_gpu: true\n  num_workers: 2\n")
    with KubeApiServer(crd=crd(), secrets={}) as server:
        spec = spec_with_secrets(server, tmp_path, env_secrets=())
        result = sdo("launch", "--config", str(tmp_path / "run.yaml"), "--cluster", str(spec), "--name", "nosec",
                     "--dry-run")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("sdo: error: Secret sdo/sdo-ray-token") and result.stderr.count("\n") == 1
    assert "does not exist" in result.stderr and result.stdout == ""


@needs_crds
def test_the_rho01_job_passes_the_kuberay_crds_with_every_addition(tmp_path):
    """The rho=0.1 config with image, Kueue label, annotations, token auth from a Secret and a deadline."""
    data = example()
    data["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "gpu"
    data["metadata"]["annotations"] = {"team.example.com/owner": "vision"}
    data["spec"]["authOptions"] = {"mode": "token", "secretName": "sdo-ray-token"}
    config = load_config(ROOT / "configs" / "r50_sparse_detr_rho0.1.yaml",
                         ["train.use_gpu=true", "train.num_workers=2", "cluster.backoff_limit=2",
                          "cluster.active_deadline_seconds=172800", "cluster.image=ghcr.io/you/sdo:0.2.0"])
    configmap, rayjob = render(tmp_path, data, config, crd=load_crd(CRD_DIR / "ray.io_rayjobs.yaml"))
    raycluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "x"},
                  "spec": rayjob["spec"]["rayClusterSpec"]}
    validate_crd(raycluster, load_crd(CRD_DIR / "ray.io_rayclusters.yaml"), "RayCluster of the RayJob")
    assert rayjob["spec"]["activeDeadlineSeconds"] == 172800
    # The core objects pass the Kubernetes API schemas strictly (unknown fields are errors).
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kubernetes_validate.validate(configmap, version, strict=True)
    rcs = rayjob["spec"]["rayClusterSpec"]
    templates = [rcs["headGroupSpec"]["template"], rayjob["spec"]["submitterPodTemplate"],
                 *(g["template"] for g in rcs["workerGroupSpecs"])]
    for i, template in enumerate(templates):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": f"t{i}", "namespace": "sdo"}, "template": template},
                                     version, strict=True)
    assert config_mod.from_dict(yaml.safe_load(configmap["data"]["config.yaml"])).model.rho == 0.1

"""deploy/: the Dockerfile and the Kubernetes manifests parse and keep the security defaults.

No Docker engine or cluster runs here, so the files are checked statically: Dockerfile stages and
instructions, manifests parsed as YAML and validated against JSON schemas generated from the
official kubernetes client's models (unknown or mistyped fields fail), plus the security rules:
non-root pods, no privileged containers, ClusterIP services only, secrets only through Secret refs.
"""
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from orchestrator.cluster.kuberay.schema import model_schema

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
MANIFESTS = [DEPLOY / "mlflow" / "postgres.yaml", DEPLOY / "mlflow" / "mlflow.yaml", DEPLOY / "shared-pvc.yaml"]
MODELS = {"Deployment": "V1Deployment", "StatefulSet": "V1StatefulSet", "Service": "V1Service",
          "PersistentVolumeClaim": "V1PersistentVolumeClaim"}
BUILD_TOOLS = re.compile(r"\b(build-essential|gcc|g\+\+|clang|make|cmake|ninja-build|cuda-nvcc\S*|\S+-dev)\b")


def dockerfile_stages(path: Path) -> list[dict]:
    """[{'from': ..., 'name': ..., 'instructions': [(KEYWORD, args)]}] with line continuations joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = args.split()
            stages.append({"from": parts[0], "name": parts[2] if len(parts) > 2 and parts[1].upper() == "AS" else None,
                           "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((keyword, args.strip()))
    return stages


def instructions(stage: dict, keyword: str) -> list[str]:
    return [args for kw, args in stage["instructions"] if kw == keyword]


def test_dockerfile_is_a_two_stage_cuda_build():
    build, final = dockerfile_stages(DEPLOY / "Dockerfile")
    assert build["name"] == "build" and build["from"].startswith("nvidia/cuda:") and "devel" in build["from"]
    assert final["from"].startswith("nvidia/cuda:") and "runtime" in final["from"] and "devel" not in final["from"]

    env = " ".join(instructions(build, "ENV"))
    assert 'TORCH_CUDA_ARCH_LIST="7.0;7.5;8.0;8.6;8.9;9.0"' in env
    runs = " ".join(instructions(build, "RUN"))
    assert "pip install --no-build-isolation" in runs
    # The build fails unless the op holds device code for every listed architecture.
    assert "for arch in 70 75 80 86 89 90" in runs and "cuobjdump --list-elf" in runs

    # Everything the build stage copies exists in the repository (the build context).
    for args in instructions(build, "COPY"):
        *sources, _ = shlex.split(args)
        for source in sources:
            assert (ROOT / source).exists(), source


def test_dockerfile_final_stage_is_non_root_without_compilers():
    _, final = dockerfile_stages(DEPLOY / "Dockerfile")
    users = instructions(final, "USER")
    assert users, "final stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0  # numeric, so Kubernetes' runAsNonRoot can check it
    for args in instructions(final, "RUN"):
        installs = re.findall(r"apt-get install ([^&;]*)", args)
        for packages in installs:
            assert not BUILD_TOOLS.search(packages), packages
    assert instructions(final, "COPY") == ["--from=build /opt/venv /opt/venv"]


def test_dockerignore_keeps_the_package_sources():
    lines = [l.strip() for l in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
             if l.strip() and not l.startswith("#")]
    assert lines[0] == "**"
    kept = {l[1:] for l in lines if l.startswith("!")}
    assert {"setup.py", "constraints.txt", "csrc", "model", "pipelines", "orchestrator"} <= kept


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


@pytest.mark.parametrize("name,doc", list(documents()), ids=lambda v: v if isinstance(v, str) else v["kind"])
def test_manifest_matches_the_kubernetes_api(name, doc):
    jsonschema.validate(doc, model_schema(MODELS[doc["kind"]]))
    assert doc["metadata"]["namespace"] == "sdo"


def workloads():
    return [(name, doc) for name, doc in documents() if doc["kind"] in ("Deployment", "StatefulSet")]


def test_pods_run_as_non_root_and_unprivileged():
    assert {doc["metadata"]["name"] for _, doc in workloads()} == {"mlflow", "mlflow-postgres"}
    for _, doc in workloads():
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod.get("automountServiceAccountToken") is False
        for container in pod["containers"] + pod.get("initContainers", []):
            context = container["securityContext"]
            assert context.get("privileged", False) is False
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]


def test_services_are_cluster_internal_and_select_their_pods():
    services = [doc for _, doc in documents() if doc["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} == {"mlflow", "mlflow-postgres"}
    pods = {doc["metadata"]["name"]: doc["spec"]["template"] for _, doc in workloads()}
    for service in services:
        assert service["spec"]["type"] == "ClusterIP"
        template = pods[service["metadata"]["name"]]
        assert service["spec"]["selector"].items() <= template["metadata"]["labels"].items()
        port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_secrets_reach_mlflow_only_through_secret_refs():
    deployment = next(doc for _, doc in workloads() if doc["metadata"]["name"] == "mlflow")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert {e["secretRef"]["name"] for e in container["envFrom"]} == {"mlflow-postgres", "mlflow-s3"}
    env = {e["name"]: e.get("value", "") for e in container["env"]}
    backend = env["MLFLOW_BACKEND_STORE_URI"]
    assert backend.startswith("postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@mlflow-postgres:5432/")
    assert "mlflow.sdo.svc.cluster.local:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    # Nothing secret on the command line (visible in `ps` and in the pod spec).
    assert not any("PASSWORD" in arg or "SECRET" in arg for arg in container.get("args", []) + container.get("command", []))
    # The tracking URI of the example cluster spec is this Service.
    spec = yaml.safe_load((DEPLOY / "k8s.yaml").read_text())
    assert spec["sdo"]["tracking_uri"] == "http://mlflow.sdo.svc.cluster.local:5000"


def test_mlflow_image_dockerfile_is_non_root():
    (stage,) = dockerfile_stages(DEPLOY / "mlflow" / "Dockerfile")
    uid = instructions(stage, "USER")[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0
    assert any("psycopg2" in r and "boto3" in r for r in instructions(stage, "RUN"))

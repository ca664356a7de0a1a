"""Render the manifests of one run on Kubernetes: a ConfigMap with the resolved config and a RayJob.

The RayJob wraps the user's RayCluster spec unchanged except for what the run needs: the ConfigMap
mounted read-only at /etc/sdo in the Ray containers, Secrets as env, one image for every Ray
container and the submitter (``cluster.image`` / ``--image``, else the spec's), Ray token auth
(``authOptions.mode: token`` unless the spec says otherwise) and the security defaults (non-root
pods, no privilege escalation) where the spec leaves them unset. The spec's ``metadata.labels`` and
``annotations`` go onto the RayJob (Kueue reads ``kueue.x-k8s.io/queue-name`` there). Its entrypoint
runs the same command a person runs locally (`sdo launch` / `sdo sweep`) on the head pod, where Ray
Train attaches to the RayCluster the job runs in.
"""
from __future__ import annotations

import copy
import shlex
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from orchestrator import config as config_mod
from orchestrator.cluster.kuberay.metadata import check_annotations, check_labels, image_tag_problem
from orchestrator.cluster.kuberay.schema import (
    GPU_RESOURCE,
    format_path,
    validate_configmap,
    validate_crd,
    validate_rayjob,
)
from orchestrator.cluster.kuberay.spec import (
    ClusterSpec,
    ClusterSpecError,
    check_dns1123_label,
    check_rayjob_name,
    rayjob_name,
)
from orchestrator.config import Config
from orchestrator.run.storage import is_remote

CONFIG_DIR = "/etc/sdo"
CONFIG_FILE = "config.yaml"
CONFIG_VOLUME = "sdo-config"
SUBMITTER_CONTAINER = "ray-job-submitter"
COMMANDS = ("launch", "sweep")
RUN_NAME_ANNOTATION = "sdo/run-name"
# Ray token authentication needs Ray >= 2.52 (KubeRay's authOptions, v1.5.1+).
MIN_RAY_FOR_TOKEN_AUTH = (2, 52)
# KubeRay's default submitter resources (ray-operator common/job.go), kept when we supply the template.
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def configmap_name(name: str) -> str:
    return f"{name}-config"


def entrypoint(command: str, name: str, resume: bool = False, retries: int = 0) -> str:
    """The shell command the RayJob runs on the head pod: the same CLI as a local run.

    With ``retries`` (RayJob backoffLimit > 0) KubeRay runs this same command again on a fresh
    RayCluster after a failure: ``--resume-if-exists`` makes that attempt continue the run it finds in
    train.storage_path (same MLflow run, latest checkpoint) instead of refusing an existing name.
    """
    flags = ["--resume"] if resume else (["--resume-if-exists"] if retries > 0 else [])
    return shlex.join(["sdo", command, "--config", f"{CONFIG_DIR}/{CONFIG_FILE}", "--name", name] + flags)


def _is_shared_location(value: str) -> bool:
    """Pods can only share absolute paths (on a mounted volume) or URLs; relative paths are per-container."""
    return PurePosixPath(value).is_absolute() or "://" in value or value.startswith("pipe:")


def resolved_config(cfg: Config, spec: ClusterSpec) -> Config:
    """The config the pods run: the user's config with the cluster spec's `sdo:` locations applied."""
    resolved = copy.deepcopy(cfg)
    overrides = {"tracking.uri": spec.sdo.tracking_uri, "data.train_shards": spec.sdo.train_shards,
                 "data.val_shards": spec.sdo.val_shards, "train.storage_path": spec.sdo.storage_path}
    for key, value in overrides.items():
        if value is not None:
            config_mod.set_value(resolved, key, value)
    # Inside the RayJob the driver attaches to the cluster it runs in (RAY_ADDRESS is set by Ray Jobs).
    resolved.cluster.address = "local"
    config_mod.validate(resolved)  # the spec's locations are new values
    if resolved.tracking.uri and "://" in resolved.tracking.uri and urlsplit(resolved.tracking.uri).password:
        # The resolved config lands in a ConfigMap and in MLflow params: no secrets in it.
        raise ClusterSpecError("tracking.uri: embeds a password; pass MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD "
                               "through a Secret listed in sdo.env_from_secrets instead")
    for key, sdo_key in (("train.storage_path", "storage_path"), ("data.train_shards", "train_shards"),
                         ("data.val_shards", "val_shards")):
        value = config_mod.get_value(resolved, key)
        if not _is_shared_location(value):
            raise ClusterSpecError(f"{key}={value!r}: on Kubernetes this must be an absolute path on a shared volume "
                                   f"or a URL (set sdo.{sdo_key} in {spec.source})")
    if is_remote(resolved.train.storage_path) and not resolved.tracking.uri:
        raise ClusterSpecError(f"train.storage_path={resolved.train.storage_path!r}: runs in object storage need an "
                               f"MLflow server (the embedded sqlite store is a local file): set sdo.tracking_uri in "
                               f"{spec.source}")
    return resolved


def render_configmap(resolved: Config, *, name: str, namespace: str, labels: dict) -> dict:
    return {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": configmap_name(name), "namespace": namespace, "labels": dict(labels)},
        "data": {CONFIG_FILE: config_mod.dump_yaml(resolved)},
    }


def _containers(pod_template: Any) -> list:
    spec = pod_template.get("spec") if isinstance(pod_template, dict) else None
    containers = spec.get("containers") if isinstance(spec, dict) else None
    return containers if isinstance(containers, list) else []


def _pod_templates(ray_cluster_spec: dict) -> list[tuple[str, dict]]:
    """(path, template) of the head and every worker group."""
    out = []
    head = ray_cluster_spec.get("headGroupSpec")
    if isinstance(head, dict) and isinstance(head.get("template"), dict):
        out.append(("spec.rayClusterSpec.headGroupSpec.template", head["template"]))
    for i, group in enumerate(ray_cluster_spec.get("workerGroupSpecs") or []):
        if isinstance(group, dict) and isinstance(group.get("template"), dict):
            out.append((f"spec.rayClusterSpec.workerGroupSpecs[{i}].template", group["template"]))
    return out


def _mount_config(template: dict, path: str, name: str, secrets: list) -> None:
    """Mount the ConfigMap into the Ray container (index 0, as KubeRay assumes) and add Secret env."""
    pod = template.setdefault("spec", {})
    volumes = pod.setdefault("volumes", []) if isinstance(pod, dict) else None
    if not isinstance(volumes, list):
        return  # a malformed pod spec is reported by the schema check with its path
    if any(isinstance(v, dict) and v.get("name") == CONFIG_VOLUME for v in volumes):
        raise ClusterSpecError(f"{path}.spec.volumes: the volume name {CONFIG_VOLUME!r} is reserved by sdo for the run config")
    volumes.append({"name": CONFIG_VOLUME, "configMap": {"name": configmap_name(name)}})
    containers = _containers(template)
    if not containers or not isinstance(containers[0], dict):
        return  # reported by the schema check with its path
    ray = containers[0]
    mounts = ray.setdefault("volumeMounts", [])
    if not isinstance(mounts, list) or not isinstance(ray.get("envFrom", []), list):
        return
    for j, mount in enumerate(mounts):
        if isinstance(mount, dict) and mount.get("mountPath") == CONFIG_DIR:
            raise ClusterSpecError(f"{path}.spec.containers[0].volumeMounts[{j}].mountPath: {CONFIG_DIR} is reserved by sdo for the run config")
    mounts.append({"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True})
    if secrets:
        ray.setdefault("envFrom", []).extend({"secretRef": {"name": s}} for s in secrets)


def _secure(template: dict) -> None:
    """Non-root pods and no privilege escalation unless the spec says otherwise."""
    pod = template.setdefault("spec", {})
    if not isinstance(pod, dict):
        return
    if isinstance(pod.get("securityContext", {}), dict):
        pod.setdefault("securityContext", {}).setdefault("runAsNonRoot", True)
    init = pod.get("initContainers") if isinstance(pod.get("initContainers"), list) else []
    for container in _containers(template) + init:
        if isinstance(container, dict) and isinstance(container.get("securityContext", {}), dict):
            container.setdefault("securityContext", {}).setdefault("allowPrivilegeEscalation", False)


def _submitter_template(head_template: dict, labels: dict, secrets: list) -> dict:
    """The K8sJobMode submitter pod (runs `ray job submit`; KubeRay fills its command and env)."""
    head_pod = head_template.get("spec", {})
    head = _containers(head_template)[0] if _containers(head_template) else {}
    container = {"name": SUBMITTER_CONTAINER, "image": head.get("image"), "resources": copy.deepcopy(SUBMITTER_RESOURCES),
                 "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}}
    if secrets:
        container["envFrom"] = [{"secretRef": {"name": s}} for s in secrets]
    pod = {"restartPolicy": "Never", "containers": [container],
           "securityContext": copy.deepcopy(head_pod.get("securityContext") or {"runAsNonRoot": True})}
    for key in ("imagePullSecrets", "serviceAccountName", "nodeSelector"):  # same registry, identity, CPU nodes
        if key in head_pod:
            pod[key] = copy.deepcopy(head_pod[key])
    return {"metadata": {"labels": dict(labels)}, "spec": pod}


def _set_image(template: dict, image: str) -> None:
    """The Ray container (index 0) runs ``image``; sidecars keep theirs."""
    containers = _containers(template)
    if containers and isinstance(containers[0], dict):
        containers[0]["image"] = image


def _ray_version(value: Any) -> tuple[int, int] | None:
    parts = str(value).split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return None  # reported by the schema check


def _auth_options(ray_cluster_spec: dict) -> None:
    """Ray token auth as KubeRay documents it: ``authOptions.mode: token`` on the RayCluster.

    KubeRay then sets RAY_AUTH_MODE and RAY_AUTH_TOKEN (a secretKeyRef, never a literal) on every Ray
    container and on the submitter; the token is the Secret ``secretName`` (key ``auth_token``) or one
    KubeRay generates per RayCluster. A spec that sets ``authOptions`` itself (``mode: disabled`` too)
    is kept as it is.
    """
    auth = ray_cluster_spec.setdefault("authOptions", {"mode": "token"})
    if not isinstance(auth, dict) or auth.get("mode") != "token":
        return
    version = _ray_version(ray_cluster_spec.get("rayVersion"))
    if version is not None and version < MIN_RAY_FOR_TOKEN_AUTH:
        minimum = ".".join(map(str, MIN_RAY_FOR_TOKEN_AUTH))
        raise ClusterSpecError(f"spec.rayClusterSpec.authOptions.mode='token': needs rayVersion >= {minimum} "
                               f"(got {ray_cluster_spec['rayVersion']!r}); set authOptions.mode: disabled to run without it")


def render_rayjob(cfg: Config, spec: ClusterSpec, *, name: str, run_name: str, command: str, labels: dict,
                  resume: bool = False) -> dict:
    """The RayJob ``name`` running ``sdo <command>`` for the run ``run_name`` (validated by :func:`render_manifests`)."""
    ray_cluster_spec = copy.deepcopy(spec.ray_cluster_spec)
    secrets = list(spec.sdo.env_from_secrets)
    for path, template in _pod_templates(ray_cluster_spec):
        if cfg.cluster.image:
            _set_image(template, cfg.cluster.image)
        _mount_config(template, path, name, secrets)
        _secure(template)
    _auth_options(ray_cluster_spec)
    rayjob_spec = {
        "entrypoint": entrypoint(command, run_name, resume, retries=cfg.cluster.backoff_limit),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": cfg.cluster.ttl_seconds_after_finished,
        "backoffLimit": cfg.cluster.backoff_limit,
        "rayClusterSpec": ray_cluster_spec,
    }
    if cfg.cluster.active_deadline_seconds is not None:
        rayjob_spec["activeDeadlineSeconds"] = cfg.cluster.active_deadline_seconds
    head = ray_cluster_spec.get("headGroupSpec")
    head_containers = _containers(head.get("template")) if isinstance(head, dict) else []
    # Without a head image the submitter has none either; the head's missing image is what gets reported.
    if head_containers and isinstance(head_containers[0], dict) and head_containers[0].get("image"):
        rayjob_spec["submitterPodTemplate"] = _submitter_template(head["template"], labels, secrets)
    # The spec's own metadata reaches the RayJob (queueing: kueue.x-k8s.io/queue-name); sdo's keys win.
    source = spec.source
    user_labels = _checked(check_labels, spec.metadata.get("labels"), f"{source}: metadata.labels")
    user_annotations = _checked(check_annotations, spec.metadata.get("annotations"), f"{source}: metadata.annotations")
    return {"apiVersion": "ray.io/v1", "kind": "RayJob",
            "metadata": {"name": name, "namespace": spec.namespace, "labels": {**user_labels, **labels},
                         "annotations": {**user_annotations, RUN_NAME_ANNOTATION: run_name}},
            "spec": rayjob_spec}


class _SpecFileError(ClusterSpecError):
    """Names a field of the spec file itself (not of the rendered RayJob)."""


def _checked(check, value, path):
    try:
        return check(value, path)
    except ClusterSpecError as err:
        raise _SpecFileError(str(err)) from None


# --------------------------------------------------------------------------------------------
# Checks a schema cannot express
# --------------------------------------------------------------------------------------------

def _gpus(resources: dict, key: str) -> int | None:
    value = (resources.get(key) or {}).get(GPU_RESOURCE)
    return None if value is None else int(value)


def _check_pods(rayjob: dict) -> int:
    """Images, privilege and GPU requests of every pod; returns the GPUs the cluster can offer at most."""
    ray_cluster_spec = rayjob["spec"]["rayClusterSpec"]
    replicas = {"spec.rayClusterSpec.headGroupSpec.template": 1}
    for i, group in enumerate(ray_cluster_spec.get("workerGroupSpecs") or []):
        replicas[f"spec.rayClusterSpec.workerGroupSpecs[{i}].template"] = group["maxReplicas"] * group.get("numOfHosts", 1)
    templates = _pod_templates(ray_cluster_spec) + [("spec.submitterPodTemplate", rayjob["spec"].get("submitterPodTemplate"))]
    templates = [(path, t) for path, t in templates if t is not None]
    capacity = 0
    for path, template in templates:
        pod = template["spec"]
        for kind in ("initContainers", "containers"):
            for j, container in enumerate(pod.get(kind) or []):
                where = f"{path}.spec.{kind}[{j}]"
                if not str(container.get("image", "")).strip():
                    raise ClusterSpecError(f"{where}.image: missing container image")
                problem = image_tag_problem(container["image"])
                if problem:
                    raise ClusterSpecError(f"{where}.image={container['image']!r}: {problem}")
                if (container.get("securityContext") or {}).get("privileged"):
                    raise ClusterSpecError(f"{where}.securityContext.privileged: privileged containers are not allowed")
                resources = container.get("resources") or {}
                limit, request = _gpus(resources, "limits"), _gpus(resources, "requests")
                if request is not None and limit is None:
                    raise ClusterSpecError(f"{where}.resources.limits.{GPU_RESOURCE}: GPUs must be set in limits "
                                           f"(requests.{GPU_RESOURCE}={request} without a limit)")
                if request is not None and request != limit:
                    raise ClusterSpecError(f"{where}.resources.requests.{GPU_RESOURCE}: must equal "
                                           f"limits.{GPU_RESOURCE} ({request} != {limit})")
                if kind == "containers" and path in replicas:
                    capacity += (limit or 0) * replicas[path]
    return capacity


def _check_groups(ray_cluster_spec: dict) -> None:
    seen = {}
    for i, group in enumerate(ray_cluster_spec.get("workerGroupSpecs") or []):
        where = f"spec.rayClusterSpec.workerGroupSpecs[{i}]"
        check_dns1123_label(group["groupName"], f"{where}.groupName")
        if group["groupName"] in seen:
            raise ClusterSpecError(f"{where}.groupName={group['groupName']!r}: duplicate of workerGroupSpecs[{seen[group['groupName']]}]")
        seen[group["groupName"]] = i
        low, high = group.get("minReplicas", 0), group["maxReplicas"]
        if low > high:
            raise ClusterSpecError(f"{where}.minReplicas={low}: must be <= maxReplicas={high}")
        if "replicas" in group and not low <= group["replicas"] <= high:
            raise ClusterSpecError(f"{where}.replicas={group['replicas']}: must be within minReplicas..maxReplicas ({low}..{high})")


def check_rayjob(rayjob: dict, cfg: Config, *, command: str) -> None:
    """Semantic checks after the schema passed: names, images, privilege, GPU counts vs the config."""
    _check_groups(rayjob["spec"]["rayClusterSpec"])
    capacity = _check_pods(rayjob)
    needed = cfg.train.num_workers if cfg.train.use_gpu else 0
    if needed > capacity:
        path = format_path(["spec", "rayClusterSpec", "workerGroupSpecs"])
        raise ClusterSpecError(f"{path}: train.use_gpu with train.num_workers={needed} needs {needed} GPUs "
                               f"({GPU_RESOURCE} limits x maxReplicas), the cluster offers at most {capacity}"
                               + (" per trial" if command == "sweep" else ""))


def render_manifests(cfg: Config, spec: ClusterSpec, *, name: str, command: str,
                     crd: dict | None = None, resume: bool = False) -> list[dict]:
    """[ConfigMap, RayJob] for the run ``name``, validated (sdo schema, then KubeRay's CRD when given).

    The objects are named :func:`rayjob_name` (name) - the run name itself when it is a valid RayJob name.
    """
    if command not in COMMANDS:
        raise ValueError(f"command={command!r}: must be one of {', '.join(COMMANDS)}")
    k8s_name = rayjob_name(name)
    check_rayjob_name(k8s_name)
    resolved = resolved_config(cfg, spec)
    labels = {"app.kubernetes.io/name": "sdo", "app.kubernetes.io/managed-by": "sdo",
              "app.kubernetes.io/component": command, "app.kubernetes.io/instance": k8s_name}
    configmap = render_configmap(resolved, name=k8s_name, namespace=spec.namespace, labels=labels)
    validate_configmap(configmap, what=f"ConfigMap {configmap_name(k8s_name)}")
    what = f"RayJob {k8s_name} (from {spec.source})"
    if resolved.cluster.image:
        problem = image_tag_problem(resolved.cluster.image)
        if problem:
            raise ClusterSpecError(f"cluster.image={resolved.cluster.image!r} (--image): {problem}")
    try:
        rayjob = render_rayjob(resolved, spec, name=k8s_name, run_name=name, command=command, labels=labels,
                               resume=resume)
    except _SpecFileError:
        raise
    except ClusterSpecError as err:
        raise ClusterSpecError(f"{what}: {err}") from None
    validate_rayjob(rayjob, what=what)
    try:
        check_rayjob(rayjob, resolved, command=command)
    except ClusterSpecError as err:
        raise ClusterSpecError(f"{what}: {err}") from None
    if crd is not None:
        validate_crd(rayjob, crd, what=what)
    return [configmap, rayjob]

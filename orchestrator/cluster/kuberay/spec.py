"""The cluster spec of `sdo launch --cluster k8s.yaml`: a KubeRay RayCluster plus an `sdo:` section.

The file is what KubeRay users already write (``apiVersion: ray.io/v1``, ``kind: RayCluster``,
``metadata``, ``spec`` with ``headGroupSpec`` / ``workerGroupSpecs``), so it can be applied on its own
with kubectl, plus one extra top-level key, ``sdo:``, that says where the run's inputs and outputs
live inside the cluster. deploy/README.md documents every field.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ClusterSpecError(ValueError):
    """The cluster spec or a manifest rendered from it is wrong; the message names the field path."""


# Kubernetes name rules (k8s.io/apimachinery/pkg/util/validation).
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# KubeRay appends 6 characters to a RayJob name to name its RayCluster, whose name is capped at 53
# so that "<name>-serve-svc" stays a 63-character DNS label (ray-operator utils/constant.go).
MAX_RAYJOB_NAME = 47


def check_dns1123_label(value: Any, path: str) -> None:
    """RFC 1123 label: lowercase alphanumerics and '-', 1..63 characters, alphanumeric at both ends."""
    if not isinstance(value, str) or not DNS1123_LABEL.match(value) or len(value) > 63:
        raise ClusterSpecError(f"{path}={value!r}: must be an RFC 1123 label (lowercase letters, digits and '-', "
                               f"at most 63 characters, starting and ending with a letter or digit)")


def check_rayjob_name(value: Any, path: str = "metadata.name") -> None:
    """RayJob names are RFC 1035 labels of at most 47 characters (KubeRay's ValidateRayJobMetadata)."""
    if not isinstance(value, str) or not DNS1035_LABEL.match(value) or len(value) > MAX_RAYJOB_NAME:
        raise ClusterSpecError(f"{path}={value!r}: a RayJob name must be an RFC 1035 label (lowercase letters, "
                               f"digits and '-', starting with a letter, at most {MAX_RAYJOB_NAME} characters)")


def rayjob_name(run_name: str) -> str:
    """The Kubernetes name of a run's RayJob: the run name made an RFC 1035 label of <= 47 characters.

    Run names may hold capitals, '.' and '_' (r50_rho0.1-20260101-120000); the run keeps its name
    (MLflow, storage), only the Kubernetes objects use this form. A name that had to change ends in
    a hash of the run name, so that distinct runs keep distinct RayJobs.
    """
    name = re.sub(r"[^a-z0-9-]+", "-", run_name.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"sdo-{name}".rstrip("-")
    if name == run_name and len(name) <= MAX_RAYJOB_NAME:
        return name
    digest = hashlib.sha1(run_name.encode()).hexdigest()[:6]
    return f"{name[:MAX_RAYJOB_NAME - 7].rstrip('-')}-{digest}"


@dataclass
class SdoSection:
    """The `sdo:` section of a cluster spec (every field optional)."""

    namespace: str | None = None          # Kubernetes namespace of the RayJob and its ConfigMap
    tracking_uri: str | None = None       # MLflow tracking URI as seen from inside the cluster
    train_shards: str | None = None       # overrides data.train_shards (path on the shared volume or URL)
    val_shards: str | None = None         # overrides data.val_shards
    storage_path: str | None = None       # overrides train.storage_path (shared volume path or s3://...)
    env_from_secrets: list = field(default_factory=list)  # Secrets whose keys become env vars in every pod
    kubeconfig: str | None = None         # kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)
    context: str | None = None            # kubeconfig context (default: current-context)


@dataclass
class ClusterSpec:
    """A loaded cluster spec: the RayCluster ``spec`` mapping, its metadata and the sdo section."""

    source: str
    ray_cluster_spec: dict
    metadata: dict
    sdo: SdoSection

    @property
    def namespace(self) -> str:
        return self.sdo.namespace or self.metadata.get("namespace") or "default"


_TOP_LEVEL = ("apiVersion", "kind", "metadata", "spec", "sdo")


def _sdo_section(raw: Any, source: str) -> SdoSection:
    if raw is None:
        return SdoSection()
    if not isinstance(raw, dict):
        raise ClusterSpecError(f"{source}: sdo: expected a mapping, got {type(raw).__name__}")
    names = [f.name for f in dataclasses.fields(SdoSection)]
    section = SdoSection()
    for key, value in raw.items():
        if key not in names:
            raise ClusterSpecError(f"{source}: sdo.{key}: unknown field (known: {', '.join(names)})")
        if key == "env_from_secrets":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ClusterSpecError(f"{source}: sdo.env_from_secrets: expected a list of Secret names, got {value!r}")
            for i, secret in enumerate(value):
                _in_source(source, check_dns1123_label_subdomain, secret, f"sdo.env_from_secrets[{i}]")
        elif value is not None and not isinstance(value, str):
            raise ClusterSpecError(f"{source}: sdo.{key}: expected a string, got {value!r}")
        setattr(section, key, value)
    if section.namespace is not None:
        _in_source(source, check_dns1123_label, section.namespace, "sdo.namespace")
    return section


def check_dns1123_label_subdomain(value: Any, path: str) -> None:
    """RFC 1123 subdomain (names of Secrets, ConfigMaps, ...): dot-separated labels, at most 253 characters."""
    if not isinstance(value, str) or len(value) > 253 or not all(DNS1123_LABEL.match(p) for p in value.split(".")):
        raise ClusterSpecError(f"{path}={value!r}: must be an RFC 1123 subdomain (lowercase letters, digits, '-' and '.')")


def _in_source(source: str, check, value: Any, path: str) -> None:
    try:
        check(value, path)
    except ClusterSpecError as err:
        raise ClusterSpecError(f"{source}: {err}") from None


def load_cluster_spec(path: str | Path) -> ClusterSpec:
    """Read and shape-check a cluster spec file; the RayJob rendered from it is validated in full later."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise FileNotFoundError(f"cluster spec not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ClusterSpecError(f"{source}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ClusterSpecError(f"{source}: expected a KubeRay RayCluster manifest (a mapping), got {type(data).__name__}")
    for key in data:
        if key not in _TOP_LEVEL:
            raise ClusterSpecError(f"{source}: {key}: unknown top-level field (expected {', '.join(_TOP_LEVEL)})")
    if data.get("apiVersion", "ray.io/v1") != "ray.io/v1":
        raise ClusterSpecError(f"{source}: apiVersion={data['apiVersion']!r}: must be ray.io/v1")
    if data.get("kind", "RayCluster") != "RayCluster":
        raise ClusterSpecError(f"{source}: kind={data['kind']!r}: must be RayCluster")
    spec = data.get("spec")
    if not isinstance(spec, dict):
        raise ClusterSpecError(f"{source}: spec: missing or not a mapping (the RayCluster spec: rayVersion, headGroupSpec, workerGroupSpecs)")
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ClusterSpecError(f"{source}: metadata: expected a mapping, got {metadata!r}")
    if "namespace" in metadata:
        _in_source(source, check_dns1123_label, metadata["namespace"], "metadata.namespace")
    return ClusterSpec(source=source, ray_cluster_spec=spec, metadata=metadata, sdo=_sdo_section(data.get("sdo"), source))

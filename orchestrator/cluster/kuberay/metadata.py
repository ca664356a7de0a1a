"""What a cluster spec may put on the RayJob besides its pods: labels, annotations, image references.

Kubernetes' own syntax rules (k8s.io/apimachinery/pkg/util/validation), checked before anything is
sent, so that a typo in a Kueue queue label is one clear line at ``--dry-run`` rather than an API
server rejection (or, worse, a job that never gets admitted).
"""
from __future__ import annotations

import re
from typing import Any

from orchestrator.cluster.kuberay.spec import DNS1123_LABEL, ClusterSpecError

# A qualified name: [prefix/]name, the name 1..63 alphanumerics with '-', '_', '.' inside.
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
# Label values: empty, or like a name.
_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?$")
ANNOTATIONS_MAX_BYTES = 256 * 1024  # total size of all annotation keys and values (TotalAnnotationSizeLimitB)


def _key_problem(key: Any) -> str | None:
    """Why ``key`` is not a qualified name (label or annotation key), or None."""
    if not isinstance(key, str) or not key:
        return "a key must be a non-empty string"
    prefix, _, name = key.rpartition("/")
    if "/" in prefix:
        return "a key holds at most one '/' (prefix/name)"
    if key.endswith("/") or (prefix == "" and key.startswith("/")):
        return "the name part after '/' must not be empty"
    if prefix and (len(prefix) > 253 or not all(DNS1123_LABEL.match(p) for p in prefix.split("."))):
        return "the prefix before '/' must be a DNS subdomain (lowercase letters, digits, '-', '.'; at most 253)"
    if len(name) > 63 or not _NAME.match(name):
        return ("the name must be at most 63 characters: letters, digits, '-', '_', '.', starting and ending "
                "with a letter or digit")
    return None


def check_labels(labels: Any, path: str) -> dict[str, str]:
    """Kubernetes label syntax for every key and value; returns the labels as a dict of strings."""
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        raise ClusterSpecError(f"{path}: expected a mapping of label keys to values, got {labels!r}")
    for key, value in labels.items():
        problem = _key_problem(key)
        if problem:
            raise ClusterSpecError(f"{path}[{key!r}]: not a valid label key: {problem}")
        if not isinstance(value, str):
            raise ClusterSpecError(f"{path}[{key!r}]={value!r}: label values must be strings (quote it in YAML)")
        if len(value) > 63 or not _VALUE.match(value):
            raise ClusterSpecError(f"{path}[{key!r}]={value!r}: not a valid label value (at most 63 characters: "
                                   f"letters, digits, '-', '_', '.', starting and ending with a letter or digit)")
    return dict(labels)


def check_annotations(annotations: Any, path: str) -> dict[str, str]:
    """Annotation keys are qualified names like label keys; values are any strings (256 KiB in all)."""
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise ClusterSpecError(f"{path}: expected a mapping of annotation keys to values, got {annotations!r}")
    for key, value in annotations.items():
        problem = _key_problem(key)
        if problem:
            raise ClusterSpecError(f"{path}[{key!r}]: not a valid annotation key: {problem}")
        if not isinstance(value, str):
            raise ClusterSpecError(f"{path}[{key!r}]={value!r}: annotation values must be strings (quote it in YAML)")
    size = sum(len(k.encode()) + len(v.encode()) for k, v in annotations.items())
    if size > ANNOTATIONS_MAX_BYTES:
        raise ClusterSpecError(f"{path}: {size} bytes of annotations, Kubernetes allows at most {ANNOTATIONS_MAX_BYTES}")
    return dict(annotations)


def image_tag_problem(image: Any) -> str | None:
    """Why ``image`` is not a pinned reference (``repo:tag`` or ``repo@sha256:...``), or None.

    An untagged image means ``:latest``: the head, the workers and a retried RayJob could each pull a
    different build, and resuming a run from its checkpoints on other code is not resuming it.
    """
    if not isinstance(image, str) or not image.strip():
        return "missing container image"
    if image != image.strip() or any(c.isspace() for c in image):
        return "an image reference holds no spaces"
    if "@" in image:
        digest = image.split("@", 1)[1]
        if not re.fullmatch(r"[a-z0-9]+:[0-9a-fA-F]{32,}", digest):
            return f"digest {digest!r} is not algorithm:hex (e.g. sha256:...)"
        return None
    last = image.rsplit("/", 1)[-1]  # a registry port (localhost:5000/sdo) is not a tag
    if ":" not in last or not last.split(":", 1)[1]:
        return "no tag: pin it (e.g. ghcr.io/you/sdo:0.1.0 or @sha256:...) so every pod and retry runs the same build"
    return None

"""The Kubernetes API client of the RayJob submitter and its errors (one line each, mapped to exit codes).

Bad spec/manifest -> ClusterSpecError (ValueError, exit 2); KubeRay not installed ->
KubeRayNotInstalled (ValueError, exit 2); name taken -> RayJobExists (FileExistsError, exit 2);
API server unreachable or refusing -> KubernetesError (RuntimeError, exit 1).
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.cluster.kuberay.spec import ClusterSpec, ClusterSpecError

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayjobs"
CRD_NAME = f"{PLURAL}.{GROUP}"
REQUEST_TIMEOUT = 30.0  # seconds per API call; log streams are not limited


class KubernetesError(RuntimeError):
    """The Kubernetes API server cannot be reached or refused a request for a reason other than bad input."""


class KubeRayNotInstalled(ClusterSpecError):
    """The cluster has no RayJob CRD (ray.io/v1): the KubeRay operator is not installed."""


class NoCredentials(ClusterSpecError):
    """No kubeconfig and not inside a pod: nothing to talk to (``--dry-run`` still renders offline)."""


class RayJobExists(FileExistsError):
    """A RayJob (or its ConfigMap) of that name already exists in the namespace."""


def api_client(spec: ClusterSpec):
    """An ApiClient from sdo.kubeconfig, $KUBECONFIG or ~/.kube/config, else the in-cluster service account."""
    from kubernetes import client, config

    conf = client.Configuration()
    kubeconfig = spec.sdo.kubeconfig
    if kubeconfig is not None:
        kubeconfig = str(Path(spec.source).parent / Path(kubeconfig).expanduser())
    default = Path(os.path.expanduser(config.KUBE_CONFIG_DEFAULT_LOCATION))
    try:
        if kubeconfig or os.environ.get("KUBECONFIG") or default.is_file():
            config.load_kube_config(config_file=kubeconfig, context=spec.sdo.context,
                                    client_configuration=conf, persist_config=False)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=conf)
        else:
            raise NoCredentials(f"{spec.source}: no Kubernetes credentials: set sdo.kubeconfig, $KUBECONFIG "
                                   f"or ~/.kube/config (or run inside a pod)")
    except config.ConfigException as err:
        where = kubeconfig or os.environ.get("KUBECONFIG") or str(default)
        raise ClusterSpecError(f"kubeconfig {where}: {str(err).splitlines()[0]}") from None
    conf.retries = 1  # fail fast on a dead address; the caller reports it in one line
    return client.ApiClient(conf)


def api_message(err) -> str:
    """The API server's one-line reason from an ApiException body (a metav1.Status)."""
    try:
        body = json.loads(err.body or "{}")
    except (ValueError, TypeError):
        body = {}
    message = body.get("message") if isinstance(body, dict) else None
    return (message or err.reason or f"HTTP {err.status}").splitlines()[0]


def status_details(err) -> dict:
    try:
        body = json.loads(err.body or "{}")
    except (ValueError, TypeError):
        return {}
    return (body.get("details") or {}) if isinstance(body, dict) else {}


def call(host: str, what: str, fn: Callable, *args, **kwargs) -> Any:
    """Run one API call; connection failures become one clear KubernetesError line."""
    import urllib3

    try:
        return fn(*args, **kwargs)
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise KubernetesError(f"cannot reach the Kubernetes API server at {host} ({what}): {str(reason).splitlines()[0]}") from None

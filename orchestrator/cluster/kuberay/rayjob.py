"""`sdo launch|sweep --cluster k8s.yaml`: run on Kubernetes as a KubeRay RayJob.

Flow: load the cluster spec -> render [ConfigMap, RayJob] -> validate (sdo schema, KubeRay's CRD from
the cluster or a local copy) -> check the Secrets the pods will read (exist, readable, keys) ->
create the RayJob, then the ConfigMap owned by it -> follow the
RayJob status and stream the submitter pod's logs (K8sJobMode: `ray job submit` tails the job) until
KubeRay marks it Complete or Failed. Ctrl-C detaches: the job keeps running.

Errors (orchestrator.cluster.kuberay.client, re-exported here): bad spec/manifest -> ClusterSpecError (ValueError,
exit 2); KubeRay not installed -> KubeRayNotInstalled (ValueError, exit 2); name taken -> RayJobExists
(FileExistsError, exit 2); API server unreachable or refusing -> KubernetesError (RuntimeError, exit 1).
Messages are one line.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TextIO

import yaml

from orchestrator.cluster.kuberay.client import (
    CRD_NAME,
    GROUP,
    PLURAL,
    REQUEST_TIMEOUT,
    VERSION,
    KubeRayNotInstalled,
    KubernetesError,
    NoCredentials,
    RayJobExists,
    api_client,
    api_message,
    call,
    status_details,
)
from orchestrator.cluster.kuberay.follow import detach_hint, follow
from orchestrator.cluster.kuberay.rbac import describe as describe_permissions
from orchestrator.cluster.kuberay.render import configmap_name, render_manifests
from orchestrator.cluster.kuberay.schema import crd_dir_files, load_crd, validate_crd
from orchestrator.cluster.kuberay.secrets import check_secrets, referenced_secrets
from orchestrator.cluster.kuberay.spec import ClusterSpec, ClusterSpecError, load_cluster_spec
from orchestrator.config import Config

CRD_ENV = "SDO_KUBERAY_CRDS"  # directory holding ray.io_rayjobs.yaml (KubeRay's published CRDs)


# --------------------------------------------------------------------------------------------
# CRD, apply
# --------------------------------------------------------------------------------------------

def cluster_crd(api, host: str) -> dict | None:
    """The RayJob CRD installed in the cluster; None where we may not read CRDs (RBAC)."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api)
    try:
        return call(host, "read the RayJob CRD", custom.get_cluster_custom_object, "apiextensions.k8s.io", "v1",
                     "customresourcedefinitions", CRD_NAME, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        if err.status == 404:
            raise KubeRayNotInstalled(f"the cluster at {host} has no RayJob CRD ({CRD_NAME}): install the KubeRay operator "
                                      f"(helm install kuberay-operator kuberay/kuberay-operator)") from None
        if err.status in (401, 403):
            return None
        raise KubernetesError(f"reading CRD {CRD_NAME} from {host} failed: {api_message(err)}") from None


def local_crd(crd_dir: str | Path | None) -> dict | None:
    """KubeRay's RayJob CRD from a copy of its published files (argument or $SDO_KUBERAY_CRDS)."""
    crd_dir = crd_dir or os.environ.get(CRD_ENV)
    if not crd_dir:
        return None
    path = crd_dir_files(crd_dir).get("RayJob")
    if path is None:
        raise FileNotFoundError(f"{crd_dir}: no ray.io_rayjobs.yaml (KubeRay CRD copy named by {CRD_ENV} or crd_dir)")
    return load_crd(path)


def _raise_for_create(err, kind: str, namespace: str, name: str, spec: ClusterSpec, host: str) -> None:
    message = api_message(err)
    if err.status == 409:
        raise RayJobExists(f"{kind} {namespace}/{name} already exists: choose another --name or delete it with "
                           f"`kubectl -n {namespace} delete rayjob {name}`") from None
    if err.status == 404:
        if status_details(err).get("kind") == "namespaces":
            raise ClusterSpecError(f"namespace {namespace!r} does not exist ({spec.source}: sdo.namespace); create it "
                                   f"with `kubectl create namespace {namespace}`") from None
        if kind == "RayJob":
            raise KubeRayNotInstalled(f"the cluster at {host} does not serve {GROUP}/{VERSION} {PLURAL}: install the "
                                      f"KubeRay operator (helm install kuberay-operator kuberay/kuberay-operator)") from None
    if err.status in (400, 422):
        raise ClusterSpecError(f"the API server rejected {kind} {namespace}/{name}: {message}") from None
    raise KubernetesError(f"creating {kind} {namespace}/{name} on {host} failed (HTTP {err.status}): {message}") from None


def apply(api, manifests: list[dict], spec: ClusterSpec, host: str) -> dict:
    """Create the RayJob, then its ConfigMap owned by it (deleted with it); returns the created RayJob."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    configmap, rayjob = manifests
    namespace, name = rayjob["metadata"]["namespace"], rayjob["metadata"]["name"]
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    try:
        created = call(host, "create the RayJob", custom.create_namespaced_custom_object, GROUP, VERSION, namespace,
                        PLURAL, rayjob, field_validation="Strict", _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        _raise_for_create(err, "RayJob", namespace, name, spec, host)
    owned = json.loads(json.dumps(configmap))
    owned["metadata"]["ownerReferences"] = [{"apiVersion": f"{GROUP}/{VERSION}", "kind": "RayJob", "name": name,
                                             "uid": created["metadata"]["uid"]}]
    try:
        call(host, "create the ConfigMap", core.create_namespaced_config_map, namespace,
              client.V1ConfigMap.from_dict(owned), field_validation="Strict", _request_timeout=REQUEST_TIMEOUT)
    except (ApiException, KubernetesError) as err:
        # Without its config the job cannot start: take the RayJob back rather than leave it hanging.
        left = "" if _delete(custom, namespace, name) else \
            f"; RayJob {namespace}/{name} is left behind: `kubectl -n {namespace} delete rayjob {name}`"
        reported: Exception = err
        if isinstance(err, ApiException):
            try:
                _raise_for_create(err, "ConfigMap", namespace, configmap_name(name), spec, host)
            except (ValueError, OSError, RuntimeError) as mapped:
                reported = mapped
        raise type(reported)(f"{reported}{left}") from None
    return created


def _delete(custom, namespace: str, name: str) -> bool:
    """Delete a RayJob; False when that failed too (the caller says what is left behind)."""
    from kubernetes.client.exceptions import ApiException

    try:
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT)
    except ApiException as err:
        return err.status == 404
    except Exception:  # noqa: BLE001 - any other failure (connection, TLS) means it is still there
        return False
    return True


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as literal blocks, as people write them."""


_ManifestDumper.add_representer(
    str, lambda dumper, text: dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def dump_manifests(manifests: list[dict]) -> str:
    """Multi-document YAML that `kubectl apply -f -` accepts."""
    return yaml.dump_all(manifests, Dumper=_ManifestDumper, sort_keys=False)


def dry_run_header(manifests: list[dict], spec: ClusterSpec, *, command: str, name: str, secrets: list[str],
                   checked_on: str | None) -> str:
    """YAML comment lines (the output stays kubectl-appliable): what is created, the permissions that
    takes (deploy/rbac.yaml), and whether the Secrets were checked."""
    configmap, rayjob = manifests
    checked = (f"Secrets checked on {checked_on}: {', '.join(secrets) or 'none named'}" if checked_on is not None
               else "Secrets not checked: no Kubernetes credentials (kubeconfig)")
    created = (f"sdo {command}: RayJob {spec.namespace}/{rayjob['metadata']['name']} + ConfigMap "
               f"{configmap['metadata']['name']} (run {name})")
    lines = [created, *describe_permissions(spec.namespace, secrets), checked]
    return "".join(f"# {line}\n" for line in lines)


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------

def submit_rayjob(cfg: Config, spec_path: str | Path, *, name: str, command: str = "launch",
                  dry_run: bool = False, out: TextIO | None = None, crd_dir: str | Path | None = None,
                  poll_interval: float = 5.0, resume: bool = False) -> int:
    """Run ``sdo <command>`` for ``cfg`` as a RayJob on the cluster described by ``spec_path``.

    dry_run: validate and print the manifests as multi-document YAML (kubectl-appliable), headed by
    comments stating the permissions needed (deploy/rbac.yaml); with a kubeconfig the Secrets are
    checked (read only), nothing is created.
    out: where progress, status changes and the job's log go (default: sys.stdout).
    resume: the job runs ``sdo <command> ... --resume`` (continue the run from its latest checkpoint).
    crd_dir: a copy of KubeRay's CRD files to validate against (default $SDO_KUBERAY_CRDS); when the
    cluster lets us read its installed RayJob CRD, that one is used instead.
    Returns the exit code: 0 success, 1 the job failed, 130 detached with Ctrl-C.
    """
    out = out if out is not None else sys.stdout  # looked up per call: the CLI may have redirected it
    spec = load_cluster_spec(spec_path)
    crd = local_crd(crd_dir)
    # Render first: bad input is reported before any network traffic.
    manifests = render_manifests(cfg, spec, name=name, command=command, crd=crd, resume=resume)
    secrets = referenced_secrets(manifests[1], list(spec.sdo.env_from_secrets))
    if dry_run:
        try:
            api = api_client(spec)
        except NoCredentials:
            api = None  # rendering needs no cluster; the Secrets cannot be checked and the header says so
        if api is not None:
            check_secrets(api, api.configuration.host, spec.namespace, secrets, spec.source)
        out.write(dry_run_header(manifests, spec, command=command, name=name, secrets=sorted(secrets),
                                 checked_on=api.configuration.host if api is not None else None))
        out.write(dump_manifests(manifests))
        return 0
    api = api_client(spec)
    host = api.configuration.host
    check_secrets(api, host, spec.namespace, secrets, spec.source)
    installed = cluster_crd(api, host)
    if installed is not None:  # the schema the API server will enforce
        validate_crd(manifests[1], installed, what=f"RayJob {name} (from {spec.source}), CRD installed at {host}")
    namespace, job = spec.namespace, manifests[1]["metadata"]["name"]
    apply(api, manifests, spec, host)
    out.write(f"sdo: created RayJob {namespace}/{job} and ConfigMap {namespace}/{configmap_name(job)} on {host} "
              f"(run {name})\n")
    out.flush()
    try:
        return follow(api, namespace, job, out=out, host=host, poll_interval=poll_interval)
    except KeyboardInterrupt:
        out.write("\n" + detach_hint(namespace, job))
        out.flush()
        return 130

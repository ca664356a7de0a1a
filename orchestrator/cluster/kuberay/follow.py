"""Follow a submitted RayJob: status changes and the submitter pod's log, until KubeRay ends it."""
from __future__ import annotations

import threading
import time
from typing import TextIO

from orchestrator.cluster.kuberay.client import (
    GROUP,
    PLURAL,
    REQUEST_TIMEOUT,
    VERSION,
    KubernetesError,
    api_message,
    call,
)
from orchestrator.cluster.kuberay.render import SUBMITTER_CONTAINER

TERMINAL = ("Complete", "Failed", "ValidationFailed")  # KubeRay jobDeploymentStatus values that end a RayJob


class _LogStreams:
    """Streams the logs of the submitter pods (one thread each) into ``out``."""

    def __init__(self, core, namespace: str, out: TextIO, lock: threading.Lock):
        self.core, self.namespace, self.out, self.lock = core, namespace, out, lock
        self.threads: dict[str, threading.Thread] = {}

    def start(self, pod: str) -> None:
        if pod in self.threads:
            return
        thread = threading.Thread(target=self._stream, args=(pod,), name=f"sdo-logs-{pod}", daemon=True)
        self.threads[pod] = thread
        thread.start()

    def _stream(self, pod: str) -> None:
        received = False
        try:
            response = self.core.read_namespaced_pod_log(pod, self.namespace, container=SUBMITTER_CONTAINER,
                                                         follow=True, _preload_content=False)
            for chunk in response.stream(4096, decode_content=True):
                received = True
                with self.lock:
                    self.out.write(chunk.decode("utf-8", errors="replace"))
                    self.out.flush()
            response.release_conn()
        except Exception:  # noqa: BLE001 - a broken log stream must not end the follow
            if not received:
                self.threads.pop(pod, None)  # not started yet (e.g. ContainerCreating): retried on the next poll

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in list(self.threads.values()):
            thread.join(max(0.0, deadline - time.monotonic()))


def follow(api, namespace: str, name: str, *, out: TextIO, host: str, poll_interval: float = 5.0,
           log_timeout: float = 30.0) -> int:
    """Report RayJob status changes and stream its logs until KubeRay marks it finished.

    Returns 0 when the Ray job SUCCEEDED, 1 otherwise.
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    lock = threading.Lock()
    logs = _LogStreams(core, namespace, out, lock)
    last = None
    while True:
        try:
            rayjob = call(host, "read the RayJob status", custom.get_namespaced_custom_object, GROUP, VERSION,
                           namespace, PLURAL, name, _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                raise KubernetesError(f"RayJob {namespace}/{name} disappeared while being followed (deleted?)") from None
            raise KubernetesError(f"reading RayJob {namespace}/{name} failed (HTTP {err.status}): {api_message(err)}") from None
        status = rayjob.get("status") or {}
        deployment, job = status.get("jobDeploymentStatus") or "New", status.get("jobStatus") or "-"
        if (deployment, job) != last:
            detail = f" - {status['message']}" if status.get("message") and deployment in TERMINAL else ""
            with lock:
                out.write(f"sdo: RayJob {name}: {deployment} (job {job}){detail}\n")
                out.flush()
            last = (deployment, job)
        try:
            pods = call(host, "list the submitter pods", core.list_namespaced_pod, namespace,
                         label_selector=f"job-name={name}", _request_timeout=REQUEST_TIMEOUT)
            for pod in pods.items:
                if pod.status is not None and pod.status.phase in ("Running", "Succeeded", "Failed"):
                    logs.start(pod.metadata.name)
        except ApiException:
            pass  # no permission to read pods: status is still followed
        if deployment in TERMINAL:
            logs.join(log_timeout)
            return 0 if job == "SUCCEEDED" else 1
        time.sleep(poll_interval)


def detach_hint(namespace: str, name: str) -> str:
    return (f"sdo: detached; RayJob {namespace}/{name} keeps running.\n"
            f"  follow: kubectl -n {namespace} get rayjob {name} -w   |   kubectl -n {namespace} logs -f job/{name}\n"
            f"  delete: kubectl -n {namespace} delete rayjob {name}\n")

"""A small Kubernetes API server on 127.0.0.1 for the apply/follow tests.

No Kubernetes API server can run on the test machines (no container runtime, no etcd), so this
in-test HTTP server stands in for the endpoints the official kubernetes client calls for a RayJob:
read the RayJob CRD, create/get/delete namespaced rayjobs, create configmaps, read secrets (404 when
missing, 403 for the ones marked forbidden), list pods by label and read a pod's log. Responses follow the API's shapes (objects, metav1.Status errors with HTTP 404,
409, ...). RayJob status advances one step per GET through a scripted list, as KubeRay would move it.
"""
from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

SUCCEEDED = [{}, {"jobDeploymentStatus": "Initializing"},
             {"jobDeploymentStatus": "Running", "jobStatus": "PENDING"},
             {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
             {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "message": "Job finished successfully."}]
FAILED = [{"jobDeploymentStatus": "Initializing"},
          {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"},
          {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "message": "Job entrypoint command failed with exit code 1"}]


def status(code: int, reason: str, message: str, details: dict | None = None) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "details": details or {}, "code": code}


class KubeApiServer:
    """State + HTTP front; use as a context manager. ``url`` is the server address for a kubeconfig."""

    def __init__(self, *, crd: dict | None, namespaces=("sdo",), crd_readable: bool = True,
                 script=SUCCEEDED, pod_log: str = "", log_not_ready: int = 0, secrets: dict | None = None,
                 forbidden_secrets=()):
        self.crd, self.crd_readable, self.namespaces = crd, crd_readable, set(namespaces)
        self.script, self.pod_log = list(script), pod_log
        self.log_not_ready = log_not_ready  # first N log reads fail like a container that is still starting
        self.secrets = dict(secrets or {})  # name -> {key: base64 value} in namespace "sdo"
        self.forbidden_secrets = set(forbidden_secrets)
        self.rayjobs: dict[tuple, dict] = {}
        self.configmaps: dict[tuple, dict] = {}
        self.pods: dict[tuple, dict] = {}
        self.gets: dict[tuple, int] = {}
        self.requests: list[tuple[str, str, dict]] = []
        self.bodies: list[str] = []  # every request body as sent (JSON text)
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def kubeconfig(self, path) -> str:
        path.write_text(json.dumps({
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": self.url}}],
            "users": [{"name": "test", "user": {"token": "test-token"}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }))
        return str(path)

    # ---------------------------------------------------------------- routes
    def route(self, method: str, path: str, query: dict, body: dict | None):
        parts = [p for p in path.split("/") if p]
        with self.lock:
            self.requests.append((method, path, query))
            if body is not None:
                self.bodies.append(json.dumps(body))
            if parts[:4] == ["apis", "apiextensions.k8s.io", "v1", "customresourcedefinitions"]:
                if not self.crd_readable:
                    return 403, status(403, "Forbidden", "customresourcedefinitions is forbidden")
                if self.crd is None or parts[4:] != ["rayjobs.ray.io"]:
                    return 404, status(404, "NotFound", f'customresourcedefinitions.apiextensions.k8s.io "{parts[-1]}" not found')
                return 200, self.crd
            if parts[:3] == ["apis", "ray.io", "v1"] and len(parts) >= 6 and parts[5] == "rayjobs":
                if self.crd is None:
                    return 404, status(404, "NotFound", "the server could not find the requested resource")
                return self._rayjobs(method, parts[4], parts[6] if len(parts) > 6 else None, body)
            if parts[:2] == ["api", "v1"] and len(parts) >= 5 and parts[2] == "namespaces":
                namespace, kind = parts[3], parts[4]
                if kind == "secrets" and method == "GET" and len(parts) == 6:
                    if parts[5] in self.forbidden_secrets:
                        return 403, status(403, "Forbidden", f'secrets "{parts[5]}" is forbidden: User "test" cannot '
                                                             f'get resource "secrets" in the namespace "{namespace}"')
                    if namespace != "sdo" or parts[5] not in self.secrets:
                        return 404, status(404, "NotFound", f'secrets "{parts[5]}" not found', {"name": parts[5], "kind": "secrets"})
                    return 200, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                                 "metadata": {"name": parts[5], "namespace": namespace}, "data": self.secrets[parts[5]]}
                if kind == "configmaps" and method == "POST":
                    return self._create(self.configmaps, namespace, body, "configmaps")
                if kind == "pods" and len(parts) == 5:
                    selector = query.get("labelSelector", [""])[0]
                    items = [p for (ns, _), p in self.pods.items() if ns == namespace
                             and all(p["metadata"]["labels"].get(k) == v for k, v in
                                     (s.split("=", 1) for s in selector.split(",") if s))]
                    return 200, {"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items}
                if kind == "pods" and parts[6:] == ["log"] and (namespace, parts[5]) in self.pods:
                    if self.log_not_ready > 0:
                        self.log_not_ready -= 1
                        return 400, status(400, "BadRequest", f'container "ray-job-submitter" in pod "{parts[5]}" '
                                                              "is waiting to start: ContainerCreating")
                    return 200, self.pod_log
            return 404, status(404, "NotFound", "the server could not find the requested resource")

    def _create(self, store: dict, namespace: str, body: dict, plural: str):
        if namespace not in self.namespaces:
            return 404, status(404, "NotFound", f'namespaces "{namespace}" not found', {"name": namespace, "kind": "namespaces"})
        name = body["metadata"]["name"]
        if (namespace, name) in store:
            return 409, status(409, "AlreadyExists", f'{plural} "{name}" already exists', {"name": name, "kind": plural})
        obj = json.loads(json.dumps(body))
        obj["metadata"].update(uid=str(uuid.uuid4()), creationTimestamp="2026-01-01T00:00:00Z", resourceVersion="1")
        store[(namespace, name)] = obj
        return 201, obj

    def _rayjobs(self, method: str, namespace: str, name: str | None, body: dict | None):
        if method == "POST":
            return self._create(self.rayjobs, namespace, body, "rayjobs.ray.io")
        key = (namespace, name)
        if key not in self.rayjobs:
            return 404, status(404, "NotFound", f'rayjobs.ray.io "{name}" not found', {"name": name, "kind": "rayjobs"})
        if method == "DELETE":
            del self.rayjobs[key]
            return 200, status(200, "", "deleted") | {"status": "Success"}
        step = self.gets.get(key, 0)
        self.gets[key] = step + 1
        job = self.rayjobs[key]
        job["status"] = dict(self.script[min(step, len(self.script) - 1)])
        if job["status"].get("jobDeploymentStatus") in ("Running", "Complete", "Failed"):
            pod = f"{name}-submitter"
            self.pods[(namespace, pod)] = {"metadata": {"name": pod, "namespace": namespace, "labels": {"job-name": name}},
                                           "status": {"phase": "Running"}}
        return 200, job

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str):
                url = urlparse(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                code, payload = server.route(method, url.path, parse_qs(url.query), body)
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._serve("GET")

            def do_POST(self):
                self._serve("POST")

            def do_DELETE(self):
                self._serve("DELETE")

            def log_message(self, *args):
                pass

        return Handler

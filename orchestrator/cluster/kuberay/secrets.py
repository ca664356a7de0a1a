"""The Secrets a rendered RayJob refers to, and the check that they exist and hold their keys.

Pods that refer to a missing Secret never start (CreateContainerConfigError) and KubeRay reports
nothing useful for minutes; checking before submitting turns that into one line and exit 2. Only key
names are looked at: no value is printed, logged or kept.
"""
from __future__ import annotations

from orchestrator.cluster.kuberay.client import REQUEST_TIMEOUT, KubernetesError, api_message, call
from orchestrator.cluster.kuberay.spec import ClusterSpecError

RAY_TOKEN_KEY = "auth_token"  # the key KubeRay's authOptions.secretName Secret must hold


def referenced_secrets(rayjob: dict, env_from_secrets: list[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
    """{Secret name: (where it is named, keys it must hold)} for the Secrets the pods will read."""
    out: dict[str, tuple[str, tuple[str, ...]]] = {}
    for i, name in enumerate(env_from_secrets):
        out.setdefault(name, (f"sdo.env_from_secrets[{i}]", ()))
    auth = rayjob["spec"]["rayClusterSpec"].get("authOptions") or {}
    if auth.get("mode") == "token" and auth.get("secretName"):
        name = auth["secretName"]
        where = "spec.authOptions.secretName"
        keys = tuple(sorted(set(out.get(name, ("", ()))[1]) | {RAY_TOKEN_KEY}))
        out[name] = (where, keys)
    return out


def check_secrets(api, host: str, namespace: str, secrets: dict[str, tuple[str, tuple[str, ...]]], source: str) -> None:
    """Each Secret exists, is readable by us, and holds its keys (non-empty); raise ClusterSpecError otherwise."""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api)
    for name, (where, keys) in secrets.items():
        what = f"Secret {namespace}/{name} ({source}: {where})"
        try:
            secret = call(host, f"read {what}", core.read_namespaced_secret, name, namespace,
                          _request_timeout=REQUEST_TIMEOUT)
        except ApiException as err:
            if err.status == 404:
                hint = (f"--from-literal={RAY_TOKEN_KEY}=\"$(openssl rand -hex 32)\"" if RAY_TOKEN_KEY in keys
                        else "--from-literal=KEY=VALUE ...")
                raise ClusterSpecError(f"{what} does not exist: create it with `kubectl -n {namespace} create secret "
                                       f"generic {name} {hint}`") from None
            if err.status in (401, 403):
                raise ClusterSpecError(f"{what} cannot be read ({api_message(err)}): grant `get` on it to whoever runs "
                                       f"sdo (resourceNames in deploy/rbac.yaml)") from None
            raise KubernetesError(f"reading {what} on {host} failed (HTTP {err.status}): {api_message(err)}") from None
        data = {**(secret.data or {}), **(secret.string_data or {})}
        for key in keys:
            if not data.get(key):
                present = ", ".join(sorted(data)) or "none"
                raise ClusterSpecError(f"{what} has no non-empty key {key!r} (keys: {present})")

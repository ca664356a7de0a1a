"""The Kubernetes permissions of whoever runs `sdo launch|sweep --cluster k8s.yaml`, in one namespace.

One list, three readers: ``--dry-run`` prints it, deploy/rbac.yaml grants exactly it (a test keeps
the two equal) and the README explains it. Each rule says which call needs it; nothing cluster-wide,
no wildcards, Secrets readable only by name.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Permission:
    group: str              # API group ('' = core)
    resource: str
    verbs: tuple[str, ...]
    why: str
    by_name: bool = False   # restricted to the named objects (resourceNames) - Secrets

    @property
    def resource_id(self) -> str:
        return f"{self.resource}.{self.group}" if self.group else self.resource


PERMISSIONS = (
    Permission("ray.io", "rayjobs", ("create", "get", "delete"),
               "create the RayJob, poll its status, take it back when its ConfigMap cannot be created"),
    Permission("ray.io", "rayjobs", ("list", "watch"), "`kubectl get rayjob NAME -w`, as the detach hint prints"),
    Permission("", "configmaps", ("create",), "the run's config, owned by the RayJob"),
    Permission("", "pods", ("get", "list"), "find the submitter pod (label job-name=NAME) to stream its log"),
    Permission("", "pods/log", ("get",), "stream the submitter pod's log (the training log)"),
    Permission("batch", "jobs", ("get",), "`kubectl logs -f job/NAME`, as the detach hint prints"),
    Permission("", "secrets", ("get",), "check at --dry-run and before submitting that the Secrets the spec names "
                                        "exist and hold their keys (values are never printed or stored)", by_name=True),
)
# Optional, cluster-scoped (a ClusterRole): read the installed RayJob CRD to validate against the exact
# schema the API server enforces. Without it sdo validates against $SDO_KUBERAY_CRDS and carries on.
OPTIONAL_CLUSTER_PERMISSION = Permission("apiextensions.k8s.io", "customresourcedefinitions", ("get",),
                                         "read the RayJob CRD (rayjobs.ray.io) to validate against it")


def role_rules(secret_names: list[str]) -> list[dict]:
    """The rules of a least-privilege Role (rbac.authorization.k8s.io/v1) for ``secret_names``."""
    rules = []
    for p in PERMISSIONS:
        if p.by_name and not secret_names:
            continue
        rule = {"apiGroups": [p.group], "resources": [p.resource], "verbs": list(p.verbs)}
        if p.by_name:
            rule["resourceNames"] = sorted(secret_names)
        rules.append(rule)
    return rules


def describe(namespace: str, secret_names: list[str]) -> list[str]:
    """Lines stating the permissions, for the head of the --dry-run output (as YAML comments)."""
    lines = [f"permissions needed in namespace {namespace} (Role in deploy/rbac.yaml):"]
    for rule in role_rules(secret_names):
        resource = rule["resources"][0] + (f".{rule['apiGroups'][0]}" if rule["apiGroups"][0] else "")
        names = f" [names: {', '.join(rule['resourceNames'])}]" if "resourceNames" in rule else ""
        lines.append(f"  {resource}: {', '.join(rule['verbs'])}{names}")
    p = OPTIONAL_CLUSTER_PERMISSION
    lines.append(f"  optional, cluster-wide: {p.resource_id}: {', '.join(p.verbs)} ({p.why})")
    return lines

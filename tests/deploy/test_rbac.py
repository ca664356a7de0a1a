"""deploy/rbac.yaml: a valid, least-privilege ServiceAccount + Role + RoleBinding for the submitter,
granting exactly what `sdo launch --dry-run` says it needs.

The objects are validated against JSON schemas generated from the official kubernetes client's models
(unknown or mistyped fields fail), as the other deploy/ manifests are.
"""
import io
import re
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml

from orchestrator.cluster.kuberay.rayjob import submit_rayjob
from orchestrator.cluster.kuberay.rbac import PERMISSIONS, role_rules
from orchestrator.cluster.kuberay.schema import model_schema
from orchestrator.config import load_config

ROOT = Path(__file__).resolve().parents[2]
RBAC = ROOT / "deploy" / "rbac.yaml"
MODELS = {"ServiceAccount": "V1ServiceAccount", "Role": "V1Role", "RoleBinding": "V1RoleBinding"}
# Verbs and resources that would let the submitter become someone else or reach beyond its job.
DANGEROUS_VERBS = {"*", "escalate", "bind", "impersonate", "update", "patch", "deletecollection"}
DANGEROUS_RESOURCES = {"*", "pods/exec", "pods/attach", "serviceaccounts/token", "roles", "rolebindings"}


def objects() -> dict:
    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    return {d["kind"]: d for d in docs}


def test_objects_match_the_kubernetes_api():
    docs = objects()
    assert set(docs) == set(MODELS)
    for kind, doc in docs.items():
        jsonschema.validate(doc, model_schema(MODELS[kind]))
        assert doc["metadata"]["namespace"] == "sdo", kind


def test_objects_pass_kubernetes_validate_strictly():
    for doc in objects().values():
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_binding_ties_the_role_to_the_service_account():
    docs = objects()
    binding, role, account = docs["RoleBinding"], docs["Role"], docs["ServiceAccount"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "sdo"} in binding["subjects"]
    assert account["automountServiceAccountToken"] is False


def test_role_is_least_privilege():
    rules = objects()["Role"]["rules"]
    for rule in rules:
        assert not DANGEROUS_VERBS & set(rule["verbs"]), rule
        assert not DANGEROUS_RESOURCES & set(rule["resources"]), rule
        assert "*" not in rule["apiGroups"], rule
        if "secrets" in rule["resources"]:
            assert rule["verbs"] == ["get"] and rule["resourceNames"], "Secrets only by name, only get"
    # Nothing may create or change pods: KubeRay does that, with its own identity.
    pod_verbs = {v for r in rules if "pods" in r["resources"] for v in r["verbs"]}
    assert pod_verbs == {"get", "list"}


def test_role_grants_exactly_what_sdo_needs():
    rules = objects()["Role"]["rules"]
    names = next(r["resourceNames"] for r in rules if r["resources"] == ["secrets"])
    assert rules == role_rules(names)
    assert {(p.group, p.resource) for p in PERMISSIONS} == {(r["apiGroups"][0], r["resources"][0]) for r in rules}


def parse_stated(text: str) -> list[dict]:
    """The permission lines of the --dry-run header -> Role rules."""
    rules = []
    for line in text.splitlines():
        match = re.fullmatch(r"#   ([a-z/]+)(?:\.([a-z0-9.-]+))?: ([a-z, ]+?)(?: \[names: ([a-z0-9., -]+)\])?", line)
        if match:
            resource, group, verbs, names = match.groups()
            rule = {"apiGroups": [group or ""], "resources": [resource], "verbs": verbs.split(", ")}
            if names:
                rule["resourceNames"] = names.split(", ")
            rules.append(rule)
    return rules


def test_dry_run_states_the_permissions_of_the_role(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    spec = yaml.safe_load((ROOT / "deploy" / "k8s.yaml").read_text())
    role = objects()["Role"]
    names = next(r["resourceNames"] for r in role["rules"] if r["resources"] == ["secrets"])
    spec["sdo"]["env_from_secrets"] = [n for n in names if n != "sdo-ray-token"]
    spec["spec"]["authOptions"] = {"mode": "token", "secretName": "sdo-ray-token"}
    (tmp_path / "k8s.yaml").write_text(yaml.safe_dump(spec))
    out = io.StringIO()
    cfg = load_config(None, ["train.use_gpu=true", "train.num_workers=2"])
    assert submit_rayjob(cfg, tmp_path / "k8s.yaml", name="perm", dry_run=True, out=out) == 0
    assert "# permissions needed in namespace sdo" in out.getvalue()
    assert parse_stated(out.getvalue()) == role["rules"]

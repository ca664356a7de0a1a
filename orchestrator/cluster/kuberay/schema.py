"""JSON schemas that a rendered RayJob must pass before anything is sent to Kubernetes.

Two independent checks:
- ``rayjob_schema()``: the RayJob fields sdo writes (hand-written here, strict: unknown fields are
  errors), with pod templates generated from the official kubernetes client's models, so every
  Pod/Container field name is checked even without a copy of KubeRay's CRDs.
- ``crd_validator(crd)``: KubeRay's published CRD (``openAPIV3Schema`` of ray.io_rayjobs.yaml /
  ray.io_rayclusters.yaml, or the one installed in the cluster) made strict the way the API server's
  ``fieldValidation=Strict`` treats it (unknown fields rejected, ``nullable`` honoured).

Errors are :class:`ClusterSpecError` whose message names the path of the bad field, e.g.
``spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limits.nvidia.com/gpu``.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from jsonschema.exceptions import best_match, relevance

from orchestrator.cluster.kuberay.spec import MAX_RAYJOB_NAME, ClusterSpecError

# resource.Quantity (k8s.io/apimachinery/pkg/api/resource), as written in the CRDs.
QUANTITY = r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
GPU_RESOURCE = "nvidia.com/gpu"

_QUANTITY_SCHEMA = {"anyOf": [{"type": "integer"}, {"type": "number"}, {"type": "string", "pattern": QUANTITY}],
                    "description": "a Kubernetes quantity such as 4, 500m, 16Gi"}
# Extended resources (GPUs) are whole devices: Kubernetes rejects fractions.
_GPU_SCHEMA = {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^[0-9]+$"}],
               "description": "a GPU count must be a whole number >= 0"}
_RESOURCE_LIST = {"type": "object", "properties": {GPU_RESOURCE: _GPU_SCHEMA}, "additionalProperties": _QUANTITY_SCHEMA}


# --------------------------------------------------------------------------------------------
# Pod templates from the kubernetes client's models
# --------------------------------------------------------------------------------------------

_SCALARS = {"str": {"type": "string"}, "int": {"type": "integer"}, "float": {"type": "number"},
            "bool": {"type": "boolean"}, "datetime": {"type": "string"}, "date": {"type": "string"},
            "bytearray": {"type": "string"}, "bytes": {"type": "string"}, "object": {}}
# Fields the Pod API leaves optional (controllers may fill them) but a RayCluster cannot do without.
_EXTRA_REQUIRED = {"V1Container": ["image"]}
_OVERRIDES = {("V1ResourceRequirements", "limits"): _RESOURCE_LIST,
              ("V1ResourceRequirements", "requests"): _RESOURCE_LIST}


def _type_schema(type_name: str, defs: dict) -> dict:
    type_name = type_name.strip()
    if type_name in _SCALARS:
        return dict(_SCALARS[type_name])
    inner = re.fullmatch(r"List\[(.*)\]", type_name)
    if inner:
        return {"type": "array", "items": _type_schema(inner.group(1), defs)}
    inner = re.fullmatch(r"Dict\[str, (.*)\]", type_name)
    if inner:
        return {"type": "object", "additionalProperties": _type_schema(inner.group(1), defs)}
    _model_schema(type_name, defs)
    return {"$ref": f"#/$defs/{type_name}"}


def _model_schema(name: str, defs: dict) -> None:
    if name in defs:
        return
    from kubernetes import client

    model = getattr(client, name)
    defs[name] = {}  # placeholder: models can refer to themselves
    properties, required = {}, []
    for attr, json_name in model.attribute_map.items():
        properties[json_name] = _OVERRIDES.get((name, json_name)) or _type_schema(model.openapi_types[attr], defs)
        field = getattr(model, "model_fields", {}).get(attr)
        if field is not None and field.is_required():
            required.append(json_name)
    required += [r for r in _EXTRA_REQUIRED.get(name, []) if r not in required]
    defs[name] = {"type": "object", "properties": properties, "additionalProperties": False, "required": required}


@functools.lru_cache(maxsize=1)
def _pod_defs() -> dict:
    defs: dict = {}
    _model_schema("V1PodTemplateSpec", defs)
    # A pod template needs at least one container (KubeRay: "should have at least one container").
    defs["V1PodTemplateSpec"]["required"] = ["spec"]
    defs["V1PodSpec"]["properties"]["containers"]["minItems"] = 1
    return defs


# --------------------------------------------------------------------------------------------
# The RayJob fields sdo writes
# --------------------------------------------------------------------------------------------

_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_POD_TEMPLATE = {"$ref": "#/$defs/V1PodTemplateSpec"}
_NON_NEGATIVE = {"type": "integer", "minimum": 0}
_LABEL = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 63,
          "description": "must be an RFC 1123 label (lowercase letters, digits and '-', at most 63 characters)"}

_HEAD_GROUP = {
    "type": "object", "required": ["template"], "additionalProperties": False,
    "properties": {
        "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE, "labels": _STRING_MAP,
        "resources": _STRING_MAP, "enableIngress": {"type": "boolean"}, "headService": {"type": "object"},
        "ingressOptions": {"type": "object"},
        "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
    },
}
_WORKER_GROUP = {
    "type": "object", "required": ["groupName", "maxReplicas", "template"], "additionalProperties": False,
    "properties": {
        "groupName": _LABEL, "replicas": _NON_NEGATIVE, "minReplicas": _NON_NEGATIVE, "maxReplicas": _NON_NEGATIVE,
        "numOfHosts": {"type": "integer", "minimum": 1}, "rayStartParams": _STRING_MAP, "template": _POD_TEMPLATE,
        "labels": _STRING_MAP, "resources": _STRING_MAP, "idleTimeoutSeconds": _NON_NEGATIVE,
        "scaleStrategy": {"type": "object"}, "suspend": {"type": "boolean"}, "priority": {"type": "integer"},
    },
}
# KubeRay's AuthOptions (v1.5.1+): token mode, optionally with the Secret (key auth_token) holding it.
_AUTH_OPTIONS = {
    "type": "object", "additionalProperties": False,
    "properties": {"mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string", "minLength": 1},
                   "enableK8sTokenAuth": {"type": "boolean"}},
}
_RAY_CLUSTER_SPEC = {
    "type": "object", "required": ["rayVersion", "headGroupSpec"], "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^[0-9]+\.[0-9]+\.[0-9]+", "description": "a Ray version such as 2.60.0"},
        "authOptions": _AUTH_OPTIONS, "historyServerOptions": {"type": "object"},
        "networkPolicy": {"type": "object"}, "tlsOptions": {"type": "object"}, "upgradeStrategy": {"type": "object"},
        "headGroupSpec": _HEAD_GROUP,
        "workerGroupSpecs": {"type": "array", "items": _WORKER_GROUP},
        "enableInTreeAutoscaling": {"type": "boolean"}, "autoscalerOptions": {"type": "object"},
        "gcsFaultToleranceOptions": {"type": "object"}, "headServiceAnnotations": _STRING_MAP,
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
    },
}
_METADATA = {
    "type": "object", "required": ["name", "namespace"], "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z]([-a-z0-9]*[a-z0-9])?$", "maxLength": MAX_RAYJOB_NAME,
                 "description": f"must be an RFC 1035 label of at most {MAX_RAYJOB_NAME} characters"},
        "namespace": _LABEL, "labels": _STRING_MAP, "annotations": _STRING_MAP,
    },
}


def rayjob_schema() -> dict:
    """JSON schema of the RayJob manifests sdo renders (Draft 7, strict)."""
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
            "spec": {
                "type": "object", "additionalProperties": False,
                "required": ["entrypoint", "submissionMode", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
                             "backoffLimit", "rayClusterSpec"],
                "properties": {
                    "entrypoint": {"type": "string", "minLength": 1},
                    "submissionMode": {"const": "K8sJobMode"},
                    "shutdownAfterJobFinishes": {"type": "boolean"},
                    "ttlSecondsAfterFinished": _NON_NEGATIVE,
                    "backoffLimit": _NON_NEGATIVE,
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "rayClusterSpec": _RAY_CLUSTER_SPEC,
                    "submitterPodTemplate": _POD_TEMPLATE,
                },
            },
        },
        "$defs": _pod_defs(),
    }


def model_schema(model_name: str) -> dict:
    """JSON schema of any kubernetes client model (e.g. 'V1Deployment'), strict about field names."""
    defs: dict = {}
    _model_schema(model_name, defs)
    return {"$schema": "http://json-schema.org/draft-07/schema#", "$ref": f"#/$defs/{model_name}", "$defs": defs}


def configmap_schema() -> dict:
    """The ConfigMap that carries the resolved config."""
    return model_schema("V1ConfigMap")


# --------------------------------------------------------------------------------------------
# KubeRay CRDs
# --------------------------------------------------------------------------------------------

def _strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as the API server enforces it with fieldValidation=Strict.

    Unknown fields are errors (no x-kubernetes-preserve-unknown-fields), ``nullable`` admits null,
    required fields with a default are filled by defaulting. CEL rules (x-kubernetes-validations)
    and ``format`` are left to the API server.
    """
    out = {k: v for k, v in schema.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out:
        # The API server applies defaults before it validates: a defaulted field is never missing.
        if "required" in out:
            out["required"] = [r for r in out["required"] if "default" not in out["properties"].get(r, {})]
        out["properties"] = {k: _strict(v) for k, v in out["properties"].items()}
        if "additionalProperties" not in out and not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if isinstance(out.get("items"), dict):
        out["items"] = _strict(out["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in out:
            out[key] = [_strict(s) for s in out[key]]
    return out


@functools.lru_cache(maxsize=4)
def _read_crd(path: str, mtime: float) -> dict:
    text = Path(path).read_text()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise ClusterSpecError(f"{path}: not a valid CRD file ({str(err).splitlines()[0]})") from None


def load_crd(path: str | Path) -> dict:
    """Read a CustomResourceDefinition YAML (cached per file and modification time)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CRD file not found: {path}")
    return _read_crd(str(path), path.stat().st_mtime)


def crd_dir_files(crd_dir: str | Path) -> dict[str, Path]:
    """KubeRay CRD files in a directory, by kind: {'RayJob': ..., 'RayCluster': ...} (those present)."""
    crd_dir = Path(crd_dir)
    files = {"RayJob": crd_dir / "ray.io_rayjobs.yaml", "RayCluster": crd_dir / "ray.io_rayclusters.yaml"}
    return {kind: path for kind, path in files.items() if path.is_file()}


_VALIDATORS: dict = {}  # (id(crd), version) -> (crd, validator); holding the crd keeps its id unique


def crd_validator(crd: dict, version: str = "v1") -> jsonschema.Draft7Validator:
    """A validator for one served version of a CRD; raises ClusterSpecError if the CRD lacks it."""
    cached = _VALIDATORS.get((id(crd), version))
    if cached is not None and cached[0] is crd:
        return cached[1]
    versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions", [])}
    if version not in versions:
        kind = ((crd.get("spec") or {}).get("names") or {}).get("kind", "?")
        raise ClusterSpecError(f"CRD of {kind} does not serve version {version} (serves: {', '.join(versions) or 'none'})")
    schema = (versions[version].get("schema") or {}).get("openAPIV3Schema") or {}
    validator = jsonschema.Draft7Validator(_strict(schema))
    if len(_VALIDATORS) >= 8:
        _VALIDATORS.clear()
    _VALIDATORS[(id(crd), version)] = (crd, validator)
    return validator


# --------------------------------------------------------------------------------------------
# Error reporting
# --------------------------------------------------------------------------------------------

def format_path(parts: Iterable[Any]) -> str:
    """('spec', 'workerGroupSpecs', 0, 'template') -> 'spec.workerGroupSpecs[0].template'."""
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _describe(error: jsonschema.ValidationError) -> tuple[str, str]:
    """(path of the offending field, why) for one jsonschema error."""
    path = list(error.absolute_path)
    if error.validator == "additionalProperties" and error.validator_value is False and isinstance(error.instance, dict):
        known = set(error.schema.get("properties", {}))
        extra = sorted(k for k in error.instance if k not in known)
        if extra:
            return format_path(path + [extra[0]]), "unknown field"
    if error.validator == "required" and isinstance(error.instance, dict):
        missing = [r for r in error.validator_value if r not in error.instance]
        if missing:
            return format_path(path + [missing[0]]), "required field is missing"
    description = error.schema.get("description") if isinstance(error.schema, dict) else None
    if error.validator in ("anyOf", "oneOf", "pattern", "maxLength", "minimum") and description:
        return format_path(path), f"{error.instance!r}: {description}"
    return format_path(path), error.message


def validate_against(validator: jsonschema.Draft7Validator, manifest: dict, what: str) -> None:
    """Raise ClusterSpecError naming the path of the (most relevant) bad field, if any."""
    errors = list(validator.iter_errors(manifest))
    if not errors:
        return
    error = max(errors, key=relevance)  # shallowest, strongest; not yet descended into anyOf branches
    if error.validator in ("anyOf", "oneOf") and not error.schema.get("description") and error.context:
        error = best_match(error.context)
    path, why = _describe(error)
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    raise ClusterSpecError(f"{what}: {path or '<root>'}: {why}{more}")


@functools.lru_cache(maxsize=1)
def _rayjob_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(rayjob_schema())


@functools.lru_cache(maxsize=1)
def _configmap_validator() -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(configmap_schema())


def validate_rayjob(manifest: dict, what: str = "RayJob") -> None:
    """Check a RayJob against sdo's schema of the fields it writes."""
    validate_against(_rayjob_validator(), manifest, what)


def validate_crd(manifest: dict, crd: dict, what: str) -> None:
    """Check a manifest against the v1 schema of a KubeRay CRD (RayJob or RayCluster)."""
    validate_against(crd_validator(crd), manifest, f"{what}, KubeRay CRD schema")


def validate_configmap(manifest: dict, what: str = "ConfigMap") -> None:
    validate_against(_configmap_validator(), manifest, what)

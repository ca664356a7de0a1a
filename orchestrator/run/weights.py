"""Where weights come from: a checkpoint file or directory, an official file, or an MLflow URI.

`sdo eval`, `sdo predict`, `sdo export` and ``model.init_from`` all name weights the same way:
- a file: an sdo ``checkpoint.pt``, an official ``{'model': ...}`` file, or a bare state dict;
- a directory holding ``checkpoint.pt`` (a run's ``best/`` or a Ray Train checkpoint);
- ``runs:/<run id>/<path>`` or ``models:/<name>/<version or @alias>``: an MLflow Model logged by
  sdo (its ``detector`` module holds the detector) or a logged checkpoint directory.
Bad input raises ValueError / FileNotFoundError naming it; nothing here changes the user's files.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from orchestrator.config import Config, from_dict
from orchestrator.run.checkpoints import CHECKPOINT_FILE

MLFLOW_SCHEMES = ("runs:/", "models:/")
MODEL_CONFIG_FILE = "sdo_config.yaml"  # the training config, shipped inside the MLflow Model


@dataclass
class Weights:
    state: dict  # the detector's state dict (SparseDETR keys)
    config: dict | None  # the sdo config the weights were trained with; None for official / bare files
    source: str  # what the user named, for messages and tags


def is_mlflow_uri(spec: str) -> bool:
    return str(spec).startswith(MLFLOW_SCHEMES)


def read_weights(spec: str, tracking_uri: str | None = None) -> Weights:
    """Read the weights named by ``spec`` (see the module doc) -> Weights."""
    spec = str(spec)
    if is_mlflow_uri(spec):
        return _from_mlflow(spec, tracking_uri)
    return _from_path(Path(spec).expanduser(), spec)


def _from_path(path: Path, spec: str) -> Weights:
    from model.checkpoint import read_checkpoint, state_dict_of

    if path.is_dir():
        if (path / "MLmodel").is_file():
            return _from_mlflow_model_dir(path, spec)
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{spec}: no such checkpoint file or directory")
    ckpt = read_checkpoint(path)
    state = state_dict_of(ckpt, spec)
    config = ckpt.get("config") if isinstance(ckpt.get("config"), dict) else None
    return Weights(state=state, config=config, source=spec)


def _artifact_uri(uri: str, tracking_uri: str | None) -> str:
    """``models:/NAME/VERSION`` or ``models:/NAME@ALIAS`` -> the version's source (a runs:/ URI); runs:/ as it is.

    Resolved with a client on ``tracking_uri`` (whose registry it also is), not MLflow's process-wide URIs.
    """
    if not uri.startswith("models:/"):
        return uri
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    name_version = uri[len("models:/"):].strip("/")
    if "@" in name_version:
        name, alias = name_version.split("@", 1)
        version = client.get_model_version_by_alias(name, alias)
    elif "/" in name_version:
        name, number = name_version.rsplit("/", 1)
        if number == "latest":
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise ValueError(f"{uri}: registered model {name!r} has no versions")
            version = max(versions, key=lambda v: int(v.version))
        else:
            version = client.get_model_version(name, number)
    else:
        raise ValueError(f"{uri}: expected models:/NAME/VERSION, models:/NAME/latest or models:/NAME@ALIAS")
    return version.source


def _from_mlflow(uri: str, tracking_uri: str | None) -> Weights:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory(prefix="sdo-weights-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=_artifact_uri(uri, tracking_uri),
                                                             dst_path=tmp, tracking_uri=tracking_uri))
        except (MlflowException, OSError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f"{uri}: does not resolve in the MLflow store {tracking_uri}: {first}") from None
        if local.is_dir() and not (local / "MLmodel").is_file() and not (local / CHECKPOINT_FILE).is_file():
            raise ValueError(f"{uri}: neither an MLflow Model nor a checkpoint directory")
        return _from_path(local, uri)


def _from_mlflow_model_dir(path: Path, spec: str) -> Weights:
    import mlflow.pytorch

    try:
        module = mlflow.pytorch.load_model(str(path), map_location="cpu")
    except Exception as err:  # noqa: BLE001 - any unreadable model is bad input, reported in one line
        raise ValueError(f"{spec}: cannot load the MLflow Model ({type(err).__name__}: {err})") from None
    detector = getattr(module, "detector", module)
    config_files = sorted(path.rglob(MODEL_CONFIG_FILE))
    config = yaml.safe_load(config_files[0].read_text()) if config_files else None
    return Weights(state={k: v.detach().clone() for k, v in detector.state_dict().items()}, config=config,
                   source=spec)


def inference_config(weights: Weights, cfg: Config | None) -> Config:
    """The config to build the detector with: the one given, else the one saved with the weights."""
    if cfg is not None:
        return cfg
    if weights.config is None:
        raise ValueError(f"{weights.source}: holds no sdo config (an official checkpoint?); "
                         "pass --config with the model's architecture")
    return from_dict(weights.config)


def build_detector(cfg: Config, weights: Weights):
    """The configured SparseDETR with ``weights`` loaded strictly (a class-count mismatch is a ValueError)
    -> SparseDETR in eval mode, on the CPU."""
    import dataclasses

    from model.build import build_model
    from model.checkpoint import check_state_dict

    model = build_model(dataclasses.replace(cfg.model, checkpoint=None, init_from=None))
    try:
        check_state_dict(model, weights.state, weights.source)
    except ValueError as err:
        hint = "" if cfg.model.init_from else " (other classes? fine-tune it first with model.init_from)"
        raise ValueError(f"{err}{hint}") from None
    model.load_state_dict(weights.state, strict=True)
    return model.eval()

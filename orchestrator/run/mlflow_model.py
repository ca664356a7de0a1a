"""The MLflow Model of a run: the best weights (no optimizer), a signature, an input example, and
optionally a model-registry version.

It is saved locally with ``mlflow.pytorch.save_model`` and logged with the run's own client (no
process-wide MLflow state), so it loads with ``mlflow.pytorch.load_model("runs:/<id>/model")`` as a
``model.inference.PackedDetector`` (images [B, 3, H, W] -> [B, Q, 4 + C]) and serves as a pyfunc on
numpy arrays. The training config travels inside it (``sdo_config.yaml``) so that sdo can rebuild
the detector and name its classes.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from orchestrator.config import from_dict
from orchestrator.run.weights import MODEL_CONFIG_FILE, Weights, build_detector

ARTIFACT_PATH = "model"
EXAMPLE_SIDE = 128  # small, yet every feature level keeps more than one value for GroupNorm


def detector_signature(num_classes: int):
    import numpy as np
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # unnamed tensors: MLflow's PyTorch pyfunc feeds one plain array to the module
    return ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 3, -1, -1))]),
                          outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, -1, 4 + num_classes))]))


def log_detector_model(tracking_uri: str, run_id: str, state: dict, config: dict, *,
                       register_as: str | None = None) -> dict:
    """Log ``state`` (a SparseDETR state dict trained with ``config``) as the run's MLflow Model.

    -> {'model_uri': 'runs:/<id>/model', 'registered_model': name or None, 'version': str or None}
    """
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient

    from model.inference import PackedDetector

    cfg = from_dict(config)
    detector = PackedDetector(build_detector(cfg, Weights(state=state, config=config, source="best weights"))).eval()
    example = np.random.default_rng(0).standard_normal((1, 3, EXAMPLE_SIDE, EXAMPLE_SIDE)).astype(np.float32)
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    with tempfile.TemporaryDirectory(prefix="sdo-mlflow-model-") as tmp:
        config_file = Path(tmp) / MODEL_CONFIG_FILE
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        model_dir = Path(tmp) / ARTIFACT_PATH
        mlflow.pytorch.save_model(
            detector, str(model_dir), signature=detector_signature(cfg.model.num_classes), input_example=example,
            extra_files=[str(config_file)], serialization_format="pickle",
            # named, not inferred: inference would load the model once more in a subprocess
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "scipy"],
            metadata={"sdo.num_classes": cfg.model.num_classes, "sdo.rho": cfg.model.rho,
                      "sdo.output": "[B, Q, 4 + num_classes]: sigmoid cxcywh boxes, then class logits"})
        client.log_artifacts(run_id, str(model_dir), ARTIFACT_PATH)
    model_uri = f"runs:/{run_id}/{ARTIFACT_PATH}"
    version = None
    if register_as:
        from mlflow.exceptions import MlflowException

        try:
            client.create_registered_model(register_as)
        except MlflowException as err:
            if "already exists" not in str(err).lower() and "RESOURCE_ALREADY_EXISTS" not in str(err):
                raise
        version = client.create_model_version(register_as, source=model_uri, run_id=run_id).version
        client.set_tag(run_id, "sdo.registered_model", f"models:/{register_as}/{version}")
    client.set_tag(run_id, "sdo.model_uri", model_uri)
    return {"model_uri": model_uri, "registered_model": register_as, "version": version}

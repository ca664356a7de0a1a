"""The detector and config that `sdo predict` / `sdo export` use, from what the user names."""
from __future__ import annotations

import os
from pathlib import Path

from orchestrator.config import Config, load_config


def default_tracking_uri(cfg: Config | None, storage: str = "runs") -> str:
    """--tracking-uri default: the config's store, else $MLFLOW_TRACKING_URI, else the embedded store under ./runs."""
    from orchestrator.run.tracking import embedded_store, tracking_uri

    if cfg is not None:
        return tracking_uri(cfg)
    return os.environ.get("MLFLOW_TRACKING_URI") or embedded_store(Path(storage))[0]


def load_detector(model: str, config_path: str | None = None, overrides=(), tracking_uri: str | None = None):
    """--model M [--config Y --set k=v] -> (SparseDETR in eval mode on the CPU, its Config).

    The architecture comes from --config when given, else from the config saved with the weights
    (sdo checkpoints and sdo's MLflow Models carry theirs; official files need --config).
    """
    from orchestrator.run.weights import build_detector, inference_config, read_weights

    cfg = load_config(config_path, overrides) if config_path else None
    weights = read_weights(model, tracking_uri or default_tracking_uri(cfg))
    cfg = inference_config(weights, cfg)
    if overrides and config_path is None:
        from orchestrator.config import parse_override, set_value, validate

        for text in overrides:
            set_value(cfg, *parse_override(text))
        validate(cfg)
    return build_detector(cfg, weights), cfg

"""Training checkpoint files of a run.

A checkpoint is a directory with ``checkpoint.pt`` (a dict: model, optimizer, scheduler, epoch,
step, config, mlflow_run_id) and ``config.yaml`` (the resolved config, readable without torch).
The ``model`` entry is a plain state dict, so ``model.checkpoint.load_weights`` reads it as well.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "config", "mlflow_run_id")


class CheckpointError(ValueError):
    """A checkpoint file is missing or is not an sdo training checkpoint."""


def save(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (must hold REQUIRED_KEYS) and its config into ``directory``."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {', '.join(missing)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / CHECKPOINT_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    return directory


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint from its directory or its ``checkpoint.pt``."""
    path = Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    state = torch.load(file, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{file}: not a checkpoint (expected a dict with a 'model' entry)")
    return state

"""Training checkpoints and the small state files kept in a run directory.

A checkpoint is a directory with ``checkpoint.pt`` (a dict: model, optimizer, scheduler, epoch,
step, config, mlflow_run_id) and ``config.yaml`` (the resolved config, readable without torch).
The ``model`` entry is a plain state dict, so ``model.checkpoint.load_weights`` reads it as well.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
RUN_STATE_FILE = "sdo_run.json"
CRASH_MARKER = ".crash_injected"
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


def write_json_atomic(path: Path, value: dict) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def read_run_state(run_dir: Path) -> dict | None:
    """The run's MLflow identity ({'tracking_uri', 'experiment_id', 'mlflow_run_id', ...}) or None."""
    file = Path(run_dir) / RUN_STATE_FILE
    if not file.is_file():
        return None
    return json.loads(file.read_text())


def write_run_state(run_dir: Path, state: dict) -> None:
    write_json_atomic(Path(run_dir) / RUN_STATE_FILE, state)


def claim_crash(run_dir: Path) -> bool:
    """True exactly once per run directory: the fault-injection hook fires a single time.

    ``O_EXCL`` makes the claim atomic, and the marker survives the worker-group restart.
    """
    try:
        fd = os.open(Path(run_dir) / CRASH_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True

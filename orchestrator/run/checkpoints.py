"""The file format of a training checkpoint (when to take one, how many to keep: orchestrator.train.checkpointer).

A checkpoint is a folder ``checkpoint_step<step>-<attempt>`` in the run directory holding
``checkpoint.pt`` (a dict: model, optimizer, scheduler, epoch, step, config, mlflow_run_id and the
training progress), ``config.yaml`` (the resolved config, readable without torch) and
``report.json`` (the metrics reported with it, among them its score ``AP``). The ``model`` entry is
a plain state dict, so ``model.checkpoint.load_weights`` reads a checkpoint as well.
"""
from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
import yaml

from orchestrator.run.errors import CheckpointError
from orchestrator.run.storage import RemotePath, location

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
REPORT_FILE = "report.json"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "config", "mlflow_run_id")

_DIR_NAME = re.compile(r"^checkpoint_(?:step|epoch)(\d+)(?:-(\d+))?$")


def dir_name(step: int, attempt: int) -> str:
    """Name of the checkpoint directory of global ``step`` taken by the ``attempt``-th worker-group start.

    A step trained again after a restore (from an older checkpoint than the latest) gets a new name:
    Ray Train would otherwise copy it over the registered one of that name, then prune it as the old one.
    """
    return f"checkpoint_step{step:09d}-{attempt}"


def is_checkpoint_dir_name(name: str) -> bool:
    return _DIR_NAME.match(name) is not None


def save(directory: str | os.PathLike, state: dict[str, Any], report: dict | None = None) -> Path:
    """Write ``state`` (must hold REQUIRED_KEYS), its config and ``report`` into ``directory``."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {', '.join(missing)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / CHECKPOINT_FILE)
    (directory / CONFIG_FILE).write_text(yaml.safe_dump(state["config"], sort_keys=False))
    (directory / REPORT_FILE).write_text(json.dumps(report or {}, default=float))
    return directory


def load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint from its directory or its ``checkpoint.pt`` (local or a RemotePath).

    A truncated or otherwise unreadable file raises CheckpointError naming it (never a bare unpickling error).
    """
    from model.checkpoint import read_checkpoint

    path = path if isinstance(path, RemotePath) else Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        source = io.BytesIO(file.read_bytes()) if isinstance(file, RemotePath) else None
        state = read_checkpoint(file, source, map_location=map_location)
    except (ValueError, OSError) as err:
        cause = err.__cause__ or err
        reason = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        raise CheckpointError(f"{file}: unreadable checkpoint ({reason})") from None
    if "model" not in state:
        raise CheckpointError(f"{file}: not a checkpoint (expected a dict with a 'model' entry)")
    return state


def read_report(directory) -> dict:
    """The metrics reported with the checkpoint in ``directory`` ({} when it has none: sdo < 0.4)."""
    file = location(directory) / REPORT_FILE
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return {}


def newest_first(run_dir) -> list:
    """The checkpoint directories of ``run_dir`` (local or a RemotePath), newest first."""
    run_dir = location(run_dir)
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if is_checkpoint_dir_name(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: _order(p.name), reverse=True)


def older_than(directory) -> list:
    """The checkpoint directories beside ``directory`` (same run; local or a RemotePath) that are older,
    newest first."""
    directory = location(directory)
    if not is_checkpoint_dir_name(directory.name):
        return []
    return [p for p in newest_first(directory.parent) if _order(p.name) < _order(directory.name)]


def _order(name: str) -> tuple[int, int, int]:
    """Sort key of a checkpoint directory name: sdo < 0.2 named them by epoch, now by step and attempt."""
    found = _DIR_NAME.match(name)
    return (1 if name.startswith("checkpoint_step") else 0, int(found.group(1)), int(found.group(2) or 0))

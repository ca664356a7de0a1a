"""Training checkpoint files of a run.

A checkpoint is a directory with ``checkpoint.pt`` (a dict: model, optimizer, scheduler, epoch,
step, config, mlflow_run_id) and ``config.yaml`` (the resolved config, readable without torch).
The ``model`` entry is a plain state dict, so ``model.checkpoint.load_weights`` reads it as well.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
import yaml

from orchestrator.run.failures import CheckpointError
from orchestrator.run.storage import RemotePath, location, remove_tree

CHECKPOINT_FILE = "checkpoint.pt"
CONFIG_FILE = "config.yaml"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2: the registered checkpoints
BEST = "best"  # <run dir>/best: a link to the best of Ray Train's checkpoint folders, not a copy
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "epoch", "step", "config", "mlflow_run_id")


_DIR_NAME = re.compile(r"^checkpoint_(?:step|epoch)(\d+)(?:-(\d+))?$")


def dir_name(step: int, attempt: int) -> str:
    """Name of the checkpoint directory of global ``step`` taken by the ``attempt``-th worker-group start.

    A step trained again after a restore (from an older checkpoint than the latest) gets a new name:
    Ray Train would otherwise copy it over the registered one of that name, then prune it as the old one.
    """
    return f"checkpoint_step{step:09d}-{attempt}"


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
    """Read a training checkpoint from its directory or its ``checkpoint.pt``.

    A truncated or otherwise unreadable file raises CheckpointError naming it (never a bare unpickling error).
    """
    path = path if isinstance(path, RemotePath) else Path(path)
    file = path / CHECKPOINT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        source = io.BytesIO(file.read_bytes()) if isinstance(file, RemotePath) else file
        state = torch.load(source, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{file}: unreadable checkpoint ({reason})") from None
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{file}: not a checkpoint (expected a dict with a 'model' entry)")
    return state


def ray_num_to_keep(keep_checkpoints: int) -> int:
    """Ray Train's ``num_to_keep`` for at most ``keep_checkpoints`` folders: Ray keeps that many best-scored
    ones *and* the latest besides them."""
    return max(1, keep_checkpoints - 1)


def point_best(run_dir: str | os.PathLike, checkpoint_dir: str | os.PathLike) -> Path:
    """Make ``<run_dir>/best`` refer to ``checkpoint_dir`` (a relative symlink, replaced atomically) -> its path.

    Readers open ``best`` like any checkpoint directory; a ``best`` copied by sdo < 0.3 is replaced.
    """
    run_dir, target = Path(run_dir), Path(checkpoint_dir)
    best = run_dir / BEST
    if best.is_dir() and not best.is_symlink():
        shutil.rmtree(best)
    link = run_dir / f".{BEST}.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(os.path.relpath(target, run_dir), target_is_directory=True)
    os.replace(link, best)
    return best


def older_than(directory) -> list:
    """The checkpoint directories beside ``directory`` (same run; local or a RemotePath) that are older,
    newest first."""
    directory = location(directory)
    mine = _DIR_NAME.match(directory.name)
    if mine is None or not directory.parent.is_dir():
        return []
    older = []
    for sibling in directory.parent.iterdir():
        found = _DIR_NAME.match(sibling.name)
        if found and sibling.is_dir() and _order(sibling.name) < _order(directory.name):
            older.append(sibling)
    return sorted(older, key=lambda p: _order(p.name), reverse=True)


def _order(name: str) -> tuple[int, int, int]:
    """Sort key of a checkpoint directory name: sdo < 0.2 named them by epoch, now by step and attempt."""
    found = _DIR_NAME.match(name)
    return (1 if name.startswith("checkpoint_step") else 0, int(found.group(1)), int(found.group(2) or 0))


def remove_unregistered(run_dir) -> list:
    """Delete checkpoint directories of ``run_dir`` that Ray Train never registered -> what was deleted.

    A worker group killed while Ray copied a checkpoint into the run directory leaves a partial one;
    only those named in Ray's checkpoint-manager snapshot are complete. Without a readable snapshot
    nothing is deleted (resuming skips unreadable checkpoints anyway).
    """
    run_dir = location(run_dir)
    snapshot = run_dir / RAY_SNAPSHOT
    try:
        registered = set(_values(json.loads(snapshot.read_text()), "checkpoint_dir_name"))
    except (OSError, ValueError):
        return []
    removed = []
    for candidate in run_dir.iterdir() if run_dir.is_dir() else ():
        if candidate.is_dir() and _DIR_NAME.match(candidate.name) and candidate.name not in registered:
            remove_tree(candidate)
            removed.append(candidate)
    return removed


def _values(tree, key: str):
    """Every value of ``key`` anywhere in a parsed JSON tree (Ray nests its snapshot; the key is stable)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _values(item, key)
    elif isinstance(tree, str) and key in tree:
        try:
            yield from _values(json.loads(tree), key)
        except ValueError:
            return

"""A run's name and directory, and the markers that signal into a running training.

A run lives in ``<storage_path>/<name>``, a local folder or a prefix in object storage
(orchestrator.run.storage: the same calls serve both). What the directory holds about the run's
identity (``sdo_run.json``) is orchestrator.run.identity's.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from orchestrator.config import Config
from orchestrator.run.storage import RemotePath, location

CRASH_MARKER = ".crash_injected"
STOP_MARKER = ".stop_requested"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunExistsError(FileExistsError):
    """A run of that name exists and ``resume`` was not asked for."""


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, no leading symbol)")
    return name


def default_name(config_path: str | None) -> str:
    """``<config stem>-<UTC time>``: the name of a run or sweep started without ``--name``."""
    stem = Path(config_path).stem if config_path else "run"
    return f"{stem}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def storage_root(cfg: Config) -> Path | RemotePath:
    """Where runs and checkpoints live (an absolute folder, or a RemotePath), and locally the embedded MLflow store."""
    return location(cfg.train.storage_path)


def run_dir(cfg: Config, name: str) -> Path | RemotePath:
    return storage_root(cfg) / check_name(name)


def local_dir(run_dir) -> Path:
    """A local folder for what is drawn to files before MLflow takes it (plots, logs): the run
    directory itself, or for a run in object storage a folder named after it in the temp dir."""
    run_dir = location(run_dir)
    if isinstance(run_dir, RemotePath):
        return Path(tempfile.gettempdir()) / "sdo-runs" / run_dir.name
    return run_dir


def write_json_atomic(path: Path | RemotePath, value: dict) -> None:
    """Write JSON so that a reader never sees a half-written file."""
    if isinstance(path, RemotePath):
        path.write_text(json.dumps(value, indent=2))  # one PUT is atomic
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def claim_crash(run_dir) -> bool:
    """True exactly once per run directory: the fault-injection hook fires a single time.

    ``O_EXCL`` makes the claim atomic, and the marker survives the worker-group restart. (In object
    storage it is check-then-put: one rank asks, so nobody races it.)
    """
    run_dir = location(run_dir)
    if isinstance(run_dir, RemotePath):
        marker = run_dir / CRASH_MARKER
        if marker.exists():
            return False
        marker.touch()
        return True
    try:
        fd = os.open(Path(run_dir) / CRASH_MARKER, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.close(fd)
    return True


def request_stop(run_dir) -> None:
    """Ask a running training to stop at its next step, with a checkpoint (the driver's Ctrl-C)."""
    (location(run_dir) / STOP_MARKER).touch()


def stop_requested(run_dir) -> bool:
    return (location(run_dir) / STOP_MARKER).is_file()


def clear_stop(run_dir) -> None:
    """Forget a stop request once the run has stopped, so that ``--resume`` trains on."""
    (location(run_dir) / STOP_MARKER).unlink(missing_ok=True)

"""Open a run: claim its directory and create its MLflow run (new), or find both again (resume).

Called once the config has passed the preflight (orchestrator.run.preflight). The MLflow run is
created here, by the driver, before any worker starts; workers only attach to it through the
RunIdentity, so a restarted worker group never creates a second run. Finishing a run is
:func:`tracking.set_status` (FINISHED / FAILED / KILLED), called by whoever ran it.
"""
from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import yaml

from orchestrator.config import Config, ConfigError, to_dict
from orchestrator.run import tracking
from orchestrator.run.directory import RunExistsError, run_dir
from orchestrator.run.identity import RUN_STATE_FILE, RunIdentity, read_identity, write_identity


def claim_directory(directory: Path, *, what: str, name: str, uri: str, resume: bool, state_file: str,
                    exists_error: type[Exception]) -> RunIdentity | None:
    """Claim the directory of a new run or sweep, or take up the one being resumed.

    New (``resume`` false): the directory must not exist; it is created and None is returned.
    Resume: its saved identity (``state_file``) must exist and name the same tracking URI; its MLflow run is
    marked RUNNING again and the identity is returned.
    """
    if directory.exists() and not resume:
        raise exists_error(f"{what} {name!r} already exists in {directory.parent}; pass --resume to continue it "
                           "or choose another --name")
    identity = read_identity(directory, state_file) if resume else None
    if resume and identity is None:
        raise FileNotFoundError(f"--resume: no {what} named {name!r} in {directory.parent}")
    if identity is not None:
        if identity.tracking_uri != uri:
            raise ConfigError(f"--resume: {what} {name!r} was tracked at {identity.tracking_uri}, not {uri}")
        tracking.set_status(uri, identity.run_id, "RUNNING")
        return identity
    directory.mkdir(parents=True, exist_ok=False)
    return None


def open_run(cfg: Config, *, name: str, resume: bool = False) -> RunIdentity:
    """Create (or with ``resume``, find again) the run directory of the preflighted ``cfg`` and its MLflow run
    (nested under ``tracking.parent_run_id`` when set) -> the run's identity, saved as ``sdo_run.json``.

    The tracking store is checked first: nothing is written to the run directory when it is unreachable.
    """
    def describe(identity: RunIdentity) -> None:
        tracking.log_dataset_inputs(identity.tracking_uri, identity.run_id, cfg)
        (identity.location() / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        identity.logger().artifact(identity.location() / "config.yaml")

    return _open(cfg, name=name, directory=run_dir(cfg, name), resume=resume, what="run", command="launch",
                 state_file=RUN_STATE_FILE, exists_error=RunExistsError, describe=describe)


def open_sweep_run(cfg: Config, *, name: str, directory, resume: bool, state_file: str,
                   exists_error: type[Exception], describe: Callable[[RunIdentity], None]) -> RunIdentity:
    """:func:`open_run` for a sweep's parent run in ``directory`` (its identity saved as ``state_file``);
    ``describe(identity)`` logs what a new parent run shows (tags, params, config) before the identity is saved."""
    parent_cfg = copy.deepcopy(cfg)
    parent_cfg.tracking.parent_run_id = None
    return _open(parent_cfg, name=name, directory=directory, resume=resume, what="sweep", command="sweep",
                 state_file=state_file, exists_error=exists_error, describe=describe)


def _open(cfg: Config, *, name: str, directory, resume: bool, what: str, command: str, state_file: str,
          exists_error: type[Exception], describe: Callable[[RunIdentity], None]) -> RunIdentity:
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    identity = claim_directory(directory, what=what, name=name, uri=uri, resume=resume, state_file=state_file,
                               exists_error=exists_error)
    if identity is not None:
        return identity
    exp_id, run_id = tracking.create_run(cfg, name=name, command=command)
    identity = RunIdentity(name=name, directory=str(directory), storage=cfg.train.storage_path, tracking_uri=uri,
                           experiment_id=exp_id, run_id=run_id)
    describe(identity)
    write_identity(identity, state_file)
    return identity


def find_run(cfg: Config, name: str) -> RunIdentity | None:
    """The identity :func:`open_run` saved for the run ``name`` under ``train.storage_path``, or None."""
    return read_identity(run_dir(cfg, name))

"""Start a run: preflight, then open its directory and its MLflow run (new or resumed).

The MLflow run is created here, by the driver, before any worker starts; workers only attach to it
by id, so a restarted worker group never creates a second run. Finishing a run is
:func:`tracking.set_status` (FINISHED / FAILED / KILLED), called by whoever ran it.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.config import Config, ConfigError, to_dict
from orchestrator.run import tracking
from orchestrator.run.directory import RunExistsError, read_run_state, run_dir, write_run_state
from orchestrator.run.preflight import preflight, resolve


def claim_directory(directory: Path, *, what: str, name: str, uri: str, resume: bool, state: dict | None,
                    exists_error: type[Exception]) -> dict | None:
    """Claim the directory of a new run or sweep, or take up the one being resumed.

    New (``resume`` false): the directory must not exist; it is created and None is returned.
    Resume: its saved ``state`` must exist and name the same tracking URI; its MLflow run is marked
    RUNNING again and ``state`` is returned.
    """
    if directory.exists() and not resume:
        raise exists_error(f"{what} {name!r} already exists in {directory.parent}; pass --resume to continue it "
                           "or choose another --name")
    if resume and state is None:
        raise FileNotFoundError(f"--resume: no {what} named {name!r} in {directory.parent}")
    if state is not None:
        if state["tracking_uri"] != uri:
            raise ConfigError(f"--resume: {what} {name!r} was tracked at {state['tracking_uri']}, not {uri}")
        tracking.set_status(uri, state["mlflow_run_id"], "RUNNING")
        return state
    directory.mkdir(parents=True, exist_ok=False)
    return None


def open_run(cfg: Config, *, name: str, resume: bool = False, parent_run_id: str | None = None) -> dict:
    """Create (or with ``resume``, find again) the run directory and its MLflow run -> run info dict.

    The tracking store is checked first: nothing is written to the run directory when it is unreachable.
    """
    if parent_run_id:
        cfg.tracking.parent_run_id = parent_run_id
    directory = run_dir(cfg, name)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    state = claim_directory(directory, what="run", name=name, uri=uri, resume=resume,
                            state=read_run_state(directory), exists_error=RunExistsError)
    if state is not None:
        return state
    exp_id, run_id = tracking.create_run(cfg, name=name)
    tracking.log_dataset_inputs(uri, run_id, cfg)
    state = {"name": name, "run_dir": str(directory), "tracking_uri": uri, "experiment_id": exp_id,
             "mlflow_run_id": run_id, "run_url": tracking.run_url(uri, exp_id, run_id)}
    write_run_state(directory, state)
    (directory / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    tracking.RunLogger(uri, run_id).artifact(directory / "config.yaml")
    return state


def start(cfg: Config, *, name: str, resume: bool = False, storage_path: str | None = None,
          parent_run_id: str | None = None) -> tuple[Config, dict]:
    """Preflight, then open the run -> (the resolved config, the run's identity: name, run_dir,
    tracking_uri, experiment_id, mlflow_run_id, run_url)."""
    resolved = preflight(cfg, name=name, resume=resume, storage_path=storage_path)
    return resolved, open_run(resolved, name=name, resume=resume, parent_run_id=parent_run_id)


def run_info(cfg: Config, name: str, storage_path: str | None = None) -> dict | None:
    """The identity :func:`open_run` wrote for the run ``name`` (run_dir, tracking_uri, experiment_id,
    mlflow_run_id, run_url), or None when there is no such run."""
    return read_run_state(run_dir(resolve(cfg, storage_path), name))

"""The sweep's MLflow runs: one parent run for the sweep, one child run per trial (``mlflow.parentRunId``).

The parent's identity is saved as ``sdo_sweep.json`` in the sweep's folder, so ``--resume`` continues it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.config import Config, dump_yaml
from orchestrator.run import tracking
from orchestrator.run.identity import RunIdentity
from orchestrator.run.lifecycle import open_sweep_run
from orchestrator.sweep.space import Axis, budget, describe_space, num_trials

STATE_FILE = "sdo_sweep.json"


class SweepExistsError(FileExistsError):
    """A sweep of that name exists and ``resume`` was not asked for."""


def open_parent_run(cfg: Config, axes: list[Axis], *, name: str, directory: Path, resume: bool,
                    flops_size: tuple[int, int]) -> RunIdentity:
    """Create the sweep's MLflow parent run and ``sdo_sweep.json`` (or find them again on resume)."""
    def describe(identity: RunIdentity) -> None:
        from mlflow.entities import Param

        logger = identity.logger()
        logger.client.delete_tag(identity.run_id, "rho")  # the trials' rho, not one value, describes a sweep
        logger.tags({"sdo.kind": "sweep", "sdo.sweep.scheduler": cfg.sweep.scheduler,
                     "sdo.sweep.search": cfg.sweep.search})
        extra = {f"space.{k}": v for k, v in describe_space(axes).items()}
        extra.update({"sweep.num_trials": num_trials(cfg, axes), "sweep.budget_epochs": budget(cfg),
                      "sweep.flops_size": "x".join(map(str, flops_size))})
        logger.client.log_batch(identity.run_id, params=[Param(k, str(v)) for k, v in extra.items()])
        (directory / "config.yaml").write_text(dump_yaml(cfg))
        logger.artifact(directory / "config.yaml")

    return open_sweep_run(cfg, name=name, directory=directory, resume=resume, state_file=STATE_FILE,
                          exists_error=SweepExistsError, describe=describe)


def child_runs(parent: RunIdentity) -> dict[str, list]:
    """Run name -> MLflow child runs of the sweep's parent (more than one would be a duplicate)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=parent.tracking_uri)
    runs = client.search_runs([parent.experiment_id], f"tags.mlflow.parentRunId = '{parent.run_id}'",
                              max_results=10000)
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("sdo.run_name", run.info.run_name), []).append(run)
    return out


def finish_child_runs(parent: RunIdentity, rows: list[dict], best: dict | None, trials_dir: Path) -> None:
    """Tag each trial's child run with its trial id and outcome; close runs of trials stopped early."""
    runs = child_runs(parent)
    for row in rows:
        found = runs.get(row["run_name"], [])
        row["run_id"] = found[0].info.run_id if found else None
        for run in found:
            child = dataclasses.replace(parent, name=row["run_name"], directory=str(trials_dir / row["run_name"]),
                                        run_id=run.info.run_id)
            logger = child.logger()
            logger.tags({"sdo.trial_id": row["trial"], "sdo.sweep.status": row["status"],
                         "sdo.sweep.best": str(best is not None and best["trial"] == row["trial"]).lower()})
            if row["gflops"] is not None:
                logger.metrics({"gflops": row["gflops"]}, step=0)
            if row["status"] == "stopped early" and run.info.status == "RUNNING":
                tracking.set_status(child.tracking_uri, child.run_id, "KILLED")

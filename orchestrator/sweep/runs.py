"""The sweep's MLflow runs: one parent run for the sweep, one child run per trial (``mlflow.parentRunId``).

The parent's identity is saved as ``sdo_sweep.json`` in the sweep's folder, so ``--resume`` continues it.
When the sweep ends, each child run gets its outcome (tags ``sdo.sweep.status``, ``sdo.pareto``,
``sdo.sweep.rank``, ``sdo.sweep.error``; a trial the scheduler stopped early ends FINISHED with
``sdo.stopped_early=true``, a failed one FAILED), and the trials kept (``sweep.log_models``: the front, or
the best k) get their best weights as an MLflow Model.
"""
from __future__ import annotations

import dataclasses

from orchestrator.config import Config, dump_yaml
from orchestrator.run import tracking
from orchestrator.run.identity import RunIdentity
from orchestrator.run.lifecycle import open_sweep_run
from orchestrator.sweep.pareto import Objective
from orchestrator.sweep.space import Axis, budget, describe_space, num_trials

# MLflow status of a child run by the trial's outcome (a running or pending trial's is left alone)
CHILD_STATUS = {"completed": "FINISHED", "stopped early": "FINISHED", "error": "FAILED", "cancelled": "KILLED"}

STATE_FILE = "sdo_sweep.json"


class SweepExistsError(FileExistsError):
    """A sweep of that name exists and ``resume`` was not asked for."""


def open_parent_run(cfg: Config, axes: list[Axis], *, name: str, directory, resume: bool,
                    flops_size: tuple[int, int], objectives: list[Objective]) -> RunIdentity:
    """Create the sweep's MLflow parent run and ``sdo_sweep.json`` (or find them again on resume)."""
    def describe(identity: RunIdentity) -> None:
        from mlflow.entities import Param

        logger = identity.logger()
        logger.client.delete_tag(identity.run_id, "rho")  # the trials' rho, not one value, describes a sweep
        logger.tags({"sdo.kind": "sweep", "sdo.sweep.scheduler": cfg.sweep.scheduler,
                     "sdo.sweep.search": cfg.sweep.search})
        extra = {f"space.{k}": v for k, v in describe_space(axes).items()}
        extra.update({"sweep.num_trials": num_trials(cfg, axes), "sweep.budget_epochs": budget(cfg),
                      "sweep.flops_size": "x".join(map(str, flops_size)),
                      "sweep.optimised": ", ".join(f"{o.metric} {o.mode}" for o in objectives)})
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


def _child(parent: RunIdentity, row: dict, trials_dir, run_id: str) -> RunIdentity:
    return dataclasses.replace(parent, name=row["run_name"], directory=str(trials_dir / row["run_name"]),
                               run_id=run_id)


def finish_child_runs(parent: RunIdentity, rows: list[dict], best: dict | None, trials_dir) -> None:
    """Tag each trial's child run with its trial id and outcome, and give it the status of that outcome."""
    runs = child_runs(parent)
    for row in rows:
        found = drop_orphans(parent, runs.get(row["run_name"], []), trials_dir / row["run_name"])
        row["run_id"] = found[0].info.run_id if found else None
        for run in found:
            child = _child(parent, row, trials_dir, run.info.run_id)
            tags = {"sdo.trial_id": row["trial"], "sdo.sweep.status": row["status"],
                    "sdo.sweep.best": str(best is not None and best["trial"] == row["trial"]).lower(),
                    "sdo.pareto": str(bool(row.get("pareto"))).lower(), "sdo.sweep.rank": row.get("rank") or "-"}
            if row["status"] == "stopped early":
                tags["sdo.stopped_early"] = "true"
            if row.get("error"):
                tags["sdo.sweep.error"] = row["error"][:5000]
            child.logger().tags(tags)
            status = CHILD_STATUS.get(row["status"])
            if status is not None and run.info.status != status:
                tracking.set_status(child.tracking_uri, child.run_id, status)


def drop_orphans(parent: RunIdentity, found: list, trial_dir) -> list:
    """A trial's child runs less the orphans: a run that a driver killed while the trial opened it created in
    MLflow but never recorded (``sdo_run.json`` names another) and that logged nothing is deleted."""
    from orchestrator.run.identity import read_identity

    if len(found) < 2:
        return found
    recorded = read_identity(trial_dir)
    keep = [r for r in found if recorded is None or r.info.run_id == recorded.run_id or r.data.metrics]
    client = parent.logger().client
    for run in found:
        if run not in keep:
            client.delete_run(run.info.run_id)
    return keep


def kept_trials(rows: list[dict], report: dict, cfg: Config) -> list[dict]:
    """The trials that get an MLflow Model (``sweep.log_models``): the front, the ``best_k`` best by the first
    objective, or none. Only trials that completed their budget have a best checkpoint to log."""
    how = cfg.sweep.log_models
    if how == "none":
        return []
    completed = [r for r in rows if r["status"] == "completed"]
    if how == "front":
        return [r for r in completed if r.get("pareto")]
    first = Objective(**report["objectives"][0])
    scored = [r for r in completed if r.get(first.metric) is not None]
    scored.sort(key=lambda r: first.cost(float(r[first.metric])))
    return scored[:cfg.sweep.best_k]


def log_kept_models(parent: RunIdentity, kept: list[dict], trials_dir, register_as: str | None) -> dict[str, str]:
    """Log the best weights of each kept trial as its child run's MLflow Model (once: a run that has one is
    skipped) -> {trial id: model URI}."""
    from orchestrator.run.storage import location
    from orchestrator.train.checkpointer import BEST
    from orchestrator.train.driver import log_best_model

    logged = {}
    for row in kept:
        if not row.get("run_id"):
            continue
        child = _child(parent, row, trials_dir, row["run_id"])
        existing = child.logger().client.get_run(child.run_id).data.tags.get("sdo.model_uri")
        if existing:
            logged[row["trial"]] = existing
            continue
        best = best_checkpoint(location(child.directory), BEST)
        if best is None:
            continue
        logged[row["trial"]] = log_best_model(child, best, register_as)["model_uri"]
    return logged


def best_checkpoint(run_dir, link: str):
    """The trial's best checkpoint folder: the ``best`` link, or in object storage the best scored one."""
    from orchestrator.run import checkpoints

    best = run_dir / link
    if best.is_dir():
        return best
    found = checkpoints.newest_first(run_dir)
    if not found:
        return None
    return max(found, key=lambda p: checkpoints.read_report(p).get("AP", float("-inf")))

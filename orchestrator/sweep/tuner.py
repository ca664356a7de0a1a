"""`sdo sweep`: Ray Tune over the training of `sdo launch` (rho, loss weights, any config key).

Each trial (orchestrator.sweep.trial) is a Tune function trainable that runs the same TorchTrainer as
`sdo launch`, so a trial is a real distributed training with its own checkpoints, fault tolerance and
MLflow run; ``sweep.max_concurrent`` bounds how many trainings run at once.

A sweep lives in ``<storage_path>/sweeps/<name>/``: Tune's experiment state, ``sdo_sweep.json``
(the MLflow parent run, so ``--resume`` continues it), ``trials/<name>-<trial id>/`` (one Ray
Train run per trial) and ``report/`` (tables, Pareto plot). MLflow holds one parent run for the
sweep and one child run per trial (orchestrator.sweep.runs); a resumed sweep reuses both.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.cluster.dispatch import checked_cluster_kind
from orchestrator.config import Config, ConfigError, dump_yaml, to_dict
from orchestrator.run import tracking
from orchestrator.run.directory import check_name, storage_root
from orchestrator.run.preflight import check_shards, with_absolute_paths
from orchestrator.run.storage import is_remote
from orchestrator.sweep.report import TERMINAL, build_report, write_report
from orchestrator.sweep.rows import collect_rows, flops_size
from orchestrator.sweep.runs import finish_child_runs, open_parent_run
from orchestrator.sweep.schedulers import make_scheduler
from orchestrator.sweep.space import Axis, budget, describe_space, make_search, num_trials, parse_space, to_tune
from orchestrator.sweep.trial import run_trial, trial_resources
from orchestrator.train.checkpointer import Checkpointer

log = logging.getLogger(__name__)


def sweeps_root(cfg: Config) -> Path:
    return storage_root(cfg) / "sweeps"


def sweep_dir(cfg: Config, name: str) -> Path:
    return sweeps_root(cfg) / check_name(name)


def _tuner(cfg: Config, axes: list[Axis], trainable, *, name: str, experiment_path: Path, resume: bool):
    from ray import tune

    # a sweep interrupted before Tune saved any state (e.g. Ray failed to start) simply starts over
    if resume and tune.Tuner.can_restore(str(experiment_path)):
        return tune.Tuner.restore(str(experiment_path), trainable=trainable, resume_unfinished=True,
                                  resume_errored=True)
    s = cfg.sweep
    return tune.Tuner(
        trainable,
        param_space=to_tune(axes),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, scheduler=make_scheduler(cfg),
                                    search_alg=make_search(cfg), num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent if s.search == "optuna" else None,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=str(experiment_path.parent),
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )



def run_sweep(cfg: Config, *, name: str, resume: bool = False, trainable: Callable | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or with ``resume`` continue) the sweep ``cfg.sweep`` over ``cfg`` on local/attached Ray.

    trainable: the Tune function run per trial, ``f(params, *, setup)``; default :func:`run_trial`.
    Returns {'name', 'rows', 'best', 'savings', 'report' (text), 'paths', 'interrupted', 'failed' (trials
    that errored), 'run' (the parent's RunIdentity), 'mlflow_run_id', 'sweep_dir'}.
    Ray: an embedded one is started (dashboard on 127.0.0.1) unless this runs inside a Ray Job or
    Ray is already initialised.
    """
    from ray import tune

    from orchestrator.cluster.local import ray_session

    axes = parse_space(cfg)
    make_scheduler(cfg), make_search(cfg)  # config errors before anything is written
    if is_remote(cfg.train.storage_path):
        raise ConfigError(f"train.storage_path={cfg.train.storage_path!r}: sweeps keep Tune's experiment state in a "
                          "local or shared folder; object storage is for single runs (sdo launch)")
    # absolute data and storage paths (Tune runs each trial in its own working directory); shards checked once
    cfg = with_absolute_paths(cfg)
    check_shards(cfg)
    directory = sweep_dir(cfg, name)
    state = open_parent_run(cfg, axes, name=name, directory=directory, resume=resume, flops_size=flops_size(cfg))
    setup = {"cfg": to_dict(cfg), "name": name, "epochs": budget(cfg), "parent_run_id": state.run_id,
             "tracking_uri": state.tracking_uri, "trials_dir": str(directory / "trials")}
    wrapped = tune.with_resources(tune.with_parameters(trainable or run_trial, setup=setup), trial_resources())
    echo(f"sdo: sweep {name}: {num_trials(cfg, axes)} trials x {budget(cfg)} epochs, "
         f"{cfg.sweep.scheduler} on {cfg.sweep.metric}; MLflow parent run {state.url}")
    try:
        with ray_session(cfg):
            _tuner(cfg, axes, wrapped, name=name, experiment_path=directory, resume=resume).fit()
            rows = collect_rows(cfg, axes, directory, name=name)
    except BaseException:
        tracking.set_status(state.tracking_uri, state.run_id, "FAILED")
        raise
    interrupted = any(r["status"] not in TERMINAL for r in rows)
    if interrupted:  # trials stopped by the interrupt may have left a checkpoint Ray had not registered
        Checkpointer.clean_sweep(cfg.checkpoint, directory / "trials")
    report = build_report(rows, budget=budget(cfg), metric=cfg.sweep.metric, mode=cfg.sweep.mode,
                          flops_size=flops_size(cfg))
    finish_child_runs(state, rows, report["best"], directory / "trials")
    paths = write_report(rows, report, directory / "report", title=f"sweep {name}: AP vs GFLOPs")
    logger = state.logger()
    logger.artifact(directory / "report", "report")
    savings = report["savings"]
    logger.metrics({"epochs_run": savings["epochs_run"], "epochs_saved": savings["epochs_saved"],
                    "trials_stopped_early": savings["stopped_early"]}, step=0)
    best = report["best"]
    if best is not None:
        logger.tags({"best_trial": best["trial"], "best_run_id": best.get("run_id") or "",
                     f"best_{cfg.sweep.metric}": best.get(cfg.sweep.metric)})
        logger.metrics({f"best_{cfg.sweep.metric}": best[cfg.sweep.metric]}, step=0)
    tracking.set_status(state.tracking_uri, state.run_id, "KILLED" if interrupted else "FINISHED")
    echo(report["text"])
    echo(f"sdo: {cfg.sweep.scheduler.upper()} ran {savings['epochs_run']} of {savings['full_grid_epochs']} trial-epochs "
         f"({savings['epochs_saved']} saved, {savings['stopped_early']} trials stopped early)")
    if best is not None:
        echo(f"sdo: best trial {best['trial']}: {cfg.sweep.metric}={best[cfg.sweep.metric]:.4f}")
    failed = sum(r["status"] == "error" for r in rows)
    if failed:
        echo(f"sdo: {failed} of {len(rows)} trials failed (errors above, and in each trial's error.txt under "
             f"{directory}); --name {name} --resume retries them")
    if interrupted:
        echo(f"sdo: sweep {name} was interrupted; continue it with --name {name} --resume")
    echo(f"sdo: report in {directory / 'report'}; MLflow parent run {state.url}")
    return {"name": name, "rows": rows, "best": best, "savings": savings, "report": report["text"], "paths": paths,
            "interrupted": interrupted, "failed": failed, "run": state, "mlflow_run_id": state.run_id, "sweep_dir": str(directory)}


# --------------------------------------------------------------------------------------------
# Where the sweep runs
# --------------------------------------------------------------------------------------------


def submit_sweep_job(cfg: Config, *, address: str, name: str, resume: bool = False, dry_run: bool = False,
                     echo: Callable[[str], None] = print, poll_s: float = 1.0) -> int:
    """Run the whole sweep as a Ray Job on ``address`` (config shipped in the runtime env), following its logs."""
    from orchestrator.cluster.jobs import submit_job

    job_cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address="local"))
    return submit_job(job_cfg, address=address, name=name, resume=resume, dry_run=dry_run, echo=echo,
                      poll_s=poll_s, module="orchestrator.sweep")


def sweep_on(cfg: Config, *, name: str, cluster: str | None = None, resume: bool = False, dry_run: bool = False,
             echo: Callable[[str], None] = print) -> Any:
    """Run the sweep where ``cluster`` (default ``cfg.cluster.address``) says.

    local -> :func:`run_sweep`'s summary; http(s) -> 0 once the Ray Job succeeded; *.yaml -> the
    RayJob's exit status. The search space is checked first in every case.
    """
    check_name(name)
    address = cluster or cfg.cluster.address
    cfg = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, address=address))
    axes = parse_space(cfg)
    kind = checked_cluster_kind(address)
    if kind == "local":
        if dry_run:
            echo(dump_yaml(cfg))
            echo(json.dumps({"trials": num_trials(cfg, axes), "epochs_per_trial": budget(cfg),
                             "space": describe_space(axes)}, indent=2))
            return 0
        return run_sweep(cfg, name=name, resume=resume, echo=echo)
    if kind == "ray-jobs":
        return submit_sweep_job(cfg, address=address, name=name, resume=resume, dry_run=dry_run, echo=echo)
    if resume:
        raise ConfigError(f"--resume with --cluster {address}: a RayJob always starts its sweep afresh; "
                          "resume on the cluster with --cluster http(s)://HEAD:8265 instead")
    from orchestrator.cluster.kuberay.rayjob import submit_rayjob

    return submit_rayjob(cfg, address, name=name, command="sweep", dry_run=dry_run)


def job_main(argv: list[str] | None = None) -> int:
    """Entry point of a Ray Job: config from the runtime env, sweep on the cluster the job runs in."""
    from orchestrator.cluster.jobs import job_setup

    cfg, args = job_setup("python -m orchestrator.sweep", argv)
    summary = run_sweep(cfg, name=args.name, resume=args.resume)
    return 130 if summary["interrupted"] else 1 if summary["failed"] else 0


"""`sdo sweep`: Ray Tune over the training of `sdo launch` (rho, loss weights, any config key).

Each trial (orchestrator.sweep.trial) is a Tune function trainable that runs the same TorchTrainer as
`sdo launch`, so a trial is a real distributed training with its own checkpoints, fault tolerance and
MLflow run; ``sweep.max_concurrent`` bounds how many trainings run at once.

A sweep lives in ``<storage_path>/sweeps/<name>/`` (a local or shared folder, or a prefix in object storage:
``s3://`` / ``gs://``, through Tune's own storage_path): Tune's experiment state, ``sdo_sweep.json``
(the MLflow parent run, so ``--resume`` continues it, also after the driver died), ``trials/<name>-<trial
id>/`` (one Ray Train run per trial) and ``report/`` (tables, Pareto plot). MLflow holds one parent run for
the sweep and one child run per trial (orchestrator.sweep.runs); a resumed sweep reuses both.

What a sweep optimises is orchestrator.sweep.objectives'; a trial that fails is recorded with its cause and
the sweep goes on, until more than ``sweep.max_failures`` have failed (:class:`FailureLimit`).
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
from orchestrator.run.directory import check_name, local_dir, storage_root
from orchestrator.run.preflight import check_shards, with_absolute_paths
from orchestrator.run.storage import is_remote, location, ray_storage
from orchestrator.sweep.objectives import front_objectives, latency_measured, resolved
from orchestrator.sweep.pareto import Objective
from orchestrator.sweep.report import METRIC_TITLES, SHORT_NAMES, TERMINAL, build_report, plot_axes, write_report
from orchestrator.sweep.rows import collect_rows
from orchestrator.sweep.runs import finish_child_runs, kept_trials, log_kept_models, open_parent_run
from orchestrator.sweep.schedulers import make_scheduler
from orchestrator.sweep.space import Axis, budget, describe_space, make_search, num_trials, parse_space, to_tune
from orchestrator.sweep.trial import run_trial, trial_resources
from orchestrator.train.checkpointer import Checkpointer
from orchestrator.train.cost import FLOPS_SIZE

log = logging.getLogger(__name__)


def sweeps_root(cfg: Config):
    return storage_root(cfg) / "sweeps"


def sweep_dir(cfg: Config, name: str):
    """``<storage>/sweeps/<name>``: a local folder (Path) or a prefix in object storage (RemotePath)."""
    return sweeps_root(cfg) / check_name(name)


STATE_SYNC_S = 10


class FailureLimit:
    """``sweep.max_failures``: once more trials than that have failed, the sweep ends (every trial still running
    or waiting is stopped and reported as cancelled). A Tune callback that counts failures, with a stopper."""

    def __init__(self, max_failures: int | None):
        from ray.tune import Callback
        from ray.tune.stopper import Stopper

        limit = self

        class Counter(Callback):
            def on_trial_error(self, iteration, trials, trial, **info):
                limit.failed.append(trial.trial_id)
                if limit.max_failures is not None and len(limit.failed) > limit.max_failures and not limit.reached:
                    limit.reached = True
                    limit.cut = {t.trial_id for t in trials if t.status not in ("ERROR", "TERMINATED")}

        class Stop(Stopper):
            def __call__(self, trial_id, result):
                return False

            def stop_all(self):
                return limit.reached

        self.max_failures, self.failed, self.reached, self.cut = max_failures, [], False, set()
        self.callback, self.stopper = Counter(), Stop()


def _storage(directory) -> tuple[str, object | None]:
    """(path, pyarrow filesystem) of the sweep's folder for Tune: local as it is, object storage on sdo's
    bounded filesystem (orchestrator.run.storage)."""
    return ray_storage(str(directory))


def _tuner(cfg: Config, axes: list[Axis], trainable, *, name: str, directory, resume: bool,
           objectives: list[Objective], limit: FailureLimit):
    from ray import tune

    path, fs = _storage(directory)
    # a sweep interrupted before Tune saved any state (e.g. Ray failed to start) simply starts over
    if resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
        # the restored run config holds the first session's FailureLimit (unpickled): count in this one
        restored = tuner._local_tuner.get_run_config()
        restored.callbacks, restored.stop = [limit.callback], limit.stopper
        return tuner
    s = cfg.sweep
    single = objectives[0] if len(objectives) == 1 else None  # several: the scheduler and the search hold them
    parent, _ = _storage(directory.parent)
    return tune.Tuner(
        trainable,
        param_space=to_tune(axes),
        tune_config=tune.TuneConfig(metric=single and single.metric, mode=single and single.mode,
                                    scheduler=make_scheduler(cfg, objectives), search_alg=make_search(cfg, objectives),
                                    num_samples=s.num_samples,
                                    max_concurrent_trials=s.max_concurrent if s.search == "optuna" else None,
                                    trial_dirname_creator=lambda trial: trial.trial_id),
        run_config=tune.RunConfig(name=name, storage_path=parent, storage_filesystem=fs,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  # Tune's state reaches object storage within STATE_SYNC_S (Tune: 5 min), so a
                                  # --resume after the driver died loses at most that much of it
                                  sync_config=tune.SyncConfig(sync_period=STATE_SYNC_S),
                                  callbacks=[limit.callback], stop=limit.stopper),
    )


def _analysis(directory, objectives: list[Objective]):
    from ray.tune import ExperimentAnalysis

    path, fs = _storage(directory)
    return ExperimentAnalysis(path, storage_filesystem=fs, default_metric=objectives[0].metric,
                              default_mode=objectives[0].mode)


def _publish_report(directory, local: Path) -> None:
    """A sweep in object storage gets its report there too (it is drawn in a local folder first)."""
    if not is_remote(directory):
        return
    remote = location(str(directory)) / "report"
    for path in sorted(local.iterdir()):
        (remote / path.name).write_bytes(path.read_bytes())


def _log_summary(state, rows: list[dict], report: dict, cfg: Config) -> None:
    """The parent run's metrics (step = trials ended so far: a resumed sweep adds a point, never the same one
    twice), tags and the front's numbers."""
    logger = state.logger(exactly_once=True)
    step = sum(r["status"] in TERMINAL for r in rows)
    savings, best, first = report["savings"], report["best"], report["objectives"][0]["metric"]
    values = {"epochs_run": savings["epochs_run"], "epochs_saved": savings["epochs_saved"],
              "trials_stopped_early": savings["stopped_early"], "trials_failed": len(report["failed"]),
              "pareto_size": len(report["front"]), "pareto_hypervolume": report["hypervolume"]}
    if best is not None:
        values[f"best_{first}"] = best[first]
    logger.metrics(values, step=step)
    tags = {"sdo.sweep.front": ", ".join(r["trial"] for r in report["front"])[:5000],
            "sdo.sweep.front_over": ", ".join(f"{o['metric']} {o['mode']}" for o in report["front_over"])}
    if report["note"]:
        tags["sdo.sweep.note"] = report["note"]
    if best is not None:
        tags.update({"best_trial": best["trial"], "best_run_id": best.get("run_id") or "", f"best_{first}": best.get(first)})
    logger.tags(tags)


def run_sweep(cfg: Config, *, name: str, resume: bool = False, trainable: Callable | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or with ``resume`` continue) the sweep ``cfg.sweep`` over ``cfg`` on local/attached Ray.

    trainable: the Tune function run per trial, ``f(params, *, setup)``; default :func:`run_trial`.
    Returns {'name', 'rows', 'best', 'front', 'hypervolume', 'savings', 'report' (text), 'paths', 'interrupted',
    'failed' (trials that errored), 'failure_limit' (the line saying the sweep ended on sweep.max_failures, or
    None), 'models' ({trial: model URI}), 'run' (the parent's RunIdentity), 'mlflow_run_id', 'sweep_dir'}.
    Ray: an embedded one is started (dashboard on 127.0.0.1) unless this runs inside a Ray Job or
    Ray is already initialised.
    """
    from ray import tune

    from orchestrator.cluster.local import ray_session

    axes = parse_space(cfg)
    objectives, note = resolved(cfg)
    make_scheduler(cfg, objectives), make_search(cfg, objectives)  # config errors before anything is written
    # absolute data and storage paths (Tune runs each trial in its own working directory); shards checked once
    cfg = with_absolute_paths(cfg)
    check_shards(cfg)
    directory = sweep_dir(cfg, name)
    state = open_parent_run(cfg, axes, name=name, directory=directory, resume=resume, flops_size=FLOPS_SIZE,
                            objectives=objectives)
    trials_dir = directory / "trials"
    setup = {"cfg": to_dict(cfg), "name": name, "epochs": budget(cfg), "parent_run_id": state.run_id,
             "tracking_uri": state.tracking_uri, "trials_dir": str(trials_dir), "latency": latency_measured(cfg)}
    wrapped = tune.with_resources(tune.with_parameters(trainable or run_trial, setup=setup), trial_resources())
    echo(f"sdo: sweep {name}: {num_trials(cfg, axes)} trials x {budget(cfg)} epochs, "
         f"{cfg.sweep.scheduler} on {', '.join(f'{o.metric} ({o.mode})' for o in objectives)}; "
         f"MLflow parent run {state.url}")
    limit = FailureLimit(cfg.sweep.max_failures)
    try:
        with ray_session(cfg):
            _tuner(cfg, axes, wrapped, name=name, directory=directory, resume=resume, objectives=objectives,
                   limit=limit).fit()
            rows = collect_rows(cfg, axes, _analysis(directory, objectives), name=name, objectives=objectives,
                                cut=frozenset(limit.cut))
    except BaseException:
        tracking.set_status(state.tracking_uri, state.run_id, "FAILED")
        raise
    interrupted = any(r["status"] not in TERMINAL for r in rows)
    if interrupted:  # trials stopped by the interrupt may have left a checkpoint Ray had not registered
        Checkpointer.clean_sweep(cfg.checkpoint, trials_dir)
    report = build_report(rows, budget=budget(cfg), objectives=objectives, front_over=front_objectives(objectives),
                          flops_size=FLOPS_SIZE, note=note)
    finish_child_runs(state, rows, report["best"], trials_dir)
    for row in rows:  # a trial stopped early is never resumed and gets no model: its checkpoints go
        if row["status"] == "stopped early":
            Checkpointer(cfg.checkpoint, trials_dir / row["run_name"]).remove_all()
    models = {} if interrupted else log_kept_models(state, kept_trials(rows, report, cfg), trials_dir,
                                                    cfg.tracking.register_as)
    local_report = local_dir(directory) / "report"
    paths = write_report(rows, report, local_report, title=f"sweep {name}: {report_title(report)}")
    _publish_report(directory, local_report)
    logger = state.logger()
    logger.artifact(local_report, "report")
    _log_summary(state, rows, report, cfg)
    failed, swept = report["failed"], [a.key for a in axes]
    failure_limit = None
    if limit.reached:
        failure_limit = (f"sweep {name} ended: {len(failed)} trials failed, more than sweep.max_failures="
                         f"{cfg.sweep.max_failures} ({failure_text(failed[-1], swept)})")
    tracking.set_status(state.tracking_uri, state.run_id,
                        "FAILED" if failure_limit else "KILLED" if interrupted else "FINISHED")
    savings, best = report["savings"], report["best"]
    first = objectives[0].metric
    echo(report["text"])
    echo(f"sdo: {cfg.sweep.scheduler.upper()} ran {savings['epochs_run']} of {savings['full_grid_epochs']} trial-epochs "
         f"of the finished trials ({savings['epochs_saved']} saved, {savings['stopped_early']} trials stopped early)")
    over = ", ".join(f"{o['metric']} {o['mode']}" for o in report["front_over"])
    echo(f"sdo: Pareto front ({over}): "
         f"{', '.join(r['trial'] for r in report['front']) or 'empty'}; hypervolume {report['hypervolume']:.6g}")
    if best is not None:
        echo(f"sdo: best trial {best['trial']}: {first}={best[first]:.4f}")
    if models:
        echo(f"sdo: MLflow Models logged for {len(models)} trials ({cfg.sweep.log_models}): {', '.join(models)}")
    if failure_limit:
        echo(f"sdo: {failure_limit}")
    elif failed:
        causes = "; ".join(failure_text(r, swept) for r in failed[:3]) + ("; ..." if len(failed) > 3 else "")
        echo(f"sdo: {len(failed)} of {len(rows)} trials failed: {causes} (tracebacks in each trial's error.txt under "
             f"{directory}); --name {name} --resume retries them")
    if interrupted:
        echo(f"sdo: sweep {name} was interrupted; continue it with --name {name} --resume")
    echo(f"sdo: report in {directory / 'report'}; MLflow parent run {state.url}")
    return {"name": name, "rows": rows, "best": best, "front": report["front"], "hypervolume": report["hypervolume"],
            "savings": savings, "report": report["text"], "paths": paths, "interrupted": interrupted,
            "failed": len(failed), "failure_limit": failure_limit, "models": models, "run": state,
            "mlflow_run_id": state.run_id, "sweep_dir": str(directory)}


def failure_text(row: dict, swept: list[str]) -> str:
    """'trial <id> (<swept key>=<value>, ...): <ErrorType>: <message>' of a failed trial."""
    params = ", ".join(f"{SHORT_NAMES.get(k, k)}={row['params'][k]}" for k in swept if k in row.get("params", {}))
    return f"trial {row['trial']} ({params[:200]}): {row.get('error') or 'unknown cause'}"


def report_title(report: dict) -> str:
    x, y = plot_axes(report["front_over"])
    return f"{METRIC_TITLES.get(y, y)} vs {METRIC_TITLES.get(x, x)}"


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
    objectives, note = resolved(cfg)  # an objective no trial reports fails here, wherever the sweep would run
    kind = checked_cluster_kind(address)
    if kind == "local":
        if dry_run:
            echo(dump_yaml(cfg))
            echo(json.dumps({"trials": num_trials(cfg, axes), "epochs_per_trial": budget(cfg),
                             "space": describe_space(axes), "objectives": [vars(o) for o in objectives],
                             **({"note": note} if note else {})}, indent=2))
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


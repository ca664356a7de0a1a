"""`sdo sweep`: Ray Tune over the training of `sdo launch` (rho, loss weights, any config key).

Each trial is a Tune *function trainable* that builds the same TorchTrainer as `sdo launch`
(:func:`orchestrator.train.driver.run_training`) with a ``TuneReportCallback``, so a trial is a real
distributed training with its own checkpoints, fault tolerance and MLflow run. The trial itself
reserves no CPU: the trainer's workers take the cluster's CPUs/GPUs and ``sweep.max_concurrent``
bounds how many trainings run at once.

A sweep lives in ``<storage_path>/sweeps/<name>/``: Tune's experiment state, ``sdo_sweep.json``
(the MLflow parent run, so ``--resume`` continues it), ``trials/<name>-<trial id>/`` (one Ray
Train run per trial) and ``report/`` (tables, Pareto plot). MLflow holds one parent run for the
sweep and one child run per trial, nested with ``mlflow.parentRunId``; a resumed sweep reuses both.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.cluster.launch import checked_cluster_kind
from orchestrator.config import (
    Config,
    ConfigError,
    dump_yaml,
    from_dict,
    get_value,
    to_dict,
)
from orchestrator.run import checkpoints, tracking
from orchestrator.run.directory import check_name, read_run_state, run_dir, storage_root, write_json_atomic
from orchestrator.run.lifecycle import claim_directory
from orchestrator.run.preflight import resolve
from orchestrator.run.storage import is_remote
from orchestrator.sweep.report import (
    TERMINAL,
    build_report,
    summarize_history,
    trial_status,
    write_report,
)
from orchestrator.sweep.space import (
    Axis,
    budget,
    describe,
    num_trials,
    parse_space,
    to_tune,
    trial_config,
)

log = logging.getLogger(__name__)

STATE_FILE = "sdo_sweep.json"
# One image of this size is what the official benchmark (and the paper's GFLOPs column) counts.
PAPER_FLOPS_SIZE = (850, 1040)
MIN_FLOPS_SIDE = 128


class SweepExistsError(FileExistsError):
    """A sweep of that name exists and ``resume`` was not asked for."""


# --------------------------------------------------------------------------------------------
# Where things live
# --------------------------------------------------------------------------------------------


def sweeps_root(cfg: Config) -> Path:
    return storage_root(cfg) / "sweeps"


def sweep_dir(cfg: Config, name: str) -> Path:
    return sweeps_root(cfg) / check_name(name)


def trial_run_name(sweep_name: str, trial_id: str) -> str:
    """The Ray Train run (and MLflow child run) name of one trial."""
    return f"{sweep_name}-{trial_id}"


def flops_size(cfg: Config) -> tuple[int, int]:
    """Reference image (h, w) for GFLOPs: the paper's 850x1040 for COCO-scale configs
    (val_scale >= 800), else a square of the config's validation scale, at least 128 pixels so
    that the stride-64 level is 2x2 (one image's 1x1 map cannot be group-normalised)."""
    if cfg.data.val_scale >= 800:
        return PAPER_FLOPS_SIZE
    side = max(cfg.data.val_scale, MIN_FLOPS_SIDE)
    return side, side


# --------------------------------------------------------------------------------------------
# Tune pieces
# --------------------------------------------------------------------------------------------


EPOCHS_DONE = "epochs_done"


def _with_epochs_done(result: dict) -> dict:
    """ASHA's time attribute: sdo's own count of completed epochs, which the training reports (and which a
    trial resumed from its checkpoint continues); results without it count their 0-based 'epoch' + 1."""
    if EPOCHS_DONE in result or "epoch" not in result:
        return result
    return {**result, EPOCHS_DONE: result["epoch"] + 1}


def _asha_class():
    from ray.tune.schedulers import ASHAScheduler

    class EpochASHA(ASHAScheduler):
        """ASHA over completed epochs that never stops a trial on its last epoch.

        A rung at ``m`` judges a trial after its m-th epoch. Stopping on the final epoch saves
        nothing and would kill the trial before it closes its MLflow run and keeps its best
        checkpoint, so the final report only records the trial's rung value (as a completion).
        """

        def __init__(self, *, budget: int, **kwargs):
            super().__init__(time_attr=EPOCHS_DONE, max_t=budget, stop_last_trials=False, **kwargs)
            self.budget = budget

        def on_trial_result(self, tune_controller, trial, result: dict) -> str:
            result = _with_epochs_done(result)
            if result.get(EPOCHS_DONE, 0) >= self.budget:
                return self.CONTINUE
            return super().on_trial_result(tune_controller, trial, result)

        def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
            super().on_trial_complete(tune_controller, trial, _with_epochs_done(result))

    return EpochASHA


def make_scheduler(cfg: Config):
    """ASHA on ``sweep.metric`` over completed epochs (rungs at grace_period * reduction_factor**k), or FIFO."""
    from ray.tune.schedulers import FIFOScheduler

    s = cfg.sweep
    if s.scheduler == "fifo":
        return FIFOScheduler()
    epochs = budget(cfg)
    if s.grace_period >= epochs:
        raise ConfigError(f"sweep.grace_period={s.grace_period}: must be < the per-trial budget of {epochs} epochs "
                          "(sweep.max_epochs or train.epochs) for ASHA to stop anything")
    return _asha_class()(budget=epochs, grace_period=s.grace_period, reduction_factor=s.reduction_factor)


def make_search(cfg: Config):
    """Tune's grid/random variant generator, or OptunaSearch; both seeded by ``train.seed`` so that the
    same sweep config samples the same trials (an interrupted sweep can be compared with a whole one)."""
    if cfg.sweep.search != "optuna":
        from ray.tune.search import BasicVariantGenerator

        # the concurrency limit goes into the generator: Tune ignores max_concurrent_trials beside one
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.sweep.max_concurrent)
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise ConfigError("sweep.search=optuna: optuna is not installed (pip install 'sdo[optuna]')") from None
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(seed=cfg.train.seed)


def trial_resources():
    """What the trial process itself holds: no CPU (its TorchTrainer's workers need them), 1 MiB of
    memory only because a Tune resource request may not be empty."""
    from ray.tune import PlacementGroupFactory

    return PlacementGroupFactory([{"CPU": 0, "memory": 1 << 20}])


def run_trial(params: dict, *, setup: dict) -> None:
    """The Tune function trainable: train one trial's config with `sdo launch`'s TorchTrainer.

    ``setup``: {'cfg': base config dict, 'name': sweep name, 'epochs', 'parent_run_id',
    'tracking_uri', 'trials_dir'}. A trial restarted by ``--resume`` finds its run directory and
    continues its MLflow run and its latest checkpoint instead of starting a second run.
    """
    from ray import tune

    from orchestrator.sweep.results import EpochReports
    from orchestrator.train.driver import run_training

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(setup["cfg"]), params, epochs=setup["epochs"],
                       parent_run_id=setup["parent_run_id"], tracking_uri=setup["tracking_uri"])
    cfg.train.storage_path = setup["trials_dir"]
    name = trial_run_name(setup["name"], trial_id)
    resume = read_run_state(run_dir(cfg, name)) is not None
    run_training(cfg, name=name, resume=resume, storage_path=setup["trials_dir"],
                 extra_callbacks=[EpochReports()], command="sweep")


# --------------------------------------------------------------------------------------------
# MLflow parent run
# --------------------------------------------------------------------------------------------


def open_parent_run(cfg: Config, axes: list[Axis], *, name: str, directory: Path, resume: bool) -> dict:
    """Create the sweep's MLflow parent run and ``sdo_sweep.json`` (or find them again on resume)."""
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    state_file = directory / STATE_FILE
    state = claim_directory(directory, what="sweep", name=name, uri=uri, resume=resume,
                                     state=json.loads(state_file.read_text()) if state_file.is_file() else None,
                                     exists_error=SweepExistsError)
    if state is not None:
        return state
    parent_cfg = copy.deepcopy(cfg)
    parent_cfg.tracking.parent_run_id = None
    exp_id, run_id = tracking.create_run(parent_cfg, name=name, command="sweep")
    logger = tracking.RunLogger(uri, run_id)
    logger.client.delete_tag(run_id, "rho")  # the trials' rho, not one value, describes a sweep
    logger.tags({"sdo.kind": "sweep", "sdo.sweep.scheduler": cfg.sweep.scheduler,
                 "sdo.sweep.search": cfg.sweep.search})
    from mlflow.entities import Param

    extra = {f"space.{k}": v for k, v in describe(axes).items()}
    extra.update({"sweep.num_trials": num_trials(cfg, axes), "sweep.budget_epochs": budget(cfg),
                  "sweep.flops_size": "x".join(map(str, flops_size(cfg)))})
    logger.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in extra.items()])
    (directory / "config.yaml").write_text(dump_yaml(cfg))
    logger.artifact(directory / "config.yaml")
    state = {"name": name, "sweep_dir": str(directory), "tracking_uri": uri, "experiment_id": exp_id,
             "mlflow_run_id": run_id, "run_url": tracking.run_url(uri, exp_id, run_id)}
    write_json_atomic(directory / STATE_FILE, state)
    return state


def child_runs(state: dict) -> dict[str, list]:
    """Run name -> MLflow child runs of the sweep's parent (more than one would be a duplicate)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=state["tracking_uri"])
    runs = client.search_runs([state["experiment_id"]], f"tags.mlflow.parentRunId = '{state['mlflow_run_id']}'",
                              max_results=10000)
    out: dict[str, list] = {}
    for run in runs:
        out.setdefault(run.data.tags.get("sdo.run_name", run.info.run_name), []).append(run)
    return out


# --------------------------------------------------------------------------------------------
# GFLOPs and rows
# --------------------------------------------------------------------------------------------


def model_gflops(cfg: Config, size: tuple[int, int], cache: dict) -> float:
    """GFLOPs of ``cfg``'s model on one image of ``size`` (model.flops); cached per model config."""
    model_cfg = dataclasses.replace(cfg.model, checkpoint=None,
                                    backbone=dataclasses.replace(cfg.model.backbone, weights=None))
    key = json.dumps(dataclasses.asdict(model_cfg), sort_keys=True)
    if key not in cache:
        from model import build
        from model.flops import count_flops

        network, _, _ = build(model_cfg, cfg.loss)
        cache[key] = float(count_flops(network, *size)["total_gflops"])
    return cache[key]


def _history(frame) -> list[dict]:
    if frame is None or len(frame) == 0:
        return []
    return frame.to_dict("records")


def collect_rows(cfg: Config, axes: list[Axis], experiment_path: Path, *, name: str,
                 flops_cache: dict | None = None) -> list[dict]:
    """One report row per trial of the Tune experiment at ``experiment_path``."""
    from ray.tune import ExperimentAnalysis

    analysis = ExperimentAnalysis(str(experiment_path), default_metric=cfg.sweep.metric, default_mode=cfg.sweep.mode)
    frames = analysis.trial_dataframes
    epochs, size, cache = budget(cfg), flops_size(cfg), {} if flops_cache is None else flops_cache
    shown = ["model.rho", "loss.enc_aux_coef", "loss.mask_prediction_coef", "loss.cls_coef", "loss.bbox_coef",
             "loss.giou_coef", *[a.key for a in axes]]
    rows = []
    for trial in sorted(analysis.trials, key=lambda t: t.trial_id):
        params = {k: trial.config[k] for k in (a.key for a in axes) if k in trial.config}
        trial_cfg = trial_config(cfg, params, epochs=epochs)
        summary = summarize_history(_history(frames.get(trial.trial_id)), cfg.sweep.metric, cfg.sweep.mode)
        rows.append({
            "trial": trial.trial_id,
            "run_name": trial_run_name(name, trial.trial_id),
            "status": trial_status(trial.status, summary["epochs"], epochs),
            "params": {k: get_value(trial_cfg, k) for k in dict.fromkeys(shown)},
            **summary,
            "gflops": model_gflops(trial_cfg, size, cache),
        })
    return rows


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


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


def _finish_child_runs(state: dict, rows: list[dict], best: dict | None) -> None:
    """Tag each trial's child run with its trial id and outcome; close runs of trials stopped early."""
    runs = child_runs(state)
    for row in rows:
        found = runs.get(row["run_name"], [])
        row["run_id"] = found[0].info.run_id if found else None
        for run in found:
            logger = tracking.RunLogger(state["tracking_uri"], run.info.run_id)
            logger.tags({"sdo.trial_id": row["trial"], "sdo.sweep.status": row["status"],
                         "sdo.sweep.best": str(best is not None and best["trial"] == row["trial"]).lower()})
            if row["gflops"] is not None:
                logger.metrics({"gflops": row["gflops"]}, step=0)
            if row["status"] == "stopped early" and run.info.status == "RUNNING":
                tracking.set_status(state["tracking_uri"], run.info.run_id, "KILLED")


def run_sweep(cfg: Config, *, name: str, resume: bool = False, trainable: Callable | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """Run (or with ``resume`` continue) the sweep ``cfg.sweep`` over ``cfg`` on local/attached Ray.

    trainable: the Tune function run per trial, ``f(params, *, setup)``; default :func:`run_trial`.
    Returns {'name', 'rows', 'best', 'savings', 'report' (text), 'paths', 'interrupted', 'failed' (trials
    that errored), 'mlflow_run_id', 'sweep_dir', 'tracking_uri', 'experiment_id'}.
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
    cfg = resolve(cfg)  # absolute data and storage paths: Tune runs each trial in its own working directory
    directory = sweep_dir(cfg, name)
    state = open_parent_run(cfg, axes, name=name, directory=directory, resume=resume)
    setup = {"cfg": to_dict(cfg), "name": name, "epochs": budget(cfg), "parent_run_id": state["mlflow_run_id"],
             "tracking_uri": state["tracking_uri"], "trials_dir": str(directory / "trials")}
    wrapped = tune.with_resources(tune.with_parameters(trainable or run_trial, setup=setup), trial_resources())
    echo(f"sdo: sweep {name}: {num_trials(cfg, axes)} trials x {budget(cfg)} epochs, "
         f"{cfg.sweep.scheduler} on {cfg.sweep.metric}; MLflow parent run {state['run_url']}")
    try:
        with ray_session(cfg):
            _tuner(cfg, axes, wrapped, name=name, experiment_path=directory, resume=resume).fit()
            rows = collect_rows(cfg, axes, directory, name=name)
    except BaseException:
        tracking.set_status(state["tracking_uri"], state["mlflow_run_id"], "FAILED")
        raise
    interrupted = any(r["status"] not in TERMINAL for r in rows)
    if interrupted:  # trials stopped by the interrupt may have left a checkpoint Ray had not registered
        for trial_dir in (directory / "trials").glob("*"):
            checkpoints.remove_unregistered(trial_dir)
    report = build_report(rows, budget=budget(cfg), metric=cfg.sweep.metric, mode=cfg.sweep.mode,
                          flops_size=flops_size(cfg))
    _finish_child_runs(state, rows, report["best"])
    paths = write_report(rows, report, directory / "report", title=f"sweep {name}: AP vs GFLOPs")
    logger = tracking.RunLogger(state["tracking_uri"], state["mlflow_run_id"])
    logger.artifact(directory / "report", "report")
    savings = report["savings"]
    logger.metrics({"epochs_run": savings["epochs_run"], "epochs_saved": savings["epochs_saved"],
                    "trials_stopped_early": savings["stopped_early"]}, step=0)
    best = report["best"]
    if best is not None:
        logger.tags({"best_trial": best["trial"], "best_run_id": best.get("run_id") or "",
                     f"best_{cfg.sweep.metric}": best.get(cfg.sweep.metric)})
        logger.metrics({f"best_{cfg.sweep.metric}": best[cfg.sweep.metric]}, step=0)
    tracking.set_status(state["tracking_uri"], state["mlflow_run_id"], "KILLED" if interrupted else "FINISHED")
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
    echo(f"sdo: report in {directory / 'report'}; MLflow parent run {state['run_url']}")
    return {"name": name, "rows": rows, "best": best, "savings": savings, "report": report["text"], "paths": paths,
            "interrupted": interrupted, "failed": failed, "mlflow_run_id": state["mlflow_run_id"], "sweep_dir": str(directory),
            "tracking_uri": state["tracking_uri"], "experiment_id": state["experiment_id"]}


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


def sweep(cfg: Config, *, name: str, cluster: str | None = None, resume: bool = False, dry_run: bool = False,
          echo: Callable[[str], None] = print) -> Any:
    """Run the sweep where ``cluster`` (default ``cfg.cluster.address``) says.

    local -> :func:`run_sweep`'s summary; http(s) -> 0 once the Ray Job succeeded; *.yaml -> the
    KubeRay launcher's exit status. The search space is checked first in every case.
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
                             "space": describe(axes)}, indent=2))
            return 0
        return run_sweep(cfg, name=name, resume=resume, echo=echo)
    if kind == "ray-jobs":
        return submit_sweep_job(cfg, address=address, name=name, resume=resume, dry_run=dry_run, echo=echo)
    if resume:
        raise ConfigError(f"--resume with --cluster {address}: a RayJob always starts its sweep afresh; "
                          "resume on the cluster with --cluster http(s)://HEAD:8265 instead")
    from orchestrator.cluster.kuberay.launcher import launch_on_kubernetes

    return launch_on_kubernetes(cfg, address, name=name, command="sweep", dry_run=dry_run)


def job_main(argv: list[str] | None = None) -> int:
    """Entry point of a Ray Job: config from the runtime env, sweep on the cluster the job runs in."""
    from orchestrator.cluster.jobs import job_setup

    cfg, args = job_setup("python -m orchestrator.sweep", argv)
    summary = run_sweep(cfg, name=args.name, resume=args.resume)
    return 130 if summary["interrupted"] else 1 if summary["failed"] else 0


"""The driver side of one Ray Train run: an opened run -> TorchTrainer -> fit -> best checkpoint, plots, status.

A run lives in ``<storage_path>/<name>`` (orchestrator.run): Ray Train's checkpoints, ``sdo_run.json``
(its RunIdentity, so a restart or ``--resume`` continues the same MLflow run), eval json and plots.
The run is preflighted and its MLflow run opened (orchestrator.run.lifecycle) before any worker
starts; workers only attach to it.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable

import ray.train
from ray.train.torch import TorchConfig

from orchestrator.config import Config, to_dict
from orchestrator.run.directory import clear_stop, local_dir, stop_requested
from orchestrator.run.errors import RunInterrupted
from orchestrator.run.identity import RunIdentity
from orchestrator.run.storage import ray_storage
from orchestrator.run.tracking import set_status
from orchestrator.train.checkpointer import Checkpointer
from orchestrator.train.console import Console
from orchestrator.train.evaluation import EVAL_KEYS
from orchestrator.train.fault_tolerance import SdoTorchTrainer, worker_error
from orchestrator.train.worker import train_loop_per_worker

log = logging.getLogger(__name__)


def make_trainer(cfg: Config, run: RunIdentity, *, extra_callbacks: Iterable = (), progress=None) -> SdoTorchTrainer:
    """A TorchTrainer for the resolved ``cfg`` of the opened ``run``.

    Ray Train restores from ``<storage_path>/<name>`` by itself when that run has checkpoints, so
    a resumed trainer starts from the latest one. ``progress``: the console's queue, fed by rank 0.
    """
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    storage_path, storage_filesystem = ray_storage(run.storage)
    return SdoTorchTrainer(
        train_loop_per_worker,
        run_dir=run.directory,
        train_loop_config={"cfg": to_dict(cfg), "run": run, "progress": progress},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=Checkpointer(cfg.checkpoint, run.directory).ray_config(),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=list(extra_callbacks),
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def finalize(cfg: Config, run: RunIdentity, result, *, log_model: bool = True) -> dict:
    """After fit: point ``<run dir>/best`` at the best checkpoint, log its weights as the MLflow Model (unless
    ``log_model`` is false: a sweep logs models for the trials it keeps, when it ends) and the plots, close the
    run -> the result summary."""
    from orchestrator.train import plots

    logger = run.logger(grouped=True)
    best = result.get_best_checkpoint("AP", "max") if result.best_checkpoints else None
    best_path, mlflow_model = None, {}
    if best is not None:
        best_path = Checkpointer(cfg.checkpoint, run.directory).link_best(best.path)
        if log_model:
            mlflow_model = log_best_model(run, best_path, cfg.tracking.register_as)
    history = logger.history(sorted(set(logger.metric_keys())))
    if history:
        drawn = local_dir(run.directory) / "plots"
        plots.loss_curves(history, drawn / "loss_curves.png")
        plots.ap_per_epoch(history, [], drawn / "ap_per_epoch.png")  # val/* is stepped by epoch
        logger.artifact(drawn / "loss_curves.png", "plots")
        logger.artifact(drawn / "ap_per_epoch.png", "plots")
    set_status(run.tracking_uri, run.run_id, "FINISHED")
    metrics = dict(result.metrics or {})
    return {
        "name": run.name,
        "run": run,
        "run_dir": run.directory,
        "metrics": metrics,
        "AP": metrics.get("AP"),
        "eval": {k: metrics[k] for k in EVAL_KEYS if k in metrics},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": str(best_path) if best_path else None,
        "mlflow_run_id": run.run_id,
        "run_url": run.url,
        "model_uri": mlflow_model.get("model_uri"),
        "registered_model_version": mlflow_model.get("version"),
    }


def log_best_model(run: RunIdentity, best_path, register_as: str | None) -> dict:
    """The best checkpoint's weights as the run's MLflow Model (registered as ``register_as`` when set)."""
    from orchestrator.run import checkpoints
    from orchestrator.run.mlflow_model import log_detector_model

    state = checkpoints.load(best_path, map_location="cpu")
    return log_detector_model(run.tracking_uri, run.run_id, state["model"], state["config"], register_as=register_as)


def run_training(cfg: Config, run: RunIdentity, *, extra_callbacks: Iterable = (), command: str = "launch",
                 console: bool = False, log_model: bool = True) -> dict:
    """Train the opened ``run`` (orchestrator.run.lifecycle.open_run) of the preflighted ``cfg`` to the end,
    restarting from checkpoints on infrastructure failures -> result summary.

    Ray must be initialised (see ``orchestrator.cluster.local.ray_session``). The summary holds 'AP',
    'metrics' (last report), 'checkpoint', 'best_checkpoint', 'mlflow_run_id', 'run_url', 'run'. The MLflow
    run is marked FINISHED after the best checkpoint and the plots are logged; FAILED on an error, which
    is re-raised as the worker's own error when a worker failed (so its type says bad input or not);
    KILLED on Ctrl-C, which raises RunInterrupted once the run has stopped at a checkpoint.
    ``console``: show progress and epoch lines on stdout and keep all output in ``<run dir>/log.txt``.
    ``log_model``: log the best weights as the run's MLflow Model (a sweep's trial does not: see finalize).
    """
    with contextlib.ExitStack() as stack:
        shown = stack.enter_context(Console(local_dir(run.directory))) if console else None
        if shown is not None:
            shown.echo(f"sdo: run {run.name} in {run.directory}")
            shown.echo(f"sdo: MLflow run: {run.url}")
        log_model_size(cfg, run)
        trainer = make_trainer(cfg, run, extra_callbacks=extra_callbacks,
                               progress=shown.queue if shown is not None else None)
        return _fit(trainer, cfg, run, command=command, log_model=log_model)


def log_model_size(cfg: Config, run: RunIdentity) -> None:
    """``model/GFLOPs`` (one image at the paper's 850x1040, whatever size the run uses: train.cost; tag
    ``sdo.flops_size``) and ``model/params_M`` of a new run."""
    from orchestrator.train.cost import FLOPS_SIZE, FLOPS_TAG, bare_model_config, reference_gflops, size_name

    logger = run.logger()
    if "model/GFLOPs" in logger.metric_keys():
        return
    from model.build import build_model

    try:
        gflops = reference_gflops(cfg.model)
    except Exception as err:  # noqa: BLE001 - a size column is not worth failing a run for
        log.warning("GFLOPs not counted (%s: %s)", type(err).__name__, err)
        gflops = None
    params = sum(p.numel() for p in build_model(bare_model_config(cfg.model)).parameters()) / 1e6
    logger.metrics({"model/GFLOPs": gflops, "model/params_M": params}, step=0)
    logger.tags({FLOPS_TAG: size_name(FLOPS_SIZE)})


def _fit(trainer, cfg: Config, run: RunIdentity, *, command: str, log_model: bool) -> dict:
    run_dir = run.location()
    try:
        result = trainer.fit()
    except BaseException as err:
        Checkpointer(cfg.checkpoint, run_dir).remove_unregistered()
        if trainer.interrupts or isinstance(err, KeyboardInterrupt):
            clear_stop(run_dir)
            set_status(run.tracking_uri, run.run_id, "KILLED")
            raise RunInterrupted(run.name, command) from None
        set_status(run.tracking_uri, run.run_id, "FAILED")
        cause = worker_error(err)
        if cause is err:
            raise
        raise cause from err
    if stop_requested(run_dir):
        clear_stop(run_dir)
        set_status(run.tracking_uri, run.run_id, "KILLED")
        raise RunInterrupted(run.name, command)
    return finalize(cfg, run, result, log_model=log_model)

"""Config -> Ray Train TorchTrainer -> fit -> MLflow run with checkpoints and plots.

A run lives in ``<storage_path>/<name>``: Ray Train's checkpoints, ``sdo_run.json`` (the MLflow run
id, so a restart or ``--resume`` continues the same run), eval json and plots. The MLflow run is
created here, by the driver, before any worker starts; workers only attach to it.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import ray.train
from ray.train.torch import TorchConfig, TorchTrainer

from orchestrator import checkpoints, tracking
from orchestrator.config import Config, ConfigError, to_dict, validate
from orchestrator.train_loop import AP_KEYS, train_loop_per_worker

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class RunExistsError(FileExistsError):
    """A run of that name exists and ``resume`` was not asked for."""


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' or '-' (at most 128, no leading symbol)")
    return name


def _absolute_source(value: str) -> str:
    """Shard sources that are local paths become absolute: Ray workers do not share the driver's cwd."""
    if "://" in value or value.startswith("pipe:"):
        return value
    return str(Path(value).expanduser().resolve())


def resolve(cfg: Config, storage_path: str | None = None) -> Config:
    """A copy of ``cfg`` with absolute storage and data paths (what the workers and MLflow see)."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train), data=dataclasses.replace(cfg.data),
                              tracking=dataclasses.replace(cfg.tracking))
    cfg.train.storage_path = str(Path(storage_path or cfg.train.storage_path).expanduser().resolve())
    cfg.data.train_shards = _absolute_source(cfg.data.train_shards)
    cfg.data.val_shards = _absolute_source(cfg.data.val_shards)
    validate(cfg)
    return cfg


def run_dir(cfg: Config, name: str) -> Path:
    return Path(cfg.train.storage_path).expanduser().resolve() / check_name(name)


def _check_shards(cfg: Config) -> None:
    """Fail before starting Ray when local shard directories are missing."""
    for key in ("train_shards", "val_shards"):
        source = getattr(cfg.data, key)
        if "://" in source or source.startswith("pipe:") or "{" in source:
            continue
        path = Path(source)
        if not (path / "index.json").is_file() and not (path.is_file() and path.suffix == ".json"):
            raise ConfigError(f"data.{key}={source!r}: no shard index (index.json) there; "
                              "write shards with `sdo data shard` first")


def preflight(cfg: Config, *, name: str, resume: bool = False, storage_path: str | None = None) -> Config:
    """Every check that needs no Ray (name, run existence, tracking store, shards) -> the resolved config.

    Cheap, so launchers call it before starting Ray; it writes nothing but the embedded store's directory.
    """
    cfg = resolve(cfg, storage_path)
    directory = run_dir(cfg, name)
    if resume and checkpoints.read_run_state(directory) is None:
        raise FileNotFoundError(f"--resume: no run named {name!r} in {cfg.train.storage_path}")
    if directory.exists() and not resume:
        raise RunExistsError(f"run {name!r} already exists in {directory.parent}; pass --resume to continue it "
                             "or choose another --name")
    tracking.check_reachable(tracking.tracking_uri(cfg))
    _check_shards(cfg)
    return cfg


def open_run(cfg: Config, *, name: str, resume: bool = False, parent_run_id: str | None = None) -> dict:
    """Create (or with ``resume``, find again) the run directory and its MLflow run -> run info dict.

    The tracking store is checked first: nothing is written to the run directory when it is unreachable.
    """
    if parent_run_id:
        cfg.tracking.parent_run_id = parent_run_id
    directory = run_dir(cfg, name)
    uri = tracking.tracking_uri(cfg)
    tracking.check_reachable(uri)
    state = tracking.claim_directory(directory, what="run", name=name, uri=uri, resume=resume,
                                     state=checkpoints.read_run_state(directory), exists_error=RunExistsError)
    if state is not None:
        return state
    exp_id, run_id = tracking.create_run(cfg, name=name)
    state = {"name": name, "run_dir": str(directory), "tracking_uri": uri, "experiment_id": exp_id,
             "mlflow_run_id": run_id, "run_url": tracking.run_url(uri, exp_id, run_id)}
    checkpoints.write_run_state(directory, state)
    (directory / "config.yaml").write_text(_yaml(cfg))
    tracking.RunLogger(uri, run_id).artifact(directory / "config.yaml")
    return state


def _yaml(cfg: Config) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def make_trainer(cfg: Config, *, name: str, storage_path: str | None = None, extra_callbacks: Iterable = (),
                 mlflow_parent_run_id: str | None = None, resume: bool = False) -> TorchTrainer:
    """A TorchTrainer for ``cfg`` whose MLflow run already exists (created here, or found with ``resume``).

    Ray Train restores from ``<storage_path>/<name>`` by itself when that run has checkpoints, so
    a resumed trainer starts from the latest one. The run info is in ``<run dir>/sdo_run.json``.
    """
    cfg = preflight(cfg, name=name, resume=resume, storage_path=storage_path)
    run = open_run(cfg, name=name, resume=resume, parent_run_id=mlflow_parent_run_id)
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "run": run},
        scaling_config=ray.train.ScalingConfig(num_workers=t.num_workers, use_gpu=t.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=cfg.train.storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints,
                                                         checkpoint_score_attribute="AP",
                                                         checkpoint_score_order="max"),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            callbacks=list(extra_callbacks),
        ),
        torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
    )


def finalize(cfg: Config, run: dict, result) -> dict:
    """After fit: keep the best checkpoint as ``<run dir>/best``, log it and the plots, close the run."""
    from orchestrator import plots

    uri, logger = run["tracking_uri"], tracking.RunLogger(run["tracking_uri"], run["mlflow_run_id"])
    directory = Path(run["run_dir"])
    best = result.get_best_checkpoint("AP", "max") if result.best_checkpoints else None
    best_path = None
    if best is not None:
        best_path = directory / "best"
        if best_path.exists():
            shutil.rmtree(best_path)
        shutil.copytree(best.path, best_path)
        if cfg.tracking.log_checkpoints:
            logger.artifact(best_path, "checkpoints/best")
    history = logger.history(sorted(set(logger.metric_keys())))
    if history:
        plots.loss_curves(history, directory / "plots" / "loss_curves.png")
        plots.ap_per_epoch(history, history.get("epoch", []), directory / "plots" / "ap_per_epoch.png")
        logger.artifact(directory / "plots" / "loss_curves.png", "plots")
        logger.artifact(directory / "plots" / "ap_per_epoch.png", "plots")
    tracking.set_status(uri, run["mlflow_run_id"], "FINISHED")
    metrics = dict(result.metrics or {})
    return {
        "name": run["name"],
        "run_dir": str(directory),
        "metrics": metrics,
        "AP": metrics.get("AP"),
        "eval": {k: metrics[k] for k in AP_KEYS if k in metrics},
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": str(best_path) if best_path else None,
        "mlflow_run_id": run["mlflow_run_id"],
        "experiment_id": run["experiment_id"],
        "tracking_uri": uri,
        "run_url": run["run_url"],
    }


def run_info(cfg: Config, name: str, storage_path: str | None = None) -> dict | None:
    """The run's identity written by :func:`make_trainer` (run_dir, tracking_uri, experiment_id,
    mlflow_run_id, run_url), or None when there is no such run."""
    return checkpoints.read_run_state(run_dir(resolve(cfg, storage_path), name))


def run_training(cfg: Config, *, name: str, resume: bool = False, storage_path: str | None = None,
                 extra_callbacks: Iterable = (), mlflow_parent_run_id: str | None = None) -> dict:
    """Train to the end (restarting from checkpoints on worker failures) -> result summary.

    Ray must be initialised (see ``orchestrator.launch.ray_session``). The summary holds 'AP',
    'metrics' (last report), 'checkpoint', 'best_checkpoint', 'mlflow_run_id', 'run_url'. The MLflow
    run is marked FINISHED after the best checkpoint and the plots are logged, FAILED on an error.
    """
    trainer = make_trainer(cfg, name=name, storage_path=storage_path, extra_callbacks=extra_callbacks, resume=resume,
                           mlflow_parent_run_id=mlflow_parent_run_id)
    resolved = resolve(cfg, storage_path)
    run = run_info(cfg, name, storage_path)
    try:
        result = trainer.fit()
    except BaseException:
        tracking.set_status(run["tracking_uri"], run["mlflow_run_id"], "FAILED")
        raise
    if result.error is not None:
        tracking.set_status(run["tracking_uri"], run["mlflow_run_id"], "FAILED")
        raise RuntimeError(f"training run {name!r} failed: {result.error}")
    return finalize(resolved, run, result)

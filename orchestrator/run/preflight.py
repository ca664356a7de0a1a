"""Every check of a run that needs no Ray, and the resolved config the workers and MLflow see.

Cheap, so the launcher calls it once, before starting Ray: bad input costs nothing. The config itself
was validated when it was loaded (orchestrator.config.load_config); nothing here validates it again.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from orchestrator.config import Config, ConfigError
from orchestrator.run import tracking
from orchestrator.run.directory import RunExistsError, run_dir
from orchestrator.run.identity import read_identity
from orchestrator.run.storage import location


def _absolute_source(value: str) -> str:
    """Shard sources that are local paths become absolute: Ray workers do not share the driver's cwd."""
    if "://" in value or value.startswith("pipe:"):
        return value
    return str(Path(value).expanduser().resolve())


def with_absolute_paths(cfg: Config, storage_path: str | None = None) -> Config:
    """A copy of ``cfg`` with absolute storage and data paths (what the workers and MLflow see); ``storage_path``
    replaces ``train.storage_path``."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train), data=dataclasses.replace(cfg.data),
                              tracking=dataclasses.replace(cfg.tracking), model=dataclasses.replace(cfg.model))
    try:
        cfg.train.storage_path = str(location(storage_path or cfg.train.storage_path))
    except ValueError as err:
        raise ConfigError(f"train.storage_path: {err}") from None
    cfg.data.train_shards = _absolute_source(cfg.data.train_shards)
    cfg.data.val_shards = _absolute_source(cfg.data.val_shards)
    if cfg.model.init_from and not cfg.model.init_from.startswith(("runs:/", "models:/")):
        cfg.model.init_from = str(Path(cfg.model.init_from).expanduser().resolve())
    return cfg


def check_shards(cfg: Config) -> None:
    """Fail before starting Ray when a shard source does not resolve (the loader's own resolution:
    folder, index.json path or URL, single .tar, brace pattern) or holds category ids that
    ``model.num_classes`` cannot represent (they would fail only inside the loss, on the workers)."""
    from pipelines.errors import DataError
    from pipelines.sources import max_category_id, resolve_shards

    for key in ("train_shards", "val_shards"):
        source = getattr(cfg.data, key)
        try:
            shard_set = resolve_shards(source)
        except (DataError, OSError) as err:
            raise ConfigError(f"data.{key}={source!r}: {err}") from None
        if not shard_set.shards:
            raise ConfigError(f"data.{key}={source!r}: its shard index lists no shards")
        largest = max_category_id(shard_set.index)
        if largest is not None and largest >= cfg.model.num_classes:
            raise ConfigError(f"data.{key}={source!r}: the shards hold category ids up to {largest}, but "
                              f"model.num_classes={cfg.model.num_classes} (labels must be < num_classes; "
                              f"set model.num_classes >= {largest + 1})")


def preflight(cfg: Config, *, name: str, resume: bool = False, storage_path: str | None = None) -> Config:
    """Every check that needs no Ray (name, run existence, tracking store, shards) -> the resolved config.

    It writes nothing but the embedded store's directory.
    """
    cfg = with_absolute_paths(cfg, storage_path)
    uri = tracking.tracking_uri(cfg)  # first: it refuses object storage without a tracking server, offline
    directory = run_dir(cfg, name)
    if resume and read_identity(directory) is None:
        raise FileNotFoundError(f"--resume: no run named {name!r} in {cfg.train.storage_path}")
    if directory.exists() and not resume:
        raise RunExistsError(f"run {name!r} already exists in {directory.parent}; pass --resume to continue it "
                             "or choose another --name")
    tracking.check_reachable(uri)
    check_shards(cfg)
    if cfg.model.init_from and not cfg.model.init_from.startswith(("runs:/", "models:/")) \
            and not Path(cfg.model.init_from).exists():
        raise FileNotFoundError(f"model.init_from={cfg.model.init_from!r}: no such checkpoint file")
    return cfg

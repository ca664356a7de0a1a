"""Shared by the training tests: a tiny synthetic shard set and a tiny 2-worker CPU config."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import psutil
import yaml

from orchestrator.config import load_config


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_shards(root: Path, num_train: int = 16, num_val: int = 8, size: int = 96) -> dict[str, Path]:
    """Synthetic COCO -> WebDataset shards under ``root`` -> {'train': dir, 'val': dir}."""
    from pipelines.shard import write_shards
    from pipelines.synth import generate

    coco = root / "coco"
    generate(coco, num_train, num_val, size=size, seed=0)
    out = {}
    for split in ("train", "val"):
        out[split] = root / "shards" / split
        write_shards(coco / split, coco / "annotations" / f"instances_{split}.json", out[split], shard_size=8,
                     progress=False)
    return out


def tiny_config(path: Path, shards: dict[str, Path], storage: Path, checkpoint: dict | None = None,
                **train_overrides):
    """A YAML config with a tiny Sparse DETR (rho > 0, encoder aux loss; a narrow ResNet-18: checkpoints of 3 MB,
    not 130) -> (path, Config).
    ``checkpoint``: the config's checkpoint section; other keywords override the train section."""
    values = {
        "model": {"backbone": {"name": "resnet18", "train": True, "width": 16}, "hidden_dim": 32, "nheads": 2, "enc_layers": 2,
                  "dec_layers": 2, "dim_feedforward": 64, "num_queries": 20, "enc_n_points": 2, "dec_n_points": 2,
                  "rho": 0.3, "use_enc_aux_loss": True, "eff_query_init": True, "eff_specific_head": True},
        "data": {"train_shards": str(shards["train"]), "val_shards": str(shards["val"]), "batch_size": 2,
                 "num_workers": 0, "shuffle_buffer": 8, "train_scales": [64, 80], "max_size": 96, "val_scale": 64,
                 "random_crop": False},
        "train": {"epochs": 2, "num_workers": 2, "max_steps_per_epoch": 2, "log_every": 1, "lr_drop": 1,
                  "storage_path": str(storage), "max_failures": 2, "scale_lr": True, **train_overrides},
        "checkpoint": dict(checkpoint or {}),
        "eval": {"every": 1, "dam_images": 1, "pred_images": 1},  # drawn at every eval: few, to stay cheap
        "cluster": {"num_cpus": 2, "dashboard_port": free_port()},
    }
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path, load_config(path)


def session_processes(session: int) -> list[psutil.Process]:
    """Live (non-zombie) processes whose session id is ``session``."""
    alive = []
    for process in psutil.process_iter(["pid"]):
        try:
            if os.getsid(process.pid) == session and process.status() != psutil.STATUS_ZOMBIE:
                alive.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return alive


def left_in_session(session: int, timeout: float = 30) -> list[psutil.Process]:
    """Processes of that session still alive after ``timeout`` (the reaper needs a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = session_processes(session)
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)

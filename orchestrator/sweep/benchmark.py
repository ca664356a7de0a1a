"""`sdo bench sweep`: a many-trial sweep on the embedded cluster, and whether it leaks (here, beside the sweep it
measures: bench/ and sweep/ are peers).

A real `sdo sweep` (orchestrator.sweep.tuner.run_sweep: every trial a Ray Train run with its MLflow child run,
checkpoints and evaluation) of a tiny Sparse DETR on synthetic images of ``image_size`` pixels, ``trials``
trials of 1-2 epochs (ASHA: grace 1 of a 2-epoch budget) over rho and the encoder's auxiliary-loss weight,
``concurrent`` at once. Measured:

- wall time, trials per minute, how each trial ended;
- the driver process: RSS and open file descriptors at the start, at the end and their peak (sampled every
  few seconds), the growth over the second half of the sweep (a leak grows; warming up does not);
- Ray after the sweep: placement groups and actors still alive (none should be);
- MLflow: runs, metric / param / tag rows and the store's bytes, per trial;
- disk: bytes of the sweep's folder (trials, checkpoints, report) and of MLflow's artifacts, per trial;
- MLflow Models logged (the front's trials only) and checkpoint folders left (none for trials stopped early).
"""
from __future__ import annotations

import os
import platform
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path

import yaml

SAMPLE_S = 5.0


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) if path.exists() else 0


class Sampler:
    """RSS (MiB) and open file descriptors of this process every ``period`` seconds, in a thread."""

    def __init__(self, period: float = SAMPLE_S):
        import psutil

        self.process, self.period, self.samples = psutil.Process(), period, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> dict:
        return {"t": time.monotonic(), "rss_mib": self.process.memory_info().rss / 2**20, "fds": self.process.num_fds()}

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.samples.append(self.sample())

    def __enter__(self):
        self.samples.append(self.sample())
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.samples.append(self.sample())

    def summary(self, key: str) -> dict:
        values = [s[key] for s in self.samples]
        half = values[len(values) // 2:]
        return {"start": round(values[0], 1), "end": round(values[-1], 1), "peak": round(max(values), 1),
                "second_half_growth": round(half[-1] - half[0], 1) if len(half) > 1 else 0.0,
                "samples": len(values)}


def bench_config(root: Path, shards: dict, *, trials: int, concurrent: int, image_size: int) -> Path:
    """The sweep YAML: a tiny model, 1-worker trials, ASHA over a 2-epoch budget, ``concurrent`` at once."""
    rhos = [0.1, 0.2, 0.3, 0.5]
    values = {
        "model": {"backbone": {"name": "resnet18"}, "hidden_dim": 32, "nheads": 2, "enc_layers": 1, "dec_layers": 1,
                  "dim_feedforward": 64, "num_queries": 10, "enc_n_points": 2, "dec_n_points": 2,
                  "num_feature_levels": 2, "rho": 0.3, "use_enc_aux_loss": True, "eff_query_init": True},
        "data": {"train_shards": str(shards["train"]), "val_shards": str(shards["val"]), "batch_size": 2,
                 "num_workers": 0, "shuffle_buffer": 4, "train_scales": [image_size], "max_size": image_size,
                 "val_scale": image_size, "random_crop": False},
        "train": {"epochs": 2, "num_workers": 1, "max_steps_per_epoch": 2, "log_every": 1, "lr_drop": 2,
                  "storage_path": str(root / "runs"), "max_failures": 0},
        "checkpoint": {"keep": 1},
        "eval": {"every": 1, "dam_images": 0, "pred_images": 0},
        "tracking": {"system_metrics": False},
        "cluster": {"num_cpus": concurrent},
        "sweep": {"space": {"model.rho": {"grid": rhos}, "loss.enc_aux_coef": {"uniform": [0.5, 2.0]}},
                  "num_samples": max(1, -(-trials // len(rhos))), "max_concurrent": concurrent, "scheduler": "asha",
                  "max_epochs": 2, "grace_period": 1, "reduction_factor": 2, "log_models": "front"},
    }
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump(values, sort_keys=False))
    return path


def _write_shards(root: Path, image_size: int) -> dict:
    from pipelines.shard import write_shards
    from pipelines.synth import generate

    generate(root / "coco", 8, 4, size=image_size, seed=0)
    out = {}
    for split in ("train", "val"):
        out[split] = root / "shards" / split
        write_shards(root / "coco" / split, root / "coco" / "annotations" / f"instances_{split}.json", out[split],
                     shard_size=4, progress=False)
    return out


def _mlflow_rows(db: Path) -> dict:
    with sqlite3.connect(db) as connection:
        count = {table: connection.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                 for table in ("runs", "metrics", "params", "tags")}
    return count


def _alive_in_ray() -> dict:
    from ray.util.state import list_actors, list_placement_groups

    groups = [g for g in list_placement_groups(limit=10000) if g.state != "REMOVED"]
    actors = [a for a in list_actors(limit=10000) if a.state != "DEAD"]
    return {"placement_groups_alive": len(groups), "actors_alive": len(actors),
            "actor_classes_alive": sorted({a.class_name for a in actors})}


def run(*, trials: int = 200, concurrent: int = 4, image_size: int = 32, root: str | None = None,
        progress: bool = True) -> dict:
    """Run the sweep and measure it -> the JSON-able report (see the module docstring)."""
    import ray

    from orchestrator.cluster.local import ray_session
    from orchestrator.config import load_config
    from orchestrator.sweep.tuner import run_sweep

    workdir = Path(root) if root else Path(tempfile.mkdtemp(prefix="sdo-bench-sweep-"))
    workdir.mkdir(parents=True, exist_ok=True)
    shards = _write_shards(workdir, image_size)
    cfg = load_config(str(bench_config(workdir, shards, trials=trials, concurrent=concurrent, image_size=image_size)))
    load_before = [round(x, 2) for x in os.getloadavg()]
    lines: list[str] = []
    echo = print if progress else lines.append
    started = time.monotonic()
    with Sampler() as sampler:
        with ray_session(cfg):
            summary = run_sweep(cfg, name="bench", echo=echo)
            time.sleep(2.0)  # Ray removes a finished trainer's placement group asynchronously
            alive = _alive_in_ray()
        ray_up = ray.is_initialized()
    wall = time.monotonic() - started
    rows = summary["rows"]
    sweep_dir = Path(summary["sweep_dir"])
    db = workdir / "runs" / "mlflow" / "mlflow.db"
    mlflow_rows = _mlflow_rows(db)
    n = len(rows)
    disk = {"sweep_dir": _tree_bytes(sweep_dir), "mlflow_artifacts": _tree_bytes(workdir / "runs" / "mlflow" / "artifacts"),
            "mlflow_db": db.stat().st_size}
    statuses = {s: sum(r["status"] == s for r in rows) for s in sorted({r["status"] for r in rows})}
    checkpoints_left = {r["status"]: 0 for r in rows}
    for r in rows:
        checkpoints_left[r["status"]] += len(list((sweep_dir / "trials" / r["run_name"]).glob("checkpoint_*")))
    epochs = [r["epochs"] for r in rows]
    return {
        "benchmark": "sweep",
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "load_average_1_5_15min": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]}},
        "config": {"trials": n, "concurrent": concurrent, "image_size": image_size, "epochs_per_trial": "1-2 (ASHA)",
                   "model": "resnet18, hidden 32, 1+1 layers", "root": str(workdir)},
        "wall_seconds": round(wall, 1), "trials_per_minute": round(n / wall * 60, 2),
        "mean_epochs_per_trial": round(statistics.mean(epochs), 2) if epochs else 0,
        "trials_by_status": statuses, "failed": summary["failed"], "interrupted": summary["interrupted"],
        "driver_rss_mib": sampler.summary("rss_mib"), "driver_open_fds": sampler.summary("fds"),
        "ray_after_sweep": {**alive, "ray_still_initialised_after_session": ray_up},
        "mlflow": {**mlflow_rows, "per_trial": {k: round(v / max(n, 1), 1) for k, v in mlflow_rows.items()},
                   "models_logged": len(summary["models"])},
        "disk_bytes": disk, "disk_bytes_per_trial": {k: round(v / max(n, 1)) for k, v in disk.items()},
        "checkpoint_folders_left_by_status": checkpoints_left,
        "front": [r["trial"] for r in summary["front"]], "hypervolume": summary["hypervolume"],
    }

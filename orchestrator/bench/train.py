"""`sdo bench train`: what Ray Train costs per step, against the same training without Ray.

Every mode runs the same optimisation step (``orchestrator.train.step.train_step``: forward, losses, backward,
clip, AdamW) on the same model config and the same batches (read from the same synthetic shards
with the same seed, before timing starts), with one intra-op thread per process:

- ``bare``:      one fresh process, no process group;
- ``ddp``:       N processes started by torch.multiprocessing, DDP over gloo on 127.0.0.1;
- ``ray_1``:     a 1-worker Ray TorchTrainer (``prepare_model``; Ray Train's process group);
- ``ray_N``:     an N-worker Ray TorchTrainer.

Reported per mode: median and mean seconds per step over the timed steps (after warm-up), the
slowest rank's figure for multi-process modes. Overheads: ray_1 vs bare, ray_N vs ddp.
"""
from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from orchestrator.config import Config, load_config, to_dict


def bench_config(config_path: str | None, overrides: tuple[str, ...], batch_size: int) -> Config:
    """The model/loss of ``config_path`` (default: the demo config) with small CPU data settings."""
    base = [f"data.batch_size={batch_size}", "data.num_workers=0", "data.random_crop=false",
            "train.cpus_per_worker=1", "train.use_gpu=false"]
    return load_config(config_path, [*base, *overrides])


def write_bench_shards(root: Path, num_images: int, image_size: int) -> Path:
    from pipelines.shard import write_shards
    from pipelines.synth import generate

    generate(root / "coco", num_images, 0, size=image_size, seed=0)
    out = root / "shards"
    write_shards(root / "coco" / "train", root / "coco" / "annotations" / "instances_train.json", out,
                 shard_size=max(num_images // 4, 1), progress=False)
    return out


def load_batches(cfg: Config, shards: Path, *, rank: int, world_size: int, count: int) -> list:
    """``count`` training batches of this rank, read before any timing (epochs cycle as needed)."""
    from pipelines.loader import make_loader

    d = cfg.data
    loader = make_loader(str(shards), train=True, batch_size=d.batch_size, num_workers=0, rank=rank,
                         world_size=world_size, seed=cfg.train.seed, shuffle_buffer=d.shuffle_buffer,
                         scales=tuple(d.train_scales), max_size=d.max_size, random_crop=d.random_crop)
    batches, epoch = [], 0
    while len(batches) < count:
        loader.set_epoch(epoch)
        batches.extend(loader)
        epoch += 1
    return batches[:count]


def timed_steps(cfg: Config, shards: Path, *, rank: int, world_size: int, warmup: int, steps: int,
                wrap=None) -> list[float]:
    """Seconds of each timed step of this process. ``wrap(model) -> model`` adds DDP (or Ray's)."""
    from model import build
    from orchestrator.train.step import make_optimizer, train_step

    torch.set_num_threads(cfg.train.cpus_per_worker)
    torch.manual_seed(cfg.train.seed)
    batches = load_batches(cfg, shards, rank=rank, world_size=world_size, count=warmup + steps)
    model, criterion = build(cfg.model, cfg.loss)
    model = wrap(model) if wrap is not None else model
    module = model.module if hasattr(model, "module") else model
    optimizer, _ = make_optimizer(cfg, module, world_size)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    device = torch.device("cpu")
    times = []
    for index, batch in enumerate(batches):
        started = time.perf_counter()
        train_step(model, criterion, optimizer, scaler, batch, device, None, cfg.train.clip_max_norm)
        if index >= warmup:
            times.append(time.perf_counter() - started)
    return times


def _extend(into: list[list[float]], per_rank: list[list[float]]) -> None:
    """Pool another repeat's step times rank by rank."""
    if not into:
        into.extend([] for _ in per_rank)
    for pooled, times in zip(into, per_rank):
        pooled.extend(times)


def _summary(per_rank: list[list[float]]) -> dict:
    """Slowest rank decides the step time of a data-parallel group."""
    medians = [statistics.median(t) for t in per_rank]
    means = [statistics.fmean(t) for t in per_rank]
    return {"median_step_s": round(max(medians), 4), "mean_step_s": round(max(means), 4),
            "per_rank_median_s": [round(m, 4) for m in medians], "steps": len(per_rank[0])}  # pooled over repeats


# ---------------------------------------------------------------- modes


def run_bare(cfg: Config, shards: Path, warmup: int, steps: int) -> list[list[float]]:
    """In a fresh process, like the others: a thread count set after torch started is not the same
    as one set before (measured here: 0.32 s vs 0.19 s per step with OMP_NUM_THREADS unset)."""
    return _spawn(cfg, shards, warmup, steps, workers=1)


def _ddp_worker(rank: int, world_size: int, port: int, cfg_dict: dict, shards: str, warmup: int, steps: int,
                out_dir: str) -> None:
    import json

    import torch.distributed as dist

    from orchestrator.config import from_dict

    if world_size == 1:  # the bare loop: no process group, no DDP
        times = timed_steps(from_dict(cfg_dict), Path(shards), rank=0, world_size=1, warmup=warmup, steps=steps)
        Path(out_dir, "rank0.json").write_text(json.dumps(times))
        return
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        times = timed_steps(from_dict(cfg_dict), Path(shards), rank=rank, world_size=world_size, warmup=warmup,
                            steps=steps, wrap=lambda m: torch.nn.parallel.DistributedDataParallel(m))
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(times))
    finally:
        dist.destroy_process_group()


def run_ddp(cfg: Config, shards: Path, warmup: int, steps: int, workers: int) -> list[list[float]]:
    return _spawn(cfg, shards, warmup, steps, workers)


def _spawn(cfg: Config, shards: Path, warmup: int, steps: int, workers: int) -> list[list[float]]:
    """``workers`` fresh processes (torch.multiprocessing), each started with Ray's thread setting."""
    import json

    import torch.multiprocessing as mp

    from orchestrator.cluster.local import free_port

    threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(cfg.train.cpus_per_worker)  # what Ray sets for its workers
    with tempfile.TemporaryDirectory(prefix="sdo-bench-ddp-") as out_dir:
        mp.spawn(_ddp_worker, args=(workers, free_port(), to_dict(cfg), str(shards), warmup, steps, out_dir),
                 nprocs=workers, join=True)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(workers)]
    if threads is None:
        os.environ.pop("OMP_NUM_THREADS")
    else:
        os.environ["OMP_NUM_THREADS"] = threads
    return per_rank


def _ray_worker(config: dict) -> None:
    """Ray Train worker of the bench: the timed steps, written to ``out_dir/rank<r>.json``."""
    import json

    import ray.train
    import ray.train.torch

    from orchestrator.config import from_dict

    context = ray.train.get_context()
    times = timed_steps(from_dict(config["cfg"]), Path(config["shards"]), rank=context.get_world_rank(),
                        world_size=context.get_world_size(), warmup=config["warmup"], steps=config["steps"],
                        wrap=lambda m: ray.train.torch.prepare_model(
                            m, parallel_strategy_kwargs={"find_unused_parameters": False}))
    Path(config["out_dir"], f"rank{context.get_world_rank()}.json").write_text(json.dumps(times))
    ray.train.report({"steps": len(times)})


def run_ray(cfg: Config, shards: Path, warmup: int, steps: int, workers: int, storage: Path) -> list[list[float]]:
    """Ray must be initialised. Every rank's times come back through a file per rank (same machine)."""
    import json

    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out_dir = storage / f"times_{workers}"
    out_dir.mkdir(parents=True, exist_ok=True)

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": to_dict(cfg), "shards": str(shards), "warmup": warmup, "steps": steps,
                           "out_dir": str(out_dir)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"bench_train_{workers}", storage_path=str(storage)),
        torch_config=TorchConfig(backend="gloo"),
    )
    trainer.fit()
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(workers)]


def run(*, config_path: str | None = None, overrides: tuple[str, ...] = (), workers: int = 2, steps: int = 20,
        warmup: int = 3, batch_size: int = 2, image_size: int = 128, repeats: int = 2) -> dict:
    """All four modes on this machine, one after another -> JSON-ready report."""
    import ray

    from orchestrator.cluster.local import free_port

    cfg = bench_config(config_path, overrides, batch_size)
    report = {"config": {"config_path": config_path, "overrides": list(overrides), "workers": workers, "steps": steps,
                         "warmup": warmup, "repeats": repeats, "batch_size_per_worker": batch_size, "image_size": image_size,
                         "threads_per_process": cfg.train.cpus_per_worker, "backbone": cfg.model.backbone.name,
                         "rho": cfg.model.rho},
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                          "ray": ray.__version__}, "modes": {}}
    names = ("bare", f"ddp_{workers}", "ray_1", f"ray_{workers}")
    times: dict[str, list[list[float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="sdo-bench-train-") as tmp:
        root = Path(tmp)
        shards = write_bench_shards(root, num_images=workers * batch_size * 8, image_size=image_size)
        for repeat in range(repeats):  # interleaved, so drifting machine load hits every mode alike
            _extend(times["bare"], run_bare(cfg, shards, warmup, steps))
            _extend(times[f"ddp_{workers}"], run_ddp(cfg, shards, warmup, steps, workers))
            # Ray runs only during its own modes: its daemons must not slow the others down
            ray.init(num_cpus=workers, include_dashboard=True, dashboard_host="127.0.0.1",
                     dashboard_port=free_port(), _node_ip_address="127.0.0.1", log_to_driver=False)
            try:
                _extend(times["ray_1"], run_ray(cfg, shards, warmup, steps, 1, root / f"ray{repeat}"))
                _extend(times[f"ray_{workers}"], run_ray(cfg, shards, warmup, steps, workers, root / f"ray{repeat}"))
            finally:
                ray.shutdown()
    report["modes"] = {name: _summary(per_rank) for name, per_rank in times.items()}
    modes = report["modes"]
    report["overhead"] = {
        "ray_1_vs_bare": round(modes["ray_1"]["median_step_s"] / modes["bare"]["median_step_s"] - 1, 4),
        f"ray_{workers}_vs_ddp_{workers}": round(
            modes[f"ray_{workers}"]["median_step_s"] / modes[f"ddp_{workers}"]["median_step_s"] - 1, 4),
        "goal": "<= 0.05",
    }
    return report

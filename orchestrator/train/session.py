"""Where a training worker runs: its rank and device, and where its reports and checkpoints go.

The Trainer (orchestrator.train.worker) asks its session, never Ray directly:

- :class:`RaySession`: a worker of a Ray Train worker group (`sdo launch`, `sdo sweep`). Ray Train
  registers each reported checkpoint in the run directory, keeps ``checkpoint.keep`` of them and hands
  the latest back to a restarted group.
- :class:`LocalSession`: one process without Ray (a single-GPU check, tests): it copies each reported
  checkpoint into the run directory itself and hands back the newest there. With torch.distributed
  initialised by the caller it takes its rank and world size from there.

Both report the same metrics dicts and write the same checkpoint folders
(orchestrator.run.checkpoints), so a run trained in one can be read by everything else.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch


class RaySession:
    """A Ray Train worker's view of its group (import-time free of Ray: it is imported inside the worker)."""

    prunes_checkpoints = True  # Ray Train keeps checkpoint.keep folders itself (Checkpointer.ray_config)

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.local_rank, self.node_rank = context.get_local_rank(), context.get_node_rank()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model on this worker's device, wrapped in DDP when there are several workers."""
        import ray.train.torch

        # every parameter gets a gradient in every configuration (checked by tests), so DDP need not search
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def latest_checkpoint_name(self) -> str | None:
        """The folder name (inside the run directory) of the checkpoint to resume from, or None."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return None if checkpoint is None else Path(checkpoint.path).name

    def report(self, metrics: dict, checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        """Report ``metrics`` (every rank: it is collective), with rank 0's checkpoint folder when given."""
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=dir_name if checkpoint else None)

    def wait_for_reports(self) -> None:
        """Return once every report so far is registered (the controller collects them asynchronously)."""
        import ray.train

        ray.train.get_all_reported_checkpoints()


class LocalSession:
    """One training process without Ray; ``run_dir``: the local run directory its checkpoints go to."""

    prunes_checkpoints = False  # the Checkpointer keeps checkpoint.keep folders

    def __init__(self, run_dir: str | Path, device: torch.device | str | None = None):
        import torch.distributed as dist

        self.run_dir = Path(run_dir)
        distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if distributed else 0
        self.world_size = dist.get_world_size() if distributed else 1
        self.local_rank, self.node_rank = self.rank, 0
        if device is None:
            device = f"cuda:{self.local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.reports: list[dict] = []  # every report, in order: what Ray would hand its callbacks

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        if self.world_size == 1:
            return model
        return torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=False)

    def latest_checkpoint_name(self) -> str | None:
        from orchestrator.run.checkpoints import newest_first

        found = newest_first(self.run_dir)
        return found[0].name if found else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None, dir_name: str | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is None or self.rank != 0:
            return
        target = self.run_dir / dir_name
        partial = self.run_dir / f".{dir_name}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(checkpoint_dir, partial)
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)  # a reader never sees half a checkpoint folder

    def wait_for_reports(self) -> None:
        """Reports are written before report() returns."""

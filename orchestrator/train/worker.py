"""The Ray Train worker function: one process per worker, DDP over gloo (CPU) or nccl (GPU).

Every worker builds the model, reads its share of the shards, trains, and takes part in evaluation;
rank 0 alone writes checkpoints and talks to MLflow. Checkpoints are taken every
``train.checkpoint_every`` steps and at every epoch end. A restarted worker group finds the latest
checkpoint through ``ray.train.get_checkpoint()`` (falling back to the newest readable one when the
latest is damaged) and continues from the exact step after it: the loader replays the epoch's
deterministic order and skips the batches the checkpoint had consumed. Rank 0 logs into the same
MLflow run (its id travels in ``config['run']``), each (metric, step) once whatever was restarted.
A stop request (the driver's Ctrl-C) ends the run at the next logged or checkpoint step, with a checkpoint.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from orchestrator.config import Config, from_dict, to_dict
from orchestrator.run import checkpoints
from orchestrator.run.directory import claim_crash, local_dir, stop_requested
from orchestrator.run.failures import CheckpointError
from orchestrator.run.storage import RemotePath, location
from orchestrator.train import evaluation
from orchestrator.train.step import (
    all_reduce_mean,
    all_reduce_sum,
    autocast_dtype,
    gather_rng_states,
    make_optimizer,
    restore_rng_state,
    train_step,
)

log = logging.getLogger(__name__)

AP_KEYS = evaluation.AP_KEYS
EVAL_KEYS = (*AP_KEYS, "dam_recall")  # val/*, stepped by epoch
SYSTEM_METRICS_INTERVAL = 5.0  # seconds between system-metric points (each also asks MLflow the run's status)


class Trainer:
    """State of one worker's training: model, optimiser, loaders, counters."""

    def __init__(self, cfg: Config, run: dict, progress=None):
        """``progress``: the driver console's queue (orchestrator.train.console), fed by rank 0; None: silent."""
        from model import build
        from model.postprocess import PostProcess
        from pipelines.loader import make_loader

        self.cfg, self.run = cfg, run
        self.run_dir = location(run["run_dir"])  # a local folder or object storage
        self.local_dir = local_dir(self.run_dir)  # where pictures are drawn before MLflow takes them
        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        torch.manual_seed(cfg.train.seed)

        model, self.criterion, _ = build(cfg.model, cfg.loss)
        self.postprocess = PostProcess(cfg.eval.max_dets)
        # every parameter gets a gradient in every configuration (checked by tests), so DDP need not search
        self.model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        self.module = self.model.module if hasattr(self.model, "module") else self.model
        if cfg.train.compile:  # the training forward only; evaluation, checkpoints and pictures use self.module
            self.model = torch.compile(self.model)
        self.criterion.to(self.device)

        self.optimizer, self.scheduler = make_optimizer(cfg, self.module, self.world_size)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        d = cfg.data
        self.train_loader = make_loader(d.train_shards, train=True, batch_size=d.batch_size, num_workers=d.num_workers,
                                        rank=self.rank, world_size=self.world_size, seed=cfg.train.seed,
                                        shuffle_buffer=d.shuffle_buffer, scales=tuple(d.train_scales),
                                        max_size=d.max_size, val_scale=d.val_scale, random_crop=d.random_crop)
        self.val_loader = make_loader(d.val_shards, train=False, batch_size=d.batch_size, num_workers=d.num_workers,
                                      rank=self.rank, world_size=self.world_size, seed=cfg.train.seed,
                                      shuffle_buffer=0, max_size=d.max_size, val_scale=d.val_scale)
        self.steps_per_epoch = len(self.train_loader)
        if cfg.train.max_steps_per_epoch is not None:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.max_steps_per_epoch)
        if self.steps_per_epoch < 1:
            raise ValueError(f"data.train_shards={d.train_shards!r}: no full batch of {d.batch_size} per worker "
                             f"for {self.world_size} workers")

        self.start_epoch, self.step = 0, 0
        self.resume_epoch_state: dict = {}  # sums / counts of an epoch interrupted by a mid-epoch checkpoint
        self.last_eval: dict[str, float] = {}
        self.last_report: dict[str, float] = {}
        self.best: tuple[float, int] | None = None  # (AP, epoch) of the best evaluation so far
        self.stopping = False
        self.attempt = 0  # rank 0: which start of the worker group this is (names its checkpoints)
        self.logger = None
        if self.rank == 0:
            from orchestrator.run.tracking import RunLogger

            self.logger = RunLogger(run["tracking_uri"], run["mlflow_run_id"], exactly_once=True, grouped=True)
            self.attempt = self.logger.count_start()
        self.progress = None
        if self.rank == 0 and progress is not None:
            from orchestrator.train.console import ProgressSender

            self.progress = ProgressSender(progress, epochs=cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
                                           world_size=self.world_size, log_every=cfg.train.log_every)
        self.system_metrics = start_system_metrics(run, context) if cfg.tracking.system_metrics else None
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # a rank failing in _restore must not stop rank 0 before this start is counted
        self._restore()

    # ---------------------------------------------------------------- checkpoints

    def _restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            if self.cfg.model.init_from:
                self._init_from(self.cfg.model.init_from)
            return
        if isinstance(self.run_dir, RemotePath):  # read it where it is: the fallback lists its siblings there
            state, path, unreadable = newest_readable(self.run_dir / Path(checkpoint.path).name)
        else:
            with checkpoint.as_directory() as directory:
                state, path, unreadable = newest_readable(Path(directory))
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        epoch = int(state["epoch"])
        if state.get("epoch_done", True):  # checkpoints of sdo < 0.2 were all taken at epoch ends
            self.start_epoch = epoch + 1
        else:
            self.start_epoch = epoch
            self.resume_epoch_state = dict(state["epoch_state"])
        self.last_eval = dict(state.get("last_eval", {}))
        self.last_report = dict(state.get("last_report", {}))
        if not restore_rng_state(state.get("rng", []), self.rank, self.world_size):
            log.info("rank %d: no RNG state for %d ranks in %s; dropout draws anew", self.rank, self.world_size, path)
        self.best = tuple(state["best"]) if state.get("best") else None
        log.info("rank %d resumed from %s (epoch %d, step %d)", self.rank, path, epoch, self.step)
        if self.logger is not None:
            tags = {"sdo.resumed_from_epoch": epoch, "sdo.resumed_from_step": self.step,
                    "sdo.resumed_from": str(path)}
            if unreadable:
                tags["sdo.unreadable_checkpoints"] = "; ".join(unreadable)
                for line in unreadable:
                    print(f"sdo: unreadable checkpoint {line}; resumed from {path}", flush=True)
            self.logger.tags(tags)
            self.logger.metrics({"resumed_from_epoch": epoch}, step=self.step)

    def _init_from(self, spec: str) -> None:
        """``model.init_from``: start a new run from other weights; class heads of another size start afresh."""
        from model.checkpoint import load_for_finetuning
        from orchestrator.run.weights import load_weights

        weights = load_weights(spec, self.run["tracking_uri"])
        reinitialised = load_for_finetuning(self.module, weights.state, weights.source)
        log.info("rank %d initialised from %s; re-initialised %d keys: %s", self.rank, spec, len(reinitialised),
                 ", ".join(reinitialised) or "none")
        if self.logger is not None:
            listed = ", ".join(reinitialised) or "none"
            self.logger.tags({"sdo.init_from": spec, "sdo.reinitialised_keys":
                              listed if len(listed) <= 5000 else listed[:4997] + "..."})

    def _state(self, epoch: int, epoch_state: dict | None, rng: list[dict]) -> dict:
        """``epoch_state`` None: ``epoch`` is complete; else the running sums of the epoch in progress.
        ``rng``: every rank's RNG state (gather_rng_states)."""
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": epoch,
            "epoch_done": epoch_state is None,
            "epoch_state": dict(epoch_state or {}),
            "step": self.step,
            "config": to_dict(self.cfg),
            "mlflow_run_id": self.run["mlflow_run_id"],
            "last_eval": dict(self.last_eval),
            "last_report": dict(self.last_report),
            "rng": rng,
            "best": self.best,
        }

    # ---------------------------------------------------------------- one epoch

    def _maybe_crash(self) -> None:
        """Fault injection (``train.crash_at_step``): rank 1 (rank 0 when alone) dies once, for real."""
        crash_at = self.cfg.train.crash_at_step
        if crash_at is None or self.step != crash_at or self.rank != min(1, self.world_size - 1):
            return
        if claim_crash(self.run_dir):
            # die only once the last report is registered, so the restart provably resumes from it
            # (the controller collects reports asynchronously; a faster death would race with it)
            ray.train.get_all_reported_checkpoints()
            print(f"sdo: fault injection: rank {self.rank} exits at step {self.step}", flush=True)
            os._exit(1)

    def train_one_epoch(self, epoch: int) -> dict[str, float] | None:
        """Train ``epoch`` (from where a mid-epoch checkpoint left it) -> its means; None when a stop was
        requested before its last step (the run is then checkpointed at the step it reached)."""
        self.model.train()
        self.criterion.train()
        self.train_loader.set_epoch(epoch)
        resumed, self.resume_epoch_state = self.resume_epoch_state, {}
        sums: dict[str, float] = dict(resumed.get("sums", {}))
        steps_done, images_seen = int(resumed.get("steps", 0)), int(resumed.get("images", 0))
        elapsed_before, started = float(resumed.get("seconds", 0.0)), time.perf_counter()
        every = self.cfg.train.checkpoint_every
        batches = iter(self.train_loader)
        for _ in range(steps_done):  # the same deterministic order as before the restart: skip what was trained
            next(batches)
        for images, mask, targets in batches:
            if steps_done >= self.steps_per_epoch:
                break
            self._maybe_crash()
            try:
                values = train_step(self.model, self.criterion, self.optimizer, self.scaler, (images, mask, targets),
                                    self.device, self.amp_dtype, self.cfg.train.clip_max_norm)
            except FloatingPointError as err:
                raise FloatingPointError(f"epoch {epoch} step {self.step}: {err}") from None
            self.step += 1
            steps_done += 1
            images_seen += images.shape[0]
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v
            if self.progress is not None:
                self.progress.step(epoch=epoch, step_in_epoch=steps_done, global_step=self.step,
                                   loss=sums.get("loss", 0.0) / steps_done, lr=self.optimizer.param_groups[0]["lr"],
                                   images=images_seen, seconds=elapsed_before + time.perf_counter() - started)
            logged = self.step % self.cfg.train.log_every == 0
            if logged:
                step_metrics = all_reduce_mean(values, self.device)
                if self.logger is not None:
                    self.logger.metrics({**step_metrics, "lr": self.optimizer.param_groups[0]["lr"]}, step=self.step)
            due = bool(every) and self.step % every == 0
            # asking every step would add a collective (a host sync on GPU) to each step: ask where one is anyway
            self.stopping = (logged or due) and self._stop_requested()
            if steps_done < self.steps_per_epoch and (self.stopping or due):
                epoch_state = {"sums": sums, "steps": steps_done, "images": images_seen,
                               "seconds": elapsed_before + time.perf_counter() - started}
                self._checkpoint(epoch, epoch_state=epoch_state, metrics={})
                if self.stopping:
                    return None
        elapsed = elapsed_before + time.perf_counter() - started
        means = all_reduce_mean({k: v / max(steps_done, 1) for k, v in sums.items()}, self.device)
        global_images = all_reduce_sum(float(images_seen), self.device)
        return {**means, "img_per_s": global_images / max(elapsed, 1e-9), "epoch_time": elapsed,
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _stop_requested(self) -> bool:
        """The driver asked the run to stop (Ctrl-C): every rank learns it at the same (logged or checkpoint) step."""
        flag = 1.0 if self.rank == 0 and stop_requested(self.run_dir) else 0.0
        return all_reduce_sum(flag, self.device) > 0

    # ---------------------------------------------------------------- evaluation

    def evaluate(self, epoch: int) -> dict[str, float]:
        """COCO AP/AR and ``dam_recall`` (rho > 0) of this epoch, the same on every rank; rank 0 logs the
        eval json and the prediction and DAM pictures of its first val images (plots/.../epoch_NNNN)."""
        from orchestrator.train.diagnostics import EvalDiagnostics
        from pipelines.records import records_to_coco

        categories = self.val_loader.index["categories"]
        diagnostics = EvalDiagnostics(self.local_dir / "plots", epoch=epoch, draw=self.rank == 0,
                                      pred_images=self.cfg.eval.pred_images, dam_images=self.cfg.eval.dam_images,
                                      categories={c["id"]: c["name"] for c in categories}, rho=self.cfg.model.rho,
                                      score_threshold=self.cfg.eval.pred_score_threshold)
        predictions = evaluation.predict(self.module, self.postprocess, self.val_loader, self.device,
                                         autocast_dtype=self.amp_dtype, observe=diagnostics)
        gathered = evaluation.gather_predictions(predictions)
        # ground truth = the records the val loader decoded for these predictions (one parser, no disagreement)
        truth = evaluation.gather_predictions(self.val_loader.ground_truth_records())
        recall_sum = all_reduce_sum(diagnostics.recall_sum, self.device)
        recall_count = all_reduce_sum(float(diagnostics.recall_count), self.device)
        metrics = None
        if self.rank == 0:
            metrics = evaluation.coco_metrics(gathered, records_to_coco(truth, categories))
            if recall_count > 0:
                metrics["dam_recall"] = recall_sum / recall_count
            path = evaluation.write_eval_json(self.run_dir / "eval" / f"epoch_{epoch:04d}.json", metrics,
                                              epoch=epoch, num_predictions=len(gathered))
            self.logger.artifact(path, "eval")
            for folder in sorted({picture.parent for picture in diagnostics.pictures}):
                self.logger.artifact(folder, folder.relative_to(self.local_dir).as_posix())
        return evaluation.broadcast(metrics)

    def check_data(self, split: str, loader) -> None:
        """data/skipped_{split}_* of the loader's latest pass, summed over ranks and logged by rank 0;
        more lost samples than data.max_skip_fraction fail the run, naming the source."""
        from pipelines.loader import check_skip_budget, skip_fraction

        means = all_reduce_mean(loader.epoch_skips(), self.device)
        counts = {key: round(value * self.world_size) for key, value in means.items()}
        if self.logger is not None:
            values = {f"data/skipped_{split}_{key}": value for key, value in counts.items() if key != "expected"}
            self.logger.metrics({**values, f"data/skipped_{split}_fraction": skip_fraction(counts)}, step=self.step)
        source = getattr(self.cfg.data, f"{split}_shards")
        check_skip_budget(counts, self.cfg.data.max_skip_fraction, f"data.{split}_shards={source!r}")

    # ---------------------------------------------------------------- the loop

    def fit(self) -> None:
        epochs, every = self.cfg.train.epochs, self.cfg.eval.every
        if self.start_epoch >= epochs and self.last_report:
            # restored after the last epoch (a resumed sweep trial, a re-run of a finished run): nothing to
            # train, but whoever waits for this run's results (Tune) must still get its final report
            ray.train.report(self.last_report, checkpoint=None)
            return
        for epoch in range(self.start_epoch, epochs):
            epoch_started = time.perf_counter()
            trained = self.train_one_epoch(epoch)
            if trained is None:
                return
            metrics = {"epoch": epoch, **trained}
            self.check_data("train", self.train_loader)
            self.scheduler.step()
            last = epoch == epochs - 1
            evaluated = (epoch + 1) % every == 0 or last
            if evaluated:
                self.last_eval = self.evaluate(epoch)
                self.check_data("val", self.val_loader)
                ap = self.last_eval.get("AP", 0.0)
                if self.best is None or ap > self.best[0]:
                    self.best = (ap, epoch)
            metrics.update(self.last_eval or {"AP": 0.0})
            metrics["step"] = self.step
            if self.logger is not None:
                epoch_metrics = {k: v for k, v in metrics.items() if k in ("epoch", "img_per_s", "epoch_time")}
                self.logger.metrics({**epoch_metrics,
                                     **{f"epoch_{k}": v for k, v in metrics.items() if k.startswith("loss")}},
                                    step=self.step)
                if evaluated:  # val/* is stepped by epoch (1, 2, ...): its charts read per epoch
                    self.logger.metrics({k: v for k, v in metrics.items() if k in EVAL_KEYS}, step=epoch + 1)
            if self.progress is not None:
                self.progress.epoch(epoch=epoch, loss=metrics.get("loss", 0.0),
                                    ap=self.last_eval.get("AP") if evaluated else None, best=self.best,
                                    seconds=time.perf_counter() - epoch_started)
            self._checkpoint(epoch, epoch_state=None, metrics=metrics, last=last)
            if self.stopping:
                return

    def _checkpoint(self, epoch: int, *, epoch_state: dict | None, metrics: dict, last: bool = False) -> None:
        """Report to Ray Train with a checkpoint of this step (every rank calls it: report is collective).

        ``epochs_done`` is sdo's own epoch counter (Tune's time attribute); ``epoch_end`` tells epoch-end
        reports from mid-epoch ones, which carry no new metrics. ``AP`` is the checkpoint's score.
        """
        report = {**metrics, "epoch": epoch, "step": self.step, "epochs_done": epoch + (epoch_state is None),
                  "epoch_end": epoch_state is None}
        report.setdefault("AP", self.last_eval.get("AP", 0.0))
        if epoch_state is None:
            self.last_report = dict(report)
        rng = gather_rng_states()
        if self.rank != 0:
            ray.train.report(report, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="sdo-ckpt-") as directory:
            checkpoints.save(directory, self._state(epoch, epoch_state, rng))
            if last and self.cfg.tracking.log_checkpoints:
                self.logger.artifact(directory, "checkpoints/final")
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoints.dir_name(self.step, self.attempt))


def newest_readable(latest) -> tuple[dict, Path | RemotePath, list[str]]:
    """The state of ``latest``, or of the newest older checkpoint beside it that loads when ``latest`` is
    damaged -> (state, its directory, ['<path> (<why>)' for each unreadable one tried first]).

    Raises CheckpointError naming every file when none loads.
    """
    unreadable = []
    for candidate in [latest, *checkpoints.older_than(latest)]:
        try:
            return checkpoints.load(candidate, map_location="cpu"), candidate, unreadable
        except (CheckpointError, FileNotFoundError) as err:
            unreadable.append(str(err))
    raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(unreadable))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: {'cfg': to_dict(Config), 'run': {'run_dir', 'tracking_uri',
    'mlflow_run_id', 'name'}}."""
    cfg = from_dict(config["cfg"])
    trainer = Trainer(cfg, config["run"], progress=config.get("progress"))
    try:
        trainer.fit()
    finally:
        if trainer.system_metrics is not None:
            stop_system_metrics(trainer.system_metrics)


def start_system_metrics(run: dict, context):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of this node, logged by its
    local rank 0 as ``system/<node>/...`` -> the monitor, or None on the other ranks."""
    if context.get_local_rank() != 0:
        return None
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    node = f"node_{context.get_node_rank()}"
    monitor = SystemMetricsMonitor(run["mlflow_run_id"], node_id=node, tracking_uri=run["tracking_uri"],
                                   sampling_interval=SYSTEM_METRICS_INTERVAL, resume_logging=True)
    monitor.start()
    return monitor


def stop_system_metrics(monitor) -> None:
    """Stop the monitor, logging the samples it took since its last point (MLflow's drops them; a worker
    group shorter than one interval would leave no point at all)."""
    monitor.finish()
    pending = monitor.aggregate_metrics()
    if pending:
        monitor.publish_metrics(pending)
        monitor.mlflow_logger.flush()

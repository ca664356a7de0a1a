"""The training worker: one process per worker, DDP over gloo (CPU) or nccl (GPU).

Every worker builds the model, reads its share of the shards, trains, and takes part in evaluation;
rank 0 alone writes checkpoints and talks to MLflow. The worker runs in a session
(orchestrator.train.session): a Ray Train worker group (`sdo launch`, `sdo sweep`; entry point
:func:`train_loop_per_worker`) or one process without Ray (:func:`train_without_ray`). Its
checkpoints are the Checkpointer's (orchestrator.train.checkpointer): a restarted worker group
continues from the exact step after the latest one: the loader replays the epoch's deterministic
order and skips the batches the checkpoint had consumed. Rank 0 logs into the run's MLflow run
(its RunIdentity travels with the config), each (metric, step) once whatever was restarted. A stop
request (the driver's Ctrl-C) ends the run at the next logged or checkpoint step, with a checkpoint.
"""
from __future__ import annotations

import logging
import os
import time

import torch
import torch.distributed as dist

from orchestrator.config import Config, from_dict, to_dict
from orchestrator.run.directory import claim_crash, local_dir, stop_requested
from orchestrator.run.identity import RunIdentity
from orchestrator.train import evaluation
from orchestrator.train.checkpointer import Checkpointer
from orchestrator.train.step import (
    all_reduce_mean,
    all_reduce_sum,
    autocast_dtype,
    configure_tf32,
    gather_rng_states,
    make_optimizer,
    restore_rng_state,
    train_step,
)

log = logging.getLogger(__name__)

SYSTEM_METRICS_INTERVAL = 5.0  # seconds between system-metric points (each also asks MLflow the run's status)


class Trainer:
    """State of one worker's training: model, optimiser, loaders, counters."""

    def __init__(self, cfg: Config, run: RunIdentity, session, progress=None):
        """``session``: RaySession or LocalSession; ``progress``: the driver console's queue
        (orchestrator.train.console), fed by rank 0; None: silent."""
        from model import build
        from model.postprocess import PostProcess
        from pipelines.loader import make_loader

        self.cfg, self.run, self.session = cfg, run, session
        self.run_dir = run.location()  # a local folder or object storage
        self.local_dir = local_dir(self.run_dir)  # where pictures are drawn before MLflow takes them
        self.rank, self.world_size, self.device = session.rank, session.world_size, session.device
        torch.manual_seed(cfg.train.seed)

        model, self.criterion = build(cfg.model, cfg.loss)
        self.postprocess = PostProcess(cfg.eval.max_dets)
        self.model = session.prepare_model(model)
        self.module = self.model.module if hasattr(self.model, "module") else self.model
        if cfg.train.compile:  # the training forward only; evaluation, checkpoints and pictures use self.module
            self.model = torch.compile(self.model)
        self.criterion.to(self.device)

        self.optimizer, self.scheduler = make_optimizer(cfg, self.module, self.world_size)
        self.amp_dtype = autocast_dtype(cfg, self.device)
        configure_tf32(cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)

        d, pinned = cfg.data, self.device.type == "cuda"
        self.train_loader = make_loader(d.train_shards, train=True, batch_size=d.batch_size, num_workers=d.num_workers,
                                        rank=self.rank, world_size=self.world_size, seed=cfg.train.seed,
                                        shuffle_buffer=d.shuffle_buffer, scales=tuple(d.train_scales),
                                        max_size=d.max_size, val_scale=d.val_scale, random_crop=d.random_crop,
                                        pin_memory=pinned)
        self.val_loader = make_loader(d.val_shards, train=False, batch_size=d.batch_size, num_workers=d.num_workers,
                                      rank=self.rank, world_size=self.world_size, seed=cfg.train.seed,
                                      shuffle_buffer=0, max_size=d.max_size, val_scale=d.val_scale, pin_memory=pinned)
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
        self.checkpointer = Checkpointer(cfg.checkpoint, self.run_dir, session)
        self.logger = run.logger(exactly_once=True, grouped=True) if self.rank == 0 else None
        if self.logger is not None:
            self.checkpointer.attempt = self.logger.count_start()
        self.progress = None
        if self.rank == 0 and progress is not None:
            from orchestrator.train.console import ProgressSender

            self.progress = ProgressSender(progress, epochs=cfg.train.epochs, steps_per_epoch=self.steps_per_epoch,
                                           world_size=self.world_size, log_every=cfg.train.log_every)
        self.system_metrics = None
        if cfg.tracking.system_metrics and run.tracked and session.local_rank == 0:
            self.system_metrics = start_system_metrics(run, node=f"node_{session.node_rank}")
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # a rank failing in _restore must not stop rank 0 before this start is counted
        self._restore()

    # ---------------------------------------------------------------- checkpoints

    def _restore(self) -> None:
        restored = self.checkpointer.restore(self.module, self.optimizer, self.scheduler)
        if restored is None:
            if self.cfg.model.init_from:
                self._init_from(self.cfg.model.init_from)
            return
        progress, path = restored.progress, restored.path
        self.step = int(progress["step"])
        epoch = int(progress["epoch"])
        if progress["epoch_done"]:
            self.start_epoch = epoch + 1
        else:
            self.start_epoch = epoch
            self.resume_epoch_state = dict(progress["epoch_state"])
        self.last_eval = dict(progress["last_eval"])
        self.last_report = dict(progress["last_report"])
        if not restore_rng_state(progress["rng"], self.rank, self.world_size):
            log.info("rank %d: no RNG state for %d ranks in %s; dropout draws anew", self.rank, self.world_size, path)
        self.best = tuple(progress["best"]) if progress["best"] else None
        log.info("rank %d resumed from %s (epoch %d, step %d)", self.rank, path, epoch, self.step)
        if self.logger is not None:
            tags = {"sdo.resumed_from_epoch": epoch, "sdo.resumed_from_step": self.step,
                    "sdo.resumed_from": str(path)}
            if restored.unreadable:
                tags["sdo.unreadable_checkpoints"] = "; ".join(restored.unreadable)
                for line in restored.unreadable:
                    print(f"sdo: unreadable checkpoint {line}; resumed from {path}", flush=True)
            self.logger.tags(tags)
            self.logger.metrics({"resumed_from_epoch": epoch}, step=self.step)

    def _init_from(self, spec: str) -> None:
        """``model.init_from``: start a new run from other weights; class heads of another size start afresh."""
        from model.checkpoint import load_for_finetuning
        from orchestrator.run.weights import read_weights

        weights = read_weights(spec, self.run.tracking_uri)
        reinitialised = load_for_finetuning(self.module, weights.state, weights.source)
        log.info("rank %d initialised from %s; re-initialised %d keys: %s", self.rank, spec, len(reinitialised),
                 ", ".join(reinitialised) or "none")
        if self.logger is not None:
            listed = ", ".join(reinitialised) or "none"
            self.logger.tags({"sdo.init_from": spec, "sdo.reinitialised_keys":
                              listed if len(listed) <= 5000 else listed[:4997] + "..."})

    # ---------------------------------------------------------------- one epoch

    def _maybe_crash(self) -> None:
        """Fault injection (``train.crash_at_step``): rank 1 (rank 0 when alone) dies once, for real."""
        crash_at = self.cfg.train.crash_at_step
        if crash_at is None or self.step != crash_at or self.rank != min(1, self.world_size - 1):
            return
        if claim_crash(self.run_dir):
            # die only once the last report is registered, so the restart provably resumes from it
            # (the controller collects reports asynchronously; a faster death would race with it)
            self.session.wait_for_reports()
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
            due = self.checkpointer.due(self.step)
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
            if self.logger is not None:
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
            self.session.report(self.last_report)
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
                    self.logger.metrics({k: v for k, v in metrics.items() if k in evaluation.EVAL_KEYS}, step=epoch + 1)
            if self.progress is not None:
                self.progress.epoch(epoch=epoch, loss=metrics.get("loss", 0.0),
                                    ap=self.last_eval.get("AP") if evaluated else None, best=self.best,
                                    seconds=time.perf_counter() - epoch_started)
            self._checkpoint(epoch, epoch_state=None, metrics=metrics, last=last)
            if self.stopping:
                return

    def _checkpoint(self, epoch: int, *, epoch_state: dict | None, metrics: dict, last: bool = False) -> None:
        """Report this step with a checkpoint (every rank calls it: reporting is collective).

        ``epochs_done`` is sdo's own epoch counter (Tune's time attribute); ``epoch_end`` tells epoch-end
        reports from mid-epoch ones, which carry no new metrics. ``AP`` is the checkpoint's score.
        ``epoch_state`` None: ``epoch`` is complete; else the running sums of the epoch in progress.
        """
        report = {**metrics, "epoch": epoch, "step": self.step, "epochs_done": epoch + (epoch_state is None),
                  "epoch_end": epoch_state is None}
        report.setdefault("AP", self.last_eval.get("AP", 0.0))
        if epoch_state is None:
            self.last_report = dict(report)
        progress = {"epoch": epoch, "epoch_done": epoch_state is None, "epoch_state": dict(epoch_state or {}),
                    "step": self.step, "last_eval": dict(self.last_eval), "last_report": dict(self.last_report),
                    "rng": gather_rng_states(), "best": self.best}
        state = None
        if self.rank == 0:
            state = self.checkpointer.state(self.module, self.optimizer, self.scheduler, progress,
                                            config=to_dict(self.cfg), run_id=self.run.run_id)
        self.checkpointer.save(state, report, final=last, logger=self.logger)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point. ``config``: {'cfg': to_dict(Config), 'run': RunIdentity, 'progress': queue | None}."""
    from orchestrator.train.session import RaySession

    run_worker(from_dict(config["cfg"]), config["run"], RaySession(), progress=config.get("progress"))


def train_without_ray(cfg: Config, run: RunIdentity, *, device=None) -> list[dict]:
    """Train ``cfg`` in this process without Ray (orchestrator.train.session.LocalSession: one GPU or the CPU,
    or one rank of a process group the caller initialised) into ``run``'s local directory -> every report, in
    order. Checkpoints, resume (from the newest checkpoint there) and evaluation are those of a Ray Train run;
    an untracked ``run`` (no MLflow run id) logs nothing to MLflow."""
    from orchestrator.train.session import LocalSession

    run.location().mkdir(parents=True, exist_ok=True)
    session = LocalSession(run.directory, device=device)
    run_worker(cfg, run, session)
    return session.reports


def run_worker(cfg: Config, run: RunIdentity, session, progress=None) -> None:
    trainer = Trainer(cfg, run, session, progress=progress)
    try:
        trainer.fit()
    finally:
        if trainer.system_metrics is not None:
            stop_system_metrics(trainer.system_metrics)


def start_system_metrics(run: RunIdentity, node: str):
    """MLflow's system metrics (CPU, memory, disk, network; GPU with nvidia-ml-py) of this node, logged by its
    local rank 0 as ``system/<node>/...`` -> the monitor."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run.run_id, node_id=node, tracking_uri=run.tracking_uri,
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

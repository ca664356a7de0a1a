"""The one owner of a run's checkpoints (the ``checkpoint:`` config section): when and what to save,
restoring with the fallback to the newest readable one, how many to keep, the ``best`` link, cleanup.

Policy:
- A checkpoint is taken at every epoch end and, with ``checkpoint.every_steps: N``, every N global
  steps inside an epoch (also when the run is asked to stop), by rank 0, through the worker's session
  (orchestrator.train.session), which registers it in the run directory. Its score is ``AP``.
- Resuming takes the latest registered checkpoint; when that one does not load (truncated, damaged),
  the newest older one that does, naming each unreadable one.
- A run keeps at most ``checkpoint.keep`` folders: the best by AP and the latest are always among them.
  Ray Train prunes for a Ray session; this class prunes for a local one.
- After a run, ``<run dir>/best`` links to the best folder (in object storage: the best folder's URI).
- After a failure or an interrupt, folders that were never registered (a copy cut short) are removed,
  for a run and for every trial of a sweep.
- A sweep's trial stopped early by its scheduler loses all its checkpoints when the sweep ends.
The file format itself is orchestrator.run.checkpoints'.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from orchestrator.config import CheckpointConfig
from orchestrator.run import checkpoints
from orchestrator.run.errors import CheckpointError
from orchestrator.run.storage import RemotePath, location, remove_tree

log = logging.getLogger(__name__)

BEST = "best"  # <run dir>/best: a link to the best checkpoint folder, not a copy
SCORE = "AP"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2: the registered checkpoints
PROGRESS_KEYS = ("epoch", "epoch_done", "epoch_state", "step", "last_eval", "last_report", "rng", "best")


@dataclass
class Restored:
    """What a resumed worker takes up: the checkpoint's progress (PROGRESS_KEYS), where it came from, and
    the newer checkpoints that could not be read ('<path> (<why>)')."""

    progress: dict
    path: object
    unreadable: list[str]


class Checkpointer:
    """Checkpoints of the run in ``run_dir``. Workers give their ``session``; the driver needs none."""

    def __init__(self, settings: CheckpointConfig, run_dir, session=None):
        self.settings = settings
        self.run_dir = location(run_dir)
        self.session = session
        self.attempt = 0  # which start of the worker group this is: it names the checkpoints it takes

    # ------------------------------------------------------------------ the worker side

    def due(self, step: int) -> bool:
        """Whether global ``step`` takes a mid-epoch checkpoint."""
        every = self.settings.every_steps
        return bool(every) and step % every == 0

    def state(self, model, optimizer, scheduler, progress: dict, *, config: dict, run_id: str | None) -> dict:
        """What a checkpoint holds: the weights, the optimizer and the schedule, the config and MLflow run, and
        the ``progress`` that an exact resume needs (PROGRESS_KEYS: epoch, step, sums of an epoch in progress,
        last evaluation and report, every rank's RNG state, the best AP so far)."""
        missing = [k for k in PROGRESS_KEYS if k not in progress]
        if missing:
            raise CheckpointError(f"checkpoint progress lacks {', '.join(missing)}")
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                **{k: progress[k] for k in PROGRESS_KEYS}, "config": config, "mlflow_run_id": run_id}

    def save(self, state: dict, report: dict, *, final: bool = False, logger=None) -> None:
        """Report ``report`` with rank 0's checkpoint of ``state`` (every rank calls it: reporting is collective).
        ``final``: the run's last checkpoint, also logged to MLflow with ``checkpoint.log_final``."""
        if self.session.rank != 0:
            self.session.report(report)
            return
        name = checkpoints.dir_name(int(state["step"]), self.attempt)
        with tempfile.TemporaryDirectory(prefix="sdo-ckpt-") as directory:
            checkpoints.save(directory, state, report)
            if final and self.settings.log_final and logger is not None:
                logger.artifact(directory, "checkpoints/final")
            self.session.report(report, directory, name)
        if not self.session.prunes_checkpoints:
            self.prune()

    def restore(self, model, optimizer, scheduler) -> Restored | None:
        """Load the checkpoint to resume from into ``model``, ``optimizer`` and ``scheduler`` -> its progress,
        or None for a fresh start. Raises CheckpointError naming every file when none loads."""
        name = self.session.latest_checkpoint_name()
        if name is None:
            return None
        state, path, unreadable = newest_readable(self.run_dir / name)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = {"epoch_done": True, "epoch_state": {}, "last_eval": {}, "last_report": {}, "rng": [],
                    "best": None}  # what checkpoints of older sdo versions lack
        progress.update({k: state[k] for k in PROGRESS_KEYS if k in state})
        return Restored(progress=progress, path=path, unreadable=unreadable)

    def prune(self) -> list:
        """Keep ``checkpoint.keep`` folders, the latest and the best by AP among them -> the removed ones."""
        found = checkpoints.newest_first(self.run_dir)
        if len(found) <= self.settings.keep:
            return []
        latest, older = found[0], found[1:]
        by_score = sorted(older, key=lambda p: checkpoints.read_report(p).get(SCORE, float("-inf")), reverse=True)
        kept = {latest, *by_score[:max(self.settings.keep - 1, 1)]}
        removed = [p for p in found if p not in kept]
        for path in removed:
            remove_tree(path)
        return removed

    # ------------------------------------------------------------------ the driver side

    def ray_config(self):
        """Ray Train's CheckpointConfig: it keeps ``num_to_keep`` best-scored folders *and* the latest besides."""
        import ray.train

        return ray.train.CheckpointConfig(num_to_keep=max(1, self.settings.keep - 1),
                                          checkpoint_score_attribute=SCORE, checkpoint_score_order="max")

    def link_best(self, best_dir) -> Path | RemotePath:
        """``<run dir>/best`` -> ``best_dir`` (a relative symlink, replaced atomically) -> the path readers open.
        In object storage nothing can link: the best folder itself is returned."""
        if isinstance(self.run_dir, RemotePath):
            return self.run_dir / Path(str(best_dir)).name
        run_dir, target = Path(self.run_dir), Path(best_dir)
        best = run_dir / BEST
        if best.is_dir() and not best.is_symlink():  # a `best` copied by sdo < 0.3
            shutil.rmtree(best)
        link = run_dir / f".{BEST}.tmp"
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(target, run_dir), target_is_directory=True)
        os.replace(link, best)
        return best

    def remove_unregistered(self) -> list:
        """Delete checkpoint folders that Ray Train never registered -> what was deleted.

        A worker group killed while Ray copied a checkpoint into the run directory leaves a partial one;
        only those named in Ray's checkpoint-manager snapshot are complete. Without a readable snapshot
        nothing is deleted (resuming skips unreadable checkpoints anyway).
        """
        try:
            registered = set(_values(json.loads((self.run_dir / RAY_SNAPSHOT).read_text()), "checkpoint_dir_name"))
        except (OSError, ValueError):
            return []
        removed = []
        for candidate in checkpoints.newest_first(self.run_dir):
            if candidate.name not in registered:
                remove_tree(candidate)
                removed.append(candidate)
        return removed

    def remove_all(self) -> list:
        """Delete every checkpoint folder of the run and its ``best`` link -> what was deleted (a sweep's trial
        stopped early: it is never resumed and keeps no weights)."""
        found = checkpoints.newest_first(self.run_dir)
        for path in found:
            remove_tree(path)
        if not isinstance(self.run_dir, RemotePath):
            (Path(self.run_dir) / BEST).unlink(missing_ok=True)
        return found

    @classmethod
    def clean_sweep(cls, settings: CheckpointConfig, trials_dir) -> None:
        """:meth:`remove_unregistered` for every trial's run under ``trials_dir`` (an interrupted sweep)."""
        trials_dir = location(trials_dir)
        for trial_dir in trials_dir.iterdir() if trials_dir.is_dir() else ():
            if trial_dir.is_dir():
                cls(settings, trial_dir).remove_unregistered()


def newest_readable(latest) -> tuple[dict, object, list[str]]:
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


def _values(tree, key: str):
    """Every value of ``key`` anywhere in a parsed JSON tree (Ray nests its snapshot; the key is stable)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            if k == key and isinstance(v, str):
                yield v
            else:
                yield from _values(v, key)
    elif isinstance(tree, list):
        for item in tree:
            yield from _values(item, key)
    elif isinstance(tree, str) and key in tree:
        try:
            yield from _values(json.loads(tree), key)
        except ValueError:
            return

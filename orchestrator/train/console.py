"""What a person sees while a run trains, and ``<run_dir>/log.txt``, which keeps all of it.

Rank 0 sends progress events (a dict per few steps, one per epoch) through a Ray queue to the driver,
which draws them: a progress bar on a terminal, a plain line every ``train.log_every`` steps
otherwise, and one summary line per epoch::

    epoch 3/10  step 12/24  loss 12.78  lr 4.0e-04  15.2 img/s  ETA 2:31
    epoch 3/10  loss 12.78  AP 0.006 (best 0.006 @ 3)  37 s

Ray's own chatter that the workers print (its report dumps, checkpoint and worker-group messages,
core_worker lines) is hidden unless ``sdo -v``; log.txt receives every line either way, worker output
included. Epochs and steps are counted from 1 here, as a person counts them.
"""
from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOG_FILE = "log.txt"
_PROGRESS_INTERVAL = 1.0  # seconds between rank 0's progress events (a queue put costs a round trip)
# Ray's chatter in the workers' and the controller's output, hidden at the default verbosity
RAY_NOISE = re.compile(
    r"Reporting training result|Checkpoint successfully created|core_worker\.cc|Requesting resources"
    r"|training worker group|^- \(ip=|Setting up process group|Moving model to device|Wrapping provided model"
    r"|mlflow\.system_metrics")
_MLFLOW_NOISE = ("Saving pytorch model by Pickle",)  # the driver's MLflow Model is sdo's own, loaded by sdo


class _DropMlflowNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return _verbose or not any(text in record.getMessage() for text in _MLFLOW_NOISE)

_verbose = False


def set_verbose(verbose: bool) -> None:
    """``sdo -v``: show Ray's and MLflow's messages too. Default: sdo's own lines and warnings."""
    global _verbose
    _verbose = verbose
    level = logging.INFO if verbose else logging.WARNING
    for name in ("mlflow", "ray"):
        logging.getLogger(name).setLevel(level)
    pytorch_logger = logging.getLogger("mlflow.pytorch")
    if not any(isinstance(f, _DropMlflowNoise) for f in pytorch_logger.filters):
        pytorch_logger.addFilter(_DropMlflowNoise())
    # MLflow sets its loggers' level from this when it is imported (here, in Ray's workers: later)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    if not verbose:
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def is_verbose() -> bool:
    return _verbose


def append_log(run_dir: str | os.PathLike, lines) -> None:
    """Add ``lines`` (said after the run's console closed) to its log.txt."""
    with open(Path(run_dir) / LOG_FILE, "a", encoding="utf-8") as f:
        f.writelines(line + "\n" for line in lines)


# ------------------------------------------------------------------------------------ rank 0


class ProgressSender:
    """Rank 0's side: puts progress events on the driver's queue, at most one step event per second."""

    def __init__(self, queue, *, epochs: int, steps_per_epoch: int, world_size: int, log_every: int):
        self.queue, self.epochs, self.steps, self.world = queue, epochs, steps_per_epoch, world_size
        self.log_every = log_every
        self._last = 0.0

    def _put(self, event: dict) -> None:
        try:
            self.queue.put_nowait(event)
        except Exception as err:  # noqa: BLE001 - a driver gone or busy must never stop training
            log.debug("progress event dropped: %s", err)

    def step(self, *, epoch: int, step_in_epoch: int, global_step: int, loss: float, lr: float, images: int,
             seconds: float) -> None:
        """``images``: rank 0's images of this epoch so far; ``seconds``: this epoch's training time so far."""
        logged = global_step % self.log_every == 0
        now = time.monotonic()
        if not logged and now - self._last < _PROGRESS_INTERVAL and step_in_epoch < self.steps:
            return
        self._last = now
        per_step = seconds / max(step_in_epoch, 1)
        remaining = (self.epochs - epoch - 1) * self.steps + self.steps - step_in_epoch
        self._put({"kind": "step", "epoch": epoch + 1, "epochs": self.epochs, "step": step_in_epoch,
                   "steps": self.steps, "loss": loss, "lr": lr, "logged": logged,
                   "img_per_s": images * self.world / max(seconds, 1e-9), "eta": remaining * per_step})

    def epoch(self, *, epoch: int, loss: float, ap: float | None, best: tuple[float, int] | None,
              seconds: float) -> None:
        """``best``: (AP, 0-based epoch) of the best evaluation so far."""
        self._put({"kind": "epoch", "epoch": epoch + 1, "epochs": self.epochs, "loss": loss, "AP": ap,
                   "best": None if best is None else (best[0], best[1] + 1), "seconds": seconds})


# ------------------------------------------------------------------------------------ the driver


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def step_line(event: dict) -> str:
    return (f"epoch {event['epoch']}/{event['epochs']}  step {event['step']}/{event['steps']}  "
            f"loss {event['loss']:.2f}  lr {event['lr']:.1e}  {event['img_per_s']:.1f} img/s  "
            f"ETA {_clock(event['eta'])}")


def epoch_line(event: dict) -> str:
    """``epoch 3/10  loss 12.78  AP 0.006 (best 0.006 @ 3)  37 s`` (no AP part on an epoch without eval)."""
    parts = [f"epoch {event['epoch']}/{event['epochs']}", f"loss {event['loss']:.2f}"]
    if event.get("AP") is not None:
        best = event.get("best")
        parts.append(f"AP {event['AP']:.3f}" + (f" (best {best[0]:.3f} @ {best[1]})" if best else ""))
    parts.append(f"{event['seconds']:.0f} s")
    return "  ".join(parts)


def _bar(event: dict, width: int = 20) -> str:
    done = int(width * event["step"] / max(event["steps"], 1))
    line = step_line(event)
    head, tail = line.split("  loss ", 1)
    return f"{head} [{'#' * done}{'.' * (width - done)}]  loss {tail}"


class Console:
    """The driver's side of one run (a context manager): the progress queue, drawing, log.txt, and the
    filter on the workers' output. ``queue`` is the handle to pass to the workers."""

    def __init__(self, run_dir: str | os.PathLike, *, stream=None, verbose: bool | None = None):
        self.path = Path(run_dir) / LOG_FILE
        self.stream = stream if stream is not None else sys.stdout
        self.verbose = _verbose if verbose is None else verbose
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.queue = None
        self._file = None
        self._lock = threading.RLock()
        self._bar_shown = False
        self._stop = threading.Event()
        self._thread = None
        self._ray_handlers = None
        self._log_handler = None

    # ------------------------------------------------------------------ output

    def _write_file(self, text: str) -> None:
        if self._file is not None:
            self._file.write(text if text.endswith("\n") else text + "\n")
            self._file.flush()

    def _clear_bar(self) -> None:
        if self._bar_shown:
            self.stream.write("\r\x1b[K")
            self._bar_shown = False

    def echo(self, line: str) -> None:
        """A line for the person and log.txt."""
        with self._lock:
            self._clear_bar()
            self.stream.write(line + "\n")
            self.stream.flush()
            self._write_file(line)

    def show(self, event: dict) -> None:
        with self._lock:
            if event["kind"] == "epoch":
                self.echo(epoch_line(event))
            elif self.tty:
                self.stream.write("\r\x1b[K" + _bar(event))
                self.stream.flush()
                self._bar_shown = True
                if event["logged"]:
                    self._write_file(step_line(event))
            elif event["logged"]:
                self.echo(step_line(event))

    def _worker_lines(self, data: dict, forward) -> None:
        """Ray's log batch from a worker / actor: all of it to log.txt, the non-chatter to the terminal."""
        lines = data.get("lines", [])
        who = data.get("actor_name") or data.get("task_name") or ""
        with self._lock:
            for line in lines:
                self._write_file(f"({who} pid={data.get('pid')}) {line}")
            shown = lines if self.verbose else [line for line in lines if not RAY_NOISE.search(line)]
            if shown:
                self._clear_bar()
                forward({**data, "lines": shown})

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> Console:  # noqa: PYI034 - not meant to be subclassed
        from ray.util.queue import Queue

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")  # closed in __exit__
        self.queue = Queue(actor_options={"num_cpus": 0})
        self._hook_ray_output()
        self._log_handler = logging.FileHandler(self.path, encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logging.getLogger().addHandler(self._log_handler)
        self._thread = threading.Thread(target=self._drain, name="sdo-console", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._drain_now()
        with self._lock:
            self._clear_bar()
            self.stream.flush()
        self._unhook_ray_output()
        logging.getLogger().removeHandler(self._log_handler)
        self._log_handler.close()
        try:
            self.queue.shutdown()
        except Exception as err:  # noqa: BLE001 - Ray may already be going down
            log.debug("progress queue not shut down: %s", err)
        self._file.close()
        self._file = None

    def _drain_now(self) -> None:
        try:
            while not self.queue.empty():
                self.show(self.queue.get_nowait())
        except Exception as err:  # noqa: BLE001 - the queue actor may be gone with Ray
            log.debug("progress queue not drained: %s", err)

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                self.show(self.queue.get(timeout=0.5))
            except Empty:
                continue
            except Exception:  # noqa: BLE001 - Ray shutting down: nothing more will come
                return

    def _hook_ray_output(self) -> None:
        """Route Ray's forwarded worker output through :meth:`_worker_lines` (restored on exit)."""
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
        except ImportError:
            return
        with dispatcher._lock:
            self._ray_handlers = list(dispatcher.handlers)
            dispatcher.handlers = [(name, self._filtered(handler) if name == "ray_print_logs" else handler)
                                   for name, handler in self._ray_handlers]

    def _filtered(self, handler):
        return lambda data: self._worker_lines(data, handler)

    def _unhook_ray_output(self) -> None:
        if self._ray_handlers is None:
            return
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher

        with dispatcher._lock:
            dispatcher.handlers = self._ray_handlers
        self._ray_handlers = None

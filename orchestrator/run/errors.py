"""What can go wrong in a run, by class: what will recur fails at once; only infrastructure spends
``train.max_failures`` (orchestrator.train.fault_tolerance applies this to Ray Train).

Permanent (a retry meets the same error, so the run fails at once, naming the cause):
- bad input: ValueError and its kin (config, data — pipelines.errors.DataError —, json, an index that
  lies, a checkpoint that does not load), LookupError, TypeError, files that are missing or unreadable (FileNotFoundError,
  PermissionError, IsADirectoryError, NotADirectoryError) -> exit 2 at the CLI;
- a diverged run: FloatingPointError (a NaN / inf loss, named by epoch and step) -> exit 1.

Infrastructure (a restarted worker group can get past it, from the latest checkpoint):
- a worker or node lost (Ray's ActorDiedError, a SIGKILLed or OOM-killed process),
- collective timeouts and broken connections (gloo / NCCL RuntimeErrors, ConnectionError, TimeoutError),
- everything not listed as permanent.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

PERMANENT_OS_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


class PermanentError(Exception):
    """Base of sdo's own errors that will recur on retry."""


class CheckpointError(PermanentError, ValueError):
    """A checkpoint file is missing, truncated or is not an sdo training checkpoint."""


class RunInterrupted(KeyboardInterrupt):
    """The user stopped the run (Ctrl-C); it stopped at a checkpoint and can be resumed."""

    def __init__(self, name: str, command: str = "launch"):
        super().__init__(f"interrupted; continue with sdo {command} --name {name} --resume")
        self.name, self.command = name, command


def is_permanent(error: BaseException) -> bool:
    """True for an error that a restart would meet again (see the module doc for the classes)."""
    if isinstance(error, PermanentError):
        return True
    if isinstance(error, OSError):
        return isinstance(error, PERMANENT_OS_ERRORS)
    return isinstance(error, (ValueError, LookupError, TypeError, FloatingPointError))


def root_cause(worker_failures: dict[int, BaseException]) -> BaseException | None:
    """The error to report for a failed worker group: the lowest rank's permanent error, else the lowest rank's."""
    if not worker_failures:
        return None
    ranks = sorted(worker_failures)
    permanent = [r for r in ranks if is_permanent(worker_failures[r])]
    return worker_failures[(permanent or ranks)[0]]


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM inside the block raises KeyboardInterrupt, so it stops a run (or the UI) as Ctrl-C does:
    cleanup runs and nothing is left behind. Only the main thread can set handlers; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

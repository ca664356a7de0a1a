"""Outlives a SIGKILLed driver just long enough to stop the embedded Ray it started.

``ray.init()`` starts the head's processes (GCS, raylet, dashboard and its agents) as the driver's
descendants. A driver that exits normally, on Ctrl-C or on SIGTERM shuts them down itself; one killed
with SIGKILL cannot, and some of Ray's agents then live on as orphans. The reaper, started by
:func:`orchestrator.cluster.local.ray_session`, notes the driver's descendants every second and kills
them once the driver is gone. It ignores SIGINT: a terminal's Ctrl-C is the driver's to handle.

Run as ``python -m orchestrator.cluster.reaper DRIVER_PID``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

POLL_S = 1.0


def start(driver_pid: int | None = None) -> subprocess.Popen:
    """Start the reaper of ``driver_pid`` (default: this process) in the background."""
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cluster.reaper", str(driver_pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


class Reaper:
    """The driver's descendants, noted as they appear, and how to stop them."""

    def __init__(self, driver_pid: int):
        self.me = os.getpid()
        self.driver = psutil.Process(driver_pid)
        self.known: dict[int, float] = {}  # pid -> create time, so that a reused pid is never killed

    def note(self) -> bool:
        """Note the driver's current descendants -> False once the driver is gone."""
        try:
            if not self.driver.is_running() or self.driver.status() == psutil.STATUS_ZOMBIE:
                return False
            for child in self.driver.children(recursive=True):
                if child.pid != self.me:
                    self.known.setdefault(child.pid, child.create_time())
        except psutil.NoSuchProcess:
            return False
        return True

    def kill(self, *, only_ray: bool) -> int:
        """SIGKILL the noted processes still alive (``only_ray``: those whose command line is Ray's) -> count."""
        killed = 0
        for pid, created in self.known.items():
            try:
                process = psutil.Process(pid)
                if process.create_time() != created:
                    continue
                if only_ray and not any("ray" in part for part in process.cmdline()):
                    continue
                process.kill()
                killed += 1
            except psutil.Error:
                continue
        return killed


def watch(driver_pid: int, poll_s: float = POLL_S) -> int:
    """Until ``driver_pid`` exits, note its descendants; then SIGKILL those still alive -> how many.

    SIGTERM (the driver's own normal exit, after ``ray.shutdown()``) kills what is left of Ray's
    processes at once and leaves the driver's other children alone.
    """
    try:
        reaper = Reaper(driver_pid)
    except psutil.NoSuchProcess:
        return 0

    def on_sigterm(signum, frame):
        reaper.kill(only_ray=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_sigterm)
    while reaper.note():
        time.sleep(poll_s)
    return reaper.kill(only_ray=False)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    watch(int(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

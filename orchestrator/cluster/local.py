"""The embedded default: Ray on this machine, bound to 127.0.0.1, and a run trained next to it.

A Ray Job's entry point (orchestrator.cluster.jobs) runs the same :func:`train_local`, attached to
the cluster it runs in.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator

from orchestrator.cluster import reaper as reaper_process
from orchestrator.config import Config
from orchestrator.run.directory import local_dir
from orchestrator.run.errors import sigterm_as_interrupt
from orchestrator.train.console import append_log, is_verbose


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Ray for this process: attach to the cluster a Ray Job runs in, or start an embedded one.

    The embedded Ray binds to 127.0.0.1 and runs the dashboard, which Ray 2.60 needs to clean up
    placement groups of finished trainers. It is shut down on exit (normal, Ctrl-C, SIGTERM); a reaper
    process (orchestrator.cluster.reaper) stops it should this process be SIGKILLed. An attached
    cluster is left alone.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    reaper = None
    if os.environ.get("RAY_ADDRESS"):  # inside a Ray Job: the cluster is already there
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        port = cfg.cluster.dashboard_port if _port_free(cfg.cluster.dashboard_port) else free_port()
        reaper = reaper_process.start()
        ray.init(num_cpus=cfg.cluster.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=port, _node_ip_address="127.0.0.1",
                 logging_level=logging.INFO if is_verbose() else logging.WARNING)
    try:
        with sigterm_as_interrupt():  # SIGTERM ends the run like Ctrl-C (KILLED, resumable)
            yield
    finally:
        ray.shutdown()
        if reaper is not None:
            reaper.terminate()
            reaper.wait(timeout=10)


def train_local(cfg: Config, *, name: str, resume: bool, echo: Callable[[str], None] = print) -> dict:
    """Preflight (once: bad input costs nothing, Ray has not started yet), then open the run and train it on the
    embedded Ray or the cluster this process runs in -> the result summary of run_training."""
    from orchestrator.run.lifecycle import open_run
    from orchestrator.run.preflight import preflight
    from orchestrator.train.driver import run_training

    resolved = preflight(cfg, name=name, resume=resume)
    with ray_session(resolved):
        run = open_run(resolved, name=name, resume=resume)
        summary = run_training(resolved, run, console=True)
    ap = summary["AP"]
    lines = [f"sdo: run {summary['name']} finished: AP={ap:.4f}" if ap is not None else
             f"sdo: run {summary['name']} finished (no evaluation)",
             f"sdo: best checkpoint: {summary['best_checkpoint']}", f"sdo: MLflow run: {summary['run_url']}"]
    for line in lines:
        echo(line)
    append_log(local_dir(summary["run_dir"]), lines)  # log.txt is local, beside a run in object storage
    return summary

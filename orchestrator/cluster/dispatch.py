"""``--cluster`` -> where a training runs: embedded local Ray, an existing cluster (Ray Jobs API), or KubeRay.

Only ``--cluster`` changes between them; every path ends in :func:`orchestrator.cluster.local.train_local`
running next to a Ray head (here, on the cluster's head as a Ray Job, or in a RayJob's submitter pod).
`sdo sweep` dispatches the same way (orchestrator.sweep.tuner.sweep_on).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from orchestrator.cluster.jobs import submit_job
from orchestrator.cluster.local import train_local
from orchestrator.config import Config, cluster_kind, dump_yaml
from orchestrator.run.directory import check_name


def checked_cluster_kind(address: str) -> str:
    """:func:`config.cluster_kind`, and a KubeRay spec must exist here."""
    kind = cluster_kind(address)
    if kind == "kubernetes" and not Path(address).is_file():
        raise FileNotFoundError(f"--cluster {address}: no such cluster spec")
    return kind


def train_on(cfg: Config, *, cluster: str | None = None, name: str, resume: bool = False,
             dry_run: bool = False, echo: Callable[[str], None] = print) -> dict | int:
    """Run a training where ``cluster`` (default ``cfg.cluster.address``) says.

    local -> the result summary dict of :func:`orchestrator.train.driver.run_training`; http(s) -> 0 once the Ray
    Job succeeded (raises otherwise); *.yaml -> the exit status of the RayJob (orchestrator.cluster.kuberay.rayjob).
    """
    check_name(name)
    address = cluster or cfg.cluster.address
    cfg.cluster.address = address
    kind = checked_cluster_kind(address)
    if kind == "local":
        if dry_run:
            echo(dump_yaml(cfg))
            return 0
        return train_local(cfg, name=name, resume=resume, echo=echo)
    if kind == "ray-jobs":
        return submit_job(cfg, address=address, name=name, resume=resume, dry_run=dry_run, echo=echo)
    from orchestrator.cluster.kuberay.rayjob import submit_rayjob

    return submit_rayjob(cfg, address, name=name, command="launch", dry_run=dry_run, resume=resume)

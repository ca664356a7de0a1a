"""Runs on an existing Ray cluster through the Ray Jobs API (``--cluster http(s)://HEAD:8265``).

The config travels in the job's runtime env; the job's entry point on the head
(``python -m orchestrator.cluster.jobs`` for training, ``python -m orchestrator.sweep`` for a sweep)
reads it with :func:`config_from_env` and runs the same local code attached to that cluster.
"""
from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from orchestrator.cluster.local import train_local
from orchestrator.config import Config, ConfigError, dump_yaml, load_config

CONFIG_ENV = "SDO_CONFIG_YAML"
JOB_TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
TRAINING_ENTRY = "orchestrator.cluster.jobs"


class ClusterUnreachable(ValueError):
    """The Ray cluster address does not answer (bad ``--cluster``)."""


def ray_auth_headers() -> dict[str, str]:
    """Bearer token for clusters with token auth (the Ray 2.60 default) -> HTTP headers.

    The token comes from RAY_AUTH_TOKEN, the file RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, as
    Ray's own clients look for it. It is sent explicitly because Ray's client adds it only when
    RAY_AUTH_MODE=token was set before Ray was first imported in this process.
    """
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()
        token = path.read_text().strip() if path.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_paths_for_remote(cfg: Config, address: str) -> None:
    """A Ray Job resolves paths on the head, not here: they must be absolute (or URLs) to mean one place."""
    for key, value in (("train.storage_path", cfg.train.storage_path), ("data.train_shards", cfg.data.train_shards),
                       ("data.val_shards", cfg.data.val_shards), ("tracking.uri", cfg.tracking.uri)):
        if value and "://" not in value and not value.startswith("pipe:") and not Path(value).is_absolute():
            raise ConfigError(f"{key}={value!r}: a Ray Jobs cluster ({address}) resolves paths on its head; "
                              "give an absolute path (on storage the head sees) or a URL")


def check_cluster(address: str, timeout: float = 5.0) -> None:
    """Raise ClusterUnreachable unless a Ray dashboard answers at ``address``."""
    try:
        with urllib.request.urlopen(address.rstrip("/") + "/api/version", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # something that speaks HTTP: the Jobs client reports auth or API problems itself
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise ClusterUnreachable(f"--cluster {address}: no Ray dashboard answers there ({reason})") from None


def job_entrypoint(name: str, resume: bool, module: str = TRAINING_ENTRY) -> str:
    """The command the Ray Job runs on the head: the same local run (``module``), attached to that cluster."""
    args = ["python", "-m", module, "--name", name]
    if resume:
        args.append("--resume")
    return " ".join(shlex.quote(a) for a in args)


def submit_job(cfg: Config, *, address: str, name: str, resume: bool = False, dry_run: bool = False,
               follow: bool = True, echo: Callable[[str], None] = print, poll_s: float = 1.0,
               module: str = TRAINING_ENTRY) -> int:
    """Submit a run as a Ray Job (config shipped in the runtime env), then follow its logs.

    ``module`` is the job's entry point on the head: this module (training) or
    ``orchestrator.sweep`` (a whole sweep); both read the config with :func:`config_from_env`.
    """
    from orchestrator.run.tracking import check_reachable, tracking_uri

    check_paths_for_remote(cfg, address)
    runtime_env = {"env_vars": {CONFIG_ENV: dump_yaml(cfg)}}
    entrypoint = job_entrypoint(name, resume, module)
    if dry_run:
        echo(json.dumps({"address": address, "entrypoint": entrypoint, "runtime_env": runtime_env}, indent=2))
        return 0
    if cfg.tracking.uri and cfg.tracking.uri.startswith(("http://", "https://")):
        check_reachable(tracking_uri(cfg))
    check_cluster(address)
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address, headers=ray_auth_headers())
    job_id = _submit_with_retry(client, entrypoint, runtime_env, name)
    echo(f"sdo: submitted Ray job {job_id} to {address}")
    if not follow:
        return 0
    asyncio.run(_follow_logs(client, job_id, echo))
    status = _wait(client, job_id, poll_s)
    echo(f"sdo: Ray job {job_id} {status}")
    if status != "SUCCEEDED":
        info = client.get_job_info(job_id)
        raise RuntimeError(f"Ray job {job_id} ended {status}: {info.message or 'see its logs above'}")
    return 0


def _submit_with_retry(client, entrypoint: str, runtime_env: dict, name: str, attempts: int = 30) -> str:
    """A freshly started head answers HTTP before its job agent is up ('No available agent'): retry."""
    submission_id = f"sdo-{name}-{int(time.time())}"
    for attempt in range(attempts):
        try:
            return client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id)
        except RuntimeError as err:
            if "No available agent" not in str(err) or attempt == attempts - 1:
                raise
            time.sleep(2.0)
    raise RuntimeError("unreachable")  # pragma: no cover - the loop returns or raises


async def _follow_logs(client, job_id: str, echo: Callable[[str], None]) -> None:
    async for lines in client.tail_job_logs(job_id):
        for line in lines.rstrip("\n").splitlines():
            echo(line)


def _wait(client, job_id: str, poll_s: float) -> str:
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in JOB_TERMINAL:
            return status
        time.sleep(poll_s)


def config_from_env() -> Config:
    """Inside a Ray Job: the config that :func:`submit_job` shipped in the runtime env."""
    import tempfile

    text = os.environ.get(CONFIG_ENV)
    if not text:
        raise ConfigError(f"{CONFIG_ENV} is not set; this entry point runs inside a Ray Job")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write(text)
    try:
        return load_config(f.name)
    finally:
        os.unlink(f.name)


def job_setup(prog: str, argv: list[str] | None):
    """A Ray Job entry point's ``--name N [--resume]`` and the shipped config; exit 2 if it is missing or bad."""
    import argparse

    parser = argparse.ArgumentParser(prog=prog)
    parser.add_argument("--name", required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    try:
        return config_from_env(), args
    except ConfigError as err:
        print(f"sdo: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def job_main(argv: list[str] | None = None) -> int:
    """Entry point of a Ray Job: config from the runtime env, train on the cluster the job runs in."""
    cfg, args = job_setup(f"python -m {TRAINING_ENTRY}", argv)
    train_local(cfg, name=args.name, resume=args.resume)  # cluster.address names the head: it is this one
    return 0


if __name__ == "__main__":
    sys.exit(job_main())

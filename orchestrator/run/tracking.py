"""MLflow tracking of a run: where runs go, creating / resuming / finishing one, logging from rank 0.

The embedded default is a sqlite store with a file artifact root under ``<storage_path>/mlflow``.
Both URIs are absolute so that Ray workers, whose working directory is not the driver's, resolve
them to the same files. The driver creates the run (or finds it again on a restart or ``--resume``);
workers only ever attach to it by id, so a restarted worker group never creates a second run.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from orchestrator.config import Config, ConfigError, cluster_kind, flatten
from orchestrator.run.directory import storage_root
from orchestrator.run.storage import RemotePath

log = logging.getLogger(__name__)

# Every call to an MLflow server is bounded: connect + read timeout and a few retries with backoff
# (MLflow's own settings; set before Ray starts, so the workers inherit them). A user's values win.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "2")

UI_PORT = 5000
WORKER_GROUP_STARTS = "sdo.worker_group_starts"
_BATCH = 100  # MLflow's limit of params/tags per log_batch call
_MAX_PARAM_LENGTH = 6000


class TrackingUnreachable(ValueError):
    """The configured MLflow tracking server does not answer; raised before any training starts."""


def embedded_store(storage) -> tuple[str, str]:
    """(tracking URI, artifact root URI) of the sqlite store under ``storage/mlflow``."""
    if isinstance(storage, RemotePath) or "://" in str(storage):
        raise ConfigError(f"train.storage_path={str(storage)!r}: the embedded MLflow store is a sqlite file and needs "
                          "a local folder; with runs in object storage set tracking.uri (an MLflow server, or "
                          "sqlite:////a/local/mlflow.db)")
    root = Path(storage).expanduser().resolve() / "mlflow"
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def tracking_uri(cfg: Config) -> str:
    """The MLflow tracking URI of a run: ``tracking.uri`` or the embedded sqlite store."""
    if cfg.tracking.uri:
        uri = cfg.tracking.uri
        if "://" not in uri:  # a bare directory means a file store there, made absolute for workers
            return Path(uri).expanduser().resolve().as_uri()
        return uri
    return embedded_store(storage_root(cfg))[0]


def _artifact_location(cfg: Config) -> str | None:
    """Artifact root for new experiments; only the embedded store needs one (a server has its own)."""
    return None if cfg.tracking.uri else embedded_store(storage_root(cfg))[1]


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Raise TrackingUnreachable unless ``uri`` can be used now.

    http(s) servers must answer their ``/health`` endpoint; a sqlite store's directory must be
    creatable. Nothing is trained before this passes.
    """
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as reply:
                if reply.status != 200:
                    raise TrackingUnreachable(f"MLflow tracking server {uri} answered HTTP {reply.status} on /health")
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise TrackingUnreachable(f"MLflow tracking server {uri} is unreachable ({reason}); "
                                      "start it or fix tracking.uri") from None
        return
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingUnreachable(f"MLflow store {uri}: cannot create {db.parent} ({err.strerror})") from None
        return
    if uri.startswith("file:"):
        return
    raise TrackingUnreachable(f"tracking.uri={uri!r}: unsupported scheme (use http(s)://, sqlite:/// or a directory)")


def experiment_id(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Id of the experiment ``name``, created on first use (races between processes tolerated)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def git_commit() -> str:
    """Commit of the source tree the run executes from ('unknown' outside a git checkout)."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 else "unknown"


def run_tags(cfg: Config, *, name: str) -> dict[str, str]:
    tags = {
        "mlflow.runName": name,
        "git_commit": git_commit(),
        "rho": str(cfg.model.rho),
        "backbone": cfg.model.backbone.name,
        "cluster_kind": cluster_kind(cfg.cluster.address),
        "sdo.run_name": name,
    }
    if cfg.tracking.parent_run_id:
        tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
    return tags


def _param_value(value: Any) -> str:
    text = "null" if value is None else str(value)
    return text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."


def create_run(cfg: Config, *, name: str) -> tuple[str, str]:
    """Create the MLflow run of a training (params = every flattened config field, tags).

    Returns (experiment_id, run_id). Nested under ``tracking.parent_run_id`` when it is set.
    """
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, _artifact_location(cfg))
    run = client.create_run(exp_id, run_name=name, tags=run_tags(cfg, name=name))
    params = [Param(key, _param_value(value)) for key, value in sorted(flatten(cfg).items())]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run.info.run_id, params=params[start:start + _BATCH])
    return exp_id, run.info.run_id


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """Browser URL of a run: the server itself, or `sdo ui` (127.0.0.1:5000) for a local store."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    return f"{base}/#/experiments/{exp_id}/runs/{run_id}"


def set_status(uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED / FAILED / KILLED / RUNNING."""
    client = MlflowClient(tracking_uri=uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics, tags and artifacts into an existing run (used by rank 0 and the driver)."""

    def __init__(self, uri: str, run_id: str, *, exactly_once: bool = False):
        """``exactly_once``: a (metric, step) already in the run is never logged again, so that steps
        trained again after a restore from a checkpoint do not repeat points (steps only grow within a run)."""
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._logged_through: dict[str, int] | None = {} if exactly_once else None

    def _new(self, key: str, step: int) -> bool:
        if self._logged_through is None:
            return True
        if key not in self._logged_through:
            history = self.client.get_metric_history(self.run_id, key)
            self._logged_through[key] = max((m.step for m in history), default=-1)
        if step <= self._logged_through[key]:
            return False
        self._logged_through[key] = step
        return True

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, int(step)) for k, v in values.items()
                 if v is not None and self._new(k, int(step))]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def tags(self, values: Mapping[str, Any]) -> None:
        batch = [RunTag(k, str(v)) for k, v in values.items()]
        for start in range(0, len(batch), _BATCH):
            self.client.log_batch(self.run_id, tags=batch[start:start + _BATCH])

    def artifact(self, path, artifact_path: str | None = None) -> None:
        """Log a local file or folder, or one object of a run in object storage (a RemotePath)."""
        if isinstance(path, RemotePath):
            self.client.log_text(self.run_id, path.read_text(), "/".join(filter(None, [artifact_path, path.name])))
            return
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def history(self, keys: Iterable[str]) -> dict[str, list[tuple[int, float]]]:
        """Metric key -> [(step, value)] sorted by step; a step logged twice keeps its last value."""
        out = {}
        for key in keys:
            points: dict[int, tuple[int, float]] = {}
            for m in self.client.get_metric_history(self.run_id, key):
                if m.step not in points or m.timestamp >= points[m.step][0]:
                    points[m.step] = (m.timestamp, m.value)
            if points:
                out[key] = [(step, points[step][1]) for step in sorted(points)]
        return out

    def count_start(self) -> int:
        """One more start of the run's worker group (tag ``sdo.worker_group_starts``) -> the count."""
        starts = int(self.client.get_run(self.run_id).data.tags.get(WORKER_GROUP_STARTS, 0)) + 1
        self.client.set_tag(self.run_id, WORKER_GROUP_STARTS, str(starts))
        return starts

    def metric_keys(self) -> list[str]:
        return sorted(self.client.get_run(self.run_id).data.metrics)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


def start_ui(storage: Path, port: int = UI_PORT, host: str = "127.0.0.1", **popen_kwargs) -> subprocess.Popen:
    """Start ``mlflow ui`` for the embedded store under ``storage`` (bound to 127.0.0.1).

    It runs in a process group of its own (its server forks job runners), so that :func:`stop_ui` can
    stop all of it at once.
    """
    uri, artifacts = embedded_store(storage)
    db = Path(uri[len("sqlite:///"):])
    if not db.is_file():
        raise FileNotFoundError(f"no MLflow store at {db}; run `sdo launch` first or pass --storage")
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--default-artifact-root", artifacts,
           "--host", host, "--port", str(port), "--workers", "1"]
    return subprocess.Popen(cmd, start_new_session=True, **popen_kwargs)


def stop_ui(process: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop the UI started by :func:`start_ui` and every process of its group, and reap it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        try:  # the server is gone; its job runners may not be
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break

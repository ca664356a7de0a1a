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
# MLflow 3 opens an experiment on its GenAI overview unless told it holds model training
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
UI_QUERY = "workflowType=machine_learning"
# The runs table's columns on a first visit: a view state stored as an experiment tag, named in the URL
VIEW_KEY = "sdo"
RUNS_TABLE_COLUMNS = ("params.`model.rho`", "params.`loss.enc_aux_coef`", "metrics.`val/AP`", "metrics.`val/AP50`",
                      "metrics.`model/GFLOPs`", "metrics.`model/latency_ms`", "tags.`sdo.pareto`",
                      "metrics.`model/params_M`", "metrics.`train/img_per_s`")
GROUPS = ("train/", "val/", "data/", "model/", "system/")
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
    if found is None:
        try:
            client.create_experiment(name, artifact_location=artifact_location)
        except Exception:
            if client.get_experiment_by_name(name) is None:
                raise
        found = client.get_experiment_by_name(name)
    for key, value in {**EXPERIMENT_KIND, f"mlflow.sharedViewState.{VIEW_KEY}": runs_view_state()}.items():
        if found.tags.get(key) != value:
            client.set_experiment_tag(found.experiment_id, key, value)
    return found.experiment_id


def runs_view_state() -> str:
    """The experiment page's view that sdo's URLs open (``viewStateShareKey``): newest runs first, with the
    columns rho, enc_aux_coef, AP, AP50, GFLOPs (850x1040), latency (a sweep's trials), pareto (a sweep's trials:
    on its front), params and img/s shown."""
    import json

    return json.dumps({"orderByKey": "attributes.start_time", "orderByAsc": False,
                       "selectedColumns": list(RUNS_TABLE_COLUMNS)})


VAL_KEYS = ("dam_recall",)  # besides COCO's AP* / AR*: what an evaluation measures


def metric_key(key: str) -> str:
    """The MLflow name of a training metric: grouped ``train/*``, ``val/*`` (COCO AP / AR) or as given."""
    if key.startswith(GROUPS):
        return key
    return f"val/{key}" if key.startswith(("AP", "AR")) or key in VAL_KEYS else f"train/{key}"


def _bare_key(key: str) -> str:
    return key.split("/", 1)[1] if key.startswith(("train/", "val/")) else key


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def git_commit() -> str:
    """Commit of the source tree the run executes from ('unknown' outside a git checkout)."""
    return _git("rev-parse", "HEAD") or "unknown"


def source_tags(command: str) -> dict[str, str]:
    """MLflow's source tags (mlflow.source.*, mlflow.user) of a run started by ``sdo <command>``."""
    import getpass

    tags = {"mlflow.source.name": f"sdo {command}", "mlflow.source.type": "LOCAL"}
    try:
        tags["mlflow.user"] = getpass.getuser()
    except (KeyError, OSError):
        pass
    commit = _git("rev-parse", "HEAD")
    if commit:
        tags["mlflow.source.git.commit"] = commit
        branch = _git("rev-parse", "--abbrev-ref", "HEAD")
        if branch and branch != "HEAD":
            tags["mlflow.source.git.branch"] = branch
        remote = _git("config", "--get", "remote.origin.url")
        if remote:
            tags["mlflow.source.git.repoURL"] = remote
    return tags


def run_tags(cfg: Config, *, name: str, command: str = "launch") -> dict[str, str]:
    tags = {
        **source_tags(command),
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


def create_run(cfg: Config, *, name: str, command: str = "launch") -> tuple[str, str]:
    """Create the MLflow run of a training (params = every flattened config field, tags).

    Returns (experiment_id, run_id). Nested under ``tracking.parent_run_id`` when it is set.
    """
    uri = tracking_uri(cfg)
    client = MlflowClient(tracking_uri=uri)
    exp_id = experiment_id(client, cfg.tracking.experiment, _artifact_location(cfg))
    run = client.create_run(exp_id, run_name=name, tags=run_tags(cfg, name=name, command=command))
    params = [Param(key, _param_value(value)) for key, value in sorted(flatten(cfg).items())]
    for start in range(0, len(params), _BATCH):
        client.log_batch(run.info.run_id, params=params[start:start + _BATCH])
    return exp_id, run.info.run_id


def ui_base(uri: str, port: int = UI_PORT) -> str:
    """Where the UI of ``uri`` is: the server itself, or `sdo ui` (127.0.0.1:port) for a local store."""
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{port}"


def shard_dataset(source: str, split: str):
    """The MLflow Dataset entity of a shard set: its source, an index digest and the counts (profile)."""
    import hashlib
    import json

    from mlflow.entities import Dataset

    from pipelines.sources import resolve_shards

    shard_set = resolve_shards(source)
    index = shard_set.index
    digest = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
    profile = {"num_samples": shard_set.num_samples, "num_shards": len(shard_set.shards),
               "num_annotations": index.get("num_annotations"), "num_categories": len(index.get("categories", []))}
    return Dataset(name=f"{split}_shards", digest=digest, source_type="sdo-webdataset",
                   source=json.dumps({"uri": source, "format": index.get("format")}),
                   schema=json.dumps({"sample": ["__key__", "jpg", "json"]}), profile=json.dumps(profile))


def log_dataset_inputs(uri: str, run_id: str, cfg: Config) -> None:
    """The train and val shards as the run's dataset inputs (context tags ``training`` / ``validation``).

    Descriptive only: a source that does not resolve here (preflight has checked it where it matters)
    is named in the tag ``sdo.dataset_inputs_missing`` instead of failing the run being opened.
    """
    from mlflow.entities import DatasetInput, InputTag

    from pipelines.errors import DataError

    client, inputs, missing = MlflowClient(tracking_uri=uri), [], []
    for split, source, context in (("train", cfg.data.train_shards, "training"),
                                   ("val", cfg.data.val_shards, "validation")):
        try:
            inputs.append(DatasetInput(shard_dataset(source, split), [InputTag("mlflow.data.context", context)]))
        except (DataError, OSError) as err:
            log.warning("dataset input %s not logged: %s", split, err)
            missing.append(f"{split}: {err}")
    if inputs:
        client.log_inputs(run_id, datasets=inputs)
    if missing:
        client.set_tag(run_id, "sdo.dataset_inputs_missing", "; ".join(missing)[:5000])


def run_url(uri: str, exp_id: str, run_id: str) -> str:
    """Browser URL of a run, on the Model-training view."""
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs/{run_id}?{UI_QUERY}"


def experiment_url(base: str, exp_id: str) -> str:
    """Browser URL of an experiment's runs table (Model-training view, sdo's columns)."""
    return f"{base}/#/experiments/{exp_id}/runs?{UI_QUERY}&viewStateShareKey={VIEW_KEY}"


def set_status(uri: str, run_id: str, status: str) -> None:
    """Mark a run FINISHED / FAILED / KILLED / RUNNING."""
    client = MlflowClient(tracking_uri=uri)
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status=status)


class RunLogger:
    """Logs metrics, tags and artifacts into an existing run (used by rank 0 and the driver)."""

    def __init__(self, uri: str, run_id: str, *, exactly_once: bool = False, grouped: bool = False):
        """``exactly_once``: a (metric, step) already in the run is never logged again, so that steps
        trained again after a restore from a checkpoint do not repeat points (steps only grow within a run).
        ``grouped``: metrics are stored as :func:`metric_key` names (``loss`` -> ``train/loss``, ``AP`` ->
        ``val/AP``) and read back by their bare names; what Ray, Tune and the sweeps see stays bare."""
        self.uri = uri
        self.run_id = run_id
        self.client = MlflowClient(tracking_uri=uri)
        self._logged_through: dict[str, int] | None = {} if exactly_once else None
        self._key = metric_key if grouped else str
        self._grouped = grouped

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
        batch = [Metric(self._key(k), float(v), now, int(step)) for k, v in values.items()
                 if v is not None and self._new(self._key(k), int(step))]
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
            for m in self.client.get_metric_history(self.run_id, self._key(key)):
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
        keys = self.client.get_run(self.run_id).data.metrics
        return sorted(_bare_key(k) for k in keys) if self._grouped else sorted(keys)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status


def ui_urls(storage: Path, port: int = UI_PORT) -> list[tuple[str, str]]:
    """(experiment name, URL of its runs table) of each experiment in the embedded store under ``storage``, the
    most recently created first; each gets the tags that open it on the Model-training view."""
    client = MlflowClient(tracking_uri=embedded_store(storage)[0])
    found = [e for e in client.search_experiments() if e.name != "Default"]
    found.sort(key=lambda e: e.creation_time or 0, reverse=True)
    return [(e.name, experiment_url(ui_base("", port), experiment_id(client, e.name, None))) for e in found]


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

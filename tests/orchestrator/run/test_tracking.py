"""MLflow helpers against a real sqlite store and a real (tiny) HTTP server; checkpoint files."""
from __future__ import annotations

import http.server
import os
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_helpers import free_port

from orchestrator.config import flatten, load_config
from orchestrator.run import checkpoints, tracking
from orchestrator.run.directory import claim_crash, storage_root


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"train.storage_path={tmp_path / 'runs'}", "model.rho=0.2"])


def test_embedded_store_uris_are_absolute(cfg, tmp_path):
    uri = tracking.tracking_uri(cfg)
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow' / 'mlflow.db'}"
    assert tracking.embedded_store(tmp_path / "runs")[1] == (tmp_path / "runs" / "mlflow" / "artifacts").as_uri()
    cfg.tracking.uri = "relative/dir"
    assert tracking.tracking_uri(cfg) == (Path.cwd() / "relative" / "dir").as_uri()
    cfg.tracking.uri = "http://127.0.0.1:5000"
    assert tracking.tracking_uri(cfg) == "http://127.0.0.1:5000"


def test_create_run_logs_every_config_field_and_tags(cfg):
    exp_id, run_id = tracking.create_run(cfg, name="r1")
    run = MlflowClient(tracking.tracking_uri(cfg)).get_run(run_id)
    assert run.info.experiment_id == exp_id
    assert run.info.run_name == "r1"
    expected = {k: ("null" if v is None else str(v)) for k, v in flatten(cfg).items()}
    assert run.data.params == expected
    assert run.data.tags["rho"] == "0.2"
    assert run.data.tags["backbone"] == "resnet50"
    assert run.data.tags["cluster_kind"] == "local"
    assert "mlflow.parentRunId" not in run.data.tags
    # artifacts land under the embedded artifact root, not the working directory
    assert run.info.artifact_uri.startswith(tracking.embedded_store(storage_root(cfg))[1])


def test_child_run_is_nested_under_the_parent(cfg):
    _, parent = tracking.create_run(cfg, name="sweep")
    cfg.tracking.parent_run_id = parent
    _, child = tracking.create_run(cfg, name="trial")
    client = MlflowClient(tracking.tracking_uri(cfg))
    assert client.get_run(child).data.tags["mlflow.parentRunId"] == parent
    exp = client.get_run(child).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert [r.info.run_id for r in children] == [child]


def test_run_logger_history_keeps_the_last_value_of_a_step(cfg):
    _, run_id = tracking.create_run(cfg, name="r2")
    logger = tracking.RunLogger(tracking.tracking_uri(cfg), run_id)
    logger.metrics({"loss": 3.0, "lr": 1e-4}, step=1)
    logger.metrics({"loss": 2.0}, step=2)
    logger.metrics({"loss": 1.5}, step=2)  # step 2 re-run after a restart
    assert logger.history(["loss", "lr", "absent"]) == {"loss": [(1, 3.0), (2, 1.5)], "lr": [(1, 1e-4)]}
    tracking.set_status(logger.uri, run_id, "FINISHED")
    assert logger.status() == "FINISHED"


def test_grouped_logger_stores_train_val_names_and_reads_bare_ones(cfg):
    _, run_id = tracking.create_run(cfg, name="r3")
    logger = tracking.RunLogger(tracking.tracking_uri(cfg), run_id, exactly_once=True, grouped=True)
    logger.metrics({"loss": 3.0, "lr": 1e-4, "data/skipped_val_fraction": 0.0}, step=1)
    logger.metrics({"AP": 0.25, "AR100": 0.5}, step=1)
    logger.metrics({"AP": 0.5}, step=1)  # exactly once: a (metric, step) stored is kept
    stored = MlflowClient(logger.uri).get_run(run_id).data.metrics
    assert stored == {"train/loss": 3.0, "train/lr": 1e-4, "data/skipped_val_fraction": 0.0, "val/AP": 0.25,
                      "val/AR100": 0.5}
    assert logger.metric_keys() == ["AP", "AR100", "data/skipped_val_fraction", "loss", "lr"]
    assert logger.history(["AP", "loss"]) == {"AP": [(1, 0.25)], "loss": [(1, 3.0)]}


def test_source_tags_follow_mlflow_conventions(cfg):
    _, run_id = tracking.create_run(cfg, name="r4")
    tags = MlflowClient(tracking.tracking_uri(cfg)).get_run(run_id).data.tags
    assert (tags["mlflow.source.name"], tags["mlflow.source.type"]) == ("sdo launch", "LOCAL")
    if tags["git_commit"] != "unknown":
        assert tags["mlflow.source.git.commit"] == tags["git_commit"]


def test_run_url():
    query = "?workflowType=machine_learning"
    assert tracking.run_url("sqlite:////x/mlflow.db", "3", "abc") == f"http://127.0.0.1:5000/#/experiments/3/runs/abc{query}"
    assert tracking.run_url("https://mlflow.example/", "3", "abc") == f"https://mlflow.example/#/experiments/3/runs/abc{query}"


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


def test_check_reachable_server_and_unreachable_server():
    server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        tracking.check_reachable(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(tracking.TrackingUnreachable, match=dead.replace(".", r"\.")):
        tracking.check_reachable(dead, timeout=2)
    with pytest.raises(tracking.TrackingUnreachable, match="unsupported scheme"):
        tracking.check_reachable("ftp://host/x")


def test_checkpoint_round_trip_and_errors(tmp_path):
    state = {"model": {"w": torch.arange(4.0)}, "optimizer": {"state": {}, "param_groups": []},
             "scheduler": {"last_epoch": 3}, "epoch": 2, "step": 40, "config": {"model": {"rho": 0.1}},
             "mlflow_run_id": "abc"}
    directory = checkpoints.save(tmp_path / "ckpt", state, {"AP": 0.25, "step": 40})
    assert (directory / "config.yaml").read_text().startswith("model:")
    assert checkpoints.read_report(directory) == {"AP": 0.25, "step": 40}
    loaded = checkpoints.load(directory)
    assert torch.equal(loaded["model"]["w"], state["model"]["w"])
    assert (loaded["epoch"], loaded["step"], loaded["mlflow_run_id"]) == (2, 40, "abc")
    assert checkpoints.load(directory / "checkpoint.pt")["scheduler"] == {"last_epoch": 3}
    with pytest.raises(checkpoints.CheckpointError, match="mlflow_run_id"):
        checkpoints.save(tmp_path / "bad", {k: v for k, v in state.items() if k != "mlflow_run_id"})
    assert not (tmp_path / "bad").exists()
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.load(tmp_path / "missing")


def test_crash_hook_fires_once_per_run_dir(tmp_path):
    assert claim_crash(tmp_path) is True
    assert claim_crash(tmp_path) is False
    other = tmp_path / "other"
    other.mkdir()
    assert claim_crash(other) is True  # each run directory has its own marker


def test_ui_serves_the_embedded_store(cfg):
    _, run_id = tracking.create_run(cfg, name="shown")
    port = free_port()
    process = tracking.start_ui(storage_root(cfg), port=port,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, body = time.time() + 120, None
        while time.time() < deadline and process.poll() is None:
            try:
                url = f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/get?run_id={run_id}"
                with urllib.request.urlopen(url, timeout=5) as reply:
                    body = reply.read().decode()
                break
            except OSError:
                time.sleep(1)
        assert body is not None, "mlflow ui did not answer"
        assert run_id in body and '"shown"' in body
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_sdo_ui_leaves_no_process_behind(cfg, stop):
    """`sdo ui` stopped by Ctrl-C (its whole foreground group) or SIGTERM: the MLflow server and its job
    runners go with it, and none is left a zombie."""
    import sys

    import psutil

    tracking.create_run(cfg, name="shown")
    port = free_port()
    sdo = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--storage", str(storage_root(cfg)),
                            "--port", str(port)], start_new_session=True, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    deadline, answered = time.time() + 120, False
    while time.time() < deadline and not answered and sdo.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                answered = True
        except OSError:
            time.sleep(1)
    assert answered, "sdo ui did not answer"
    started = [p.pid for p in psutil.Process(sdo.pid).children(recursive=True)]
    assert started, "mlflow ui runs as a child of sdo"
    if stop == signal.SIGINT:
        os.killpg(sdo.pid, signal.SIGINT)
    else:
        sdo.send_signal(signal.SIGTERM)
    sdo.wait(timeout=60)
    deadline = time.time() + 30
    while time.time() < deadline:
        alive = [pid for pid in started if psutil.pid_exists(pid)]
        if not alive:
            break
        time.sleep(0.5)
    assert alive == [], [psutil.Process(pid).cmdline() for pid in alive if psutil.pid_exists(pid)]


def test_a_black_hole_tracking_server_is_refused_in_seconds_before_anything_starts(tmp_path):
    """A server that accepts connections and never answers: `sdo launch` exits 2 naming it, within seconds."""
    import socket
    import sys

    from train_helpers import make_shards, tiny_config

    shards = make_shards(tmp_path, num_train=4, num_val=2, size=64)
    path, _ = tiny_config(tmp_path / "t.yaml", shards, tmp_path / "runs")
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(16)  # the kernel completes the handshakes; nothing ever reads or answers
        uri = f"http://127.0.0.1:{hole.getsockname()[1]}"
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "launch", "--config", str(path),
                               "--name", "hole", "--set", f"tracking.uri={uri}"], capture_output=True, text=True,
                              timeout=120, check=False)
        seconds = time.monotonic() - started
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdo: error: MLflow tracking server {uri} is unreachable (")
    assert seconds < 60
    assert not (tmp_path / "runs" / "hole").exists()  # nothing was written for the run

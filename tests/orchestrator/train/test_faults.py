"""Fault paths of a training run, done for real on tiny 2-worker CPU runs (real Ray, MLflow, shards).

- a worker killed mid-epoch: the group restarts from the step-level checkpoint and ends with the same
  weights as an uninterrupted twin (nothing trained twice, nothing skipped, dropout draws as they were:
  each rank's RNG state is in the checkpoint), each (metric, step) once;
- a finished run resumed: nothing to train, its final metrics are reported again (a sweep trial keeps them);
- a truncated latest checkpoint: resume falls back to the newest readable one and says which was bad;
- no readable checkpoint at all: a permanent error, the run fails at once (one worker-group start);
- Ctrl-C on `sdo launch`: exit 130 with the resume hint, MLflow KILLED, no partial checkpoint, no
  process left; `--resume` then finishes the run with every (metric, step) once.
Assertions are on what is stored: MLflow history and tags, checkpoint files, processes.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from train_helpers import left_in_session, make_shards, tiny_config

from orchestrator.cluster.dispatch import train_on
from orchestrator.cluster.local import ray_session
from orchestrator.run import checkpoints
from orchestrator.run.directory import STOP_MARKER
from orchestrator.run.errors import CheckpointError
from orchestrator.run.identity import read_identity
from orchestrator.run.lifecycle import open_run
from orchestrator.run.preflight import preflight
from orchestrator.run.tracking import WORKER_GROUP_STARTS, metric_key
from orchestrator.train.driver import run_training

STEPS = 3  # per epoch
CRASH_STEP = 4  # rank 1 dies after global step 4: epoch 1, after its first step's checkpoint
LOSS_KEYS = ("loss", "loss_ce", "loss_bbox", "lr")


def _config(root: Path, shards, name: str, **train):
    # 3 folders: the damaged latest one has two older ones to fall back to
    values = {"epochs": 2, "max_steps_per_epoch": STEPS, **train}
    path, cfg = tiny_config(root / f"{name}.yaml", shards, root / "runs", checkpoint={"every_steps": 1, "keep": 3},
                            **values)
    assert cfg.model.dropout > 0  # the twin comparison holds with dropout: each rank's RNG state is checkpointed
    cfg.eval.dam_images = 0
    return path, cfg


class RecordReports(UserCallback):
    """Appends every report the Ray Train controller receives to a JSON-lines file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the controller actor cannot import tests/


def _final_weights(summary: dict) -> dict:
    return checkpoints.load(summary["checkpoint"])["model"]


def _steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, metric_key(key)))


def _values_by_step(client, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, metric_key(key)), key=lambda m: m.step)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    shards = make_shards(root)
    _, cfg = _config(root, shards, "twin")
    out = {"root": root, "shards": shards}
    with ray_session(cfg):
        out["twin"] = train_on(cfg, cluster="local", name="twin", echo=lambda _: None)
        out["twin_weights"] = _final_weights(out["twin"])

        _, crash_cfg = _config(root, shards, "crashed", crash_at_step=CRASH_STEP)
        out["crashed"] = train_on(crash_cfg, cluster="local", name="crashed", echo=lambda _: None)
        out["crashed_weights"] = _final_weights(out["crashed"])
        client = MlflowClient(out["crashed"]["run"].tracking_uri)
        out["crashed_tags"] = client.get_run(out["crashed"]["mlflow_run_id"]).data.tags

        # resumed with nothing left to train (a sweep trial interrupted after its last checkpoint)
        reports = root / "reports.jsonl"
        resolved = preflight(crash_cfg, name="crashed", resume=True)
        run_training(resolved, open_run(resolved, name="crashed", resume=True), extra_callbacks=[RecordReports(reports)])
        out["reports_again"] = [json.loads(line) for line in reports.read_text().splitlines()]

        # damage the latest checkpoint, then train one more epoch from what is left
        latest = Path(out["crashed"]["checkpoint"]) / checkpoints.CHECKPOINT_FILE
        data = latest.read_bytes()
        latest.write_bytes(data[: len(data) // 2])
        out["truncated"] = latest
        crash_cfg.train.epochs = 3
        out["resumed"] = train_on(crash_cfg, cluster="local", name="crashed", resume=True, echo=lambda _: None)

        # every checkpoint of the twin damaged: nothing to resume from
        for directory in (root / "runs" / "twin").glob("checkpoint_step*"):
            file = directory / checkpoints.CHECKPOINT_FILE
            file.write_bytes(file.read_bytes()[:1000])
        cfg.train.epochs = 3
        started = time.monotonic()
        with pytest.raises(CheckpointError) as failure:
            train_on(cfg, cluster="local", name="twin", resume=True, echo=lambda _: None)
        out["unreadable_error"], out["unreadable_seconds"] = failure.value, time.monotonic() - started
    out["client"] = MlflowClient(out["twin"]["run"].tracking_uri)
    return out


def test_a_killed_worker_resumes_at_the_exact_step(runs):
    tags = runs["crashed_tags"]
    assert tags[WORKER_GROUP_STARTS] == "2"  # the first start and one restart
    assert tags["sdo.resumed_from_step"] == str(CRASH_STEP)
    assert (runs["root"] / "runs" / "crashed" / ".crash_injected").is_file()
    twin, crashed = runs["twin_weights"], runs["crashed_weights"]
    assert twin.keys() == crashed.keys()
    for key in twin:  # the same batches in the same order: no sample trained twice or skipped
        torch.testing.assert_close(crashed[key], twin[key], rtol=0, atol=1e-6, msg=key)


def test_every_metric_step_is_stored_once_and_epochs_increase(runs):
    client, run_id = runs["client"], runs["resumed"]["mlflow_run_id"]
    for key in LOSS_KEYS:
        assert _steps(client, run_id, key) == list(range(1, 3 * STEPS + 1)), key
    for key in ("epoch", "epoch_loss"):
        assert _steps(client, run_id, key) == [STEPS, 2 * STEPS, 3 * STEPS], key
    assert _steps(client, run_id, "AP") == [1, 2, 3]  # val/* is stepped by epoch
    assert _values_by_step(client, run_id, "epoch") == [0.0, 1.0, 2.0]
    # the restarted run retraced the twin's curve: its 2 epochs match the twin's point for point
    twin = _values_by_step(client, runs["twin"]["mlflow_run_id"], "loss")
    assert _values_by_step(client, run_id, "loss")[: 2 * STEPS] == pytest.approx(twin, rel=1e-5)


def test_a_finished_run_resumed_reports_its_final_metrics_again(runs):
    first, reports = runs["crashed"]["metrics"], runs["reports_again"]
    assert len(reports) == 1  # what Tune receives from a trial restored after its last epoch
    again = reports[0]
    assert (again["epochs_done"], again["epoch_end"]) == (2, True)
    for key in ("AP", "AP50", "epoch", "step", "loss"):
        assert again[key] == first[key], key


def test_a_truncated_latest_checkpoint_falls_back_to_the_newest_readable_one(runs):
    client, summary = runs["client"], runs["resumed"]
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert str(runs["truncated"]) in run.data.tags["sdo.unreadable_checkpoints"]
    resumed_from = Path(run.data.tags["sdo.resumed_from"])
    assert resumed_from != runs["truncated"].parent
    assert resumed_from.parent == runs["truncated"].parent.parent
    assert int(run.data.tags["sdo.resumed_from_step"]) < 2 * STEPS  # an older one than the damaged epoch end


def test_no_readable_checkpoint_fails_at_once_naming_the_files(runs):
    error, client = runs["unreadable_error"], runs["client"]
    assert "no readable checkpoint to resume from" in str(error)
    assert str(runs["root"] / "runs" / "twin") in str(error)
    run = client.get_run(runs["twin"]["mlflow_run_id"])
    assert run.info.status == "FAILED"
    assert run.data.tags[WORKER_GROUP_STARTS] == "2"  # the first launch, then one start that failed: no retry


# ------------------------------------------------------------------------------------------ Ctrl-C


def _sdo(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs)


def test_ctrl_c_stops_at_a_checkpoint_then_a_sigkilled_driver_leaves_nothing_and_the_run_resumes(runs):
    """One run through both interruptions (each costs a Ray start): Ctrl-C, then --resume whose driver is
    SIGKILLed, then --resume to the end, with every step logged exactly once."""
    root, shards = runs["root"], runs["shards"]
    path, _ = _config(root, shards, "interrupted", epochs=3)
    args = _launch_args(path, "interrupted")
    process = _sdo(*args)
    client = _wait_for_steps(process, root / "runs" / "interrupted", 1)
    os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, stderr = process.communicate(timeout=240)
    assert process.returncode == 130, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last == "sdo: interrupted; continue with sdo launch --name interrupted --resume"
    assert left_in_session(process.pid) == []

    run_dir = root / "runs" / "interrupted"
    run_id = read_identity(run_dir).run_id
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (run_dir / STOP_MARKER).exists()
    stored = sorted(run_dir.glob("checkpoint_step*"))
    assert stored, "the stop was not checkpointed"
    for directory in stored:  # no partial checkpoint: every one that is left loads
        checkpoints.load(directory)
    assert not [p for p in run_dir.rglob("*") if p.name.endswith(".tmp")]
    stopped_at = len(client.get_metric_history(run_id, "train/loss"))

    resumed = _sdo(*args, "--resume")
    _wait_for_steps(resumed, run_dir, stopped_at + 2)
    resumed.kill()  # the driver alone, as the OOM killer or `kill -9` would
    resumed.communicate(timeout=30)
    assert left_in_session(resumed.pid) == []  # Ray's processes are gone with it
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody was left to close it

    _resume_to_the_end(args, client, run_id, epochs=3)


def _launch_args(path: Path, name: str) -> list[str]:
    return ["launch", "--config", str(path), "--name", name, "--set", "eval.dam_images=0"]


def _wait_for_steps(process: subprocess.Popen, run_dir: Path, steps: int, timeout: float = 240) -> MlflowClient:
    """Wait until the run has logged ``steps`` training steps -> a client of its store."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        identity = read_identity(run_dir)
        if identity is not None:
            client = MlflowClient(identity.tracking_uri)
            if len(client.get_metric_history(identity.run_id, "train/loss")) >= steps:
                return client
        time.sleep(0.5)
    raise AssertionError(f"no {steps} steps logged: {process.communicate(timeout=60)}")


def _resume_to_the_end(args: list[str], client: MlflowClient, run_id: str, *, epochs: int) -> None:
    resumed = _sdo(*args, "--resume")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert client.get_run(run_id).info.status == "FINISHED"
    for key in LOSS_KEYS:
        assert _steps(client, run_id, key) == list(range(1, epochs * STEPS + 1)), key
    assert _values_by_step(client, run_id, "epoch") == [float(e) for e in range(epochs)]
    assert left_in_session(resumed.pid) == []

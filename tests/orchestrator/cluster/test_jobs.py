"""`sdo launch --cluster http://HEAD:PORT`: the Ray Jobs API path against a real loopback head.

The head is started with `ray start --head` on 127.0.0.1 with every port chosen free (other Ray
instances may share the machine) in its own process group and temp dir, and torn down by killing
exactly that process group.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from train_helpers import free_port, make_shards, tiny_config

from orchestrator.cluster.dispatch import train_on
from orchestrator.run.identity import read_identity

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def head():
    temp_dir = tempfile.mkdtemp(prefix="sdo-ray-")  # short: Ray's unix socket paths must stay < 108 chars
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard, "--dashboard-agent-listen-port": free_port(),
             "--dashboard-agent-grpc-port": free_port(), "--runtime-env-agent-port": free_port(),
             "--metrics-export-port": free_port(), "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--ray-client-server-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--dashboard-host", "127.0.0.1",
           "--num-cpus", "2", "--temp-dir", temp_dir, "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out, _ = proc.communicate(timeout=240)
    group = proc.pid  # `ray start` led its own session: the head's daemons stay in this process group
    try:
        assert proc.returncode == 0, out
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                break
            deadline = time.time() + wait
            while time.time() < deadline:
                try:
                    os.killpg(group, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_job_trains_on_the_head_and_follows_its_logs(head, tmp_path):
    shards = make_shards(tmp_path)
    _, cfg = tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", num_workers=1, epochs=1,
                         max_steps_per_epoch=1)
    lines = []
    assert train_on(cfg, cluster=head, name="jobrun", echo=lines.append) == 0
    text = "\n".join(lines)
    assert lines[0].startswith("sdo: submitted Ray job sdo-jobrun-")
    assert "sdo: run jobrun finished: AP=" in text  # the job's own output, streamed back
    assert lines[-1].endswith("SUCCEEDED")
    identity = read_identity(tmp_path / "runs" / "jobrun")
    run = MlflowClient(identity.tracking_uri).get_run(identity.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["cluster_kind"] == "ray-jobs"
    assert run.data.params["cluster.address"] == head
    assert run.data.params["train.num_workers"] == "1"
    assert "val/AP" in run.data.metrics


def test_failing_job_raises_with_its_status(head, tmp_path):
    # valid config, but shards that exist only on this side: the job fails on the head, naming them
    _, cfg = tiny_config(tmp_path / "tiny.yaml", {"train": tmp_path / "gone", "val": tmp_path / "gone"},
                         tmp_path / "runs", num_workers=1, epochs=1)
    lines = []
    with pytest.raises(RuntimeError, match="ended FAILED"):
        train_on(cfg, cluster=head, name="doomed", echo=lines.append)
    assert any("data.train_shards" in line for line in lines)

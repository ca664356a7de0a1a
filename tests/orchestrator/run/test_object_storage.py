"""A run whose train.storage_path is in object storage, against a real S3-compatible server (moto) on 127.0.0.1.

One tiny 2-worker run is trained for an epoch, then resumed for a second one, as a retried RayJob on a
fresh pod would: everything it needs again (sdo_run.json, the checkpoints Ray Train wrote) is read
back from the bucket, nothing from a local run folder. Asserted on the stored objects and MLflow.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient
from train_helpers import make_shards, tiny_config

pytest.importorskip("boto3")
pytest.importorskip("moto.server")  # the `s3` server fixture is in tests/conftest.py

from orchestrator.cluster.dispatch import train_on
from orchestrator.cluster.local import ray_session
from orchestrator.run import checkpoints
from orchestrator.run.storage import RemotePath, location
from pipelines.remote import s3_client

BUCKET, PREFIX = "sdo-runs", "team"
STEPS = 2


@pytest.fixture(scope="module")
def stored(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("objects")
    client = s3_client(s3)
    client.create_bucket(Bucket=BUCKET)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", s3)  # what pyarrow (Ray Train's checkpoints) and sdo read
        env.chdir(root)
        shards = make_shards(root, num_train=8, num_val=2, size=64)  # 2 steps per epoch on 2 workers
        _, cfg = tiny_config(root / "t.yaml", shards, f"s3://{BUCKET}/{PREFIX}", epochs=1, max_steps_per_epoch=STEPS,
                             checkpoint={"every_steps": None, "keep": 2})  # epoch ends only: ~130 MB of PUTs each
        cfg.tracking.uri = f"sqlite:///{root / 'mlflow.db'}"
        cfg.eval.dam_images = 1
        with ray_session(cfg):
            first = train_on(cfg, cluster="local", name="r1", echo=lambda _: None)
            cfg.train.epochs = 2
            second = train_on(cfg, cluster="local", name="r1", resume=True, echo=lambda _: None)
        listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/r1/")
        keys = sorted(item["Key"] for item in listed.get("Contents", []))
        state = json.loads(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/r1/sdo_run.json")["Body"].read())
        best = checkpoints.load(location(second["best_checkpoint"]))
        yield {"root": root, "first": first, "second": second, "keys": keys, "state": state, "best": best,
               "client": MlflowClient(cfg.tracking.uri)}  # the endpoint stays set for the tests' own reads


def test_run_state_checkpoints_and_eval_json_are_in_the_bucket(stored):
    keys = [k.removeprefix(f"{PREFIX}/r1/") for k in stored["keys"]]
    assert {"sdo_run.json", "config.yaml", "eval/epoch_0000.json", "eval/epoch_0001.json"} <= set(keys)
    stored_checkpoints = sorted({k.split("/")[0] for k in keys if k.startswith("checkpoint_step")})
    assert stored_checkpoints and all(f"{c}/{checkpoints.CHECKPOINT_FILE}" in keys for c in stored_checkpoints)
    assert len(stored_checkpoints) <= 2 + 1  # keep_checkpoints, plus the latest while it is not among the best
    assert stored["state"]["mlflow_run_id"] == stored["first"]["mlflow_run_id"] == stored["second"]["mlflow_run_id"]
    assert stored["state"]["run_dir"] == f"s3://{BUCKET}/{PREFIX}/r1"
    evaluated = json.loads(location(f"s3://{BUCKET}/{PREFIX}/r1/eval/epoch_0001.json").read_text())
    assert evaluated["epoch"] == 1 and evaluated["metrics"]["AP"] == pytest.approx(stored["second"]["AP"])
    # nothing of the run went to a local folder named after it (no "s3:" folder, no runs/)
    assert not (stored["root"] / "s3:").exists() and not (stored["root"] / "runs").exists()


def test_the_resume_read_its_checkpoint_back_from_the_bucket(stored):
    client, run_id = stored["client"], stored["second"]["mlflow_run_id"]
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["sdo.resumed_from_step"] == str(STEPS)
    assert run.data.tags["sdo.resumed_from"].startswith(f"s3://{BUCKET}/{PREFIX}/r1/checkpoint_step")
    steps = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert steps == list(range(1, 2 * STEPS + 1))  # each step once across the two launches
    assert [m.value for m in sorted(client.get_metric_history(run_id, "train/epoch"), key=lambda m: m.step)] == [0.0, 1.0]
    assert stored["second"]["best_checkpoint"].startswith(f"s3://{BUCKET}/{PREFIX}/r1/checkpoint_step")
    assert isinstance(location(stored["second"]["best_checkpoint"]), RemotePath)
    assert all(torch.isfinite(v).all() for v in stored["best"]["model"].values() if v.is_floating_point())


def _sdo(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, check=False)


def test_object_storage_without_a_tracking_server_exits_2_before_anything_is_written(stored, tmp_path):
    root = stored["root"]
    done = _sdo("launch", "--config", str(root / "t.yaml"), "--name", "no-tracking", cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sdo: error: train.storage_path='s3://{BUCKET}/{PREFIX}': the embedded MLflow store")
    done = _sdo("launch", "--config", str(root / "t.yaml"), "--name", "x", "--set", "train.storage_path=ftp://h/x",
                cwd=tmp_path)
    assert done.returncode == 2 and "train.storage_path: 'ftp://h/x': storage must be" in done.stderr.splitlines()[-1]

"""A sweep whose train.storage_path is in object storage, against a real S3-compatible server (moto) on
127.0.0.1, and its --resume after the driver was SIGKILLed.

The trials are a toy trainable (a real training adds nothing here: single runs in object storage are
tests/orchestrator/run/test_object_storage.py's): each opens its MLflow child run and its run directory in
the bucket as a real trial does, and reports 2 epochs, a second apart. The first driver is killed once
Tune's state in the bucket shows a finished trial; a second driver resumes from the bucket alone. Asserted on
the stored objects and MLflow: every trial ends once, with exactly one child run, the report lands in the
bucket, and nothing of the sweep is written to a local folder.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient
from train_helpers import left_in_session, make_shards, tiny_config

pytest.importorskip("boto3")
pytest.importorskip("moto.server")  # the `s3` server fixture is in tests/conftest.py

from pipelines.remote import s3_client

BUCKET, PREFIX, NAME = "sdo-sweeps", "team", "remote"
COEFS = [3.0, 2.0, 1.0]

DRIVER = textwrap.dedent('''
    import json, sys, time
    from orchestrator.config import load_config
    from orchestrator.sweep.tuner import run_sweep

    def toy_trial(params, *, setup):
        from ray import tune
        from orchestrator.config import from_dict
        from orchestrator.run.lifecycle import open_run
        from orchestrator.sweep.space import trial_config
        from orchestrator.sweep.trial import take_up, trial_run_name

        cfg = trial_config(from_dict(setup["cfg"]), params, epochs=setup["epochs"],
                           parent_run_id=setup["parent_run_id"], tracking_uri=setup["tracking_uri"])
        cfg.train.storage_path = setup["trials_dir"]
        name = trial_run_name(setup["name"], tune.get_context().get_trial_id())
        open_run(cfg, name=name, resume=take_up(cfg, name))  # as a real trial opens its run
        coef = float(params["loss.cls_coef"])
        for epoch in range(setup["epochs"]):
            time.sleep(1.0)
            tune.report({"epoch": epoch, "AP": coef / 10 + 0.01 * epoch, "AP50": coef / 5, "img_per_s": 1.0})

    summary = run_sweep(load_config(sys.argv[1]), name=sys.argv[2], resume="--resume" in sys.argv,
                        trainable=toy_trial)
    print("SUMMARY " + json.dumps({k: summary[k] for k in ("rows", "interrupted", "failed", "sweep_dir", "mlflow_run_id")},
                                  default=str))
''')


def _tune_state(client) -> str:
    """The text of Tune's experiment state files in the bucket ('' before the first upload)."""
    listed = client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/sweeps/{NAME}/").get("Contents", [])
    keys = [o["Key"] for o in listed if o["Key"].rsplit("/", 1)[-1].startswith("experiment_state")]
    return "".join(client.get_object(Bucket=BUCKET, Key=k)["Body"].read().decode() for k in keys)


@pytest.fixture(scope="module")
def swept(s3, tmp_path_factory):
    root = tmp_path_factory.mktemp("remote-sweep")
    client = s3_client(s3)
    client.create_bucket(Bucket=BUCKET)
    shards = make_shards(root, num_train=2, num_val=1, size=32)
    path, _ = tiny_config(root / "tiny.yaml", shards, f"s3://{BUCKET}/{PREFIX}")
    values = yaml.safe_load(path.read_text())
    values["tracking"] = {"uri": f"sqlite:///{root / 'mlflow.db'}"}
    values["sweep"] = {"space": {"loss.cls_coef": {"grid": COEFS}}, "max_concurrent": 1, "max_epochs": 2,
                       "scheduler": "fifo"}
    path.write_text(yaml.safe_dump(values))
    (root / "driver.py").write_text(DRIVER)
    env = {**os.environ, "AWS_ENDPOINT_URL": s3}
    command = [sys.executable, str(root / "driver.py"), str(path), NAME]
    with (root / "first.log").open("w") as log:
        first = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        deadline = time.monotonic() + 240
        while "TERMINATED" not in _tune_state(client) and first.poll() is None and time.monotonic() < deadline:
            time.sleep(1.0)
        killed = first.poll() is None
        os.killpg(first.pid, signal.SIGKILL)  # the driver dies: no cleanup, no final state upload
        first.wait(timeout=30)
    left = left_in_session(first.pid)
    state = yaml.safe_load(client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/sweeps/{NAME}/sdo_sweep.json")["Body"].read())
    children_before = _children(MlflowClient(values["tracking"]["uri"]), state)
    resumed = subprocess.run([*command, "--resume"], cwd=root, env=env, capture_output=True, text=True, timeout=300,
                             check=False)
    line = next((x for x in resumed.stdout.splitlines() if x.startswith("SUMMARY ")), None)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{PREFIX}/").get("Contents", [])]
    report = client.get_object(Bucket=BUCKET, Key=f"{PREFIX}/sweeps/{NAME}/report/trials.json")["Body"].read() \
        if f"{PREFIX}/sweeps/{NAME}/report/trials.json" in keys else b"{}"
    return {"root": root, "killed": killed, "first_log": (root / "first.log").read_text(), "left": left,
            "state": state, "before": children_before, "resumed": resumed,
            "summary": json.loads(line[len("SUMMARY "):]) if line else None, "keys": keys,
            "report": json.loads(report), "client": MlflowClient(values["tracking"]["uri"])}


def _children(client, state) -> dict[str, list[str]]:
    runs = client.search_runs([state["experiment_id"]], f"tags.mlflow.parentRunId = '{state['mlflow_run_id']}'")
    out: dict[str, list[str]] = {}
    for run in runs:
        out.setdefault(run.info.run_name, []).append(run.info.run_id)
    return out


def test_the_driver_died_mid_sweep_and_resume_finished_it_from_the_bucket(swept):
    assert swept["killed"], swept["first_log"][-3000:]  # killed while trials were still to run
    assert swept["left"] == []  # the reaper took the embedded Ray down with the driver
    resumed = swept["resumed"]
    assert resumed.returncode == 0 and swept["summary"], resumed.stdout[-3000:] + resumed.stderr[-3000:]
    rows = swept["summary"]["rows"]
    assert sorted(r["params"]["loss.cls_coef"] for r in rows) == sorted(COEFS)
    assert all(r["status"] == "completed" and r["epochs"] == 2 for r in rows), rows
    assert swept["summary"]["sweep_dir"] == f"s3://{BUCKET}/{PREFIX}/sweeps/{NAME}"
    # every trial has one child run; those opened before the kill were taken up again, not duplicated
    after = _children(swept["client"], swept["state"])
    assert sorted(after) == sorted(r["run_name"] for r in rows) and all(len(v) == 1 for v in after.values())
    # (a run the killed driver created in MLflow but never recorded, if the kill fell there, is deleted)
    client = swept["client"]
    assert swept["before"]
    for name, ids in swept["before"].items():
        assert after[name] == ids or all(client.get_run(i).info.lifecycle_stage == "deleted"
                                         and not client.get_run(i).data.metrics for i in ids if i not in after[name])
    parent = swept["client"].get_run(swept["state"]["mlflow_run_id"])
    assert parent.info.status == "FINISHED" and parent.info.run_id == swept["summary"]["mlflow_run_id"]


def test_state_trials_and_report_are_in_the_bucket(swept):
    keys = [k.removeprefix(f"{PREFIX}/sweeps/{NAME}/") for k in swept["keys"]]
    assert {"sdo_sweep.json", "config.yaml", "report/trials.json", "report/pareto.png"} <= set(keys)
    assert any(k.startswith("experiment_state") for k in keys)
    rows = swept["summary"]["rows"]
    assert {f"trials/{r['run_name']}/sdo_run.json" for r in rows} <= set(keys)
    assert sorted(t["trial"] for t in swept["report"]["trials"]) == sorted(r["trial"] for r in rows)
    # nothing of the sweep went to a local folder named after the bucket
    assert not (swept["root"] / "s3:").exists() and not (swept["root"] / BUCKET).exists()
